"""Federations through the real `flwr run` on a private local SuperLink: wall time, rows, memory.

Used by benchmarks/throughput.py and benchmarks/under_load.py. Each run has a
Flower home and ports of its own (harness.local_superlink), so it never
touches a SuperLink the user started, and is stopped by PID after.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import read_rows
from deploy.processes import descendants, process_table
from fedgan_app.outputs.runfolder import RunFolder
from harness.local_superlink import LocalFlower

# The default federation: what `./fedgan.sh run` starts.
FEDERATION_CLIENTS = 5


class TreeMemory:
    """Samples the memory of a SuperLink's whole process tree every `interval` s.

    Each sample lists the processes (`ps`) and reads their /proc files: about
    0.1 s of CPU, so the federation's own timing uses a long interval.
    """

    def __init__(self, flower: Any, interval: float) -> None:
        self.flower = flower
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []  # (time, rss MB, pss MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        """Sample the tree's RSS and PSS sums until stopped."""
        links: list[int] = []
        while not self._stop.wait(self.interval):
            links = links or self.flower.superlink_pids()  # found once
            if not links:
                continue
            table = process_table()
            pids = [p for link in links for p in (link, *descendants(link, table))]
            rss = pss = 0.0
            for pid in pids:
                rss += _proc_kb(f"/proc/{pid}/status", "VmRSS:")
                pss += _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")
            self.samples.append((time.time(), rss / 1024, pss / 1024))

    @property
    def peak(self) -> tuple[float, float]:
        """Peak (RSS sum, PSS sum) in MB."""
        if not self.samples:
            return float("nan"), float("nan")
        return max(s[1] for s in self.samples), max(s[2] for s in self.samples)


def _proc_kb(path: str, field: str) -> float:
    """A kB field of a /proc file (0 when the process is gone)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def run_federation(name: str, out: Path, run_config: dict[str, Any], nodes: int,
                   resources: dict[str, float], timeout: float = 3600,
                   memory_interval: float = 5.0) -> dict[str, Any]:
    """One `flwr run` on a private SuperLink: wall time, rows, memory.

    `resources` are the simulation's Ray settings (cores.simulation_resources
    keys, e.g. client-resources-num-cpus), passed in --federation-config.
    """
    home = out / "flwr-home" / name
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(out / name, ignore_errors=True)
    flower = LocalFlower(home)
    config = {**run_config, "output-dir": str(out), "run-name": name,
              "wandb-mode": run_config.get("wandb-mode", "offline")}
    text = " ".join(f"{k}={_toml(v)}" for k, v in config.items())
    federation = " ".join([f"num-supernodes={nodes}",
                           *(f"{key}={value:g}" for key, value in resources.items())])
    try:
        with TreeMemory(flower, memory_interval) as memory:
            started = time.time()
            proc = flower.flwr("run", ".", "--stream", "--run-config", text,
                               "--federation-config", federation, timeout=timeout)
            ended = time.time()
        output = proc.stdout + proc.stderr
        run_id = next((int(w) for line in output.splitlines() if "started run" in line
                       for w in line.split() if w.isdigit()), None)
        status = flower.status(run_id) if run_id is not None else "did not start"
    finally:
        flower.stop()
    run_dir = out / name
    summary = (json.loads(RunFolder(run_dir).summary_json.read_text())
               if RunFolder(run_dir).summary_json.is_file() else {})
    return {"name": name, "status": status, "started": started, "wall_s": ended - started,
            "rows": read_rows(RunFolder(run_dir).metrics_csv),
            "clients": read_rows(RunFolder(run_dir).clients_csv), "summary": summary,
            "peak_rss_mb": memory.peak[0], "peak_pss_mb": memory.peak[1],
            "memory": memory.samples, "config": config, "nodes": nodes,
            "output_tail": output[-2000:] if status != "finished:completed" else ""}


def _toml(value: Any) -> str:
    """A run-config value as `flwr run --run-config` reads it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"'{value}'"
    return repr(value)


def images_trained(run: dict[str, Any]) -> float:
    """Images the clients trained on (accepted and dropped replies), from clients.csv."""
    batch = run["config"].get("batch-size") or default_setting("batch-size")
    return sum(row.get("steps", 0.0) * batch for row in run["clients"]
               if row.get("status", "accepted") != "failed")


def default_setting(key: str) -> Any:
    """A setting's default, from the app's settings table."""
    from fedgan_app.settings import SETTINGS_BY_KEY

    return SETTINGS_BY_KEY[key].default
