"""ClientApp: a FedGAN agent trains G and D on its own partition each round.

`train` reads as Flower's quickstart does: read the request, build the
agent, restore what this node keeps between rounds, train K local steps,
save, reply. Every key of the message is `fedgan_app.protocol.message`'s.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from contextlib import nullcontext
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedgan_app.config import RunConfig
from fedgan_app.data.prepared import batch_iterator, load_partition
from fedgan_app.data.spec import ImageData, partition_spec
from fedgan_app.federation.cores import CoreShare
from fedgan_app.gan.models import (
    Discriminator,
    Generator,
    batchnorm_stat_keys,
    gan_config,
    pick_device,
)
from fedgan_app.gan.training import (
    Agent,
    LocalRound,
    LocalStats,
    StepRecipe,
    derive_seed,
    discriminator_accuracy,
    make_optimizers,
    set_lr,
    set_torch_threads,
    to_channels_last,
    train_gan,
)
from fedgan_app.privacy.clipping import clip_update
from fedgan_app.protocol.message import (
    ARRAYS_KEY,
    CONFIG_KEY,
    NUM_PARTITIONS,
    PARTITION_ID,
    RoundConfig,
    TrainMetrics,
    buffer_keys,
    clipping_norm_of,
    evaluate_reply,
    mean,
    pack_gan,
    query_reply,
    server_round_of,
    split_state,
    train_reply,
    unpack_gan,
)
from fedgan_app.protocol.metadata import (
    EVAL_MAX_IMAGES,
    TrainMetadata,
    encode_metadata,
    has_converged,
)

app = ClientApp()

OPT_KEYS = {"g": "adam-generator", "d": "adam-discriminator"}
BN_STATE_KEY = "batchnorm-statistics"  # this node's own BN statistics (batchnorm='local')


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received G and D for K local steps and reply with both."""
    # Read: the run's settings, this round's values from the server, the partition.
    cfg = RunConfig.from_run_config(context.run_config)
    round_cfg = RoundConfig.from_record(msg.content[CONFIG_KEY])
    partition_id, data = _load_local_data(cfg, context)
    device = pick_device(cfg.device)
    set_torch_threads(cfg.client_threads or None)

    # Build: G and D from the global arrays, Adam at the round's scheduled rates.
    generator, discriminator = _build_models(cfg, data, msg.content[ARRAYS_KEY], device)
    agent = Agent(generator, discriminator, *make_optimizers(
        generator, discriminator, round_cfg.lr_generator, round_cfg.lr_discriminator,
        (cfg.adam_beta1, cfg.adam_beta2)))

    # Restore: this node's Adam state and, with batchnorm='local', its BN statistics.
    _restore_node_state(cfg, context, agent, round_cfg)

    # Train: K local steps, RNG from (seed, round, partition id).
    stats = _train_locally(cfg, context, agent, data, round_cfg, partition_id, device)

    # Save: what this node keeps until its next round.
    _save_node_state(cfg, context, agent)

    # Reply: both nets, scalar metrics and the metadata.
    log(INFO, "client %d round %d: %d steps in %.1fs, loss D %.3f G %.3f", partition_id,
        round_cfg.server_round, stats.steps, stats.wall_time_s, mean(stats.loss_d),
        mean(stats.loss_g))
    meta = _metadata(stats, data, partition_id, round_cfg.server_round, device)
    arrays = pack_gan(generator, discriminator)
    clipping_norm = clipping_norm_of(msg.content[CONFIG_KEY])
    if clipping_norm is not None:  # dp = 'client-fixed': the update leaves clipped
        arrays, norm = clip_update(arrays, msg.content[ARRAYS_KEY],
                                   buffer_keys(generator, discriminator), clipping_norm)
        log(INFO, "client %d round %d: update norm %.4g clipped to %g", partition_id,
            round_cfg.server_round, norm, clipping_norm)
    return train_reply(msg, arrays, _metrics(stats, len(data)), encode_metadata(meta))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report how well the global D tells local real images from G's fakes."""
    cfg = RunConfig.from_run_config(context.run_config)
    server_round = server_round_of(msg.content[CONFIG_KEY])
    partition_id, data = _load_local_data(cfg, context)
    device = pick_device(cfg.device)
    set_torch_threads()
    generator, discriminator = _build_models(cfg, data, msg.content[ARRAYS_KEY], device)
    if cfg.batchnorm == "local":
        _restore_batchnorm(context, generator, discriminator)
    real, labels = data.images[:EVAL_MAX_IMAGES], data.labels[:EVAL_MAX_IMAGES]
    rng = torch.Generator().manual_seed(
        derive_seed(cfg.seed, server_round, partition_id, 1)
    )
    accuracy = discriminator_accuracy(generator, discriminator, real, labels, device, rng)
    return evaluate_reply(msg, int(real.size(0)), accuracy)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (for its seeded sampling)."""
    return query_reply(msg, *_partition_of(context))


def _restore_node_state(cfg: RunConfig, context: Context, agent: Agent,
                        round_cfg: RoundConfig) -> None:
    """Load this node's kept state into the agent; the server's rates win."""
    if cfg.batchnorm == "local":
        _restore_batchnorm(context, agent.generator, agent.discriminator)
    if cfg.keeps_optimizer_state:
        _restore_optimizer(context, OPT_KEYS["g"], agent.opt_g)
        _restore_optimizer(context, OPT_KEYS["d"], agent.opt_d)
    # The server's schedule decides this round's learning rates.
    set_lr(agent.opt_g, round_cfg.lr_generator)
    set_lr(agent.opt_d, round_cfg.lr_discriminator)


def _train_locally(cfg: RunConfig, context: Context, agent: Agent, data: ImageData,
                   round_cfg: RoundConfig, partition_id: int,
                   device: torch.device) -> LocalStats:
    """K local steps on this node's partition, seeded by (seed, round, partition id)."""
    rng = torch.Generator().manual_seed(
        derive_seed(round_cfg.seed, round_cfg.server_round, partition_id))
    batches = batch_iterator(data, round_cfg.batch_size, rng)
    # FedProx sends its mu: the proximal term keeps local weights near the global ones.
    recipe = StepRecipe.from_settings(cfg, round_cfg.proximal_mu or 0.0)
    # client-threads = 0: share the cores with the clients training beside this one.
    adaptive = cfg.client_threads == 0 and device.type == "cpu"
    with CoreShare(str(context.run_id)) if adaptive else nullcontext() as share:
        local = LocalRound(steps=round_cfg.local_steps, device=device, rng=rng,
                           recipe=recipe, channels_last=True,
                           threads=share.threads if share else None)
        return train_gan(agent, batches, local)


def _save_node_state(cfg: RunConfig, context: Context, agent: Agent) -> None:
    """Keep what this node needs next round in context.state (or forget its Adam state)."""
    if cfg.keeps_optimizer_state:
        _save_optimizer(context, OPT_KEYS["g"], agent.opt_g)
        _save_optimizer(context, OPT_KEYS["d"], agent.opt_d)
    else:  # a sampled client's state would be stale, and held for every client
        _drop_optimizer_state(context)
    if cfg.batchnorm == "local":
        _save_batchnorm(context, agent.generator, agent.discriminator)


def _metrics(stats: LocalStats, num_examples: int) -> TrainMetrics:
    """The reply's scalars: per-step means, throughput and the partition's size."""
    return TrainMetrics(
        num_examples=num_examples, loss_d=mean(stats.loss_d), loss_g=mean(stats.loss_g),
        d_x=mean(stats.d_x), d_gz=mean(stats.d_gz), wall_time_s=float(stats.wall_time_s),
        images_per_s=stats.images_seen / max(stats.wall_time_s, 1e-9),
    )


def _metadata(stats: LocalStats, data: ImageData, partition_id: int, server_round: int,
              device: torch.device) -> TrainMetadata:
    """What this client reports about its round beside the scalars."""
    return TrainMetadata(
        partition_id=partition_id, server_round=server_round, num_examples=len(data),
        label_histogram=data.label_histogram(), loss_d=stats.loss_d,
        loss_g=stats.loss_g, d_x=stats.d_x, d_gz=stats.d_gz,
        wall_time_s=float(stats.wall_time_s), steps=stats.steps,
        converged=has_converged(stats.loss_g) and has_converged(stats.loss_d),
        device=str(device),
    )


def _partition_of(context: Context) -> tuple[int, int]:
    """Partition id and number of partitions, from the node's node_config."""
    try:
        return (int(context.node_config[PARTITION_ID]),
                int(context.node_config[NUM_PARTITIONS]))
    except KeyError as exc:
        raise ValueError(
            "node_config needs 'partition-id' and 'num-partitions' (simulation sets "
            "them; a SuperNode takes --node-config \"partition-id=0 num-partitions=2\")"
        ) from exc


def _load_local_data(cfg: RunConfig, context: Context) -> tuple[int, ImageData]:
    """Return this node's partition id and its (cached) partition."""
    partition_id, num_partitions = _partition_of(context)
    return partition_id, load_partition(partition_spec(cfg, num_partitions), partition_id)


def _build_models(
    cfg: RunConfig, data: ImageData, arrays: ArrayRecord, device: torch.device
) -> tuple[Generator, Discriminator]:
    """Build G and D for the data's image shape and load the global arrays."""
    gan_cfg = gan_config(cfg, data.image_shape, data.num_classes)
    generator, discriminator = Generator(gan_cfg), Discriminator(gan_cfg)
    unpack_gan(arrays, generator, discriminator)
    generator, discriminator = generator.to(device), discriminator.to(device)
    # NHWC: oneDNN's fast layout on CPU, the same math (tests/test_training.py).
    to_channels_last(generator, discriminator)
    return generator, discriminator


def _save_batchnorm(context: Context, generator: Generator,
                    discriminator: Discriminator) -> None:
    """Keep this node's BatchNorm statistics in context.state (FedBN)."""
    packed = pack_gan(generator, discriminator).to_torch_state_dict()
    keys = batchnorm_stat_keys(list(packed))
    context.state[BN_STATE_KEY] = ArrayRecord(
        OrderedDict((k, v) for k, v in packed.items() if k in keys)
    )


def _restore_batchnorm(context: Context, generator: Generator,
                       discriminator: Discriminator) -> None:
    """Load this node's own BatchNorm statistics over the received (averaged) ones."""
    if BN_STATE_KEY not in context.state.array_records:
        return  # first round: start from the global statistics
    g_state, d_state = split_state(
        context.state.array_records[BN_STATE_KEY].to_torch_state_dict())
    generator.load_state_dict(g_state, strict=False)
    discriminator.load_state_dict(d_state, strict=False)


def _save_optimizer(context: Context, key: str, optimizer: torch.optim.Optimizer) -> None:
    """Keep an optimizer's state in context.state: tensors + param groups (JSON)."""
    state = optimizer.state_dict()
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    context.state[key] = ArrayRecord(tensors)
    groups = json.dumps(state["param_groups"])
    context.state[key + "-groups"] = ConfigRecord({"json": groups})


def _drop_optimizer_state(context: Context) -> None:
    """Forget any Adam state kept in context.state."""
    for key in OPT_KEYS.values():
        context.state.array_records.pop(key, None)
        context.state.config_records.pop(key + "-groups", None)


def _restore_optimizer(
    context: Context, key: str, optimizer: torch.optim.Optimizer
) -> None:
    """Load an optimizer's state saved by `_save_optimizer`, if there is one."""
    if key not in context.state.array_records:
        return
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in context.state.array_records[key].to_torch_state_dict().items():
        index, slot = name.split(".", 1)
        state.setdefault(int(index), {})[slot] = tensor
    groups = json.loads(context.state.config_records[key + "-groups"]["json"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        # A model shape change between rounds makes old moments meaningless.
        log(WARNING, "ignoring saved optimizer state '%s': %s", key, exc)
        return
    _moments_like_params(optimizer)


def _moments_like_params(optimizer: torch.optim.Optimizer) -> None:
    """Give each restored moment its parameter's device, dtype and strides.

    The moments were saved contiguous; the parameters are channels_last, and
    CUDA's fused Adam refuses tensors whose strides differ ("params, grads,
    exp_avgs, and exp_avg_sqs must have same dtype, device, and layout").
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            slots = optimizer.state.get(param, {})
            for name, value in slots.items():
                if torch.is_tensor(value) and value.shape == param.shape:
                    slots[name] = torch.empty_like(param).copy_(value)

