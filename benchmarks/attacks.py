"""Hostile metadata: the size of each shape, the time and memory to refuse it, the reason.

Run by hand from the repository root, alone on the machine:

    .venv/bin/python benchmarks/attacks.py

Every shape of harness/attacks.py is decoded by the server's decoder
(`fedgan_app.protocol.metadata.decode_metadata`) in a child process of its own, under a
2 GiB address-space limit and a 60 s timeout, so a shape that hangs or floods
shows up as such instead of stopping the benchmark. Each shape is decoded
`--repeats` times for the median time, then once more under tracemalloc for
the peak memory. The table is written between the markers of the "Hostile
metadata" section of benchmarks/results/faults.md; what a whole run does with
each shape (one client sending it every round) is proven by
tests/test_faults.py::test_every_hostile_shape_from_a_client_of_a_whole_run_is_dropped_and_counted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, command_line, machine_header  # noqa: E402
from fedgan_app.files import write_text  # noqa: E402

BEGIN = "<!-- hostile metadata table: written by benchmarks/attacks.py -->"
END = "<!-- end of the hostile metadata table -->"
MEMORY_LIMIT = 2 * 1024**3
TIMEOUT_S = 60


def measure(index: int, repeats: int) -> dict:
    """Decode attack `index` `repeats` times, then once under tracemalloc."""
    from flwr.app import ConfigRecord

    from fedgan_app.protocol.metadata import METADATA_KEY, MetadataError, decode_metadata
    from harness.attacks import ATTACKS

    attack = ATTACKS[index]
    marker = Path(f"/nonexistent/fedgan-attack-{index}")
    record = ConfigRecord({METADATA_KEY: attack.build(marker)})
    times, outcome = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            decode_metadata(record, num_classes=10)
            outcome = "decodes"
        except MetadataError as exc:
            outcome = str(exc)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    try:
        decode_metadata(record, num_classes=10)
    except MetadataError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"family": attack.family, "name": attack.name,
            "bytes": len(record[METADATA_KEY]), "median_s": statistics.median(times),
            "max_s": max(times), "peak_bytes": peak, "outcome": outcome}


def _limit_memory() -> None:
    """In the child: at most MEMORY_LIMIT bytes of address space."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_one(index: int, repeats: int) -> dict:
    """Measure one attack in a child process with a memory limit and a timeout."""
    command = [sys.executable, __file__, "--one", str(index), "--repeats", str(repeats)]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S,
                               preexec_fn=_limit_memory, check=False)
    except subprocess.TimeoutExpired:
        return {"index": index, "outcome": f"did not finish in {TIMEOUT_S} s"}
    if child.returncode != 0:
        return {"index": index, "outcome": f"child failed: {child.stderr.strip()[-300:]}"}
    return json.loads(child.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """The markdown table of every shape."""
    lines = ["| family | shape | bytes | refused in (median, max) | peak memory | reason |",
             "|---|---|---:|---|---:|---|"]
    for row in rows:
        reason = row["outcome"].replace("|", "\\|")
        if row["outcome"] == "decodes":
            reason = "decodes: well-formed; the reply check drops the claim (`weight: ...`)"
        lines.append(
            f"| {row.get('family', '?')} | {row.get('name', row.get('index'))} | "
            f"{row.get('bytes', 0):,} | {row.get('median_s', float('nan')) * 1000:.2f} ms, "
            f"{row.get('max_s', float('nan')) * 1000:.2f} ms | "
            f"{row.get('peak_bytes', 0) / 1e6:.2f} MB | {reason} |")
    return "\n".join(lines)


def write_report(rows: list[dict], path: Path) -> None:
    """Replace the table between the markers of faults.md (appended when missing)."""
    text = path.read_text(encoding="utf-8")
    section = (f"{BEGIN}\n\n{machine_header()}\n\nCommand: `{command_line()}`. Each shape "
               "decoded in a child process (2 GiB address-space limit, 60 s timeout); "
               "median and max of the repeats, peak memory from tracemalloc in a last "
               f"decode.\n\n{table(rows)}\n\n{END}")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text(path, text)


def main() -> None:
    """Measure every shape, each in its own child, and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    from harness.attacks import ATTACKS

    rows = []
    for index, attack in enumerate(ATTACKS):
        rows.append(run_one(index, args.repeats))
        print(f"{attack.family}: {attack.name}: {rows[-1]['outcome'][:90]}", flush=True)
    write_report(rows, RESULTS_DIR / "faults.md")
    print(f"wrote {RESULTS_DIR / 'faults.md'}")


if __name__ == "__main__":
    main()
