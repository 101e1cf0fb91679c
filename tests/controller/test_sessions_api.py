"""Sessions through the API: request, decision, approval by N distinct people, activation, the one-time
config and the key's erasure, extension, close and revoke, the session clock (expiry, lapses, warnings,
revocation when the user or the policy changes), break-glass and its review, and the access history.

The fake node (tests/controller/fakenode.py) stands in for the site's agent: what it was last handed
is what the agent would enforce. Who may call what is the authorisation matrix's job
(test_authz_matrix.py); here each call is made by someone allowed to, unless the test is about a refusal.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from controller import session_clock
from controller.models import AccessSession, Base, LaneLease

from .helpers import API, iso
from .session_helpers import (
    DER,
    DIAG,
    METER,
    NODE,
    POOL,
    RTU,
    SITE,
    TWO_PERSON,
    access,
    activate,
    approve,
    at,
    break_glass,
    close,
    config,
    disable,
    events_of,
    extend,
    generation,
    get,
    headers,
    lane,
    policy_files,
    queue,
    reject,
    request,
    review,
    revoke,
    seen_now,
    world,
)


def row(ctl, sid: str) -> AccessSession:
    with ctl.app.state.auth.factory() as s:
        return s.get(AccessSession, sid)


def leases(ctl, sid: str) -> int:
    with ctl.app.state.auth.factory() as s:
        return s.scalar(select(func.count()).select_from(LaneLease).where(LaneLease.session_id == sid))


def types(ctl, sid: str) -> list[tuple[str, str]]:
    return [(e["type"], e["result"]) for e in events_of(ctl, sid)]


def approved(ctl, w, person, task: str = TWO_PERSON, device: str = RTU) -> str:
    """A request of `person` for a task that needs approval, approved by as many approvers as it needs."""
    s = request(ctl, person, device, task)
    assert s["state"] == "pending_approval", s
    for approver in (w.alex, w.ana)[: s["approvals_required"]]:
        approve(ctl, approver, s["id"])
    return s["id"]


def public_key_of(private: str) -> str:
    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private))
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def edited(name: str, change) -> dict[str, str]:
    """`policy_files()` with one file's YAML changed by `change(document)` (comments are lost)."""
    files = policy_files()
    doc = yaml.safe_load(files[name])
    change(doc)
    return {**files, name: yaml.safe_dump(doc, sort_keys=False)}


# ---- request and decision ----


def test_a_request_that_needs_no_approval_opens_a_lane_to_the_device(ctl):
    w = world(ctl)
    s = request(ctl, w.erin, RTU, DIAG, duration="20m")
    now = ctl.t
    assert s["state"] == "active" and s["approvals_required"] == 0
    assert at(s["end_at"]) == pytest.approx(now + 20 * 60, abs=1)
    assert s["device_address"] == "10.20.0.17" and s["node"] == NODE
    assert ipaddress.ip_address(s["tunnel_address"]) in ipaddress.ip_network(POOL)
    assert 51000 <= s["listen_port"] <= 51999
    assert s["flows"] == [{"protocol": "iec104", "transport": "tcp", "port": 2404}]

    got = lane(ctl, s["id"])
    assert got is not None, f"the node holds no lane for {s['id']}"
    assert (str(got.device_address), str(got.engineer_address), got.listen_port) == \
           ("10.20.0.17", s["tunnel_address"], s["listen_port"])
    assert [(f.transport.value, f.port) for f in got.flows] == [("tcp", 2404)]
    assert got.end_time.timestamp() == pytest.approx(now + 20 * 60, abs=1)

    found = {e["type"]: e for e in events_of(ctl, s["id"])}
    assert set(found) >= {"session.request", "session.activate"}
    policy = s["policy_version"]
    for name in ("session.request", "session.activate"):
        body = found[name]["body"]
        assert found[name]["result"] == "success" and found[name]["actor"] == "erin"
        assert body["policy_version"] == policy and body["decision"]["policy_version"] == policy
        assert {c["check"] for c in body["decision"]["trace"]} >= {"account", "task_role", "protocol", "duration"}


def test_a_denied_request_names_the_check_that_failed_and_opens_nothing(ctl):
    w = world(ctl)
    ctl.add_device("RTU-99", SITE, addresses=["10.20.0.99"], last_seen=iso(ctl.t - 3 * 86400))  # silent for 3 days
    for device, task, check in ((METER, DIAG, "task_device_type"), ("RTU-99", DIAG, "device_seen")):
        s = request(ctl, w.erin, device, task)
        assert s["state"] == "denied", s
        assert check in s["decision"]["failed_checks"], s["decision"]
        assert s["node"] is None and s["tunnel_address"] is None and not s["config_available"]
        assert lane(ctl, s["id"]) is None and leases(ctl, s["id"]) == 0
        [ev] = events_of(ctl, s["id"])
        assert (ev["type"], ev["result"]) == ("session.request", "failure")
        assert check in ev["body"]["decision"]["failed_checks"]
    assert not ctl.nodes.lanes(NODE)


# ---- approval ----


def test_n_approvers_are_n_different_people_and_an_approval_opens_one_session(ctl):
    w = world(ctl)
    s = request(ctl, w.erin, RTU, TWO_PERSON)
    sid = s["id"]
    assert (s["state"], s["approvals_required"]) == ("pending_approval", 2)

    assert approve(ctl, w.alex, sid)["state"] == "pending_approval"
    approve(ctl, w.alex, sid, expect=409)  # the same approver again does not count twice
    assert get(ctl, w.erin, sid)["state"] == "pending_approval"
    done = approve(ctl, w.ana, sid)
    assert done["state"] == "approved"
    assert sorted(a["approver"] for a in done["approvals"]) == ["alex", "ana"]
    assert [e["body"]["approvals"] for e in events_of(ctl, sid, "session.approve")] == [1, 2]
    assert lane(ctl, sid) is None, "approved is not active: no lane before the owner activates"

    assert activate(ctl, w.erin, sid)["state"] == "active"
    assert lane(ctl, sid) is not None
    close(ctl, w.erin, sid)
    activate(ctl, w.erin, sid, expect=409)  # the approval was used up by the first activation
    assert lane(ctl, sid) is None


def test_nobody_approves_or_reviews_their_own_session(ctl):
    w = world(ctl)
    # an engineer who is also an approver at the site: still not for their own request, nor as one of two
    april = ctl.add_user("april", roles=[("engineer", SITE), ("approver", SITE)])
    sid = request(ctl, april, RTU, TWO_PERSON)["id"]
    approve(ctl, april, sid, expect=403)
    approve(ctl, w.alex, sid)
    approve(ctl, april, sid, expect=403)
    assert get(ctl, april, sid)["state"] == "pending_approval"
    refused = [(e["result"], e["reason"], e["actor"]) for e in events_of(ctl, sid, "session.approve") if e["result"] == "failure"]
    assert refused == [("failure", "self_approval", "april")] * 2

    sol = ctl.add_user("sol", roles=[("soc", None), ("break_glass", SITE)])  # a reviewer who opens one himself
    own = break_glass(ctl, sol, RTU)["id"]
    review(ctl, sol, own, expect=403)
    assert [e["reason"] for e in events_of(ctl, own, "break_glass.review")] == ["self_review"]
    assert get(ctl, sol, own)["reviewed_at"] is None


def test_the_queue_shows_an_approver_their_sites_requests_but_not_their_own(ctl):
    w = world(ctl)
    ctl.add_site("south-2", tunnel_pool="100.64.10.0/24")
    otto = ctl.add_user("otto", roles=[("approver", "south-2")])
    april = ctl.add_user("april", roles=[("engineer", SITE), ("approver", SITE)])
    erins = request(ctl, w.erin, RTU, TWO_PERSON)["id"]
    aprils = request(ctl, april, DER, "der-commissioning")["id"]
    request(ctl, w.eve, RTU, DIAG)  # active at once: nothing to approve

    def shown(person):
        return {item["session"]["id"]: item for item in queue(ctl, person)}

    mine = shown(w.alex)
    assert set(mine) == {erins, aprils}
    assert (mine[erins]["kind"], mine[erins]["approvals_so_far"], mine[erins]["approvals_required"]) == ("request", 0, 2)
    assert {c["check"] for c in mine[erins]["session"]["decision"]["trace"]} >= {"task_role", "protocol"}
    assert set(shown(april)) == {erins}, "the requester sees their own request in their queue"
    assert shown(otto) == {} and shown(w.erin) == {} and shown(w.sam) == {}

    approve(ctl, w.ana, erins)
    assert erins not in shown(w.ana) and shown(w.alex)[erins]["approvals_so_far"] == 1

    rejected = reject(ctl, w.alex, erins, reason="no work order WO-4711 on file")
    assert rejected["state"] == "rejected" and rejected["ended_by"] == "alex"
    assert erins not in shown(w.ana)
    [ev] = events_of(ctl, erins, "session.reject")
    assert ev["actor"] == "alex" and ev["body"]["approver_reason"] == "no work order WO-4711 on file"
    activate(ctl, w.erin, erins, expect=409)


def test_unused_approvals_and_unanswered_requests_lapse(ctl):
    w = world(ctl)
    unused = approved(ctl, w, w.erin, "der-commissioning", DER)
    waiting = request(ctl, w.eve, RTU, TWO_PERSON)["id"]

    ctl.advance(ctl.settings.approval_ttl_s + 1)
    ctl.tick()
    assert (row(ctl, unused).state, row(ctl, unused).end_reason) == ("expired", "approval_unused")
    assert row(ctl, waiting).state == "pending_approval", "a request waits longer than an approval"
    activate(ctl, w.erin, unused, expect=409)

    ctl.advance(ctl.settings.request_ttl_s)
    ctl.tick()
    assert (row(ctl, waiting).state, row(ctl, waiting).end_reason) == ("expired", "not_approved_in_time")
    approve(ctl, w.alex, waiting, expect=409)
    assert ("session.expire", "success") in types(ctl, unused) and ("session.expire", "success") in types(ctl, waiting)


# ---- the one-time config ----


def _text_cells(ctl) -> list[tuple[str, str, str]]:
    """(table, column, value as text) for every non-empty cell of every table."""
    out = []
    with ctl.app.state.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            for r in conn.execute(table.select()).mappings():
                for column, value in r.items():
                    if value is not None:
                        out.append((table.name, column, value if isinstance(value, str) else json.dumps(value, default=str)))
    return out


def _database_files(ctl) -> list[Path]:
    url = ctl.settings.database_url
    if not url.startswith("sqlite"):
        return []
    db = Path(url.split("///", 1)[1])
    return [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-journal")) if p.exists()]


def test_the_config_is_given_once_and_the_minted_key_then_leaves_the_database(ctl):
    w = world(ctl)
    sid = request(ctl, w.erin, RTU, DIAG)["id"]
    sealed = row(ctl, sid).sealed_private_key
    assert sealed, "a minted key is kept (sealed) until the download"

    res = config(ctl, w.erin, sid)
    assert res.headers["content-type"].startswith("text/plain") and "no-store" in res.headers["cache-control"]
    text = res.text
    lines = [x.strip() for x in text.splitlines()]
    assert "AllowedIPs = 10.20.0.17/32" in lines
    assert not any(x.lower().startswith("dns") for x in lines)
    assert any(x.startswith("PersistentKeepalive") for x in lines)
    private = next(x.split("=", 1)[1].strip() for x in lines if x.startswith("PrivateKey"))
    assert public_key_of(private) == lane(ctl, sid).engineer_public_key, "the config's key is not the lane's peer"

    gone = config(ctl, w.erin, sid, expect=410)
    assert private not in gone.text
    refused = [e for e in events_of(ctl, sid, "session.config") if e["result"] == "failure"]
    assert [e["reason"] for e in refused] == ["already_downloaded"]

    assert row(ctl, sid).sealed_private_key is None
    for needle in (private, sealed, sealed.removeprefix("v1:")):
        held = [(t, c) for t, c, v in _text_cells(ctl) if needle in v]
        assert not held, f"the key is still in the database: {held}"
        for path in _database_files(ctl):
            assert needle.encode() not in path.read_bytes(), f"the key is still in {path.name}"


def test_bring_your_own_key_never_stores_a_private_key(ctl):
    w = world(ctl)
    mine = X25519PrivateKey.generate()
    public = base64.b64encode(mine.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    s = request(ctl, w.erin, RTU, DIAG, public_key=public)
    assert (s["state"], s["key_mode"]) == ("active", "byok")
    assert row(ctl, s["id"]).sealed_private_key is None
    assert lane(ctl, s["id"]).engineer_public_key == public
    text = config(ctl, w.erin, s["id"]).text
    assert "PrivateKey = <your private key>" in text


def test_a_qr_code_is_the_one_download(ctl):
    w = world(ctl)
    for fmt, media, magic in (("png", "image/png", b"\x89PNG"), ("svg", "image/svg+xml", b"<")):
        sid = request(ctl, w.erin, RTU, DIAG)["id"]
        res = config(ctl, w.erin, sid, fmt=fmt)
        assert res.headers["content-type"].startswith(media) and res.content.lstrip().startswith(magic)
        config(ctl, w.erin, sid, fmt="conf", expect=410)
        assert row(ctl, sid).sealed_private_key is None
        close(ctl, w.erin, sid)


# ---- extension ----


def test_extensions_need_a_listed_reason_and_stay_within_the_tasks_limits(ctl):
    w = world(ctl)
    s = request(ctl, w.erin, RTU, DIAG)
    sid, end, gen, rev = s["id"], at(s["end_at"]), generation(ctl), lane(ctl, s["id"]).revision

    extend(ctl, w.erin, sid, reason_code="coffee-break", expect=422)
    longer = extend(ctl, w.erin, sid, by="15m", reason_code="fault-still-open", note="breaker 3 still open")
    assert at(longer["end_at"]) == pytest.approx(end + 15 * 60, abs=1)
    got = lane(ctl, sid)
    assert generation(ctl) > gen and got.revision > rev
    assert got.end_time.timestamp() == pytest.approx(end + 15 * 60, abs=1)
    [ev] = events_of(ctl, sid, "session.extend")
    assert ev["body"]["extension_reason"] == "fault-still-open" and ev["actor"] == "erin"

    extend(ctl, w.erin, sid, by="20m", reason_code="waiting-for-field-crew", expect=403)  # 30m in all, 15m left
    extend(ctl, w.erin, sid, by="10m", reason_code="waiting-for-field-crew")
    extend(ctl, w.erin, sid, by="5m", reason_code="fault-still-open", expect=403)  # a third: only two allowed
    assert at(get(ctl, w.erin, sid)["end_at"]) == pytest.approx(end + 25 * 60, abs=1)
    assert lane(ctl, sid).end_time.timestamp() == pytest.approx(end + 25 * 60, abs=1)


def test_an_extension_that_needs_reapproval_waits_for_the_approvers(ctl):
    w = world(ctl)
    sid = approved(ctl, w, w.erin)
    end = at(activate(ctl, w.erin, sid)["end_at"])
    gen = generation(ctl)

    waiting = extend(ctl, w.erin, sid, by="15m", reason_code="work-overrun")
    assert waiting["extension_request"] and at(waiting["end_at"]) == pytest.approx(end, abs=1)
    [item] = queue(ctl, w.alex)
    assert (item["kind"], item["session"]["id"], item["approvals_required"]) == ("extension", sid, 2)
    extend(ctl, w.erin, sid, by="5m", reason_code="work-overrun", expect=409)  # one waits already

    approve(ctl, w.alex, sid)
    assert at(get(ctl, w.erin, sid)["end_at"]) == pytest.approx(end, abs=1), "one of two approvals extended it"
    assert lane(ctl, sid).end_time.timestamp() == pytest.approx(end, abs=1)
    done = approve(ctl, w.ana, sid)
    assert at(done["end_at"]) == pytest.approx(end + 15 * 60, abs=1) and done["extension_request"] is None
    assert generation(ctl) > gen and lane(ctl, sid).end_time.timestamp() == pytest.approx(end + 15 * 60, abs=1)
    assert queue(ctl, w.alex) == []


# ---- ending ----


def test_close_by_the_owner_and_revoke_by_the_soc_take_the_lane_away_at_once(ctl):
    w = world(ctl)
    mine = request(ctl, w.erin, RTU, DIAG)["id"]
    eves = request(ctl, w.eve, RTU, DIAG)["id"]
    assert {mine, eves} <= ctl.nodes.lanes(NODE)

    closed = close(ctl, w.erin, mine, reason="done early")
    assert (closed["state"], closed["ended_by"]) == ("closed", "erin")
    assert mine not in ctl.nodes.lanes(NODE) and eves in ctl.nodes.lanes(NODE)

    revoke(ctl, w.sam, eves, reason="", expect=422)  # a revocation says why
    revoked = revoke(ctl, w.sam, eves, reason="traffic to an unexpected port")
    assert (revoked["state"], revoked["ended_by"]) == ("revoked", "sam")
    assert eves not in ctl.nodes.lanes(NODE)
    assert leases(ctl, mine) == 0 and leases(ctl, eves) == 0
    [c] = events_of(ctl, mine, "session.close")
    [r] = events_of(ctl, eves, "session.revoke")
    assert (c["actor"], c["body"]["note"]) == ("erin", "done early")
    assert (r["actor"], r["body"]["note"]) == ("sam", "traffic to an unexpected port")
    close(ctl, w.erin, mine, expect=409)


def test_disabling_the_user_ends_their_sessions_at_the_next_tick(ctl):
    w = world(ctl)
    sid = request(ctl, w.erin, RTU, DIAG)["id"]
    disable(ctl, w.erin)
    assert sid in ctl.nodes.lanes(NODE)
    report = ctl.tick()
    assert sid in report.revoked
    assert (row(ctl, sid).state, row(ctl, sid).end_reason) == ("revoked", "user_disabled")
    assert sid not in ctl.nodes.lanes(NODE)


def test_a_policy_change_ends_only_the_sessions_it_no_longer_allows(ctl, monkeypatch):
    w = world(ctl)
    sid = request(ctl, w.erin, RTU, DIAG)["id"]
    monkeypatch.setattr(session_clock, "RECHECK_BATCH", 0)  # the periodic re-decisions in turn: not now
    ctl.tick()
    sessions = ctl.app.state.sessions
    decided = []
    real = sessions._decide_again
    monkeypatch.setattr(sessions, "_decide_again", lambda *a, **kw: decided.append(a[0].id) or real(*a, **kw))

    extra = "wicket_policy: 1\ndestinations:\n  historian:\n    addresses: [198.51.100.40]\n"
    ctl.apply_policy(policy_files(**{"historian.yaml": extra}))
    ctl.tick()
    assert row(ctl, sid).state == "active" and decided == [sid]
    ctl.tick()
    assert decided == [sid], "a session already held against this policy was decided again"

    ctl.apply_policy(edited("tasks.yaml", lambda doc: doc["tasks"].pop(DIAG)))
    ctl.tick()
    assert (row(ctl, sid).state, row(ctl, sid).end_reason) == ("revoked", "policy_change")
    assert sid not in ctl.nodes.lanes(NODE)


def test_at_its_end_a_session_expires_its_lane_goes_and_its_key_is_erased(ctl):
    w = world(ctl)
    s = request(ctl, w.erin, RTU, DIAG, duration="15m")
    sid, gen = s["id"], generation(ctl)
    assert row(ctl, sid).sealed_private_key
    ctl.advance(at(s["end_at"]) - ctl.t + 1)
    assert sid in ctl.tick().expired
    r = row(ctl, sid)
    assert (r.state, r.end_reason, r.sealed_private_key) == ("expired", "end_time", None)
    assert r.ended_at.timestamp() == pytest.approx(at(s["end_at"]), abs=1)
    assert sid not in ctl.nodes.lanes(NODE) and generation(ctl) > gen and leases(ctl, sid) == 0
    config(ctl, w.erin, sid, expect=409)


def test_the_engineer_is_warned_once_before_the_end(ctl):
    w = world(ctl)
    s = request(ctl, w.erin, RTU, DIAG, duration="15m")
    ctl.advance(at(s["end_at"]) - ctl.t - ctl.settings.warn_before_s - 60)
    ctl.tick()
    assert events_of(ctl, s["id"], "session.ending_soon") == []
    ctl.advance(120)
    ctl.tick()
    ctl.advance(30)
    ctl.tick()
    [ev] = events_of(ctl, s["id"], "session.ending_soon")
    assert 0 < ev["body"]["seconds_left"] <= ctl.settings.warn_before_s


# ---- break-glass ----


def test_break_glass_needs_the_grant_opens_at_once_and_is_reviewed_by_someone_else(ctl):
    files = policy_files()
    files["windows-and-locations.yaml"] = files["windows-and-locations.yaml"].replace(
        "break_glass_max_duration: 30m", "break_glass_max_duration: 20m")
    w = world(ctl, files)
    refused = break_glass(ctl, w.erin, RTU, expect=403)
    assert "task_role" in refused["failed_checks"] and refused["decision"]["outcome"] == "deny"
    assert row(ctl, refused["session_id"]).state == "denied" and not ctl.nodes.lanes(NODE)
    break_glass(ctl, w.bea, RTU, duration="45m", expect=403)  # past the break-glass maximum

    s = break_glass(ctl, w.bea, RTU, incident="INC-2040")
    sid = s["id"]
    assert (s["state"], s["break_glass"], s["recording"], s["incident"]) == ("active", True, "payload", "INC-2040")
    assert s["approvals"] == [] and at(s["end_at"]) == pytest.approx(ctl.t + 20 * 60, abs=1)
    assert sid in ctl.nodes.lanes(NODE)
    [ev] = events_of(ctl, sid, "break_glass.open")
    assert (ev["result"], ev["body"]["severity"], ev["body"]["incident"]) == ("success", "high", "INC-2040")

    review(ctl, w.bea, sid, expect=403)  # not a reviewer, and the one who opened it
    done = review(ctl, w.sam, sid, note="matches INC-2040; commands read-only")
    assert (done["reviewed_by"], done["review_note"]) == ("sam", "matches INC-2040; commands read-only")
    review(ctl, w.alex, sid, expect=409)


def test_an_unreviewed_break_glass_session_raises_a_reminder_each_deadline_period(ctl):
    w = world(ctl)
    sid = break_glass(ctl, w.bea, RTU)["id"]
    ctl.advance(24 * 3600 - 120)
    assert ctl.tick().reminded == []
    ctl.advance(180)
    assert ctl.tick().reminded == [sid]
    assert ctl.tick().reminded == []
    ctl.advance(24 * 3600)
    assert ctl.tick().reminded == [sid]
    overdue = events_of(ctl, sid, "break_glass.review_overdue")
    assert [e["body"]["severity"] for e in overdue] == ["high", "high"]
    owed = ctl.client.get(f"{API}/sessions", params={"scope": "all", "unreviewed": "true"}, headers=headers(ctl, w.sam))
    assert [s["id"] for s in owed.json()] == [sid]  # it stays visible, ended or not, until reviewed
    review(ctl, w.alex, sid)
    owed = ctl.client.get(f"{API}/sessions", params={"scope": "all", "unreviewed": "true"}, headers=headers(ctl, w.sam))
    assert owed.json() == []
    ctl.advance(48 * 3600)
    assert ctl.tick().reminded == []


# ---- queries ----


def test_who_had_access_to_a_device_between_two_times(ctl):
    w = world(ctl)
    early = request(ctl, w.erin, RTU, DIAG)["id"]
    t0 = ctl.t
    close(ctl, w.erin, early)
    ctl.advance(3600)
    seen_now(ctl, RTU)
    later = approved(ctl, w, w.eve)
    activate(ctl, w.eve, later)
    t1 = ctl.t

    found = access(ctl, w.sam, RTU, t1 - 60, t1 + 600)
    assert [(a["session_id"], a["user"], sorted(a["approved_by"])) for a in found] == [(later, "eve", ["alex", "ana"])]
    assert [a["session_id"] for a in access(ctl, w.alex, RTU, t0 - 60, t1 + 60)] == [early, later]
    assert access(ctl, w.sam, RTU, t0 + 1800, t1 - 60) == []
    access(ctl, w.erin, RTU, t0, t1, expect=403)  # an engineer reads the device, not who used it


# ---- the node ----


def test_activation_on_an_unreachable_node_leaves_the_approval_and_holds_nothing(ctl):
    w = world(ctl)
    sid = approved(ctl, w, w.erin)
    ctl.nodes.unreachable.add(NODE)
    activate(ctl, w.erin, sid, expect=503)
    r = row(ctl, sid)
    assert (r.state, r.tunnel_address, r.sealed_private_key) == ("approved", None, None)
    assert leases(ctl, sid) == 0
    failed = [e for e in events_of(ctl, sid, "session.activate") if e["result"] == "failure"]
    assert [e["reason"] for e in failed] == ["lane_failed"]

    ctl.nodes.unreachable.discard(NODE)
    assert activate(ctl, w.erin, sid)["state"] == "active"
    assert lane(ctl, sid) is not None and leases(ctl, sid) == 1


def test_an_agent_carrying_a_lane_cannot_be_removed_and_its_session_still_closes(ctl):
    w = world(ctl)
    sid = request(ctl, w.erin, RTU, DIAG)["id"]
    removed = ctl.client.delete(f"{API}/sites/{SITE}/agents/{NODE}", headers=ctl.step_up_admin())
    assert removed.status_code == 409, removed.text
    assert sid in removed.json()["detail"]
    res = TestClient(ctl.app, raise_server_exceptions=False).post(f"{API}/sessions/{sid}/close", headers=headers(ctl, w.erin))
    assert res.status_code == 200, res.text
