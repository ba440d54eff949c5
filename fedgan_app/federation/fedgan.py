"""FedGAN: check every reply once, then let a Flower strategy aggregate.

FedGAN (Rasouli et al., 2020) averages each agent's generator and
discriminator every K local steps, weighting agent j by p_j = |R_j| / sum |R_k|:
Flower's FedAvg weighted by `num-examples`. `FedGAN` wraps any Flower strategy
(`self.strategy`, as Flower's differential-privacy wrappers do) and adds what a
server that cannot trust its clients needs: every reply is checked (keys,
shapes, dtypes, finite values, update norm, decodable metadata) and dropped
with a logged reason, once, before the inner strategy aggregates what is left.
Counts, per-reply rows and the server optimizer's state go to the recorder.

BatchNorm running statistics and counters are not gradients, and a server
optimizer's step on them is known to produce NaN (flwrlabs/flower#1060): the
inner strategy only ever sees the parameters. The wrapper aggregates the
buffers itself (their weighted mean, or their coordinate-wise median under a
robust rule, so an attacker cannot move them either) and merges both into the
global record with the model's own keys and dtypes.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedgan_app.config import ConfigError, RunConfig
from fedgan_app.federation.sampling import (
    EVALUATE_STREAM,
    TRAIN_STREAM,
    PartitionSampler,
    SampledGrid,
)
from fedgan_app.federation.weights import cap_weights
from fedgan_app.outputs.checkpoint import CheckpointError
from fedgan_app.protocol.metadata import (
    EVAL_MAX_IMAGES,
    MetadataError,
    TrainMetadata,
    clip_text,
    decode_metadata,
    short,
)

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
METADATA_RECORD_KEY = "metadata"
# Scalars every client reports; a reply with other keys would make Flower's
# metric averaging raise, so it is dropped instead.
CLIENT_METRIC_KEYS = frozenset(
    {"num-examples", "loss-d", "loss-g", "d-x", "d-gz", "wall-time-s", "images-per-s"}
)
# Rules that resist attackers: buffers take the coordinate-wise median under them.
ROBUST_STRATEGIES = frozenset({"median", "trimmed-mean", "krum", "multikrum", "bulyan"})
# Server-optimizer state Flower's strategies keep: FedOpt's moments (dicts keyed
# like the arrays), FedAvgM's momentum (a list in the arrays' order).
STATE_SLOTS = ("m_t", "v_t", "momentum_vector")


class RoundSink(Protocol):
    """Where the strategy pushes what it learns in a round (the Recorder)."""

    def absolute(self, local_round: int) -> int:
        """The run's round number of a round of this `Strategy.start`."""

    def record_train(self, server_round: int, row: dict[str, float],
                     clients: list[dict[str, Any]], strategy_state: dict[str, Any]) -> None:
        """Take a round's counts and metrics, its per-reply rows, the optimizer state."""

    def record_evaluate(self, server_round: int, row: dict[str, float]) -> None:
        """Take a round's aggregated client-evaluation metrics."""


def sampled_per_round(cfg: RunConfig, num_nodes: int) -> int:
    """Clients sampled each round (as Flower's FedAvg samples them)."""
    return max(int(num_nodes * cfg.fraction_train), 1)


def evaluated_per_round(cfg: RunConfig, num_nodes: int) -> int:
    """Clients asked for D's accuracy each round (as Flower's FedAvg samples them)."""
    return max(int(num_nodes * cfg.fraction_evaluate), 1)


def samples_clients(cfg: RunConfig) -> bool:
    """Whether some rounds take only a fraction of the clients (then seeded sampling)."""
    return cfg.fraction_train < 1 or 0 < cfg.fraction_evaluate < 1


def rule_min_replies(cfg: RunConfig) -> tuple[int, str]:
    """Fewest replies the aggregation rule needs, and the formula that says so."""
    f = cfg.num_malicious_clients
    if cfg.strategy in ("krum", "multikrum"):
        return 2 * f + 3, f"2f+3 = {2 * f + 3}"
    if cfg.strategy == "bulyan":
        return 4 * f + 3, f"4f+3 = {4 * f + 3}"
    return 1, "1"


def check_federation(cfg: RunConfig, num_nodes: int) -> None:
    """Raise ConfigError when no round of this federation could satisfy the rule.

    With no node connected yet (a deployment whose SuperNodes come later) there
    is nothing to check: each round then refuses what it cannot aggregate.
    """
    if num_nodes == 0:
        log(WARNING, "no node connected yet: the federation's size is not checked")
        return
    sampled = sampled_per_round(cfg, num_nodes)
    federation = (f"{sampled} clients are sampled per round ({num_nodes} nodes x "
                  f"fraction-train {cfg.fraction_train:g})")
    need, formula = rule_min_replies(cfg)
    if need > sampled:
        raise ConfigError(
            f"setting 'num-malicious-clients' is {cfg.num_malicious_clients}: strategy "
            f"'{cfg.strategy}' needs at least {formula} replies per round, but only "
            f"{federation}; lower num-malicious-clients or add clients"
        )
    if cfg.min_train_replies > sampled:
        raise ConfigError(
            f"setting 'min-train-replies' is {cfg.min_train_replies}, but only "
            f"{federation}: no round could update the model"
        )
    if cfg.strategy == "multikrum" and cfg.multikrum_select > sampled - cfg.num_malicious_clients:
        raise ConfigError(
            f"setting 'multikrum-select' is {cfg.multikrum_select}, more than the "
            f"{sampled - cfg.num_malicious_clients} honest replies multikrum can assume "
            f"({federation}, num-malicious-clients {cfg.num_malicious_clients})"
        )


def make_inner_strategy(cfg: RunConfig, num_nodes: int) -> Strategy:
    """Flower's strategy for the 'strategy' setting, with its documented settings.

    It sends to every node of the grid it is given: FedGAN samples (seeded) and
    gives it a grid of the sampled nodes.
    """
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0 if cfg.fraction_evaluate > 0 else 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": 1,
    }
    # eta_l (the clients' learning rate) is informational in Flower's FedOpt.
    fedopt = {"eta": cfg.server_eta, "eta_l": cfg.lr_generator, "tau": cfg.server_tau}
    betas = {"beta_1": cfg.server_beta1, "beta_2": cfg.server_beta2}
    f = cfg.num_malicious_clients
    select = cfg.multikrum_select or sampled_per_round(cfg, num_nodes) - f
    builders = {
        "fedavg": lambda: FedAvg(**common),
        "fedavgm": lambda: FedAvgM(**common, server_learning_rate=cfg.server_lr,
                                   server_momentum=cfg.server_momentum),
        "fedprox": lambda: FedProx(**common, proximal_mu=cfg.proximal_mu),
        "fedadam": lambda: FedAdam(**common, **fedopt, **betas),
        "fedadagrad": lambda: FedAdagrad(**common, **fedopt),
        "fedyogi": lambda: FedYogi(**common, **fedopt, **betas),
        "median": lambda: FedMedian(**common),
        "trimmed-mean": lambda: FedTrimmedAvg(**common, beta=cfg.trim_fraction),
        "krum": lambda: Krum(**common, num_malicious_nodes=f),
        "multikrum": lambda: MultiKrum(**common, num_malicious_nodes=f,
                                       num_nodes_to_select=max(1, select)),
        "bulyan": lambda: Bulyan(**common, num_malicious_nodes=f),
    }
    return builders[cfg.strategy]()


@dataclass
class _Screened:
    """The replies of one round after the checks."""

    accepted: list[Message] = field(default_factory=list)
    metas: list[TrainMetadata] = field(default_factory=list)
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # id(reply) -> row
    drops: dict[str, int] = field(default_factory=dict)  # reason kind -> count
    failed: int = 0
    # Each accepted reply's weight in the average (its examples, or its capped share).
    weights: list[float] = field(default_factory=list)
    capped: int = 0  # replies whose weight 'weight-check' = cap lowered

    def accept(self, msg: Message, meta: TrainMetadata) -> None:
        """Keep a reply that passed every check, weighted by its examples."""
        self.accepted.append(msg)
        self.metas.append(meta)
        self.weights.append(float(meta.num_examples))

    def drop(self, msg: Message, reason: str) -> None:
        """Count a dropped reply and say why in its row."""
        kind = reason.split(":", 1)[0]
        self.drops[kind] = self.drops.get(kind, 0) + 1
        self.rows[id(msg)].update(status="dropped", reason=reason)

    def keep(self, kept: Sequence[int]) -> None:
        """Keep only the accepted replies at the indices `kept`."""
        self.accepted = [self.accepted[i] for i in kept]
        self.metas = [self.metas[i] for i in kept]
        self.weights = [self.weights[i] for i in kept]

    def set_weights(self) -> None:
        """Fill in p_j = w_j / sum w of the accepted replies."""
        total = sum(self.weights)
        for msg, weight in zip(self.accepted, self.weights, strict=True):
            self.rows[id(msg)]["weight"] = weight / total


class FedGAN(Strategy):
    """Validation, norm screen and metadata around any Flower strategy.

    Parameters
    ----------
    strategy : Strategy
        The inner Flower strategy (built by `make_inner_strategy`: fraction
        1.0); it sends to the nodes FedGAN sampled and aggregates the
        parameters of the replies that passed every check.
    cfg : RunConfig
        The run's settings (schedule, checks, the rule's name).
    reference : ArrayRecord
        The packed global model as built: the keys, shapes and dtypes every
        reply must have, and the record the aggregate is cast back to.
    buffers : frozenset[str]
        Packed keys of the models' buffers (see `buffer_keys`): never given to
        the inner strategy.
    sink : RoundSink
        Takes each round's counts, per-reply rows and optimizer state (the
        Recorder); it also numbers the rounds.
    num_classes : int | None
        Classes of the run's dataset: every label histogram's length.
    partitions : Callable[[int], Sequence[Sequence[int]]] | None
        For 'weight-check' = partition-size: the label counts of each
        partition when the data is split into n partitions (the server's own
        copy of the partitioning). A reply must claim exactly its partition's.

    """

    def __init__(self, strategy: Strategy, cfg: RunConfig, reference: ArrayRecord,
                 buffers: frozenset[str], sink: RoundSink, num_classes: int | None = None,
                 partitions: Callable[[int], Sequence[Sequence[int]]] | None = None) -> None:
        if cfg.weight_check == "partition-size" and partitions is None:
            raise ValueError("weight-check 'partition-size' needs the partitions' label "
                             "counts (partitions=...)")
        self.strategy = strategy
        self.cfg = cfg
        self.sink = sink
        self.num_classes = num_classes
        self.partitions = partitions
        # Expected key -> (shape, dtype), from the freshly built models.
        self._expected = {k: (tuple(a.shape), str(a.dtype)) for k, a in reference.items()}
        self._buffers = buffers & set(self._expected)
        self._params = [k for k in self._expected if k not in self._buffers]
        self._global: dict[str, np.ndarray] = {}
        self._sent = 0
        self._sent_messages: list[Message] = []
        self._sent_at = time.perf_counter()
        self._validations = 0  # checks run this round: one per reply, never more
        # Which node holds which partition: for seeded sampling when a round takes
        # only some clients, and for checking each claim against its partition.
        self.sampler = (PartitionSampler(cfg.seed, cfg.round_timeout)
                        if samples_clients(cfg) or partitions is not None else None)
        self._query_s = 0.0

    def summary(self) -> None:
        """Log the wrapper's checks, then the inner strategy's settings."""
        log(INFO, "\t├──> FedGAN checks: keys, shapes, dtypes, finite values, metadata "
            "(max %d bytes), update norm (ratio %g), min-train-replies %d",
            self.cfg.max_metadata_bytes, self.cfg.max_update_norm_ratio,
            self.cfg.min_train_replies)
        if self.partitions is not None:
            log(INFO, "\t├──> weights: each claim must equal its node's partition "
                "(weight-check partition-size)")
        else:
            log(INFO, "\t├──> weights: claims clipped to %g x the median claim, shares "
                "capped at %g (weight-check cap)", self.cfg.weight_cap_ratio,
                self.cfg.max_weight_share)
        log(INFO, "\t├──> inner strategy %s on %d parameter arrays; %d buffers %s",
            type(self.strategy).__name__, len(self._params), len(self._buffers),
            "by median" if self.cfg.strategy in ROBUST_STRATEGIES else "by weighted mean")
        if self.sampler is not None:
            log(INFO, "\t├──> seeded sampling by partition: fraction-train %g, "
                "fraction-evaluate %g (the inner strategy sends to the sampled nodes)",
                self.cfg.fraction_train, self.cfg.fraction_evaluate)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global G and D with this round's schedule and settings."""
        server_round = self.sink.absolute(server_round)
        lr_g, lr_d = self.cfg.lr_at(server_round)
        config = ConfigRecord({
            "lr-generator": lr_g, "lr-discriminator": lr_d,
            "local-steps": self.cfg.local_steps, "batch-size": self.cfg.batch_size,
            "seed": self.cfg.seed,
        })
        # Kept to measure each client's update against it.
        self._global = {k: v.numpy() for k, v in arrays.items()}
        # The round's nodes (seeded, by partition), then the inner strategy keeps
        # the parameters it will step from; every client gets the whole model.
        self._query_s = 0.0
        if self.cfg.fraction_train < 1:
            grid = self._sampled_grid(grid, server_round, sampled_per_round, TRAIN_STREAM)
        elif self.sampler is not None:  # only client evaluation samples: learn now
            self._query_s = self.sampler.learn(grid, list(grid.get_node_ids()),
                                               server_round)
        params = ArrayRecord({k: arrays[k] for k in self._params})
        # No node answered the partition query: nothing is sent, the round is refused.
        messages = ([] if isinstance(grid, SampledGrid) and not grid.node_ids else
                    list(self.strategy.configure_train(server_round, params, config, grid)))
        for msg in messages:
            msg.content[ARRAYS_KEY] = arrays
        # Kept to count replies missing after the timeout, and to name the node of an
        # error reply the SuperLink writes itself (its source is the SuperLink).
        self._sent_messages = messages
        self._sent = len(messages)
        self._sent_at = time.perf_counter()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply once, then let the inner strategy aggregate the rest."""
        server_round = self.sink.absolute(server_round)
        started = time.perf_counter()
        replies = list(replies)
        screened = self._screen(server_round, replies)
        if self.partitions is None:
            self._cap_weights(server_round, screened)
        refusal = self._refusal(len(screened.accepted))
        arrays, metrics = None, None
        if refusal is None:
            arrays, metrics, refusal = self._aggregate(server_round, screened)
        if refusal is None:
            screened.set_weights()
        else:
            log(WARNING, "round %d: %s; keeping the previous global model", server_round,
                refusal)
        row = {k: float(v) for k, v in (metrics or {}).items()}
        row.update({
            "replies-accepted": len(screened.accepted),
            "replies-dropped": sum(screened.drops.values()),
            "replies-failed": screened.failed,
            "replies-missing": max(0, self._sent - len(replies)),
            "replies-validated": self._validations,
            # The examples the average counted (capped claims count as capped).
            "num-examples-total": sum(screened.weights),
            "weights-capped": screened.capped,
            "model-updated": int(refusal is None),
            **{f"dropped-{kind}": n for kind, n in screened.drops.items()},
            # Seconds from sending the model to having every reply (clients, Flower
            # messaging, idle slots), and of the checks and the aggregation.
            "time-clients-s": started - self._sent_at,
            "time-aggregate-s": time.perf_counter() - started,
            # Seconds configure_train spent asking new nodes for their partition.
            "time-query-s": self._query_s,
        })
        self.sink.record_train(server_round, {k: float(v) for k, v in row.items()},
                               list(screened.rows.values()), self.state())
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask clients for D's accuracy on the global model, in the rounds that score it.

        Only in rounds with quality metrics: a client evaluation is a round trip
        to the clients, which cost ~0.5 s of every 8-s round on 2 cores.
        """
        server_round = self.sink.absolute(server_round)
        if not self.cfg.scores_round(server_round):
            return []
        if 0 < self.cfg.fraction_evaluate < 1:
            grid = self._sampled_grid(grid, server_round, evaluated_per_round,
                                      EVALUATE_STREAM)
            if not grid.node_ids:
                return []
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average clients' D accuracy; drop malformed replies instead of failing."""
        server_round = self.sink.absolute(server_round)
        valid = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                usable = _valid_evaluate_reply(msg)
            except Exception:  # noqa: BLE001 - a hostile reply must not stop the round
                usable = False
            if usable:
                valid.append(msg)
            else:
                log(WARNING, "round %d: dropped evaluate reply from node %d",
                    server_round, msg.metadata.src_node_id)
        metrics = self.strategy.aggregate_evaluate(server_round, valid) if valid else None
        if metrics is not None:
            self.sink.record_evaluate(server_round,
                                      {"client-d-accuracy": float(metrics["d-accuracy"])})
        return metrics

    def state(self) -> dict[str, Any]:
        """The inner strategy's server-optimizer state as checkpoint values ({}: none)."""
        state: dict[str, Any] = {}
        for slot in STATE_SLOTS:
            value = getattr(self.strategy, slot, None)
            if isinstance(value, dict):
                items = list(value.items())
            elif isinstance(value, list):
                items = list(zip(self._params, value, strict=True))
            else:
                continue
            state.update({f"{slot}/{key}": torch.from_numpy(np.array(array, copy=True))
                          for key, array in items})
        if state:
            state["strategy"] = self.cfg.strategy
        return state

    def load_state(self, state: Mapping[str, Any], source: Path | str) -> None:
        """Restore a checkpoint's optimizer state; CheckpointError if it does not fit."""
        if not state:
            return
        if state.get("strategy") != self.cfg.strategy:
            log(WARNING, "ignoring the server optimizer state of strategy %r in %s: "
                "this run uses strategy %r", state.get("strategy"), source,
                self.cfg.strategy)
            return
        restored: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            slot, _, name = key.partition("/")
            if key == "strategy":
                continue
            if (slot not in STATE_SLOTS or not hasattr(self.strategy, slot)
                    or name not in self._params or not isinstance(value, torch.Tensor)
                    or tuple(value.shape) != self._expected[name][0]):
                raise CheckpointError(
                    f"checkpoint {source}: server optimizer state {key!r} does not fit "
                    "this run's models"
                )
            restored.setdefault(slot, {})[name] = value.numpy()
        for slot, values in restored.items():
            if set(values) != set(self._params):
                raise CheckpointError(
                    f"checkpoint {source}: server optimizer state '{slot}' covers "
                    f"{len(values)} of the {len(self._params)} parameter arrays"
                )
            ordered = {k: values[k] for k in self._params}
            setattr(self.strategy, slot,
                    list(ordered.values()) if slot == "momentum_vector" else ordered)
        log(INFO, "restored the %s server optimizer state (%s) from %s", self.cfg.strategy,
            ", ".join(restored), source)

    def _sampled_grid(self, grid: Grid, server_round: int,
                      per_round: Callable[[RunConfig, int], int],
                      stream: int) -> SampledGrid:
        """The grid of this round's seeded sample of partitions (new nodes asked first)."""
        assert self.sampler is not None
        # Nobody to ask yet: wait for a node, as Flower's own sampling does.
        while not (connected := list(grid.get_node_ids())):
            log(INFO, "round %d: waiting for nodes to connect", server_round)
            time.sleep(1)
        self._query_s += self.sampler.learn(grid, connected, server_round)
        nodes = self.sampler.sample(connected, server_round,
                                    per_round(self.cfg, len(connected)), stream)
        return SampledGrid(grid, nodes)

    def _screen(self, server_round: int, replies: list[Message]) -> _Screened:
        """Validate each reply once, then screen update norms; one row per reply.

        Any exception while handling one reply is that reply's failure: it is
        dropped, counted and logged once, and the round goes on.
        """
        screened = _Screened()
        self._validations = 0
        trained: dict[int, int] = {}  # partition -> the node whose reply was accepted
        for msg in replies:
            try:
                self._screen_one(server_round, msg, screened, trained)
            except Exception as exc:  # noqa: BLE001 - a hostile reply must not stop the round
                screened.rows.setdefault(id(msg), _base_row(msg))
                self._drop(server_round, screened, msg,
                           f"error: {type(exc).__name__} while checking the reply")
        self._screen_norms(server_round, screened)
        return screened

    def _screen_one(self, server_round: int, msg: Message, screened: _Screened,
                    trained: dict[int, int]) -> None:
        """Check one reply: accept it, or drop it with a reason."""
        if msg.has_error():
            screened.failed += 1
            node = self._node_of_error(msg)
            screened.rows[id(msg)] = _failed_row(msg, node)
            log(WARNING, "round %d: node %d failed: %s", server_round, node,
                clip_text(msg.error.reason))
            return
        screened.rows[id(msg)] = _base_row(msg)
        meta, reason = self._validate(msg, server_round)
        if reason is None and meta is not None:
            holder = trained.get(meta.partition_id)
            if holder is not None:
                reason = (f"partition: partition {meta.partition_id} is already trained by "
                          f"node {holder} this round")
        if meta is not None:
            screened.rows[id(msg)] = _client_row(msg, meta)
        if reason is not None or meta is None:
            self._drop(server_round, screened, msg, reason or "metadata: missing")
            return
        trained[meta.partition_id] = msg.metadata.src_node_id
        screened.accept(msg, meta)

    def _drop(self, server_round: int, screened: _Screened, msg: Message,
              reason: str) -> None:
        """Drop a reply: count it, say why in its row, log it once."""
        screened.drop(msg, reason)
        log(WARNING, "round %d: dropped reply from node %d: %s", server_round,
            msg.metadata.src_node_id, reason)

    def _node_of_error(self, msg: Message) -> int:
        """The node an error reply stands for.

        When a node vanishes, the SuperLink answers in its place, with its own id
        as the source; the message the reply answers names the node.
        """
        answered = msg.metadata.reply_to_message_id
        if msg.metadata.src_node_id != SUPERLINK_NODE_ID or not answered:
            return msg.metadata.src_node_id
        for sent in self._sent_messages:
            if sent.metadata.message_id == answered:
                return sent.metadata.dst_node_id
        return msg.metadata.src_node_id

    def _validate(self, msg: Message,
                  server_round: int) -> tuple[TrainMetadata | None, str | None]:
        """Return (metadata, None) for a usable reply, else (metadata or None, reason)."""
        self._validations += 1
        content = msg.content
        if set(content.array_records) != {ARRAYS_KEY}:
            return None, f"records: expected one ArrayRecord '{ARRAYS_KEY}'"
        if set(content.metric_records) != {METRICS_KEY}:
            return None, f"records: expected one MetricRecord '{METRICS_KEY}'"
        metrics = content.metric_records[METRICS_KEY]
        if set(metrics) != CLIENT_METRIC_KEYS:
            return None, (f"metrics: keys differ from the expected {len(CLIENT_METRIC_KEYS)} "
                          f"(unexpected: {short(sorted(set(metrics) - CLIENT_METRIC_KEYS))})")
        for key, value in metrics.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                return None, f"metrics: '{key}' is not a finite number"
        num_examples = metrics["num-examples"]
        if num_examples <= 0:
            return None, f"metrics: num-examples must be > 0, got {short(num_examples)}"
        reason = self._check_arrays(content.array_records[ARRAYS_KEY])
        if reason is not None:
            return None, reason
        try:
            meta = decode_metadata(content.config_records.get(METADATA_RECORD_KEY),
                                   self.cfg.max_metadata_bytes, self.num_classes)
        except MetadataError as exc:
            return None, f"metadata: {exc}"
        if meta.num_examples != num_examples:
            return meta, (f"metadata: num_examples {meta.num_examples} != "
                          f"num-examples metric {short(num_examples)}")
        if meta.server_round != server_round:
            return meta, (f"round: the reply is for round {meta.server_round}, this is "
                          f"round {server_round}")
        return meta, self._check_partition(msg.metadata.src_node_id, meta)

    def _check_partition(self, node: int, meta: TrainMetadata) -> str | None:
        """Why a reply's claims do not match its node's partition (None: they do, or no check).

        With 'weight-check' = partition-size the server knows each partition's
        label counts: a claim of more (or other) examples than the node's
        partition holds would buy a larger share of the average.
        """
        if self.partitions is None or self.sampler is None:
            return None
        claim = self.sampler.claims.get(node)
        if claim is None:
            why = self.sampler.refused.get(node, "it did not answer the partition query")
            return f"partition: node {node} has no partition of its own ({why})"
        if meta.partition_id != claim:
            return (f"partition: the reply is for partition {meta.partition_id}, node {node} "
                    f"holds partition {claim}")
        assert self.sampler.num_partitions is not None  # set with the first claim
        counts = list(self.partitions(self.sampler.num_partitions)[claim])
        if meta.num_examples != sum(counts):
            return (f"weight: claims {meta.num_examples} examples, partition {claim} holds "
                    f"{sum(counts)}")
        if meta.label_histogram != counts:
            return f"weight: the label counts differ from partition {claim}'s"
        return None

    def _check_arrays(self, arrays: ArrayRecord) -> str | None:
        """Reason the arrays do not fit the model, or None when they do."""
        keys = set(arrays)
        if keys != set(self._expected):
            missing = sorted(set(self._expected) - keys)[:3]
            extra = sorted(keys - set(self._expected))[:3]
            return f"keys: missing {short(missing)}, unexpected {short(extra)}"
        for key, (shape, dtype) in self._expected.items():
            array = arrays[key]
            if tuple(array.shape) != shape:
                return f"shape: '{key}' is {short(tuple(array.shape))}, expected {shape}"
            if str(array.dtype) != dtype:
                return f"dtype: '{key}' is {short(array.dtype)}, expected {dtype}"
            reason = _npy_reason(array, shape, np.dtype(dtype))
            if reason is not None:
                return f"data: '{key}' {reason}"
            if not np.isfinite(array.numpy()).all():
                return f"non-finite: '{key}' has NaN or Inf"
        return None

    def _screen_norms(self, server_round: int, screened: _Screened) -> None:
        """Drop updates whose norm is far beyond the median client's."""
        ratio = self.cfg.max_update_norm_ratio
        if ratio == 0 or len(screened.accepted) < 3 or not self._global:
            return
        norms = [_update_norm(m.content[ARRAYS_KEY], self._global) for m in screened.accepted]
        limit = ratio * statistics.median(norms)
        for msg, norm in zip(screened.accepted, norms, strict=True):
            if norm > limit > 0:
                self._drop(server_round, screened, msg, f"norm: update norm {norm:.3g} > "
                           f"{ratio:g} x median {limit / ratio:.3g}")
        screened.keep([i for i, norm in enumerate(norms) if not norm > limit > 0])

    def _cap_weights(self, server_round: int, screened: _Screened) -> None:
        """'weight-check' = cap: clip claims to a multiple of the median, cap each share."""
        shares, capped = cap_weights(screened.weights, self.cfg.weight_cap_ratio,
                                     self.cfg.max_weight_share)
        if not capped:
            return
        total = sum(screened.weights)
        screened.weights = [share * total for share in shares]
        screened.capped = capped
        log(WARNING, "round %d: capped the weight of %d replies (claims above %g x the "
            "median claim, shares above %g)", server_round, capped,
            self.cfg.weight_cap_ratio, self.cfg.max_weight_share)

    def _refusal(self, num_accepted: int) -> str | None:
        """Why this round cannot update the model with these replies, or None."""
        if num_accepted < self.cfg.min_train_replies:
            return (f"{num_accepted} valid replies < min-train-replies="
                    f"{self.cfg.min_train_replies}")
        need, formula = rule_min_replies(self.cfg)
        if num_accepted < need:
            return (f"strategy '{self.cfg.strategy}' needs at least {formula} valid "
                    f"replies (num-malicious-clients="
                    f"{self.cfg.num_malicious_clients}), got {num_accepted}")
        return None

    def _aggregate(
        self, server_round: int, screened: _Screened
    ) -> tuple[ArrayRecord | None, MetricRecord | None, str | None]:
        """Buffers here, parameters by the inner strategy; merged, cast and checked."""
        records = [m.content[ARRAYS_KEY] for m in screened.accepted]
        buffers = self._aggregate_buffers(records, screened.weights)
        for msg, record, weight in zip(screened.accepted, records, screened.weights,
                                       strict=True):
            # The replies are ours once checked: the inner strategy sees parameters
            # only, weighted by what the checks allow.
            msg.content[ARRAYS_KEY] = ArrayRecord({k: record[k] for k in self._params})
            msg.content[METRICS_KEY]["num-examples"] = weight
        params, metrics = self.strategy.aggregate_train(server_round, screened.accepted)
        if params is None:
            return None, None, f"strategy '{self.cfg.strategy}' returned no model"
        merged = {}
        for key, (_, dtype) in self._expected.items():
            value = buffers[key] if key in buffers else params[key].numpy()
            merged[key] = _cast(value, np.dtype(dtype))
        bad = [k for k, v in merged.items() if not np.isfinite(v).all()]
        if bad:
            return None, None, (f"strategy '{self.cfg.strategy}' produced NaN or Inf in "
                                f"{len(bad)} arrays (first: '{bad[0]}')")
        return ArrayRecord({k: Array(v) for k, v in merged.items()}), metrics, None

    def _aggregate_buffers(self, records: list[ArrayRecord],
                           num_examples: list[float]) -> dict[str, np.ndarray]:
        """Buffers of the accepted replies: weighted mean, or median under a robust rule."""
        if self.cfg.strategy in ROBUST_STRATEGIES:
            return {k: np.median(np.stack([r[k].numpy() for r in records]), axis=0)
                    for k in self._buffers}
        # FedAvg's arithmetic (Flower's aggregate_arrayrecords), so fedavg is unchanged.
        total = sum(num_examples)
        weights = [n / total for n in num_examples]
        out: dict[str, np.ndarray] = {}
        for record, weight in zip(records, weights, strict=True):
            for key in self._buffers:
                value = record[key].numpy() * weight
                out[key] = value if key not in out else out[key] + value
        return out


def _cast(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast an aggregate back to the model's dtype (integer counters are rounded)."""
    value = np.asarray(value)
    if np.issubdtype(dtype, np.integer):
        value = np.rint(value)
    return np.asarray(value.astype(dtype, copy=False))  # 0-d stays an array


def _npy_reason(array: Array, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why an Array's bytes are not the .npy of `shape` and `dtype` (None: they are).

    An Array's shape and dtype are metadata beside its bytes; `numpy()` trusts
    the .npy header inside the bytes, which could declare a far larger array.
    The header is read first, so decoding costs what the bytes hold.
    """
    if array.stype != "numpy.ndarray":
        return f"is serialized as {short(array.stype)}, not numpy.ndarray"
    data = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(data)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            return f"is in .npy format {short(version)}"
        header_shape, _, header_dtype = read_header(data)
    except ValueError as exc:
        return f"has no valid .npy header ({short(str(exc))})"
    if tuple(header_shape) != shape or header_dtype != dtype:
        return (f"holds {short(tuple(header_shape))} {short(str(header_dtype))} while its "
                f"metadata says {shape} {dtype}")
    expected = data.tell() + math.prod(shape) * dtype.itemsize
    if len(array.data) != expected:
        return f"has {len(array.data)} bytes, expected {expected}"
    return None


def _valid_evaluate_reply(msg: Message) -> bool:
    """Whether an evaluate reply holds num-examples in 1..EVAL_MAX_IMAGES and an accuracy.

    The bound keeps one client's claim from outweighing the others' in the average.
    """
    records = msg.content.metric_records
    metrics = records.get(METRICS_KEY) if len(records) == 1 else None
    return (
        metrics is not None
        and set(metrics) == {"num-examples", "d-accuracy"}
        and all(isinstance(v, int | float) and math.isfinite(v) and v >= 0
                for v in metrics.values())
        and 0 < metrics["num-examples"] <= EVAL_MAX_IMAGES
    )


def _update_norm(arrays: ArrayRecord, global_arrays: dict[str, np.ndarray]) -> float:
    """L2 norm of (client - global) over floating-point arrays."""
    total = 0.0
    for key, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating):
            diff = values.astype(np.float64) - global_arrays[key].astype(np.float64)
            total += float(np.square(diff).sum())
    return math.sqrt(total)


def _base_row(msg: Message) -> dict[str, Any]:
    """The clients.csv row of a reply before its metadata is known.

    Status starts as accepted with weight 0: a drop or the final weights update it.
    """
    return {"node-id": msg.metadata.src_node_id, "status": "accepted", "reason": "",
            "weight": 0.0}


def _client_row(msg: Message, meta: TrainMetadata) -> dict[str, Any]:
    """One clients.csv row of a reply whose metadata decoded (every value checked)."""
    row = _base_row(msg)
    tail = max(1, min(10, meta.steps))
    row.update({
        "partition-id": meta.partition_id,
        "num-examples": meta.num_examples,
        "steps": meta.steps,
        "loss-d": _mean(meta.loss_d[-tail:]),
        "loss-g": _mean(meta.loss_g[-tail:]),
        "d-x": _mean(meta.d_x[-tail:]),
        "d-gz": _mean(meta.d_gz[-tail:]),
        "wall-time-s": meta.wall_time_s,
        "converged": int(meta.converged),
        "classes": sum(1 for n in meta.label_histogram if n > 0),
        "label-histogram": ";".join(str(n) for n in meta.label_histogram),
        "device": meta.device,
    })
    return row


def _failed_row(msg: Message, node_id: int) -> dict[str, Any]:
    """The clients.csv row of an error reply: only its node id is known."""
    return {"node-id": node_id, "status": "failed",
            "reason": f"error: {clip_text(msg.error.reason)}", "weight": 0.0}


def _mean(values: list[float]) -> float:
    """Mean of a list (NaN for an empty one)."""
    return float(sum(values) / len(values)) if values else float("nan")
