"""The controller's side of the agent link and of enrolment, over loopback (no lab namespaces).

A LinkServer on 127.0.0.1:<free port> (`linkpeer.LinkHarness`) and, on the other end, the agent's own
enrolment (`nodeagent.enroll.enroll`), its real link client with a fake agent behind it (`SimAgent`), or a
peer that writes frames itself (`Peer`) to say what a well-behaved agent never would. Join tokens: one use,
expiry, revocation, the CA pin, secrets kept out of logs and audit. Agent identity: revocation, expiry, a
certificate for another node, none at all. Pushes, acknowledgements and activation; protocol versions;
evidence. The join-token and agent API. The race (twenty agents, one token) and what goes into the audit
columns run on SQLite and PostgreSQL; the rest on SQLite, as what they test does not depend on the database.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, update

from controller import agent_link
from controller.agent_ca import AgentCA
from controller.db import transaction
from controller.errors import Conflict
from controller.models import (
    AccessSession,
    AgentCertificate,
    Event,
    JoinToken,
    LaneEvidenceRecord,
    LaneLease,
    NodeAgent,
)
from controller.nodelink import LinkError
from controller.session_lanes import bump, desired_state
from nodeagent import __version__ as agent_version
from nodeagent.enroll import EnrolError, enroll, new_tls_key
from nodeagent.wire import (
    OLDEST_SERVED,
    PROTOCOL_VERSION,
    AgentStatus,
    Applied,
    DesiredNodeState,
    EnrollBegin,
    EnrollCA,
    Enrolled,
    EnrollRequest,
    EvidenceReceipt,
    Goodbye,
    ReconcileReport,
    Welcome,
    evidence_payload,
)

from .helpers import API, headers
from .linkpeer import Closed, LinkHarness, Peer, lane_evidence, principal, signed, wait_for
from .session_helpers import DIAG, POOL, RTU, SITE, World, activate, policy_files, request

NODE = "rtr-1"
OTHER = "rtr-2"
SOUTH = "south-2"
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def make_link(tmp_path, db_url):
    made = []

    def make(**env) -> LinkHarness:
        h = LinkHarness(tmp_path / f"h{len(made)}", db_url, {k: str(v) for k, v in env.items()})
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture
def lctl(make_link) -> LinkHarness:
    h = make_link()
    h.add_site(SITE, tunnel_pool=POOL)
    return h


# ---- reading the database ----


def agent_row(h, node: str = NODE) -> NodeAgent | None:
    with h.app.state.auth.factory() as s:
        return s.scalar(select(NodeAgent).where(NodeAgent.name == node))


def token_row(h, ident: str) -> JoinToken:
    with h.app.state.auth.factory() as s:
        return s.get(JoinToken, ident)


def events(h, type_: str | None = None, **body) -> list[Event]:
    """Audit events (of one type), oldest first; `body` keys must match the event's body."""
    with h.app.state.auth.factory() as s:
        q = select(Event).order_by(Event.seq)
        if type_:
            q = q.where(Event.type == type_)
        found = list(s.scalars(q))
    return [e for e in found if all(e.body.get(k) == v for k, v in body.items())]


def session_row(h, sid: str) -> AccessSession:
    with h.app.state.auth.factory() as s:
        return s.get(AccessSession, sid)


def count(h, model, *where) -> int:
    with h.app.state.auth.factory() as s:
        return s.scalar(select(func.count()).select_from(model).where(*where))


def bump_and_build(h, node: str = NODE) -> DesiredNodeState:
    """A new generation for `node` (as a lane change makes one), and the desired state it stands for."""
    with transaction(h.app.state.auth.factory) as s:
        bump(s, node)
    with h.app.state.auth.factory() as s:
        return desired_state(s, node)


def applied_for(desired: DesiredNodeState, node: str = NODE) -> Applied:
    """What an agent sends once it has applied `desired` (no lanes held)."""
    return Applied(generation=desired.generation, report=ReconcileReport(generation=desired.generation),
                   status=AgentStatus(node_id=node, agent_version="peer", backend="userspace",
                                      applied_generation=desired.generation, lanes=[], pending_evidence=0,
                                      clock_synchronized=True))


def dump_everything(h) -> str:
    """Every audit event, every column, as text."""
    with h.app.state.auth.factory() as s:
        rows = s.scalars(select(Event).order_by(Event.seq)).all()
        return "\n".join(json.dumps({c.name: getattr(e, c.name) for c in Event.__table__.columns}, default=str) for e in rows)


# ---- enrolment: one token, one agent ----


def test_one_join_token_used_by_twenty_agents_at_once_enrols_exactly_one(lctl, tmp_path):
    made = lctl.new_token(SITE)
    start = threading.Barrier(20)
    outcome: dict[int, object] = {}

    def one(i: int) -> None:
        start.wait()
        try:
            outcome[i] = enroll(str(tmp_path / f"agent-{i}"), lctl.link_url, made.token, f"rtr-{i}")
        except EnrolError as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcome) == 20, outcome
    winners = {i: r for i, r in outcome.items() if isinstance(r, Enrolled)}
    refused = [r for r in outcome.values() if isinstance(r, EnrolError)]
    assert len(winners) == 1, outcome
    assert len(refused) == 19
    for exc in refused:
        assert str(exc) == "enrolment refused: the join token was already used"
    (i, won), = winners.items()
    assert won.node_id == f"rtr-{i}" and won.site == SITE

    with lctl.app.state.auth.factory() as s:
        certs = s.scalars(select(AgentCertificate)).all()
        agents = s.scalars(select(NodeAgent.name)).all()
    assert [c.node for c in certs] == [won.node_id]
    assert agents == [won.node_id]
    assert token_row(lctl, made.id).used_by == won.node_id
    enrolments = events(lctl, "agent.enrol", join_token_id=made.id)
    assert sorted(e.result for e in enrolments) == ["failure"] * 19 + ["success"]
    assert {(e.reason, e.body["detail"]) for e in enrolments if e.result == "failure"} == {("refused", "the join token was already used")}
    assert [e.subject for e in enrolments if e.result == "success"] == [won.node_id]


@SQLITE
def test_an_expired_a_revoked_or_a_used_token_or_a_wrong_secret_is_refused(lctl, tmp_path):
    agents, root = lctl.app.state.agents, principal(lctl)
    expired = lctl.new_token(SITE, ttl=timedelta(minutes=1))
    lctl.advance(61)
    with pytest.raises(EnrolError, match=r"^enrolment refused: the join token expired at "):
        lctl.enrol(expired.token, NODE)
    revoked = lctl.new_token(SITE)
    agents.revoke_token(root, revoked.id, None)
    with pytest.raises(EnrolError, match=r"^enrolment refused: the join token was revoked$"):
        lctl.enrol(revoked.token, NODE)
    fresh = lctl.new_token(SITE)
    prefix, ident, secret, pin = fresh.token.split(".")
    for wrong in (f"{prefix}.{ident}.{'x' * len(secret)}.{pin}", f"{prefix}.zzzzzzzzzzzz.{secret}.{pin}"):
        with pytest.raises(EnrolError, match=r"^enrolment refused: unknown join token$"):  # alike: no oracle for IDs
            lctl.enrol(wrong, NODE)
    assert agent_row(lctl) is None and count(lctl, AgentCertificate) == 0
    assert all(token_row(lctl, t.id).used_at is None for t in (expired, revoked, fresh))
    states = {t["id"]: t["state"] for t in agents.list_tokens(root, SITE)}
    assert states == {expired.id: "expired", revoked.id: "revoked", fresh.id: "unused"}

    lctl.enrol(fresh.token, NODE)  # the right one still works, once
    with pytest.raises(EnrolError, match=r"^enrolment refused: the join token was already used$"):
        lctl.enrol(fresh.token, OTHER, tmp_path / "other")
    assert agent_row(lctl, OTHER) is None and count(lctl, AgentCertificate) == 1
    with pytest.raises(Conflict, match="already used by rtr-1: revoke the agent instead"):
        agents.revoke_token(root, fresh.id, None)

    audit = [(e.result, e.body["join_token_id"], e.body.get("detail")) for e in events(lctl, "agent.enrol")]
    assert audit[0][:2] == ("failure", expired.id) and audit[0][2].startswith("the join token expired at")
    assert audit[1:] == [("failure", revoked.id, "the join token was revoked"), ("failure", ident, "unknown join token"),
                         ("failure", "zzzzzzzzzzzz", "unknown join token"), ("success", ident, None),
                         ("failure", ident, "the join token was already used")]


@SQLITE
def test_a_token_pinning_another_ca_is_refused_before_the_secret_is_sent(lctl, caplog):
    caplog.set_level(logging.DEBUG)
    made = lctl.new_token(SITE)
    prefix, ident, secret, _pin = made.token.split(".")
    forged = f"{prefix}.{ident}.{secret}.{'ab' * 32}"
    agents = lctl.app.state.agents
    redeemed = []
    real = agents.redeem
    agents.redeem = lambda *a, **kw: redeemed.append(a) or real(*a, **kw)  # the link server redeems what reaches it

    with pytest.raises(EnrolError, match="does not match the pin in the join token: refusing to send the token"):
        lctl.enrol(forged, NODE)
    assert redeemed == [], "the enrolment request (with the secret) reached the controller"
    assert events(lctl, "agent.enrol") == []
    assert token_row(lctl, ident).used_at is None
    assert secret not in caplog.text and secret not in dump_everything(lctl)
    assert not (lctl.state_dir(NODE) / "link" / "tls.pem").exists()

    # the same token sent by an agent that skips the check: refused by the controller, which names no secret
    peer = lctl.peer(None)
    peer.send(EnrollBegin())
    assert isinstance(peer.recv(), EnrollCA)
    peer.send(EnrollRequest(token=forged, node_id=NODE, csr_pem="x", evidence_public_key="x", agent_version="peer"))
    bye = peer.recv()
    assert isinstance(bye, Goodbye) and not bye.retry
    assert bye.reason == "enrolment refused: this join token was made by another controller (its CA pin does not match)"
    failure, = events(lctl, "agent.enrol")
    assert (failure.result, failure.body["join_token_id"]) == ("failure", ident)
    assert token_row(lctl, ident).used_at is None
    assert secret not in caplog.text and secret not in dump_everything(lctl)


MALFORMED = {  # token → what is wrong with it, as the agent and the controller both say
    "": "not a wicket join token (expected wkj1.<id>.<secret>.<pin>)",
    "hello there": "not a wicket join token (expected wkj1.<id>.<secret>.<pin>)",
    "wkj2.abcdefghijkm.s3cretS3cretS3cretS3cret." + "a" * 64: "not a wicket join token (expected wkj1.<id>.<secret>.<pin>)",
    "wkj1.abcdefghijkm.s3cretS3cretS3cretS3cret": "not a wicket join token (expected wkj1.<id>.<secret>.<pin>)",
    "wkj1.abc.s3cretS3cretS3cretS3cret." + "a" * 64: "malformed join token",
    "wkj1.abcdefghijkm.short." + "a" * 64: "malformed join token",
    "wkj1.abcdefghijkm.s3cretS3cretS3cretS3cret." + "z" * 64: "malformed join token",
    "wkj1.abcdefghijkm.s3cretS3cretS3cretS3cret." + "a" * 63: "malformed join token",
}


@SQLITE
def test_a_malformed_token_gets_a_clear_error_from_the_agent_and_from_the_controller(lctl):
    for token, error in MALFORMED.items():
        with pytest.raises(EnrolError) as caught:
            lctl.enrol(token, NODE)
        assert str(caught.value) == f"--token: {error}", token
        # straight to the controller, past the agent's own check
        peer = lctl.peer(None)
        peer.send(EnrollBegin())
        assert isinstance(peer.recv(), EnrollCA)
        peer.send(EnrollRequest(token=token, node_id=NODE, csr_pem="x", evidence_public_key="x", agent_version="peer"))
        bye = peer.recv()
        assert isinstance(bye, Goodbye) and bye.reason == f"enrolment refused: {error}", token
    refusals = events(lctl, "agent.enrol")
    assert [(e.result, e.reason, e.body["detail"], e.body["join_token_id"]) for e in refusals] == [
        ("failure", "refused", e, None) for e in MALFORMED.values()]
    assert agent_row(lctl) is None


def test_an_enrolled_agent_is_not_enrolled_again_until_revoked(lctl, tmp_path):
    lctl.enrolled(SITE, NODE)
    second = lctl.new_token(SITE)
    why = "agent rtr-1 is enrolled already: a site admin revokes it first (`wicket agents revoke rtr-1`)"
    with pytest.raises(EnrolError) as caught:
        lctl.enrol(second.token, NODE, tmp_path / "again")
    assert str(caught.value) == f"enrolment refused: {why}"  # (longer than events.reason: it goes to the body)
    assert token_row(lctl, second.id).used_at is None  # the refusal gave the token back
    refused = events(lctl, "agent.enrol")[-1]
    assert (refused.result, refused.reason, refused.body["detail"]) == ("failure", "refused", why)
    lctl.app.state.agents.revoke_agent(principal(lctl), NODE, "router replaced", None)
    lctl.enrol(second.token, NODE, tmp_path / "again")
    with lctl.app.state.auth.factory() as s:
        certs = s.scalars(select(AgentCertificate).order_by(AgentCertificate.issued_at)).all()
    assert [c.revoked_at is not None for c in certs] == [True, False]
    assert agent_row(lctl).revoked_at is None


def test_a_node_with_a_64_character_name_enrols_and_links(lctl):
    name = "r" * 64  # the longest a node name may be: "agent:" and the name do not fit the events.actor column
    done = lctl.enrolled(SITE, name)
    assert done.node_id == name
    assert isinstance(lctl.peer(name).hello(name), Welcome)
    enrolled, = events(lctl, "agent.enrol")
    wait_for(lambda: events(lctl, "agent.link_up"), "the link to be recorded")
    assert enrolled.subject == events(lctl, "agent.link_up")[0].subject == name


# ---- secrets ----


@SQLITE
def test_no_token_secret_reaches_a_log_record_or_the_audit(lctl, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)  # every logger, every level
    lctl.add_site(SOUTH)
    res = lctl.client.post(f"{API}/sites/{SITE}/join-tokens", json={"ttl": "30m"}, headers=lctl.step_up_admin())
    assert res.status_code == 201, res.text
    used = res.json()
    made = [used, *(lctl.client.post(f"{API}/sites/{SITE}/join-tokens", json={}, headers=lctl.step_up_admin()).json()
                    for _ in range(2))]
    secrets = [t["token"].split(".")[2] for t in made]
    listing = lctl.client.get(f"{API}/sites/{SITE}/join-tokens", headers=lctl.auth(lctl.admin_token()))
    assert listing.status_code == 200 and len(listing.json()) == 3

    # redeemed; redeemed again; one revoked and then tried; a wrong secret for the third; the third at last
    lctl.enrol(used["token"], NODE)
    with pytest.raises(EnrolError, match="already used"):
        lctl.enrol(used["token"], OTHER)
    revoked = made[1]
    assert lctl.client.delete(f"{API}/join-tokens/{revoked['id']}", headers=lctl.auth(lctl.admin_token())).status_code == 204
    with pytest.raises(EnrolError, match="was revoked"):
        lctl.enrol(revoked["token"], OTHER)
    prefix, ident, secret, pin = made[2]["token"].split(".")
    wrong = "W" * len(secret)
    with pytest.raises(EnrolError, match="unknown join token"):
        lctl.enrol(f"{prefix}.{ident}.{wrong}.{pin}", OTHER)
    lctl.enrol(made[2]["token"], OTHER)
    listing = lctl.client.get(f"{API}/sites/{SITE}/join-tokens", headers=lctl.auth(lctl.admin_token()))
    assert sorted(t["state"] for t in listing.json()) == ["revoked", "used", "used"]
    audit = lctl.client.get(f"{API}/events", params={"limit": 1000}, headers=lctl.auth(lctl.admin_token()))

    assert len(caplog.records) > 20  # the run was logged (so the check below looks at something)
    logged = caplog.text + "\n".join(str(r.__dict__) for r in caplog.records)
    stored = dump_everything(lctl)
    assert {t["id"] for t in made} <= {e.subject for e in events(lctl, "join_token.create")}
    for text in (*secrets, wrong):
        assert text not in logged, "a join token's secret reached a log record"
        assert text not in stored, "a join token's secret reached the audit store"
        assert text not in audit.text and text not in listing.text


# ---- agent identity ----


@SQLITE
def test_a_revoked_agent_is_cut_off_at_once_and_cannot_come_back(lctl):
    lctl.enrolled(SITE, NODE)
    agent = lctl.sim(NODE)
    agent.wait_connected()
    assert agent_row(lctl).connected
    res = lctl.client.post(f"{API}/agents/{NODE}/revoke", json={"reason": "router stolen"}, headers=lctl.step_up_admin())
    assert res.status_code == 204, res.text
    wait_for(lambda: "this agent was revoked" in agent.client.state, "the link to be cut, saying why")
    assert not agent.client.connected
    assert NODE not in lctl.link.connected()
    revoked, = events(lctl, "agent.revoke")
    assert revoked.body["certificates_revoked"] == 1 and revoked.body["note"] == "router stolen"

    agent.stop()
    peer = lctl.peer(NODE)
    bye = peer.hello(NODE)
    assert isinstance(bye, Goodbye) and not bye.retry
    assert bye.reason.startswith("certificate ") and bye.reason.endswith(" was revoked")
    assert [e.result for e in events(lctl, "agent.link_up")] == ["success"]  # the first link only


@SQLITE
def test_a_link_the_controller_cuts_is_recorded_as_down(lctl):
    lctl.enrolled(SITE, NODE)
    agent = lctl.sim(NODE)
    agent.wait_connected()
    wait_for(lambda: NODE in lctl.link.statuses, "a status")
    lctl.app.state.agents.revoke_agent(principal(lctl), NODE, "router stolen", None)
    wait_for(lambda: events(lctl, "agent.link_down"), "the cut link to be recorded as down")
    assert not agent_row(lctl).connected
    assert NODE not in lctl.link.statuses, "the cut agent's last status is still served"
    listed, = lctl.app.state.agents.list_agents(principal(lctl))
    assert listed["connected"] is False


@SQLITE
def test_an_acknowledgement_from_a_revoked_agent_is_not_recorded(lctl):
    lctl.enrolled(SITE, NODE)
    peer = lctl.peer(NODE)
    assert isinstance(peer.hello(NODE), Welcome)
    first = peer.until(DesiredNodeState)
    # revoked on another replica: this one learns of it from the database, not from a cut
    agents = lctl.app.state.agents
    agents.on_revoke = lambda node: None
    agents.revoke_agent(principal(lctl), NODE, "revoked elsewhere", None)
    lctl.link.ack_timeout_s = 1
    pushed: dict[str, object] = {}

    def push():
        try:
            pushed["report"] = lctl.link.push(first)
        except LinkError as exc:
            pushed["error"] = exc

    waiting = threading.Thread(target=push)
    waiting.start()
    peer.send(applied_for(first))
    bye = peer.sync()
    waiting.join(10)
    assert agent_row(lctl).applied_generation is None, "the revoked agent's acknowledgement was recorded"
    assert NODE not in lctl.link.statuses
    assert "report" not in pushed and "did not acknowledge" in str(pushed.get("error"))
    if bye is None:  # still linked: the next ping's check cuts it
        bye = peer.until(Goodbye, timeout=3 * lctl.link.heartbeat_s)
    assert "was revoked" in bye.reason


@SQLITE
def test_an_expired_certificate_can_neither_say_hello_nor_take_state(lctl):
    lctl.enrolled(SITE, NODE)
    cert, key = lctl.extra_certificate(NODE, timedelta(seconds=3), lctl.tmp / "short")
    with lctl.app.state.auth.factory() as s:
        not_after = s.scalars(select(AgentCertificate.not_after).order_by(AgentCertificate.not_after)).first()
    peer = Peer.connect(lctl.address, cert, key)
    lctl.peers.append(peer)
    assert isinstance(peer.hello(NODE), Welcome)
    first = peer.until(DesiredNodeState)
    wait_for(lambda: datetime.now(UTC) > not_after + timedelta(seconds=0.2), "the certificate to run out")
    try:
        peer.send(applied_for(first))
        bye = peer.sync()
    except OSError:
        bye = Goodbye(reason="(gone)")
    assert bye is not None and bye.reason != "(gone)", "the link outlived the certificate"
    assert "expired" in bye.reason
    assert agent_row(lctl).applied_generation is None

    # a new connection with it: TLS refuses the expired certificate, or the link does
    try:
        again = Peer.connect(lctl.address, cert, key)
        lctl.peers.append(again)
        answer = again.hello(NODE)
    except Closed:
        answer = None
    assert not isinstance(answer, Welcome)

    # a certificate that TLS still accepts but the controller's record says has run out
    with transaction(lctl.app.state.auth.factory) as s:
        s.execute(update(AgentCertificate).values(not_after=datetime.now(UTC) - timedelta(seconds=1)))
    bye = lctl.peer(NODE).hello(NODE)
    assert isinstance(bye, Goodbye) and " expired at " in bye.reason and not bye.retry


@SQLITE
def test_a_hello_needs_a_certificate_of_this_controller_for_that_very_node(lctl, tmp_path):
    lctl.enrolled(SITE, NODE)
    lctl.enrolled(SITE, OTHER)
    bye = lctl.peer(NODE).hello(OTHER)  # rtr-1's certificate, saying it is rtr-2
    assert isinstance(bye, Goodbye) and not bye.retry
    assert bye.reason == f"the certificate is for {NODE}, not {OTHER}"

    bye = lctl.peer(None).hello(NODE)  # no certificate at all
    assert isinstance(bye, Goodbye) and not bye.retry
    assert bye.reason == "a client certificate from this controller is required: enrol first"

    # a certificate for rtr-1 from another CA: TLS does not take it
    key, csr = new_tls_key()
    (tmp_path / "foreign.pem").write_text(AgentCA.load_or_create(tmp_path / "other-ca").issue_agent(csr, NODE, timedelta(hours=1)).pem)
    (tmp_path / "foreign.key").write_bytes(key)
    try:
        peer = Peer.connect(lctl.address, str(tmp_path / "foreign.pem"), str(tmp_path / "foreign.key"))
        lctl.peers.append(peer)
        answer = peer.hello(NODE)
    except Closed:
        answer = None
    assert not isinstance(answer, Welcome)
    assert events(lctl, "agent.link_up") == []
    assert not agent_row(lctl, NODE).connected and not agent_row(lctl, OTHER).connected


# ---- pushes and acknowledgements ----


@SQLITE
def test_a_new_generation_reaches_the_agent_without_a_poll_and_push_returns_its_report(lctl, monkeypatch):
    monkeypatch.setattr(agent_link, "WATCH_S", 3600.0)  # no polling for generations made elsewhere (after its first turn)
    lctl.enrolled(SITE, NODE)
    agent = lctl.sim(NODE)
    agent.wait_connected()
    start = agent.wait_generation(0)

    woken = bump_and_build(lctl)
    lctl.link.wake(NODE)
    assert agent.wait_generation(woken.generation).generation == woken.generation > start.generation

    pushed = bump_and_build(lctl)
    report = lctl.link.push(pushed)
    assert isinstance(report, ReconcileReport) and report.generation == pushed.generation and report.errors == []
    assert agent.applied[-1].generation == pushed.generation
    assert agent_row(lctl).applied_generation == pushed.generation
    assert lctl.link.status(NODE).applied_generation == pushed.generation


@SQLITE
def test_the_controller_never_sends_a_generation_older_than_one_it_sent(lctl):
    lctl.enrolled(SITE, NODE)
    peer = lctl.peer(NODE)
    assert isinstance(peer.hello(NODE), Welcome)
    first = peer.until(DesiredNodeState)
    stop = threading.Event()
    sent_applied: list[int] = []

    def agent():  # applies whatever comes, in order
        while not stop.is_set():
            try:
                msg = peer.recv(timeout=0.2)
            except AssertionError:
                continue
            except Closed:
                return
            if isinstance(msg, DesiredNodeState):
                peer.send(applied_for(msg))
                sent_applied.append(msg.generation)

    reader = threading.Thread(target=agent)
    reader.start()
    reports: list[tuple[int, int]] = []
    errors: list[Exception] = []

    def writer(n: int):  # a lane change, and a push of the state as it was read (maybe stale by the time it goes)
        for _ in range(5):
            desired = bump_and_build(lctl)
            if n % 2:
                lctl.link.wake(NODE)
            try:
                reports.append((desired.generation, lctl.link.push(desired).generation))
            except LinkError as exc:
                errors.append(exc)

    writers = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
    newest = agent_row(lctl).generation
    wait_for(lambda: sent_applied and sent_applied[-1] == newest, "the newest generation to be applied")
    # an old state handed over again after a newer one: acknowledged at once, not sent
    before = len(peer.pushes())
    assert lctl.link.push(first).generation == newest
    stop.set()
    reader.join(10)
    assert not errors, errors
    assert len(reports) == 30 and all(got >= wanted for wanted, got in reports), reports
    generations = [d.generation for d in peer.pushes()]
    assert generations == sorted(generations), f"an older generation was sent after a newer one: {generations}"
    assert len(peer.pushes()) == before


@SQLITE
def test_a_refusal_from_the_agent_reaches_push_as_a_link_error_in_its_words(lctl):
    lctl.enrolled(SITE, NODE)
    agent = lctl.sim(NODE, start=False)
    agent.mode, agent.refusal = "refuse", "lane s-x: listen port 51000 is taken by another process"
    agent.start()
    wait_for(lambda: (agent_row(lctl).last_error or "").endswith(agent.refusal), "the refusal to be recorded")
    with pytest.raises(LinkError) as caught:
        lctl.link.push(bump_and_build(lctl))
    assert str(caught.value) == f"node {NODE} refused: {agent.refusal}"
    assert agent_row(lctl).applied_generation is None


def link_world(h: LinkHarness, node: str = NODE, **agent):
    """The session tests' world over the link: north-1, its agent enrolled (first, while the harness clock is
    close to the real one) and linked, the example policy and RTU-17. `agent`: SimAgent attributes."""
    h.enrolled(SITE, node)
    sim = h.sim(node, start=False)
    for k, v in agent.items():
        setattr(sim, k, v)
    sim.start()
    sim.wait_connected()
    h.apply_policy(policy_files())
    h.add_device(RTU, SITE, addresses=["10.20.0.17"], last_seen=datetime.fromtimestamp(h.t, UTC).isoformat())
    return World(h), sim


def approved_session(h, w) -> str:
    s = request(h, w.erin, RTU, DIAG, activate=False)
    assert s["state"] == "approved", s
    return s["id"]


@SQLITE
def test_activation_opens_the_session_only_once_the_agent_reports_the_lane_with_its_key(lctl):
    w, agent = link_world(lctl)
    sid = approved_session(lctl, w)
    call = headers(lctl, w.erin, step_up=True)
    agent.mode = "hold"
    answer = {}
    opening = threading.Thread(target=lambda: answer.update(
        res=lctl.client.post(f"{API}/sessions/{sid}/activate", json={}, headers=call)))
    opening.start()
    wait_for(agent.holding.is_set, "the agent to be handed the lane")
    assert any(lane.session_id == sid for lane in agent.offered[-1].lanes)
    assert session_row(lctl, sid).state == "opening"
    agent.mode = "open"
    agent.release.set()
    opening.join(30)
    res = answer["res"]
    assert res.status_code == 200, res.text
    assert res.json()["state"] == "active"
    row = session_row(lctl, sid)
    assert row.state == "active" and row.node_public_key == agent.keys[sid]
    opened, = events(lctl, "session.open")
    assert opened.subject == sid and opened.actor == f"agent:{NODE}" and opened.body["generation"] >= row.opened_generation


@SQLITE
def test_a_lane_the_agent_could_not_open_answers_503_with_its_error(lctl):
    w, agent = link_world(lctl)
    sid = approved_session(lctl, w)
    agent.mode = "fail"
    res = lctl.client.post(f"{API}/sessions/{sid}/activate", json={}, headers=headers(lctl, w.erin, step_up=True))
    assert res.status_code == 503, res.text
    assert res.json()["error"] == "node_unavailable"
    assert f"lane {sid}: {agent.lane_error}" in res.json()["detail"]
    row = session_row(lctl, sid)
    assert row.state == "approved" and row.tunnel_address is None and row.node_public_key is None
    assert count(lctl, LaneLease, LaneLease.session_id == sid) == 0
    failed = [e for e in events(lctl, "session.activate") if e.result == "failure"]
    assert [e.subject for e in failed] == [sid] and agent.lane_error in failed[0].body["error"]


@SQLITE
def test_an_agent_that_never_answers_gives_503_after_the_ack_timeout(make_link):
    h = make_link(WICKET_ACK_TIMEOUT_S=1)
    h.add_site(SITE, tunnel_pool=POOL)
    w, agent = link_world(h)
    sid = approved_session(h, w)
    agent.mode = "hold"  # taken, never answered
    res = h.client.post(f"{API}/sessions/{sid}/activate", json={}, headers=headers(h, w.erin, step_up=True))
    assert res.status_code == 503, res.text
    assert "did not acknowledge" in res.json()["detail"] and "within 1 s" in res.json()["detail"]
    assert agent.holding.is_set()
    row = session_row(h, sid)
    assert row.state == "approved" and row.tunnel_address is None


# ---- protocol versions ----


@SQLITE
@pytest.mark.parametrize("old", range(OLDEST_SERVED, PROTOCOL_VERSION))
def test_an_older_agent_is_served_in_its_version(lctl, old):
    assert OLDEST_SERVED == 2, "v2 agents (no recording) and v3 (no baselines) are both still served"
    lctl.enrolled(SITE, NODE)
    peer = lctl.peer(NODE)
    welcome = peer.hello(NODE, version=old)
    assert isinstance(welcome, Welcome) and welcome.protocol_version == old  # the version both sides speak
    first = peer.until(DesiredNodeState)
    assert first.protocol_version == old
    peer.send(applied_for(first), version=old)
    assert peer.sync() is None
    later = bump_and_build(lctl)
    lctl.link.wake(NODE)
    again = peer.until(DesiredNodeState)
    assert (again.generation, again.protocol_version) == (later.generation, old)
    row = agent_row(lctl)
    assert row.protocol_version == old and row.applied_generation == first.generation


@SQLITE
def test_a_hello_in_a_version_not_served_gets_a_goodbye_naming_the_range(lctl):
    lctl.enrolled(SITE, NODE)
    for version, fix in ((OLDEST_SERVED - 1, "upgrade the agent"), (PROTOCOL_VERSION + 1, "upgrade the controller first")):
        bye = lctl.peer(NODE).hello(NODE, version=version)
        assert isinstance(bye, Goodbye) and not bye.retry
        assert bye.reason == f"agent protocol v{version}: this controller serves v{OLDEST_SERVED} to v{PROTOCOL_VERSION}; {fix}"
    assert events(lctl, "agent.link_up") == [] and not agent_row(lctl).connected


# ---- evidence ----


@SQLITE
def test_signed_evidence_is_stored_once_and_receipted_each_time(lctl):
    lctl.enrolled(SITE, NODE)
    peer = lctl.peer(NODE)
    assert isinstance(peer.hello(NODE), Welcome)
    record = signed(lctl.state_dir(NODE), "ev-1", lane_evidence(NODE, "s-abcdefghijkm"))
    for _ in range(2):  # the first receipt was lost in a cut, say
        peer.send(record)
        assert peer.until(EvidenceReceipt).ident == "ev-1"
    with lctl.app.state.auth.factory() as s:
        stored = s.scalars(select(LaneEvidenceRecord)).all()
    assert [(r.node, r.ident, r.session_id, r.end_reason) for r in stored] == [(NODE, "ev-1", "s-abcdefghijkm", "expired")]
    assert stored[0].signature == record.signature and stored[0].body == evidence_payload(record.evidence)
    assert [e.result for e in events(lctl, "lane.evidence")] == ["success"]


@SQLITE
def test_evidence_with_a_bad_signature_or_about_another_node_is_refused(lctl):
    lctl.enrolled(SITE, NODE)
    lctl.enrolled(SITE, OTHER)
    peer = lctl.peer(NODE)
    assert isinstance(peer.hello(NODE), Welcome)
    evidence = lane_evidence(NODE, "s-abcdefghijkm")
    forged = signed(lctl.state_dir(NODE), "ev-1", evidence, key=Ed25519PrivateKey.generate())
    tampered = signed(lctl.state_dir(NODE), "ev-2", evidence)
    tampered = tampered.model_copy(update={"evidence": evidence.model_copy(update={"totals": evidence.totals.model_copy(
        update={"bytes_out": 1})})})
    mine_about_other = signed(lctl.state_dir(NODE), "ev-3", lane_evidence(OTHER, "s-abcdefghijkm"))
    others_own = signed(lctl.state_dir(OTHER), "ev-4", lane_evidence(OTHER, "s-abcdefghijkm"))
    for record in (forged, tampered, mine_about_other, others_own):
        peer.send(record)
        assert peer.sync() is None
    assert not any(isinstance(m, EvidenceReceipt) for m in peer.received)
    assert count(lctl, LaneEvidenceRecord) == 0
    refused = events(lctl, "lane.evidence")
    assert [(e.result, e.reason, e.body["ident"]) for e in refused] == [("failure", "bad_signature", "ev-1"),
                                                                         ("failure", "bad_signature", "ev-2")]


@SQLITE
def test_control_lost_evidence_ends_the_active_session(lctl):
    w, agent = link_world(lctl)
    sid = approved_session(lctl, w)
    assert activate(lctl, w.erin, sid)["state"] == "active"
    held = agent.current.generation
    agent.write_evidence("ev-lost", lane_evidence(NODE, sid, "control_lost", device_id=RTU))
    wait_for(lambda: "ev-lost" in agent.receipts, "the evidence receipt")
    row = session_row(lctl, sid)
    assert (row.state, row.end_reason, row.ended_by) == ("closed", "node_control_lost", "system")
    assert count(lctl, LaneLease, LaneLease.session_id == sid) == 0
    after = agent.wait_generation(held + 1)  # the lane is gone from what the node is to hold
    wait_for(lambda: all(lane.session_id != sid for lane in agent.current.lanes), "a state without the lane")
    assert after.generation > held
    stored, = [(r.session_id, r.end_reason) for r in _evidence(lctl)]
    assert stored == (sid, "control_lost")


def _evidence(h) -> list[LaneEvidenceRecord]:
    with h.app.state.auth.factory() as s:
        return list(s.scalars(select(LaneEvidenceRecord)))


# ---- the API: join tokens and agents ----


def _person(h, name: str, *roles):
    return h.add_user(name, roles=list(roles))


@SQLITE
def test_join_tokens_need_a_site_admin_and_a_step_up_and_show_the_secret_once(ctl):
    ctl.add_site(SITE)
    ctl.add_site(SOUTH)
    sadm = _person(ctl, "sadm", ("site_admin", SITE))
    eng = _person(ctl, "eng", ("engineer", SITE))
    sadm2 = _person(ctl, "sadm2", ("site_admin", SOUTH))
    path = f"{API}/sites/{SITE}/join-tokens"

    res = ctl.client.post(path, json={}, headers=headers(ctl, sadm))
    assert (res.status_code, res.json()["error"]) == (401, "step_up_required")
    assert ctl.client.post(path, json={}, headers=headers(ctl, eng, step_up=True)).status_code == 403
    assert ctl.client.post(path, json={}, headers=headers(ctl, sadm2, step_up=True)).status_code == 404
    for ttl in ("30s", "8d", "soon"):
        assert ctl.client.post(path, json={"ttl": ttl}, headers=headers(ctl, sadm, step_up=True)).status_code == 422
    res = ctl.client.post(path, json={"ttl": "2h"}, headers=headers(ctl, sadm, step_up=True))
    assert res.status_code == 201, res.text
    made = res.json()
    prefix, ident, secret, pin = made["token"].split(".")
    assert (prefix, ident, made["site"]) == ("wkj1", made["id"], SITE)
    assert pin == made["link_pin"] == ctl.app.state.agents.ca.pin()
    assert len(secret) >= 40
    assert abs((datetime.fromisoformat(made["expires_at"]) - datetime.fromtimestamp(ctl.t, UTC)) - timedelta(hours=2)) < timedelta(seconds=2)

    listing = ctl.client.get(path, headers=headers(ctl, sadm))
    assert listing.status_code == 200
    (shown,) = listing.json()
    assert shown["id"] == ident and shown["state"] == "unused" and shown["created_by"] == "sadm"
    assert secret not in listing.text and "token" not in shown
    assert ctl.client.get(path, headers=headers(ctl, eng)).status_code == 403
    assert ctl.client.get(path, headers=headers(ctl, sadm2)).status_code == 404
    with ctl.app.state.auth.factory() as s:
        assert secret not in json.dumps([c for c in s.execute(select(JoinToken.__table__)).one()], default=str)

    for who in (eng, sadm2):
        assert ctl.client.delete(f"{API}/join-tokens/{ident}", headers=headers(ctl, who)).status_code == 404
    assert ctl.client.delete(f"{API}/join-tokens/{ident}", headers=headers(ctl, sadm)).status_code == 204
    assert ctl.client.get(path, headers=headers(ctl, sadm)).json()[0]["state"] == "revoked"
    assert ctl.client.delete(f"{API}/join-tokens/abcdefghijkm", headers=headers(ctl, sadm)).status_code == 404
    kinds = [(e["type"], e["result"], e["subject"]) for e in ctl.events() if e["category"] == "agent"]
    assert kinds == [("join_token.create", "success", ident), ("join_token.revoke", "success", ident)]


@SQLITE
def test_agents_api_shows_the_link_and_revoking_needs_a_step_up(lctl):
    lctl.add_site(SOUTH)
    sadm = _person(lctl, "sadm", ("site_admin", SITE))
    # enrolled while the harness clock is still near the real one (every step-up moves it on)
    lctl.enrolled(SITE, NODE)
    agent = lctl.sim(NODE)
    agent.wait_connected()
    soc = _person(lctl, "soc", ("soc", None))
    sadm2 = _person(lctl, "sadm2", ("site_admin", SOUTH))
    wait_for(lambda: agent_row(lctl).applied_generation == agent_row(lctl).generation and agent_row(lctl).clock_synchronized,
             "the first push to be acknowledged and a status")

    res = lctl.client.get(f"{API}/agents", headers=headers(lctl, sadm))
    assert res.status_code == 200
    (shown,) = res.json()
    assert shown["name"] == NODE and shown["site"] == SITE and shown["connected"] is True
    assert shown["applied_generation"] == shown["generation"]
    assert (shown["agent_version"], shown["protocol_version"], shown["clock_synchronized"]) == (agent_version, PROTOCOL_VERSION, True)
    assert shown["certificate_not_after"] and shown["enrolled_at"] and shown["revoked_at"] is None
    assert [a["name"] for a in lctl.client.get(f"{API}/agents", headers=headers(lctl, soc)).json()] == [NODE]
    assert lctl.client.get(f"{API}/agents", headers=headers(lctl, sadm2)).json() == []
    assert lctl.client.get(f"{API}/agents", params={"site": SOUTH}, headers=headers(lctl, sadm)).json() == []

    path = f"{API}/agents/{NODE}/revoke"
    res = lctl.client.post(path, json={"reason": "router stolen"}, headers=headers(lctl, sadm))
    assert (res.status_code, res.json()["error"]) == (401, "step_up_required")
    assert lctl.client.post(path, json={"reason": "router stolen"}, headers=headers(lctl, soc, step_up=True)).status_code == 403
    assert lctl.client.post(path, json={"reason": "router stolen"}, headers=headers(lctl, sadm2, step_up=True)).status_code == 404
    assert lctl.client.post(path, json={"reason": "x"}, headers=headers(lctl, sadm, step_up=True)).status_code == 422
    assert agent.client.connected and agent_row(lctl).revoked_at is None
    res = lctl.client.post(path, json={"reason": "router stolen"}, headers=headers(lctl, sadm, step_up=True))
    assert res.status_code == 204, res.text
    wait_for(lambda: not agent.client.connected, "the link to be cut")
    (shown,) = lctl.client.get(f"{API}/agents", headers=headers(lctl, sadm)).json()
    assert shown["revoked_at"] and shown["certificate_not_after"] is None
