"""fedgan_app.outputs.dashboard: the page of real run folders, its server, a real browser."""

from __future__ import annotations

import hashlib
import html
import http.client
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest

from fedgan_app.federation import client_app as client_module
from fedgan_app.outputs.animation_layout import FRAMES_PER_ROUND
from fedgan_app.outputs.dashboard import newest_run, serve
from fedgan_app.outputs.page import GRID_SCALE, write_page
from fedgan_app.outputs.runfolder import (
    DASHBOARD_PAGE,
    DASHBOARD_STATE,
    LOSSES_PLOT,
    RunFolder,
)
from fedgan_app.outputs.views import AnimationBudget, refresh_run
from fedgan_app.server_app import main as server_main
from harness.inprocess import InProcessGrid, server_context
from harness.signals import ctrl_c_as_typed
from tests.run_folder import NORM_REASON, sample_grid, write_contract_run

REPO_ROOT = Path(__file__).resolve().parents[1]
# Flags for a quiet, offline, reproducible headless Chromium.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--force-device-scale-factor=1", "--force-color-profile=srgb", "--hide-scrollbars",
    "--window-size=1800,2000",
]


def _page(run_dir: Path) -> str:
    """The page's HTML."""
    return RunFolder(run_dir).dashboard_html.read_text(encoding="utf-8")


def _img_sources(page: str) -> list[str]:
    """The src of every img, without the cache-busting query."""
    return [src.split("?")[0] for src in re.findall(r'<img src="([^"]+)"', page)]


def _client_rows(page: str) -> dict[str, list[str]]:
    """Cells of the clients table, keyed by the client's label."""
    body = page.split('<table class="clients">', 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr class=\"\w+\">(.*?)</tr>", body):
        cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]
        rows[cells[0]] = cells
    return rows


def test_page_shows_newest_grids_curves_animation_and_clients(tmp_path: Path) -> None:
    # Prepare: 3 rounds, client 1 dropped in round 2, client 2 failed in round 3,
    # and a per-class grid as a conditional run writes one
    run_dir = write_contract_run(tmp_path / "run", rounds=3, dropped={2: 1}, failed={3: 2})
    iio.imwrite(RunFolder(run_dir).sample(3, per_class=True), sample_grid(99))

    # Execute
    refresh_run(run_dir)

    # Assert
    page = _page(run_dir)
    assert _img_sources(page) == [
        "samples/round_0003.png", "samples/classes_round_0003.png", "federation.gif",
        "plots/losses.png", "plots/quality.png", "progress.gif"]
    for name in ("federation.gif", "progress.gif", "plots/losses.png", "plots/quality.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert 'data-round="3"' in page and "round 3 of 3" in page and "finished" in page
    rows = _client_rows(page)
    assert sorted(rows) == ["client 0", "client 1", "client 2"]
    # accepted / dropped / failed counts, and the last problem with its reason
    assert rows["client 1"][10:13] == ["2", "1", "0"]
    assert rows["client 1"][13] == f"round 2: dropped ({NORM_REASON})"
    assert rows["client 2"][10:13] == ["2", "0", "1"]
    assert rows["client 2"][4] == "failed"
    assert rows["client 0"][5] == "2"  # wall time of its last reply, s
    state = json.loads(RunFolder(run_dir).dashboard_json.read_text())
    assert state["round"] == 3
    assert f'<meta name="fedgan-version" content="{state["version"]}">' in page


def test_animation_budget_waits_so_redraws_take_at_most_their_share() -> None:
    # Prepare: a clock the test moves
    now = [100.0]
    budget = AnimationBudget(0.25, clock=lambda: now[0])

    # Execute / Assert: due at first; a 1-s redraw at t=100 makes the next one due
    # 3 s later (1 s of every 4 s is a quarter)
    assert budget.due()
    budget.spent(1.0)
    now[0] = 102.9
    assert not budget.due()
    now[0] = 103.0
    assert budget.due()
    assert AnimationBudget(1.0, clock=lambda: 0.0).due()  # share 1: every round
    with pytest.raises(ValueError, match="animation share"):
        AnimationBudget(0.0)


def test_page_before_the_first_round_shows_the_initial_grid(tmp_path: Path) -> None:
    # Prepare: what the server has written when round 1 starts
    run_dir = tmp_path / "run"
    RunFolder(run_dir).samples_dir.mkdir(parents=True)
    RunFolder(run_dir).run_config_json.write_text(json.dumps({"num-server-rounds": 5}))
    iio.imwrite(RunFolder(run_dir).sample(0), sample_grid(0))

    # Execute
    refresh_run(run_dir)

    # Assert
    page = _page(run_dir)
    assert "waiting for round 1" in page and "round 0 of 5" in page
    assert _img_sources(page) == ["samples/round_0000.png", "progress.gif"]
    assert "no client rows yet" in page
    assert not RunFolder(run_dir).federation_gif.exists()


def test_a_broken_grid_is_skipped_with_a_warning_and_every_view_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: round 2's grid is not an image
    run_dir = write_contract_run(tmp_path / "run", rounds=2)
    broken = RunFolder(run_dir).sample(2)
    broken.write_bytes(b"not a png")
    caplog.set_level(logging.WARNING, logger="flwr")

    # Execute
    refresh_run(run_dir)

    # Assert: warnings name the file; the GIFs hold what could be read; page written
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(broken) in m for m in warnings)
    assert not any("refresh of" in m for m in warnings)  # no view failed as a whole
    assert len(iio.imread(RunFolder(run_dir).progress_gif, index=None)) == 2  # rounds 0 and 1
    assert len(iio.imread(RunFolder(run_dir).federation_gif, index=None)) == 2 * FRAMES_PER_ROUND
    assert RunFolder(run_dir).plot(LOSSES_PLOT).is_file()
    assert "samples/round_0002.png" in _img_sources(_page(run_dir))


def test_newest_run_is_the_one_written_last(tmp_path: Path) -> None:
    # Prepare
    old = write_contract_run(tmp_path / "outputs" / "old", rounds=1, grids=False)
    new = write_contract_run(tmp_path / "outputs" / "new", rounds=1, grids=False)
    (tmp_path / "outputs" / "not-a-run").mkdir()
    for run_dir, stamp in ((old, 2_000_000), (new, 1_000_000)):
        for name in ("metrics.csv", "run_config.json"):
            os.utime(run_dir / name, (stamp, stamp))
    os.utime(RunFolder(old).metrics_csv, (3_000_000, 3_000_000))

    # Execute
    newest = newest_run(tmp_path / "outputs")

    # Assert
    assert newest == old
    with pytest.raises(FileNotFoundError, match="no run folder under"):
        newest_run(tmp_path / "outputs" / "not-a-run")


def test_server_redirects_to_the_page_and_forbids_caching(tmp_path: Path) -> None:
    # Prepare
    run_dir = write_contract_run(tmp_path / "run", rounds=1)
    write_page(run_dir)
    (tmp_path / "secret.txt").write_text("outside the run folder")
    server = serve(run_dir, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    # Execute
    try:
        with urllib.request.urlopen(base + "/") as reply:
            page_url, page, page_cache = reply.url, reply.read(), reply.headers["Cache-Control"]
        with urllib.request.urlopen(base + "/samples/round_0001.png") as reply:
            png = reply.read()
        with pytest.raises(urllib.error.HTTPError) as outside:
            urllib.request.urlopen(base + "/../secret.txt")
    finally:
        server.shutdown()
        server.server_close()

    # Assert
    assert page_url == f"{base}/{DASHBOARD_PAGE}"
    assert page == RunFolder(run_dir).dashboard_html.read_bytes()
    assert page_cache == "no-store"
    assert png == RunFolder(run_dir).sample(1).read_bytes()
    assert outside.value.code == 404


@pytest.fixture
def served(tmp_path: Path) -> Any:
    """A finished run folder with everything a run leaves, served on a free port.

    Yields (run folder, port). Beside the page's files the folder holds
    checkpoints, W&B files, CSVs, the lock file, a folder and a FIFO named like
    grids, and symlinks: one to a file outside the run folder, one to a grid
    inside.
    """
    run_dir = write_contract_run(tmp_path / "run", rounds=2)
    refresh_run(run_dir)
    RunFolder(run_dir).checkpoints_dir.mkdir()
    RunFolder(run_dir).latest_pt.write_bytes(b"weights")
    RunFolder(run_dir).wandb_dir.mkdir()
    (RunFolder(run_dir).wandb_dir / "debug.log").write_text("W&B")
    (run_dir / ".fedgan-run.lock").write_text("pid 1")
    (RunFolder(run_dir).samples_dir / "folder.png").mkdir()
    os.mkfifo(run_dir / "plots" / "fifo.png")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"outside the run folder")
    RunFolder(run_dir).sample(9).symlink_to(secret)
    RunFolder(run_dir).plot("alias.png").symlink_to(RunFolder(run_dir).sample(1))
    server = serve(run_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield run_dir, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _request(port: int, path: str, method: str = "GET", host: str | None = "",
             ) -> tuple[int, bytes]:
    """(status, body) of one real HTTP request.

    `host` is the Host header sent: "" for the address served
    (127.0.0.1:port), None for none at all.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            connection.putheader("Host", host or f"127.0.0.1:{port}")
        connection.endheaders()
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def test_server_serves_every_file_the_page_loads_and_nothing_else(served: Any) -> None:
    # Prepare
    run_dir, port = served
    page = _page(run_dir)
    loaded = [DASHBOARD_PAGE, DASHBOARD_STATE, *_img_sources(page)]

    # Execute
    got = {path: _request(port, "/" + path) for path in loaded}
    refused = {path: _request(port, path)[0] for path in (
        "/checkpoints/latest.pt", "/checkpoints/", "/wandb/debug.log", "/metrics.csv",
        "/clients.csv", "/run_config.json", "/.fedgan-run.lock", "/samples/",
        "/samples", "/plots/", "/samples/folder.png", "/plots/fifo.png", "/samples/round_0009.png",
        "/samples/%2e%2e/checkpoints/latest.pt", "/samples/../run_config.json",
        "/../secret.png", "//etc/passwd", "/dashboard.html/", "/samples/round_0001.png%00",
    )}

    # Assert: the page's files, byte for byte (an inside symlink too); the rest 404
    assert {"samples/round_0002.png", "federation.gif", "plots/losses.png",
            "progress.gif"} <= set(loaded)
    for path, (status, body) in got.items():
        assert status == 200, path
        assert body == (run_dir / path).read_bytes(), path
    assert _request(port, "/plots/alias.png")[1] == (
        RunFolder(run_dir).sample(1)).read_bytes()
    assert refused == dict.fromkeys(refused, 404)


def test_server_answers_only_a_host_header_naming_its_own_address(served: Any) -> None:
    # Prepare: a page elsewhere that rebinds its DNS name to 127.0.0.1 sends its own name
    run_dir, port = served

    # Execute
    answers = {host: _request(port, "/" + DASHBOARD_PAGE, host=host)[0] for host in (
        f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}",
        f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1",
        f"localhost.evil.example:{port}", " ",
    )}
    answers["(none)"] = _request(port, "/" + DASHBOARD_PAGE, host=None)[0]

    # Assert: this machine's names for the address and port served, and nothing else
    assert answers == {f"127.0.0.1:{port}": 200, f"localhost:{port}": 200,
                       f"LocalHost:{port}": 200, f"[::1]:{port}": 200,
                       f"evil.example:{port}": 403, "evil.example": 403,
                       f"127.0.0.1:{port + 1}": 403, "127.0.0.1": 403,
                       f"localhost.evil.example:{port}": 403, " ": 403, "(none)": 403}


def test_server_answers_get_and_head_only(served: Any) -> None:
    # Prepare
    run_dir, port = served

    # Execute
    head_status, head_body = _request(port, "/" + DASHBOARD_STATE, method="HEAD")
    others = {m: _request(port, "/" + DASHBOARD_PAGE, method=m)[0]
              for m in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH")}

    # Assert
    assert (head_status, head_body) == (200, b"")
    assert all(status == 501 for status in others.values()), others


@pytest.mark.slow
def test_cli_serves_a_run_prints_the_url_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    # Prepare: a finished run without a page yet (the command writes it)
    run_dir = write_contract_run(tmp_path / "run", rounds=2)
    command = [sys.executable, "-m", "fedgan_app.outputs.dashboard", str(run_dir), "--port", "0",
               "--no-open"]

    # Execute
    page, returncode, output = _serve_then_interrupt(command, cwd=REPO_ROOT)

    # Assert
    assert returncode == 0, output
    assert "fedgan dashboard: stopped" in output
    assert page == RunFolder(run_dir).dashboard_html.read_bytes()
    assert RunFolder(run_dir).federation_gif.is_file()


@pytest.mark.slow
def test_fedgan_sh_dashboard_serves_the_newest_run_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    # Prepare: a checkout of the scripts with an outputs/ folder of two runs, and a
    # venv that fedgan.sh's setup accepts as installed (it sees this interpreter's
    # packages through a .pth file, so nothing is installed)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("fedgan.sh", "pyproject.toml"):
        shutil.copy2(REPO_ROOT / name, checkout / name)
    (checkout / "fedgan_app").symlink_to(REPO_ROOT / "fedgan_app")
    older = write_contract_run(checkout / "outputs" / "older", rounds=1)
    newest = write_contract_run(checkout / "outputs" / "newer", rounds=2)
    for name in ("metrics.csv", "run_config.json"):
        os.utime(older / name, (1_000_000, 1_000_000))
    venv = _venv_seeing_these_packages(tmp_path / "venv", checkout / "pyproject.toml")
    command = ["bash", str(checkout / "fedgan.sh"), "dashboard", "--port", "0", "--no-open"]

    # Execute
    page, returncode, output = _serve_then_interrupt(
        command, cwd=tmp_path, env={**os.environ, "FEDGAN_VENV": str(venv)})

    # Assert
    assert returncode == 0, output
    assert "outputs/newer at http://127.0.0.1:" in output
    assert page == RunFolder(newest).dashboard_html.read_bytes()
    assert not (checkout / "outputs" / "older" / DASHBOARD_PAGE).exists()


# --- a real browser -----------------------------------------------------------------


@pytest.mark.slow
def test_browser_shows_each_round_as_it_finishes(tiny_run_config: dict, tmp_path: Path) -> None:
    # Prepare: the real ServerApp and ClientApp run in a thread and wait before round 2
    # until the browser has seen round 1; the page is served as the command serves it
    webdriver = _selenium_or_skip()
    run_dir = Path(tiny_run_config["output-dir"]) / "test-run"
    before_round_2 = threading.Event()
    grid = _GatedGrid(client_module.app, num_nodes=2, run_config=tiny_run_config,
                      gate_round=2, gate=before_round_2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server_main(grid, server_context(tiny_run_config))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    training = threading.Thread(target=run, daemon=True)
    training.start()
    _wait_for(lambda: _state_round(run_dir) is not None, errors, "the page before round 1")
    server = serve(run_dir, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    driver = _chromium(webdriver, tmp_path / "profile")
    try:
        # Execute: look after round 1, let round 2 run, look again without navigating
        _wait_for(lambda: _state_round(run_dir) == 1, errors, "round 1")
        driver.get(url)
        shot_1 = _screenshot_at_round(driver, 1)
        files_1 = _snapshot(run_dir, "samples/round_0001.png", "plots/losses.png")
        before_round_2.set()
        _wait_for(lambda: not training.is_alive(), errors, "the end of the run", 300)
        shot_2 = _screenshot_at_round(driver, 2)
        files_2 = _snapshot(run_dir, "samples/round_0002.png", "plots/losses.png",
                            "plots/quality.png")
        # A conditional run's per-class grid appears beside the samples when written.
        iio.imwrite(RunFolder(run_dir).sample(2, per_class=True), sample_grid(77))
        write_page(run_dir)
        _wait_for_page(driver, lambda d: d.find_elements("id", "class-grid"))
        shot_3 = _screenshot_at_round(driver, 2)
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
        before_round_2.set()
        training.join(timeout=60)

    # Assert: each screenshot holds that round's grid (at GRID_SCALE, pixel for pixel)
    # and that round's loss curves, exactly as the files on disk held them then
    assert not errors, errors
    assert _find(shot_1, _scaled(files_1["samples/round_0001.png"])) is not None
    assert _find(shot_1, files_1["plots/losses.png"]) is not None
    assert _find(shot_2, _scaled(files_2["samples/round_0002.png"])) is not None
    assert _find(shot_2, files_2["plots/losses.png"]) is not None
    assert _find(shot_2, files_2["plots/quality.png"]) is not None  # fid at the last round
    # ... and not the other round's: the page changed with the run
    assert _find(shot_2, _scaled(files_1["samples/round_0001.png"])) is None
    assert _find(shot_1, files_2["plots/losses.png"]) is None
    assert _find(shot_3, _scaled(sample_grid(77))) is not None


class _GatedGrid(InProcessGrid):
    """An InProcessGrid that holds the train messages of one round until a gate opens."""

    def __init__(self, *args: Any, gate_round: int, gate: threading.Event, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate_round, self.gate = gate_round, gate

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        """Wait at the gate before the gated round's training, then run as usual."""
        messages = list(messages)
        if any(m.metadata.message_type.startswith("train")
               and m.content["config"]["server-round"] == self.gate_round for m in messages):
            self.gate.wait(timeout=300)
        return super().send_and_receive(messages, timeout=timeout)


def _selenium_or_skip() -> Any:
    """Selenium's webdriver module when Chromium, its driver and Selenium are here.

    Missing any: a failure in CI (the CI script installs them), a skip elsewhere.
    """
    missing = [name for name in ("chromium", "chromedriver") if _which(name) is None]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
        webdriver = None
    if missing:
        reason = ("no headless browser: missing " + ", ".join(missing)
                  + " (Debian: apt-get install chromium chromium-driver)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return webdriver


def _which(name: str) -> str | None:
    """Path of a program (chromium is chromium-browser on some systems)."""
    alternatives = {"chromium": ("chromium", "chromium-browser"),
                    "chromedriver": ("chromedriver",)}
    return next((p for n in alternatives[name] if (p := shutil.which(n))), None)


def _chromium(webdriver: Any, profile: Path) -> Any:
    """A headless Chromium driven by the system chromedriver (no Selenium Manager)."""
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _which("chromium")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=_which("chromedriver")),
                            options=options)


def _screenshot_at_round(driver: Any, server_round: int) -> np.ndarray:
    """Wait until the page shows ``server_round`` with every image loaded; screenshot."""
    _wait_for_page(driver, lambda d: d.find_element("tag name", "body")
                   .get_attribute("data-round") == str(server_round))
    _wait_for_page(driver, lambda d: d.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"))
    return iio.imread(driver.get_screenshot_as_png(), extension=".png")[..., :3]


def _wait_for_page(driver: Any, condition: Any, timeout: float = 60) -> None:
    """Selenium's explicit wait (the page reloads itself: no navigation here)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _wait_for(condition: Any, errors: list[BaseException], what: str,
              timeout: float = 300) -> None:
    """Poll until condition() holds; fail on a training error or after timeout s."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert not errors, f"the run failed before {what}: {errors[0]!r}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _state_round(run_dir: Path) -> int | None:
    """The round dashboard.json says the page shows, None before it exists."""
    try:
        return json.loads(RunFolder(run_dir).dashboard_json.read_text())["round"]
    except (OSError, ValueError):
        return None


def _snapshot(run_dir: Path, *names: str) -> dict[str, np.ndarray]:
    """The pixels of run files now (they are rewritten every round)."""
    return {name: iio.imread(run_dir / name)[..., :3] for name in names}


def _scaled(image: np.ndarray) -> np.ndarray:
    """An image as the page shows sample grids: GRID_SCALE x, nearest neighbour."""
    return image.repeat(GRID_SCALE, axis=0).repeat(GRID_SCALE, axis=1)


def _find(screen: np.ndarray, image: np.ndarray) -> tuple[int, int] | None:
    """Top-left (y, x) where ``image`` appears pixel for pixel in ``screen``, or None."""
    h, w = image.shape[:2]
    if h > screen.shape[0] or w > screen.shape[1]:
        return None
    ys, xs = np.nonzero((screen[: screen.shape[0] - h + 1, : screen.shape[1] - w + 1]
                         == image[0, 0]).all(axis=-1))
    # Narrow the candidates with probe pixels, then compare the whole image.
    rng = np.random.default_rng(0)
    for py, px in zip(rng.integers(0, h, 64), rng.integers(0, w, 64), strict=True):
        keep = (screen[ys + py, xs + px] == image[py, px]).all(axis=-1)
        ys, xs = ys[keep], xs[keep]
    for y, x in zip(ys, xs, strict=True):
        if np.array_equal(screen[y : y + h, x : x + w], image):
            return int(y), int(x)
    return None


def _serve_then_interrupt(command: list[str], cwd: Path,
                          env: dict[str, str] | None = None) -> tuple[bytes, int, str]:
    """Start a dashboard command, fetch the page from the URL it prints, send Ctrl-C.

    Returns (the page's bytes, the exit status, everything it printed).
    """
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=ctrl_c_as_typed)
    try:
        line = _read_line(proc, timeout=120)
        url = re.search(r"http://127\.0\.0\.1:\d+/\S+", line)
        assert url, f"no URL in {line!r}"
        with urllib.request.urlopen(url.group(0)) as reply:
            page = reply.read()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return page, proc.returncode, line + rest


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line a process prints (fails after timeout s)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert lines and lines[0], f"no output within {timeout} s"
    return lines[0]


def _venv_seeing_these_packages(venv: Path, pyproject: Path) -> Path:
    """A venv without pip whose python sees this interpreter's packages, marked installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "fedgan-test.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    digest = hashlib.sha256(pyproject.read_bytes()).hexdigest()
    (venv / ".fedgan-installed").write_text(digest + "\n")
    return venv
