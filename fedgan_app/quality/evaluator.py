"""On-disk cache of the trained quality evaluator: the only file I/O of evaluation.

The cache file name derives from a hash of the caller's key (dataset name +
split definition + seed) joined with the evaluator's own recipe
(`evaluation.EVALUATOR_RECIPE`: architecture and training settings), and
that full key is stored in the file and checked on load, so a changed
dataset, split or evaluator recipe never reuses a stale evaluator. Files are
written atomically; an unreadable or foreign file is logged and replaced.
Processes that need an evaluator at the same moment take turns (a lock on the
cache folder): one trains it, the others load its file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.common.logger import log

from fedgan_app.files import atomic_torch_save, folder_lock
from fedgan_app.quality.metrics import EVALUATOR_RECIPE, Evaluator, train_evaluator

CACHE_FORMAT = "fedgan-evaluator-v1"


def full_key(key: str) -> str:
    """The caller's key (data, split, seed) joined with the evaluator's recipe."""
    return f"{key}|evaluator={json.dumps(EVALUATOR_RECIPE, sort_keys=True)}"


def cache_path(cache_dir: Path, key: str) -> Path:
    """Return the cache file for ``key``: ``evaluator-<sha256(full key)[:16]>.pt``."""
    digest = hashlib.sha256(full_key(key).encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"evaluator-{digest}.pt"


def load_or_train_evaluator(
    cache_dir: Path,
    key: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int,
) -> tuple[Evaluator, float, bool]:
    """Return (evaluator, heldout_accuracy, trained_now).

    Parameters
    ----------
    cache_dir : Path
        Folder of the cache files; created when missing.
    key : str
        Everything that defines the evaluator (dataset name, split definition,
        seed); it names the file and must match the key stored in it.
    images, labels, num_classes, seed
        Passed to ``train_evaluator`` when no valid cache file exists.

    Returns
    -------
    tuple[Evaluator, float, bool]
        The eval-mode evaluator, its held-out accuracy, and whether it was
        trained by this call (False: loaded from the cache).

    """
    path = cache_path(cache_dir, key)
    key = full_key(key)
    expected_args = {
        "in_channels": int(images.shape[1]),
        "image_size": int(images.shape[-1]),
        "num_classes": num_classes,
    }
    # One process trains, others wanting the same evaluator wait and then load it.
    with folder_lock(path.parent):
        if path.exists():
            loaded = _load(path, key, expected_args)
            if loaded is not None:
                log(
                    logging.INFO,
                    "Loaded quality evaluator from %s (held-out accuracy %.4f)",
                    path,
                    loaded[1],
                )
                return loaded[0], loaded[1], False
        start = time.perf_counter()
        evaluator, accuracy = train_evaluator(images, labels, num_classes, seed)
        log(
            logging.INFO,
            "Trained quality evaluator in %.1f s (held-out accuracy %.4f)",
            time.perf_counter() - start,
            accuracy,
        )
        _save_atomic(path, key, evaluator, accuracy)
    return evaluator, accuracy, True


def _load(path: Path, key: str, expected_args: dict[str, int]) -> tuple[Evaluator, float] | None:
    """Return (evaluator, accuracy) from ``path``, or None (with a warning) if unusable."""
    try:
        # weights_only: the file holds only tensors, strings and numbers; never unpickle code.
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CACHE_FORMAT:
            raise ValueError("not an evaluator cache file")
        if payload.get("key") != key:
            raise ValueError(f"it was written for key {payload.get('key')!r}, not {key!r}")
        if payload.get("constructor_args") != expected_args:
            raise ValueError(
                f"architecture {payload.get('constructor_args')} != expected {expected_args}"
            )
        evaluator = Evaluator(**expected_args)
        evaluator.load_state_dict(payload["state_dict"])
        accuracy = float(payload["accuracy"])
    except Exception as err:  # noqa: BLE001 - any unreadable file means: retrain
        log(
            logging.WARNING,
            "Ignoring evaluator cache %s (%s: %s); retraining",
            path,
            type(err).__name__,
            err,
        )
        return None
    evaluator.eval()
    return evaluator, accuracy


def _save_atomic(path: Path, key: str, evaluator: Evaluator, accuracy: float) -> None:
    """Write the evaluator to ``path`` atomically (temp file, fsync, rename)."""
    payload = {
        "format": CACHE_FORMAT,
        "key": key,
        "constructor_args": evaluator.constructor_args(),
        "state_dict": evaluator.state_dict(),
        "accuracy": accuracy,
    }
    atomic_torch_save(payload, path)
