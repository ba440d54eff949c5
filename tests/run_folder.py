"""Run folders and settings shared by the tests.

`write_contract_run` writes a run folder in the shared clients.csv contract,
for the animation and dashboard tests: one clients.csv row per reply per
round, accepted, dropped and failed alike, with `status`, `reason`, `weight`
(p_j = n_j / sum n over the accepted replies, 0 otherwise) and
`label-histogram` (class counts joined by `;`); a failed reply has only its
node id. Its run_config.json holds today's settings (`run_settings`).

Run folders are named and read through `fedgan_app.outputs.runfolder`
(`RunFolder`, `read_rows`), never by typing the file names again.

Also `RunFolderHolder`: another process that opens a run folder as a run does
and keeps it, for the tests of the run folder's lock.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedgan_app.config import RunConfig
from fedgan_app.outputs.runfolder import RunFolder
from fedgan_app.quality.judge import make_grid

CLIENT_COLUMNS = [
    "round", "node-id", "partition-id", "num-examples", "steps", "loss-d", "loss-g",
    "d-x", "d-gz", "wall-time-s", "converged", "classes", "device", "status", "reason",
    "weight", "label-histogram",
]
METRIC_COLUMNS = [
    "round", "loss-d", "loss-g", "d-x", "d-gz", "replies-accepted", "replies-dropped",
    "replies-failed", "round-time-s", "fid",
]
# Non-IID partitions: client p has mostly classes 2p and 2p+1.
HISTOGRAMS = {
    0: [300, 250, 10, 0, 0, 0, 5, 0, 0, 0],
    1: [0, 0, 200, 180, 20, 0, 0, 0, 0, 0],
    2: [0, 0, 0, 10, 120, 100, 0, 0, 0, 0],
}
NORM_REASON = "norm: update norm 12.3 > 10 x median 1.1"


def run_settings(**overrides: Any) -> dict[str, Any]:
    """Today's full settings (kebab-case, as run_config.json holds them), with overrides.

    Overrides use the settings' Python names (``num_server_rounds=3``).
    """
    return RunConfig.defaults(**overrides).to_dict()


def sample_grid(server_round: int) -> np.ndarray:
    """A distinct 4x4 grid of 28x28 noise images per round."""
    gen = torch.Generator().manual_seed(1000 + server_round)
    return make_grid(torch.rand((16, 1, 28, 28), generator=gen) * 2 - 1, nrow=4)


def write_contract_run(
    run_dir: Path,
    rounds: int,
    dropped: dict[int, int] | None = None,
    failed: dict[int, int] | None = None,
    grids: bool = True,
) -> Path:
    """Write a run folder of 3 clients; ``dropped``/``failed`` map round -> partition.

    Returns the run folder. Weights follow the contract; wall times differ per
    client (client p trains 2 + 3p seconds).
    """
    dropped, failed = dropped or {}, failed or {}
    folder = RunFolder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder.run_config_json.write_text(json.dumps(run_settings(num_server_rounds=rounds)))
    client_rows: list[dict[str, Any]] = []
    metric_rows: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        statuses = {p: "accepted" for p in HISTOGRAMS}
        if r in dropped:
            statuses[dropped[r]] = "dropped"
        if r in failed:
            statuses[failed[r]] = "failed"
        total = sum(sum(HISTOGRAMS[p]) for p, s in statuses.items() if s == "accepted")
        for p, hist in HISTOGRAMS.items():
            node = 101 + p
            if statuses[p] == "failed":
                client_rows.append({"round": r, "node-id": node, "status": "failed",
                                    "reason": "ClientAppException: injected", "weight": 0})
                continue
            n = sum(hist)
            client_rows.append({
                "round": r, "node-id": node, "partition-id": p, "num-examples": n,
                "steps": 3, "loss-d": 1.2 - 0.01 * r, "loss-g": 0.8 + 0.02 * r,
                "d-x": 0.55, "d-gz": 0.45, "wall-time-s": 2.0 + 3.0 * p, "converged": 0,
                "classes": sum(1 for c in hist if c), "device": "cpu",
                "status": statuses[p],
                "reason": NORM_REASON if statuses[p] == "dropped" else "",
                "weight": n / total if statuses[p] == "accepted" else 0,
                "label-histogram": ";".join(str(c) for c in hist),
            })
        metric_rows.append({
            "round": r, "loss-d": 1.2 - 0.01 * r, "loss-g": 0.8 + 0.02 * r, "d-x": 0.55,
            "d-gz": 0.45,
            "replies-accepted": sum(1 for s in statuses.values() if s == "accepted"),
            "replies-dropped": sum(1 for s in statuses.values() if s == "dropped"),
            "replies-failed": sum(1 for s in statuses.values() if s == "failed"),
            "round-time-s": 9.5, "fid": 200.0 - r if r == rounds else "",
        })
    _write_csv(folder.clients_csv, CLIENT_COLUMNS, client_rows)
    _write_csv(folder.metrics_csv, METRIC_COLUMNS, metric_rows)
    if grids:
        import imageio.v3 as iio

        folder.samples_dir.mkdir(exist_ok=True)
        for r in range(rounds + 1):
            iio.imwrite(folder.sample(r), sample_grid(r))
    return run_dir


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """Write rows under a header; missing cells stay empty."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


# A run that opens its run folder (the real Recorder) and holds it until stdin closes.
_HOLDER = """
import sys
from fedgan_app.config import RunConfig
from fedgan_app.outputs.recorder import Recorder, run_folder
cfg = RunConfig.defaults(output_dir=sys.argv[1], run_name=sys.argv[2], wandb_mode="disabled")
recorder = Recorder(cfg, run_folder(cfg, None))
recorder.open()
print("open", flush=True)
sys.stdin.read()
recorder.finish()
"""
REPO_ROOT = Path(__file__).resolve().parents[1]


class RunFolderHolder:
    """Another process that opens ``output_dir/run_name`` as a run and holds it.

    Use as a context manager: on entry the folder is open (its lock taken);
    `close` lets the run finish, `kill` ends the process with SIGKILL.
    """

    def __init__(self, output_dir: Path, run_name: str) -> None:
        self.args = [sys.executable, "-c", _HOLDER, str(output_dir), run_name]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> RunFolderHolder:
        self.proc = subprocess.Popen(self.args, cwd=REPO_ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()  # blocks until the folder is open
        if line.strip() != "open":
            self.kill()
            raise RuntimeError(f"the holder did not open the folder: {self.proc.stderr.read()}")
        return self

    @property
    def pid(self) -> int:
        """The holding process's id."""
        return self.proc.pid

    def close(self) -> int:
        """Let the run finish (it releases the lock); its exit status."""
        self.proc.stdin.close()
        return self.proc.wait(timeout=120)

    def kill(self) -> None:
        """SIGKILL the process: no finish, no cleanup, as a crash."""
        self.proc.kill()
        self.proc.wait(timeout=120)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()
