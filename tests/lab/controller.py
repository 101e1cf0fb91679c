"""The whole product in the lab: the controller as its own process (`wicket-controller serve`, SQLite) in the
lab's `ctl` namespace, with its agent link on ctl:7443; the real agent on the router, enrolled with a join
token, dialling out to it. Used by the link lab tests, the benchmarks and the demo.

Set-up (policy, site, device, users) goes straight through the controller's services on the same database
from this process — those routes differ only by a TOTP step-up each, and an admin cannot spend dozens of
single-use codes inside a minute. Everything a user does in a session goes through the HTTP API, reached
inside the `ctl` namespace. The link can be cut (`cut`/`heal`: the controller's namespace drops the link's
packets, so TCP hangs as it would on a dead uplink), and the controller killed and restarted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pyotp

from .nsutil import in_netns
from .site import NODE_ID, AgentProcess, py
from .topology import Lab

API = "/api/v1"
PASSWORD = "correct horse battery staple"
SITE, DEVICE = "north-1", "RTU-17"
TASK, QUICK_TASK, RECORDED_TASK = "iec104-diagnostics", "iec104-quick", "iec104-recorded"
TUNNEL_POOL = "100.64.7.0/24"
LINK_PORT, API_PORT = 7443, 8080
CONTROLLER_ROLE = "ctl"


def policy(default_s: int = 40, extend_s: int = 20) -> dict[str, str]:
    return {"lab.yaml": f"""\
wicket_policy: 1
device_types:
  substation-rtu:
    title: Substation RTU
    access: [iec104]
tasks:
  {TASK}:
    title: Read-only IEC-104 diagnostics
    protocols: [iec104]
    device_types: [substation-rtu]
    roles: [engineer]
    duration: {{default: {default_s}s, max: 10m}}
    approval: {{required: true, approvers: 1}}
    extensions: {{reason_codes: [fault-still-open], max_count: 1, max_total: {extend_s}s}}
  {QUICK_TASK}:
    title: IEC-104 check under a standing order (no approval)
    protocols: [iec104]
    device_types: [substation-rtu]
    roles: [engineer]
    duration: {{default: {default_s}s, max: 10m}}
    approval: {{required: false}}
  {RECORDED_TASK}:
    title: IEC-104 work with payload recording (no approval)
    protocols: [iec104]
    device_types: [substation-rtu]
    roles: [engineer]
    duration: {{default: {default_s}s, max: 10m}}
    approval: {{required: false}}
    recording: payload
limits:
  max_silence: 1h
  concurrent_sessions_per_user: 10
"""}


@dataclass
class Person:
    username: str
    secret: str
    token: str | None = None
    used_steps: set[int] = field(default_factory=set)

    def code(self) -> str:
        """A TOTP code of a step this person has not used yet. The controller accepts the steps either side
        of now, each once per person: three actions per 30 s; a fourth waits for the next step."""
        while True:
            now = time.time()
            step, left = int(now // 30), 30 - now % 30
            for candidate in ([step - 1] if left > 3 else []) + [step, step + 1]:
                if candidate not in self.used_steps:
                    self.used_steps.add(candidate)
                    return pyotp.TOTP(self.secret).at(candidate * 30)
            time.sleep(left + 0.1)


class HttpError(AssertionError):
    pass


class LabController:
    def __init__(self, lab: Lab, workdir: str | os.PathLike, *, engineers: int = 1, default_s: int = 40,
                 heartbeat_s: int = 1, ack_timeout_s: int = 5, tick_ms: int = 250, role: str = CONTROLLER_ROLE,
                 policy_files: dict[str, str] | None = None, devices: tuple[dict, ...] = (),
                 people: tuple[tuple[str, str], ...] = ()):
        from controller.settings import load

        self.lab, self.role = lab, role
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.addr = lab.addr(role)
        self.link = f"{self.addr}:{LINK_PORT}"
        self.env = {
            "WICKET_DATA_DIR": str(self.dir / "data"), "WICKET_DATABASE_URL": f"sqlite:///{self.dir / 'controller.db'}",
            "WICKET_LINK_LISTEN": self.link, "WICKET_LINK_NAMES": self.addr, "WICKET_LINK_HEARTBEAT_S": str(heartbeat_s),
            "WICKET_ACK_TIMEOUT_S": str(ack_timeout_s), "WICKET_SESSION_TICK_MS": str(tick_ms), "WICKET_COOKIE_SECURE": "false",
        }
        self.settings = load({**self.env, "WICKET_SESSION_TICK_MS": "0", "WICKET_LINK_LISTEN": "off"})
        self.default_s, self.n_engineers = default_s, engineers
        self.policy_files, self.extra_devices, self.extra_people = policy_files, devices, people
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "controller.log"
        self.app = None
        self.people: dict[str, Person] = {}

    # ---- set-up (services, same database) ----

    def setup(self) -> LabController:
        from controller.app import create_app
        from controller.bootstrap import init
        from controller.inventory_schemas import DeviceCreate, SiteCreate
        from controller.nodelink import NoLink

        boot = init(self.settings, "root", "First Admin", PASSWORD)
        self.app = create_app(self.settings, link=NoLink())
        state = self.app.state
        self.people["root"] = Person("root", totp_secret(boot.enrolment.otpauth_uri))
        self.root = state.auth.login("root", PASSWORD, code=self.people["root"].code()).principal
        state.policies.apply(self.root, self.policy_files or policy(self.default_s), "lab", None)
        state.inventory.create_site(self.root, SiteCreate(
            name=SITE, display_name="North 1 substation", tunnel_pool=TUNNEL_POOL, port_min=51000, port_max=51199,
            public_endpoint=self.lab.router_wan, lan_networks=["192.0.2.0/24"]), None)
        state.inventory.create_device(self.root, DeviceCreate(
            asset_id=DEVICE, site=SITE, device_type="substation-rtu", addresses=[self.lab.addr("rtu1")],
            lifecycle="active", last_seen=datetime.now(UTC)), None)
        for extra in self.extra_devices:  # more devices: {"asset_id", "device_type", "role" (lab host), "lifecycle"}
            state.inventory.create_device(self.root, DeviceCreate(
                asset_id=extra["asset_id"], site=SITE, device_type=extra["device_type"], addresses=[self.lab.addr(extra["role"])],
                lifecycle=extra.get("lifecycle", "active"), last_seen=datetime.now(UTC)), None)
        self._person("alex", "approver")
        for username, role in self.extra_people:
            self._person(username, role)
        for i in range(self.n_engineers):
            self._person(f"erin{i}" if i else "erin", "engineer")
        return self

    def _person(self, username: str, role: str) -> Person:
        users = self.app.state.users
        site = None if role in ("soc", "admin") else SITE  # those two roles hold for every site
        user = users.create(self.root, username=username, display_name=username.title(), password=PASSWORD, roles=[(role, site)])
        person = Person(username, totp_secret(users.enrol_totp(self.root, user.id).otpauth_uri))
        self.people[username] = person
        return person

    def join_token(self) -> str:
        return self.app.state.agents.create_token(self.root, SITE, None, None).token

    def enrol(self, agent: AgentProcess, node: str = NODE_ID) -> subprocess.CompletedProcess:
        """`wicket-agent enroll` on the router, as a site admin would (token on stdin)."""
        return self.lab.exec("rtr", py("nodeagent.cli", "enroll", "--state-dir", agent.state_dir, "--controller", self.link,
                                       "--node-id", node), input=self.join_token() + "\n", timeout=60)

    # ---- the process ----

    def start(self, timeout: float = 30) -> LabController:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        env = [f"{k}={v}" for k, v in self.env.items()]
        self.proc = self.lab.spawn(self.role, ["env", *env, *py("controller.server_cli", "serve", "--host", "127.0.0.1",
                                                                "--port", str(API_PORT))[1:]],
                                   stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self._request("GET", "/healthz").status_code == 200:
                    for name, person in self.people.items():
                        if name != "root" and person.token is None:
                            self.login(person)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"controller did not come up:\n{self.log()}")

    def login(self, person: Person) -> None:
        res = self._request("POST", f"{API}/auth/login", json={"username": person.username, "password": PASSWORD,
                                                               "totp_code": person.code()})
        if res.status_code != 200:
            raise HttpError(f"login {person.username}: {res.status_code} {res.text}")
        person.token = res.json()["token"]

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def close(self) -> None:
        self.stop()
        self.heal()
        if self.app is not None:
            self.app.state.engine.dispose()

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    # ---- the link ----

    def cut(self) -> None:
        """Drop every packet of the agent link in the controller's namespace: both sides see silence."""
        self.lab.exec(self.role, ["nft", f"add table inet wkcut; add chain inet wkcut in {{ type filter hook input priority -5; }}; "
                                         f"add chain inet wkcut out {{ type filter hook output priority -5; }}; "
                                         f"add rule inet wkcut in tcp dport {LINK_PORT} drop; "
                                         f"add rule inet wkcut out tcp sport {LINK_PORT} drop"])

    def heal(self) -> None:
        self.lab.exec(self.role, ["nft", "delete table inet wkcut"], check=False)

    # ---- the API ----

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        url = f"http://127.0.0.1:{API_PORT}{path}"
        return in_netns(self.lab.ns(self.role), httpx.request, method, url, timeout=60, **kw)

    def call(self, method: str, path: str, who: str, *, step_up: bool = False, expect: int | None = 200, **kw) -> httpx.Response:
        person = self.people[who]
        headers = {"Authorization": f"Bearer {person.token}"}
        if step_up:
            headers["X-Wicket-TOTP"] = person.code()
        res = self._request(method, f"{API}{path}", headers=headers, **kw)
        if expect is not None and res.status_code != expect:
            raise HttpError(f"{method} {path} as {who}: {res.status_code} {res.text}")
        return res

    def open_session(self, engineer: str = "erin", *, quick: bool = False, duration: str | None = None,
                     task: str | None = None) -> dict:
        """Request (→ approve) → activate; the active session. `quick`: the task without approval."""
        body = {"device": DEVICE, "task": task or (QUICK_TASK if quick else TASK), "reason": "WO-4711 counters stuck"}
        if duration:
            body["duration"] = duration
        asked = self.call("POST", "/sessions", engineer, step_up=True, expect=201, json=body).json()
        sid = asked["id"]
        if asked["state"] == "pending_approval":
            self.call("POST", f"/sessions/{sid}/approve", "alex", step_up=True, json={"reason": "matches the fault ticket"})
        if asked["state"] != "active":
            return self.call("POST", f"/sessions/{sid}/activate", engineer, step_up=True, json={}).json()
        return asked

    def session(self, sid: str) -> dict:
        return self.call("GET", f"/sessions/{sid}", "alex").json()

    def agents(self) -> list[dict]:
        return self.app.state.agents.list_agents(self.root)

    def evidence(self) -> list[dict]:
        """Lane evidence the controller received over the link (straight from the database)."""
        from sqlalchemy import select

        from controller.models import LaneEvidenceRecord

        with self.app.state.auth.factory() as s:
            return [{"ident": r.ident, "session_id": r.session_id, "end_reason": r.end_reason, **r.body}
                    for r in s.scalars(select(LaneEvidenceRecord).order_by(LaneEvidenceRecord.id))]

    def sessions_in(self, *states: str) -> list[dict]:
        from sqlalchemy import select

        from controller.models import AccessSession

        with self.app.state.auth.factory() as s:
            return [{"id": r.id, "state": r.state, "end_at": r.end_at, "node": r.node}
                    for r in s.scalars(select(AccessSession).where(AccessSession.state.in_(states)))]


def totp_secret(uri: str) -> str:
    return re.search(r"secret=([A-Z2-7]+)", uri).group(1)


def conf_value(conf: str, key: str) -> str:
    match = re.search(rf"^{key}\s*=\s*(\S+)\s*$", conf, re.MULTILINE)
    if not match:
        raise AssertionError(f"{key} missing from the config:\n{conf}")
    return match.group(1)


def ts(text: str) -> float:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise AssertionError(f"{text}: a time without its zone")
    return value.timestamp()


def dump(value) -> str:
    return json.dumps(value, indent=1, default=str)
