"""ServerApp: wire config, models, the FedGAN strategy, the recorder and the round's end; run."""

from __future__ import annotations

from functools import partial

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgan_app.config import RunConfig
from fedgan_app.data.prepared import load_server_split, partition_label_counts
from fedgan_app.data.spec import partition_spec
from fedgan_app.federation.rules import check_federation
from fedgan_app.federation.sampling import sampled_per_round
from fedgan_app.federation.strategy import build_strategy
from fedgan_app.gan.models import build_gan, gan_config
from fedgan_app.outputs.recorder import Recorder, load_resume, resume_arrays, run_folder
from fedgan_app.privacy.accounting import privacy_budget
from fedgan_app.privacy.audit import audit_at_end
from fedgan_app.protocol.message import buffer_keys, pack_gan
from fedgan_app.quality.judge import QualityJudge
from fedgan_app.round_end import RoundEnd

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
    # Differential privacy: the budget goes on from a resumed run's ledger, and a
    # dp-target-epsilon ends the run before the round that would exceed it.
    budget, cfg = privacy_budget(cfg, num_nodes, sampled_per_round(cfg, num_nodes), resume,
                                 resume_path)

    # Data the server owns (its held-out split, never a client's) and the models.
    spec = partition_spec(cfg, num_partitions=num_nodes)
    server_data = load_server_split(spec)
    gan_cfg = gan_config(cfg, server_data.image_shape, server_data.num_classes)
    generator, discriminator = build_gan(gan_cfg, cfg.seed)
    reference = pack_gan(generator, discriminator)
    initial = resume_arrays(resume, resume_path, reference) if resume else reference

    # The recorder persists every round; the strategy checks replies, then aggregates.
    recorder = Recorder(cfg, run_folder(cfg, resume_path), resume, resume_path)
    recorder.check()  # a damaged history is refused before any node is asked
    strategy = build_strategy(cfg, reference, buffer_keys(generator, discriminator), recorder,
                              num_nodes, num_classes=server_data.num_classes,
                              partitions=partial(_partition_counts, cfg), grid=grid,
                              budget=budget)
    if resume:
        strategy.load_state(resume.strategy_state, resume_path)
    # The end of every round: EMA, sample grids, quality, then the recorder's commit.
    judge = QualityJudge(cfg.dataset, cfg.seed, cfg.eval_samples, server_data, spec,
                         on_reference=recorder.record_reference,
                         noise_scale=cfg.sample_noise_scale)
    round_end = RoundEnd(cfg, gan_cfg, recorder, judge, resume, resume_path)
    recorder.open()
    try:
        result = strategy.start(grid=grid, initial_arrays=initial,
                                num_rounds=cfg.num_server_rounds - recorder.offset,
                                timeout=cfg.round_timeout,
                                evaluate_fn=round_end)
        # What the final models reveal about the clients' images (docs/privacy.md).
        if cfg.audit_samples > 0:
            audit = audit_at_end(cfg, gan_cfg, result.arrays.to_torch_state_dict(),
                                 round_end.ema_state, num_nodes, round_end.device)
            if audit is not None:
                recorder.record_summary(audit)
    finally:
        # Plots, GIF and the W&B run are written even when a round raised.
        recorder.finish()


def _partition_counts(cfg: RunConfig, num_partitions: int) -> list[list[int]]:
    """Label counts of each partition when the run's data is split `num_partitions` ways."""
    return partition_label_counts(partition_spec(cfg, num_partitions))
