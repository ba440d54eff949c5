"""DiffAugment (Zhao et al., 2020): differentiable augmentation of D's inputs.

The same random translation, cutout and colour changes are applied to real
AND generated images before D sees them, in D's step and in G's step, so D
cannot memorise a small training set while G still gets gradients through
the augmentation. Pure torch; randomness comes from a caller's
`torch.Generator`, so a client's round stays reproducible.

Policies are comma-separated names: "translation", "cutout", "color".
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125  # shift up to 1/8 of the image side (the paper's value)
CUTOUT_RATIO = 0.5  # cut a square of half the image side


def parse_policy(policy: str) -> tuple[str, ...]:
    """Split a policy string ('' or 'none' for no augmentation) into checked names."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip() and p.strip() != "none")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {unknown}; allowed: {POLICIES}")
    return names


def diff_augment(
    x: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator
) -> torch.Tensor:
    """Apply the policy's augmentations to images (N, C, H, W), per-sample random."""
    for name in POLICIES:  # fixed order, whatever the order in the policy string
        if name in policy:
            x = _AUGMENTS[name](x, generator)
    return x


def _rand(x: torch.Tensor, generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the CPU generator, moved to x's device."""
    return torch.rand(*shape, generator=generator).to(x.device, x.dtype)


def _color(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, saturation and contrast per image."""
    n = x.size(0)
    x = x + (_rand(x, generator, n, 1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, generator, n, 1, 1, 1) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, generator, n, 1, 1, 1) + 0.5) + mean


def _translation(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to 1/8 of its side; uncovered pixels become 0."""
    n, c, h, w = x.shape
    shift_h, shift_w = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    dy = torch.randint(-shift_h, shift_h + 1, (n, 1, 1), generator=generator).to(x.device)
    dx = torch.randint(-shift_w, shift_w + 1, (n, 1, 1), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    # Indices into the image padded by one zero pixel; out of range -> the padding.
    src_rows = (rows + dy + 1).clamp(0, h + 1)
    src_cols = (cols + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    index = (src_rows * (w + 2) + src_cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


def _cutout(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Zero a random square of half the image side in each image."""
    n, _, h, w = x.shape
    size_h, size_w = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    top = torch.randint(0, h + (1 - size_h % 2), (n, 1, 1), generator=generator).to(x.device)
    left = torch.randint(0, w + (1 - size_w % 2), (n, 1, 1), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - (top - size_h // 2)
    cols = torch.arange(w, device=x.device).view(1, 1, w) - (left - size_w // 2)
    inside = (rows >= 0) & (rows < size_h) & (cols >= 0) & (cols < size_w)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}
