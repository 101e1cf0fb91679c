"""A session's lane on the controller side: its keys, its tunnel address and port, the node's desired
state built from active sessions (lanes and grants) and the site's device baselines, and handing that
state to the node.

The desired state is level-triggered: it is always rebuilt from the database (every active session of
the node whose end is still ahead, the site's devices under the applied policy), stamped with the node's
generation, which every change to the node's lanes, grants or baselines bumps in the same transaction.
A push that fails is retried by the session clock until the node has the newest generation.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import random
import threading
import time

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from nodeagent.wire import (
    MAX_LANES,
    DesiredNodeState,
    FlowSpec,
    GrantSpec,
    LaneSpec,
    NodeSettings,
    ReconcileReport,
)

from . import baselines
from .errors import Conflict
from .models import AccessSession, LaneLease, NodeAgent, SessionState, Site
from .nodelink import LinkError, NodeLink

log = logging.getLogger("wicket.controller.lanes")
LANED = (SessionState.opening.value, SessionState.active.value)  # sessions whose lane the node is to hold
ALLOCATION_TRIES = 8


def mint_keypair() -> tuple[str, str]:
    """A fresh WireGuard (Curve25519) keypair, base64: (private, public)."""
    key = X25519PrivateKey.generate()
    private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(private).decode(), base64.b64encode(public).decode()


def node_for(s: Session, site: Site, kind: str = "lane") -> str:
    """The site's agent that carries its lanes and grants: the first registered, by name; refused when it
    already carries as many lanes (or grants) as one desired state may hold."""
    name = s.scalar(select(NodeAgent.name).where(NodeAgent.site_id == site.id).order_by(NodeAgent.name).limit(1))
    what = "grants" if kind == "grant" else "lanes"
    if name is None:
        raise Conflict(f"site {site.name} has no node agent registered: a site admin adds one "
                       f"(`wicket sites agent-add {site.name} NAME`) before {what} can open there")
    carried = s.scalar(select(func.count()).select_from(AccessSession).where(
        AccessSession.node == name, AccessSession.state.in_(LANED), AccessSession.kind == kind))
    if carried >= MAX_LANES:
        raise Conflict(f"node {name} at site {site.name} already carries {carried} {what}, the most one node takes; "
                       "try again when one ends")
    return name


def lease(s: Session, session_id: str, site: Site) -> tuple[str, int]:
    """A free tunnel address and listen port at the site, held until `release`. The unique constraints
    decide a race between replicas; the loser picks again."""
    pool = ipaddress.ip_network(site.tunnel_pool)
    for _ in range(ALLOCATION_TRIES):
        held = s.execute(select(LaneLease.address, LaneLease.port).where(LaneLease.site_id == site.id)).all()
        used_addresses, used_ports = {a for a, _ in held}, {p for _, p in held}
        address = next((str(h) for h in pool.hosts() if str(h) not in used_addresses), None)
        if address is None:
            raise Conflict(f"site {site.name}'s tunnel pool {site.tunnel_pool} is exhausted: every address is in use")
        free_ports = site.port_max - site.port_min + 1 - len(used_ports)
        if free_ports <= 0:
            raise Conflict(f"site {site.name}'s lane ports {site.port_min}-{site.port_max} are all in use")
        port = _free_port(site.port_min, site.port_max, used_ports)
        try:
            with s.begin_nested():
                s.add(LaneLease(session_id=session_id, site_id=site.id, address=address, port=port))
            return address, port
        except IntegrityError:
            continue
    raise Conflict(f"could not allocate a tunnel address and port at site {site.name}: too many concurrent activations, try again")


def release(s: Session, session_id: str) -> None:
    lease_row = s.get(LaneLease, session_id)
    if lease_row is not None:
        s.delete(lease_row)


def bump(s: Session, node: str) -> None:
    s.execute(update(NodeAgent).where(NodeAgent.name == node).values(generation=NodeAgent.generation + 1))


def _free_port(low: int, high: int, used: set[int]) -> int:
    # Random, not lowest-first: a port just freed is not handed straight to the next engineer.
    for _ in range(32):
        port = random.randint(low, high)
        if port not in used:
            return port
    return next(p for p in range(low, high + 1) if p not in used)


def desired_state(s: Session, node: str) -> DesiredNodeState:
    """The node's complete desired state: one lane per active session, one grant per active grant, and the
    site's device baselines. A function of the database alone, so the same generation always has the same
    content and may be handed over again (a restart, a second replica). A session past its end but not yet
    expired by the clock stays listed: the agent has ended it already and will not reopen it."""
    agent = s.scalar(select(NodeAgent).where(NodeAgent.name == node))
    if agent is None:
        raise LookupError(node)
    site = s.get(Site, agent.site_id)
    # only the columns a lane needs: whole rows carry the decision trace and load approvals
    rows = s.execute(select(AccessSession.id, AccessSession.kind, AccessSession.lane_revision, AccessSession.asset_id,
                            AccessSession.engineer_public_key, AccessSession.tunnel_address, AccessSession.device_address,
                            AccessSession.flows, AccessSession.listen_port, AccessSession.end_at, AccessSession.recording)
                     .where(AccessSession.node == node, AccessSession.state.in_(LANED))
                     .order_by(AccessSession.id)).all()
    lanes = [lane_spec(r) for r in rows if r.kind != "grant" and r.engineer_public_key and r.tunnel_address and r.listen_port]
    granted = [r for r in rows if r.kind == "grant" and r.device_address]
    compiled = baselines.applied(s)
    baseline, grants = None, []
    if compiled is not None:  # no policy applied: devices' own traffic is left alone, and there is nothing to grant
        baseline = baselines.baseline_state(s, site, compiled, {n for r in granted for f in r.flows for n in f["to"]})
        for r in granted:
            flows = compiled.flows(r.flows)
            if flows:  # a destination the policy dropped since: the clock revokes the grant on its next turn
                grants.append(GrantSpec(session_id=r.id, revision=r.lane_revision, device_id=r.asset_id,
                                        device_address=r.device_address, flows=flows, end_time=r.end_at))
    settings = NodeSettings(tunnel_networks=[ipaddress.ip_network(site.tunnel_pool)], endpoint_host=site.public_endpoint)
    return DesiredNodeState(node_id=node, generation=agent.generation, settings=settings, lanes=lanes,
                            baseline=baseline, grants=grants)


def lane_spec(r) -> LaneSpec:
    """`r`: an AccessSession, or a row with its lane columns."""
    flows = [FlowSpec(transport=f["transport"], port=f["port"]) for f in r.flows]
    return LaneSpec(session_id=r.id, revision=r.lane_revision, device_id=r.asset_id, engineer_public_key=r.engineer_public_key,
                    engineer_address=r.tunnel_address, device_address=r.device_address, service=r.flows[0]["protocol"],
                    flows=flows, listen_port=r.listen_port, end_time=r.end_at,
                    recording="payload" if getattr(r, "recording", None) == "payload" else "metadata")


class Pusher:
    """Hands nodes their desired state and remembers the newest generation each node took. A node that
    cannot be reached is tried again with a growing pause (1 s doubling to a minute), not every tick."""

    def __init__(self, factory, link: NodeLink, clock):
        self.factory, self.link, self.clock = factory, link, clock
        self.applied: dict[str, int] = {}
        self._failures: dict[str, tuple[int, float]] = {}  # node → (failures in a row, next try, monotonic)
        self._lock = threading.Lock()  # one push per controller at a time keeps generations in order
        self.on_applied = lambda node, generation, report, status: None
        # a link that pushes by itself (the live agent link) is only woken; others are pushed and then asked
        self.self_pushing = bool(getattr(link, "self_pushing", False))

    def push(self, node: str) -> ReconcileReport | None:
        """Hand over the node's newest generation (None: it already has it). Raises LinkError when the node
        cannot be reached or refuses."""
        if self.self_pushing:
            # the live link orders pushes per connection; one node's slow acknowledgement must not hold up
            # activations at every other node of this replica
            with self.factory() as s:
                desired = desired_state(s, node)
            return self.link.push(desired)
        with self._lock:
            with self.factory() as s:
                desired = desired_state(s, node)
            if desired.generation <= self.applied.get(node, -1):
                return None
            try:
                report = self.link.push(desired)
            except LinkError:
                count = self._failures.get(node, (0, 0.0))[0] + 1
                self._failures[node] = (count, time.monotonic() + min(60.0, 2.0 ** (count - 1)))
                raise
            self._failures.pop(node, None)
            self.applied[node] = desired.generation
            if report.errors:
                log.warning("node %s applied generation %s with errors: %s", node, desired.generation, "; ".join(report.errors))
        if not self.self_pushing:
            try:
                status = self.link.status(node)
            except LinkError as exc:
                log.warning("node %s took generation %s but did not report its state: %s", node, desired.generation, exc)
            else:
                self.on_applied(node, desired.generation, report, status)
        return report

    def push_quietly(self, nodes) -> dict[str, str]:
        """Push each node; failures are returned (node → error) and retried by the session clock."""
        failed = {}
        for node in sorted(set(filter(None, nodes))):
            if self.self_pushing:
                self.link.wake(node)
                continue
            try:
                self.push(node)
            except LookupError:
                log.info("node %s is no longer registered: nothing to push", node)
            except LinkError as exc:
                failed[node] = str(exc)
                log.warning("push to node %s failed: %s", node, exc)
            except Exception as exc:  # one node's bad state must not keep the others from theirs
                failed[node] = f"could not build the desired state: {exc}"
                log.exception("push to node %s failed", node)
        return failed

    def behind(self) -> list[str]:
        """Nodes that may lack their newest generation and are due for a try. A node this controller has
        not pushed to since it started is asked what it applied first."""
        if self.self_pushing:
            return []  # each live connection watches its node's generation
        with self.factory() as s:
            rows = s.execute(select(NodeAgent.name, NodeAgent.generation)).all()
        now = time.monotonic()
        out = []
        for name, gen in rows:
            if gen <= self.applied.get(name, 0) or self._failures.get(name, (0, 0.0))[1] > now:
                continue
            if name not in self.applied:
                try:
                    applied = self.link.status(name).applied_generation
                except LinkError:
                    applied = None
                if applied is not None and applied >= gen:
                    self.applied[name] = applied
                    continue
            out.append(name)
        return out
