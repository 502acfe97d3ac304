"""The real ServerApp and ClientApp in one process, without a SuperLink.

Benchmarks and tests run many federations; starting TLS SuperLinks and SuperNodes for each would
spend most of the time in process start-up and message transport. :class:`InProcessGrid` hands
every message to the ClientApp function directly (one node after the other), which exercises the
same server and client code as a deployment. Flower's own simulation engine (Ray) is not used:
it is not installed here and would add a multi-hundred-MB dependency for a sequential loop.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from common.config import replace, to_run_config
from server.app import app as server_app


class InProcessGrid:
    """A Flower Grid whose nodes are ClientApp calls in this process.

    Args:
        nodes: node id -> node config (``data-path``, ``site-name``, optional ``state-path``).
        run_config: the flat run config every ClientApp sees.

    Each node keeps one ``context.state`` across messages, as a SuperNode does: SecAgg+
    (``client.secure``) holds its keys and shares there between the protocol's four messages.
    """

    def __init__(self, nodes: Mapping[int, Mapping[str, str]], run_config: Mapping[str, Any]) -> None:
        self.client_app = client_app
        self.nodes = {int(k): dict(v) for k, v in nodes.items()}
        self.run_config = dict(run_config)
        self.replies: list[Message] = []
        self.states = {node: RecordDict() for node in self.nodes}  # node id -> its context.state
        self.run = Run.create_empty(run_id=1)  # Flower's legacy client manager reads grid.run.run_id

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            # Flower's grids give each pushed instruction its id in place; the server files
            # replies by it (server.strategy.identity)
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
            context = Context(run_id=1, node_id=node, node_config=self.nodes[node], state=self.states[node],
                              run_config=self.run_config)
            message = copy.deepcopy(message)  # apps may mutate what they receive
            try:
                reply = self.client_app(message, context)
            except Exception as exc:  # what Flower turns a crashing ClientApp into
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
            replies.append(reply)
        self.replies += replies
        return replies


def site_nodes(cohort: Path, names: Iterable[str], state_root: Path | None = None) -> dict[int, dict[str, str]]:
    """Node configs for the named site folders of ``cohort`` (node ids 1..n)."""
    nodes: dict[int, dict[str, str]] = {}
    for i, name in enumerate(names):
        config = {"data-path": str(Path(cohort) / name), "site-name": name}
        if state_root is not None:
            config["state-path"] = str(Path(state_root) / name)
        nodes[i + 1] = config
    return nodes


def run_inprocess(
    cfg: Any, nodes: Mapping[int, Mapping[str, str]],
    grid_class: Callable[[Mapping[int, Mapping[str, str]], Any], InProcessGrid] = InProcessGrid,
) -> InProcessGrid:
    """Run the ServerApp for ``cfg`` (an :class:`common.config.ExperimentConfig` with absolute
    ``federation.heldout``/``out_dir``) against in-process sites; returns the grid (its replies).
    ``grid_class``: an :class:`InProcessGrid` subclass, or any ``(nodes, run_config) -> grid``, e.g.
    one that loses or alters some replies (tests).
    The sites run in this process: no site worker (``federation.site_worker``), there is no
    per-message process whose imports it would save."""
    run_config = to_run_config(replace(cfg, federation={"site_worker": False}))
    grid = grid_class(nodes, run_config)
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid
