"""An in-process Grid that runs the real ClientApp: for tests and benchmarks.

`InProcessGrid` hands each message straight to a ClientApp in this process,
one node after another, each node with its own persistent Context, so the
real ServerApp `main` runs a whole federation without a SuperLink, Ray or
subprocesses. Flower's runtime is not involved, so nothing here is used by
`flwr run`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedgan_app.protocol.message import NUM_PARTITIONS, PARTITION_ID

RUN_ID = 1
SERVER_NODE_ID = 0


def set_task_identity() -> None:
    """Give this process the task identity Messages built outside a Flower run need."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = RUN_ID
    TaskIdentity.node_id = SERVER_NODE_ID


def server_context(run_config: dict[str, Any]) -> Context:
    """A ServerApp Context carrying a run config (and this process's task identity)."""
    set_task_identity()
    return Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={},
                   state=RecordDict(), run_config=dict(run_config))


class InProcessGrid(Grid):
    """A Grid whose nodes run a ClientApp in this process, one after another.

    Each node keeps its own Context, so ``context.state`` persists across
    rounds as in a real run.

    Parameters
    ----------
    client_app : Callable[[Message, Context], Message]
        The ClientApp (``fedgan_app.federation.client_app.app``) or any callable like it.
    num_nodes : int
        Nodes 101, 102, ... (or `node_ids`) get partition ids 0 .. num_nodes - 1.
    run_config : dict[str, Any]
        The run config every node's Context carries.
    fail : Callable[[int, Message], bool] | None
        ``fail(node_id, message)`` True makes that node raise; the reply is
        then an error Message, as Flower sends one.
    tamper : Callable[[int, Message], Message | None] | None
        ``tamper(node_id, reply)`` may replace a node's (non-error) reply, or
        return None: the reply is lost (a node that never answers).
    node_ids : Sequence[int] | None
        The nodes' ids, in partition order (a simulation draws them at random).
    partition_ids : Sequence[int] | None
        The nodes' partitions out of `num_partitions` (default: 0 ..
        num_nodes - 1 of num_nodes), e.g. ``[3]`` with ``num_partitions=5``:
        one node holding partition 3 of a 5-client split (a local-only run).
    num_partitions : int | None
        The number of partitions the data is split into (default: num_nodes).

    """

    def __init__(
        self,
        client_app: Callable[[Message, Context], Message],
        num_nodes: int,
        run_config: dict[str, Any],
        fail: Callable[[int, Message], bool] | None = None,
        tamper: Callable[[int, Message], Message | None] | None = None,
        node_ids: Sequence[int] | None = None,
        partition_ids: Sequence[int] | None = None,
        num_partitions: int | None = None,
    ) -> None:
        set_task_identity()
        partitions = list(partition_ids) if partition_ids is not None else list(range(num_nodes))
        num_partitions = num_partitions or num_nodes
        if len(partitions) != num_nodes or not all(0 <= p < num_partitions for p in partitions):
            raise ValueError(f"{num_nodes} nodes need {num_nodes} partition ids in "
                             f"[0, {num_partitions}), got {partitions}")
        self.client_app = client_app
        self.fail = fail
        self.tamper = tamper
        self.contexts = {
            node_id: Context(
                run_id=RUN_ID,
                node_id=node_id,
                node_config={PARTITION_ID: partition, NUM_PARTITIONS: num_partitions},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for partition, node_id in zip(partitions, node_ids or range(101, 101 + num_nodes),
                                          strict=False)
        }
        if len(self.contexts) != num_nodes:
            raise ValueError(f"{num_nodes} nodes need {num_nodes} distinct node ids")
        self.calls: list[tuple[int, str]] = []
        self._replies: dict[str, Message] = {}  # pushed message id -> its reply

    def set_run(self, run_id: int) -> None:
        """Not used in process."""

    @property
    def run(self) -> Any:
        """Not used in process."""
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """Build a message to a node (the strategies build Messages directly)."""
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        """Node ids of the in-process clients."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run the ClientApp for each message now; pull_messages returns the replies."""
        message_ids = []
        for msg in messages:
            # A pushed message's id is its object id, as the SuperLink's grid sets it.
            msg.metadata.__dict__["_message_id"] = msg.object_id
            reply = self._answer(msg)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
            message_ids.append(msg.metadata.message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to pushed messages (each once)."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run the ClientApp for each message and collect the replies."""
        replies = [self._answer(msg) for msg in messages]
        return [reply for reply in replies if reply is not None]

    def _answer(self, msg: Message) -> Message | None:
        """Run the ClientApp on one message; its reply (None: lost by `tamper`)."""
        node_id = msg.metadata.dst_node_id
        self.calls.append((node_id, msg.metadata.message_type))
        try:
            if self.fail is not None and self.fail(node_id, msg):
                raise RuntimeError(f"injected failure on node {node_id}")
            reply = self.client_app(msg, self.contexts[node_id])
        except Exception as exc:  # Flower turns ClientApp errors into error replies
            reply = Message(Error(code=1, reason=repr(exc)), reply_to=msg)
        if self.tamper is not None and not reply.has_error():
            return self.tamper(node_id, reply)
        return reply
