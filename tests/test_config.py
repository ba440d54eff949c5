"""RunConfig: validation names the key; pyproject and the settings table agree."""

from __future__ import annotations

import tomllib

import pytest

from fedgan_app.config import SETTINGS, ConfigError, RunConfig
from tests.conftest import REPO_ROOT


def _pyproject_config() -> dict:
    """The [tool.flwr.app.config] table of pyproject.toml."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_match_settings_table() -> None:
    # Prepare / Execute
    config = _pyproject_config()

    # Assert: same keys, same defaults, and pyproject's values validate
    assert list(config) == [s.key for s in SETTINGS]
    for setting in SETTINGS:
        assert config[setting.key] == setting.default, setting.key
    assert RunConfig.from_run_config(config) == RunConfig.defaults()


def test_every_pyproject_key_has_a_comment() -> None:
    # Prepare
    text = (REPO_ROOT / "pyproject.toml").read_text().split("[tool.flwr.app.config]")[1]
    lines = text.split("\n[")[0].splitlines()

    # Execute / Assert: the line above each "key = value" is a comment
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"


def _bad_values(setting) -> list:
    """Values that must be rejected for a setting: wrong type, out of range."""
    wrong_type = {int: "3", float: "0.1", str: 5, bool: "yes"}[setting.kind]
    bad = [wrong_type]
    if setting.kind is int:
        bad.append(True)  # bool must not pass as int
        bad.append(1.5)
    if setting.choices:
        bad.append("not-a-choice")
    if setting.low is not None:
        low = setting.low if setting.low_open else setting.low - 1
        bad.append(setting.kind(low))
    if setting.high is not None:
        bad.append(setting.kind(setting.high + 1))
    if setting.kind is float:
        bad.append(float("nan"))
    return bad


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.key for s in SETTINGS])
def test_each_key_rejects_bad_values_naming_the_key(setting) -> None:
    for bad in _bad_values(setting):
        # Execute / Assert
        with pytest.raises(ConfigError, match=f"'{setting.key}'"):
            RunConfig.from_run_config({setting.key: bad})


def test_choice_error_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config({"partitioner": "random"})
    assert "'iid', 'dirichlet', 'pathological'" in str(info.value)


def test_unknown_key_is_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="'num-rounds'"):
        RunConfig.from_run_config({"num-rounds": 3})


def test_int_accepted_for_float_key() -> None:
    assert RunConfig.from_run_config({"lr-generator": 1}).lr_generator == 1.0


def test_lr_schedule_decays_every_n_rounds() -> None:
    # Prepare
    cfg = RunConfig.defaults(lr_decay_every=2, lr_decay_factor=0.5)

    # Execute
    rates = [cfg.lr_at(r)[0] for r in range(1, 6)]

    # Assert
    assert rates == pytest.approx([2e-4, 2e-4, 1e-4, 1e-4, 5e-5])


def test_run_name_must_be_plain_folder_name() -> None:
    with pytest.raises(ConfigError, match="'run-name'"):
        RunConfig.from_run_config({"run-name": "../escape"})


def test_readme_documents_every_setting() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for setting in SETTINGS:
        assert f"| `{setting.key}` |" in readme, setting.key
