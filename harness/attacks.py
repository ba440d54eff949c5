"""Hostile metadata payloads, by family.

What a client that wants to stop, stall or steer the federation can put in
its pickled `TrainMetadata`.

Each `Attack` builds its bytes (`build(marker)`; payloads that would run code
create `marker` if they ever ran). The tests decode every one of them
(tests/test_metadata.py), send each from a client of a whole run
(tests/test_faults.py), and `benchmarks/attacks.py` times their refusal for
benchmarks/results/faults.md. Shapes marked `decodes=True` are well-formed
metadata whose *claims* are hostile: the reply checks, not the decoder,
refuse them.
"""

from __future__ import annotations

import os
import pickle
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from fedgan_app.protocol.metadata import PROTOCOL, TrainMetadata


@dataclass(frozen=True)
class Attack:
    """One hostile payload: its family, name and builder."""

    family: str
    name: str
    build: Callable[[Path], bytes]
    decodes: bool = False  # well-formed metadata carrying a hostile claim


def honest_meta(**changes: object) -> TrainMetadata:
    """A valid TrainMetadata of round 1, 3 steps, 800 examples over 10 classes.

    A changed `num_examples` without a `label_histogram` puts all of them in class 0,
    so the histogram still adds up.
    """
    meta = TrainMetadata(
        partition_id=1, server_round=1, num_examples=800,
        label_histogram=[80] * 10, loss_d=[1.2, 1.1, 1.0], loss_g=[0.7, 0.8, 0.9],
        d_x=[0.6, 0.6, 0.6], d_gz=[0.4, 0.4, 0.4], wall_time_s=1.5, steps=3,
        converged=False,
    )
    count = changes.get("num_examples")
    if isinstance(count, int) and "label_histogram" not in changes:
        changes["label_histogram"] = [count] + [0] * 9
    return replace(meta, **changes)


def fast_pickle(obj: object) -> bytes:
    """Pickle without memo opcodes, as honest clients do (so only the content is hostile)."""
    import io

    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=PROTOCOL)
    pickler.fast = True
    pickler.dump(obj)
    return buffer.getvalue()


def _memo_pickle(obj: object) -> bytes:
    """Pickle as `pickle.dumps` does: with memo opcodes (shared objects written once)."""
    return pickle.dumps(obj, protocol=PROTOCOL)


# --- code execution -----------------------------------------------------------------


class OsSystem:
    """Runs `touch marker` through os.system when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        """os.system('touch marker')."""
        return (os.system, (f"touch {self.marker}",))


class _SubprocessCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (subprocess.call, (["touch", str(self.marker)],))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


class _Foreign:
    """A harmless class that is simply not TrainMetadata."""

    def __init__(self) -> None:
        self.x = 1


def getattr_chain(marker: Path) -> bytes:
    """getattr(__import__('os'), 'system')('touch marker') as raw protocol-0 opcodes."""
    cmd = f"touch {marker}".encode()
    return (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
            + cmd + b"\ntR.")


# --- raw streams ------------------------------------------------------------------

_HEAD = b"\x80\x04"  # PROTO 4


def _nested_lists(depth: int) -> bytes:
    """A list nested `depth` deep: EMPTY_LIST x depth, APPEND x (depth - 1)."""
    return _HEAD + b"]" * depth + b"a" * (depth - 1) + b"."


def _nested_in_field(depth: int) -> bytes:
    """TrainMetadata whose loss_d is a list nested `depth` deep (memo-free)."""
    head = fast_pickle(honest_meta())
    start = head.index(b"loss_d") + len(b"loss_d")
    end = head.index(b"\x8c\x06loss_g")
    return head[:start] + _nested_lists(depth)[2:-1] + head[end:]


def _int_text(digits: int) -> bytes:
    """A protocol-0 INT opcode with a decimal of `digits` digits."""
    return b"I" + b"9" * digits + b"\n."


def _long4(value: int) -> bytes:
    """A LONG4 opcode (integers too long for LONG1)."""
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return _HEAD + b"\x8b" + len(raw).to_bytes(4, "little") + raw + b"."


def _shared_list(levels: int) -> list:
    """[[x, x], [x, x]] ... `levels` deep, every level one shared object."""
    value: list = ["lol"]
    for _ in range(levels):
        value = [value, value]
    return value


def _in_frozenset(stream: bytes) -> bytes:
    """The object of a protocol-4 stream put into a frozenset (MARK ... FROZENSET).

    Written as opcodes: building the frozenset here would hash the object,
    which for a shared structure never finishes.
    """
    body = stream[11:-1] if stream[2:3] == b"\x95" else stream[2:-1]  # no PROTO/FRAME/STOP
    return _HEAD + b"(" + body + b"\x91."


def _shared_tuple(levels: int) -> tuple:
    value: tuple = ()
    for _ in range(levels):
        value = (value, value)
    return value


def _state_stream(state: dict) -> bytes:
    """A TrainMetadata NEWOBJ + BUILD with an arbitrary state dict (memo-free)."""
    meta = honest_meta()
    vars(meta).clear()
    vars(meta).update(state)
    return fast_pickle(meta)


# --- the catalogue --------------------------------------------------------------


def _m(**changes: object) -> Callable[[Path], bytes]:
    """A builder of honest metadata with `changes`, pickled memo-free."""
    return lambda _marker: fast_pickle(honest_meta(**changes))


ATTACKS: tuple[Attack, ...] = (
    # Code execution: nothing outside TrainMetadata may be resolved or called.
    Attack("code", "os.system via __reduce__", lambda m: _memo_pickle(OsSystem(m))),
    Attack("code", "subprocess.call via __reduce__", lambda m: _memo_pickle(_SubprocessCall(m))),
    Attack("code", "eval via __reduce__", lambda m: _memo_pickle(_Eval(m))),
    Attack("code", "exec via __reduce__", lambda m: _memo_pickle(_Exec(m))),
    Attack("code", "os.system inside a field",
           lambda m: fast_pickle(honest_meta(loss_d=[OsSystem(m), 1.0, 1.0]))),
    Attack("code", "subprocess.call inside a list",
           lambda m: fast_pickle([honest_meta(), _SubprocessCall(m)])),
    Attack("code", "getattr/__import__ opcode chain", getattr_chain),
    Attack("code", "copyreg reconstructor",
           lambda m: b"ccopyreg\n_reconstructor\n(cos\nsystem\nc__builtin__\nobject\nNtR."),
    Attack("code", "a class other than TrainMetadata", lambda m: fast_pickle(_Foreign())),
    # Malformed streams.
    Attack("malformed", "truncated stream", lambda m: fast_pickle(honest_meta())[:-20]),
    Attack("malformed", "bytes after STOP", lambda m: fast_pickle(honest_meta()) + b"N."),
    Attack("malformed", "no STOP", lambda m: fast_pickle(honest_meta())[:-1]),
    Attack("malformed", "APPENDS without MARK", lambda m: _HEAD + b"]Ne."),
    Attack("malformed", "protocol 2 stream", lambda m: pickle.dumps(honest_meta(), protocol=2)),
    Attack("malformed", "unknown opcode byte", lambda m: _HEAD + b"\xff."),
    Attack("malformed", "plain dict instead of TrainMetadata",
           lambda m: fast_pickle({"partition_id": 1})),
    Attack("malformed", "over the size cap (1.2 MB)",
           _m(loss_d=[1.0] * 140_000, steps=140_000)),
    # Huge numbers.
    Attack("huge number", "10**400 in a loss list", _m(loss_d=[10**400, 1.0, 1.0])),
    Attack("huge number", "100,000-digit int (LONG4)", lambda m: _long4(10**100_000)),
    Attack("huge number", "900,000-digit text INT", lambda m: _int_text(900_000)),
    Attack("huge number", "-10**5000 partition_id", _m(partition_id=-(10**5000))),
    Attack("huge number", "partition_id -1", _m(partition_id=-1)),
    Attack("huge number", "partition_id 2**62", _m(partition_id=2**62)),
    Attack("huge number", "2**70 in label_histogram", _m(label_histogram=[2**70] * 10)),
    Attack("huge number", "2**62 in label_histogram", _m(label_histogram=[2**62] * 10)),
    Attack("huge number", "2**63 wall time (int)", _m(wall_time_s=2**63 - 1)),
    Attack("huge number", "inf in a loss list", _m(loss_g=[float("inf"), 1.0, 1.0])),
    Attack("huge number", "NaN in a loss list", _m(loss_d=[float("nan"), 1.0, 1.0])),
    Attack("huge number", "D(x) of 2.0", _m(d_x=[2.0, 0.5, 0.5])),
    # Deep nesting.
    Attack("deep nesting", "list nested 250,000 deep", lambda m: _nested_lists(250_000)),
    Attack("deep nesting", "loss_d nested 250,000 deep", lambda m: _nested_in_field(250_000)),
    Attack("deep nesting", "loss_d nested 3 deep", lambda m: _nested_in_field(3)),
    Attack("deep nesting", "dicts nested 1,000 deep",
           lambda m: _HEAD + b"}" + b"\x8c\x01k}" * 999 + b"s" * 999 + b"."),
    # Shared structure (memo references).
    Attack("shared structure", "list doubling 60 times through the memo",
           lambda m: _memo_pickle(_shared_list(60))),
    Attack("shared structure", "tuple doubling 60 times in a frozenset",
           lambda m: _in_frozenset(_memo_pickle(_shared_tuple(60)))),
    Attack("shared structure", "shared list inside extra",
           lambda m: _memo_pickle(honest_meta(extra={"x": _shared_list(40)}))),  # type: ignore[dict-item]
    Attack("shared structure", "one BINPUT and BINGET",
           lambda m: _HEAD + b"N\x94h\x00\x86."),
    # Hashing (containers built from opcodes outside the allow-list).
    Attack("hashing", "frozenset of nested tuples, memo-free",
           lambda m: fast_pickle(frozenset([((((),),),)]))),
    Attack("hashing", "tuple key in the state dict", lambda m: _state_stream(
        {**vars(honest_meta()), (): 1})),
    # Wrong key types.
    Attack("key types", "int key in the state dict", lambda m: _state_stream(
        {**vars(honest_meta()), 1: "x"})),
    Attack("key types", "missing field", lambda m: _state_stream(
        {k: v for k, v in vars(honest_meta()).items() if k != "steps"})),
    Attack("key types", "extra attribute through BUILD", lambda m: _state_stream(
        {**vars(honest_meta()), "payload": "x"})),
    Attack("key types", "int key in extra", _m(extra={1: 1.0})),
    # Long strings and floods.
    Attack("flood", "500,000-character device", _m(device="x" * 500_000)),
    Attack("flood", "escape codes in device", _m(device="\x1b[2J\x1b[Hpwned")),
    Attack("flood", "1 MB of NONE opcodes", lambda m: _HEAD + b"N" * 999_000 + b"."),
    Attack("flood", "100,000 lists left on the stack", lambda m: _HEAD + b"]" * 100_000 + b"."),
    Attack("flood", "1,000 entries in extra",
           _m(extra={f"k{i}": float(i) for i in range(1000)})),
    # Field ranges and consistency.
    Attack("fields", "wrong field types", _m(num_examples="800", wall_time_s="fast")),
    Attack("fields", "50,000-entry list disagreeing with steps", _m(loss_g=[0.5] * 50_000)),
    Attack("fields", "histogram of 11 classes", _m(label_histogram=[80] * 9 + [40, 40])),
    Attack("fields", "histogram not adding up to num_examples", _m(label_histogram=[1] * 10)),
    Attack("fields", "negative wall time", _m(wall_time_s=-1.0)),
    # Hostile claims in well-formed metadata: the reply checks refuse them.
    Attack("weight", "claims 10**15 examples", decodes=True, build=_m(num_examples=10**15)),
)
