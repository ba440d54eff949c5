"""Crash and resume in process: the real ServerApp main and ClientApp, tiny configs.

What a resume can and cannot reproduce: the server's side is fully in the
checkpoint (G, D, round, best fid, W&B id; the fixed noise and every client RNG
derive from `seed` and the round), but each client's Adam moments live in its
`context.state` and never leave it (FedGAN agents keep their optimizer state).
A resumed run is a new run with fresh contexts, so its clients restart Adam and
the resumed model differs from an uninterrupted one. The tests therefore check:
(a) the resumed first round starts from exactly the checkpointed arrays,
(b) two resumes from one checkpoint give bit-identical models, and
(c) with adam-beta1 = adam-beta2 = 0, where Adam keeps no memory (m = g,
v = g^2, bias corrections 1), crash + resume equals the uninterrupted run bit
for bit: everything else a round depends on does survive a resume.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from fedgan_app import server_app
from fedgan_app.federation import client_app as client_module
from fedgan_app.outputs import recorder
from fedgan_app.outputs.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fedgan_app.outputs.runfolder import RunFolder, read_rows
from fedgan_app.quality.judge import update_ema
from fedgan_app.settings import ConfigError
from harness.inprocess import InProcessGrid, server_context
from tests.conftest import tiny_settings
from tests.run_folder import RunFolderHolder

TRAIN = "train"


class ServerCrash(Exception):
    """Stands in for the ServerApp process dying."""


class RecordingGrid(InProcessGrid):
    """Records the arrays sent in each round; can crash as a round starts."""

    def __init__(self, run_config: dict[str, Any], crash_in_round: int | None = None) -> None:
        super().__init__(client_module.app, num_nodes=2, run_config=run_config)
        self.crash_in_round = crash_in_round
        self.sent: dict[int, dict[str, torch.Tensor]] = {}

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        """Record the global arrays of a train round, crash if asked, else run."""
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type == TRAIN:
                server_round = int(msg.content["config"]["server-round"])
                self.sent.setdefault(server_round,
                                     msg.content["arrays"].to_torch_state_dict())
                if server_round == self.crash_in_round:
                    raise ServerCrash(f"server died as round {server_round} started")
        return super().send_and_receive(messages, timeout=timeout)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical: same keys, dtypes and values."""
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _run(run_config: dict[str, Any], crash_in_round: int | None = None) -> RecordingGrid:
    """Run main on a fresh grid (a new run: fresh client contexts)."""
    grid = RecordingGrid(run_config, crash_in_round)
    if crash_in_round is None:
        server_app.main(grid, server_context(run_config))
    else:
        with pytest.raises(ServerCrash):
            server_app.main(grid, server_context(run_config))
    return grid


def _resume_settings(output_dir: Path) -> dict[str, Any]:
    """Tiny run config: 2 local steps, quality only after the last round."""
    return {**tiny_settings(output_dir), "local-steps": 2, "eval-every": 100}


@pytest.fixture
def resume_config(tmp_path: Path) -> dict[str, Any]:
    """The tiny resume config, writing under tmp_path/outputs."""
    return _resume_settings(tmp_path / "outputs")


@pytest.mark.slow
def test_crash_after_round_two_then_resume_to_four(
    resume_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the server dies in round 3 after writing its rows and sample
    # grid but before latest.pt (the worst moment: the rows exist, the commit
    # does not). W&B offline, to check the run id survives; an EMA generator, to
    # check it continues from the checkpoint's.
    config = {**resume_config, "num-server-rounds": 4, "wandb-mode": "offline",
              "generator-ema": 0.9}
    run_dir = Path(config["output-dir"]) / "test-run"
    real_save = recorder.save_checkpoint

    def dying_save(ckpt: Checkpoint, path: Path) -> None:
        if ckpt.server_round == 3:
            raise ServerCrash("server died before the round 3 checkpoint")
        real_save(ckpt, path)

    monkeypatch.setattr(recorder, "save_checkpoint", dying_save)
    crashed = RecordingGrid(config)
    with pytest.raises(ServerCrash):
        server_app.main(crashed, server_context(config))
    monkeypatch.setattr(recorder, "save_checkpoint", real_save)
    at_crash = load_checkpoint(RunFolder(run_dir).latest_pt)
    assert at_crash.server_round == 2 and at_crash.wandb_run_id
    assert [r["round"] for r in read_rows(RunFolder(run_dir).metrics_csv)] == ["1", "2", "3"]
    copy = tmp_path / "copy" / "test-run"
    shutil.copytree(run_dir, copy)

    # Execute: resume from the run folder, and again from a copy of it
    resumed = _run({**config, "resume-from": str(run_dir)})
    _run({**config, "num-server-rounds": 3, "resume-from": str(copy),
          "wandb-mode": "disabled"})

    # Assert: every round exactly once, in order, in both CSVs
    folder = RunFolder(run_dir)
    assert [r["round"] for r in read_rows(folder.metrics_csv)] == ["1", "2", "3", "4"]
    clients = sorted((int(r["round"]), r["partition-id"])
                     for r in read_rows(folder.clients_csv))
    assert clients == [(r, p) for r in (1, 2, 3, 4) for p in ("0", "1")]
    pngs = sorted(p.name for p in folder.samples_dir.glob("*.png"))
    assert pngs == [folder.sample(r).name for r in range(5)]
    assert folder.progress_gif.is_file()
    final = load_checkpoint(folder.latest_pt)
    assert final.server_round == 4
    # The EMA generator went on from the checkpoint's: rounds 3 and 4 averaged in
    ema = update_ema(update_ema(at_crash.ema_state, resumed.sent[4], 0.9), final.state, 0.9)
    assert at_crash.ema_state is not None and set(final.ema_state) == set(ema)
    assert all(torch.equal(final.ema_state[k], v) for k, v in ema.items())
    # The same W&B run continues: the id in the checkpoints, and W&B's offline folders
    assert final.wandb_run_id == at_crash.wandb_run_id
    offline = sorted(p.name for p in RunFolder(run_dir).wandb_dir.glob("offline-run-*"))
    assert len(offline) == 2 and all(n.endswith(at_crash.wandb_run_id) for n in offline)
    # (a) the resumed round 3 starts from exactly the checkpointed arrays, which are
    # the arrays the crashed run had sent in its round 3
    _assert_same_state(resumed.sent[3], at_crash.state)
    _assert_same_state(resumed.sent[3], crashed.sent[3])
    # (b) two resumes from one checkpoint agree bit for bit after a round
    _assert_same_state(load_checkpoint(RunFolder(copy).latest_pt).state,
                       resumed.sent[4])
    assert not torch.equal(resumed.sent[4]["generator.net.0.weight"],
                           resumed.sent[3]["generator.net.0.weight"])  # it trained


def _memoryless_config(resume_config: dict[str, Any], strategy: str,
                       out: Path) -> dict[str, Any]:
    """3 rounds with adam-beta1 = adam-beta2 = 0, writing under `out`."""
    return {**resume_config, "num-server-rounds": 3, "adam-beta1": 0.0, "adam-beta2": 0.0,
            "lr-generator": 1e-4, "lr-discriminator": 1e-4, "strategy": strategy,
            "output-dir": str(out)}


@pytest.fixture(scope="module")
def memoryless_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per strategy: (an uninterrupted run's folder, one whose server died in round 3).

    Both run with adam-beta1 = adam-beta2 = 0, the one setting where the
    clients' lost Adam moments cannot matter (see `_memoryless_config`);
    with fedadam the server's own Adam moments must come back from the
    checkpoint. Tests resume from copies of the crashed folder.
    """
    runs = {}
    for strategy in ("fedavg", "fedadam"):
        root = tmp_path_factory.mktemp(strategy)
        config = _memoryless_config(_resume_settings(root), strategy, root / "whole")
        _run(config)
        _run({**config, "output-dir": str(root / "split")}, crash_in_round=3)
        runs[strategy] = (root / "whole" / "test-run", root / "split" / "test-run")
    return runs


def _resume_copy(memoryless_runs: dict[str, tuple[Path, Path]], strategy: str,
                 tmp_path: Path) -> tuple[dict[str, Any], Path, Path]:
    """(resume config, whole run folder, crashed run folder copied under tmp_path)."""
    whole_dir, split_dir = memoryless_runs[strategy]
    copy = tmp_path / "split" / "test-run"
    shutil.copytree(split_dir, copy)
    config = _memoryless_config(_resume_settings(tmp_path), strategy, tmp_path / "split")
    return {**config, "resume-from": str(copy)}, whole_dir, copy


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run_when_adam_keeps_no_state(
    strategy: str, memoryless_runs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    # Prepare: the uninterrupted run and the crashed one (fixture above)
    resume, whole_dir, split_dir = _resume_copy(memoryless_runs, strategy, tmp_path)
    at_crash = load_checkpoint(RunFolder(split_dir).latest_pt)

    # Execute
    _run(resume)

    # Assert: the same final G and D, bit for bit, and the same client losses
    whole_ckpt = load_checkpoint(RunFolder(whole_dir).latest_pt)
    split_ckpt = load_checkpoint(RunFolder(split_dir).latest_pt)
    _assert_same_state(whole_ckpt.state, split_ckpt.state)
    _assert_same_state({k: v for k, v in whole_ckpt.strategy_state.items() if k != "strategy"},
                       {k: v for k, v in split_ckpt.strategy_state.items() if k != "strategy"})
    if strategy == "fedadam":
        assert at_crash.server_round == 2
        assert any(k.startswith("m_t/") for k in at_crash.strategy_state)
        assert any(k.startswith("v_t/") for k in at_crash.strategy_state)
    else:
        assert at_crash.strategy_state == {}

    def losses(path: Path) -> list[tuple[str, ...]]:
        # Sorted: clients reply in the order the strategy sampled them.
        return sorted((r["round"], r["partition-id"], r["loss-d"], r["loss-g"])
                      for r in read_rows(path))

    assert losses(RunFolder(split_dir).clients_csv) == losses(RunFolder(whole_dir).clients_csv)


@pytest.mark.slow
def test_resume_without_the_optimizer_state_would_differ(
    memoryless_runs: dict[str, tuple[Path, Path]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the fedadam runs above, but the resumed run is denied the moments
    # (the checkpoint's strategy_state is dropped on load): the test above can fail
    resume, whole_dir, split_dir = _resume_copy(memoryless_runs, "fedadam", tmp_path)
    real_load = recorder.load_checkpoint

    def load_without_state(path: Path) -> Checkpoint:
        checkpoint = real_load(path)
        checkpoint.strategy_state = {}
        return checkpoint

    monkeypatch.setattr(recorder, "load_checkpoint", load_without_state)

    # Execute
    _run(resume)

    # Assert
    whole_state = load_checkpoint(RunFolder(whole_dir).latest_pt).state
    split_state = load_checkpoint(RunFolder(split_dir).latest_pt).state
    assert not torch.equal(whole_state["generator.net.0.weight"],
                           split_state["generator.net.0.weight"])


# --- bad resume inputs: clear errors, nothing overwritten -------------------------

def _fake_run(tmp_path: Path, server_round: int = 2) -> tuple[Path, bytes]:
    """A run folder whose latest.pt is a valid checkpoint; returns (dir, its bytes)."""
    run_dir = tmp_path / "outputs" / "test-run"
    latest = RunFolder(run_dir).latest_pt
    save_checkpoint(Checkpoint(state={"generator.w": torch.ones(2)},
                               server_round=server_round, config={}), latest)
    return run_dir, latest.read_bytes()


def _resume_error(config: dict[str, Any], resume_from: Path | str) -> Exception:
    """The exception main raises for a resume-from value."""
    run_config = {**config, "num-server-rounds": 4, "resume-from": str(resume_from)}
    grid = InProcessGrid(client_module.app, num_nodes=2, run_config=run_config)
    with pytest.raises((CheckpointError, ConfigError)) as info:
        server_app.main(grid, server_context(run_config))
    assert grid.calls == []  # no client was asked to train
    return info.value


class _Hostile:
    """Unpickling it would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def _foreign_files(folder: Path) -> dict[str, Path]:
    """Files that are not fedgan checkpoints, each with a reason to be refused."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "pwned"
    files = {name: folder / f"{name}.pt" for name in
             ("plain-dict", "text", "pickle-reduce", "torch-reduce", "bad-field")}
    torch.save({"weights": torch.zeros(3)}, files["plain-dict"])
    files["text"].write_text("round = 2\n")
    with open(files["pickle-reduce"], "wb") as handle:
        pickle.dump({"format": "fedgan-checkpoint", "x": _Hostile(marker)}, handle)
    torch.save({"format": "fedgan-checkpoint", "x": _Hostile(marker)}, files["torch-reduce"])
    bad = Checkpoint(state={"generator.w": torch.ones(2)}, server_round=1, config={})
    torch.save({**bad.to_dict(), "best_metric": "0.1"}, files["bad-field"])
    return files


def test_foreign_or_truncated_files_are_refused_and_latest_is_untouched(
    tiny_run_config: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare
    run_dir, latest_bytes = _fake_run(tmp_path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(latest_bytes[: len(latest_bytes) // 2])
    files = {"truncated": truncated, **_foreign_files(tmp_path / "foreign")}

    for name, path in files.items():
        # Execute
        error = _resume_error(tiny_run_config, path)

        # Assert: the error names the file; the run folder's latest.pt is intact
        assert isinstance(error, CheckpointError), name
        assert str(path) in str(error), (name, str(error))
        assert RunFolder(run_dir).latest_pt.read_bytes() == latest_bytes
    assert not (tmp_path / "foreign" / "pwned").exists()  # no code ran


def test_truncated_latest_in_the_run_folder_is_refused_and_kept(
    tiny_run_config: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare
    run_dir, latest_bytes = _fake_run(tmp_path)
    latest = RunFolder(run_dir).latest_pt
    latest.write_bytes(latest_bytes[:100])

    # Execute
    error = _resume_error(tiny_run_config, run_dir)

    # Assert
    assert isinstance(error, CheckpointError) and str(latest) in str(error)
    assert latest.read_bytes() == latest_bytes[:100]
    assert not RunFolder(run_dir).metrics_csv.exists()


def test_missing_checkpoint_names_the_setting(tiny_run_config: dict[str, Any],
                                              tmp_path: Path) -> None:
    error = _resume_error(tiny_run_config, tmp_path / "nowhere")
    assert "resume-from" in str(error) and "nowhere" in str(error)


def test_resume_needs_more_rounds_than_the_checkpoint(tiny_run_config: dict[str, Any],
                                                      tmp_path: Path) -> None:
    # Prepare: a checkpoint of round 4, and num-server-rounds = 4
    run_dir, latest_bytes = _fake_run(tmp_path, server_round=4)

    # Execute
    error = _resume_error(tiny_run_config, run_dir)

    # Assert
    assert isinstance(error, ConfigError) and "'num-server-rounds'" in str(error)
    assert "round 4" in str(error)
    assert RunFolder(run_dir).latest_pt.read_bytes() == latest_bytes


def test_an_older_checkpoint_of_a_run_does_not_overwrite_its_later_rounds(
    tiny_run_config: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: best.pt of round 1 beside latest.pt of round 3
    run_dir, latest_bytes = _fake_run(tmp_path, server_round=3)
    best = RunFolder(run_dir).best_pt
    save_checkpoint(Checkpoint(state={"generator.w": torch.ones(2)}, server_round=1,
                               config={}), best)

    # Execute
    error = _resume_error(tiny_run_config, best)

    # Assert
    assert isinstance(error, ConfigError) and "round 3" in str(error)
    assert RunFolder(run_dir).latest_pt.read_bytes() == latest_bytes


def test_a_checkpoint_of_other_models_is_refused(tiny_run_config: dict[str, Any],
                                                 tmp_path: Path) -> None:
    # Prepare: a checkpoint whose arrays do not fit the models (other latent-dim)
    run_dir, latest_bytes = _fake_run(tmp_path)

    # Execute
    error = _resume_error(tiny_run_config, run_dir)

    # Assert
    assert isinstance(error, CheckpointError) and "does not fit" in str(error)
    assert RunFolder(run_dir).latest_pt.read_bytes() == latest_bytes


def test_a_failed_checkpoint_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: torch.save writes half a file, then the process "dies"
    run_dir, latest_bytes = _fake_run(tmp_path)
    latest = RunFolder(run_dir).latest_pt

    def half_save(obj: Any, handle: Any) -> None:
        handle.write(latest_bytes[:50])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_save)

    # Execute
    with pytest.raises(OSError):
        save_checkpoint(Checkpoint(state={"generator.w": torch.zeros(2)}, server_round=3,
                                   config={}), latest)

    # Assert: the old checkpoint, and no temp file left beside it
    assert latest.read_bytes() == latest_bytes
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest.pt"]


@pytest.mark.slow
def test_a_resume_refuses_a_metrics_csv_emptied_by_a_power_loss(
    memoryless_runs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    # Prepare: the crashed run (latest.pt of round 2), its metrics.csv left empty
    # as a rename without fsync can leave it after a power loss
    resume, _, run_dir = _resume_copy(memoryless_runs, "fedavg", tmp_path)
    RunFolder(run_dir).metrics_csv.write_bytes(b"")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    # Execute
    error = _resume_error(resume, run_dir)

    # Assert: the error names the file, the round and the way out; nothing changed
    assert isinstance(error, ConfigError)
    assert f"{RunFolder(run_dir).metrics_csv} is empty" in str(error)
    assert "holds round 2" in str(error) and "copy the checkpoint" in str(error)
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after.pop(RunFolder(run_dir).run_lock) == b""
    before.pop(RunFolder(run_dir).run_lock, None)
    assert after == before


def test_a_second_run_into_a_folder_in_use_stops_before_any_round(
    tiny_run_config: dict[str, Any], tmp_path: Path
) -> None:
    # Prepare: another process writes outputs/test-run (same output-dir and run-name)
    run_config = {**tiny_run_config, "output-dir": str(tmp_path / "outputs")}
    grid = InProcessGrid(client_module.app, num_nodes=2, run_config=run_config)
    with RunFolderHolder(tmp_path / "outputs", "test-run") as holder:
        # Execute
        with pytest.raises(recorder.RunFolderInUse) as info:
            server_app.main(grid, server_context(run_config))

    # Assert: named the folder and the holder; no client was asked to train
    assert str(tmp_path / "outputs" / "test-run") in str(info.value)
    assert f"pid {holder.pid} on host" in str(info.value)
    assert grid.calls == []
