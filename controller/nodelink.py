"""How the controller hands a node its desired state, and reads back what the node enforces.

In production that is the agent link (`controller.agent_link.LinkServer`): agents enrol, dial out over
mutually authenticated TLS and are pushed their state. For the lab and tests the controller can instead
speak to an agent on the same machine through the agent's local control socket (`LocalSocketLink`,
**not for production**: it needs the controller and the agent on one host, as root). Without any link
configured, activation fails with a clear error and nothing opens.
"""

from __future__ import annotations

import json
import socket
from typing import Protocol

from pydantic import ValidationError

from nodeagent.wire import AgentStatus, DesiredNodeState, ReconcileReport


class LinkError(Exception):
    """The node could not be reached, or refused the state."""


class LinkElsewhere(LinkError):
    """The node is linked to another controller replica, which pushes to it."""


class NodeLink(Protocol):
    def push(self, desired: DesiredNodeState) -> ReconcileReport:
        """Deliver the node's complete desired state; the report of applying it."""

    def status(self, node: str) -> AgentStatus:
        """What the node enforces now."""


class NoLink:
    """No agent link is configured: nothing can be handed to a node."""

    def push(self, desired: DesiredNodeState) -> ReconcileReport:
        raise LinkError(f"no link to node {desired.node_id}: this controller serves no agent link "
                        "(WICKET_LINK_LISTEN is off)")

    def status(self, node: str) -> AgentStatus:
        raise LinkError(f"no link to node {node}")


class LocalSocketLink:
    """LAB AND TEST TRANSPORT: the agent's local control socket (`wicket-agent run`, same host)."""

    def __init__(self, sockets: dict[str, str], timeout: float = 60.0):
        self.sockets, self.timeout = dict(sockets), timeout

    def push(self, desired: DesiredNodeState) -> ReconcileReport:
        answer = self._call(desired.node_id, {"op": "apply", "desired": desired.model_dump(mode="json")})
        return _shape(ReconcileReport, answer.get("report"), desired.node_id)

    def status(self, node: str) -> AgentStatus:
        return _shape(AgentStatus, self._call(node, {"op": "status"}).get("status"), node)

    def _call(self, node: str, request: dict) -> dict:
        path = self.sockets.get(node)
        if path is None:
            raise LinkError(f"no control socket configured for node {node}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(path)
                s.sendall(json.dumps(request).encode())
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            answer = json.loads(data)
        except (OSError, ValueError) as exc:
            raise LinkError(f"node {node} is unreachable at {path}: {exc}") from None
        if not answer.get("ok"):
            raise LinkError(f"node {node} refused: {answer.get('error', 'no reason given')}")
        return answer


def _shape(model, value, node: str):
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise LinkError(f"node {node} answered in a shape this controller does not know: {exc.errors()[0]['msg']}") from None


def parse_sockets(text: str) -> dict[str, str]:
    """"node-a=/run/a.sock,node-b=/run/b.sock" → {node: path}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        node, sep, path = part.partition("=")
        if not sep or not node or not path.startswith("/"):
            raise ValueError(f"{part!r}: write NODE=/absolute/path/to/control.sock")
        out[node] = path
    return out
