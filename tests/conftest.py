"""Shared test fixtures and environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# One torch thread in every test process and in every process a test starts
# (Flower's SuperLink, SuperNodes, ServerApp and ClientApp processes inherit it):
# pytest-xdist runs one test file per core, and on a core shared with another
# process, torch's spinning worker threads burn CPU time waiting for each other.
# Set before torch is imported (it sizes its thread pool once).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from deploy.processes import use_flower_settings  # noqa: E402
from harness.inprocess import set_task_identity  # noqa: E402  (after the thread count)

# Quiet network probes and W&B in every test process (deploy/processes.py's list).
use_flower_settings()
REPO_ROOT = Path(__file__).resolve().parent.parent
# One cache folder for the whole suite: the evaluator (training it takes tens of
# seconds) and the prepared data (tests/test_data.py uses empty folders of its own).
os.environ.setdefault("FEDGAN_CACHE_DIR", str(REPO_ROOT / ".cache" / "test"))
# Tests build Messages outside a Flower run; those need a task identity.
set_task_identity()


def tiny_settings(output_dir: Path) -> dict[str, Any]:
    """A run config small enough for in-process tests (seconds, not minutes)."""
    return {
        "num-server-rounds": 2,
        "local-steps": 3,
        "batch-size": 16,
        "eval-every": 2,
        "eval-samples": 100,
        # The leakage audit (seconds) only where a test asks for it (tests/test_privacy.py).
        "audit-samples": 0,
        # No client evaluation: the evaluate handler is covered by the `flwr run`
        # test (tests/test_e2e.py) and its sampling by tests/test_sampling.py.
        "fraction-evaluate": 0.0,
        "output-dir": str(output_dir),
        "run-name": "test-run",
        "wandb-mode": "disabled",
        # One torch thread per client: the adaptive share (0) follows whatever else
        # runs on the machine, and other thread counts sum floats in another order.
        "client-threads": 1,
        # The tests' runs are unconditional unless a test asks for a conditional one.
        "conditional": False,
    }


@pytest.fixture
def tiny_run_config(tmp_path: Path) -> dict[str, Any]:
    """A run config small enough for in-process tests, writing under tmp_path/outputs."""
    return tiny_settings(tmp_path / "outputs")
