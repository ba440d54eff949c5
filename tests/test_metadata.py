"""TrainMetadata encoding, and the restricted decoder against hostile payloads."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from fedgan_app.metadata import (
    METADATA_KEY,
    MetadataError,
    TrainMetadata,
    decode_metadata,
    encode_metadata,
    has_converged,
)


def make_meta(**changes) -> TrainMetadata:
    """A valid TrainMetadata for 3 steps."""
    meta = TrainMetadata(
        partition_id=1, server_round=2, num_examples=800,
        label_histogram=[80] * 10, loss_d=[1.2, 1.1, 1.0], loss_g=[0.7, 0.8, 0.9],
        d_x=[0.6, 0.6, 0.6], d_gz=[0.4, 0.4, 0.4], wall_time_s=1.5, steps=3,
        converged=False,
    )
    return replace(meta, **changes)


def test_round_trip_of_a_real_metadata() -> None:
    # Prepare
    meta = make_meta()

    # Execute
    decoded = decode_metadata(encode_metadata(meta))

    # Assert
    assert decoded == meta


# --- hostile payloads ---------------------------------------------------------
# Each would create MARKER if it ran; the decoder must refuse it unrun.


class _OsSystem:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _SubprocessCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


class _BuiltinsEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _BuiltinsExec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).touch()",))


class _Foreign:
    """A harmless class that is simply not on the allow-list."""

    def __init__(self) -> None:
        self.x = 1


def _nested_in_field(marker: Path) -> bytes:
    # A valid TrainMetadata whose loss history hides an os.system call.
    return pickle.dumps(make_meta(loss_d=[_OsSystem(marker), 1.0, 1.0]))


def _nested_in_list(marker: Path) -> bytes:
    return pickle.dumps([make_meta(), _SubprocessCall(marker)])


def _getattr_chain(marker: Path) -> bytes:
    # builtins.getattr(builtins.__import__('os'), 'system')('touch marker'),
    # written as raw opcodes (no class of ours needed to build it).
    cmd = f"touch {marker}".encode()
    return (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
        + cmd + b"\ntR."
    )


def _copyreg_reconstructor(marker: Path) -> bytes:
    # Protocol-0 style object reconstruction through copyreg and os.
    return b"ccopyreg\n_reconstructor\n(cos\nsystem\nc__builtin__\nobject\nNtR."


def _truncated(marker: Path) -> bytes:
    return pickle.dumps(make_meta())[:-20]


def _over_cap(marker: Path) -> bytes:
    return pickle.dumps(make_meta(loss_d=[1.0] * 300_000, steps=300_000))


def _wrong_types(marker: Path) -> bytes:
    return pickle.dumps(make_meta(num_examples="800", wall_time_s="fast"))


def _huge_list_inside_cap(marker: Path) -> bytes:
    # 50k-entry histories that disagree with `steps`: rejected by the check.
    return pickle.dumps(make_meta(loss_g=[0.5] * 50_000))


def _dict_payload(marker: Path) -> bytes:
    return pickle.dumps({"partition_id": 1})


def _foreign_class(marker: Path) -> bytes:
    return pickle.dumps(_Foreign())


def _extra_attribute_via_build(marker: Path) -> bytes:
    # A TrainMetadata whose BUILD state adds an attribute that is not a field.
    meta = make_meta()
    object.__setattr__(meta, "payload", "x")
    return pickle.dumps(meta)


def _nan_history(marker: Path) -> bytes:
    return pickle.dumps(make_meta(loss_d=[float("nan"), 1.0, 1.0]))


HOSTILE = {
    "os.system via __reduce__": lambda m: pickle.dumps(_OsSystem(m)),
    "subprocess.call via __reduce__": lambda m: pickle.dumps(_SubprocessCall(m)),
    "builtins.eval via __reduce__": lambda m: pickle.dumps(_BuiltinsEval(m)),
    "builtins.exec via __reduce__": lambda m: pickle.dumps(_BuiltinsExec(m)),
    "os.system nested in a field": _nested_in_field,
    "subprocess nested in a list": _nested_in_list,
    "getattr/__import__ opcode chain": _getattr_chain,
    "copyreg reconstructor": _copyreg_reconstructor,
    "class outside the allow-list": _foreign_class,
    "truncated stream": _truncated,
    "payload over the size cap": _over_cap,
    "wrong types in fields": _wrong_types,
    "huge list disagreeing with steps": _huge_list_inside_cap,
    "plain dict instead of dataclass": _dict_payload,
    "extra attribute through BUILD": _extra_attribute_via_build,
    "NaN in loss history": _nan_history,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_payload_is_rejected_without_running(name: str, tmp_path: Path) -> None:
    # Prepare
    marker = tmp_path / "pwned"
    payload = HOSTILE[name](marker)
    assert not marker.exists()

    # Execute
    with pytest.raises(MetadataError) as info:
        decode_metadata(ConfigRecord({METADATA_KEY: payload}), max_bytes=1_000_000)

    # Assert: refused with a reason, and nothing ran
    assert str(info.value)
    assert not marker.exists(), f"{name} executed code"


def test_marker_payload_really_would_run(tmp_path: Path) -> None:
    # The os.system payload is live: plain pickle.loads in a child process runs it.
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_OsSystem(marker))
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    subprocess.run([sys.executable, "-c", code], input=payload, check=True)
    assert marker.exists()


def test_missing_or_non_bytes_metadata_is_rejected() -> None:
    with pytest.raises(MetadataError, match="no 'train-metadata'"):
        decode_metadata(ConfigRecord({}))
    with pytest.raises(MetadataError, match="must be bytes"):
        decode_metadata(ConfigRecord({METADATA_KEY: "text"}))


def test_encoded_pickle_uses_only_our_class() -> None:
    # Prepare
    payload = encode_metadata(make_meta())[METADATA_KEY]

    # Execute: list the globals the stream refers to
    out = io.StringIO()
    pickletools.dis(payload, out=out)

    # Assert
    assert "TrainMetadata" in out.getvalue()
    assert "builtins" not in out.getvalue() and "os" not in out.getvalue().split()


def test_has_converged_flags_a_plateau_only() -> None:
    assert has_converged([1.0] * 20)
    assert not has_converged([float(i) for i in range(20)])
    assert not has_converged([1.0] * 5)
