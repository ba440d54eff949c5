"""The public quality judge and the constants the benchmarks share with the app."""

from __future__ import annotations

import numpy as np
import torch

from fedgan_app.config import RunConfig
from fedgan_app.data.prepared import load_server_split
from fedgan_app.data.spec import partition_spec
from fedgan_app.gan.models import GANConfig, build_gan
from fedgan_app.protocol.message import pack_gan
from fedgan_app.quality.evaluator import cache_path
from fedgan_app.quality.judge import (
    GRID_IMAGES,
    QualityJudge,
    evaluator_cache_dir,
    evaluator_cache_key,
    generate_eval_images,
    generator_from,
    grid_noise,
    make_grid,
    sample_grid,
)
from fedgan_app.quality.metrics import QUALITY_KEYS

CPU = torch.device("cpu")


def test_noise_streams_are_fixed_by_the_seed_and_distinct() -> None:
    # Prepare / Execute
    generator = build_gan(GANConfig(), seed=0)[0]
    grid_a, grid_b = grid_noise(7, 100), grid_noise(7, 100)
    evals = generate_eval_images(generator, 3, 100, 7, CPU)

    # Assert
    assert grid_a.shape == (GRID_IMAGES, 100) and torch.equal(grid_a, grid_b)
    assert not torch.equal(grid_a, grid_noise(8, 100))
    assert not torch.equal(evals, generate_eval_images(generator, 3, 100, 8, CPU))
    assert sample_grid(generator, grid_a, CPU).shape == (8 * 30 + 2, 8 * 30 + 2, 3)


def test_judge_scores_a_generator_and_reports_the_reference_once() -> None:
    # Prepare: the default run's server split, and G as the server rebuilds it
    cfg = RunConfig.defaults(eval_samples=100)
    spec = partition_spec(cfg, num_partitions=2)
    server_data = load_server_split(spec)
    references: list[dict[str, float]] = []
    judge = QualityJudge(cfg.dataset, cfg.seed, cfg.eval_samples, server_data, spec,
                         on_reference=references.append)
    packed = pack_gan(*build_gan(GANConfig(), seed=cfg.seed))

    # Execute
    first = judge.evaluate(generator_from(packed, GANConfig(), CPU), CPU)
    second = judge.evaluate(generator_from(packed.to_torch_state_dict(), GANConfig(), CPU),
                            CPU)

    # Assert: the same G and noise give the same scores; the reference row came
    # once, and the evaluator is the one cached under the public key
    assert set(first) == {*QUALITY_KEYS, "eval-time-s"}
    assert {k: first[k] for k in QUALITY_KEYS} == {k: second[k] for k in QUALITY_KEYS}
    assert len(references) == 1
    assert set(references[0]) == {"evaluator-accuracy", *QUALITY_KEYS}
    assert references[0]["fid"] < first["fid"]  # real images beat an untrained G
    key = evaluator_cache_key(cfg.dataset, cfg.seed, len(server_data))
    assert cache_path(evaluator_cache_dir(), key).is_file()


def test_make_grid_shape_dtype_and_range() -> None:
    """16 gray 28x28, nrow 4, padding 2 -> (122, 122, 3) uint8; -1 -> 0, 1 -> 255."""
    # Prepare
    images = torch.zeros((16, 1, 28, 28))
    images[0] = -1.0
    images[1] = 1.0

    # Execute
    grid = make_grid(images, nrow=4, padding=2)

    # Assert
    assert grid.shape == (4 * 30 + 2, 4 * 30 + 2, 3)
    assert grid.dtype == np.uint8
    assert (grid[2:30, 2:30] == 0).all()  # first tile: -1 -> 0
    assert (grid[2:30, 32:60] == 255).all()  # second tile: 1 -> 255
    assert (grid[2:30, 62:90] == 128).all()  # third tile: 0 -> mid gray
    assert (grid[0:2] == 0).all()  # padding is black
