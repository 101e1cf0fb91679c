"""Grants through the session machinery, with a fake node: request (one device or a group, all or
nothing), approval, activation, acknowledgement, the GrantSpec in the node's desired state, and every end
(sign-off, revoke, expiry), with their audit events and evidence. Lanes must not notice any of it.

Lifecycle tests run on SQLite and PostgreSQL; the refusal corners on SQLite only."""

from __future__ import annotations

from datetime import datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, update

from controller.db import session_factory
from controller.models import Event, NodeAgent

from .helpers import API, headers, iso
from .session_helpers import (
    DER,
    DIAG,
    METER,
    NODE,
    RTU,
    SITE,
    _check,
    activate,
    close,
    config,
    events_of,
    generation,
    policy_files,
    request,
    revoke,
    world,
)
from .test_session_evidence import _deliver

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
COMMISSIONING = "der-commissioning-mqtt"  # example policy: no approval, mqtt-tls → der-commissioning, 2h by default
WINDOW = "fw-window"  # below: one approver, dlms → mdm, 1h by default

GRANT_TASKS = """\
wicket_policy: 1
tasks:
  fw-window:
    title: Firmware window (tests)
    grant:
      flows:
        - {protocol: dlms, to: [mdm]}
        - {protocol: https, to: [der-broker, scada-master-a], ports: [8443]}
    device_types: [meter-concentrator]
    roles: [engineer, contractor]
    duration: {default: 1h, max: 2h}
    approval: {required: true}
"""


def grant_world(ctl):
    w = world(ctl, policy_files(**{"grants-test.yaml": GRANT_TASKS}))
    ctl.add_device("MC-2", SITE, device_type="meter-concentrator", addresses=["10.20.0.28"], last_seen=iso(ctl.t))
    ctl.add_device("MC-3", SITE, device_type="meter-concentrator", addresses=["10.20.0.29"], last_seen=iso(ctl.t),
                   lifecycle="quarantined")
    return w


def open_grant(ctl, person, task: str, *devices: str, device_type: str | None = None, site: str | None = None,
               duration: str | None = None, activate: bool = True, expect: int = 201) -> dict:
    body = {"task": task, "reason": "work order WO-77", "activate": activate}
    body |= {"devices": list(devices)} if devices else {"device_type": device_type, "site": site}
    if duration:
        body["duration"] = duration
    return _check(ctl.client.post(f"{API}/grants", json=body, headers=headers(ctl, person, step_up=True)), expect)


def grant_call(ctl, person, ref: str, action: str, reason: str | None = "checked the campaign plan", expect: int = 200,
               step_up: bool = False) -> dict:
    body = {"reason": reason} if reason is not None else None
    return _check(ctl.client.post(f"{API}/grants/{ref}/{action}", json=body, headers=headers(ctl, person, step_up=step_up)),
                  expect)


def held(ctl) -> dict:
    return ctl.nodes.grants(NODE)


# ---- lifecycle ----


def test_a_grant_needing_no_approval_opens_at_once_and_ends_on_sign_off(ctl):
    w = grant_world(ctl)
    before = generation(ctl)
    out = open_grant(ctl, w.erin, COMMISSIONING, DER)
    (g,) = out["grants"]
    assert out["grant_group"].startswith("g-") and g["grant_group"] == out["grant_group"] and out["activation_error"] is None
    assert (g["state"], g["device"], g["device_address"], g["node"]) == ("active", DER, "10.20.0.19", NODE)
    assert g["flows"] == [{"protocol": "mqtt-tls", "transport": "tcp", "ports": [8883], "to": ["der-commissioning"]}]
    spec = held(ctl)[g["id"]]
    assert generation(ctl) > before and spec.device_id == DER and str(spec.device_address) == "10.20.0.19"
    assert [(f.protocol, f.transport, f.ports, f.to) for f in spec.flows] == [("mqtt-tls", "tcp", [8883], ["der-commissioning"])]
    assert spec.end_time == datetime.fromisoformat(g["end_at"].replace("Z", "+00:00")) and spec.revision == 1
    baseline = ctl.nodes.desired[NODE].baseline
    assert [d.name for d in baseline.destinations] == ["der-broker", "der-commissioning", "mdm", "scada-master-a", "scada-master-b"]
    assert ctl.nodes.lanes(NODE) == set()  # a grant is no lane
    # it is a session too, visible as one, and does not count against the per-person session limit
    s = _check(ctl.client.get(f"{API}/sessions/{g['id']}", headers=headers(ctl, w.erin)), 200)
    assert (s["kind"], s["grant_group"], s["tunnel_address"], s["listen_port"], s["key_mode"]) == ("grant", out["grant_group"], None, None, None)
    assert s["decision"]["grant"]["flows"] == g["flows"]
    request(ctl, w.erin, RTU, DIAG)
    assert request(ctl, w.erin, RTU, DIAG)["state"] == "active"

    closed = grant_call(ctl, w.erin, out["grant_group"], "close", reason="commissioning signed off, broker sees telemetry")
    assert [(x["state"], x["end_reason"], x["ended_by"]) for x in closed["grants"]] == [("closed", "signed_off", "erin")]
    assert g["id"] not in held(ctl)
    types = [(e["type"], e["result"]) for e in events_of(ctl, g["id"])]
    assert types == [("session.request", "success"), ("session.activate", "success"), ("session.open", "success"),
                     ("session.close", "success")]
    for e in events_of(ctl, g["id"]):
        assert (e["body"]["kind"], e["body"]["grant_group"], e["body"]["device"]) == ("grant", out["grant_group"], DER)
    end = events_of(ctl, g["id"], "session.close")[0]
    assert (end["reason"], end["body"]["note"], end["body"]["had_lane"]) == ("signed_off", "commissioning signed off, broker sees telemetry", True)
    grant_call(ctl, w.erin, g["id"], "close", reason="again", expect=409)


def test_a_grant_waits_for_approval_then_its_requester_opens_it_and_an_approver_revokes_it(ctl):
    w = grant_world(ctl)
    out = open_grant(ctl, w.erin, WINDOW, METER, duration="90m")
    (g,) = out["grants"]
    assert (g["state"], g["approvals_required"], g["flows"]) == ("pending_approval", 1, [])
    assert held(ctl) == {}
    grant_call(ctl, w.erin, g["id"], "approve", step_up=True, expect=403)  # never one's own
    queue = _check(ctl.client.get(f"{API}/approvals", headers=headers(ctl, w.alex)), 200)
    assert [(q["session"]["id"], q["session"]["kind"]) for q in queue] == [(g["id"], "grant")]
    approved = grant_call(ctl, w.alex, g["id"], "approve", step_up=True)
    assert approved["grants"][0]["state"] == "approved" and approved["grants"][0]["approvals"] == 1
    grant_call(ctl, w.alex, g["id"], "activate", reason=None, step_up=True, expect=403)  # only the requester opens it
    opened = grant_call(ctl, w.erin, g["id"], "activate", reason=None, step_up=True)
    (g,) = opened["grants"]
    assert g["state"] == "active" and g["duration"] == "1h30m"
    spec = held(ctl)[g["id"]]
    assert sorted((f.protocol, f.transport, f.ports, f.to) for f in spec.flows) == [
        ("dlms", "tcp+udp", [4059], ["mdm"]), ("https", "tcp", [8443], ["der-broker", "scada-master-a"])]
    # approving and revoking go through the sessions' own routes too
    revoke(ctl, w.alex, g["id"], reason="meter vendor withdrew the image")
    assert g["id"] not in held(ctl)
    types = [e["type"] for e in events_of(ctl, g["id"])]
    assert types == ["session.request", "session.approve", "session.activate", "session.open", "session.revoke"]
    assert events_of(ctl, g["id"], "session.approve")[0]["body"]["kind"] == "grant"


def test_the_clock_expires_a_grant_and_its_node_loses_it(ctl):
    w = grant_world(ctl)
    (g,) = open_grant(ctl, w.erin, COMMISSIONING, DER, duration="30m")["grants"]
    assert g["id"] in held(ctl)
    ctl.advance(29 * 60)
    assert g["id"] not in ctl.tick().expired and g["id"] in held(ctl)
    ctl.advance(61)
    assert g["id"] in ctl.tick().expired
    assert g["id"] not in held(ctl)
    e = events_of(ctl, g["id"], "session.expire")[0]
    assert (e["reason"], e["body"]["kind"]) == ("end_time", "grant")


def test_a_group_is_decided_all_or_nothing_then_approved_opened_and_signed_off_as_one(ctl):
    w = grant_world(ctl)
    res = ctl.client.post(f"{API}/grants", json={"task": WINDOW, "devices": [METER, "MC-3", "MC-2"], "reason": "FW 7.2"},
                          headers=headers(ctl, w.erin, step_up=True))
    assert res.status_code == 403, res.text
    body = res.json()
    assert body["refusals"] == [{"device": "MC-3", "reason": "MC-3 is quarantined", "failed_checks": ["device_lifecycle"]}]
    assert "denied for 1 device(s), so no grant was created; MC-3: MC-3 is quarantined" in body["detail"]
    assert _check(ctl.client.get(f"{API}/grants", params={"scope": "all"}, headers=headers(ctl, w.root)), 200) == []
    refused = ctl.events(subject=body["grant_group"])
    assert [(e["type"], e["result"], e["reason"]) for e in refused] == [("session.request", "failure", "policy_device_lifecycle")]
    assert refused[0]["body"]["devices"] == [METER, "MC-3", "MC-2"] and refused[0]["body"]["kind"] == "grant"

    # by type and site: the active meter concentrators only (MC-3 is quarantined)
    out = open_grant(ctl, w.erin, WINDOW, device_type="meter-concentrator", site=SITE)
    group = out["grant_group"]
    assert [(g["device"], g["state"]) for g in out["grants"]] == [(METER, "pending_approval"), ("MC-2", "pending_approval")]
    listed = _check(ctl.client.get(f"{API}/grants", params={"group": group}, headers=headers(ctl, w.erin)), 200)
    assert sorted(g["device"] for g in listed) == sorted([METER, "MC-2"])
    assert [g["state"] for g in grant_call(ctl, w.alex, group, "approve", step_up=True)["grants"]] == ["approved"] * 2
    with session_factory(ctl.app.state.engine)() as s:
        gen = s.scalar(select(NodeAgent.generation).where(NodeAgent.name == NODE))
    opened = grant_call(ctl, w.erin, group, "activate", reason=None, step_up=True)
    assert [g["state"] for g in opened["grants"]] == ["active"] * 2
    assert generation(ctl) == gen + 1  # one new generation for the whole group
    assert sorted(s.device_id for s in held(ctl).values()) == sorted([METER, "MC-2"])
    one = opened["grants"][0]["id"]
    grant_call(ctl, w.erin, one, "close", reason="this concentrator is done")
    assert [g["state"] for g in _check(ctl.client.get(f"{API}/grants/{group}", headers=headers(ctl, w.erin)), 200)["grants"]] \
        == ["closed", "active"]
    closed = grant_call(ctl, w.erin, group, "close", reason="campaign signed off")
    assert [g["state"] for g in closed["grants"]] == ["closed", "closed"] and held(ctl) == {}


# ---- what the node says ----


@SQLITE
def test_a_grant_the_node_reports_an_error_for_goes_back_to_approved_with_the_reason(ctl):
    w = grant_world(ctl)
    out = open_grant(ctl, w.erin, WINDOW, METER)
    sid = out["grants"][0]["id"]
    grant_call(ctl, w.alex, sid, "approve", step_up=True)
    ctl.nodes.refuse_grants.add(sid)
    res = ctl.client.post(f"{API}/grants/{sid}/activate", headers=headers(ctl, w.erin, step_up=True))
    assert res.status_code == 503, res.text
    assert res.json()["failed"] == {sid: f"grant {sid} for {METER}: could not add its flows (fake)"}
    g = _check(ctl.client.get(f"{API}/grants/{sid}", headers=headers(ctl, w.erin)), 200)["grants"][0]
    assert g["state"] == "approved" and sid not in held(ctl)
    failure = [e for e in events_of(ctl, sid, "session.activate") if e["result"] == "failure"][0]
    assert failure["reason"] == "lane_failed" and "could not add its flows" in failure["body"]["error"]
    ctl.nodes.refuse_grants.clear()
    assert grant_call(ctl, w.erin, sid, "activate", reason=None, step_up=True)["grants"][0]["state"] == "active"


@SQLITE
def test_grants_are_refused_at_a_node_that_does_not_speak_them_and_when_it_is_unreachable(ctl):
    w = grant_world(ctl)
    ctl.nodes.versions[NODE] = 3  # applies the generation, but a v3 agent is sent no grants
    out = open_grant(ctl, w.erin, COMMISSIONING, DER)
    assert out["grants"][0]["state"] == "approved"
    assert "speaks agent protocol v3, which enforces no grants" in out["activation_error"]
    with session_factory(ctl.app.state.engine)() as s, s.begin():
        s.execute(update(NodeAgent).where(NodeAgent.name == NODE).values(protocol_version=3))
    res = ctl.client.post(f"{API}/grants/{out['grant_group']}/activate", headers=headers(ctl, w.erin, step_up=True))
    assert res.status_code == 409 and "runs agent protocol v3, which enforces no grants: upgrade the agent" in res.text, res.text
    with session_factory(ctl.app.state.engine)() as s, s.begin():
        s.execute(update(NodeAgent).where(NodeAgent.name == NODE).values(protocol_version=4))
    del ctl.nodes.versions[NODE]
    ctl.nodes.unreachable.add(NODE)
    res = ctl.client.post(f"{API}/grants/{out['grant_group']}/activate", headers=headers(ctl, w.erin, step_up=True))
    assert res.status_code == 503 and "unreachable" in res.text, res.text
    ctl.nodes.unreachable.clear()
    assert grant_call(ctl, w.erin, out["grant_group"], "activate", reason=None, step_up=True)["grants"][0]["state"] == "active"


# ---- lanes and grants stay apart ----


@SQLITE
def test_lane_routes_refuse_grants_and_grant_routes_refuse_lane_tasks(ctl):
    w = grant_world(ctl)
    res = ctl.client.post(f"{API}/sessions", json={"device": DER, "task": COMMISSIONING, "reason": "commissioning"},
                          headers=headers(ctl, w.erin, step_up=True))
    assert res.status_code == 422 and "is a grant task" in res.text and "wicket grant open" in res.text
    res = ctl.client.post(f"{API}/grants", json={"task": DIAG, "devices": [RTU], "reason": "diagnostics"},
                          headers=headers(ctl, w.erin, step_up=True))
    assert res.status_code == 422 and "opens engineers' lanes" in res.text
    open_grant(ctl, w.erin, "no-such-task", RTU, expect=403)  # decided, like an unknown task for a session
    (g,) = open_grant(ctl, w.erin, COMMISSIONING, DER)["grants"]
    activate(ctl, w.erin, g["id"], expect=409)
    assert "is a grant and cannot be downloaded" in config(ctl, w.erin, g["id"], expect=409).text
    res = ctl.client.post(f"{API}/sessions/{g['id']}/extend", json={"by": "15m", "reason_code": "fault-still-open"},
                          headers=headers(ctl, w.erin, step_up=True))
    assert res.status_code == 409 and "open a new grant" in res.text
    lane = request(ctl, w.erin, RTU, DIAG)["id"]
    assert ctl.client.get(f"{API}/grants/{lane}", headers=headers(ctl, w.erin)).status_code == 404
    assert _check(ctl.client.get(f"{API}/sessions", params={"kind": "lane"}, headers=headers(ctl, w.erin)), 200)[0]["id"] == lane
    assert [s["id"] for s in _check(ctl.client.get(f"{API}/sessions", params={"kind": "grant"},
                                                   headers=headers(ctl, w.erin)), 200)] == [g["id"]]
    # who had access to the device: people's lanes, not the device's own flows
    access = _check(ctl.client.get(f"{API}/devices/{DER}/access", params={"from": iso(0), "to": iso(ctl.t + 10)},
                                   headers=headers(ctl, w.alex)), 200)
    assert access == []
    close(ctl, w.erin, lane)


@SQLITE
def test_a_grant_the_caller_cannot_see_is_not_there(ctl):
    w = grant_world(ctl)
    (g,) = open_grant(ctl, w.erin, COMMISSIONING, DER)["grants"]
    for action in ("close", "revoke", "approve", "activate", "reject"):
        grant_call(ctl, w.eve, g["id"], action, expect=404)
    grant_call(ctl, w.eve, g["grant_group"], "close", expect=404)
    assert _check(ctl.client.get(f"{API}/grants/{g['grant_group']}", headers=headers(ctl, w.eve)), 404)
    grant_call(ctl, w.alex, g["id"], "close", expect=403)  # signing off is the requester's
    open_grant(ctl, w.erin, COMMISSIONING, "NO-SUCH", expect=404)
    open_grant(ctl, w.erin, COMMISSIONING, device_type="der-gateway", site="south-9", expect=404)


# ---- evidence ----


def test_a_grants_evidence_record_shows_its_flows_and_what_the_names_resolved_to(ctl):
    w = grant_world(ctl)
    (g,) = open_grant(ctl, w.erin, COMMISSIONING, DER)["grants"]
    grant_call(ctl, w.erin, g["id"], "close", reason="signed off")
    _deliver(ctl, g["id"], Ed25519PrivateKey.generate(), scope="grant",
             destinations={"der-commissioning": ["198.51.100.40", "198.51.100.41"]})
    ctl.app.state.sessions.evidence_arrived(NODE, g["id"], "removed")
    with session_factory(ctl.app.state.engine)() as s:
        ev = s.scalar(select(Event).where(Event.session_ref == g["id"], Event.type == "session.evidence"))
    assert ev.body["kind"] == "grant" and ev.body["grant_group"] == g["grant_group"]
    assert ev.body["flows"] == [{"protocol": "mqtt-tls", "transport": "tcp", "ports": [8883], "to": ["der-commissioning"]}]
    assert ev.body["destinations"] == {"der-commissioning": ["198.51.100.40", "198.51.100.41"]}
    assert ev.body["end_reason"] == "signed_off" and ev.body["device_address"] == "10.20.0.19"

