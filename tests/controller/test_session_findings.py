"""Regression tests for bugs found while the session docs were written: each asserts what the docs promise."""

from __future__ import annotations

from datetime import UTC, datetime

from controller.models import User
from controller.session_lanes import Pusher
from tests.controller.conftest import example_policy_files
from tests.controller.helpers import API, headers, iso

TWO_APPROVERS = """wicket_policy: 1
tasks:
  two-man:
    title: Two approvers, extension re-approval
    protocols: [ssh]
    device_types: [substation-rtu]
    roles: [engineer]
    duration: {default: 30m, max: 1h}
    approval: {required: true, approvers: 2}
    extensions: {reason_codes: [work-overrun], max_count: 2, max_total: 30m, reapproval: true}
"""


def _site(ctl, extra=None):
    files = example_policy_files()
    files["windows-and-locations.yaml"] = files["windows-and-locations.yaml"].split("\nlocations:")[0] + (
        "\nlimits:" + files["windows-and-locations.yaml"].split("\nlimits:")[1])  # no location rules: the test client has no IP
    if extra:
        files["zz.yaml"] = extra
    ctl.apply_policy(files)
    ctl.add_site("north-1", lan_networks=["10.20.0.0/16"])
    ctl.add_agent("north-1", "rtr-north-1")
    ctl.add_device("RTU-17", "north-1", last_seen=iso(ctl.t))


def _post(ctl, person, path, body, step_up=False):
    return ctl.client.post(f"{API}{path}", json=body, headers=headers(ctl, person, step_up))


def test_an_admin_can_grant_break_glass(ctl):
    _site(ctl)
    res = ctl.client.post(f"{API}/users", headers=ctl.step_up_admin(), json={
        "username": "bea", "display_name": "Bea", "password": "correct horse battery staple", "kind": "internal",
        "roles": [{"role": "engineer", "site": "north-1"}, {"role": "break_glass", "site": "north-1"}]})
    assert res.status_code == 201, res.text


def test_a_re_asked_extension_can_be_approved(ctl):
    _site(ctl, TWO_APPROVERS)
    erin = ctl.add_user("erin", roles=[("engineer", "north-1")])
    amy, ann = (ctl.add_user(n, roles=[("approver", "north-1")]) for n in ("amy", "ann"))
    sid = _post(ctl, erin, "/sessions", {"device": "RTU-17", "task": "two-man", "reason": "WO-2"}, True).json()["id"]
    for p in (amy, ann):
        _post(ctl, p, f"/sessions/{sid}/approve", {"reason": "okay"}, True)
    assert _post(ctl, erin, f"/sessions/{sid}/activate", {}, True).json()["state"] == "active"
    ext = {"by": "15m", "reason_code": "work-overrun"}
    _post(ctl, erin, f"/sessions/{sid}/extend", ext, True)
    _post(ctl, ann, f"/sessions/{sid}/reject", {"reason": "not now"})
    assert _post(ctl, erin, f"/sessions/{sid}/extend", ext, True).json()["extension_request"] is not None
    res = _post(ctl, ann, f"/sessions/{sid}/approve", {"reason": "now it is fine"}, True)
    assert res.status_code == 200, res.text


def test_a_failed_activation_keeps_the_approval_time(ctl):
    _site(ctl, TWO_APPROVERS)
    erin = ctl.add_user("erin", roles=[("engineer", "north-1")])
    amy, ann = (ctl.add_user(n, roles=[("approver", "north-1")]) for n in ("amy", "ann"))
    sid = _post(ctl, erin, "/sessions", {"device": "RTU-17", "task": "two-man", "reason": "WO-2"}, True).json()["id"]
    ctl.advance(2 * 3600)  # approved two hours after the request
    _post(ctl, amy, f"/sessions/{sid}/approve", {"reason": "okay"}, True)
    before = _post(ctl, ann, f"/sessions/{sid}/approve", {"reason": "okay"}, True).json()["expires_at"]
    ctl.nodes.unreachable.add("rtr-north-1")
    assert _post(ctl, erin, f"/sessions/{sid}/activate", {}, True).status_code == 503
    after = ctl.client.get(f"{API}/sessions/{sid}", headers=headers(ctl, erin)).json()["expires_at"]
    assert after >= before


def test_a_contractor_session_ends_with_the_account(ctl):
    _site(ctl)
    amy = ctl.add_user("amy", roles=[("approver", "north-1")])
    carl = ctl.add_user("carl", roles=[("contractor", "north-1")], kind="contractor", sponsor="root",
                        valid_until=iso(ctl.t + 3600 + 600))
    sid = _post(ctl, carl, "/sessions", {"device": "RTU-17", "task": "iec104-diagnostics", "duration": "1h", "reason": "WO-1"},
                True).json()["id"]
    _post(ctl, amy, f"/sessions/{sid}/approve", {"reason": "okay"}, True)
    _post(ctl, carl, f"/sessions/{sid}/activate", {}, True)
    ext = _post(ctl, carl, f"/sessions/{sid}/extend", {"by": "30m", "reason_code": "fault-still-open"}, True)
    assert ext.status_code == 403, ext.text
    assert "account's validity ends" in ext.json()["detail"]
    assert sid in ctl.nodes.lanes("rtr-north-1")  # the session itself fits the account: it goes on


class _AgentRule:
    """Stand-in link with the agent's acceptance rule (nodeagent/agent.py, Agent.apply)."""

    def __init__(self, inner):
        self.inner, self.current = inner, {}

    def push(self, desired):
        have = self.current.get(desired.node_id)
        if have is not None and desired.generation == have.generation and desired != have:
            from controller.nodelink import LinkError
            raise LinkError(f"generation {desired.generation} was already applied with other content: refused")
        self.current[desired.node_id] = desired
        return self.inner.push(desired)

    def status(self, node):
        return self.inner.status(node)


def test_a_second_replica_pushes_the_same_generation_acceptably(ctl):
    _site(ctl)
    link = _AgentRule(ctl.nodes)
    sessions = ctl.app.state.sessions
    sessions.pusher = Pusher(sessions.factory, link, sessions.auth.now)
    sessions.pusher.on_applied = sessions.acknowledge
    erin = ctl.add_user("erin", roles=[("engineer", "north-1")])
    assert _post(ctl, erin, "/sessions", {"device": "RTU-17", "task": "iec104-diagnostics", "reason": "WO-1"},
                 True).json()["state"] == "active"
    ctl.advance(1)
    replica_b = Pusher(sessions.factory, link, sessions.auth.now)  # its own memory of what it handed over: none
    assert replica_b.push_quietly(replica_b.behind()) == {}


def test_an_account_whose_validity_is_cut_short_loses_its_session_at_the_next_tick(ctl):
    _site(ctl)
    erin = ctl.add_user("erin", roles=[("engineer", "north-1")])
    sid = _post(ctl, erin, "/sessions", {"device": "RTU-17", "task": "iec104-diagnostics", "reason": "WO-1"}, True).json()["id"]
    assert sid in ctl.nodes.lanes("rtr-north-1")
    with ctl.app.state.auth.factory.begin() as s:  # no API edits validity after creation yet: the database, as one would
        s.get(User, erin.user_id).valid_until = datetime.fromtimestamp(ctl.t + 60, UTC)
    ctl.advance(90)
    ctl.tick()
    got = ctl.client.get(f"{API}/sessions/{sid}", headers=ctl.auth(ctl.admin_token())).json()
    assert (got["state"], got["end_reason"]) == ("revoked", "account_expired")
    assert sid not in ctl.nodes.lanes("rtr-north-1")


def test_a_role_taken_away_ends_the_session_at_the_next_re_decision(ctl):
    _site(ctl)
    erin = ctl.add_user("erin", roles=[("engineer", "north-1")])
    sid = _post(ctl, erin, "/sessions", {"device": "RTU-17", "task": "iec104-diagnostics", "reason": "WO-1"}, True).json()["id"]
    ctl.tick()
    assert sid in ctl.nodes.lanes("rtr-north-1")
    res = ctl.client.put(f"{API}/users/{erin.user_id}/roles", json={"roles": [{"role": "approver", "site": "north-1"}]},
                         headers=ctl.step_up_admin())
    assert res.status_code == 200, res.text
    ctl.tick()
    got = ctl.client.get(f"{API}/sessions/{sid}", headers=ctl.auth(ctl.admin_token())).json()
    assert (got["state"], got["end_reason"]) == ("revoked", "policy_change")
    assert sid not in ctl.nodes.lanes("rtr-north-1")


def test_a_site_pool_in_use_cannot_change_and_a_new_endpoint_reaches_the_node(ctl):
    _site(ctl)
    erin = ctl.add_user("erin", roles=[("engineer", "north-1")])
    sid = _post(ctl, erin, "/sessions", {"device": "RTU-17", "task": "iec104-diagnostics", "reason": "WO-1"}, True).json()["id"]
    before = ctl.nodes.desired["rtr-north-1"].generation
    res = ctl.client.patch(f"{API}/sites/north-1", json={"tunnel_pool": "100.66.0.0/24"}, headers=ctl.step_up_admin())
    assert res.status_code == 409 and sid in res.json()["detail"], res.text
    res = ctl.client.patch(f"{API}/sites/north-1", json={"public_endpoint": "198.51.100.9"}, headers=ctl.step_up_admin())
    assert res.status_code == 200, res.text
    ctl.tick()
    pushed = ctl.nodes.desired["rtr-north-1"]
    assert pushed.generation > before and pushed.settings.endpoint_host == "198.51.100.9"
    assert [lane.session_id for lane in pushed.lanes] == [sid]
