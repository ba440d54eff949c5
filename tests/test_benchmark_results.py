"""The benchmarks' results file: a result once saved is never lost."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import _save_result


def test_two_writers_keep_each_others_results(tmp_path: Path) -> None:
    # Prepare: a file with one result, as two benchmark processes both read it
    path = tmp_path / "data" / "results.json"
    _save_result(path, "a|0", {"fid": 1.0})

    # Execute: each saves its own job; neither knows the other's
    first = _save_result(path, "b|0", {"fid": 2.0})
    second = _save_result(path, "c|0", {"fid": 3.0})

    # Assess
    saved = json.loads(path.read_text())
    assert saved == {"a|0": {"fid": 1.0}, "b|0": {"fid": 2.0}, "c|0": {"fid": 3.0}}
    assert set(first) == {"a|0", "b|0"} and second == saved
    assert not path.with_suffix(".tmp").exists()


def test_a_rerun_job_replaces_only_its_own_result(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "results.json"
    _save_result(path, "a|0", {"fid": 1.0})
    _save_result(path, "b|0", {"fid": 2.0})

    # Execute
    _save_result(path, "a|0", {"fid": 5.0})

    # Assess
    assert json.loads(path.read_text()) == {"a|0": {"fid": 5.0}, "b|0": {"fid": 2.0}}
