"""TrainMetadata's codec: honest round trips, and every hostile payload refused, bounded."""

from __future__ import annotations

import pickletools
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from fedgan_app.protocol.metadata import (
    MAX_HISTORY,
    MAX_MESSAGE,
    METADATA_KEY,
    MetadataError,
    decode_metadata,
    encode_metadata,
    has_converged,
    short,
)
from harness.attacks import ATTACKS, OsSystem, honest_meta

REFUSED = [a for a in ATTACKS if not a.decodes]
# Memory a refusal may take: a few copies of the 1 MB payload cap, nothing more.
MAX_PEAK_BYTES = 8_000_000


def _decode(payload: bytes) -> object:
    return decode_metadata(ConfigRecord({METADATA_KEY: payload}), num_classes=10)


def test_round_trip_of_a_real_metadata() -> None:
    # Prepare
    meta = honest_meta()

    # Execute
    decoded = decode_metadata(encode_metadata(meta), num_classes=10)

    # Assert
    assert decoded == meta


def test_the_longest_history_fits_the_default_cap_and_decodes() -> None:
    # Prepare: the most steps a round may have (config's local-steps bound)
    n = MAX_HISTORY
    meta = honest_meta(loss_d=[0.5] * n, loss_g=[0.5] * n, d_x=[0.5] * n, d_gz=[0.5] * n,
                       steps=n, extra={f"k{i}": 1.0 for i in range(100)})

    # Execute
    record = encode_metadata(meta)

    # Assert
    assert len(record[METADATA_KEY]) < 1_000_000
    assert decode_metadata(record) == meta


def test_honest_encoding_has_no_memo_opcodes() -> None:
    # Prepare: repeated values, which a memoizing pickler would share
    meta = honest_meta(device="cpu", extra={"cpu": 1.0})

    # Execute
    names = {op.name for op, _, _ in pickletools.genops(encode_metadata(meta)[METADATA_KEY])}

    # Assert
    assert not names & {"MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT", "BINGET", "LONG_BINGET"}
    assert "STACK_GLOBAL" in names


@pytest.mark.parametrize("attack", REFUSED, ids=lambda a: f"{a.family}: {a.name}")
def test_hostile_payload_is_refused_short_bounded_and_unrun(attack, tmp_path: Path) -> None:
    # Prepare
    marker = tmp_path / "pwned"
    payload = attack.build(marker)

    # Execute
    tracemalloc.start()
    try:
        with pytest.raises(MetadataError) as info:
            _decode(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # Assert: a short reason, bounded memory, and nothing ran
    assert 0 < len(str(info.value)) <= MAX_MESSAGE
    assert peak < MAX_PEAK_BYTES, f"decoding took {peak} bytes"
    assert not marker.exists(), f"{attack.name} executed code"


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a.decodes], ids=lambda a: a.name)
def test_hostile_claims_in_well_formed_metadata_decode(attack, tmp_path: Path) -> None:
    # The decoder checks form; the reply checks (tests/test_strategy.py) judge claims.
    meta = _decode(attack.build(tmp_path / "pwned"))
    assert meta.num_examples == sum(meta.label_histogram)


def test_marker_payload_really_would_run(tmp_path: Path) -> None:
    # The os.system payload is live: plain pickle.loads in a child process runs it.
    marker = tmp_path / "pwned"
    payload = next(a for a in ATTACKS if a.name == "os.system via __reduce__").build(marker)
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    subprocess.run([sys.executable, "-c", code], input=payload, check=True,
                   env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert marker.exists()


def test_every_mutation_of_an_honest_payload_decodes_or_is_a_metadata_error() -> None:
    # Prepare: 3,000 seeded mutations (byte flips, cuts, splices) of a real payload
    rng = random.Random(0)
    honest = encode_metadata(honest_meta())[METADATA_KEY]
    outcomes = {"decoded": 0, "refused": 0}

    # Execute
    for _ in range(3000):
        data = bytearray(honest)
        kind = rng.randrange(3)
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:
            del data[rng.randrange(len(data)):]
        else:
            cut = rng.randrange(len(data))
            data[cut:cut] = data[rng.randrange(len(data)):][:rng.randint(1, 40)]
        try:
            _decode(bytes(data))
            outcomes["decoded"] += 1
        except MetadataError as exc:
            assert len(str(exc)) <= MAX_MESSAGE
            outcomes["refused"] += 1

    # Assert: no other exception escaped (the loop would have raised), and both happened
    assert outcomes["refused"] > 2000 and outcomes["decoded"] > 0


def test_missing_or_non_bytes_metadata_is_rejected() -> None:
    with pytest.raises(MetadataError, match="no 'train-metadata'"):
        decode_metadata(ConfigRecord({}))
    with pytest.raises(MetadataError, match="must be bytes"):
        decode_metadata(ConfigRecord({METADATA_KEY: "text"}))


def test_short_never_prints_an_untrusted_value_in_full() -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert short(10**5000) == "<int of 16610 bits>"
    assert len(short("x" * 10**6)) < 50
    assert len(short([[["x" * 1000] * 1000] * 1000])) < 100
    assert short(Hostile()).startswith("<Hostile")
    assert short(OsSystem(Path("m"))).startswith("<")


def test_has_converged_flags_a_plateau_only() -> None:
    assert has_converged([1.0] * 20)
    assert not has_converged([float(i) for i in range(20)])
    assert not has_converged([1.0] * 5)
