"""The end of a round: the step Flower's `Strategy.start` calls as its `evaluate_fn`.

After the strategy has aggregated a round, `RoundEnd` takes the new global
arrays and, in this order:

1. updates the server-side EMA of the generator ('generator-ema' > 0), which
   it owns for the whole run (a resumed run starts from the checkpoint's);
2. samples the fixed-noise grid (and the per-class grid of a conditional G)
   every 'sample-every' rounds, before round 1 and after the last;
3. scores sample quality (the `QualityJudge`) every 'eval-every' rounds and
   after the last: the EMA generator when the run keeps one, with the raw
   global generator's scores in the `raw-*` columns;
4. hands the grids, the row's parts and the EMA state to the `Recorder`,
   which persists them (rows, latest.pt, best.pt, the views) and returns
   the round's row.
"""

from __future__ import annotations

import time
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from fedgan_app.config import RunConfig
from fedgan_app.gan.models import GANConfig, Generator, pick_device
from fedgan_app.outputs.checkpoint import Checkpoint
from fedgan_app.outputs.recorder import Recorder
from fedgan_app.quality.judge import (
    QualityJudge,
    class_grid,
    generator_from,
    grid_noise,
    sample_grid,
    update_ema,
)


class RoundEnd:
    """Ends every round of one run: EMA, sample grids, quality, the recorder's commit.

    Parameters
    ----------
    cfg : RunConfig
        The run's settings.
    gan_cfg : GANConfig
        The models' settings (to rebuild G from packed arrays).
    recorder : Recorder
        Numbers the rounds and persists what each round ends with.
    judge : QualityJudge
        Scores sample quality against the server's held-out split.
    resume : Checkpoint | None
        The checkpoint the run continues (its EMA generator goes on), or None.
    resume_path : Path | None
        Where `resume` was read from (named in warnings).

    Notes
    -----
    An instance is the `evaluate_fn` of `Strategy.start`: Flower calls it
    with round 0 (the initial model) before the first round, then after
    every round with the aggregated arrays.

    """

    def __init__(self, cfg: RunConfig, gan_cfg: GANConfig, recorder: Recorder,
                 judge: QualityJudge, resume: Checkpoint | None = None,
                 resume_path: Path | None = None) -> None:
        """Keep the wiring; fix the grid noise; start the EMA from the checkpoint's."""
        self.cfg = cfg
        self.gan_cfg = gan_cfg
        self.recorder = recorder
        self.judge = judge
        self.device = pick_device(cfg.device)
        self.noise = grid_noise(cfg.seed, cfg.latent_dim, cfg.sample_noise_scale)
        # The server-side EMA generator's packed state (None: the run keeps none).
        self.ema_state = resumed_ema(cfg, resume, resume_path)

    def __call__(self, local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """End a round of this `Strategy.start` (round 0: before the first round).

        With generator-ema > 0 the EMA generator is the run's generator: the
        grids and the quality columns show it.
        """
        cfg = self.cfg
        server_round = self.recorder.absolute(local_round)
        if local_round > 0 and cfg.generator_ema > 0:
            self.ema_state = update_ema(self.ema_state, arrays, cfg.generator_ema)
        start = time.perf_counter()
        last = server_round == cfg.num_server_rounds
        sample = local_round == 0 or server_round % cfg.sample_every == 0 or last
        score = local_round > 0 and cfg.scores_round(server_round)
        # G is rebuilt (and its BatchNorm statistics recomputed) only when used.
        generator = self._generator(self.ema_state or arrays) if sample or score else None
        if local_round == 0:
            # Before round 1 only the starting grid; a resumed run has it already.
            if not self.recorder.resumed:
                self._record_grids(0, generator)
            self.recorder.refresh()  # the dashboard page exists before round 1
            self.recorder.start_clock()
            return None
        if sample:
            self._record_grids(server_round, generator)
        timing = {"time-sample-s": time.perf_counter() - start}
        quality = self._score(generator, arrays) if score else {}
        row = self.recorder.commit(server_round, arrays, {**quality, **timing},
                                   ema_state=self.ema_state)
        return MetricRecord(row)

    def _generator(self, state: ArrayRecord | dict[str, torch.Tensor]) -> Generator:
        """G rebuilt from packed arrays, its BatchNorm statistics recomputed."""
        return generator_from(state, self.gan_cfg, self.device, self.cfg.seed)

    def _record_grids(self, server_round: int, generator: Generator) -> None:
        """The fixed-noise grid, and for a conditional G the one-row-per-class grid."""
        self.recorder.record_samples(server_round,
                                     sample_grid(generator, self.noise, self.device))
        if generator.num_classes:
            self.recorder.record_class_samples(
                server_round, class_grid(generator, self.noise, self.device))

    def _score(self, generator: Generator, arrays: ArrayRecord) -> dict[str, float]:
        """Quality of the sampled G; with an EMA also the raw G's, as `raw-*`."""
        quality = self.judge.evaluate(generator, self.device)
        if self.ema_state is not None:
            raw = self.judge.evaluate(self._generator(arrays), self.device)
            raw_seconds = raw.pop("eval-time-s")
            quality.update({f"raw-{k}": v for k, v in raw.items()})
            quality["eval-time-s"] += raw_seconds  # both scorings are evaluation time
        return quality


def resumed_ema(cfg: RunConfig, resume: Checkpoint | None,
                resume_path: Path | None) -> dict[str, torch.Tensor] | None:
    """The EMA generator a run starts from: the checkpoint's, when the run keeps one."""
    ema_state = resume.ema_state if resume else None
    if ema_state is not None and cfg.generator_ema <= 0:
        # An EMA nobody updates would be sampled, scored and kept as best.pt
        # for the rest of the run: the resumed run uses the raw generator.
        log(WARNING, "Resume: %s holds an EMA generator but generator-ema is 0: "
            "it is dropped and the raw generator is sampled from here on", resume_path)
        return None
    return ema_state
