"""Seeded client sampling: the same seed samples the same partitions in every run.

Flower's strategies sample ``random.sample(grid.get_node_ids(), k)``: unseeded,
and over node ids that the simulation engine draws at random for every run, so
two runs with one seed would train different clients. The clients a user knows
are partitions, so the sampling here works on partitions:

1. `PartitionSampler.learn` asks every connected node it does not know yet, in
   one batch, which partition it holds: a ``query`` message that the ClientApp
   answers from ``context.node_config`` (two integers, no arrays; the record
   is `fedgan_app.protocol.message`'s).
2. `PartitionSampler.sample` ranks the partitions that a connected node holds
   by ``derive_seed(seed, round, stream, partition)`` (a seeded shuffle of
   their own, never the global `random` state) and takes the first
   ``count``. A partition whose node is gone is replaced by the next one in
   that order, so the others stay the ones a full federation would train.
3. `SampledGrid` shows the inner Flower strategy only the chosen nodes; built
   with fraction 1.0, it sends to exactly those.

Where it happens: sampling comes BEFORE the strategy that checks and
aggregates. The wiring asks the nodes connected at start once, before
`Strategy.start` (`ClientSampling.connect`, called by
`fedgan_app.federation.strategy.build_strategy`; when training samples, it
first waits for a node, as Flower's own sampling waits for its nodes). Then
`ClientSampling`, the layer under the round numbering, picks each round's
nodes and hands the layers below a `SampledGrid`; it asks only nodes that
joined since (one batch, bounded by 'round-timeout') and never sleeps to
wait for nodes: a round with no node to sample sends nothing and keeps the
model. Client evaluation is asked for only in the rounds that score quality.

Answers are untrusted: a node that does not answer (crashed, timed out) is
logged and left out until it answers; an answer that is malformed, outside
0..N-1 or from another partitioning (its ``num-partitions`` is not the one
most nodes give) is logged and the node is never sampled; a partition claimed
twice is trained by the node that claimed it first (the lowest node id within
one batch), the other is logged and kept in reserve for when the first is gone.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgan_app.config import RunConfig
from fedgan_app.federation.report import RoundReport
from fedgan_app.federation.wrapper import Wrapper
from fedgan_app.gan.training import derive_seed
from fedgan_app.protocol.message import read_query_reply

# derive_seed(seed, round, stream) seeds a round's sampling. Negative streams can
# never equal a partition id, whose (seed, round, partition) seeds a client's RNG.
TRAIN_STREAM = -1
EVALUATE_STREAM = -2
# Grid.send_and_receive waits 3 s between pulls; a query is answered in well
# under a second, so its replies are pulled sooner, then less and less often.
FIRST_POLL_S = 0.05
LONGEST_POLL_S = 1.0
LOGGED_IDS = 20  # ids named in one log line, at most
WAIT_FOR_NODES_S = 1.0  # between looks for a first node, as Flower's sampling waits


def sampled_per_round(cfg: RunConfig, num_nodes: int) -> int:
    """Clients sampled each round (as Flower's FedAvg samples them)."""
    return max(int(num_nodes * cfg.fraction_train), 1)


def evaluated_per_round(cfg: RunConfig, num_nodes: int) -> int:
    """Clients asked for D's accuracy each round (as Flower's FedAvg samples them)."""
    return max(int(num_nodes * cfg.fraction_evaluate), 1)


def samples_clients(cfg: RunConfig) -> bool:
    """Whether some rounds take only a fraction of the clients (then seeded sampling)."""
    return cfg.fraction_train < 1 or 0 < cfg.fraction_evaluate < 1


def partition_order(seed: int, server_round: int, stream: int,
                    partitions: Iterable[int]) -> list[int]:
    """The partitions in a round's seeded order; a round takes the first.

    Each partition's rank is ``derive_seed(seed, round, stream, partition)``: a
    seeded shuffle that depends neither on the global `random` state nor on
    which other partitions are there, so a partition whose node is gone is
    replaced by the next one and the rest of the choice stays.
    """
    return sorted(partitions, key=lambda p: derive_seed(seed, server_round, stream, p))


def exchange(grid: Grid, messages: Sequence[Message],
             timeout: float) -> list[tuple[float, Message]]:
    """Push messages, then pull replies until all came or `timeout` seconds passed.

    Returns each reply with the seconds from the push to its pull. Grid's
    send_and_receive does the same but sleeps 3 s between pulls; this polls
    after 0.05 s, then doubling up to 1 s.
    """
    started = time.monotonic()
    pending = {msg_id for msg_id in grid.push_messages(messages) if msg_id}
    deadline = started + timeout
    wait = FIRST_POLL_S
    replies: list[tuple[float, Message]] = []
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies += [(time.monotonic() - started, reply) for reply in pulled]
        pending -= {reply.metadata.reply_to_message_id for reply in pulled}
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        time.sleep(min(wait, left))
        wait = min(2 * wait, LONGEST_POLL_S)
    return replies


class SampledGrid(Grid):
    """A Grid whose `get_node_ids` returns only the sampled nodes.

    Everything else goes to the real grid. An inner Flower strategy built with
    fraction 1.0 then sends to exactly these nodes.
    """

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self.grid = grid
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> Iterable[int]:
        """The sampled nodes."""
        return list(self.node_ids)

    def set_run(self, run: Any) -> None:
        """Set the real grid's run."""
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        """The real grid's run."""
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """Build a message through the real grid."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the real grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the real grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Send and receive through the real grid."""
        return self.grid.send_and_receive(messages, timeout=timeout)


class PartitionSampler:
    """Which node holds which partition, and each round's seeded choice of them.

    Parameters
    ----------
    seed : int
        The run's seed; a round's choice is ranked by ``derive_seed(seed,
        round, stream, partition)``.
    timeout : float
        Seconds to wait for the answers to one query batch.

    """

    def __init__(self, seed: int, timeout: float) -> None:
        self.seed = seed
        self.timeout = timeout
        # Well-formed answers, node id -> (partition id, num-partitions), in the
        # order learned (one batch by node id); the first claimant of a partition wins.
        self.answers: dict[int, tuple[int, int]] = {}
        self.malformed: dict[int, str] = {}  # node id -> what was wrong with its answer
        self.num_partitions: int | None = None  # the federation's: most nodes say so
        self.claims: dict[int, int] = {}  # node id -> partition id, answers that fit
        self.refused: dict[int, str] = {}  # node id -> why it is never sampled
        self.queried = 0  # query messages sent so far

    def learn(self, grid: Grid, connected: Sequence[int], server_round: int) -> float:
        """Ask the connected nodes not known yet for their partition; return the seconds."""
        unknown = sorted(set(connected) - set(self.answers) - set(self.malformed))
        if not unknown:
            return 0.0
        started = time.perf_counter()
        messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY,
                            group_id=str(server_round), ttl=self.timeout)
                    for node in unknown]
        self.queried += len(messages)
        replies = exchange(grid, messages, self.timeout)
        if replies:
            # The first answer waits for the ClientApp's start (a training round
            # would wait as long); the rest is the query's own cost.
            log(INFO, "round %d: partition query answers after %.2fs (first) to %.2fs "
                "(last)", server_round, replies[0][0], replies[-1][0])
        # The request a reply answers names its node (a SuperLink-written error
        # reply carries the SuperLink's id as its source).
        node_of = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in messages}
        answers: dict[int, tuple[int, int]] = {}
        for _, reply in replies:
            node = node_of.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue  # not ours, or a second reply to one request
            if reply.has_error():
                log(WARNING, "round %d: node %d failed the partition query (%s); it is "
                    "not sampled until it answers", server_round, node, reply.error.reason)
                continue
            answer, reason = read_query_reply(reply)
            if answer is None:
                self.malformed[node] = reason
            else:
                answers[node] = answer
        self.answers.update(sorted(answers.items()))
        self._settle(server_round)
        silent = sorted(node_of.values())
        if silent:
            log(WARNING, "round %d: %d nodes did not answer the partition query within "
                "%gs (%s); they are not sampled until they answer", server_round,
                len(silent), self.timeout, _some(silent))
        seconds = time.perf_counter() - started
        log(INFO, "round %d: asked %d nodes for their partition in %.2fs; %d partitions "
            "known", server_round, len(unknown), seconds, len(set(self.claims.values())))
        return seconds

    def sample(self, connected: Sequence[int], server_round: int, count: int,
               stream: int) -> list[int]:
        """Node ids of the round's `count` partitions, chosen by the seeded ranking."""
        live = set(connected)
        owners: dict[int, int] = {}  # partition -> the first claimant still connected
        for node, partition in self.claims.items():
            if node in live:
                owners.setdefault(partition, node)
        chosen = partition_order(self.seed, server_round, stream, owners)[:count]
        if len(chosen) < count:
            log(WARNING, "round %d: %d clients to sample, but only %d partitions have a "
                "node that answered the partition query", server_round, count, len(chosen))
        log(INFO, "round %d: sampled partitions %s (seeded)", server_round,
            _some(sorted(chosen)))
        return [owners[p] for p in chosen]

    def _settle(self, server_round: int) -> None:
        """Recount the federation's partitions; keep the answers that fit, log the rest."""
        counts = Counter(n for _, n in self.answers.values())
        if not counts:
            return
        # What most nodes say (ties: the smallest), recounted as nodes join.
        num_partitions = max(counts, key=lambda n: (counts[n], -n))
        if num_partitions != self.num_partitions:
            log(INFO if self.num_partitions is None else WARNING,
                "the federation has %d partitions (num-partitions of %d of the %d nodes "
                "that answered)", num_partitions, counts[num_partitions], len(self.answers))
        self.num_partitions = num_partitions
        claims: dict[int, int] = {}
        refused = dict(self.malformed)
        held: dict[int, int] = {}  # partition -> its first claimant
        for node, (partition, n) in self.answers.items():
            if n != num_partitions:
                refused[node] = f"num-partitions {n} differs from the federation's " \
                                f"{num_partitions}"
            elif not 0 <= partition < n:
                refused[node] = f"partition-id {partition} is outside 0..{n - 1}"
            else:
                if partition in held and node not in self.claims:
                    log(WARNING, "round %d: node %d claims partition %d, which node %d "
                        "holds; node %d is sampled for it only while node %d is gone",
                        server_round, node, partition, held[partition], node,
                        held[partition])
                held.setdefault(partition, node)
                claims[node] = partition
        for node, reason in refused.items():
            if self.refused.get(node) != reason:
                log(WARNING, "round %d: node %d is never sampled: %s", server_round, node,
                    reason)
        self.claims, self.refused = claims, refused


def _some(ids: Sequence[int]) -> str:
    """At most LOGGED_IDS ids for a log line."""
    shown = ", ".join(str(i) for i in ids[:LOGGED_IDS])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > LOGGED_IDS else "")


class ClientSampling(Wrapper):
    """Each round's seeded sample of nodes, for the layers below; late joiners asked first.

    Parameters
    ----------
    strategy : Strategy
        The layers below (the reply screen and what it wraps).
    cfg : RunConfig
        Fractions, seed and the quality schedule.
    sampler : PartitionSampler | None
        Who holds which partition (None: every round takes every node and no
        claim is checked, so nobody is asked).
    report : RoundReport
        Takes the seconds spent asking nodes for their partition.

    """

    def __init__(self, strategy: Strategy, cfg: RunConfig, sampler: PartitionSampler | None,
                 report: RoundReport) -> None:
        super().__init__(strategy)
        self.cfg = cfg
        self.sampler = sampler
        self.report = report
        self._query_s = 0.0  # asked since the last train round: counted in the next one

    def connect(self, grid: Grid, server_round: int) -> None:
        """Ask the nodes connected now for their partition (the wiring, before the rounds).

        When training samples, first wait for a node, as Flower's own sampling
        waits for its nodes; a round itself never waits.
        """
        if self.sampler is None:
            return
        while self.cfg.fraction_train < 1 and not list(grid.get_node_ids()):
            log(INFO, "waiting for a node to connect before round %d", server_round)
            time.sleep(WAIT_FOR_NODES_S)
        self._learn(grid, server_round)

    def summary(self) -> None:
        """Log how rounds sample, then the layers below."""
        if self.sampler is not None:
            log(INFO, "\t├──> %s sampling by partition: fraction-train %g, "
                "fraction-evaluate %g (the inner strategy sends to the sampled nodes)",
                "secretly seeded" if self.cfg.private else "seeded",
                self.cfg.fraction_train, self.cfg.fraction_evaluate)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's train messages, to its seeded sample of partitions."""
        connected = self._learn(grid, server_round)
        self.report.time_query_s, self._query_s = self._query_s, 0.0
        if self.cfg.fraction_train < 1:
            grid = self._sample(grid, connected, server_round,
                                sampled_per_round(self.cfg, len(connected)), TRAIN_STREAM)
            if not grid.node_ids:
                return []
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask clients for D's accuracy, only in the rounds that score quality.

        A client evaluation is a round trip to the clients: the other rounds skip it.
        """
        if not self.cfg.scores_round(server_round):
            return []
        if 0 < self.cfg.fraction_evaluate < 1:
            connected = self._learn(grid, server_round)
            grid = self._sample(grid, connected, server_round,
                                evaluated_per_round(self.cfg, len(connected)), EVALUATE_STREAM)
            if not grid.node_ids:
                return []
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def _learn(self, grid: Grid, server_round: int) -> list[int]:
        """The connected nodes, after asking those not known yet for their partition."""
        connected = list(grid.get_node_ids())
        if self.sampler is not None:
            self._query_s += self.sampler.learn(grid, connected, server_round)
        return connected

    def _sample(self, grid: Grid, connected: list[int], server_round: int, count: int,
                stream: int) -> SampledGrid:
        """The grid of this round's seeded sample of partitions."""
        assert self.sampler is not None  # built whenever a fraction is below 1
        if not connected:
            log(WARNING, "round %d: no node is connected: nothing is sent", server_round)
        return SampledGrid(grid, self.sampler.sample(connected, server_round, count, stream))
