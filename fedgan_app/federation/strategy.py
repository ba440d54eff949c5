"""The server's strategy: one factory stacks the layers, each with one concern.

From the outside in, as Flower's differential-privacy wrappers wrap a
strategy (each layer holds the next as ``self.strategy``)::

    RunRounds        the run's round numbers (once), the round's config, the
                     round's report to the Recorder      (federation/rounds.py)
    ClientSampling   the round's seeded sample of nodes  (federation/sampling.py)
    ReplyScreen      every reply checked once, rows      (federation/screen.py)
    WeightCap        weight-check 'cap' only             (federation/weights.py)
    Quorum           too few valid replies: keep the model (federation/rules.py)
    ClassAware       class-aware on/auto: class rows by class counts (federation/classes.py)
    PrivateRounds    dp only: all m replies, equal weights, the budget (federation/private.py)
    BufferSplit      buffers out, merged back, checked   (federation/buffers.py)
    Flower's DP      dp only: clip each update, noise the mean (federation/private.py)
    Flower's rule    FedAvg, FedAdam, Krum, ...          (federation/rules.py)

Under DP ('dp' is not 'none') the weight cap and the update-norm screen are
left out (clipping bounds every update, and a drop decided by the other
clients' norms would be outside the guarantee), the buffer split keeps the
server's buffers, and the sampling draws from a secret seed.

The layers share one `RoundReport`, which each fills in with its own facts.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from logging import INFO

from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgan_app.config import RunConfig
from fedgan_app.federation.buffers import BufferSplit
from fedgan_app.federation.checks import Partitions
from fedgan_app.federation.classes import ClassAware, class_rows
from fedgan_app.federation.private import PrivateRounds, dp_wrapper
from fedgan_app.federation.report import RoundReport, RoundSink
from fedgan_app.federation.rounds import RunRounds
from fedgan_app.federation.rules import Quorum, rule_of
from fedgan_app.federation.sampling import (
    ClientSampling,
    PartitionSampler,
    sampled_per_round,
    samples_clients,
)
from fedgan_app.federation.screen import ReplyScreen
from fedgan_app.federation.weights import WeightCap
from fedgan_app.privacy.accounting import PrivacyBudget


def build_strategy(cfg: RunConfig, reference: ArrayRecord, buffers: frozenset[str],
                   sink: RoundSink, num_nodes: int = 1, *, num_classes: int | None = None,
                   partitions: Partitions | None = None,
                   grid: Grid | None = None,
                   budget: PrivacyBudget | None = None) -> RunRounds:
    """Stack the server's strategy for a run's settings.

    Parameters
    ----------
    cfg : RunConfig
        The run's settings: the rule, the checks, the sampling, the schedule.
    reference : ArrayRecord
        The packed global model as built: the keys, shapes and dtypes every
        reply must have, and the record aggregates are cast back to.
    buffers : frozenset[str]
        Packed keys of the models' buffers (`protocol.message.buffer_keys`):
        never given to the rule.
    sink : RoundSink
        Numbers the rounds and takes each round's report (the Recorder).
    num_nodes : int
        Nodes in the federation (multikrum's default selection counts on it).
    num_classes : int | None
        Classes of the run's dataset: every label histogram's length.
    partitions : Partitions | None
        Each partition's label counts when the data is split n ways; needed,
        and used, with 'weight-check' = partition-size.
    grid : Grid | None
        When given, the nodes connected now are asked for their partition
        before the first round (see `fedgan_app.federation.sampling`).
    budget : PrivacyBudget | None
        The run's privacy accountant; needed, and used, when 'dp' is not 'none'.

    Returns
    -------
    RunRounds
        The outermost layer: hand it to nothing but `Strategy.start`'s caller.

    """
    checks_claims = cfg.weight_check == "partition-size"
    if checks_claims and partitions is None:
        raise ValueError("weight-check 'partition-size' needs the partitions' label "
                         "counts (partitions=...)")
    if cfg.private and budget is None:
        raise ValueError("differential privacy needs the run's budget (budget=...)")
    # Under DP the sampling must be secret: amplification by sampling assumes nobody
    # can tell which clients a round took, and the run's seed is in its config.
    sampling_seed = secrets.randbits(62) if cfg.private else cfg.seed
    sampler = (PartitionSampler(sampling_seed, cfg.round_timeout)
               if samples_clients(cfg) or checks_claims or cfg.private else None)
    report = RoundReport()
    rule = rule_of(cfg)
    inner = rule.build(cfg, num_nodes)
    if cfg.private:
        inner = dp_wrapper(cfg, inner, sampled_per_round(cfg, num_nodes))
    strategy: Strategy = BufferSplit(inner, rule, reference, buffers, own_buffers=cfg.private)
    if cfg.private and budget is not None:
        strategy = PrivateRounds(strategy, cfg, budget, buffers, report)
    if cfg.aggregates_by_class:
        if num_classes is None:
            raise ValueError("class-aware aggregation needs the number of classes")
        rows = class_rows(reference, num_classes, cfg.latent_dim, buffers)
        strategy = ClassAware(strategy, rows, report)
    elif cfg.class_aware == "auto":
        log(INFO, "class-aware aggregation off (class-aware 'auto'): %s",
            cfg.class_aware_blocker())
    strategy = Quorum(strategy, cfg)
    if not checks_claims and not cfg.private:
        strategy = WeightCap(strategy, cfg, report)
    claims = (sampler, partitions) if checks_claims and sampler and partitions else None
    screen_cfg = replace(cfg, max_update_norm_ratio=0.0) if cfg.private else cfg
    strategy = ReplyScreen(strategy, screen_cfg, reference, report, num_classes, claims)
    sampling = ClientSampling(strategy, cfg, sampler, report)
    if grid is not None:
        sampling.connect(grid, sink.absolute(1))
    return RunRounds(sampling, cfg, sink, report)
