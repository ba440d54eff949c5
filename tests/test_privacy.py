"""The leakage audit: memorization and membership inference, at the run's end and as a CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedgan_app.audit import main as audit_main
from fedgan_app.config import RunConfig
from fedgan_app.federation import client_app as client_module
from fedgan_app.files import RunLock
from fedgan_app.gan.models import Discriminator, gan_config
from fedgan_app.outputs.runfolder import RunFolder
from fedgan_app.privacy.audit import audit_data
from fedgan_app.privacy.leakage import (
    auc,
    discriminator_scores,
    membership_auc,
    memorization,
    nearest_distances,
)
from fedgan_app.sample import sample_checkpoint
from fedgan_app.server_app import main as server_main
from harness.inprocess import InProcessGrid, server_context

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mnist() -> tuple[dict[int, Any], Any]:
    """The default data split 5 ways (members by partition) and the server's split."""
    return audit_data(RunConfig.from_run_config({}), 5)


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny conditional in-process run of 2 rounds, audited at its end."""
    root = tmp_path_factory.mktemp("audited")
    run_config = {"num-server-rounds": 2, "local-steps": 2, "batch-size": 16,
                  "fraction-evaluate": 0.0, "eval-samples": 100, "eval-every": 2,
                  "audit-samples": 200, "client-threads": 1, "conditional": True,
                  "output-dir": str(root / "outputs"), "run-name": "run",
                  "wandb-mode": "disabled"}
    grid = InProcessGrid(client_module.app, num_nodes=2, run_config=run_config)
    server_main(grid, server_context(run_config))
    return root / "outputs" / "run"


class Copier(nn.Module):
    """A 'generator' that returns training images, a little noisy: pure memorization."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images

    def forward(self, n: int) -> torch.Tensor:
        """The first `n` images, with a little fixed noise."""
        noise = 0.02 * torch.randn(n, *self.images.shape[1:],
                                   generator=torch.Generator().manual_seed(1))
        return (self.images[:n] + noise).clamp(-1, 1)


class Remembering(nn.Module):
    """A 'discriminator' that scores an image by how near it lies to its own images."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Minus the distance to the nearest remembered image: higher is more familiar."""
        return -nearest_distances(x, self.images)


def test_nearest_distances_match_a_direct_search() -> None:
    # Prepare
    gen = torch.Generator().manual_seed(0)
    queries, refs = torch.randn(700, 1, 4, 4, generator=gen), torch.randn(9, 1, 4, 4,
                                                                          generator=gen)

    # Execute
    found = nearest_distances(queries, refs)

    # Assert: the chunked search equals the brute force over every pair
    direct = torch.stack([min(torch.dist(q, r) for r in refs) for q in queries])
    assert torch.allclose(found, direct, atol=1e-5)


def test_auc_is_one_for_separated_scores_half_for_ties_zero_when_reversed() -> None:
    assert auc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1.0)
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == pytest.approx(0.5)
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0])) == pytest.approx(0.0)
    # 3 of the 4 (member, non-member) pairs are ordered right
    assert auc(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0])) == pytest.approx(0.75)


@pytest.mark.slow
def test_memorization_tells_a_copier_from_a_trained_generator(
        mnist: tuple[dict[int, Any], Any], audited_run: Path) -> None:
    # Prepare: the members are the run's two partitions; a copier of them, and
    # the run's own trained G
    members, held_out = audit_data(RunConfig.from_run_config({"seed": 42}), 2)
    train = torch.cat([members[0].images, members[1].images])
    copied = Copier(train[torch.randperm(len(train), generator=torch.Generator()
                                         .manual_seed(3))])(500)
    trained = sample_checkpoint(RunFolder(audited_run).latest_pt, num=500, seed=7).images

    # Execute
    copier = memorization(copied, train, held_out.images, seed=0)
    honest = memorization(trained, train, held_out.images, seed=0)

    # Assert: every copied sample is nearer to a member, and a near-copy; the
    # trained G's samples are near-copies no more often than real unseen digits
    assert copier.closer_to_train == 1.0 and copier.excess == pytest.approx(1.0)
    assert copier.near_copies == 1.0
    assert copier.median_ratio < 0.2
    assert honest.near_copies <= honest.real_near_copies + 0.05
    assert honest.median_ratio > 1.0
    # Two rounds of two steps draw blurs off the data: no preference is measured
    assert honest.on_data < 0.1 and math.isnan(honest.closer_to_train)
    assert honest.members == len(train) and honest.held_out == len(held_out) // 2


def test_memorization_of_unseen_real_digits_shows_no_preference(
        mnist: tuple[dict[int, Any], Any]) -> None:
    # Prepare: members are partitions 0-3; partition 4 plays a perfect
    # generalizer, real digits drawn like the members but never among them
    members, held_out = mnist
    train = torch.cat([members[pid].images for pid in range(4)])

    # Execute
    result = memorization(members[4].images, train, held_out.images, seed=0)

    # Assert: the share nearer to training data is the members' share of the
    # search (about 4 standard errors allowed), near-copies as in real data
    standard_error = (result.expected * (1 - result.expected) / result.samples) ** 0.5
    assert abs(result.closer_to_train - result.expected) < 4 * standard_error
    assert abs(result.near_copies - result.real_near_copies) < 0.05
    assert result.on_data > 0.9
    assert 0.8 < result.median_ratio < 1.25


def test_membership_auc_finds_a_remembering_discriminator_and_its_client(
        mnist: tuple[dict[int, Any], Any]) -> None:
    # Prepare: a D that remembers client 0's images only, and an untrained D
    members, held_out = mnist
    remembering = Remembering(members[0].images)
    gan_cfg = gan_config(RunConfig.from_run_config({}), held_out.image_shape,
                         held_out.num_classes)
    untrained = Discriminator(gan_cfg)

    def attack(d: nn.Module) -> dict[str, float]:
        scores = {pid: discriminator_scores(d, data.images, data.labels, CPU)
                  for pid, data in members.items()}
        return membership_auc(scores, discriminator_scores(d, held_out.images,
                                                           held_out.labels, CPU))

    # Execute
    found, blind = attack(remembering), attack(untrained)

    # Assert: client 0 stands out completely; the others, and the untrained D,
    # are at chance (about 0.5, within 5 standard errors of an AUC of 800 vs 800)
    assert found["membership/client/0"] == pytest.approx(1.0)
    assert found["membership/auc-max-client"] == pytest.approx(1.0)
    for pid in range(1, 5):
        assert abs(found[f"membership/client/{pid}"] - 0.5) < 0.08
        assert abs(blind[f"membership/client/{pid}"] - 0.5) < 0.08
    assert abs(blind["membership/auc"] - 0.5) < 0.08
    assert found["membership/auc"] > blind["membership/auc"]


def test_too_few_images_are_refused_with_the_count() -> None:
    few = torch.zeros(5, 1, 8, 8)
    with pytest.raises(ValueError, match="20 images in samples, got 5"):
        memorization(few, torch.zeros(100, 1, 8, 8), torch.zeros(100, 1, 8, 8))
    with pytest.raises(ValueError, match="held-out images, got 3"):
        membership_auc({0: torch.zeros(100)}, torch.zeros(3))


@pytest.mark.slow
def test_the_run_ends_with_its_audit_in_the_summary_and_on_the_page(audited_run: Path) -> None:
    # Execute: the run's own outputs
    folder = RunFolder(audited_run)
    summary = folder.summary()
    page = folder.dashboard_html.read_text()

    # Assert: the headline values, in range, for both partitions; the page shows them
    closer = summary["audit/memorization/closer-to-train"]
    assert math.isnan(closer) or 0.0 <= closer <= 1.0  # NaN: the samples lie off the data
    assert 0.0 <= summary["audit/memorization/on-data"] <= 1.0
    assert summary["audit/memorization/near-copies"] == 0.0
    assert summary["audit/memorization/samples"] == 200
    assert summary["audit/num-partitions"] == 2
    assert {"audit/membership/client/0", "audit/membership/client/1"} <= set(summary)
    assert 0.0 <= summary["audit/membership/auc"] <= 1.0
    assert 'id="audit"' in page and "membership AUC" in page
    assert f"{summary['audit/membership/auc']:.4g}" in page


@pytest.mark.slow
def test_the_cli_repeats_the_runs_own_audit_exactly(audited_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    # Prepare: a copy of the run folder, its audit values removed from the summary
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(audited_run), str(copy)], check=True)
    folder = RunFolder(copy)
    recorded = {k: v for k, v in folder.summary().items() if k.startswith("audit/")}
    folder.summary_json.write_text(json.dumps(
        {k: v for k, v in folder.summary().items() if not k.startswith("audit/")}))

    # Execute: the partitions come from clients.csv now
    code = audit_main([str(copy), "--samples", "200"])
    out = capsys.readouterr().out

    # Assert: the same values (same checkpoint, seed and data), written back
    again = {k: v for k, v in folder.summary().items() if k.startswith("audit/")}
    assert code == 0, out
    assert "membership AUC" in out
    skip = {"audit/time-s", "audit/round"}
    assert {k: v for k, v in again.items() if k not in skip} == pytest.approx(
        {k: v for k, v in recorded.items() if k not in skip}, nan_ok=True)
    assert again["audit/round"] == 2


@pytest.mark.slow
def test_the_cli_leaves_a_folder_a_run_is_writing_and_names_bad_options(
        audited_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Prepare: a run holds the folder's lock
    before = RunFolder(audited_run).summary_json.read_bytes()
    lock = RunLock(RunFolder(audited_run).run_lock)
    lock.acquire()
    try:
        # Execute
        locked = audit_main([str(audited_run)])
        locked_err = capsys.readouterr().err
    finally:
        lock.release()
    missing = audit_main([str(tmp_path / "nowhere")])
    missing_err = capsys.readouterr().err
    zero = audit_main([str(audited_run), "--num-partitions", "0"])
    zero_err = capsys.readouterr().err

    # Assert: exit 2 with the reason; the summary untouched
    assert locked == 2 and "still writing" in locked_err and "--no-write" in locked_err
    assert missing == 2 and "is not a run folder" in missing_err
    assert zero == 2 and "--num-partitions must be between 1" in zero_err
    assert RunFolder(audited_run).summary_json.read_bytes() == before


@pytest.mark.slow
def test_the_cli_runs_as_a_module_without_writing(audited_run: Path) -> None:
    # Prepare
    before = RunFolder(audited_run).summary_json.read_bytes()

    # Execute
    proc = subprocess.run([sys.executable, "-m", "fedgan_app.audit", str(audited_run),
                           "--samples", "100", "--no-write"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)

    # Assert
    assert proc.returncode == 0, proc.stderr
    assert "memorization/near-copies" in proc.stdout
    assert RunFolder(audited_run).summary_json.read_bytes() == before
