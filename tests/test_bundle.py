"""The app bundle (FAB) that `flwr build` makes meets Flower Hub's rules.

Flower Hub publishes an app whose bundle holds only .py, .toml, .md, .yaml,
.json and .jsonl files (plus the LICENSE it declares), at most 1 MB each and
10 MB in all, and whose pyproject declares `fab-format-version` and
`flwr-version-target`. The test builds the bundle with the real `flwr build`
from a copy of the repository's files (what git tracks or would track, as a
clone has them), reads it back, and also runs the checks `flwr app publish`
makes before it uploads (Flower's own code; `flwr app review` needs Flower Hub
online, so it cannot run here).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.app_cmd.publish import _collect_file_paths, _validate_files
from flwr.cli.config_utils import load_and_validate
from flwr.supercore.constant import MAX_FILE_BYTES, MAX_TOTAL_BYTES
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parent.parent
HUB_SUFFIXES = (".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl")
BUNDLE_META = ".info/CONTENT"  # Flower's own manifest inside every FAB


@pytest.fixture(scope="module")
def app_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files as a clone has them, in a folder named like the app."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    app = tmp_path_factory.mktemp("bundle") / "fedgan"
    for name in listed.stdout.splitlines():
        source = REPO_ROOT / name
        if source.is_file():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, app / name)
    return app


@pytest.fixture(scope="module")
def bundle(app_copy: Path) -> zipfile.ZipFile:
    """The FAB `flwr build` writes for the copy."""
    out = app_copy.parent / "out"
    out.mkdir()
    flwr = Path(sys.executable).with_name("flwr")
    subprocess.run([str(flwr), "build", "--app", str(app_copy)], cwd=out, check=True,
                   capture_output=True, text=True, timeout=300)
    (fab,) = out.glob("*.fab")
    return zipfile.ZipFile(fab)


def test_the_bundle_holds_only_files_flower_hub_accepts(bundle: zipfile.ZipFile) -> None:
    # Execute
    entries = bundle.infolist()
    names = [e.filename for e in entries]

    # Assert: file types, sizes and total; the LICENSE is in
    assert "LICENSE" in names and "pyproject.toml" in names
    assert "fedgan_app/server_app.py" in names
    odd = [n for n in names if not n.endswith(HUB_SUFFIXES) and n not in ("LICENSE",
                                                                          BUNDLE_META)]
    assert odd == []
    assert max(e.file_size for e in entries) <= MAX_FILE_BYTES
    assert sum(e.file_size for e in entries) <= MAX_TOTAL_BYTES
    # Nothing the app writes (run folders, checkpoints, caches, images) travels in it
    assert not [n for n in names if n.startswith(("outputs/", ".cache/", "benchmarks/runs/"))]


def test_the_bundle_declares_its_format_and_flower_version(bundle: zipfile.ZipFile) -> None:
    # Prepare
    config = tomllib.loads(bundle.read("pyproject.toml").decode())

    # Execute
    app = config["tool"]["flwr"]["app"]
    flwr_requirement = next(d for d in config["project"]["dependencies"]
                            if d.startswith("flwr["))

    # Assert: format 1 needs a LICENSE file, a >= lower bound and a target within it
    assert app["fab-format-version"] == 1
    assert config["project"]["license"] == {"file": "LICENSE"}
    assert ">=" in flwr_requirement
    assert app["flwr-version-target"] in Requirement(flwr_requirement).specifier


def test_flower_accepts_the_app_as_it_would_before_publishing(app_copy: Path) -> None:
    # Execute: Flower's own validation of pyproject, then `flwr app publish`'s checks
    config, _warnings = load_and_validate(app_copy / "pyproject.toml")
    files = _collect_file_paths(app_copy)
    _validate_files(files)  # raises a ClickException naming any file that breaks a rule

    # Assert
    assert config["tool"]["flwr"]["app"]["components"]["serverapp"]
    assert app_copy / "LICENSE" in files
