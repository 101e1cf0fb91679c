"""The audit chain as the controller writes it: every record numbered without gaps and hashed onto the
one before, also under concurrent writers; old events sealed by the migration; checkpoints signed at
every multiple and on time; and an action whose record cannot be written does not happen."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select, text

from controller import events
from controller.audit.chain import GENESIS, Checkpointer
from controller.db import make_engine, session_factory, transaction
from controller.models import AccessSession, AuditCheckpoint, AuditHead, AuditKey, Event

from .session_helpers import DIAG, RTU, TWO_PERSON, activate, approve, get, request, world

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def chain_of(factory) -> list[Event]:
    with factory() as s:
        return list(s.scalars(select(Event).order_by(Event.seq)))


def check_chain(rows: list[Event]) -> str:
    """Recompute the chain from the stored lines, independently of controller.audit (the spec in
    docs/audit.md); returns the head hash."""
    prev = GENESIS
    for n, row in enumerate(rows, start=1):
        assert row.seq == n, f"sequence gap before {row.seq}"
        obj = json.loads(row.line)
        assert obj["seq"] == n and obj["v"] == 1
        assert (obj["type"], obj["category"], obj["result"], obj["actor"]) == (row.type, row.category, row.result, row.actor)
        assert obj["body"] == row.body
        leaf = hashlib.sha256(row.line.encode()).digest()
        assert row.leaf == leaf.hex() and row.prev_hash == prev
        prev = hashlib.sha256(bytes.fromhex(prev) + leaf).hexdigest()
        assert row.hash == prev, f"record {n}: hash does not match"
    return prev


def test_every_action_is_chained_in_order(ctl):
    w = world(ctl)
    sid = request(ctl, w.erin, RTU, TWO_PERSON)["id"]
    approve(ctl, w.alex, sid)
    approve(ctl, w.ana, sid)
    activate(ctl, w.erin, sid)
    factory = session_factory(ctl.app.state.engine)
    rows = chain_of(factory)
    head = check_chain(rows)
    with factory() as s:
        assert s.execute(select(AuditHead.seq, AuditHead.hash)).one() == (len(rows), head)
    types = [r.type for r in rows]
    assert {"user_created", "policy.apply", "session.request", "session.approve", "session.activate", "session.open"} <= set(types)
    opened = next(r for r in rows if r.type == "session.open")
    assert opened.session_ref == sid and opened.device_ref == RTU
    assert json.loads(opened.line)["session"] == sid
    assert all(json.loads(r.line)["clock"] in ("synced", "unsynced", "unknown") for r in rows)
    assert all(json.loads(r.line)["time"].endswith("Z") for r in rows)


def test_concurrent_writers_never_share_or_skip_a_number(ctl):
    factory = session_factory(ctl.app.state.engine)
    errors = []

    def writer(n: int) -> None:
        try:
            for i in range(25):
                with transaction(factory) as s:
                    events.record(s, category="account", type="test.event", result="success", actor=f"w{n}", i=i)
                    if i % 5 == 0:  # two records in one transaction stay adjacent
                        events.record(s, category="account", type="test.pair", result="success", actor=f"w{n}", i=i)
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = chain_of(factory)
    check_chain(rows)
    mine = [r for r in rows if r.type.startswith("test.")]
    assert len(mine) == 6 * 30
    for a, b in zip(rows, rows[1:], strict=False):
        if b.type == "test.pair":
            assert a.type == "test.event" and a.actor == b.actor and a.body["i"] == b.body["i"]


def test_a_body_that_is_not_plain_json_is_refused(ctl):
    factory = session_factory(ctl.app.state.engine)
    with pytest.raises(ValueError, match="not plain JSON"), transaction(factory) as s:
        events.record(s, category="account", type="test.event", result="success", when=datetime.now(UTC))


def _inject_failure(engine, event_type: str) -> None:
    """Make the database refuse to store one type of record, as a full disk or a broken replica would."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text(f"CREATE TRIGGER refuse_audit BEFORE INSERT ON events WHEN NEW.type = '{event_type}' "
                              "BEGIN SELECT RAISE(ABORT, 'injected: audit storage refused the record'); END"))
        else:
            conn.execute(text("CREATE FUNCTION refuse_audit() RETURNS trigger AS $$ BEGIN "
                              "RAISE EXCEPTION 'injected: audit storage refused the record'; END $$ LANGUAGE plpgsql"))
            conn.execute(text(f"CREATE TRIGGER refuse_audit BEFORE INSERT ON events FOR EACH ROW "
                              f"WHEN (NEW.type = '{event_type}') EXECUTE FUNCTION refuse_audit()"))


def test_an_approval_whose_record_cannot_be_written_does_not_happen(ctl):
    w = world(ctl)
    sid = request(ctl, w.erin, RTU, TWO_PERSON)["id"]
    _inject_failure(ctl.app.state.engine, "session.approve")
    from .helpers import API, headers

    res = ctl.client.post(f"{API}/sessions/{sid}/approve", json={"reason": "checked"}, headers=headers(ctl, w.alex, step_up=True))
    assert res.status_code == 503, res.text
    assert res.json()["error"] == "audit_unavailable" and "not done" in res.json()["detail"]
    assert get(ctl, w.erin, sid)["state"] == "pending_approval"
    assert get(ctl, w.erin, sid)["approvals"] == []
    check_chain(chain_of(session_factory(ctl.app.state.engine)))


@pytest.mark.parametrize("refused", ["session.activate", "session.open"])
def test_an_activation_whose_record_cannot_be_written_leaves_no_active_session(ctl, refused):
    w = world(ctl)
    sid = request(ctl, w.erin, RTU, DIAG, activate=False)["id"]
    assert get(ctl, w.erin, sid)["state"] == "approved"
    _inject_failure(ctl.app.state.engine, refused)
    pushes = len(ctl.nodes.pushes)
    ctl.app.state.settings.__dict__["ack_timeout_s"] = 1  # the node "acknowledges" at once; no need to wait 10 s
    res = activate(ctl, w.erin, sid, expect=503)
    assert res["error"] in ("audit_unavailable", "node_unavailable"), res
    state = get(ctl, w.erin, sid)["state"]
    assert state == "approved", state
    factory = session_factory(ctl.app.state.engine)
    with factory() as s:
        assert s.scalar(select(AccessSession.state).where(AccessSession.id == sid)) == "approved"
    lanes = [lane.session_id for lane in ctl.nodes.desired.get("edge-north-1").lanes] if "edge-north-1" in ctl.nodes.desired else []
    assert sid not in lanes, "the node still holds a lane whose opening was not recorded"
    if refused == "session.activate":
        assert len(ctl.nodes.pushes) == pushes, "nothing may reach the node before the activation is recorded"
    from controller.audit.chain import health

    assert health.failures >= 1 and "injected" in health.last_error
    check_chain(chain_of(factory))


def test_checkpoints_at_every_multiple_and_on_time(ctl):
    factory = session_factory(ctl.app.state.engine)
    signer = ctl.app.state.audit_signer
    cp = Checkpointer(factory, signer, every=10, interval_s=60)
    cp.run_once()
    for i in range(35):
        with transaction(factory) as s:
            events.record(s, category="account", type="test.event", result="success", i=i)
    t0 = datetime.now(UTC)
    head_seq = len(chain_of(factory))
    made = cp.run_once(t0)
    assert all(size % 10 == 0 for size in made) and made[-1] == head_seq // 10 * 10
    assert cp.run_once(t0 + timedelta(seconds=5)) == []  # not due yet
    assert cp.run_once(t0 + timedelta(seconds=61)) == [head_seq]
    with factory() as s:
        key = s.get(AuditKey, signer.key_id)
        cps = list(s.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.tree_size)))
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key.public_key))
    rows = {r.seq: r for r in chain_of(factory)}
    for c in cps:
        public.verify(base64.b64decode(c.signature), c.statement.encode())
        stmt = json.loads(c.statement)
        assert stmt == {"v": 1, "kind": "wicket.audit.checkpoint", "tree_size": c.tree_size, "head_hash": rows[c.tree_size].hash,
                        "time": stmt["time"], "key_id": signer.key_id}
    # A second replica making the same checkpoint adds nothing.
    assert Checkpointer(factory, signer, every=10, interval_s=60).run_once(t0 + timedelta(seconds=61), at_head=True) == []


def test_the_migration_seals_events_written_before_the_chain(tmp_path, db_url):
    """A database from before the chain (migration 0004, events with gaps in their numbers) is upgraded:
    its events become records 1..n, chained in their old order."""
    from alembic import command
    from alembic.config import Config

    from controller.db import MIGRATIONS

    engine = make_engine(db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    with engine.begin() as conn:
        for seq, kind in ((3, "login"), (7, "logout"), (8, "user_created")):
            conn.execute(text("INSERT INTO events (seq, at, category, type, result, actor, body) "
                              "VALUES (:seq, :at, 'authentication', :type, 'success', 'alice', :body)"),
                         {"seq": seq, "at": datetime(2026, 1, 1, 0, 0, seq), "type": kind, "body": json.dumps({"n": seq})})
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    factory = session_factory(engine)
    rows = chain_of(factory)
    assert [(r.seq, r.type, r.body["n"]) for r in rows] == [(1, "login", 3), (2, "logout", 7), (3, "user_created", 8)]
    head = check_chain(rows)
    assert all(r.clock == "unknown" for r in rows)
    with transaction(factory) as s:
        events.record(s, category="account", type="test.event", result="success")
    rows = chain_of(factory)
    assert rows[-1].seq == 4 and rows[-1].prev_hash == head
    check_chain(rows)
    engine.dispose()


def test_a_commit_that_fails_after_its_records_were_sealed_is_an_audit_failure(ctl):
    """A full disk or a lost server shows at COMMIT, after the records were sealed: the caller gets the
    audit error (503), the failure is counted for the operator's alert, and nothing of it is stored. A
    deferred foreign key that fails at commit stands in for the disk."""
    from controller.audit.chain import AuditWriteError, health

    engine = ctl.app.state.engine
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE parent_t (id INTEGER PRIMARY KEY)"))
        conn.execute(text("CREATE TABLE child_t (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parent_t (id) "
                          "DEFERRABLE INITIALLY DEFERRED)"))
    factory = session_factory(engine)
    before, failures = len(chain_of(factory)), health.failures
    with pytest.raises(AuditWriteError, match="not done"), transaction(factory) as s:
        s.execute(text("INSERT INTO child_t (id, parent) VALUES (1, 42)"))
        events.record(s, category="account", type="test.event", result="success")
    assert health.failures == failures + 1 and health.failing
    assert len(chain_of(factory)) == before
    with transaction(factory) as s:  # the next write works, and the alert clears
        events.record(s, category="account", type="test.event", result="success")
    assert not health.failing
    check_chain(chain_of(factory))
    # An error in a transaction without records stays what it was.
    with pytest.raises(Exception) as raised, transaction(factory) as s:
        s.execute(text("INSERT INTO child_t (id, parent) VALUES (2, 43)"))
    assert not isinstance(raised.value, AuditWriteError)
