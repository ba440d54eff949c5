"""Atomic save and checked load of checkpoints (latest, best) for resuming.

A checkpoint (format version 2) holds the global G and D (packed state_dict),
the server-side EMA generator when there is one, the round it closes, the best
quality so far, the run's config, the W&B run id and the server optimizer's
state (FedAdam's moments, FedAvgM's momentum): enough to resume exactly.
Version-1 files (no EMA, no optimizer state) still load. Writes are atomic
(`fedgan_app.files`: temp file, fsync, rename, fsync of the folder), so a crash
mid-write never corrupts the previous checkpoint. Loads use
`torch.load(weights_only=True)`, which cannot run code from a foreign file.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedgan_app.files import atomic_torch_save

FORMAT = "fedgan-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, foreign or inconsistent."""


@dataclass
class Checkpoint:
    """Everything needed to resume a run after `server_round`."""

    state: dict[str, torch.Tensor]  # packed G+D state_dict ("generator.*", ...)
    server_round: int
    config: dict[str, Any]
    best_metric: float | None = None  # best fid so far (lower is better)
    best_round: int | None = None
    wandb_run_id: str | None = None
    # Server optimizer state, str -> tensor or plain value ({} when it keeps none).
    strategy_state: dict[str, Any] = field(default_factory=dict)
    # Packed "generator.*" state of the server-side EMA generator, or None.
    ema_state: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for torch.save (only types weights_only loading accepts)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "state": dict(self.state),
            "ema_state": None if self.ema_state is None else dict(self.ema_state),
            "server_round": self.server_round,
            "config": self.config,
            "best_metric": self.best_metric,
            "best_round": self.best_round,
            "wandb_run_id": self.wandb_run_id,
            "strategy_state": dict(self.strategy_state),
            "extra": self.extra,
        }


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    """Write a checkpoint atomically."""
    atomic_torch_save(checkpoint.to_dict(), path)


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Load and check a checkpoint; raise CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of foreign files; the error says it.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Not torch's own text: it suggests weights_only=False, i.e. running the file.
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a fedgan checkpoint: it does not "
            f"hold only tensors and plain values ({_unpickler_detail(exc)}); nothing "
            "in it was run"
        ) from exc
    except Exception as exc:  # truncated zip, text, ...
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); is it truncated or "
            "not a fedgan checkpoint?"
        ) from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fedgan checkpoint")
    version = raw.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(
            f"checkpoint {path} has version {version!r}; this fedgan reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    state = raw.get("state")
    if not _is_tensor_dict(state):
        raise CheckpointError(f"checkpoint {path} has no valid model state")
    ema_state = raw.get("ema_state")
    if ema_state is not None and not _is_tensor_dict(ema_state):
        raise CheckpointError(f"checkpoint {path} has an invalid ema_state")
    strategy_state = raw.get("strategy_state") or {}
    if not isinstance(strategy_state, dict) or not all(
        isinstance(k, str) and isinstance(v, (torch.Tensor, *_PLAIN))
        for k, v in strategy_state.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} has an invalid strategy_state (expected str -> tensor "
            "or plain value)"
        )
    server_round = raw.get("server_round")
    if not isinstance(server_round, int) or isinstance(server_round, bool) or server_round < 0:
        raise CheckpointError(f"checkpoint {path} has an invalid round {server_round!r}")
    # weights_only loading allows any dict/list/str/number: check each field's type,
    # so a crafted file fails here and not rounds later inside training.
    fields = {
        "config": (raw.get("config") or {}, dict),
        "best_metric": (raw.get("best_metric"), (int, float, type(None))),
        "best_round": (raw.get("best_round"), (int, type(None))),
        "wandb_run_id": (raw.get("wandb_run_id"), (str, type(None))),
        "extra": (raw.get("extra") or {}, dict),
    }
    for name, (value, kinds) in fields.items():
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise CheckpointError(
                f"checkpoint {path} has an invalid {name} ({type(value).__name__})"
            )
    best_metric = fields["best_metric"][0]
    return Checkpoint(
        state=state,
        server_round=server_round,
        config=dict(fields["config"][0]),
        best_metric=None if best_metric is None else float(best_metric),
        best_round=fields["best_round"][0],
        wandb_run_id=fields["wandb_run_id"][0],
        strategy_state=dict(strategy_state),
        ema_state=None if ema_state is None else dict(ema_state),
        extra=dict(fields["extra"][0]),
    )


# Values a strategy_state may hold beside tensors.
_PLAIN = (int, float, str, bool, type(None))


def _is_tensor_dict(value: Any) -> bool:
    """True for a dict of str -> tensor."""
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def check_state_matches(
    checkpoint: Checkpoint, path: Path, reference: dict[str, tuple[int, ...]]
) -> None:
    """Raise CheckpointError unless the checkpoint's arrays fit the models built now.

    `reference` maps each packed key to its shape. Dtypes are not compared:
    averaging turns integer buffers (BatchNorm counters) into float64, and
    `load_state_dict` casts them back.
    """
    keys, expected = set(checkpoint.state), set(reference)
    if keys != expected:
        missing = sorted(expected - keys)[:3]
        extra = sorted(keys - expected)[:3]
        raise CheckpointError(
            f"checkpoint {path} does not fit the models of this run (missing {missing}, "
            f"unexpected {extra}); was it written with other model settings?"
        )
    for key, shape in reference.items():
        if tuple(checkpoint.state[key].shape) != tuple(shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit the models of this run: '{key}' is "
                f"{tuple(checkpoint.state[key].shape)}, expected {tuple(shape)} (check "
                "'latent-dim' and 'dataset' against the checkpointed run)"
            )


def _unpickler_detail(exc: Exception) -> str:
    """The reason torch's weights-only unpickler gives, without its advice."""
    text = str(exc)
    _, _, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail or text).splitlines() if line.strip()]
    return lines[0].split(". Please")[0][:200] if lines else type(exc).__name__


def resolve_resume_path(resume_from: str) -> Path:
    """Map the 'resume-from' setting (a file or a run folder) to a checkpoint file."""
    path = Path(resume_from).expanduser().resolve()
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise CheckpointError(
            f"setting 'resume-from': no checkpoint at {path} (give a .pt file or a "
            "run folder holding checkpoints/latest.pt)"
        )
    return path
