"""End to end: SIGKILL the ServerApp of a `flwr run` mid-run, then resume in a new run.

The run trains with differential privacy ('dp' = server-fixed), so the same
test shows that a private run goes through `flwr run` and that a resumed run
goes on spending the budget its checkpoint recorded.

The first run is submitted without --stream; once its latest.pt holds round 2,
the run's `flwr-simulation` process (ServerApp and the Ray clients in one
process, under our own SuperLink) is killed with SIGKILL: no `finally`, no
atexit, a real crash. A second `flwr run --stream` with `resume-from` must
finish the rounds in the same run folder, each round exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import imageio.v3 as iio
import pytest
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from deploy.processes import alive, descendants, process_table
from fedgan_app.outputs.checkpoint import CheckpointError, load_checkpoint
from fedgan_app.outputs.runfolder import read_rows
from harness.local_superlink import LocalFlower

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KILL_AFTER_ROUND = 2
APP_PROCESSES = ("flwr-simulation", "flwr-serverapp")


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[LocalFlower]:
    """A private Flower home; its SuperLink is stopped after the test."""
    local = LocalFlower(tmp_path / "flwr-home")
    try:
        yield local
    finally:
        local.stop()
    assert local.superlink_pids() == [], "SuperLink left running"


def _kill_server_app(flower: LocalFlower) -> None:
    """SIGKILL the ServerApp process under our SuperLink; reap what it leaves."""
    table = process_table()
    ours = [pid for link in flower.superlink_pids() for pid in descendants(link, table)]
    apps = [pid for pid in ours if any(name in table[pid][1] for name in APP_PROCESSES)]
    assert len(apps) == 1, f"expected one ServerApp process under our SuperLink: {apps}"
    below = descendants(apps[0], table)  # Ray's processes, wandb-core
    os.kill(apps[0], signal.SIGKILL)
    # Ray and W&B follow their parent within seconds; kill what has not, by PID.
    deadline = time.monotonic() + 5
    while any(alive(pid) for pid in [apps[0], *below]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in below:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def _wait_for_round(latest: Path, flower: LocalFlower, run_id: int,
                    server_round: int, timeout: float = 240) -> None:
    """Poll until latest.pt holds `server_round` (fail if the run ends first).

    The checkpoint is read only when its file changed, and the run's status
    (a `flwr ls` process, seconds of CPU) asked every 15 s.
    """
    deadline = time.monotonic() + timeout
    ask_at, seen = time.monotonic() + 15, None
    while time.monotonic() < deadline:
        try:
            stamp = latest.stat().st_mtime_ns
            if stamp != seen and load_checkpoint(latest).server_round >= server_round:
                return
            seen = stamp
        except (FileNotFoundError, CheckpointError):
            pass  # not written yet
        if time.monotonic() >= ask_at:
            assert not flower.status(run_id).startswith("finished"), "run ended early"
            ask_at = time.monotonic() + 15
        time.sleep(0.2)
    raise TimeoutError(f"{latest} did not reach round {server_round} in {timeout}s")


def test_sigkilled_server_resumes_in_a_new_run(flower: LocalFlower, tmp_path: Path) -> None:
    # Prepare: a run that cannot finish before the kill (1,000 rounds; on an idle
    # machine 4 tiny rounds end before the poll sees round 2), killed once round 2
    # is checkpointed
    out = tmp_path / "outputs"
    run_dir = out / "e2e-resume"
    config = (f"local-steps=1 batch-size=16 eval-every=2 "
              f"eval-samples=10 audit-samples=0 output-dir='{out}' run-name='e2e-resume' "
              "wandb-mode='offline' dp='server-fixed' dp-clipping-norm=1.0")
    # cpus_per_client=2: one Ray actor trains both nodes (one torch import, not two)
    first_id, _ = flower.run_app(f"num-server-rounds=1000 {config}", nodes=2, stream=False,
                                 cpus_per_client=2)
    _wait_for_round(run_dir / "checkpoints" / "latest.pt", flower, first_id,
                    KILL_AFTER_ROUND)
    _kill_server_app(flower)
    at_kill = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert at_kill.server_round >= KILL_AFTER_ROUND
    assert at_kill.wandb_run_id
    rounds_total = at_kill.server_round + 2  # two more rounds after the resume

    # Execute: resume from the run folder in a new run
    second_id, output = flower.run_app(
        f"num-server-rounds={rounds_total} {config} resume-from='{run_dir}'", nodes=2,
        cpus_per_client=2)

    # Assert: completed, every round exactly once, the same W&B run continued
    assert flower.status(second_id) == "finished:completed", output[-3000:]
    assert second_id != first_id
    assert f"after round {at_kill.server_round}" in output
    rounds = [int(r["round"]) for r in read_rows(run_dir / "metrics.csv")]
    assert rounds == list(range(1, rounds_total + 1))
    clients = sorted((int(r["round"]), r["partition-id"])
                     for r in read_rows(run_dir / "clients.csv"))
    assert clients == [(r, p) for r in range(1, rounds_total + 1) for p in ("0", "1")]
    final = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert final.server_round == rounds_total
    assert final.wandb_run_id == at_kill.wandb_run_id
    pngs = sorted(p.name for p in (run_dir / "samples").glob("round_*.png"))
    assert pngs == [f"round_{r:04d}.png" for r in range(rounds_total + 1)]
    assert iio.imread(run_dir / "progress.gif", index=None).shape[0] == rounds_total + 1
    # The budget: one release per round, across the kill, as dp-accounting counts it
    releases = [float(r["dp-releases"]) for r in read_rows(run_dir / "metrics.csv")]
    assert releases == list(range(1, rounds_total + 1))
    epsilon = float(read_rows(run_dir / "metrics.csv")[-1]["dp-epsilon"])
    assert epsilon == pytest.approx(_google_epsilon(rounds_total))
    assert "privacy-accountant" in final.strategy_state
    # W&B (offline) got epsilon too: the history records name their keys
    history = b"".join(p.read_bytes() for p in (run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert b"dp-epsilon" in history


def _google_epsilon(rounds: int) -> float:
    """Epsilon of `rounds` releases of both of 2 clients, noise multiplier 1 (the default)."""
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_event.SampledWithoutReplacementDpEvent(
        2, 2, dp_event.GaussianDpEvent(1.0)), rounds)
    return accountant.get_epsilon(1e-5)
