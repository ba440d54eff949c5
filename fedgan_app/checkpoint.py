"""Atomic save and checked load of checkpoints (latest, best) for resuming.

A checkpoint holds the global G and D (packed state_dict), the round it
closes, the best quality so far, the run's config and the W&B run id: enough
to resume. Writes go to a temp file in the same folder, are fsynced, then
renamed over the old file, so a crash mid-write never corrupts the previous
checkpoint. Loads use `torch.load(weights_only=True)`, which cannot run code
from a foreign file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "fedgan-checkpoint"
VERSION = 1


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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for torch.save (only types weights_only loading accepts)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "state": dict(self.state),
            "server_round": self.server_round,
            "config": self.config,
            "best_metric": self.best_metric,
            "best_round": self.best_round,
            "wandb_run_id": self.wandb_run_id,
            "extra": self.extra,
        }


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    """Write a checkpoint atomically."""
    atomic_torch_save(checkpoint.to_dict(), path)


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Load and check a checkpoint; raise CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle of foreign classes, ...
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); is it truncated or "
            "not a fedgan checkpoint?"
        ) from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fedgan checkpoint")
    if raw.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has version {raw.get('version')!r}; this fedgan "
            f"reads version {VERSION}"
        )
    state = raw.get("state")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"checkpoint {path} has no valid model state")
    server_round = raw.get("server_round")
    if not isinstance(server_round, int) or server_round < 0:
        raise CheckpointError(f"checkpoint {path} has an invalid round {server_round!r}")
    return Checkpoint(
        state=state,
        server_round=server_round,
        config=dict(raw.get("config") or {}),
        best_metric=raw.get("best_metric"),
        best_round=raw.get("best_round"),
        wandb_run_id=raw.get("wandb_run_id"),
        extra=dict(raw.get("extra") or {}),
    )


def resolve_resume_path(resume_from: str) -> Path:
    """Map the 'resume-from' setting (a file or a run folder) to a checkpoint file."""
    path = Path(resume_from).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise CheckpointError(
            f"setting 'resume-from': no checkpoint at {path} (give a .pt file or a "
            "run folder holding checkpoints/latest.pt)"
        )
    return path
