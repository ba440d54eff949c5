"""Per-client training metadata: a pickled dataclass with a codec whose cost is bounded.

Clients send a `TrainMetadata` beside their weights (loss history, timings,
convergence flag, partition info). Pickle is the transport the project chose,
so the server treats the bytes as hostile and decodes them in four steps, each
bounded by the payload's size:

1. **Size.** At most `max_bytes` (the 'max-metadata-bytes' setting).
2. **Opcode scan, before anything is built.** Each opcode is checked against
   a short allow-list *before* its argument is read (so a text-mode integer
   of a million digits is never parsed), and the stream's effect on the
   unpickler's stack is simulated: no memo opcode at all (``BINGET`` and
   friends let a few hundred bytes build a shared structure whose printing or
   hashing costs exponential time), nesting of at most `MAX_DEPTH` levels, at
   most `MAX_STACK` items on the stack at once and `MAX_OPCODES` opcodes,
   integers within 64 bits, strings of at most `MAX_STRING` bytes, one
   `STOP` at the very end. What passes is a tree no bigger than the payload.
3. **Unpickling** with an unpickler that resolves only `TrainMetadata`, so
   no `__reduce__` payload can reach `os.system`, `eval`, ...
4. **Field checks**: types, 64-bit ranges, finite floats, lengths, and a
   label histogram whose length is the number of classes and whose counts
   add up to `num_examples`.

Every failure is a `MetadataError` whose message is short and quotes no
untrusted value in full (`short`); no other exception leaves
`decode_metadata`. Clients encode without memoization (`Pickler.fast`), so
an honest payload always passes step 2.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import reprlib
from dataclasses import dataclass, field, fields

from flwr.app import ConfigRecord

from fedgan_app.settings import MAX_LOCAL_STEPS

METADATA_KEY = "train-metadata"  # key of the bytes inside the reply's ConfigRecord
EVAL_MAX_IMAGES = 512  # real images a client scores D on in an evaluate round, at most
DEFAULT_MAX_BYTES = 1_000_000
PROTOCOL = 4  # what clients write; the allow-list below is this protocol's opcodes
MAX_HISTORY = MAX_LOCAL_STEPS  # longest loss history accepted (steps per round)
MAX_CLASSES = 10_000  # longest label histogram when the class count is not given
MAX_EXTRA = 100  # entries of `extra`
MAX_STRING = 256  # bytes of any string in the stream (names, device, extra's keys)
# TrainMetadata -> state dict -> list -> number: 3 levels; one spare.
MAX_DEPTH = 4
# Stack entries at once: an honest stream holds at most one batch of 1,000 list
# items (the pickler's APPENDS batch) inside a batch of the state's 13 fields.
MAX_STACK = 4096
# Four histories, a histogram, `extra` (key and value) and the fields' own opcodes.
MAX_OPCODES = 4 * (MAX_HISTORY + MAX_HISTORY // 1000 + 2) + MAX_CLASSES + 2 * MAX_EXTRA + 200
INT64 = (-(2**63), 2**63 - 1)
# Examples a client may claim: exact as a float weight; the reply checks bound it further.
MAX_COUNT = 2**53
MAX_ROUND = 2**31 - 1  # rounds and partition ids
MAX_LOSS = 1e6  # |loss| of one step; GAN losses are O(1-100)
MAX_WALL_TIME_S = 7 * 24 * 3600.0
MAX_MESSAGE = 300  # characters of a MetadataError's message

# The opcodes `encode_metadata` emits (protocol 4, no memo): the scan refuses
# every other one, before reading its argument.
_SCALARS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BININT", "BININT1", "BININT2",
                      "LONG1", "BINFLOAT", "NEWTRUE", "NEWFALSE", "NONE"})
_CONTAINERS = frozenset({"EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE"})
_ALLOWED_OPCODES = _SCALARS | _CONTAINERS | frozenset(
    {"PROTO", "FRAME", "MARK", "APPEND", "APPENDS", "SETITEM", "SETITEMS",
     "STACK_GLOBAL", "NEWOBJ", "BUILD", "STOP"})
# Opcodes that write to or read from the memo: refused with a reason of their own.
_MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET",
                           "LONG_BINGET"})
_NAMES = {ord(op.code): op.name for op in pickletools.opcodes if op.name in _ALLOWED_OPCODES}
# Allowed opcodes whose argument has a fixed size (bytes); the others are
# SHORT_BINUNICODE and LONG1 (1-byte length) and BINUNICODE (4-byte length).
_FIXED_ARGUMENT = {op.name: (op.arg.n if op.arg is not None else 0)
                   for op in pickletools.opcodes
                   if op.name in _ALLOWED_OPCODES and (op.arg is None or op.arg.n >= 0)}

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 40, 40, 24
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2


class MetadataError(ValueError):
    """A metadata payload was missing, too large, hostile or malformed."""


def short(value: object) -> str:
    """A repr of an untrusted value cut to a few dozen characters; never raises."""
    try:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
            return f"<int of {value.bit_length()} bits>"
        return _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ or a huge value
        return f"<{type(value).__name__}>"


def clip_text(text: str, limit: int = 200) -> str:
    """An untrusted text for a log line or a CSV cell: cut, and unprintables as '?'."""
    text = str(text)
    cut = text[:limit]
    cut = "".join(c if c.isprintable() else "?" for c in cut)
    return cut + ("..." if len(text) > limit else "")


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


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `TrainMetadata` and no persistent ids."""

    def find_class(self, module: str, name: str) -> type:
        """Resolve our dataclass, or refuse before anything is imported or called."""
        if (module, name) != (__name__, "TrainMetadata"):
            raise MetadataError(f"forbidden global {short(module)}.{short(name)} in metadata")
        return TrainMetadata

    def persistent_load(self, pid: object) -> object:
        """Refuse persistent ids (another way to reach outside objects)."""
        raise MetadataError("persistent ids are not allowed in metadata")


def encode_metadata(meta: TrainMetadata) -> ConfigRecord:
    """Pickle `meta` without memo opcodes into a ConfigRecord for the reply."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=PROTOCOL)
    pickler.fast = True  # no memo: every object written in full, a tree
    pickler.dump(meta)
    return ConfigRecord({METADATA_KEY: buffer.getvalue()})


def decode_metadata(record: ConfigRecord | None, max_bytes: int = DEFAULT_MAX_BYTES,
                    num_classes: int | None = None) -> TrainMetadata:
    """Decode and check a reply's metadata; raise MetadataError (only) on anything off.

    Parameters
    ----------
    record : ConfigRecord | None
        The reply's metadata record.
    max_bytes : int
        The largest payload decoded.
    num_classes : int | None
        Classes of the run's dataset: the label histogram's length (None:
        any length up to `MAX_CLASSES`).

    """
    try:
        payload = _payload(record, max_bytes)
        scan_opcodes(payload)
        meta = _RestrictedUnpickler(io.BytesIO(payload)).load()
        if type(meta) is not TrainMetadata:
            raise MetadataError(f"metadata is a {short(type(meta).__name__)}, "
                                "not TrainMetadata")
        check_fields(meta, num_classes)
        return meta
    except MetadataError as exc:
        raise MetadataError(_clip(str(exc))) from None
    except Exception as exc:  # noqa: BLE001 - no other exception may leave the decoder
        raise MetadataError(_clip(f"metadata does not decode: {type(exc).__name__}: "
                                  f"{short(str(exc))}")) from None


def _payload(record: ConfigRecord | None, max_bytes: int) -> bytes:
    """The metadata bytes of a record, within the size cap."""
    if record is None or METADATA_KEY not in record:
        raise MetadataError(f"reply has no '{METADATA_KEY}' metadata")
    payload = record[METADATA_KEY]
    if not isinstance(payload, bytes):
        raise MetadataError(f"metadata must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise MetadataError(f"metadata is {len(payload)} bytes, over the cap of {max_bytes}")
    return payload


def scan_opcodes(payload: bytes) -> None:
    """Refuse a pickle stream unless it is a small memo-free tree; build nothing.

    Walks the opcodes (pickletools' table) and simulates the unpickler's stack
    with each entry's nesting depth (scalars 0, a container one more than its
    deepest item) and the positions of its MARKs. Raises MetadataError naming
    the first offending opcode and its byte offset.
    """
    stack: list[int] = []  # nesting depth of each entry
    marks: list[int] = []  # stack index of each open MARK
    pos, end, count = 0, len(payload), 0
    while pos < end:
        code, start = payload[pos], pos
        name = _NAMES.get(code)
        if name is None:
            _refuse_opcode(code, start)
        count += 1
        if count > MAX_OPCODES:
            raise MetadataError(f"metadata has more than {MAX_OPCODES} opcodes")
        pos = _skip_argument(payload, name, pos + 1)
        if pos > end:
            raise MetadataError(f"metadata ends inside the argument of {name} at byte {start}")
        if name in _SCALARS:
            stack.append(0)
        elif name == "STOP":
            _check_stop(stack, marks, start, end)
            return
        else:
            _apply(name, stack, marks, start)
        if len(stack) > MAX_STACK:
            raise MetadataError(f"metadata holds more than {MAX_STACK} items at once on "
                                f"the unpickler's stack (byte {start})")
        if stack and stack[-1] > MAX_DEPTH:
            raise MetadataError(f"metadata nests deeper than {MAX_DEPTH} levels "
                                f"(byte {start})")
    raise MetadataError("metadata ends without a STOP opcode")


def _refuse_opcode(code: int, pos: int) -> None:
    """Raise for an opcode off the allow-list, before its argument is read."""
    op = pickletools.code2op.get(chr(code))
    if op is None:
        raise MetadataError(f"unknown opcode byte {code:#04x} at byte {pos}")
    if op.name in _MEMO_OPCODES:
        raise MetadataError(f"memo opcode {op.name} at byte {pos}: metadata must be "
                            "written without memoization")
    raise MetadataError(f"opcode {op.name} at byte {pos} is not allowed in metadata")


def _skip_argument(payload: bytes, name: str, pos: int) -> int:
    """Check an allowed opcode's argument at `pos`; return where the next opcode starts."""
    size = _FIXED_ARGUMENT.get(name)
    if size is not None:
        if name == "PROTO" and payload[pos:pos + 1] != bytes([PROTOCOL]):
            raise MetadataError(f"metadata is not pickle protocol {PROTOCOL}")
        return pos + size
    if name == "BINUNICODE":
        length = int.from_bytes(payload[pos:pos + 4], "little")
        if length > MAX_STRING:
            raise MetadataError(f"string of {length} bytes at byte {pos - 1} (at most "
                                f"{MAX_STRING})")
        return pos + 4 + length
    length = payload[pos] if pos < len(payload) else 0  # SHORT_BINUNICODE, LONG1
    if name == "LONG1":
        value = int.from_bytes(payload[pos + 1:pos + 1 + length], "little", signed=True)
        if length > 8 or not INT64[0] <= value <= INT64[1]:
            raise MetadataError(f"integer at byte {pos - 1} is wider than 64 bits")
    return pos + 1 + length


def _check_stop(stack: list[int], marks: list[int], pos: int, end: int) -> None:
    """STOP must end the stream and leave exactly one object."""
    if len(stack) != 1 or marks:
        raise MetadataError(f"STOP at byte {pos} leaves {len(stack)} items on the stack")
    if pos != end - 1:
        raise MetadataError(f"{end - pos - 1} bytes follow the STOP opcode")


def _apply(name: str, stack: list[int], marks: list[int], pos: int) -> None:
    """Apply one opcode's effect on the stack of depths and the MARK positions."""
    if name in _CONTAINERS:
        stack.append(1)
    elif name == "MARK":
        marks.append(len(stack))
    elif name in ("APPENDS", "SETITEMS"):
        if not marks:
            raise MetadataError(f"{name} at byte {pos} has no MARK before it")
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        if name == "SETITEMS" and len(items) % 2:
            raise MetadataError(f"SETITEMS at byte {pos} has an odd number of items")
        _grow(stack, marks, items, name, pos)
    elif name in ("APPEND", "SETITEM", "BUILD"):
        items = _pop(stack, marks, 2 if name == "SETITEM" else 1, name, pos)
        _grow(stack, marks, items, name, pos)
    elif name == "STACK_GLOBAL":
        _pop(stack, marks, 2, name, pos)
        stack.append(0)
    elif name == "NEWOBJ":
        args = _pop(stack, marks, 2, name, pos)[1]  # (class, args tuple)
        stack.append(1 + args)
    # PROTO and FRAME leave the stack as it is.


def _pop(stack: list[int], marks: list[int], n: int, name: str, pos: int) -> list[int]:
    """Pop `n` entries above the topmost MARK."""
    if len(stack) - n < (marks[-1] if marks else 0):
        raise MetadataError(f"{name} at byte {pos} finds too few items on the stack")
    items = stack[-n:]
    del stack[-n:]
    return items


def _grow(stack: list[int], marks: list[int], items: list[int], name: str,
          pos: int) -> None:
    """Put `items` into the container on top of the stack: its depth grows to fit them."""
    if len(stack) <= (marks[-1] if marks else 0):
        raise MetadataError(f"{name} at byte {pos} has no object to add to")
    if items:
        stack[-1] = max(stack[-1], 1 + max(items))


# --- field checks --------------------------------------------------------------


def check_fields(meta: TrainMetadata, num_classes: int | None = None) -> None:
    """Check every field's type and range (BUILD can set anything)."""
    state = vars(meta)
    expected = {f.name for f in fields(TrainMetadata)}
    if not all(isinstance(k, str) for k in state) or set(state) != expected:
        names = [k for k in state if not isinstance(k, str) or k not in expected]
        raise MetadataError(f"metadata fields differ from TrainMetadata's (unexpected: "
                            f"{short(names)}, missing: {short(sorted(expected - set(state)))})")
    _check_int(meta, "partition_id", 0, MAX_ROUND)
    _check_int(meta, "server_round", 1, MAX_ROUND)
    _check_int(meta, "num_examples", 1, MAX_COUNT)
    _check_int(meta, "steps", 0, MAX_HISTORY)
    if not isinstance(meta.converged, bool):
        raise MetadataError("metadata field 'converged' must be a bool")
    if not (isinstance(meta.device, str) and len(meta.device) <= 64
            and meta.device.isprintable()):
        raise MetadataError("metadata field 'device' must be a short printable string")
    if not (isinstance(meta.wall_time_s, float) and 0 <= meta.wall_time_s <= MAX_WALL_TIME_S):
        raise MetadataError("metadata field 'wall_time_s' must be a float in "
                            f"[0, {MAX_WALL_TIME_S:g}]")
    _check_histogram(meta, num_classes)
    for name, bound in (("loss_d", MAX_LOSS), ("loss_g", MAX_LOSS), ("d_x", 1.0),
                        ("d_gz", 1.0)):
        _check_history(meta, name, -bound if bound == MAX_LOSS else 0.0, bound)
    _check_extra(meta.extra)


def _is_int(value: object) -> bool:
    """True for a real int (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object, low: float, high: float) -> bool:
    """True for a finite int or float within [low, high]."""
    return ((_is_int(value) or isinstance(value, float)) and math.isfinite(value)
            and low <= value <= high)


def _check_int(meta: TrainMetadata, name: str, low: int, high: int) -> None:
    """An int field within [low, high]."""
    value = getattr(meta, name)
    if not (_is_int(value) and low <= value <= high):
        raise MetadataError(f"metadata field '{name}' must be an int in [{low}, {high}], "
                            f"got {short(value)}")


def _check_histogram(meta: TrainMetadata, num_classes: int | None) -> None:
    """One count >= 0 per class, adding up to num_examples."""
    hist = meta.label_histogram
    length = num_classes if num_classes is not None else None
    if not (isinstance(hist, list) and len(hist) <= MAX_CLASSES
            and (length is None or len(hist) == length)
            and all(_is_int(n) and 0 <= n <= MAX_COUNT for n in hist)):
        want = f"{length} ints" if length is not None else "a list of ints"
        raise MetadataError(f"metadata field 'label_histogram' must be {want} in "
                            f"[0, {MAX_COUNT}], got {short(hist)}")
    if sum(hist) != meta.num_examples:
        raise MetadataError(f"metadata field 'label_histogram' counts {sum(hist)} examples, "
                            f"num_examples says {meta.num_examples}")


def _check_history(meta: TrainMetadata, name: str, low: float, high: float) -> None:
    """A list of one finite number per step within [low, high]."""
    value = getattr(meta, name)
    if not isinstance(value, list) or len(value) != meta.steps:
        length = len(value) if isinstance(value, list) else short(type(value).__name__)
        raise MetadataError(f"metadata field '{name}' has {length} entries for "
                            f"{meta.steps} steps")
    if not all(_is_number(x, low, high) for x in value):
        raise MetadataError(f"metadata field '{name}' must be a list of finite numbers in "
                            f"[{low:g}, {high:g}]")


def _check_extra(extra: object) -> None:
    """A small dict of short printable str -> finite number."""
    if not (isinstance(extra, dict) and len(extra) <= MAX_EXTRA
            and all(isinstance(k, str) and len(k) <= 64 and k.isprintable()
                    and _is_number(v, -1e300, 1e300) for k, v in extra.items())):
        raise MetadataError(f"metadata field 'extra' must be at most {MAX_EXTRA} entries of "
                            "short str -> finite number")


def _clip(message: str) -> str:
    """A message of at most MAX_MESSAGE characters."""
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."
