"""RunConfig: validation names the key; pyproject and the settings table agree."""

from __future__ import annotations

import tomllib

import pytest

from fedgan_app.config import RunConfig
from fedgan_app.config_docs import (
    SETTINGS_DOC,
    TABLE_BEGIN,
    TABLE_END,
    markdown_table,
    pyproject_section,
)
from fedgan_app.settings import SETTINGS, ConfigError
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


def _pyproject_comments() -> dict[str, str]:
    """Each key of [tool.flwr.app.config] -> the comment lines above it, joined."""
    text = (REPO_ROOT / "pyproject.toml").read_text().split("[tool.flwr.app.config]")[1]
    comments, pending = {}, []
    for line in text.split("\n[")[0].splitlines():
        if line.startswith("# "):
            pending.append(line[2:])
        elif "=" in line:
            comments[line.split("=")[0].strip()] = " ".join(pending)
            pending = []
    return comments


def test_every_pyproject_comment_is_the_settings_help_and_allowed_values() -> None:
    # Prepare / Execute
    comments = _pyproject_comments()

    # Assert: key by key, then the section as a whole is exactly the generated one
    assert list(comments) == [s.key for s in SETTINGS]
    for setting in SETTINGS:
        assert comments[setting.key] == f"{setting.help} Allowed: {setting.allowed()}.", (
            setting.key)
    text = (REPO_ROOT / "pyproject.toml").read_text()
    assert pyproject_section() in text, (
        "pyproject.toml is out of date: run `python -m fedgan_app.config_docs --update .`")


def _settings_doc_rows() -> dict[str, tuple[str, str, str]]:
    """docs/settings.md's table rows: key -> (default, allowed, meaning)."""
    page = (REPO_ROOT / SETTINGS_DOC).read_text()
    table = page.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        key, default, allowed, meaning = (c.strip() for c in line.strip("|").split(" | "))
        rows[key.strip("`")] = (default.strip("`"), allowed, meaning)
    return rows


def test_the_settings_page_table_matches_the_settings_value_by_value() -> None:
    # Prepare / Execute
    rows = _settings_doc_rows()

    # Assert: every key, default, allowed value and meaning; then the exact text
    assert list(rows) == [s.key for s in SETTINGS]
    for setting in SETTINGS:
        assert rows[setting.key] == (repr(setting.default), setting.allowed(),
                                     setting.help), setting.key
    page = (REPO_ROOT / SETTINGS_DOC).read_text()
    assert f"{TABLE_BEGIN}\n{markdown_table()}{TABLE_END}" in page, (
        f"{SETTINGS_DOC} is out of date: run `python -m fedgan_app.config_docs --update .`")


def test_the_removed_aggregation_setting_names_its_replacement() -> None:
    with pytest.raises(ConfigError, match="'aggregation' was replaced by 'strategy'"):
        RunConfig.from_run_config({"aggregation": "median"})


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
        if setting.high_open:
            bad.append(setting.kind(setting.high))
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
    cfg = RunConfig.defaults(lr_generator=2e-4, lr_decay_every=2, lr_decay_factor=0.5)

    # Execute
    rates = [cfg.lr_at(r)[0] for r in range(1, 6)]

    # Assert
    assert rates == pytest.approx([2e-4, 2e-4, 1e-4, 1e-4, 5e-5])


def test_run_name_must_be_plain_folder_name() -> None:
    with pytest.raises(ConfigError, match="'run-name'"):
        RunConfig.from_run_config({"run-name": "../escape"})


@pytest.mark.parametrize("policy,fraction,keeps", [
    ("auto", 1.0, True), ("auto", 0.5, False), ("keep", 0.1, True), ("reset", 1.0, False)])
def test_client_optimizer_state_auto_keeps_it_only_when_every_client_trains_each_round(
        policy: str, fraction: float, keeps: bool) -> None:
    # Execute
    cfg = RunConfig.defaults(client_optimizer_state=policy, fraction_train=fraction)

    # Assert
    assert cfg.keeps_optimizer_state is keeps


def test_conditional_batchnorm_in_an_unconditional_gan_is_refused() -> None:
    with pytest.raises(ConfigError, match="'g-conditioning' is 'batchnorm' but an "
                       "unconditional GAN has no labels"):
        RunConfig.from_run_config({"conditional": False, "g-conditioning": "batchnorm"})
    assert RunConfig.from_run_config({"g-conditioning": "batchnorm"}).g_conditioning == \
        "batchnorm"
