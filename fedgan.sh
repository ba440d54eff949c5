#!/usr/bin/env bash
# fedgan: set up the environment, run the default federation, or run the tests.
#
#   ./fedgan.sh run [flwr run options]   train (default: 5 clients), then stop the SuperLink
#   ./fedgan.sh deploy [N] [--run-config "k=v ..."]
#                                        the same on Flower's Deployment Engine: a SuperLink
#                                        on loopback, its Fleet gateway and N SuperNodes
#                                        (default 2) as processes here; docs/deployment.md
#   ./fedgan.sh test [pytest options]    run the test suite
#   ./fedgan.sh stop                     stop the local SuperLink fedgan.sh started
#   ./fedgan.sh federation               print the --federation-config `run` uses here
#   ./fedgan.sh dashboard [outputs/<run>] [--port P] [--no-open]
#                                        serve a run's live page on localhost (default:
#                                        the newest run); Ctrl-C stops it
#   ./fedgan.sh setup                    only create/update .venv
#
# `run` uses its own Flower home (.flwr/ in this folder) and ports, so the
# local SuperLink it starts has Flower's runtime dependency installer turned
# off (it would otherwise reinstall torch into a per-run environment), and it
# stops that SuperLink when the run ends, even on Ctrl-C. `stop` stops only
# that SuperLink (found by its own control port), never another one. `deploy`
# (deploy/launch.py) keeps its certificates, Flower homes and logs in .deploy/;
# it stops what it started (and their descendants) by PID at the end, even on Ctrl-C.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${FEDGAN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

setup() {
  # Reinstall only when pyproject.toml changed since the last install.
  local stamp="$VENV/.fedgan-installed" want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
  echo "fedgan: installing into $VENV (first time: a few minutes)" >&2
  [[ -x "$VENV/bin/python" ]] || make_venv
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch first, exact pin: pip then takes the local CPU wheel.
  "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
  echo "$want" >"$stamp"
}

make_venv() {
  # `flwr run .` walks every file under the app folder to build the app bundle:
  # a venv's tens of thousands of files cost it seconds a run (docs/running.md).
  # It does not enter a symlinked folder, so the default .venv is a link to a venv
  # kept outside this folder (one per checkout); FEDGAN_VENV=<path> puts a venv
  # where you say instead.
  if [[ -z "${FEDGAN_VENV:-}" && ! -e "$VENV" && ! -L "$VENV" ]]; then
    local home tag
    home="${FEDGAN_VENV_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/fedgan/venvs}"
    tag="$(basename "$ROOT")-$(printf '%s' "$ROOT" | sha256sum | cut -c1-8)"
    if mkdir -p "$home" 2>/dev/null && "$PYTHON" -m venv "$home/$tag"; then
      ln -s "$home/$tag" "$VENV"
      return
    fi
    echo "fedgan: cannot create a venv under $home; creating it in $VENV" >&2
  fi
  "$PYTHON" -m venv "$VENV"
}

flwr_env() {
  # Flower's settings come from deploy/processes.py (their one copy): this folder's
  # Flower home and ports (kept when already set), quiet, offline, no runtime installs.
  # Standard library only: the system Python runs it before the venv exists.
  local python="$PYTHON" exports
  [[ -x "$VENV/bin/python" ]] && python="$VENV/bin/python"
  exports="$("$python" -m deploy.processes env --home "$ROOT/.flwr" \
    --http-port 39291 --control-port 39293)"
  eval "$exports"
}

superlink_pid() {
  # The flower-superlink process serving our control API port, if any.
  pgrep -f "flower-superlink.*--control-api-address 127.0.0.1:${FLWR_LOCAL_CONTROL_API_PORT}( |$)" || true
}

stop_superlink() {
  local pid
  pid="$(superlink_pid)"
  [[ -n "$pid" ]] || return 0
  echo "fedgan: stopping local SuperLink (pid $pid)" >&2
  kill -TERM $pid 2>/dev/null || true
  for _ in $(seq 50); do kill -0 $pid 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL $pid 2>/dev/null || true
}

run() {
  setup
  flwr_env
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  local had_superlink
  had_superlink="$(superlink_pid)"
  [[ -n "$had_superlink" ]] || trap stop_superlink EXIT
  # Flower's CLI would give the SuperLink it starts 15 s, too little on a busy machine.
  "$VENV/bin/python" -m deploy.processes start-local
  local federation=(--federation-config "$(federation_config)")
  local log
  log="$(mktemp)"
  flwr run . --stream "${federation[@]}" "$@" 2>&1 | tee "$log"
  # `flwr run --stream` exits 0 even when the ServerApp failed: ask for the status.
  local run_id status
  run_id="$(grep -oE 'started run [0-9]+' "$log" | grep -oE '[0-9]+' | head -1 || true)"
  rm -f "$log"
  if [[ -n "$run_id" ]]; then
    status="$(flwr ls --run-id "$run_id" --format json | "$VENV/bin/python" -c \
      'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')"
    echo "fedgan: run $run_id $status" >&2
    [[ "$status" == "finished:completed" ]]
  else
    echo "fedgan: the run did not start (see the messages above)" >&2
    return 1
  fi
}

federation_config() {
  # One client per core at a time on CPUs (all of a round's at once sharing the GPUs
  # nvidia-smi lists), the cores shared by threads (client-threads = 0), so the lone
  # client of a last wave takes every core. fedgan_app/federation/cores.py says how.
  "$VENV/bin/python" -m fedgan_app.federation.cores "${FEDGAN_CLIENTS:-5}"
}

stop() {
  flwr_env
  if [[ -z "$(superlink_pid)" ]]; then
    echo "fedgan: no local SuperLink on control port ${FLWR_LOCAL_CONTROL_API_PORT}" >&2
    return 0
  fi
  stop_superlink
}

case "${1:-}" in
  setup) setup ;;
  run) shift; run "$@" ;;
  stop) stop ;;
  federation) federation_config ;;
  deploy) shift; setup; exec "$VENV/bin/python" -m deploy.launch "$@" ;;
  test) shift; setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  # exec: Ctrl-C goes straight to the server, which stops cleanly.
  dashboard) shift; setup; exec "$VENV/bin/python" -m fedgan_app.outputs.dashboard "$@" ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
