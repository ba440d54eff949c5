"""Checkpoint format v2: every field round-trips; version 1 still loads; others refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedgan_app.checkpoint import (
    FORMAT,
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
