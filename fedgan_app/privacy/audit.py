"""The leakage audit of a run's final models: its data, its generator and discriminator.

`audit_models` measures what G and D reveal (`fedgan_app.privacy.leakage`)
given the images they trained on, partition by partition, and the server's
held-out split. `audit_data` loads those images as the run split them: the
partitions of the run's own partitioning, so the server (in simulation) or
the auditor must hold the source data. The server calls both after the last
round (`audit-samples` > 0); ``python -m fedgan_app.audit`` does the same for
a finished run folder.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO, WARNING

import torch
from flwr.common.logger import log

from fedgan_app.config import RunConfig
from fedgan_app.data.prepared import load_partition, load_server_split
from fedgan_app.data.spec import ImageData, partition_spec
from fedgan_app.gan.models import Discriminator, GANConfig
from fedgan_app.privacy.leakage import discriminator_scores, membership_auc, memorization
from fedgan_app.protocol.message import split_state
from fedgan_app.quality.judge import generate_eval_batch, generator_from

PREFIX = "audit/"


def audit_data(cfg: RunConfig, num_partitions: int) -> tuple[dict[int, ImageData], ImageData]:
    """The run's training images (partition id -> images) and the server's held-out split.

    Raises
    ------
    fedgan_app.data.spec.DataError
        When the source data cannot be loaded here.

    """
    spec = partition_spec(cfg, num_partitions)
    members = {pid: load_partition(spec, pid) for pid in range(num_partitions)}
    return members, load_server_split(spec)


def audit_models(state: Mapping[str, torch.Tensor], ema_state: Mapping[str, torch.Tensor] | None,
                 gan_cfg: GANConfig, cfg: RunConfig, members: Mapping[int, ImageData],
                 held_out: ImageData, num_samples: int,
                 device: torch.device) -> dict[str, float]:
    """Memorization and membership inference of one run's final G and D.

    Parameters
    ----------
    state : Mapping[str, torch.Tensor]
        The packed global G and D (``generator.*``, ``discriminator.*``).
    ema_state : Mapping[str, torch.Tensor] | None
        The server-side EMA generator, sampled instead of the raw G when set
        (as the run's grids and scores are).
    gan_cfg : GANConfig
        The models' settings.
    cfg : RunConfig
        The run's settings (its seed picks the noise and the subsets).
    members : Mapping[int, ImageData]
        Partition id -> the images that client trained on.
    held_out : ImageData
        The server's held-out split (never trained on).
    num_samples : int
        Generated images to search.
    device : torch.device
        Where G and D run.

    Returns
    -------
    dict[str, float]
        The summary values, keys under ``audit/`` (see `docs/privacy.md`).

    """
    started = time.perf_counter()
    generator = generator_from(ema_state or state, gan_cfg, device, cfg.seed)
    with torch.no_grad():
        samples, _ = generate_eval_batch(generator, num_samples, gan_cfg.latent_dim,
                                         cfg.seed, device, cfg.sample_noise_scale)
    member_images = torch.cat([members[pid].images for pid in sorted(members)])
    row = memorization(samples.cpu(), member_images, held_out.images, cfg.seed).row()

    discriminator = Discriminator(gan_cfg)
    discriminator.load_state_dict(split_state(state)[1])
    discriminator.to(device)
    labelled = discriminator.conditioning == "projection"

    def scores(data: ImageData) -> torch.Tensor:
        return discriminator_scores(discriminator, data.images,
                                    data.labels if labelled else None, device)

    row.update(membership_auc({pid: scores(data) for pid, data in members.items()},
                              scores(held_out), cfg.seed))
    row["generator-ema"] = float(ema_state is not None)
    row["num-partitions"] = float(len(members))
    row["time-s"] = time.perf_counter() - started
    return {PREFIX + key: value for key, value in row.items()}


def audit_at_end(cfg: RunConfig, gan_cfg: GANConfig, state: Mapping[str, torch.Tensor],
                 ema_state: Mapping[str, torch.Tensor] | None, num_partitions: int,
                 device: torch.device) -> dict[str, float] | None:
    """The server's audit after the last round; None (logged) when it cannot run here.

    Data this process cannot load (a deployment's server without the clients'
    data) or too few images for a measurement skip the audit with a warning:
    the run's own outputs are complete without it.
    """
    log(INFO, "leakage audit: %d samples against %d partitions and the held-out split",
        cfg.audit_samples, num_partitions)
    try:
        members, held_out = audit_data(cfg, num_partitions)
        row = audit_models(state, ema_state, gan_cfg, cfg, members, held_out,
                           cfg.audit_samples, device)
    except ValueError as exc:  # DataError included: data this process cannot load
        log(WARNING, "leakage audit skipped: %s (python -m fedgan_app.audit runs it where "
            "the data is)", exc)
        return None
    log(INFO, "%s", format_audit(row))
    return row


def format_audit(row: Mapping[str, float]) -> str:
    """One log line of the audit's headline values."""
    def value(key: str) -> str:
        number = row.get(PREFIX + key)
        return "n/a" if number is None else f"{number:.3f}"

    return (f"leakage audit: preference for training data "
            f"{value('memorization/closer-to-train-excess')} (0: none, 1: copies), "
            f"near-copies {value('memorization/near-copies')} (real data "
            f"{value('memorization/real-near-copies')}), membership AUC "
            f"{value('membership/auc')} (0.5: chance), most exposed client "
            f"{value('membership/auc-max-client')}")
