"""Checkpoint format v2: every field round-trips; version 1 still loads; others refused.

Loading is bounded before torch reads anything: zip bombs, oversized and
foreign files are refused with our reason, naming the file.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from fedgan_app.outputs.checkpoint import (
    FORMAT,
    MAX_CHECKPOINT_BYTES,
    VERSION,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)


def _checkpoint() -> Checkpoint:
    return Checkpoint(
        state={"generator.w": torch.arange(4.0), "discriminator.n": torch.tensor(7)},
        server_round=3, config={"strategy": "fedadam"}, best_metric=12.5, best_round=2,
        wandb_run_id="abc", ema_state={"generator.w": torch.ones(4)},
        strategy_state={"strategy": "fedadam", "m_t/generator.w": torch.zeros(4)},
        extra={"note": "x"},
    )


def test_every_v2_field_round_trips(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "latest.pt"
    written = _checkpoint()

    # Execute
    save_checkpoint(written, path)
    read = load_checkpoint(path)

    # Assert
    assert torch.load(path, weights_only=True)["version"] == VERSION == 2
    for name in ("server_round", "config", "best_metric", "best_round", "wandb_run_id",
                 "extra"):
        assert getattr(read, name) == getattr(written, name), name
    for name in ("state", "ema_state", "strategy_state"):
        a, b = getattr(read, name), getattr(written, name)
        assert list(a) == list(b), name
        assert all(v == b[k] if isinstance(v, str) else torch.equal(v, b[k])
                   for k, v in a.items()), name


def test_a_version_1_file_still_loads_without_ema_or_optimizer_state(tmp_path: Path) -> None:
    # Prepare: a file exactly as fedgan wrote version 1
    path = tmp_path / "v1.pt"
    torch.save({"format": FORMAT, "version": 1, "state": {"generator.w": torch.ones(2)},
                "server_round": 4, "config": {"seed": 1}, "best_metric": 9.0,
                "best_round": 4, "wandb_run_id": None, "extra": {}}, path)

    # Execute
    read = load_checkpoint(path)

    # Assert
    assert (read.server_round, read.best_metric, read.config) == (4, 9.0, {"seed": 1})
    assert read.ema_state is None and read.strategy_state == {}


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 3}, "has version 3; this fedgan reads versions 1, 2"),
    ({"version": True}, "has version True"),
    ({"ema_state": {"generator.w": "not a tensor"}}, "invalid ema_state"),
    ({"strategy_state": {"m_t/w": [1, 2]}}, "invalid strategy_state"),
    ({"strategy_state": {3: torch.ones(1)}}, "invalid strategy_state"),
])
def test_other_versions_and_bad_fields_are_refused_naming_the_file(
    tmp_path: Path, change: dict, message: str
) -> None:
    # Prepare
    path = tmp_path / "bad.pt"
    torch.save({**_checkpoint().to_dict(), **change}, path)

    # Execute / Assert
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


# --- untrusted files: bounded before torch reads them ---------------------------------


def zip_archive(path: Path, entries: list[tuple[str, bytes, int, int, int]]) -> Path:
    """Write a zip by hand: (name, bytes in the file, method, crc, declared size) each.

    By hand, so a test can declare what it likes: zipfile would compress (slowly)
    and never write a header that lies.
    """
    local, central = b"", b""
    for name, data, method, crc, size in entries:
        raw = name.encode()
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 33, crc,
                               len(data), size, len(raw), 0, 0, 0, 0, 0, len(local)) + raw
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 33, crc,
                             len(data), size, len(raw), 0) + raw + data
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                      len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


def _entries(checkpoint: Path) -> list[tuple[str, bytes, int, int, int]]:
    """The entries of a checkpoint torch.save wrote, for `zip_archive`."""
    with zipfile.ZipFile(checkpoint) as archive:
        return [(i.filename, archive.read(i), i.compress_type, i.CRC, i.file_size)
                for i in archive.infolist()]


def zip_bomb(path: Path, expands_to_mib: int = 256) -> Path:
    """A checkpoint whose data.pkl is deflated zeros: ~1/1000 of what it expands to.

    A real bomb: a valid zip (sizes and CRC right) that any reader inflates in
    full before it can tell the pickle is nonsense.
    """
    save_checkpoint(_checkpoint(), path.with_name("honest.pt"))
    piece = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = piece.compress(bytes(1 << 20)) + piece.flush(zlib.Z_FULL_FLUSH)  # repeatable
    stream = mib * expands_to_mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    crc = 0
    for _ in range(expands_to_mib):
        crc = zlib.crc32(bytes(1 << 20), crc)
    entries = _entries(path.with_name("honest.pt"))
    return zip_archive(path, [
        (e[0], stream, zipfile.ZIP_DEFLATED, crc, expands_to_mib << 20)
        if e[0].endswith("/data.pkl") else e for e in entries
    ])


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What torch.load was called on (it still runs)."""
    calls: list[object] = []
    real = torch.load

    def spy(source: object, *args: object, **kwargs: object) -> object:
        calls.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_a_zip_bomb_is_refused_before_torch_inflates_it(
    tmp_path: Path, torch_loads: list[object]
) -> None:
    # Prepare: a 0.3 MB file whose data.pkl inflates to 256 MiB
    bomb = zip_bomb(tmp_path / "bomb.pt")
    with zipfile.ZipFile(bomb) as archive:
        declared = archive.getinfo("archive/data.pkl").file_size
    assert declared == 256 << 20 and bomb.stat().st_size < declared / 500

    # Execute
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bomb)

    # Assert: our reason, naming the file and the entry; torch never read it
    message = str(info.value)
    assert str(bomb) in message and "'archive/data.pkl' is compressed" in message
    assert "weights_only" not in message
    assert torch_loads == []


def test_a_header_declaring_more_than_the_file_holds_is_refused(
    tmp_path: Path, torch_loads: list[object]
) -> None:
    # Prepare: stored (as torch writes), but data.pkl's header claims 3 GiB
    save_checkpoint(_checkpoint(), tmp_path / "honest.pt")
    lying = zip_archive(tmp_path / "lying.pt", [
        (name, data, method, crc, 3 << 30 if name.endswith("/data.pkl") else size)
        for name, data, method, crc, size in _entries(tmp_path / "honest.pt")
    ])

    # Execute
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(lying)

    # Assert
    assert str(lying) in str(info.value)
    assert f"declares {3 << 30} bytes that the file does not hold" in str(info.value)
    assert torch_loads == []


def test_a_file_beyond_the_cap_is_not_read(tmp_path: Path, torch_loads: list[object]) -> None:
    # Prepare: an honest checkpoint, and a cap one byte below its size
    path = tmp_path / "latest.pt"
    save_checkpoint(_checkpoint(), path)
    size = path.stat().st_size

    # Execute
    with pytest.raises(CheckpointError, match="a fedgan checkpoint may hold") as info:
        load_checkpoint(path, max_bytes=size - 1)

    # Assert: refused unread; the same file loads under the default cap
    assert str(path) in str(info.value) and torch_loads == []
    assert load_checkpoint(path).server_round == 3
    assert MAX_CHECKPOINT_BYTES > 100 * size


class Hostile:
    """Unpickling it would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_foreign_and_legacy_files_are_refused_in_our_words(tmp_path: Path) -> None:
    # Prepare: a torch zip with a __reduce__ payload; the same in torch's legacy
    # (pre-zip) format; a plain pickle; and a zip appended to a legacy file (a
    # zip reader would find the zip, torch would read the legacy part)
    marker = tmp_path / "pwned"
    payload = {"format": FORMAT, "x": Hostile(marker)}
    files = {name: tmp_path / f"{name}.pt" for name in ("reduce", "legacy", "pickle", "hybrid")}
    torch.save(payload, files["reduce"])
    torch.save(payload, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle"].write_bytes(pickle.dumps(payload))
    save_checkpoint(_checkpoint(), tmp_path / "honest.pt")
    files["hybrid"].write_bytes(files["legacy"].read_bytes()
                                + (tmp_path / "honest.pt").read_bytes())
    says = {"reduce": "does not hold only tensors and plain values",
            "legacy": "not a zip archive as torch.save writes",
            "pickle": "not a zip archive as torch.save writes",
            "hybrid": "not a zip archive as torch.save writes"}

    for name, path in files.items():
        # Execute
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)

        # Assert: our reason, naming the file; never torch's advice to run the file
        assert str(path) in str(info.value) and says[name] in str(info.value), name
        assert "weights_only" not in str(info.value), name
    assert not marker.exists()  # nothing ran


def test_a_config_of_shared_nested_lists_is_refused_before_anything_prints_it(
    tmp_path: Path,
) -> None:
    # Prepare: 2 KB of pickle whose config value, printed, would be 2**40 items long
    nested: list = []
    for _ in range(40):
        nested = [nested, nested]
    path = tmp_path / "nested.pt"
    save_checkpoint(Checkpoint(state={"generator.w": torch.ones(2)}, server_round=1,
                               config={"seed": nested}), path)

    # Execute / Assert
    with pytest.raises(CheckpointError, match="invalid config") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
