"""What a trained GAN reveals about its clients' images: memorization and membership.

Two measurements, each on images the server may see: the clients' partitions
as the run split them (the *members*, which the GAN trained on) and the
server's held-out split (*non-members*, from the same source, never trained on).

* **Memorization** (`memorization`). For samples of the final generator, the
  distance (pixel L2, images in [-1, 1]) to the nearest member and to the
  nearest held-out image. `closer-to-train` is the share of samples whose
  nearest real image is a member, among the samples that lie on the data
  (`on-data`: no farther from their nearest real image than
  `ON_DATA_RATIO` times the scale below); a blurred or collapsed sample far
  from every real image has one nearest image for all, which says nothing
  about training data. A generator that knows its training images
  no better than unseen ones scores `closer-to-train-expected`, the members'
  share of the searched images (M / (M + H): of M + H images drawn alike, the
  nearest is a member that often); one that copies them scores 1.0.
  `closer-to-train-excess` puts the two on one scale: (share - expected) /
  (1 - expected), 0 for no preference, 1 when every sample is nearer to
  training data. The scale is real data's own: the median distance from a
  held-out image (not one of the searched ones) to its nearest member
  (`scale`). `near-copies` is the share of samples nearer to a member than
  `NEAR_COPY_RATIO` times that scale; `real-near-copies` is the same share
  for those held-out images, real data's own.
* **Membership inference** (`membership_auc`), white-box as in LOGAN (Hayes
  et al. 2019, "LOGAN: Membership Inference Attacks Against Generative
  Models"): the final discriminator scores members and non-members, and the
  AUC says how well the score tells them apart (0.5: not at all, 1.0:
  perfectly). Per client, each client's own images against non-members.

Both assume the auditor holds the members: true in simulation and for a
server that may see the data it audits, not for a deployment's server, which
has no client data; there the audit runs where the data is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc

# A sample nearer to a member than this share of the real-to-real scale counts
# as a near-copy: half the distance at which a real digit never trained on
# typically lies from a training digit (the audit reports real data's own
# share at this ratio, `memorization/real-near-copies`, beside the samples').
NEAR_COPY_RATIO = 0.5
# A sample farther than this many scales from every real image is off the data:
# left out of `closer-to-train` (real held-out digits lie within it almost always).
ON_DATA_RATIO = 1.5
# Fewer images than this on one side make an AUC or a share too noisy to report.
MIN_IMAGES = 20
_CHUNK = 512  # rows of one distance matrix block


@dataclass(frozen=True)
class Memorization:
    """Where a generator's samples lie relative to its training and held-out images."""

    closer_to_train: float  # share of on-data samples whose nearest real image is a member
    on_data: float  # share of samples within ON_DATA_RATIO x scale of a real image
    expected: float  # that share for a generator with no preference: M / (M + H)
    near_copies: float  # share of samples within NEAR_COPY_RATIO x scale of a member
    real_near_copies: float  # the same share for held-out real images: real data's own
    scale: float  # median distance from a held-out image to its nearest member
    median_ratio: float  # median (distance to the nearest member / scale) of the samples
    samples: int
    members: int  # M: members searched
    held_out: int  # H: held-out images searched

    @property
    def excess(self) -> float:
        """(share - expected) / (1 - expected): 0 no preference, 1 every sample nearer.

        NaN, like `closer_to_train`, when fewer than `MIN_IMAGES` samples lie
        on the data.
        """
        return (self.closer_to_train - self.expected) / (1.0 - self.expected)

    def row(self) -> dict[str, float]:
        """The measurement as summary values (``memorization/...``)."""
        return {"memorization/closer-to-train": self.closer_to_train,
                "memorization/closer-to-train-expected": self.expected,
                "memorization/closer-to-train-excess": self.excess,
                "memorization/on-data": self.on_data,
                "memorization/near-copies": self.near_copies,
                "memorization/real-near-copies": self.real_near_copies,
                "memorization/scale": self.scale,
                "memorization/median-ratio": self.median_ratio,
                "memorization/samples": float(self.samples),
                "memorization/members": float(self.members),
                "memorization/held-out": float(self.held_out)}


def nearest_distances(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """For each query image, the L2 distance to its nearest reference image, (N,)."""
    refs = references.flatten(1).double()
    out = []
    for start in range(0, len(queries), _CHUNK):
        block = queries[start:start + _CHUNK].flatten(1).double()
        out.append(torch.cdist(block, refs).min(dim=1).values)
    return torch.cat(out).float() if out else torch.empty(0)


def memorization(samples: torch.Tensor, members: torch.Tensor, non_members: torch.Tensor,
                 seed: int = 0) -> Memorization:
    """Measure how near a generator's samples lie to its training images.

    Parameters
    ----------
    samples : torch.Tensor
        (N, C, H, W) generated images in [-1, 1].
    members : torch.Tensor
        The images the GAN trained on, every one searched.
    non_members : torch.Tensor
        Images of the same source it never saw (the server's held-out split):
        a random half is searched, the other half gives the scale.
    seed : int
        Picks the halves.

    Returns
    -------
    Memorization
        The shares and the scale.

    Raises
    ------
    ValueError
        When a set has fewer than `MIN_IMAGES` images (the non-members:
        twice that, for the two halves) or the image shapes differ.

    """
    _check_sets(samples=samples, members=members, non_members=non_members)
    if len(non_members) < 2 * MIN_IMAGES:
        raise ValueError(f"memorization needs {2 * MIN_IMAGES} held-out images (half "
                         f"searched, half for the scale), got {len(non_members)}")
    rng = torch.Generator().manual_seed(seed)
    shuffled = non_members[torch.randperm(len(non_members), generator=rng)]
    searched, probes = shuffled[: len(shuffled) // 2], shuffled[len(shuffled) // 2:]
    # The scale: how near a real image, never trained on, lies to the members.
    real = nearest_distances(probes, members)
    scale = float(real.median())
    to_train = nearest_distances(samples, members)
    to_held = nearest_distances(samples, searched)
    on_data = torch.minimum(to_train, to_held) <= ON_DATA_RATIO * scale
    nearer = (to_train < to_held)[on_data]
    return Memorization(
        closer_to_train=float(nearer.float().mean()) if len(nearer) >= MIN_IMAGES
        else float("nan"),
        on_data=float(on_data.float().mean()),
        expected=len(members) / (len(members) + len(searched)),
        near_copies=float((to_train < NEAR_COPY_RATIO * scale).float().mean()),
        real_near_copies=float((real < NEAR_COPY_RATIO * scale).float().mean()),
        scale=scale,
        median_ratio=float((to_train / scale).median()) if scale > 0 else float("inf"),
        samples=len(samples), members=len(members), held_out=len(searched))


@torch.no_grad()
def discriminator_scores(discriminator: nn.Module, images: torch.Tensor,
                         labels: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """D's real-vs-fake logit for each image (its eval mode), (N,) on the CPU."""
    was_training = discriminator.training
    discriminator.eval()
    try:
        out = []
        for start in range(0, len(images), _CHUNK):
            batch = images[start:start + _CHUNK].to(device)
            batch_labels = None if labels is None else labels[start:start + _CHUNK].to(device)
            out.append(discriminator(batch, batch_labels).float().cpu())
        return torch.cat(out)
    finally:
        discriminator.train(was_training)


def auc(member_scores: torch.Tensor, non_member_scores: torch.Tensor) -> float:
    """AUC of telling members (higher score) from non-members; 0.5 is chance."""
    scores = torch.cat([member_scores, non_member_scores]).float()
    target = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(non_member_scores))])
    return float(binary_auroc(scores, target.long()))


def membership_auc(scores: Mapping[int, torch.Tensor], non_member_scores: torch.Tensor,
                   seed: int = 0) -> dict[str, float]:
    """LOGAN's attack: AUC of D's scores, all members and each client's, vs non-members.

    Parameters
    ----------
    scores : Mapping[int, torch.Tensor]
        Partition id -> D's scores of that client's training images.
    non_member_scores : torch.Tensor
        D's scores of the held-out images.
    seed : int
        Picks the equal-size subsets (each side as large as the smaller one).

    Returns
    -------
    dict[str, float]
        ``membership/auc`` (every member), ``membership/auc-max-client`` and
        ``membership/client/<id>`` for each client with `MIN_IMAGES` images
        or more; a client with fewer is left out.

    """
    if len(non_member_scores) < MIN_IMAGES:
        raise ValueError(f"membership inference needs {MIN_IMAGES} held-out images, "
                         f"got {len(non_member_scores)}")
    rng = torch.Generator().manual_seed(seed)
    everyone = torch.cat([s for _, s in sorted(scores.items())]) if scores else torch.empty(0)
    if len(everyone) < MIN_IMAGES:
        raise ValueError(f"membership inference needs {MIN_IMAGES} training images, "
                         f"got {len(everyone)}")
    row = {"membership/auc": _balanced_auc(everyone, non_member_scores, rng)}
    per_client = {pid: _balanced_auc(s, non_member_scores, rng)
                  for pid, s in sorted(scores.items()) if len(s) >= MIN_IMAGES}
    row.update({f"membership/client/{pid}": value for pid, value in per_client.items()})
    if per_client:
        row["membership/auc-max-client"] = max(per_client.values())
    row["membership/members"] = float(min(len(everyone), len(non_member_scores)))
    return row


def _balanced_auc(members: torch.Tensor, non_members: torch.Tensor,
                  rng: torch.Generator) -> float:
    """AUC on equal-size random subsets of the two sides."""
    size = min(len(members), len(non_members))
    pick_m = torch.randperm(len(members), generator=rng)[:size]
    pick_n = torch.randperm(len(non_members), generator=rng)[:size]
    return auc(members[pick_m], non_members[pick_n])


def _check_sets(**sets: torch.Tensor) -> None:
    """Every set holds MIN_IMAGES images or more, all of one image shape."""
    shapes = {name: tuple(images.shape[1:]) for name, images in sets.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"image shapes differ: {shapes}")
    for name, images in sets.items():
        if len(images) < MIN_IMAGES:
            raise ValueError(f"memorization needs {MIN_IMAGES} images in {name}, "
                             f"got {len(images)}")
