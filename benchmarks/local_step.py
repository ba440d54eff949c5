"""The local step's speed: the app's step with each speed-up in turn, and the machine's limit.

Used by benchmarks/throughput.py (parts ``step`` and ``limit``). Every variant
but "legacy" runs the app's own `train_gan` on a real partition with the
default recipe's G and D; "legacy" is the step as the app ran it before the
throughput work, kept here as the baseline.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

STEP_BLOCK = 20  # steps per timed block
STEP_REPEATS = 5  # interleaved blocks per variant


# --- the local step -------------------------------------------------------------


def _models_and_data(settings: dict[str, Any], batch: int, channels_last: bool
                     ) -> tuple[Any, Any, Any, Any, Iterator, Any]:
    """The default recipe's G, D, optimizers and a real partition's batches."""
    import torch

    from fedgan_app.config import RunConfig
    from fedgan_app.data.prepared import batch_iterator, load_partition
    from fedgan_app.data.spec import partition_spec
    from fedgan_app.gan.models import build_gan, gan_config
    from fedgan_app.gan.training import make_optimizers, to_channels_last

    cfg = RunConfig.defaults(**{k.replace("-", "_"): v for k, v in settings.items()})
    data = load_partition(partition_spec(cfg, 5), 0)
    generator, discriminator = build_gan(
        gan_config(cfg, data.image_shape, data.num_classes), cfg.seed)
    if channels_last:
        to_channels_last(generator, discriminator)
    opt_g, opt_d = make_optimizers(generator, discriminator, cfg.lr_generator,
                                   cfg.lr_discriminator, (cfg.adam_beta1, cfg.adam_beta2))
    rng = torch.Generator().manual_seed(0)
    return generator, discriminator, opt_g, opt_d, batch_iterator(data, batch, rng), cfg


def legacy_step(generator: Any, discriminator: Any, opt_g: Any, opt_d: Any,
                batches: Iterator, steps: int, rng: Any) -> None:
    """The local step as the app ran it before this work (kept here as the baseline).

    Four host syncs per step (``.item()``), separate D passes, contiguous
    memory; the default recipe of that time (BCE, BatchNorm in D).
    """
    import torch
    from torch.nn import functional as F

    for _ in range(steps):
        real, _ = next(batches)
        n = real.size(0)
        z = torch.randn(n, generator.latent_dim, generator=rng)
        ones, zeros = torch.ones(n), torch.zeros(n)
        fake = generator(z)
        logits_real = discriminator(real)
        logits_fake = discriminator(fake.detach())
        loss_d = (F.binary_cross_entropy_with_logits(logits_real, ones)
                  + F.binary_cross_entropy_with_logits(logits_fake, zeros))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = F.binary_cross_entropy_with_logits(discriminator(fake), ones)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        [t.item() for t in (loss_d, loss_g, torch.sigmoid(logits_real).mean(),
                            torch.sigmoid(logits_fake).mean())]


# Speed-ups of the app's step, in the order the table adds them (each variant
# has every speed-up up to its own). The math is the same throughout
# (tests/test_training.py); "bf16" is not: it is measured, not used.
SPEEDUPS = ("channels_last", "nhwc_projection", "matmul", "unfold", "frozen_d", "fused_adam",
            "compiled")
APP_STEP = "fused_adam"  # the variant that is the app's own step


class _Plain:
    """The nets' layers as DCGAN writes them (the speed-ups switched off)."""

    @staticmethod
    def generator_forward(generator: Any, z: Any, labels: Any = None) -> Any:
        """G's first layer a transposed convolution of a 1x1 input."""
        code = generator.code(z, labels)
        return generator.net(code.view(code.size(0), -1, 1, 1))

    @staticmethod
    def features(discriminator: Any, x: Any) -> Any:
        """D's first layer a convolution."""
        return discriminator.net(x)

    @staticmethod
    def logits(discriminator: Any, h: Any, labels: Any = None) -> Any:
        """The projection term over the flattened features (NCHW order, whatever h's)."""
        out = discriminator.head(h).view(-1)
        if discriminator.conditioning == "projection":
            out = out + (discriminator.embed(labels) * h.flatten(1)).sum(dim=1)
        return out


def _step_runner(variant: str, settings: dict[str, Any], batch: int
                 ) -> Callable[[int], float]:
    """A function that runs `steps` steps of one variant and returns images/s.

    `variant` is "legacy" (the step before this work), "bf16" (the app's step
    under CPU bfloat16 autocast: other math), or one of SPEEDUPS: the app's
    step with that speed-up and every one before it in SPEEDUPS, the rest off
    ("contiguous": none of them).
    """
    import types

    import torch

    from fedgan_app.gan.training import Agent, LocalRound, StepRecipe, train_gan

    on = set(SPEEDUPS) if variant == "bf16" else (
        set(SPEEDUPS[:SPEEDUPS.index(variant) + 1]) if variant in SPEEDUPS else set())
    cl = "channels_last" in on
    generator, discriminator, opt_g, opt_d, batches, cfg = _models_and_data(
        settings, batch, cl)
    if "matmul" not in on:
        generator.forward = types.MethodType(_Plain.generator_forward, generator)
    if "unfold" not in on:
        discriminator.features = types.MethodType(_Plain.features, discriminator)
    if "nhwc_projection" not in on:
        discriminator.logits = types.MethodType(_Plain.logits, discriminator)
    if "frozen_d" not in on:  # D's weights collect gradients in G's step, as before
        discriminator.requires_grad_ = types.MethodType(lambda self, *a, **k: self,
                                                        discriminator)
    if "fused_adam" not in on:
        opt_g = torch.optim.Adam(generator.parameters(), **_adam_args(opt_g), foreach=True)
        opt_d = torch.optim.Adam(discriminator.parameters(), **_adam_args(opt_d),
                                 foreach=True)
    if "compiled" in on and variant != "bf16":
        generator, discriminator = torch.compile(generator), torch.compile(discriminator)
    rng = torch.Generator().manual_seed(1)
    cpu = torch.device("cpu")

    def run(steps: int) -> float:
        start = time.perf_counter()
        if variant == "legacy":
            legacy_step(generator, discriminator, opt_g, opt_d, batches, steps, rng)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
                train_gan(Agent(generator, discriminator, opt_g, opt_d), batches,
                          LocalRound(steps, cpu, rng, StepRecipe.from_settings(cfg), cl))
        return steps * batch / (time.perf_counter() - start)

    return run


def _adam_args(optimizer: Any) -> dict[str, Any]:
    """The learning rate and betas of an Adam optimizer."""
    group = optimizer.param_groups[0]
    return {"lr": group["lr"], "betas": group["betas"]}


def measure_step_variants(variants: list[tuple[str, str, dict[str, Any], int]],
                          repeats: int, block: int) -> dict[str, dict[str, Any]]:
    """Interleaved blocks of every variant in this process: median images/s each."""
    import torch

    torch.set_num_threads(1)
    runners = {}
    for label, variant, settings, batch in variants:
        start = time.perf_counter()
        runners[label] = _step_runner(variant, settings, batch)
        runners[label](3)  # warm-up (and compilation)
        print(f"  {label}: ready in {time.perf_counter() - start:.1f}s", flush=True)
    rates: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(repeats):
        for label, run in runners.items():
            rates[label].append(run(block))
    return {label: {"median": statistics.median(r), "min": min(r), "max": max(r)}
            for label, r in rates.items()}


def sampling_rates(settings: dict[str, Any], repeats: int) -> dict[str, float]:
    """Images/s of sampling 1,000 images with no_grad vs inference_mode."""
    import torch

    generator = _models_and_data(settings, 32, False)[0]
    generator.eval()
    z = torch.randn(1000, generator.latent_dim)
    labels = (torch.arange(1000) % generator.num_classes) if generator.num_classes else None
    rates: dict[str, list[float]] = {"no_grad": [], "inference_mode": []}
    for _ in range(repeats):
        for mode, ctx in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
            start = time.perf_counter()
            with ctx():
                for part in range(0, 1000, 500):
                    generator(z[part:part + 500],
                              None if labels is None else labels[part:part + 500])
            rates[mode].append(1000 / (time.perf_counter() - start))
    return {mode: statistics.median(r) for mode, r in rates.items()}


# --- the limit -------------------------------------------------------------------


def _limit_worker(settings: dict[str, Any], batch: int, threads: int, steps: int,
                  start_at: float, queue: Any) -> None:
    """One process of the limit: wait for the common start, run the app's step."""
    import torch

    torch.set_num_threads(threads)
    run = _step_runner(APP_STEP, settings, batch)
    run(3)
    while time.time() < start_at:
        time.sleep(0.01)
    began = time.perf_counter()
    run(steps)
    queue.put((steps * batch, time.perf_counter() - began))


def measure_limit(settings: dict[str, Any], batch: int, processes: int, threads: int,
                  steps: int) -> float:
    """Aggregate images/s of `processes` processes with `threads` threads each, in step."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start_at = time.time() + 30  # all processes ready before the clock starts
    workers = [context.Process(target=_limit_worker,
                               args=(settings, batch, threads, steps, start_at, queue))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    results = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return sum(images for images, _ in results) / max(seconds for _, seconds in results)
