"""The end of a round: the EMA generator, the grids, the scoring, the recorder's commit."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from flwr.app import ArrayRecord

from fedgan_app.config import RunConfig
from fedgan_app.gan.models import Generator, build_gan, gan_config
from fedgan_app.outputs.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedgan_app.outputs.recorder import Recorder, run_folder
from fedgan_app.outputs.runfolder import RunFolder, read_rows
from fedgan_app.protocol.message import pack_gan
from fedgan_app.quality.judge import generator_from, grid_noise, sample_grid, update_ema
from fedgan_app.round_end import RoundEnd

CPU = torch.device("cpu")


class WeightJudge:
    """Stands in for the QualityJudge: 'fid' is the sum of G's weights, so it names G."""

    def __init__(self) -> None:
        self.scored: list[float] = []

    def evaluate(self, generator: Generator, device: torch.device) -> dict[str, float]:
        """Score G by its weights; one second of evaluation time."""
        fid = float(sum(p.detach().sum() for p in generator.parameters()))
        self.scored.append(fid)
        return {"fid": fid, "eval-time-s": 1.0}


def _cfg(tmp_path: Path, **changes: object) -> RunConfig:
    """A two-round unconditional run writing under tmp_path/outputs/run."""
    return RunConfig.defaults(output_dir=str(tmp_path / "outputs"), run_name="run",
                              wandb_mode="disabled", num_server_rounds=2,
                              conditional=False, **changes)


def _arrays(cfg: RunConfig, seed: int) -> ArrayRecord:
    """The packed G and D of a fresh pair (one seed per 'round')."""
    return pack_gan(*build_gan(gan_config(cfg, (1, 28, 28), 0), seed))


def _weights(arrays: ArrayRecord | dict[str, torch.Tensor], cfg: RunConfig) -> float:
    """What WeightJudge scores for the G these arrays hold."""
    generator = generator_from(arrays, gan_config(cfg, (1, 28, 28), 0), CPU, cfg.seed)
    return float(sum(p.detach().sum() for p in generator.parameters()))


def test_the_ema_generator_is_sampled_scored_and_checkpointed(tmp_path: Path) -> None:
    # Prepare: a fresh run with generator-ema 0.5 and three global models
    cfg = _cfg(tmp_path, generator_ema=0.5)
    gan_cfg = gan_config(cfg, (1, 28, 28), 0)
    recorder = Recorder(cfg, run_folder(cfg, None))
    judge = WeightJudge()
    round_end = RoundEnd(cfg, gan_cfg, recorder, judge)
    initial, first, second = (_arrays(cfg, seed) for seed in (0, 1, 2))
    recorder.open()

    # Execute: before round 1, after round 1, after round 2 (the last: scored)
    before = round_end(0, initial)
    after_first = round_end(1, first)
    row = dict(round_end(2, second))
    recorder.finish()

    # Assert: the EMA starts at round 1's G and averages round 2's in
    ema = update_ema(update_ema(None, first, 0.5), second, 0.5)
    assert before is None and after_first is not None
    assert all(torch.equal(round_end.ema_state[k], v) for k, v in ema.items())
    latest = load_checkpoint(RunFolder(recorder.run_dir).latest_pt)
    assert latest.server_round == 2
    assert all(torch.equal(latest.ema_state[k], v) for k, v in ema.items())
    assert all(torch.equal(latest.state[k], v) for k, v in second.to_torch_state_dict().items())
    # the grids and the quality columns show the EMA G; raw-* the global one
    grid = sample_grid(generator_from(ema, gan_cfg, CPU, cfg.seed),
                       grid_noise(cfg.seed, cfg.latent_dim), CPU)
    assert np.array_equal(iio.imread(RunFolder(recorder.run_dir).sample(2)), grid)
    assert judge.scored == [_weights(ema, cfg), _weights(second, cfg)]
    assert row["fid"] == _weights(ema, cfg) and row["raw-fid"] == _weights(second, cfg)
    assert row["eval-time-s"] == 2.0  # both scorings count as evaluation time
    assert [r["round"] for r in read_rows(recorder.folder.metrics_csv)] == ["1", "2"]
    assert sorted(recorder.folder.sample_paths()) == [0, 1, 2]


def test_a_resumed_run_continues_the_checkpoints_ema(tmp_path: Path) -> None:
    # Prepare: a run folder after round 1 whose checkpoint holds an EMA generator
    cfg = _cfg(tmp_path, generator_ema=0.9)
    run_dir = run_folder(cfg, None)
    folder = RunFolder(run_dir)
    kept = update_ema(None, _arrays(cfg, 5), 0.9)
    save_checkpoint(Checkpoint(state=_arrays(cfg, 1).to_torch_state_dict(), server_round=1,
                               config=cfg.to_dict(), ema_state=kept), folder.latest_pt)
    folder.metrics_csv.write_text("round,loss-d\n1,0.5\n")
    resume = load_checkpoint(folder.latest_pt)
    recorder = Recorder(cfg, run_folder(cfg, folder.latest_pt), resume, folder.latest_pt)
    round_end = RoundEnd(cfg, gan_config(cfg, (1, 28, 28), 0), recorder, WeightJudge(),
                         resume, folder.latest_pt)
    second = _arrays(cfg, 2)
    recorder.open()

    # Execute: Strategy.start counts from 0 again
    round_end(0, _arrays(cfg, 1))
    round_end(1, second)
    recorder.finish()

    # Assert: round 2's EMA is the checkpoint's EMA with round 2's G averaged in
    expected = update_ema(kept, second, 0.9)
    latest = load_checkpoint(folder.latest_pt)
    assert latest.server_round == 2
    assert all(torch.equal(latest.ema_state[k], v) for k, v in expected.items())
    assert sorted(folder.sample_paths()) == [2]  # no second grid of round 0 or 1


def test_a_resumed_run_without_ema_drops_the_checkpoints_frozen_ema(tmp_path: Path) -> None:
    # Prepare: a checkpoint with an EMA generator; the resumed run has generator-ema 0
    cfg = _cfg(tmp_path)
    assert cfg.generator_ema == 0
    folder = RunFolder(run_folder(cfg, None))
    save_checkpoint(Checkpoint(state=_arrays(cfg, 1).to_torch_state_dict(), server_round=1,
                               config={}, ema_state=update_ema(None, _arrays(cfg, 5), 0.9)),
                    folder.latest_pt)
    folder.metrics_csv.write_text("round,loss-d\n1,0.5\n")
    resume = load_checkpoint(folder.latest_pt)
    recorder = Recorder(cfg, run_folder(cfg, folder.latest_pt), resume, folder.latest_pt)
    judge = WeightJudge()
    round_end = RoundEnd(cfg, gan_config(cfg, (1, 28, 28), 0), recorder, judge, resume,
                         folder.latest_pt)
    second = _arrays(cfg, 2)
    recorder.open()

    # Execute
    round_end(0, _arrays(cfg, 1))
    row = dict(round_end(1, second))
    recorder.finish()

    # Assert: nothing samples or scores the frozen EMA; the next checkpoint holds none
    assert round_end.ema_state is None
    assert load_checkpoint(folder.latest_pt).ema_state is None
    assert judge.scored == [_weights(second, cfg)] and "raw-fid" not in row
