"""Sessions end to end in the lab: the controller (in this process, on the real clock) hands lanes to the
real agent on the lab router through its control socket (`LocalSocketLink`, the lab transport); the
engineer imports the one-time config with the standard wg-quick client in their namespace and reaches
the device through the lane, until the agent ends it on its own clock.

The request, approval, activation, config, extension and revocation go through the HTTP API. Setting up
the site (users, policy, passport) calls the controller's services directly: those routes only add a
step-up each, and the admin cannot spend a dozen single-use TOTP steps inside one real minute.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from controller.app import create_app
from controller.bootstrap import init
from controller.inventory_schemas import DeviceCreate, SiteCreate
from controller.nodelink import LocalSocketLink
from controller.settings import load
from tests.lab.controller import PASSWORD, Person, conf_value, policy, totp_secret, ts
from tests.lab.site import NODE_ID, AgentProcess, Engineer, serve, wait_for

pytestmark = pytest.mark.lab

API = "/api/v1"
SITE, DEVICE, TASK = "north-1", "RTU-17", "iec104-diagnostics"
TUNNEL_POOL = "100.64.7.0/24"
# long enough that a slow CI machine still extends before the original end (25 s was not, once)
DEFAULT_S, EXTEND_S = 40, 12
GRACE_S = 2.0  # how soon after its end a lane must be gone (the agent's promise, tests/test_lane_lab.py)

POLICY = policy(DEFAULT_S, EXTEND_S)  # the lab controller's policy, on this test's times


class Controller:
    """A fresh controller (SQLite in tmp_path) whose lanes reach the lab's agent through its control socket."""

    def __init__(self, tmp_path, lab, agent: AgentProcess):
        self.settings = load({"WICKET_DATA_DIR": str(tmp_path / "controller"),
                              "WICKET_DATABASE_URL": f"sqlite:///{tmp_path}/controller.db",
                              "WICKET_SESSION_TICK_MS": "0"})
        boot = init(self.settings, "root", "First Admin", PASSWORD)
        self.app = create_app(self.settings, clock=time.time, link=LocalSocketLink({NODE_ID: agent.socket}))
        self.client = TestClient(self.app)
        self.admin = Person("root", totp_secret(boot.enrolment.otpauth_uri))
        login = self.app.state.auth.login("root", PASSWORD, code=self.admin.code())
        self.admin.token, root = login.token, login.principal
        state = self.app.state
        state.policies.apply(root, POLICY, "lab session test", None)
        state.inventory.create_site(root, SiteCreate(
            name=SITE, display_name="North 1", tunnel_pool=TUNNEL_POOL, port_min=51000, port_max=51099,
            public_endpoint=lab.router_wan, lan_networks=["192.0.2.0/24"]), None)
        state.inventory.add_agent(root, SITE, NODE_ID, "lab router", None)
        state.inventory.create_device(root, DeviceCreate(
            asset_id=DEVICE, site=SITE, device_type="substation-rtu", addresses=[lab.addr("rtu1")],
            lifecycle="active", last_seen=datetime.now(UTC)), None)
        self.engineer = self._person(root, "erin", "engineer")
        self.approver = self._person(root, "alex", "approver")

    def _person(self, root, username: str, role: str) -> Person:
        users = self.app.state.users
        user = users.create(root, username=username, display_name=username.title(), password=PASSWORD,
                            roles=[(role, SITE)])
        person = Person(username, totp_secret(users.enrol_totp(root, user.id).otpauth_uri))
        res = self.client.post(f"{API}/auth/login", json={"username": username, "password": PASSWORD,
                                                          "totp_code": person.code()})
        assert res.status_code == 200, res.text
        person.token = res.json()["token"]
        return person

    def call(self, method: str, path: str, person: Person, *, step_up: bool = False, expect: int = 200, **kw):
        headers = {"Authorization": f"Bearer {person.token}"}
        if step_up:
            headers["X-Wicket-TOTP"] = person.code()
        res = self.client.request(method, f"{API}{path}", headers=headers, **kw)
        assert res.status_code == expect, f"{method} {path}: {res.status_code} {res.text}"
        return res

    def open_session(self, engineer: Engineer) -> tuple[dict, str]:
        """Request → approve → activate → the one-time config, up in the engineer's namespace."""
        eng, appr = self.engineer, self.approver
        asked = self.call("POST", "/sessions", eng, step_up=True, expect=201, json={
            "device": DEVICE, "task": TASK, "reason": "WO-4711 counters stuck"}).json()
        assert asked["state"] == "pending_approval", asked
        sid = asked["id"]
        queue = self.call("GET", "/approvals", appr).json()
        assert [(q["kind"], q["session"]["id"]) for q in queue] == [("request", sid)]
        approved = self.call("POST", f"/sessions/{sid}/approve", appr, step_up=True,
                             json={"reason": "matches the open fault ticket"}).json()
        assert approved["state"] == "approved", approved
        active = self.call("POST", f"/sessions/{sid}/activate", eng, step_up=True, json={}).json()
        assert active["state"] == "active" and active["node"] == NODE_ID, active
        conf = self.call("GET", f"/sessions/{sid}/config", eng).text
        self.call("GET", f"/sessions/{sid}/config", eng, expect=410)
        engineer.up(conf)
        return active, conf

    def session(self, sid: str) -> dict:
        return self.call("GET", f"/sessions/{sid}", self.approver).json()

    def close(self) -> None:
        self.client.close()
        self.app.state.engine.dispose()


@pytest.fixture
def site(lab, tmp_path):
    agent = AgentProcess(lab)
    engineer = Engineer(lab, "eng1")
    server = None
    ctl = None
    try:
        agent.start()
        server = serve(lab, "rtu1", tcp=(2404, 502))
        ctl = Controller(tmp_path, lab, agent)
        yield lab, agent, engineer, ctl
    finally:
        engineer.forget()
        if ctl is not None:
            ctl.close()
        agent.stop()
        if server is not None:
            server.kill()
            server.wait()
        agent.remove_state()
        # the throwaway controller's keys and database (engineers' sealed keys among them) go too
        shutil.rmtree(tmp_path / "controller", ignore_errors=True)
        (tmp_path / "controller.db").unlink(missing_ok=True)


def test_requested_approved_extended_session_reaches_the_device_until_its_end(site):
    lab, agent, engineer, ctl = site
    rtu1 = lab.addr("rtu1")
    active, conf = ctl.open_session(engineer)
    sid = active["id"]
    original_end = ts(active["end_at"])
    assert original_end - ts(active["activated_at"]) == pytest.approx(DEFAULT_S, abs=1)

    lane = agent.lane(sid)
    assert lane is not None and lane["engineer_address"] == active["tunnel_address"]
    assert lane["device_address"] == rtu1 and lane["listen_port"] == active["listen_port"]
    assert abs(ts(lane["end_time"]) - original_end) < 0.01
    assert conf_value(conf, "PublicKey") == lane["node_public_key"]
    assert conf_value(conf, "Endpoint") == f"{lab.router_wan}:{active['listen_port']}"
    assert conf_value(conf, "AllowedIPs") == f"{rtu1}/32"

    assert engineer.probe(rtu1, 2404) == "open"
    assert engineer.probe(rtu1, 502) != "open", "only the task's port"

    extended = ctl.call("POST", f"/sessions/{sid}/extend", ctl.engineer, step_up=True, json={
        "by": f"{EXTEND_S}s", "reason_code": "fault-still-open", "note": "field crew still on site"}).json()
    new_end = ts(extended["end_at"])
    assert new_end == pytest.approx(original_end + EXTEND_S, abs=0.01)
    assert time.time() < original_end - 4, "the extension came too late for the test to mean anything"
    assert abs(ts(agent.lane(sid)["end_time"]) - new_end) < 0.01, "the agent did not take the new end time"

    # one connection held from before the original end to past the new one: kept across the first,
    # cut at the second
    _sleep_until(original_end - 3)
    holder = engineer.start("hold", rtu1, "2404", "--seconds", str(round(new_end - time.time() + 3)))
    _sleep_until(original_end + GRACE_S)
    assert engineer.probe(rtu1, 2404) == "open", "the lane ended at the original end despite the extension"
    held = json.loads(holder.communicate(timeout=60)[0].strip().splitlines()[-1])
    assert held["connected"] is not None and held["connected"] < original_end, held
    assert held["last_ok"] > new_end - 1.0, f"the connection died before the new end: {held}"
    assert held["broken"] is not None and held["broken"] - new_end <= GRACE_S, held
    _sleep_until(new_end + GRACE_S)
    assert engineer.probe(rtu1, 2404) != "open"
    assert agent.lane(sid) is None

    # the controller catches up on its next turn of the clock
    report = ctl.app.state.session_clock.tick()
    assert sid in report.expired and not report.push_failures, report
    ended = ctl.session(sid)
    assert (ended["state"], ended["end_reason"]) == ("expired", "end_time"), ended
    assert ts(ended["ended_at"]) == pytest.approx(new_end, abs=0.01)
    desired = ctl.call("GET", f"/nodes/{NODE_ID}/desired", ctl.admin).json()
    assert desired["lanes"] == [] and desired["node_id"] == NODE_ID

    evidence = agent.evidence_for(sid)
    assert evidence["end_reason"] == "expired" and 0 <= evidence["lateness_ms"] < 1000, evidence
    assert abs(ts(evidence["planned_end"]) - new_end) < 0.01
    assert evidence["device_id"] == DEVICE and evidence["engineer_address"] == active["tunnel_address"]
    assert 502 in {b["port"] for b in evidence["blocked"]}
    assert any(f["dport"] == 2404 and f["bytes_out"] > 0 for f in evidence["flows"]), evidence["flows"]


def test_revoked_session_is_cut_at_once(site):
    lab, agent, engineer, ctl = site
    rtu1 = lab.addr("rtu1")
    active, conf = ctl.open_session(engineer)
    sid = active["id"]
    holder = engineer.start("hold", rtu1, "2404", "--seconds", "20")
    assert wait_for(lambda: _established_to(lab, rtu1), timeout=3), "the held connection never came up"
    revoked_at = time.time()
    out = ctl.call("POST", f"/sessions/{sid}/revoke", ctl.approver, json={"reason": "wrong device in the work order"}).json()
    assert (out["state"], out["end_reason"], out["ended_by"]) == ("revoked", "revoked", "alex"), out
    held = json.loads(holder.communicate(timeout=30)[0].strip().splitlines()[-1])
    assert held["broken"] is not None and held["broken"] - revoked_at < GRACE_S, held
    assert engineer.probe(rtu1, 2404) != "open"
    assert agent.lane(sid) is None
    assert ctl.call("GET", f"/nodes/{NODE_ID}/desired", ctl.admin).json()["lanes"] == []
    evidence = agent.evidence_for(sid)
    assert evidence["end_reason"] == "removed", evidence
    assert ts(evidence["closed_at"]) - revoked_at < GRACE_S

    # the config was captured (the engineer's laptop, or someone who copied it): brought up again after the
    # revocation, on the engineer's machine and on another, it reaches nothing
    engineer.up(conf)
    assert engineer.probe(rtu1, 2404, timeout=2) == "timeout"
    thief = Engineer(lab, "eng2")
    try:
        thief.up(conf)
        assert thief.probe(rtu1, 2404, timeout=2) == "timeout"
        handshakes = lab.exec("eng2", ["wg", "show", thief.ifname, "latest-handshakes"]).stdout.split()
        assert handshakes[-1] == "0", f"the router answered a handshake for a revoked lane: {handshakes}"
    finally:
        thief.forget()


def _established_to(lab, host: str) -> bool:
    """The router's conntrack holds an established TCP connection to host:2404."""
    ct = lab.exec("rtr", ["conntrack", "-L", "-p", "tcp", "--dst", host, "--dport", "2404"], check=False).stdout
    return "ESTABLISHED" in ct




def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))
