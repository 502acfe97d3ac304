"""Which site a reply comes from: names bound to authenticated nodes, at first sight.

A ClientApp names its site in a ``site`` ConfigRecord, but that name is only a claim: any site
could write another's name and overwrite its metrics. What the SuperLink does authenticate is the
node (with ``--enable-supernode-auth`` a node id belongs to one registered key). So a name is bound
to the node that first claimed it, and the binding is kept in the run folder, across restarts:

* a node that claims a name other than its own is rejected (its reply is not averaged) and logged;
* a name claimed by a second node is rejected while the node it is bound to is still connected;
  once that node is gone (a SuperNode restarted without authentication gets a new id) the name
  moves to the new node, and the move is logged;
* replies that carry no name (errors, including the SuperLink's own ``NODE_UNAVAILABLE`` replies,
  whose source is the SuperLink) are attributed to the node the instruction was sent to, by the
  message id the reply answers, under that node's site name.

With the coordinator's map of registered keys to site names (``federation.registered_sites``, a
JSON file ``{site: node_id}``; ``fedglioma demo`` passes the one its launcher writes) every name is
known from the first round, also for a site that fails before it ever replied, and a claim that
differs from the map is always rejected. Flower keeps node names only in its registration
(``flwr supernode register``), which a ServerApp cannot read; hence this registry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Message
from flwr.supercore import log

from common.io import atomic_write

SITE_RECORD = "site"  # ConfigRecord key a ClientApp uses to name its site in replies


@dataclass(frozen=True)
class Claim:
    """Who sent a reply: the node, the site name it is filed under, and why it is refused (or None)."""

    node: int
    name: str
    conflict: str | None = None


def read_registered_sites(path: Path) -> dict[int, str]:
    """The coordinator's map of registered node keys to site names (``federation.registered_sites``):
    a JSON object ``{site: node_id}`` or, as ``deploy/federation.py`` writes it,
    ``{site: {"node_id": id, ...}}``; returns ``{node_id: site}``."""
    try:
        raw = json.loads(Path(path).read_text())
        out: dict[int, str] = {}
        for site, value in raw.items():
            node = int(value["node_id"] if isinstance(value, dict) else value)
            if node in out:
                raise ValueError(f"node {node} is listed for both {out[node]!r} and {site!r}")
            out[node] = str(site)
        return out
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"federation.registered_sites={str(path)!r} cannot be read ({exc}); it must be a JSON object "
            '{"site-a": NODE_ID, ...} of the keys registered with `flwr supernode register`'
        ) from exc


class SiteRegistry:
    """Site names bound to node ids (see the module docstring); ``path``: where the bindings persist;
    ``registered``: ``{node_id: site}`` the coordinator registered (fixed: never rebound)."""

    def __init__(self, path: Path | None = None, registered: dict[int, str] | None = None) -> None:
        self.path = path
        self.registered = dict(registered or {})
        self.by_node: dict[int, str] = {}
        self.sent: dict[str, int] = {}  # message id of an instruction -> the node it went to
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
                self.by_node = {int(node): str(name) for node, name in stored.items()}
            except (OSError, ValueError, AttributeError) as exc:
                raise ValueError(
                    f"{path} is damaged ({exc}); it binds site names to nodes. Restore it from a "
                    "backup, or delete it to bind names again at first sight."
                ) from exc
        self.by_node.update(self.registered)

    def remember(self, messages: Iterable[Message]) -> None:
        """Note the destination of each instruction (call after they were pushed: ids are set then)."""
        for message in messages:
            if message.metadata.message_id:
                self.sent[message.metadata.message_id] = message.metadata.dst_node_id

    def node_of(self, reply: Message) -> int:
        """The node ``reply`` answers for: the instruction's destination, else the reply's source."""
        return self.sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def name_of(self, node: int) -> str:
        return self.by_node.get(node, f"node-{node}")

    def claim(self, reply: Message, connected: Iterable[int] = ()) -> Claim:
        """Bind or check the name ``reply`` claims; ``connected``: the node ids online now."""
        node = self.node_of(reply)
        name = ""
        if not reply.has_error() and SITE_RECORD in reply.content.config_records:
            name = str(reply.content.config_records[SITE_RECORD].get("name", "")).strip()
        if not name:
            return Claim(node, self.name_of(node))
        if self.registered:
            return self._claim_registered(node, name)
        bound = self.by_node.get(node)
        if bound is not None and bound != name:
            reason = f"node {node} is bound to site {bound!r} but claims to be {name!r}"
            log(WARNING, "identity: %s; reply rejected", reason)
            return Claim(node, bound, reason)
        holder = next((n for n, bound_name in self.by_node.items() if bound_name == name and n != node), None)
        if holder is not None:
            if holder in set(connected):
                reason = f"node {node} claims site {name!r}, which is bound to node {holder} (still connected)"
                log(WARNING, "identity: %s; reply rejected", reason)
                return Claim(node, f"{name} (claimed by node {node})", reason)
            log(INFO, "identity: site %r moves from node %d (gone) to node %d", name, holder, node)
            del self.by_node[holder]
        if bound is None:
            self.by_node[node] = name
            self._save()
        return Claim(node, name)

    def _claim_registered(self, node: int, name: str) -> Claim:
        """With the coordinator's map every node's name is known before it replies: a claim that
        differs from it is rejected, whatever is connected."""
        registered = self.registered.get(node)
        if registered == name:
            return Claim(node, name)
        if registered is None:
            reason = f"node {node} is not among the registered sites but claims to be {name!r}"
            log(WARNING, "identity: %s; reply rejected", reason)
            return Claim(node, f"{name} (unregistered node {node})", reason)
        reason = f"node {node} is registered as site {registered!r} but claims to be {name!r}"
        log(WARNING, "identity: %s; reply rejected", reason)
        return Claim(node, registered, reason)

    def _save(self) -> None:
        if self.path is not None:
            text = json.dumps({str(k): v for k, v in self.by_node.items()}, indent=1)
            atomic_write(self.path, lambda tmp: tmp.write_text(text))
