"""The benchmarks' results file: a result once saved is never lost, and names its machine."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import (
    MACHINE_KEY,
    NOT_RECORDED,
    Machines,
    _save_result,
    machine_name,
    run_jobs,
)

# Seconds a writer inside its read-modify-write window waits for the other one.
# Without the lock both are there at once; with it the other waits at the lock,
# so the first goes on after this and the second finds the gate broken.
WINDOW_WAIT_S = 3.0


def _save_in_step(path: Path, name: str, start: Any, window: Any) -> None:
    """Save one result (in its own process), holding its write until the other arrives.

    Exits non-zero when the gate was never reached: the test would then prove
    nothing about overlapping writers.
    """
    write, gated = common.write_text, []

    def write_at_the_gate(*args: Any, **kwargs: Any) -> None:
        gated.append(True)
        try:
            window.wait()  # both writers have read the file by now, unless locked out
        except threading.BrokenBarrierError:
            pass
        write(*args, **kwargs)

    common.write_text = write_at_the_gate
    start.wait()
    _save_result(path, name, {"fid": float(name[0] == "c") + 2.0})
    raise SystemExit(0 if gated == [True] else 3)


def test_two_concurrent_writers_keep_each_others_results(tmp_path: Path) -> None:
    # Prepare: a file with one result; two processes that start together and
    # each reach their write with the file already read
    path = tmp_path / "data" / "results.json"
    _save_result(path, "a|0", {"fid": 1.0})
    context = multiprocessing.get_context("spawn")
    start, window = context.Barrier(2, timeout=120), context.Barrier(2, timeout=WINDOW_WAIT_S)
    writers = [context.Process(target=_save_in_step, args=(path, name, start, window))
               for name in ("b|0", "c|0")]

    # Execute: each saves its own job; neither knows the other's
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)

    # Assert: both wrote through the gate, and neither lost the other's result
    assert [w.exitcode for w in writers] == [0, 0]
    saved = json.loads(path.read_text())
    assert saved == {"a|0": {"fid": 1.0}, "b|0": {"fid": 2.0}, "c|0": {"fid": 3.0}}
    assert not path.with_suffix(".tmp").exists()


def test_a_rerun_job_replaces_only_its_own_result(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "results.json"
    _save_result(path, "a|0", {"fid": 1.0})
    _save_result(path, "b|0", {"fid": 2.0})

    # Execute
    _save_result(path, "a|0", {"fid": 5.0})

    # Assert
    assert json.loads(path.read_text()) == {"a|0": {"fid": 5.0}, "b|0": {"fid": 2.0}}


def _job() -> dict[str, float]:
    """A job of the pool: no training, one number."""
    return {"fid": 7.0}


def test_each_result_names_the_machine_it_ran_on(tmp_path: Path) -> None:
    # Prepare: a result saved before results named their machine
    path = tmp_path / "results.json"
    _save_result(path, "old|0", {"fid": 1.0})

    # Execute: one job in the pool, as a benchmark runs it
    results = run_jobs({"old|0": _job, "new|0": _job}, path, processes=1)

    # Assert: the new result holds its machine; the old one is shown as not recorded
    saved = json.loads(path.read_text())
    assert saved == results
    info = saved["new|0"][MACHINE_KEY]
    assert saved["new|0"]["fid"] == 7.0 and info["cores"] >= 1 and info["cpu"]
    machines = Machines(saved)
    assert machines.tag(["new|0"]) == "M1"
    assert machines.tag(["old|0"]) == NOT_RECORDED
    assert machines.tag(["new|0", "old|0"]) == f"M1, {NOT_RECORDED}"
    assert f"- M1: {machine_name(info)}; results from {info['utc']}" in "\n".join(
        machines.legend())


def test_rows_of_two_machines_get_two_tags() -> None:
    # Prepare: the same job name pattern on two machines, and a row never run
    first = {"cpu": "CPU A", "cores": 2, "gpu": "no GPU", "torch": "2", "flwr": "1",
             "python": "3.11", "load": 0.5, "utc": "2026-01-02 10:00"}
    second = {**first, "cpu": "CPU B", "load": 3.0, "utc": "2026-01-01 09:00"}
    later = {**first, "load": 1.0, "utc": "2026-01-03 11:00"}
    results = {"x|0": {MACHINE_KEY: first}, "x|1": {MACHINE_KEY: second},
               "y|0": {MACHINE_KEY: later}}

    # Execute
    machines = Machines(results)

    # Assert: load and time do not split a machine; each tag's span of times is shown
    assert machines.tag(["x|0", "x|1"]) == "M1, M2"
    assert machines.tag(["y|0"]) == "M1"
    assert machines.tag(["z|0"]) == "–"
    legend = "\n".join(machines.legend())
    assert "M1: CPU A, 2 cores" in legend and "2026-01-02 10:00 to 2026-01-03 11:00" in legend
    assert "M2: CPU B" in legend and NOT_RECORDED not in legend
