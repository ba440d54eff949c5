"""The live dashboard's server: ``python -m fedgan_app.outputs.dashboard [RUN]``.

Serves the page of a run folder (fedgan_app.outputs.page, rewritten after every
round by fedgan_app.outputs.views.refresh_run) on localhost until Ctrl-C;
``./fedgan.sh dashboard`` runs it. Only the files the page loads are served,
and only to a Host header naming this machine's address.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import stat as stat_module
import sys
import webbrowser
from collections.abc import Sequence
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fedgan_app.outputs import views
from fedgan_app.outputs.runfolder import (
    DASHBOARD_PAGE,
    DASHBOARD_STATE,
    FEDERATION_GIF,
    METRICS_CSV,
    PLOTS_DIR,
    PROGRESS_GIF,
    RUN_CONFIG,
    SAMPLES_DIR,
    RunFolder,
)

DEFAULT_PORT = 8765


# What the page loads, relative to the run folder: the page, its version, the
# animations, the plots and the sample grids. Nothing else is served: no
# checkpoints, no CSVs, no W&B files, no folder listings.
_SERVED = re.compile(
    "("
    + "|".join(re.escape(name) for name in (DASHBOARD_PAGE, DASHBOARD_STATE, PROGRESS_GIF,
                                             FEDERATION_GIF))
    + "".join(f"|{re.escape(folder)}/[A-Za-z0-9_.-]+\\.png"
              for folder in (PLOTS_DIR, SAMPLES_DIR))
    + ")"
)


class _Handler(SimpleHTTPRequestHandler):
    """Serves the page's files of one run folder (GET and HEAD); nothing is cached.

    '/' goes to the page. A request is answered only when its Host header names
    the address served (127.0.0.1, localhost or [::1] and the port), so a web
    page elsewhere cannot reach the dashboard by DNS rebinding (403), and only
    for a path the page loads (`_SERVED`) that is a regular file inside the
    run folder, symlinks resolved (404 for anything else).
    """

    def send_head(self) -> Any:
        """Check Host and path; send the headers; return the open file (or None)."""
        if not self._host_allowed():
            self.send_error(HTTPStatus.FORBIDDEN, "unexpected Host header")
            return None
        wanted = unquote(self.path.split("?", 1)[0].split("#", 1)[0])
        if wanted in ("", "/"):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", "/" + DASHBOARD_PAGE)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        handle = self._open_served(wanted)
        if handle is None:
            self.send_error(HTTPStatus.NOT_FOUND, "not part of the dashboard")
            return None
        stat = os.fstat(handle.fileno())
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", self.guess_type(wanted))
        self.send_header("Content-Length", str(stat.st_size))
        self.send_header("Last-Modified", self.date_time_string(int(stat.st_mtime)))
        self.end_headers()
        return handle

    def _host_allowed(self) -> bool:
        """Whether the Host header names the address this server listens on."""
        port = self.server.server_address[1]
        names = {"127.0.0.1", "localhost", "[::1]", self.server.server_address[0]}
        allowed = {f"{name}:{port}".lower() for name in names}
        return (self.headers.get("Host") or "").strip().lower() in allowed

    def _open_served(self, wanted: str) -> Any:
        """The open file a URL path names, or None unless it is one the page loads."""
        if not wanted.startswith("/") or not _SERVED.fullmatch(wanted[1:]):
            return None
        root = Path(self.directory)
        try:
            # Symlinks resolved: whatever a name points at must lie in the run folder.
            target = (root / wanted[1:]).resolve(strict=True)
            if not target.is_relative_to(root):
                return None
            # O_NONBLOCK: a FIFO named like a grid must not hang the request.
            fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except (OSError, RuntimeError):  # missing, a loop of links, ...
            return None
        if not stat_module.S_ISREG(os.fstat(fd).st_mode):  # a folder, a FIFO, ...
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def end_headers(self) -> None:
        """Every reply says: do not cache (files change every round)."""
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Quiet: one line per poll would flood the terminal."""


def serve(run_dir: Path, port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start serving a run folder's dashboard on host:port (port 0: any free port).

    Parameters
    ----------
    run_dir : Path
        The run folder to serve.
    port : int
        TCP port; 0 picks a free one.
    host : str
        Address to bind; localhost by default (the page is for this machine).

    Returns
    -------
    ThreadingHTTPServer
        The bound server; call ``serve_forever()`` (and ``shutdown()``,
        ``server_close()`` to stop it).

    Notes
    -----
    Only the files the page loads are served, as GET or HEAD requests whose
    Host header names this address (see `_Handler`).

    """
    handler = partial(_Handler, directory=str(Path(run_dir).resolve()))
    return ThreadingHTTPServer((host, port), handler)


def newest_run(outputs: Path) -> Path:
    """The run folder under ``outputs`` whose metrics.csv (or config) changed last."""
    candidates = []
    for folder in Path(outputs).glob("*/"):
        run = RunFolder(folder)
        stamps = [p.stat().st_mtime for p in (run.metrics_csv, run.run_config_json)
                  if p.is_file()]
        if stamps:
            candidates.append((max(stamps), folder))
    if not candidates:
        raise FileNotFoundError(f"no run folder under {outputs}/ (a folder with "
                                f"{RUN_CONFIG} or {METRICS_CSV}); pass one")
    return max(candidates)[1]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: serve a run folder's live dashboard on localhost until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m fedgan_app.outputs.dashboard",
        description="Serve the live dashboard of a run folder on localhost (Ctrl-C stops).",
    )
    parser.add_argument("run_dir", type=Path, nargs="?", default=None,
                        help="the run folder (default: the newest under --outputs)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"),
                        help="where to look for the newest run (default: outputs)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"TCP port (default: {DEFAULT_PORT}, or a free one if taken)")
    parser.add_argument("--no-open", action="store_true",
                        help="do not open a browser, only print the URL")
    args = parser.parse_args(argv)
    try:
        run_dir = args.run_dir or newest_run(args.outputs)
    except FileNotFoundError as exc:
        print(f"fedgan dashboard: {exc}", file=sys.stderr)
        return 2
    if not run_dir.is_dir():
        print(f"fedgan dashboard: run folder {run_dir} does not exist", file=sys.stderr)
        return 2
    if not RunFolder(run_dir).dashboard_html.is_file():
        views.refresh_run(run_dir)  # a run from before the page existed, or not started yet
    try:
        server = serve(run_dir, DEFAULT_PORT if args.port is None else args.port)
    except OSError as exc:
        if args.port is not None:
            print(f"fedgan dashboard: cannot listen on port {args.port} ({exc.strerror}); "
                  "pick another with --port", file=sys.stderr)
            return 2
        server = serve(run_dir, 0)  # the default port is taken: any free one
    url = f"http://127.0.0.1:{server.server_address[1]}/{DASHBOARD_PAGE}"
    print(f"fedgan dashboard: {run_dir} at {url} (Ctrl-C stops)", flush=True)
    if not args.no_open and _has_display():
        webbrowser.open(url)
    # SIGTERM (kill, a closing terminal) stops it as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("fedgan dashboard: stopped", flush=True)
    return 0


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    """Signal handler: stop serving as on Ctrl-C."""
    raise KeyboardInterrupt


def _has_display() -> bool:
    """Whether a graphical browser can open (else webbrowser may start a text one)."""
    return (sys.platform in ("darwin", "win32")
            or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")))


if __name__ == "__main__":
    sys.exit(main())
