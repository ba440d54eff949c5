"""ServerApp: wire config, models, the FedGAN strategy, the recorder and evaluation; run."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedgan_app.config import RunConfig
from fedgan_app.data.prepared import load_server_split, partition_label_counts
from fedgan_app.data.spec import partition_spec
from fedgan_app.federation.rules import check_federation
from fedgan_app.federation.strategy import build_strategy
from fedgan_app.gan.models import (
    GANConfig,
    Generator,
    build_gan,
    gan_config,
    pick_device,
)
from fedgan_app.outputs.recorder import Recorder, load_resume, resume_arrays, run_folder
from fedgan_app.protocol.message import buffer_keys, pack_gan
from fedgan_app.quality.judge import (
    QualityJudge,
    class_grid,
    generator_from,
    grid_noise,
    sample_grid,
    update_ema,
)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedGAN for the configured rounds and write every output."""
    # Settings, the checkpoint to resume and the federation: checked before anything.
    cfg = RunConfig.from_run_config(context.run_config)
    resume_path, resume = load_resume(cfg)
    connected = len(list(grid.get_node_ids()))
    check_federation(cfg, connected)
    num_nodes = max(1, connected)

    # Data the server owns (its held-out split, never a client's) and the models.
    spec = partition_spec(cfg, num_partitions=num_nodes)
    server_data = load_server_split(spec)
    gan_cfg = gan_config(cfg, server_data.image_shape, server_data.num_classes)
    generator, discriminator = build_gan(gan_cfg, cfg.seed)
    reference = pack_gan(generator, discriminator)
    initial = resume_arrays(resume, resume_path, reference) if resume else reference

    # The recorder ends every round; the strategy checks replies, then aggregates.
    recorder = Recorder(cfg, run_folder(cfg, resume_path), resume, resume_path)
    strategy = build_strategy(cfg, reference, buffer_keys(generator, discriminator), recorder,
                              num_nodes, num_classes=server_data.num_classes,
                              partitions=partial(_partition_counts, cfg), grid=grid)
    if resume:
        strategy.load_state(resume.strategy_state, resume_path)
    judge = QualityJudge(cfg.dataset, cfg.seed, cfg.eval_samples, server_data, spec,
                         on_reference=recorder.record_reference)
    recorder.open()
    try:
        strategy.start(grid=grid, initial_arrays=initial,
                       num_rounds=cfg.num_server_rounds - recorder.offset,
                       timeout=cfg.round_timeout,
                       evaluate_fn=make_evaluate_fn(cfg, gan_cfg, recorder, judge))
    finally:
        # Plots, GIF and the W&B run are written even when a round raised.
        recorder.finish()


def make_evaluate_fn(
    cfg: RunConfig, gan_cfg: GANConfig, recorder: Recorder, judge: QualityJudge
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """Build the server-side evaluate_fn: EMA, sample grids, quality, the round's commit.

    With generator-ema > 0 the EMA generator is the run's generator: the grids
    and the quality columns show it, and the raw global generator's quality
    goes to the `raw-*` columns.
    """
    device = pick_device(cfg.device)
    noise = grid_noise(cfg.seed, cfg.latent_dim)

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate the global model after a round (round 0: the initial model)."""
        server_round = recorder.absolute(local_round)
        if local_round > 0 and cfg.generator_ema > 0:
            recorder.set_ema_state(update_ema(recorder.ema_state, arrays, cfg.generator_ema))
        start = time.perf_counter()
        last = server_round == cfg.num_server_rounds
        sample = local_round == 0 or server_round % cfg.sample_every == 0 or last
        score = local_round > 0 and cfg.scores_round(server_round)
        # G is rebuilt (and its BatchNorm statistics recomputed) only when used.
        generator = (generator_from(recorder.ema_state or arrays, gan_cfg, device, cfg.seed)
                     if sample or score else None)
        if local_round == 0:
            # Before round 1 only the starting grid; a resumed run has it already.
            if not recorder.resumed:
                _record_grids(recorder, 0, generator, noise, device)
            recorder.refresh()  # the dashboard page exists before round 1
            recorder.start_clock()
            return None
        if sample:
            _record_grids(recorder, server_round, generator, noise, device)
        timing = {"time-sample-s": time.perf_counter() - start}
        quality: dict[str, float] = {}
        if score:
            quality = judge.evaluate(generator, device)
            if recorder.ema_state is not None:
                raw = judge.evaluate(generator_from(arrays, gan_cfg, device, cfg.seed), device)
                raw_seconds = raw.pop("eval-time-s")
                quality.update({f"raw-{k}": v for k, v in raw.items()})
                quality["eval-time-s"] += raw_seconds  # both scorings are evaluation time
        return MetricRecord(recorder.commit(server_round, arrays, {**quality, **timing}))

    return evaluate_fn


def _record_grids(recorder: Recorder, server_round: int, generator: Generator,
                  noise: torch.Tensor, device: torch.device) -> None:
    """The fixed-noise grid, and for a conditional G the one-row-per-class grid."""
    recorder.record_samples(server_round, sample_grid(generator, noise, device))
    if generator.num_classes:
        recorder.record_class_samples(server_round, class_grid(generator, noise, device))


def _partition_counts(cfg: RunConfig, num_partitions: int) -> list[list[int]]:
    """Label counts of each partition when the run's data is split `num_partitions` ways."""
    return partition_label_counts(partition_spec(cfg, num_partitions))
