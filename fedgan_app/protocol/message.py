"""The client-server message: record keys, metric names, the round's config, model packing.

One round's messages, and where each name is defined here:

- **train request** (server -> client): ``arrays`` (G and D packed by
  `pack_gan` into one ArrayRecord, buffers included) and ``config`` (a
  `RoundConfig`: round, scheduled learning rates, local steps, batch size,
  seed, FedProx's ``proximal-mu`` when that rule is used, and
  ``clipping_norm``, the key Flower's client-side DP wrapper adds, with
  'dp' = 'client-fixed').
- **train reply**: ``arrays`` (the trained pair), ``metrics`` (`TrainMetrics`:
  per-step means and ``num-examples``, the weight Flower's FedAvg reads) and
  ``metadata`` (the pickled `TrainMetadata`, decoded by
  `fedgan_app.protocol.metadata` under bounds).
- **evaluate request / reply**: the arrays and the round; the reply's
  ``metrics`` hold ``num-examples`` and ``d-accuracy``.
- **query request / reply**: an empty request; the reply's ConfigRecord
  ``partition`` says which partition the node holds, of how many
  (``partition-id``, ``num-partitions``: the node_config keys).

Flower's strategies are built with these keys (`fedgan_app.federation.rules`),
so nothing else spells them. No file I/O here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import get_args, get_type_hints

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from torch import nn

ARRAYS_KEY = "arrays"  # the packed G and D, in requests and train replies
METRICS_KEY = "metrics"  # the reply's scalars
METADATA_RECORD_KEY = "metadata"  # the train reply's pickled TrainMetadata
CONFIG_KEY = "config"  # the request's per-round values (a RoundConfig)
NUM_EXAMPLES = "num-examples"  # the metric Flower's strategies weight replies by
D_ACCURACY = "d-accuracy"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # FedProx adds it to the round's config
QUERY_RECORD_KEY = "partition"  # the ConfigRecord of a query reply
PARTITION_ID = "partition-id"  # in a node's node_config and in its query reply
NUM_PARTITIONS = "num-partitions"
# Keys of G's and D's entries in a packed state (and in every checkpoint).
G_PREFIX = "generator."
D_PREFIX = "discriminator."


class MessageError(ValueError):
    """A record of the message lacks a key or holds a value of the wrong type."""


def _kebab(name: str) -> str:
    """A field name as the message spells it (snake_case -> kebab-case)."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class RoundConfig:
    """The ConfigRecord a train request carries: this round's values from the server.

    Attributes
    ----------
    server_round : int
        The run's round number (a resumed run counts on).
    lr_generator, lr_discriminator : float
        The scheduled learning rates of this round.
    local_steps : int
        FedGAN's K: local adversarial steps.
    batch_size : int
        Images per local step.
    seed : int
        The run's seed; a client seeds its RNG from (seed, round, partition).
    proximal_mu : float | None
        FedProx's mu, which Flower's FedProx adds; None: not sent.

    """

    server_round: int
    lr_generator: float
    lr_discriminator: float
    local_steps: int
    batch_size: int
    seed: int
    proximal_mu: float | None = None

    def to_record(self) -> ConfigRecord:
        """The ConfigRecord, kebab-case keys (``proximal-mu`` only when set)."""
        return ConfigRecord({_kebab(k): v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> RoundConfig:
        """Read a round's config; MessageError naming the key when one is missing or mistyped."""
        hints = get_type_hints(cls)
        kinds = {name: float if float in (hint, *get_args(hint)) else int
                 for name, hint in hints.items()}
        values: dict[str, object] = {}
        for item in fields(cls):
            key = _kebab(item.name)
            if key not in record:
                if item.name == "proximal_mu":
                    continue
                raise MessageError(f"the round's config has no '{key}'")
            values[item.name] = _checked(key, record[key], kinds[item.name])
        config = cls(**values)  # type: ignore[arg-type]
        if config.local_steps < 1 or config.batch_size < 1:
            raise MessageError("the round's config needs local-steps and batch-size >= 1")
        return config


def _checked(key: str, value: object, kind: type) -> int | float:
    """A record value of `kind` (an int is a float too; a bool is neither), else MessageError."""
    ok = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if not ok or isinstance(value, bool) or (kind is float and not math.isfinite(value)):
        want = "a finite number" if kind is float else "an integer"
        raise MessageError(f"the round's config '{key}' must be {want}, got "
                           f"{type(value).__name__}")
    return kind(value)


def clipping_norm_of(record: Mapping[str, object]) -> float | None:
    """The norm a client clips its update to ('client-fixed'), or None when not asked."""
    if KEY_CLIPPING_NORM not in record:
        return None
    norm = _checked(KEY_CLIPPING_NORM, record[KEY_CLIPPING_NORM], float)
    if norm <= 0:
        raise MessageError(f"the round's config '{KEY_CLIPPING_NORM}' must be > 0, "
                           f"got {norm}")
    return float(norm)


def server_round_of(record: Mapping[str, object]) -> int:
    """The round an evaluate request is for (its config holds only ``server-round``)."""
    if SERVER_ROUND not in record:
        raise MessageError(f"the round's config has no '{SERVER_ROUND}'")
    return int(_checked(SERVER_ROUND, record[SERVER_ROUND], int))


@dataclass(frozen=True)
class TrainMetrics:
    """The scalars of a train reply: per-step means and the examples it trained on."""

    num_examples: int
    loss_d: float
    loss_g: float
    d_x: float  # mean sigmoid(D(x)) on real batches
    d_gz: float  # mean sigmoid(D(G(z))) on fakes, before G's update
    wall_time_s: float
    images_per_s: float

    def to_record(self) -> MetricRecord:
        """The reply's MetricRecord, kebab-case keys."""
        return MetricRecord({_kebab(k): v for k, v in asdict(self).items()})


# Every train reply has exactly these metrics: other keys would make Flower's metric
# averaging raise, so the server drops such a reply instead.
TRAIN_METRIC_KEYS = frozenset(_kebab(f.name) for f in fields(TrainMetrics))
EVALUATE_METRIC_KEYS = frozenset({NUM_EXAMPLES, D_ACCURACY})


def mean(values: Sequence[float]) -> float:
    """The mean of a history (NaN for an empty one, which no honest client sends)."""
    return float(sum(values) / len(values)) if values else float("nan")


def train_reply(msg: Message, arrays: ArrayRecord, metrics: TrainMetrics,
                metadata: ConfigRecord) -> Message:
    """A client's reply to a train request: the trained pair, its scalars, its metadata."""
    content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics.to_record(),
                          METADATA_RECORD_KEY: metadata})
    return Message(content=content, reply_to=msg)


def evaluate_reply(msg: Message, num_examples: int, accuracy: float) -> Message:
    """A client's reply to an evaluate request: D's accuracy on this many images."""
    metrics = MetricRecord({NUM_EXAMPLES: num_examples, D_ACCURACY: accuracy})
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


def query_reply(msg: Message, partition_id: int, num_partitions: int) -> Message:
    """A node's answer to a query: the partition it holds, of how many."""
    record = ConfigRecord({PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions})
    return Message(content=RecordDict({QUERY_RECORD_KEY: record}), reply_to=msg)


def read_query_reply(reply: Message) -> tuple[tuple[int, int] | None, str]:
    """(partition id, num partitions) of a query reply, or (None, why it is unusable)."""
    record = reply.content.config_records.get(QUERY_RECORD_KEY)
    if record is None or set(record) != {PARTITION_ID, NUM_PARTITIONS}:
        return None, (f"its answer is not a ConfigRecord '{QUERY_RECORD_KEY}' with "
                      f"{PARTITION_ID} and {NUM_PARTITIONS}")
    values = (record[PARTITION_ID], record[NUM_PARTITIONS])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None, f"{PARTITION_ID} and {NUM_PARTITIONS} must be integers, got {values}"
    if values[1] < 1:
        return None, f"{NUM_PARTITIONS} must be >= 1, got {values[1]}"
    return values, ""


# --- model packing: G and D in one ArrayRecord ------------------------------------


def pack_gan(generator: nn.Module, discriminator: nn.Module) -> ArrayRecord:
    """Put both full state_dicts (BatchNorm buffers too) into one ArrayRecord."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for prefix, net in ((G_PREFIX, generator), (D_PREFIX, discriminator)):
        for key, tensor in net.state_dict().items():
            # contiguous: a channels_last copy serialises in the standard layout
            state[prefix + key] = tensor.detach().cpu().contiguous()
    return ArrayRecord(state)


def split_state(
    state: Mapping[str, torch.Tensor],
) -> tuple[OrderedDict[str, torch.Tensor], OrderedDict[str, torch.Tensor]]:
    """Split a packed state_dict into the generator's and the discriminator's."""
    g_state: OrderedDict[str, torch.Tensor] = OrderedDict()
    d_state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, tensor in state.items():
        if key.startswith(G_PREFIX):
            g_state[key[len(G_PREFIX):]] = tensor
        elif key.startswith(D_PREFIX):
            d_state[key[len(D_PREFIX):]] = tensor
        else:
            raise KeyError(f"array key {key!r} has neither prefix {G_PREFIX!r} nor "
                           f"{D_PREFIX!r}")
    return g_state, d_state


def unpack_gan(
    arrays: ArrayRecord, generator: nn.Module, discriminator: nn.Module
) -> None:
    """Load a packed ArrayRecord into G and D in place (strict: keys must match)."""
    g_state, d_state = split_state(arrays.to_torch_state_dict())
    # load_state_dict casts averaged float64 num_batches_tracked back to int64.
    generator.load_state_dict(g_state, strict=True)
    discriminator.load_state_dict(d_state, strict=True)


def buffer_keys(generator: nn.Module, discriminator: nn.Module) -> frozenset[str]:
    """Packed keys of buffers (BatchNorm statistics, spectral-norm vectors): not gradients."""
    return frozenset(
        prefix + name
        for prefix, net in ((G_PREFIX, generator), (D_PREFIX, discriminator))
        for name, _ in net.named_buffers()
    )
