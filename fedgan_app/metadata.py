"""Per-client training metadata: a pickled dataclass, decoded safely on the server.

Clients send a `TrainMetadata` beside their weights (loss history, timings,
convergence flag, partition info). Pickle is the transport the project chose,
so the server treats the bytes as hostile: a size cap before anything is
read, an unpickler that can only build `TrainMetadata` and a few inert
builtin containers (so no `__reduce__` payload can reach `os.system`,
`eval`, ...), and a check of every field's type after decoding.
"""

from __future__ import annotations

import io
import math
import pickle
from dataclasses import dataclass, field, fields

from flwr.app import ConfigRecord

METADATA_KEY = "train-metadata"  # key of the bytes inside the reply's ConfigRecord
DEFAULT_MAX_BYTES = 1_000_000
MAX_HISTORY = 100_000  # longest loss history accepted (steps per round)


class MetadataError(ValueError):
    """A metadata payload was missing, too large, hostile or malformed."""


def has_converged(losses: list[float], window: int = 10, tol: float = 0.05) -> bool:
    """Whether a loss history has plateaued.

    True when the mean of the last `window` losses differs from the mean of
    the `window` before it by less than `tol` relative to their scale. Needs
    at least two full windows; GAN losses oscillate, so this flags a plateau,
    not an optimum.
    """
    if len(losses) < 2 * window:
        return False
    recent = sum(losses[-window:]) / window
    before = sum(losses[-2 * window : -window]) / window
    scale = max(abs(before), abs(recent), 1e-8)
    return abs(recent - before) / scale < tol


@dataclass(frozen=True)
class TrainMetadata:
    """What one client reports about one round of local training."""

    partition_id: int
    server_round: int
    num_examples: int
    label_histogram: list[int]
    loss_d: list[float]
    loss_g: list[float]
    d_x: list[float]  # mean D(x) on real images, per step
    d_gz: list[float]  # mean D(G(z)) on fakes, per step (before G's update)
    wall_time_s: float
    steps: int
    converged: bool
    device: str = "cpu"
    extra: dict[str, float] = field(default_factory=dict)


# (module, name) pairs the unpickler may resolve. Only our dataclass and
# containers whose construction runs no user code.
_ALLOWED_GLOBALS = frozenset(
    {
        (__name__, "TrainMetadata"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals."""

    def find_class(self, module: str, name: str) -> type:
        """Resolve a global, or refuse it before anything is imported or called."""
        if (module, name) not in _ALLOWED_GLOBALS:
            raise MetadataError(f"forbidden global {module}.{name} in metadata")
        return super().find_class(module, name)

    def persistent_load(self, pid: object) -> object:
        """Refuse persistent ids (another way to reach outside objects)."""
        raise MetadataError("persistent ids are not allowed in metadata")


def encode_metadata(meta: TrainMetadata) -> ConfigRecord:
    """Pickle `meta` into a ConfigRecord for the reply."""
    return ConfigRecord({METADATA_KEY: pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)})


def decode_metadata(
    record: ConfigRecord | None, max_bytes: int = DEFAULT_MAX_BYTES
) -> TrainMetadata:
    """Decode and check a reply's metadata; raise MetadataError on anything off."""
    if record is None or METADATA_KEY not in record:
        raise MetadataError(f"reply has no '{METADATA_KEY}' metadata")
    payload = record[METADATA_KEY]
    if not isinstance(payload, bytes):
        raise MetadataError(f"metadata must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise MetadataError(
            f"metadata is {len(payload)} bytes, over the cap of {max_bytes}"
        )
    try:
        meta = _RestrictedUnpickler(io.BytesIO(payload)).load()
    except MetadataError:
        raise
    except Exception as exc:  # truncated streams, bad opcodes, recursion, ...
        raise MetadataError(
            f"metadata does not unpickle: {type(exc).__name__}: {exc}"
        ) from None
    if type(meta) is not TrainMetadata:
        raise MetadataError(f"metadata is a {type(meta).__name__}, not TrainMetadata")
    _check_fields(meta)
    return meta


def _is_int(value: object) -> bool:
    """True for a real int (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_float_list(value: object) -> bool:
    """True for a list of finite floats (ints allowed)."""
    return isinstance(value, list) and all(
        (isinstance(x, float) or _is_int(x)) and math.isfinite(x) for x in value
    )


def _check_fields(meta: TrainMetadata) -> None:
    """Check every field's type and range (BUILD can set anything)."""
    expected = {f.name for f in fields(TrainMetadata)}
    if set(vars(meta)) != expected:
        raise MetadataError(
            f"metadata fields {sorted(vars(meta))} differ from {sorted(expected)}"
        )
    for name in ("partition_id", "server_round", "num_examples", "steps"):
        value = getattr(meta, name)
        if not _is_int(value) or value < 0:
            raise MetadataError(f"metadata field '{name}' must be an int >= 0, got {value!r}")
    if not isinstance(meta.converged, bool):
        raise MetadataError("metadata field 'converged' must be a bool")
    if not isinstance(meta.device, str) or len(meta.device) > 64:
        raise MetadataError("metadata field 'device' must be a short string")
    if not isinstance(meta.wall_time_s, float) or not (
        math.isfinite(meta.wall_time_s) and meta.wall_time_s >= 0
    ):
        raise MetadataError("metadata field 'wall_time_s' must be a finite float >= 0")
    hist = meta.label_histogram
    if not (
        isinstance(hist, list)
        and len(hist) <= 10_000
        and all(_is_int(x) and x >= 0 for x in hist)
    ):
        raise MetadataError("metadata field 'label_histogram' must be a list of ints >= 0")
    for name in ("loss_d", "loss_g", "d_x", "d_gz"):
        value = getattr(meta, name)
        if not _is_finite_float_list(value):
            raise MetadataError(f"metadata field '{name}' must be a list of finite floats")
        if len(value) > MAX_HISTORY or len(value) != meta.steps:
            raise MetadataError(
                f"metadata field '{name}' has {len(value)} entries for {meta.steps} steps"
            )
    extra = meta.extra
    if not (
        isinstance(extra, dict)
        and len(extra) <= 100
        and all(isinstance(k, str) and isinstance(v, float | int) and not isinstance(v, bool)
                for k, v in extra.items())
    ):
        raise MetadataError("metadata field 'extra' must be a small dict of str -> number")
