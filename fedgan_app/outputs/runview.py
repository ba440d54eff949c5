"""A run folder's rows as the views see them: rounds, replies and clients.

The federation animation and the dashboard page draw from the same picture of
a run, read from its files (through `fedgan_app.outputs.runfolder`)::

    metrics.csv              the round number and its key metrics (losses, D outputs, fid)
    clients.csv              one row per reply: who answered, how long it trained,
                             its weight p_j, its label histogram, dropped or failed
    samples/round_NNNN.png   the global sample grid before and after each round
    run_config.json          the planned number of rounds and the aggregation rule

`load_run` reads them into a `RunView`; `drawn_clients` picks the clients a
round's picture shows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedgan_app.outputs.runfolder import ROUND_KEY, RunFolder, number

# Up to this many clients in the whole run, every frame draws all of them in fixed
# places; a larger federation (clients sampled per round) draws each round's own
# clients only, so a round's frames never change when later rounds bring new clients.
MAX_FIXED_CLIENTS = 24
STATUSES = ("accepted", "dropped", "failed")


class AnimationError(ValueError):
    """A run folder cannot be animated (names the missing or broken file)."""


@dataclass(frozen=True)
class Reply:
    """One client's reply in one round, as clients.csv records it."""

    client: str  # stable key: "p<partition>" or "node <id>"
    status: str  # accepted | dropped | failed
    reason: str
    num_examples: int | None
    weight: float  # aggregation weight p_j; 0 when not accepted
    wall_time_s: float | None
    histogram: tuple[int, ...] | None
    loss_d: float | None = None
    loss_g: float | None = None


@dataclass(frozen=True)
class Client:
    """A client's place in the picture: its label, data size and label histogram."""

    key: str
    label: str
    num_examples: int | None
    histogram: tuple[int, ...] | None


@dataclass(frozen=True)
class RoundView:
    """Everything one round's frames are drawn from."""

    server_round: int
    metrics: dict[str, float]
    replies: tuple[Reply, ...]
    grid_before: Path | None  # grid of the model the clients trained from
    grid_after: Path | None  # grid of the new global model


@dataclass(frozen=True)
class RunView:
    """The rounds of a run and the clients laid out around the server."""

    rounds: tuple[RoundView, ...]
    clients: tuple[Client, ...]
    num_rounds: int | None  # planned rounds (run_config.json), when known
    aggregation: str
    num_classes: int


def load_run(run_dir: Path) -> RunView:
    """Read a run folder's metrics.csv, clients.csv, grids and config into a RunView.

    Parameters
    ----------
    run_dir : Path
        The run folder (``outputs/<run>``).

    Returns
    -------
    RunView
        Rounds in order (every round with a row in either CSV; none before the
        first round's rows are written) and the clients of the whole run,
        ordered by partition id.

    Raises
    ------
    AnimationError
        When the folder does not exist.

    """
    folder = RunFolder(run_dir)
    if not folder.path.is_dir():
        raise AnimationError(f"run folder {folder.path} does not exist")
    metric_rows = folder.metrics_rows()
    client_rows = folder.clients_rows()
    config = folder.config()

    node_to_key = {
        row["node-id"]: f"p{int(pid)}"
        for row in client_rows
        if row.get("node-id") and (pid := number(row.get("partition-id"))) is not None
    }
    by_round: dict[int, list[Reply]] = {}
    for row in client_rows:
        reply = _reply(row, node_to_key)
        by_round.setdefault(row[ROUND_KEY], []).append(reply)
    for server_round, replies in by_round.items():
        by_round[server_round] = _with_weights(replies)
    metrics = {row[ROUND_KEY]: _numeric_cells(row) for row in metric_rows}
    grids = folder.sample_paths()

    rounds = []
    for server_round in sorted(set(metrics) | set(by_round)):
        before = [r for r in grids if r < server_round]
        rounds.append(RoundView(
            server_round=server_round,
            metrics=metrics.get(server_round, {}),
            replies=tuple(by_round.get(server_round, [])),
            grid_before=grids[before[-1]] if before else None,
            grid_after=grids.get(server_round),
        ))
    clients = _clients(by_round)
    num_classes = max((len(c.histogram) for c in clients if c.histogram), default=0)
    num_rounds = config.get("num-server-rounds")
    return RunView(
        rounds=tuple(rounds),
        clients=clients,
        num_rounds=int(num_rounds) if isinstance(num_rounds, int | float) else None,
        aggregation=str(config.get("strategy", config.get("aggregation", ""))),
        num_classes=num_classes,
    )


def drawn_clients(run: RunView, view: RoundView) -> tuple[Client, ...]:
    """The clients a round's frames draw.

    Every client of the run, in fixed places, while the run has at most
    MAX_FIXED_CLIENTS; beyond that only the clients that replied in this
    round, drawn from their replies, so the round's frames (and their cache)
    do not depend on the clients of later rounds.
    """
    if len(run.clients) <= MAX_FIXED_CLIENTS:
        return run.clients
    return _clients({view.server_round: list(view.replies)})


def _numeric_cells(row: dict[str, Any]) -> dict[str, float]:
    """The numeric cells of a metrics row."""
    return {k: v for k, cell in row.items()
            if k not in ("round", ROUND_KEY) and (v := number(cell)) is not None}


def _reply(row: dict[str, Any], node_to_key: dict[str, str]) -> Reply:
    """A Reply from a clients.csv row; missing contract columns mean 'accepted'."""
    pid = number(row.get("partition-id"))
    node = row.get("node-id") or ""
    key = f"p{int(pid)}" if pid is not None else node_to_key.get(node, f"node {node or '?'}")
    status = (row.get("status") or "accepted").strip().lower()
    if status not in STATUSES:
        status = "dropped"  # an unknown status is not an accepted update
    examples = number(row.get("num-examples"))
    return Reply(
        client=key,
        status=status,
        reason=(row.get("reason") or "").strip(),
        num_examples=int(examples) if examples is not None else None,
        weight=number(row.get("weight")) or 0.0,
        wall_time_s=number(row.get("wall-time-s")),
        histogram=_histogram(row.get("label-histogram")),
        loss_d=number(row.get("loss-d")),
        loss_g=number(row.get("loss-g")),
    )


def _with_weights(replies: list[Reply]) -> list[Reply]:
    """Fill p_j = n_j / sum n over accepted replies when clients.csv has no weights."""
    accepted = [r for r in replies if r.status == "accepted"]
    if any(r.weight > 0 for r in accepted):
        return replies
    total = sum(r.num_examples or 0 for r in accepted)
    return [
        replace(r, weight=(r.num_examples or 0) / total)
        if r.status == "accepted" and total > 0 else r
        for r in replies
    ]


def _histogram(cell: str | None) -> tuple[int, ...] | None:
    """Class counts from 'n0;n1;...', None when empty or malformed."""
    if not cell:
        return None
    try:
        counts = tuple(int(float(x)) for x in cell.split(";"))
    except ValueError:
        return None
    return counts if counts and all(c >= 0 for c in counts) and sum(counts) > 0 else None


def _clients(by_round: dict[int, list[Reply]]) -> tuple[Client, ...]:
    """Every client of the run with its latest known data size and histogram."""
    known: dict[str, Client] = {}
    for server_round in sorted(by_round):
        for reply in by_round[server_round]:
            old = known.get(reply.client)
            known[reply.client] = Client(
                key=reply.client,
                label=reply.client if reply.client.startswith("node") else
                f"client {reply.client[1:]}",
                num_examples=reply.num_examples or (old.num_examples if old else None),
                histogram=reply.histogram or (old.histogram if old else None),
            )

    def order(client: Client) -> tuple[int, float]:
        """Partitions by number first, then nodes by id."""
        if client.key.startswith("p"):
            return 0, float(client.key[1:])
        return 1, number(client.key.split()[-1]) or 0.0

    return tuple(sorted(known.values(), key=order))


