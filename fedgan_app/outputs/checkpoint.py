"""Atomic save and checked load of checkpoints (latest, best) for resuming.

A checkpoint (format version 2) holds the global G and D (packed state_dict),
the server-side EMA generator when there is one, the round it closes, the best
quality so far, the run's config, the W&B run id and the server optimizer's
state (FedAdam's moments, FedAvgM's momentum): enough to resume exactly.
Version-1 files (no EMA, no optimizer state) still load. Writes are atomic
(`fedgan_app.files`: temp file, fsync, rename, fsync of the folder), so a crash
mid-write never corrupts the previous checkpoint. A file to load is untrusted:
its size and zip structure are checked before torch reads it (no entry may
expand beyond the file), and `torch.load(weights_only=True)` cannot run code
from a foreign file.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from fedgan_app.files import atomic_torch_save
from fedgan_app.outputs.runfolder import CHECKPOINTS_DIR, LATEST_CHECKPOINT, RunFolder

FORMAT = "fedgan-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)


# A checkpoint holds the packed G and D, the EMA generator and the server
# optimizer's state (FedAdam: two moments per array), about 4x the model: 13 MiB
# for the default model (g-width 32, d-width 64), 1.1 GiB for widths 16x those.
# A larger file is refused before torch reads any of it (`load_checkpoint`'s
# max_bytes raises the cap for larger models).
MAX_CHECKPOINT_BYTES = 2 << 30
# torch.save writes six small records plus one per tensor storage (a few
# hundred for the default model, with FedAdam's moments and the EMA G).
MAX_CHECKPOINT_ENTRIES = 10_000
# Bytes of zip directory per entry: torch's names ("<name>/data/123") are short.
_DIRECTORY_BYTES_PER_ENTRY = 256
_ZIP_LOCAL_HEADER = b"PK\x03\x04"  # how torch tells a zip checkpoint from a legacy one
_END = struct.Struct("<4s4H2LH")  # end of central directory record, without a comment
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END = struct.Struct("<4sQ2H2L4Q")


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


def load_checkpoint(path: Path | str, max_bytes: int = MAX_CHECKPOINT_BYTES) -> Checkpoint:
    """Load and check a checkpoint; raise CheckpointError naming the file.

    Parameters
    ----------
    path : Path | str
        The checkpoint file.
    max_bytes : int
        The largest file accepted (`MAX_CHECKPOINT_BYTES` by default; raise it
        for models far wider than the defaults).

    Returns
    -------
    Checkpoint
        The checked checkpoint.

    Notes
    -----
    The file is untrusted input (a checkpoint may come from anywhere): its
    size and zip structure are checked before torch reads it (see
    `_check_archive`), torch unpickles only tensors and plain values, and
    every field is type-checked. No message passes on torch's advice to load
    with ``weights_only=False``, which would run code from the file.

    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; one handle for both reads
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be opened ({exc.strerror})") from exc
    with handle:
        # Checked and loaded through one handle: a file swapped in between is not read.
        _check_archive(handle, path, max_bytes)
        handle.seek(0)
        raw = _torch_load(handle, path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a fedgan checkpoint")
    version = raw.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(
            f"checkpoint {path} has version {version!r}; this fedgan reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    state, ema_state, strategy_state = _checked_states(raw, path)
    server_round = raw.get("server_round")
    if not isinstance(server_round, int) or isinstance(server_round, bool) or server_round < 0:
        raise CheckpointError(f"checkpoint {path} has an invalid round {server_round!r}")
    fields = _checked_fields(raw, path)
    best_metric = fields["best_metric"]
    return Checkpoint(
        state=state,
        server_round=server_round,
        config=dict(fields["config"]),
        best_metric=None if best_metric is None else float(best_metric),
        best_round=fields["best_round"],
        wandb_run_id=fields["wandb_run_id"],
        strategy_state=dict(strategy_state),
        ema_state=None if ema_state is None else dict(ema_state),
        extra=dict(fields["extra"]),
    )


def _checked_states(raw: dict[str, Any], path: Path) -> tuple[Any, Any, Any]:
    """(state, ema_state, strategy_state) of a loaded checkpoint, each type-checked."""
    state = raw.get("state")
    if not _is_tensor_dict(state):
        raise CheckpointError(f"checkpoint {path} has no valid model state")
    ema_state = raw.get("ema_state")
    if ema_state is not None and not _is_tensor_dict(ema_state):
        raise CheckpointError(f"checkpoint {path} has an invalid ema_state")
    strategy_state = raw.get("strategy_state") or {}
    if not isinstance(strategy_state, dict) or not all(
        isinstance(k, str) and (isinstance(v, torch.Tensor) or _is_plain(v))
        for k, v in strategy_state.items()
    ):
        raise CheckpointError(
            f"checkpoint {path} has an invalid strategy_state (expected str -> tensor "
            "or plain value)"
        )
    return state, ema_state, strategy_state


def _checked_fields(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """The plain fields of a loaded checkpoint (config, best, W&B id, extra), type-checked."""
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
    for name in ("config", "extra"):
        # fedgan writes only plain values here; anything else (a list shared with
        # itself 40 times over, a 1 MB int) would cost hours to print or compare.
        if not all(isinstance(k, str) and _is_plain(v) for k, v in fields[name][0].items()):
            raise CheckpointError(
                f"checkpoint {path} has an invalid {name} (expected str -> number, short "
                "string, bool or None)"
            )
    return {name: value for name, (value, _) in fields.items()}


def _check_archive(handle: IO[bytes], path: Path, max_bytes: int) -> None:
    """Raise CheckpointError unless the file is a zip archive as torch.save writes one.

    Bounded before it is parsed: the file's size, then the entry count and the
    directory's size its end record declares, then each entry. Every entry
    must be stored uncompressed, as torch.save stores them: then no entry can
    expand beyond the bytes it occupies in the file, whatever sizes its
    headers declare, so torch's reader never holds more than the file (a
    compressed 1 MB "zip bomb" would expand to 1 GB as torch reads it).
    Legacy (pre-zip) torch files and plain pickles are refused: fedgan never
    wrote them.
    """
    size = os.fstat(handle.fileno()).st_size
    if size > max_bytes:
        raise CheckpointError(
            f"checkpoint {path} is {size / 2**20:.0f} MiB, more than the "
            f"{max_bytes / 2**20:.0f} MiB a fedgan checkpoint may hold; it was not read"
        )
    if handle.read(len(_ZIP_LOCAL_HEADER)) != _ZIP_LOCAL_HEADER:
        raise CheckpointError(
            f"checkpoint {path} is not a fedgan checkpoint: not a zip archive as "
            "torch.save writes (old torch formats and plain pickles are not read); "
            "nothing in it was run"
        )
    entries, directory = _declared_directory(handle, size, path)
    if entries > MAX_CHECKPOINT_ENTRIES or directory > (
            MAX_CHECKPOINT_ENTRIES * _DIRECTORY_BYTES_PER_ENTRY):
        raise CheckpointError(
            f"checkpoint {path} declares {entries} entries in {directory} bytes of zip "
            f"directory; a fedgan checkpoint has at most {MAX_CHECKPOINT_ENTRIES}"
        )
    try:
        infos = zipfile.ZipFile(handle).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read: a damaged zip archive ({exc}); is it "
            "truncated?"
        ) from exc
    if len(infos) > MAX_CHECKPOINT_ENTRIES:
        raise CheckpointError(f"checkpoint {path} holds {len(infos)} entries; a fedgan "
                              f"checkpoint has at most {MAX_CHECKPOINT_ENTRIES}")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"checkpoint {path} is not a fedgan checkpoint: its entry "
                f"{info.filename[:100]!r} is compressed (torch.save never compresses, "
                "and a compressed entry can expand far beyond the file); it was not read"
            )
        if (info.file_size != info.compress_size
                or info.header_offset + info.compress_size > size):
            raise CheckpointError(
                f"checkpoint {path} cannot be read: its entry {info.filename[:100]!r} "
                f"declares {info.file_size} bytes that the file does not hold; is it "
                "damaged?"
            )
    declared = sum(info.file_size for info in infos)
    if declared > size:  # entries that overlap would each be read in full
        raise CheckpointError(
            f"checkpoint {path} cannot be read: its entries declare {declared} bytes in "
            f"a file of {size}; is it damaged?"
        )


def _declared_directory(handle: IO[bytes], size: int, path: Path) -> tuple[int, int]:
    """(entries, directory bytes) the zip's end record declares (zip64 ones too)."""
    damaged = CheckpointError(f"checkpoint {path} cannot be read: its zip archive has no "
                              "end record where torch.save writes one; is it truncated?")
    if size < _END.size + _ZIP64_LOCATOR.size:
        raise damaged
    handle.seek(size - _END.size)
    signature, *_, entries, directory, _, comment = _END.unpack(handle.read(_END.size))
    # torch writes no comment, so the record ends the file: where every reader finds it.
    if signature != b"PK\x05\x06" or comment:
        raise damaged
    if entries == 0xFFFF or directory == 0xFFFFFFFF:  # the zip64 record holds them
        handle.seek(size - _END.size - _ZIP64_LOCATOR.size)
        signature, _, offset, _ = _ZIP64_LOCATOR.unpack(handle.read(_ZIP64_LOCATOR.size))
        if signature != b"PK\x06\x07" or offset + _ZIP64_END.size > size:
            raise damaged
        handle.seek(offset)
        record = _ZIP64_END.unpack(handle.read(_ZIP64_END.size))
        if record[0] != b"PK\x06\x06":
            raise damaged
        entries, directory = record[7], record[8]
    return entries, directory


# Values a config, extra or strategy_state may hold (beside tensors in the last).
_PLAIN = (int, float, str, bool, type(None))
_MAX_PLAIN_STR = 4096  # characters: a path or a dataset name fits


def _is_plain(value: Any) -> bool:
    """True for a number within 64 bits, a short string, a bool or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() <= 64
    if isinstance(value, str):
        return len(value) <= _MAX_PLAIN_STR
    return isinstance(value, _PLAIN)


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


def _torch_load(handle: IO[bytes], path: Path) -> Any:
    """``torch.load`` with weights_only; any failure is a CheckpointError in our words."""
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of foreign files; the error says it.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Not torch's own text: it suggests weights_only=False, i.e. running the file.
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a fedgan checkpoint: it does not "
            f"hold only tensors and plain values ({_torch_reason(exc)}); nothing "
            "in it was run"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a damaged archive, a bad record, ...
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: "
            f"{_torch_reason(exc)}); is it truncated or not a fedgan checkpoint?"
        ) from exc


def _torch_reason(exc: Exception) -> str:
    """The first line of torch's reason, without its advice (never 'weights_only=False')."""
    text = str(exc)
    _, _, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail or text).splitlines() if line.strip()]
    reason = lines[0].split(". Please")[0].split("(Could this")[0].strip() if lines else ""
    if not reason or "weights_only" in reason:
        return type(exc).__name__
    return reason[:200]


def resolve_resume_path(resume_from: str) -> Path:
    """Map the 'resume-from' setting (a file or a run folder) to a checkpoint file."""
    path = Path(resume_from).expanduser().resolve()
    if path.is_dir():
        path = RunFolder(path).latest_pt
    if not path.is_file():
        raise CheckpointError(
            f"setting 'resume-from': no checkpoint at {path} (give a .pt file or a "
            f"run folder holding {CHECKPOINTS_DIR}/{LATEST_CHECKPOINT})"
        )
    return path
