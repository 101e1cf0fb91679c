"""Two controller replicas on one PostgreSQL database serving one agent (PostgreSQL is the database for
several replicas; SQLite serves one controller only, so these tests run on PostgreSQL alone).

The world (policy, site north-1, its registered agent edge-north-1, devices, people) is made through the
usual harness. Then two more apps on the same database and the same data directory (so the same controller
keys and agent CA) stand for replica-a and replica-b, each with its agent link on 127.0.0.1:<free port>. The
node enrols with replica A and links to it (the agent's real `LinkClient`, a fake agent behind it:
`linkpeer.SimAgent`). Engineers and approvers then act through replica B, which holds no link to the node:
B relies on A's watch of the node's generation (`agent_link.WATCH_S`) to hand the change over, and on the
acknowledgement A writes to the database.

The harness's clock is fake (it runs ahead with every step-up); the replicas use real time, so people log in
to them with the TOTP code of now.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyotp
import pytest
from sqlalchemy import select, update

from controller.agent_link import LinkServer
from controller.app import create_app
from controller.auth import Principal
from controller.db import transaction
from controller.errors import NodeUnavailable
from controller.models import AccessSession, NodeAgent
from controller.settings import load
from nodeagent.enroll import LinkFiles, enroll

from .conftest import Harness
from .linkpeer import SimAgent, principal, wait_for
from .session_helpers import DIAG, NODE, RTU, SITE, World, world

pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)

HEARTBEAT_S = 2
ACK_TIMEOUT_S = 5
HANDOVER_S = 5.0  # a change made through B reaches the agent at A's next generation poll (every 0.5 s)


@dataclass
class Replica:
    name: str
    app: object
    link: LinkServer
    address: tuple[str, int]

    def login(self, person) -> Principal:
        """`person` logged in at this replica with the code of now (the replica runs on real time)."""
        return self.app.state.auth.login(person.username, person.password, code=pyotp.TOTP(person.secret).now()).principal


@dataclass
class Cluster:
    ctl: Harness
    w: World
    state_dir: Path
    a: Replica | None = None
    b: Replica | None = None
    agent: SimAgent | None = None  # the node's agent as enrolled (linked to replica-a)
    sims: list[SimAgent] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)

    def row(self) -> NodeAgent:
        with self.ctl.app.state.auth.factory() as s:
            return s.scalar(select(NodeAgent).where(NodeAgent.name == NODE))

    def session(self, sid: str) -> AccessSession:
        with self.ctl.app.state.auth.factory() as s:
            return s.get(AccessSession, sid)

    def replica(self, name: str) -> Replica:
        settings = load({"WICKET_DATA_DIR": str(self.ctl.settings.data_dir), "WICKET_DATABASE_URL": self.ctl.settings.database_url,
                         "WICKET_SESSION_TICK_MS": "0", "WICKET_ACK_TIMEOUT_S": str(ACK_TIMEOUT_S),
                         "WICKET_LINK_HEARTBEAT_S": str(HEARTBEAT_S), "WICKET_LINK_LISTEN": "127.0.0.1:0",
                         "WICKET_REPLICA_ID": name})
        app = create_app(settings)
        link = app.state.link_server
        assert isinstance(link, LinkServer) and link.replica == name
        made = Replica(name, app, link, link.start("127.0.0.1", 0))
        self.replicas.append(made)
        return made

    def sim(self) -> SimAgent:
        agent = SimAgent(self.state_dir).start()
        self.sims.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.sims:
            agent.stop()
        for r in self.replicas:
            r.link.stop()
            r.app.state.engine.dispose()


def lanes(agent: SimAgent) -> set[str]:
    return {lane.session_id for lane in agent.current.lanes} if agent.current else set()


def open_through(r: Replica, engineer: Principal) -> AccessSession:
    """A diagnostics session (no approval) requested and then activated through replica `r`."""
    sessions = r.app.state.sessions
    opened = sessions.request(engineer, asset_id=RTU, task=DIAG, duration=None, reason="work order WO-4711",
                              public_key=None, source=None, activate=False)
    assert opened.session.state == "approved", opened
    return sessions.activate(engineer, opened.session.id, None, None)


@pytest.fixture
def cl(ctl, tmp_path):
    w = world(ctl)
    w.erin, w.alex  # noqa: B018 -- made now, through the harness
    state_dir = tmp_path / "agent"
    c = Cluster(ctl, w, state_dir)
    try:
        c.a, c.b = c.replica("replica-a"), c.replica("replica-b")
        # the join token from replica A, on real time (the harness's clock is minutes ahead by now)
        token = c.a.app.state.agents.create_token(principal(ctl), SITE, None, None)
        done = enroll(str(state_dir), f"{c.a.address[0]}:{c.a.address[1]}", token.token, NODE)
        assert done.node_id == NODE and done.site == SITE
        c.agent = c.sim()
        c.agent.wait_connected()
        wait_for(lambda: c.row().connected and c.row().link_replica == "replica-a", "the node's link to replica-a in the database")
        yield c
    finally:
        c.close()


def test_a_session_activated_through_b_opens_on_the_agent_linked_to_a(cl):
    erin = cl.b.login(cl.w.erin)
    row = open_through(cl.b, erin)

    assert row.state == "active", row.state
    sid = row.id
    assert sid in lanes(cl.agent)
    assert row.node_public_key == cl.agent.keys[sid]  # A's acknowledgement, carrying the agent's key, reached B
    agent = cl.row()
    assert agent.link_replica == "replica-a" and agent.connected
    assert agent.applied_generation >= row.opened_generation
    assert NODE in cl.a.link.connected() and NODE not in cl.b.link.connected()


def test_a_revocation_through_b_reaches_the_agent_through_a_by_itself(cl):
    erin, alex = cl.b.login(cl.w.erin), cl.b.login(cl.w.alex)
    sid = open_through(cl.b, erin).id
    assert sid in lanes(cl.agent)
    calls = []
    cl.a.link.wake = lambda node: calls.append(("wake", node))  # nothing in A is asked to push
    cl.a.link.push = lambda desired: calls.append(("push", desired.node_id))

    assert cl.b.app.state.sessions.revoke(alex, sid, "suspicious traffic", None).state == "revoked"
    generation = cl.row().generation

    wait_for(lambda: cl.agent.current.generation >= generation and sid not in lanes(cl.agent),
             f"the agent to drop lane {sid} (generation {generation})", timeout=HANDOVER_S)
    assert calls == []
    # A records the acknowledgement after the agent has taken the state
    wait_for(lambda: cl.row().applied_generation >= generation, f"replica-a to record generation {generation} as applied")


def test_when_a_stops_the_agent_pointed_at_b_is_linked_there_and_served(cl):
    erin = cl.b.login(cl.w.erin)
    first = open_through(cl.b, erin).id

    cl.a.link.stop()
    wait_for(lambda: not cl.agent.client.connected, "the agent to notice replica-a stopped")
    # a replica that stops in order marks its links down: nobody waits on replica-a for this node
    assert cl.row().connected is False
    cl.agent.stop()

    files = LinkFiles.of(cl.state_dir)
    info = files.controller()
    info["port"] = cl.b.address[1]
    files.write("controller.json", json.dumps(info))
    moved = SimAgent(cl.state_dir)
    moved.current, moved.keys = cl.agent.current, dict(cl.agent.keys)  # what the router still enforces
    moved.start()
    cl.sims.append(moved)
    moved.wait_connected()

    wait_for(lambda: cl.row().connected and cl.row().link_replica == "replica-b", "the node's link to replica-b in the database")
    assert NODE in cl.b.link.connected()
    pushed = moved.wait_generation(cl.row().generation)
    assert pushed.generation == cl.row().generation
    assert first in {lane.session_id for lane in pushed.lanes}

    # B holds the link now: an activation through B is pushed and acknowledged on B's own connection
    second = open_through(cl.b, erin)
    assert second.state == "active"
    assert {first, second.id} <= lanes(moved)


def test_a_link_record_left_by_a_dead_replica_is_not_trusted(cl):
    erin = cl.b.login(cl.w.erin)
    opened = cl.b.app.state.sessions.request(erin, asset_id=RTU, task=DIAG, duration=None, reason="work order WO-4711",
                                             public_key=None, source=None, activate=False)
    sid = opened.session.id
    # Replica A dies and the agent, which knows only A's address, is cut off. A graceful stop marks A's links
    # down; a crash does not: put the row back as a killed replica-a leaves it, last heard two minutes ago
    # (the link drops a peer silent for 3 heartbeats, 6 s here).
    cl.a.link.stop()
    cl.agent.stop()
    with transaction(cl.ctl.app.state.auth.factory) as s:
        s.execute(update(NodeAgent).where(NodeAgent.name == NODE).values(
            connected=True, link_replica="replica-a", last_seen=datetime.now(UTC) - timedelta(minutes=2)))

    start = time.monotonic()
    with pytest.raises(NodeUnavailable) as refused:
        cl.b.app.state.sessions.activate(erin, sid, None, None)
    took = time.monotonic() - start
    assert cl.session(sid).state == "approved"  # the outcome is right either way: nothing opened, approval unspent
    message = refused.value.detail
    cl.close()  # wind the threads down before pytest formats the expected failure (see LinkHarness.quiesce)
    assert "not connected" in message and "did not acknowledge" not in message, f"after {took:.1f} s: {message}"
