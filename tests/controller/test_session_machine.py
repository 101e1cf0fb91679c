"""The session state machine, driven through the HTTP API in random orders (hypothesis.stateful).

Three engineers (one of them also an approver everywhere), two approvers, a SOC analyst, a site admin and
the admin request, approve, reject, activate, download configs, extend, close, revoke, break glass,
review, read the approval queue and a device's access history, disable and enable accounts, change the
policy (a task removed, or back) and let time pass, at two sites, in whatever order hypothesis picks.
Every call's status code is predicted from a model of the session and checked; engineers also reach for
each other's sessions (always 404). One rule, `open_session`, runs request → approvals → activation →
config → extension → its re-approval in one step, so that long runs are not needed to reach those states.

After every step the session clock turns once (the service turns it every second) and the invariants
are checked against the API, the audit events, the database and the fake nodes:

  lanes       before the tick each node holds the generation and lanes the database has (every call
              pushed after its commit); after it, the lanes on the node and in `session_lanes.desired_state`
              are exactly the sessions the API reports active, with their end, address and port, none of
              them past its end;
  audit       every state change seen through the API has its event (subject, type, result, actor, policy
              version and decision), no transition event names a change that did not happen, and refused
              self-approvals, self-reviews, re-decided activations and second downloads are recorded;
  approvals   a session is activated once, never active again after it left; nobody answers twice or
              approves their own request; an activated session had all the approvals its policy asked for;
  pushes      generations only grow per node (one generation, one content), lane revisions per session too,
              and a lane never comes back for a session that ended;
  leases      exactly the active sessions hold a lease; no two active sessions at a site share an address
              or a port;
  keys        a minted private key is in the database only while its session is active and undownloaded;
  ending      after the tick a disabled user has no open session, no active session has a task the newest
              policy lacks, and a session ending within the warning time has had its warning.

One controller (the `ctl` fixture: SQLite, PostgreSQL) serves every example: a fresh database per example
would cost seconds each. Each example starts from a reset done through the API: every account enabled,
the base policy active, every open session revoked; the checks look only at the example's own sessions.
The clock only moves forward across examples. Should a failing example not fail the same way when
hypothesis replays it, the test still reports the first failure with its steps.

  WICKET_MACHINE_SEED=N      replay a run (the seed is printed when the machine fails)
  WICKET_MACHINE_EXAMPLES=N  examples per database (default: EXAMPLES)
  WICKET_MACHINE_SHRINK=0    report the first failing example as found, without shrinking it
  WICKET_MACHINE_STATS=1     print how often each call got each answer, and each transition
"""

from __future__ import annotations

import base64
import functools
import os
import random
import re
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatch

import pyotp
import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from controller import session_lanes
from controller.models import AccessSession, LaneLease, User
from controller.policy.durations import parse_duration

from .conftest import Harness, Person

API = "/api/v1"
# Examples per database, for about 35 s each on two cores: a PostgreSQL step costs about twice a SQLite one.
# More for a deeper search: WICKET_MACHINE_EXAMPLES=200 (docs/testing.md).
EXAMPLES = {"sqlite": 12, "postgresql": 5}
STEPS = 30


def machine_settings(dialect: str) -> settings:
    return settings(max_examples=int(os.environ.get("WICKET_MACHINE_EXAMPLES") or EXAMPLES[dialect]), stateful_step_count=STEPS,
                    deadline=None, database=None, print_blob=True,
                    phases=[Phase.generate] + ([Phase.shrink] if os.environ.get("WICKET_MACHINE_SHRINK", "1") == "1" else []),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.filter_too_much, HealthCheck.data_too_large])


# ---- the world: policy, sites, devices, people ----

_HEAD = """wicket_policy: 1
destinations:
  scada: {addresses: [198.51.100.10]}
device_types:
  substation-rtu:
    title: Substation RTU
    access: [iec104, dnp3, ssh]
    baseline: [{protocol: iec104, to: [scada]}]
limits:
  concurrent_sessions_per_user: 2
  max_silence: null          # the clock runs for days across examples; devices are not re-seen
"""
_TASKS = {
    # no approval; extended without re-approval; the one break-glass task
    "diag": """  diag:
    title: Read-only diagnostics
    protocols: [iec104]
    device_types: [substation-rtu]
    roles: [engineer]
    duration: {default: 30m, max: 1h}
    extensions: {reason_codes: [fault-still-open], max_count: 2, max_total: 30m}
    break_glass: true
""",
    "single": """  single:
    title: One approver
    protocols: [dnp3]
    device_types: [substation-rtu]
    roles: [engineer]
    duration: {default: 20m, max: 1h}
    approval: {required: true}
    extensions: {reason_codes: [work-overrun], max_count: 1, max_total: 20m, reapproval: true}
""",
    "dual": """  dual:
    title: Two approvers
    protocols: [ssh]
    device_types: [substation-rtu]
    roles: [engineer]
    duration: {default: 45m, max: 2h}
    approval: {required: true, approvers: 2}
    extensions: {reason_codes: [work-overrun], max_count: 2, max_total: 30m, reapproval: true}
""",
}
TASK_RULES = {  # what the model needs of each task: approvers, max duration, extension rules
    "diag": dict(approvers=0, max_s=3600, codes={"fault-still-open"}, ext_count=2, ext_total_s=1800, reapproval=False),
    "single": dict(approvers=1, max_s=3600, codes={"work-overrun"}, ext_count=1, ext_total_s=1200, reapproval=True),
    "dual": dict(approvers=2, max_s=7200, codes={"work-overrun"}, ext_count=2, ext_total_s=1800, reapproval=True),
}
VARIANTS = {"base": ("diag", "single", "dual"), "no-diag": ("single", "dual"), "no-dual": ("diag", "single")}
BREAK_GLASS_MAX_S = 1800
CONCURRENT = 2


def policy_files(variant: str) -> dict[str, str]:
    return {"policy.yaml": _HEAD + "tasks:\n" + "".join(_TASKS[t] for t in VARIANTS[variant])}


SITES = {"north": "edge-n", "south": "edge-s"}  # site → its node
DEVICES = {"RTU-N1": "north", "RTU-N2": "north", "RTU-S1": "south"}
ALL = None  # a role held at every site
USERS = {  # name → roles
    "eng1": [("engineer", ALL), ("break_glass", "north")],
    "eng2": [("engineer", ALL)],
    "eng3": [("engineer", ALL), ("approver", ALL), ("break_glass", "north"), ("break_glass", "south")],
    "apr1": [("approver", "north")],
    "apr2": [("approver", ALL)],
    "soc1": [("soc", ALL)],
    "sadm": [("site_admin", "south")],  # sees south's sessions, may not approve, revoke or review them
}
REQUESTERS = ("eng1", "eng2", "eng3", "apr1")  # apr1 holds no engineer role: denied
PLAIN_ENGINEERS = ("eng1", "eng2")  # they see only their own sessions
ANSWERERS = ("eng3", "apr1", "apr2", "soc1", "sadm", "eng1")
ENDERS = ("apr1", "apr2", "soc1", "sadm", "root", "eng1", "eng3")  # revoke and review callers
DISABLEABLE = ("eng1", "eng2", "eng3", "apr1", "apr2")
READERS = ("approver", "soc", "admin", "site_admin")
OPEN = ("pending_approval", "approved", "active")
ENDED = ("denied", "rejected", "closed", "expired", "revoked")
TRANSITION_TYPES = {"session.request", "break_glass.open", "session.approve", "session.reject", "session.activate",
                    "session.close", "session.expire", "session.revoke"}
END_TYPE = {"closed": "session.close", "expired": "session.expire", "revoked": "session.revoke"}
STEP_S = 30
IDLE_MARGIN_S = 60


def ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def wg_public_key() -> str:
    return base64.b64encode(random.randbytes(32)).decode()


def recorded(fn):
    """Keep a run's first failure with the steps that led to it. Examples share one controller, so should
    hypothesis's replay of a failing example go differently (it then reports only that the test is flaky),
    the test still shows what broke."""

    @functools.wraps(fn)
    def run(self, **kw):
        w = self.world
        if fn.__name__ != "hold":
            w.steps.append(f"{fn.__name__}({', '.join(f'{k}={v!r}' for k, v in kw.items())})")
        try:
            return fn(self, **kw)
        except Exception:
            if w.first_failure is None:
                w.first_failure = "\n".join(["steps of the first failing example:", *w.steps, "", traceback.format_exc()])
            raise

    return run


@dataclass
class Actor:
    """A person the machine acts as, with their login and the TOTP steps they have spent."""

    name: str
    person: Person
    grants: list[tuple[str, str | None]]
    disabled: bool = False
    token: str | None = None
    token_born: float = 0.0
    token_used: float = 0.0
    used_steps: set[int] = field(default_factory=set)

    def can(self, site: str, *roles: str) -> bool:
        return any(r in roles and (s is None or s == site) for r, s in self.grants)


class World:
    """The controller every example shares, and what the machine knows about it across examples."""

    def __init__(self, ctl: Harness):
        self.ctl = ctl
        self.client = ctl.client
        self.factory = ctl.app.state.auth.factory
        self.idle_s, self.max_s = ctl.settings.token_idle_s, ctl.settings.token_max_s
        self.actors: dict[str, Actor] = {"root": Actor("root", ctl.admin, [("admin", None)])}
        self.variant = "base"
        self.event_cursor = 0
        self.push_cursor = 0
        self.node_seen: dict[str, tuple[int, list]] = {}  # node → (generation, lanes) of its last push
        self.lane_seen: dict[str, tuple[int, dict]] = {}  # session → (revision, lane) of its last push
        self.residue: dict[str, set[str]] = {}  # lanes and open sessions a reset could not end (none, unless a bug)
        self.steps: list[str] = []  # the calls of the running example
        self.first_failure: str | None = None
        self.seen: Counter[str] = Counter()  # calls by answer and transitions, printed with WICKET_MACHINE_STATS=1
        self.base_version = ctl.apply_policy(policy_files("base"), comment="session machine")["version"]
        for site, node in SITES.items():
            ctl.add_site(site)
            ctl.add_agent(site, node)
        for asset, site in DEVICES.items():
            ctl.add_device(asset, site)
        for name, roles in USERS.items():
            self.actors[name] = Actor(name, ctl.add_user(name, roles=roles), list(roles))
        ctl.advance(3 * STEP_S)  # past the admin codes the harness spent: from here on this class keeps count

    # ---- time and logins ----

    @property
    def now(self) -> float:
        return self.ctl.t

    def code(self, actor: Actor) -> str:
        """A TOTP code this person has not used: a free step in the server's window (±1 step), or the next
        step's start if all three are spent."""
        while True:
            here = int(self.ctl.t // STEP_S)
            free = [s for s in (here - 1, here, here + 1) if s not in actor.used_steps]
            if free:
                actor.used_steps.add(free[0])  # spent whatever the call's fate: never sent twice
                return pyotp.TOTP(actor.person.secret).at(free[0] * STEP_S)
            self.ctl.advance(STEP_S - self.ctl.t % STEP_S + 0.25)

    def headers(self, actor: Actor, step_up: bool = False) -> dict:
        """A live login for `actor` (renewed before it idles out), with a fresh code for a step-up."""
        t = self.ctl.t
        if actor.token is None or t + IDLE_MARGIN_S >= actor.token_used + self.idle_s or t + IDLE_MARGIN_S >= actor.token_born + self.max_s:
            res = self.client.post(f"{API}/auth/login", json={"username": actor.person.username, "password": actor.person.password,
                                                             "totp_code": self.code(actor)})
            assert res.status_code == 200, res.text
            actor.token, actor.token_born = res.json()["token"], self.ctl.t
        h = {"Authorization": f"Bearer {actor.token}"}
        if step_up:
            h["X-Wicket-TOTP"] = self.code(actor)
        actor.token_used = self.ctl.t
        return h

    def admin(self, step_up: bool = False) -> dict:
        return self.headers(self.actors["root"], step_up)

    # ---- reads as the admin ----

    def session(self, sid: str) -> dict:
        res = self.client.get(f"{API}/sessions/{sid}", headers=self.admin())
        assert res.status_code == 200, res.text
        return res.json()

    def open_sessions(self) -> list[dict]:
        res = self.client.get(f"{API}/sessions", params={"scope": "all", "state": list(OPEN), "limit": 1000}, headers=self.admin())
        assert res.status_code == 200, res.text
        return res.json()

    def new_events(self) -> list[dict]:
        out = []
        while True:
            res = self.client.get(f"{API}/events", params={"after": self.event_cursor, "limit": 1000}, headers=self.admin())
            assert res.status_code == 200, res.text
            batch = res.json()
            if not batch:
                return out
            self.event_cursor = batch[-1]["seq"]
            out += [e for e in batch if e["category"] == "session"]

    def desired(self, node: str) -> dict:
        """The node's desired state as the controller builds it from the database (`session_lanes.desired_state`)."""
        with self.factory() as s:
            return session_lanes.desired_state(s, node).model_dump(mode="json")

    def read_pushes(self, check: bool = True, ended: set[str] = frozenset()) -> None:
        """What the fake nodes were handed since the last look: generations only grow per node (one generation,
        one content), lane revisions per session too, and a lane never comes back for a session that ended."""
        pushes = self.ctl.nodes.pushes[self.push_cursor:]
        self.push_cursor += len(pushes)
        for p in pushes:
            lanes = sorted((lane.model_dump(mode="json") for lane in p.lanes), key=lambda x: x["session_id"])
            gen, before = self.node_seen.get(p.node_id, (-1, None))
            if check:
                assert p.generation >= gen, f"node {p.node_id} was pushed generation {p.generation} after {gen}"
                if p.generation == gen:
                    assert lanes == before, f"node {p.node_id} got two different states under generation {gen}"
            self.node_seen[p.node_id] = (p.generation, lanes)
            for lane in lanes:
                sid = lane["session_id"]
                rev, old = self.lane_seen.get(sid, (-1, None))
                if check:
                    assert sid not in ended, f"node {p.node_id} was handed a lane for {sid}, which had ended"
                    assert lane["revision"] >= rev, f"lane {sid} went from revision {rev} to {lane['revision']}"
                    if lane["revision"] == rev:
                        assert lane == old, f"lane {sid} changed without a new revision: {old} → {lane}"
                self.lane_seen[sid] = (lane["revision"], lane)

    # ---- between examples ----

    def reset(self) -> None:
        """Back to a known start: accounts enabled, the base policy, no open session, events and pushes read."""
        with self.factory() as s:
            disabled = set(s.scalars(select(User.username).where(User.disabled.is_(True))).all())
        for actor in self.actors.values():
            if actor.name in disabled:
                res = self.client.post(f"{API}/users/{actor.person.user_id}/enable", headers=self.admin(step_up=True))
                assert res.status_code == 200, res.text
            actor.disabled = False
        res = self.client.get(f"{API}/policy", headers=self.admin())
        assert res.status_code == 200, res.text
        if res.json()["version"] != self.base_version:
            res = self.client.post(f"{API}/policy/apply", json={"files": policy_files("base"), "comment": "reset"},
                                   headers=self.admin(step_up=True))
            assert res.status_code == 200, res.text
        self.variant = "base"
        self.read_pushes(check=False)  # a failed example may have left pushes unread
        for row in self.open_sessions():
            res = self.client.post(f"{API}/sessions/{row['id']}/revoke", json={"reason": "reset between examples"}, headers=self.admin())
            assert res.status_code == 200, res.text
        self.ctl.tick()
        self.new_events()
        self.read_pushes(check=False)
        self.residue = {"open": {s["id"] for s in self.open_sessions()}, **{n: self.ctl.nodes.lanes(n) for n in SITES.values()}}
        self.steps = []


@dataclass
class Tracked:
    """One session: as the machine saw it at the last check (`view`, the API's SessionOut), as the calls
    since have left it (`cur`), and what it has been through."""

    view: dict | None = None
    cur: dict | None = None
    after_action: list[tuple[str | None, str]] = field(default_factory=list)  # (state, actor) each call of the step left
    events_due: list[tuple[str, str, str | None]] = field(default_factory=list)  # other events this step's calls wrote
    creator_type: str = "session.request"
    activations: int = 0
    left_active: bool = False
    warned_end: float | None = None  # the end time the last ending_soon event named


class SessionMachine(RuleBasedStateMachine):
    world: World  # set by the test

    def __init__(self):
        super().__init__()
        self.world.reset()
        self.sessions: dict[str, Tracked] = {}
        self.order: list[str] = []  # sessions in the order they were made
        self.ended: set[str] = set()  # sessions seen ended: their lanes never come back
        self.world.ctl.advance(1)
        self.started = self.world.now - 0.5  # sessions of earlier examples ended before this

    # ---- helpers ----

    def actor(self, name: str) -> Actor:
        return self.world.actors[name]

    def pick(self, n: int, owner: str | None = None, waiting: bool = False) -> str:
        """A session for a call: four times in five an open one (the owner's, for the owner's calls; one waiting
        for approval, for approvers), if there is any; else any session at all (someone else's, an ended one)."""
        def fits(v: dict) -> bool:
            if waiting:
                return v["state"] == "pending_approval" or (v["state"] == "active" and bool(v["extension_request"]))
            return v["state"] in OPEN and (owner is None or v["user"] == owner)

        live = [sid for sid in self.order if fits(self.sessions[sid].cur)]
        return live[(n // 5) % len(live)] if live and n % 5 else self.order[n % len(self.order)]

    def any_open(self) -> bool:
        """Time, accounts, policy and the queue matter only while some session is open."""
        return any(t.cur["state"] in OPEN for t in self.sessions.values())

    def may_see(self, actor: Actor, view: dict) -> bool:
        return view["user"] == actor.name or actor.can(view["site"], *READERS)

    def active_count(self, user: str) -> int:
        # as the policy counts: by state, even in the second between an end and the tick that expires it
        return sum(1 for t in self.sessions.values() if t.cur and t.cur["user"] == user and t.cur["state"] == "active")

    def tasks_now(self) -> tuple[str, ...]:
        return VARIANTS[self.world.variant]

    def send(self, actor: Actor, method: str, path: str, headers: dict, **kw):
        return self.world.client.request(method, f"{API}{path}", headers=headers, **kw)

    def expect(self, res, status: int, what: str) -> dict:
        self.world.seen[f"{what.split()[1]} → {status}"] += 1
        assert res.status_code == status, f"{what}: expected {status}, got {res.status_code}: {res.text[:600]}"
        return res.json() if res.headers.get("content-type", "").startswith("application/json") else {}

    def acted(self, sid: str, out: dict, actor: Actor) -> dict:
        """Remember the state a call left the session in (for this step's audit), and the session as it is now."""
        t = self.sessions[sid]
        t.after_action.append((out["state"], actor.name))
        t.cur = out
        return out

    def track_new(self, out: dict, actor: Actor, creator: str) -> dict:
        assert out["id"] not in self.sessions, f"the API handed out session id {out['id']} twice"
        self.sessions[out["id"]] = Tracked(creator_type=creator)
        self.order.append(out["id"])
        return self.acted(out["id"], out, actor)

    # ---- the calls, each with the answer the model expects ----

    def do_request(self, who: str, device: str, task: str, *, duration: str | None = None, byok=False, activate=True) -> dict | None:
        actor = self.actor(who)
        body = {"device": device, "task": task, "reason": "work order 4711", "activate": activate}
        if duration:
            body["duration"] = duration
        if byok:
            body["public_key"] = wg_public_key()
        site = DEVICES[device]
        res = self.send(actor, "POST", "/sessions", self.world.headers(actor, step_up=True), json=body)
        if not any(s is None or s == site for _, s in actor.grants):
            self.expect(res, 404, f"{who} requests at {site}, where they hold no role")
            return None
        out = self.expect(res, 201, f"{who} requests {task} on {device}")
        reasons = set()  # the checks that must fail
        if task not in self.tasks_now():
            reasons.add("task")
        elif not actor.can(site, "engineer"):
            reasons.add("task_role")
        elif duration and parse_duration(duration).total_seconds() > TASK_RULES[task]["max_s"]:
            reasons.add("duration")
        if self.active_count(who) >= CONCURRENT:
            reasons.add("concurrency")
        if reasons:
            want = "denied"
        elif TASK_RULES[task]["approvers"]:
            want = "pending_approval"
        else:
            want = "active" if activate else "approved"
        assert out["state"] == want, f"{who} requests {task} on {device}: state {out['state']}, expected {want}: {out}"
        failed = set(out["decision"]["failed_checks"])
        if "task" in reasons:
            assert "task" in failed, out["decision"]
        else:
            assert reasons <= failed, f"{who} requests {task}: the denial names {failed}, expected {reasons}"
        if want == "pending_approval":
            assert out["approvals_required"] == TASK_RULES[task]["approvers"], out
        return self.track_new(out, actor, "session.request")

    def do_answer(self, who: str, sid: str, approve: bool) -> dict | None:
        """An approver's answer to the session's request or extension ask."""
        actor, view = self.actor(who), self.sessions[sid].cur
        verb = "approve" if approve else "reject"
        h = self.world.headers(actor, step_up=approve)
        now = self.world.now
        res = self.send(actor, "POST", f"/sessions/{sid}/{verb}", h, json={"reason": "checked the work order"})
        what = f"{who} {verb}s {view['user']}'s {view['state']} {view['task']} session {sid}"
        kind = (view["extension_request"] or {}).get("key") if view["state"] == "active" else "request"
        so_far = sum(1 for a in view["approvals"] if a["kind"] == kind and a["verdict"] == "approve")
        needed = view["approvals_required"] if kind == "request" else max(1, view["approvals_required"])
        completes_extension = approve and kind != "request" and so_far + 1 >= needed
        if not self.may_see(actor, view):
            status = 404
        elif not actor.can(view["site"], "approver"):
            status = 403
        elif view["user"] == who:
            status = 403
            self.sessions[sid].events_due.append(("session.approve", "failure", "self_approval"))
        elif not (view["state"] == "pending_approval" or (view["state"] == "active" and kind and ts(view["end_at"]) > now)):
            status = 409  # nothing waits for an answer
        elif any(a["kind"] == kind and a["approver"] == who for a in view["approvals"]):
            status = 409  # answered already
        elif completes_extension and view["task"] not in self.tasks_now():
            status = 403  # the extension's re-decision: its task is gone from the policy
        else:
            status = 200
        out = self.expect(res, status, what)
        if status != 200:
            return None
        if kind == "request":
            want = "rejected" if not approve else "approved" if so_far + 1 >= needed else "pending_approval"
            assert out["state"] == want, f"{what}: {out['state']}, expected {want}"
        elif completes_extension:
            assert ts(out["end_at"]) == pytest.approx(ts(view["end_at"]) + view["extension_request"]["by_s"]), (view, out)
            assert out["extension_request"] is None and len(out["extensions"]) == len(view["extensions"]) + 1, out
        else:  # a rejected ask is dropped; an approval short of the number needed keeps it waiting
            assert out["extension_request"] == (view["extension_request"] if approve else None), out
            assert out["end_at"] == view["end_at"], out
        return self.acted(sid, out, actor)

    def do_activate(self, who: str, sid: str, byok: bool) -> dict | None:
        actor, view = self.actor(who), self.sessions[sid].cur
        h = self.world.headers(actor, step_up=True)
        now = self.world.now
        res = self.send(actor, "POST", f"/sessions/{sid}/activate", h, json={"public_key": wg_public_key()} if byok else {})
        what = f"{who} activates {view['user']}'s {view['state']} {view['task']} session {sid}"
        if not self.may_see(actor, view):
            status = 404
        elif view["user"] != who:
            status = 403
        elif view["state"] != "approved" or ts(view["expires_at"]) <= now:
            status = 409  # not approved, or the approval lapsed or was used
        elif view["task"] not in self.tasks_now() or self.active_count(who) >= CONCURRENT:
            status = 403  # decided again: the policy no longer allows it
            self.sessions[sid].events_due.append(("session.activate", "failure", "policy_*"))
        else:
            status = 200
        out = self.expect(res, status, what)
        if status != 200:
            return None
        assert out["state"] == "active" and out["config_available"], out
        assert out["key_mode"] == ("byok" if byok or view["key_mode"] == "byok" else "minted"), out
        return self.acted(sid, out, actor)

    def do_config(self, who: str, sid: str, fmt: str) -> None:
        """The one-time config: once, to the owner, while the session is active."""
        actor, view = self.actor(who), self.sessions[sid].cur
        h = self.world.headers(actor)
        now = self.world.now
        res = self.send(actor, "GET", f"/sessions/{sid}/config", h, params={"format": fmt})
        what = f"{who} downloads the config of {view['user']}'s {view['state']} session {sid}"
        if not self.may_see(actor, view):
            status = 404
        elif view["user"] != who:
            status = 403
        elif view["config_downloaded_at"]:
            status = 410
            self.sessions[sid].events_due.append(("session.config", "failure", "already_downloaded"))
        elif view["state"] != "active" or ts(view["end_at"]) <= now:
            status = 409
        else:
            status = 200
        self.expect(res, status, what)
        if status != 200:
            return
        if fmt == "conf":
            assert f"AllowedIPs = {view['device_address']}/32" in res.text, res.text
            minted_key = re.search(r"^PrivateKey = [A-Za-z0-9+/]{43}=$", res.text, re.M)
            assert bool(minted_key) == (view["key_mode"] == "minted"), res.text
        self.sessions[sid].events_due.append(("session.config", "success", None))
        self.acted(sid, self.world.session(sid), actor)

    def do_extend(self, who: str, sid: str, by: int, good_code: bool) -> dict | None:
        actor, view = self.actor(who), self.sessions[sid].cur
        rules = TASK_RULES.get(view["task"])
        code = next(iter(rules["codes"])) if rules and good_code else "no-such-reason"
        h = self.world.headers(actor, step_up=True)
        now = self.world.now
        res = self.send(actor, "POST", f"/sessions/{sid}/extend", h, json={"by": f"{by // 60}m", "reason_code": code})
        what = f"{who} extends {view['user']}'s {view['state']} {view['task']} session {sid} by {by // 60}m ({code})"
        if not self.may_see(actor, view):
            status = 404
        elif view["user"] != who:
            status = 403
        elif view["state"] != "active" or ts(view["end_at"]) <= now or view["break_glass"] or view["extension_request"]:
            status = 409
        elif view["task"] not in self.tasks_now():
            status = 403  # the task is gone from the policy
        elif code not in rules["codes"]:
            status = 422
        elif len(view["extensions"]) >= rules["ext_count"] or by > rules["ext_total_s"] - sum(e["by_s"] for e in view["extensions"]):
            status = 403  # beyond the task's extension limits
        else:
            status = 200
        out = self.expect(res, status, what)
        if status != 200:
            return None
        if rules["reapproval"]:
            assert out["extension_request"] and out["extension_request"]["by_s"] == by and out["end_at"] == view["end_at"], out
        else:
            assert ts(out["end_at"]) == pytest.approx(ts(view["end_at"]) + by), (view, out)
        return self.acted(sid, out, actor)

    # ---- rules: requests ----

    @rule(who=st.sampled_from(REQUESTERS), device=st.sampled_from(sorted(DEVICES)),
          kind=st.sampled_from(["diag", "diag", "diag-later", "single", "dual", "too-long", "unknown-task"]), byok=st.booleans())
    @recorded
    def request(self, who, device, kind, byok):
        if self.actor(who).disabled:
            return
        task = {"diag-later": "diag", "too-long": "dual", "unknown-task": "nope"}.get(kind, kind)
        self.do_request(who, device, task, duration="3h" if kind == "too-long" else None, byok=byok, activate=kind != "diag-later")

    @rule(who=st.sampled_from(("eng1", "eng2", "eng3")), device=st.sampled_from(sorted(DEVICES)),
          task=st.sampled_from(["single", "dual"]), approvers=st.permutations(["apr1", "apr2", "eng3"]), byok=st.booleans(),
          download=st.booleans(), extend=st.sampled_from([None, 600, 1200]))
    @recorded
    def open_session(self, who, device, task, approvers, byok, download, extend):
        """Request, approvals by whoever may give them, activation, maybe the config and an extension with its
        re-approval, in one step: a short way to the states single calls reach only in long runs."""
        if self.actor(who).disabled:
            return
        out = self.do_request(who, device, task, byok=byok)
        if out is None:
            return
        sid = out["id"]
        self.approve_all(sid, approvers)
        if self.sessions[sid].cur["state"] == "approved":
            self.do_activate(who, sid, byok=False)
        if download and self.sessions[sid].cur["state"] == "active":
            self.do_config(who, sid, "conf")
        if extend and self.sessions[sid].cur["state"] == "active":
            self.do_extend(who, sid, extend, good_code=True)
            self.approve_all(sid, approvers)

    def approve_all(self, sid: str, approvers: list[str]) -> None:
        """Approvals of the session's request or extension ask, from those in `approvers` who are approvers at
        its site, the requester among them (refused)."""
        for name in approvers:
            t, approver = self.sessions[sid], self.actor(name)
            waiting = t.cur["state"] == "pending_approval" or (t.cur["state"] == "active" and t.cur["extension_request"])
            if waiting and not approver.disabled and approver.can(t.cur["site"], "approver"):
                self.do_answer(name, sid, approve=True)

    @rule(who=st.sampled_from(("eng1", "eng3", "eng1", "eng3", "eng2", "apr1")), device=st.sampled_from(sorted(DEVICES)),
          task=st.sampled_from(["diag", "diag", "diag", "single"]), long=st.sampled_from([False, False, False, True]))
    @recorded
    def break_glass(self, who, device, task, long):
        actor = self.actor(who)
        if actor.disabled:
            return
        body = {"device": device, "task": task, "reason": "substation alarm", "incident": "INC-4711"}
        if long:
            body["duration"] = "45m"
        site = DEVICES[device]
        res = self.send(actor, "POST", "/break-glass", self.world.headers(actor, step_up=True), json=body)
        if not any(s is None or s == site for _, s in actor.grants):
            self.expect(res, 404, f"{who} breaks glass at {site}, where they hold no role")
            return
        allowed = (actor.can(site, "break_glass") and task == "diag" and task in self.tasks_now() and not long
                   and self.active_count(who) < CONCURRENT)
        if allowed:
            out = self.expect(res, 201, f"{who} breaks glass for {task} on {device}")
            assert out["state"] == "active" and out["break_glass"] and out["recording"] == "payload", out
            assert ts(out["end_at"]) - ts(out["activated_at"]) <= BREAK_GLASS_MAX_S
            self.track_new(out, actor, "break_glass.open")
        else:
            out = self.expect(res, 403, f"{who} breaks glass for {task} on {device} (not allowed)")
            assert out["failed_checks"] and out["decision"]["outcome"] == "deny", out
            self.track_new(self.world.session(out["session_id"]), actor, "break_glass.open")

    # ---- rules: approvers ----

    @precondition(lambda self: self.order)
    @rule(who=st.sampled_from(ANSWERERS), n=st.integers(0, 10**6), approve=st.booleans())
    @recorded
    def answer(self, who, n, approve):
        if not self.actor(who).disabled:
            self.do_answer(who, self.pick(n, waiting=True), approve)

    @precondition(lambda self: any(t.cur["user"] == "eng3" and t.cur["state"] == "pending_approval" for t in self.sessions.values()))
    @rule(n=st.integers(0, 10**6), approve=st.booleans())
    @recorded
    def self_approval(self, n, approve):
        """eng3, an approver everywhere, answers their own request: refused, and the refusal recorded."""
        if not self.actor("eng3").disabled:
            mine = [sid for sid in self.order if self.sessions[sid].cur["user"] == "eng3"
                    and self.sessions[sid].cur["state"] == "pending_approval"]
            self.do_answer("eng3", mine[n % len(mine)], approve)

    @precondition(lambda self: self.any_open())
    @rule(who=st.sampled_from(("eng3", "apr1", "apr2")))
    @recorded
    def queue(self, who):
        """The approval queue: others' requests and extensions at the approver's sites, not yet answered by them."""
        actor = self.actor(who)
        if actor.disabled:
            return
        items = self.expect(self.send(actor, "GET", "/approvals", self.world.headers(actor)), 200, f"{who}'s approval queue")
        got = {i["session"]["id"]: i for i in items}
        for sid, t in self.sessions.items():
            v = t.cur
            waiting = v["state"] == "pending_approval" or (v["state"] == "active" and v["extension_request"])
            kind = "request" if v["state"] == "pending_approval" else (v["extension_request"] or {}).get("key")
            should = (waiting and v["user"] != who and actor.can(v["site"], "approver")
                      and not any(a["kind"] == kind and a["approver"] == who for a in v["approvals"]))
            assert (sid in got) == bool(should), f"{who}'s queue {'lacks' if should else 'shows'} {sid}: {v['state']} {v}"
            if should:
                so_far = sum(1 for a in v["approvals"] if a["kind"] == kind and a["verdict"] == "approve")
                assert got[sid]["approvals_so_far"] == so_far, got[sid]
        for sid, item in got.items():
            assert item["session"]["user"] != who, f"{who}'s own session {sid} is in their queue"
            assert sid in self.sessions, f"{who}'s queue shows {sid}, which no step of this example made"

    # ---- rules: the requester ----

    @precondition(lambda self: self.order)
    @rule(who=st.sampled_from(("eng1", "eng2", "eng3")), n=st.integers(0, 10**6), byok=st.booleans())
    @recorded
    def activate(self, who, n, byok):
        if not self.actor(who).disabled:
            self.do_activate(who, self.pick(n, who), byok)

    @precondition(lambda self: self.order)
    @rule(who=st.sampled_from(("eng1", "eng2", "eng3")), n=st.integers(0, 10**6), fmt=st.sampled_from(["conf", "conf", "svg"]))
    @recorded
    def config(self, who, n, fmt):
        if not self.actor(who).disabled:
            self.do_config(who, self.pick(n, who), fmt)

    @precondition(lambda self: self.order)
    @rule(who=st.sampled_from(("eng1", "eng2", "eng3")), n=st.integers(0, 10**6), by=st.sampled_from([600, 900, 1200, 2400]),
          good_code=st.sampled_from([True, True, True, False]))
    @recorded
    def extend(self, who, n, by, good_code):
        if not self.actor(who).disabled:
            self.do_extend(who, self.pick(n, who), by, good_code)

    @precondition(lambda self: self.order)
    @rule(who=st.sampled_from(("eng1", "eng2", "eng3")), n=st.integers(0, 10**6))
    @recorded
    def close(self, who, n):
        actor = self.actor(who)
        if actor.disabled:
            return
        sid = self.pick(n, who)
        view = self.sessions[sid].cur
        res = self.send(actor, "POST", f"/sessions/{sid}/close", self.world.headers(actor), json={"reason": "done"})
        what = f"{who} closes {view['user']}'s {view['state']} session {sid}"
        if not self.may_see(actor, view):
            self.expect(res, 404, what)
        elif view["user"] != who:
            self.expect(res, 403, what)
        elif view["state"] not in OPEN:
            self.expect(res, 409, what)
        else:
            out = self.expect(res, 200, what)
            assert out["state"] == "closed", out
            self.acted(sid, out, actor)

    @precondition(lambda self: self.order)
    @rule(who=st.sampled_from(PLAIN_ENGINEERS), n=st.integers(0, 10**6),
          op=st.sampled_from(["get", "extend", "config", "close", "activate", "review", "approve"]))
    @recorded
    def peek(self, who, n, op):
        """An engineer reaches for someone else's session: every door answers 404, and nothing changes
        (the audit after the step would see a change)."""
        actor = self.actor(who)
        sid = self.pick(n)
        view = self.sessions[sid].cur
        if actor.disabled or view["user"] == who:
            return
        method, path, body, step_up = {
            "get": ("GET", "", None, False),
            "extend": ("POST", "/extend", {"by": "10m", "reason_code": "fault-still-open"}, True),
            "config": ("GET", "/config", None, False),
            "close": ("POST", "/close", {}, False),
            "activate": ("POST", "/activate", {}, True),
            "review": ("POST", "/review", {"note": "looks fine to me"}, True),
            "approve": ("POST", "/approve", {"reason": "looks fine to me"}, True),
        }[op]
        res = self.send(actor, method, f"/sessions/{sid}{path}", self.world.headers(actor, step_up), json=body)
        self.expect(res, 404, f"{who} tries {op} on {view['user']}'s session {sid}")
        mine = self.expect(self.send(actor, "GET", "/sessions", self.world.headers(actor), params={"scope": "all", "limit": 1000}),
                           200, f"{who} lists sessions")
        assert {s["user"] for s in mine} <= {who}, f"{who} sees others' sessions: {sorted({s['user'] for s in mine})}"

    # ---- rules: ending and review ----

    @precondition(lambda self: self.order)
    @rule(who=st.sampled_from(ENDERS), n=st.integers(0, 10**6))
    @recorded
    def revoke(self, who, n):
        actor = self.actor(who)
        if actor.disabled:
            return
        sid = self.pick(n)
        view = self.sessions[sid].cur
        res = self.send(actor, "POST", f"/sessions/{sid}/revoke", self.world.headers(actor), json={"reason": "suspicious traffic"})
        what = f"{who} revokes {view['user']}'s {view['state']} session {sid}"
        if not self.may_see(actor, view):
            self.expect(res, 404, what)
        elif not actor.can(view["site"], "approver", "soc", "admin"):
            self.expect(res, 403, what)
        elif view["state"] not in OPEN:
            self.expect(res, 409, what)
        else:
            out = self.expect(res, 200, what)
            assert out["state"] == "revoked", out
            self.acted(sid, out, actor)

    @precondition(lambda self: any(t.creator_type == "break_glass.open" for t in self.sessions.values()))
    @rule(who=st.sampled_from(ENDERS), n=st.integers(0, 10**6))
    @recorded
    def review(self, who, n):
        actor = self.actor(who)
        if actor.disabled:
            return
        glass = [sid for sid in self.order if self.sessions[sid].creator_type == "break_glass.open"]
        opened = [sid for sid in glass if self.sessions[sid].cur["state"] != "denied"]
        sid = opened[(n // 4) % len(opened)] if opened and n % 4 else glass[n % len(glass)]
        view = self.sessions[sid].cur
        h = self.world.headers(actor, step_up=True)
        reviewer = self.may_see(actor, view) and actor.can(view["site"], "approver", "soc", "admin")
        res = self.send(actor, "POST", f"/sessions/{sid}/review", h, json={"note": "call log matches the incident"})
        what = f"{who} reviews {view['user']}'s {view['state']} break-glass session {sid}"
        if not self.may_see(actor, view):
            self.expect(res, 404, what)
        elif not reviewer:
            self.expect(res, 403, what)
        elif view["user"] == who:
            self.expect(res, 403, what)
            self.sessions[sid].events_due.append(("break_glass.review", "failure", "self_review"))
        elif view["reviewed_at"] or view["state"] == "denied":
            self.expect(res, 409, what)
        else:
            out = self.expect(res, 200, what)
            assert out["reviewed_by"] == who and out["state"] == view["state"], out
            self.sessions[sid].events_due.append(("break_glass.review", "success", None))
            self.acted(sid, out, actor)

    @precondition(lambda self: self.order)
    @rule(device=st.sampled_from(sorted(DEVICES)), who=st.sampled_from(("soc1", "apr2", "eng1")))
    @recorded
    def access_history(self, device, who):
        """Who had access to the device since this example began: exactly its sessions there that were opened."""
        actor = self.actor(who)
        if actor.disabled:
            return
        params = {"from": datetime.fromtimestamp(self.started, UTC).isoformat(),
                  "to": datetime.fromtimestamp(self.world.now + 1, UTC).isoformat()}
        res = self.send(actor, "GET", f"/devices/{device}/access", self.world.headers(actor), params=params)
        if not actor.can(DEVICES[device], "approver", "soc", "admin", "site_admin"):
            self.expect(res, 403, f"{who} asks who had access to {device}")  # they see the device, not its history
            return
        got = {r["session_id"]: r for r in self.expect(res, 200, f"{who} asks who had access to {device}")}
        want = {sid: t.cur for sid, t in self.sessions.items() if t.cur["device"] == device and t.cur["activated_at"]}
        assert set(got) == set(want), f"access to {device}: the API names {sorted(got)}, the sessions opened there are {sorted(want)}"
        for sid, r in got.items():
            v = want[sid]
            approvers = sorted(a["approver"] for a in v["approvals"] if a["kind"] == "request" and a["verdict"] == "approve")
            assert (r["user"], r["break_glass"], sorted(r["approved_by"])) == (v["user"], v["break_glass"], approvers), (r, v)

    @precondition(lambda self: self.any_open())
    @rule(seconds=st.sampled_from([5, 60, 290, 600, 1200, 1800, 3000, 3700, 7200, 9 * 3600, 25 * 3600]))
    @recorded
    def time_passes(self, seconds):
        """The clock moves; the invariant's tick then expires, lapses and warns."""
        self.world.ctl.advance(seconds)

    # ---- rules: the admin ----

    @precondition(lambda self: self.any_open())
    @rule(who=st.sampled_from(DISABLEABLE))
    @recorded
    def account(self, who):
        """The admin disables the account, or enables it again if it is disabled."""
        actor = self.actor(who)
        disable = not actor.disabled
        res = self.world.client.post(f"{API}/users/{actor.person.user_id}/{'disable' if disable else 'enable'}",
                                     headers=self.world.admin(step_up=True))
        self.expect(res, 200, f"the admin {'disables' if disable else 'enables'} {who}")
        actor.disabled = disable
        actor.token = None  # disabling ends the person's logins; enabling does not bring them back

    @precondition(lambda self: self.any_open())
    @rule(n=st.integers(0, 1))
    @recorded
    def policy_change(self, n):
        """The admin applies another variant of the policy: a task removed, or back to all three."""
        variant = [v for v in sorted(VARIANTS) if v != self.world.variant][n]
        res = self.world.client.post(f"{API}/policy/apply", json={"files": policy_files(variant), "comment": f"variant {variant}"},
                                     headers=self.world.admin(step_up=True))
        self.expect(res, 200, f"the admin applies policy {variant}")
        self.world.variant = variant

    # ---- the invariants ----

    @invariant()
    @recorded
    def hold(self):
        """After each step: the nodes took every change, the clock turns, then everything is checked."""
        w = self.world
        for node in SITES.values():
            self.node_has_the_database_generation(node)
        w.ctl.tick()
        now = w.now
        views = self.observe()
        self.audit(views)
        for sid, view in views.items():
            self.approvals_single_use(sid, view)
        w.read_pushes(ended=self.ended)
        active = {sid: v for sid, v in views.items() if v["state"] == "active"}
        for sid, v in active.items():
            assert ts(v["end_at"]) > now, f"session {sid} is active {now - ts(v['end_at']):.0f} s past its end after a tick"
        for site, node in SITES.items():
            want = {sid for sid, v in active.items() if v["node"] == node}
            assert {sid for sid, v in active.items() if v["site"] == site} == want, "an active session has no lane on its site's node"
            held = w.ctl.nodes.lanes(node)
            desired = {lane["session_id"] for lane in w.desired(node)["lanes"]}
            for name, lanes in (("holds", held), ("is to hold, says the database,", desired)):
                assert lanes - w.residue[node] == want, f"node {node} {name} lanes {sorted(lanes)}; active sessions: {sorted(want)}"
            for lane in w.ctl.nodes.desired[node].lanes if want else []:
                v = active.get(lane.session_id)
                if v is not None:  # the agent enforces what the API shows: the end (extensions too), address, port
                    got = (lane.end_time.timestamp(), str(lane.engineer_address), lane.listen_port, str(lane.device_address))
                    assert got == (ts(v["end_at"]), v["tunnel_address"], v["listen_port"], v["device_address"]), (lane, v)
        self.leases_and_keys(active)
        for sid, v in views.items():
            if v["state"] in OPEN:
                assert not self.actor(v["user"]).disabled, f"{v['user']} is disabled, yet {v['state']} session {sid} is still open"
            if v["state"] == "active":
                assert v["task"] in self.tasks_now(), f"session {sid}'s task {v['task']} left the policy, yet it is still active"
        for sid, t in self.sessions.items():
            t.view = t.cur = views[sid]
            t.after_action, t.events_due = [], []
            if t.view["state"] in ENDED:
                self.ended.add(sid)

    def node_has_the_database_generation(self, node: str) -> None:
        """Before the tick: whatever a call changed reached the node when the call returned."""
        w = self.world
        desired = w.desired(node)
        held = w.ctl.nodes.desired.get(node)
        held_generation = held.generation if held else 0
        assert held_generation == desired["generation"], (
            f"node {node} holds generation {held_generation}; the database is at {desired['generation']}: a change was not pushed")
        lanes = [lane.model_dump(mode="json") for lane in held.lanes] if held else []
        assert lanes == desired["lanes"], f"node {node} holds {lanes} under generation {held_generation}; the database: {desired['lanes']}"

    def observe(self) -> dict[str, dict]:
        """Every session this example made, as the API shows it to the admin now."""
        w = self.world
        views = {v["id"]: v for v in w.open_sessions()}
        stray = set(views) - set(self.sessions) - self.world.residue["open"]
        assert not stray, f"open sessions no step of this example made: {sorted(stray)}"
        for sid, t in self.sessions.items():
            if sid not in views:
                views[sid] = w.session(sid) if (t.view is None or t.view["state"] in OPEN or t.after_action or t.events_due) else t.view
        return views

    def audit(self, views: dict[str, dict]) -> None:
        """Every state change has its event; every transition event is a change that happened."""
        events = self.world.new_events()
        by_subject: dict[str, list[dict]] = {}
        for e in events:
            by_subject.setdefault(e["subject"], []).append(e)
        for e in events:
            if e["type"] in TRANSITION_TYPES and (e["result"] == "success" or e["type"] in ("session.request", "break_glass.open")):
                assert e["subject"] in self.sessions, f"transition event for a session no step made: {e}"
        for sid, t in self.sessions.items():
            got = by_subject.get(sid, [])
            view = views[sid]
            for e in got:
                if e["type"] == "session.ending_soon":
                    t.warned_end = ts(e["body"]["end_at"])
            left = ts(view["end_at"]) - self.world.now if view["state"] == "active" else None
            if left is not None and 0 < left <= self.world.ctl.settings.warn_before_s:
                assert t.warned_end == ts(view["end_at"]), f"session {sid} ends in {left:.0f} s and its user was not warned"
            path = [(t.view["state"] if t.view else None, None)] + t.after_action + [(view["state"], "system")]
            want = []
            for (a, _), (b, actor) in zip(path, path[1:], strict=False):
                want += self.transition_events(sid, a, b, actor, t.creator_type)
                if a != b:
                    self.world.seen[f"transition {a} → {b}"] += 1
                    if b in ENDED:
                        self.world.seen[f"ended: {view['end_reason']}"] += 1
                if b == "active" and a != "active":
                    t.activations += 1
                if a == "active" and b != "active":
                    t.left_active = True
            old = t.view["approvals"] if t.view else []
            want += [("session.approve", "success", x["approver"]) for x in view["approvals"]
                     if x not in old and x["kind"] == "request" and x["verdict"] == "approve"]
            seen = [(e["type"], e["result"], e["actor"]) for e in got
                    if e["type"] in TRANSITION_TYPES and (e["result"] == "success" or e["type"] in ("session.request", "break_glass.open"))]
            assert Counter(seen) == Counter(want), (
                f"session {sid} went {' → '.join(str(s) for s, _ in path)}; its transition events are {seen}, expected {want}")
            for e in got:
                if e["type"] in TRANSITION_TYPES:
                    assert e["actor"], e
                    if e["result"] == "success" or e["type"] in ("session.request", "break_glass.open"):
                        assert e["body"].get("policy_version") and isinstance(e["body"].get("decision"), dict), (
                            f"event {e['type']} of {sid} lacks the policy version or decision: {e['body']}")
            for type_, result, reason in t.events_due:
                assert any(e["type"] == type_ and e["result"] == result and fnmatch(e["reason"] or "", reason or "") for e in got), (
                    f"no {type_} {result} event (reason {reason}) for {sid}: {[(e['type'], e['result'], e['reason']) for e in got]}")

    @staticmethod
    def transition_events(sid, a, b, actor, creator_type) -> list[tuple[str, str, str]]:
        """The transition events a move from state a to b by `actor` writes (approvals are counted apart)."""
        if a == b or (a, b) == ("pending_approval", "approved"):
            return []
        if a is None:
            if b == "denied":
                return [(creator_type, "failure", actor)]
            return [(creator_type, "success", actor)] + ([("session.activate", "success", actor)] if b == "active" else [])
        if (a, b) == ("pending_approval", "rejected"):
            return [("session.reject", "success", actor)]
        if (a, b) == ("approved", "active"):
            return [("session.activate", "success", actor)]
        if a in OPEN and b in END_TYPE and (b != "expired" or actor == "system"):
            return [(END_TYPE[b], "success", actor)]
        raise AssertionError(f"session {sid} moved {a} → {b} ({actor}): no such transition")

    def approvals_single_use(self, sid: str, view: dict) -> None:
        t = self.sessions[sid]
        if view["state"] == "active":
            assert not t.left_active, f"session {sid} is active again after it ended"
        assert t.activations <= 1, f"session {sid} was activated {t.activations} times"
        if t.view and t.view["activated_at"]:
            assert view["activated_at"] == t.view["activated_at"], f"session {sid} was activated a second time"
        pairs = [(a["kind"], a["approver"]) for a in view["approvals"]]
        assert len(pairs) == len(set(pairs)), f"an approver answered session {sid} twice: {pairs}"
        assert all(a["approver"] != view["user"] for a in view["approvals"]), f"{view['user']} approved their own {sid}"
        if view["activated_at"] and not view["break_glass"]:
            yes = {a["approver"] for a in view["approvals"] if a["kind"] == "request" and a["verdict"] == "approve"}
            assert len(yes) >= view["approvals_required"], f"{sid} was activated with {len(yes)} of {view['approvals_required']} approvals"

    def leases_and_keys(self, active: dict[str, dict]) -> None:
        with self.world.factory() as s:
            leases = s.execute(select(LaneLease.session_id, LaneLease.address, LaneLease.port, AccessSession.state)
                               .join(AccessSession, AccessSession.id == LaneLease.session_id)
                               .where(LaneLease.session_id.in_(list(self.sessions)))).all()
            keys = s.execute(select(AccessSession.id, AccessSession.state, AccessSession.key_mode, AccessSession.config_downloaded_at,
                                    AccessSession.sealed_private_key.is_not(None))
                             .where(AccessSession.id.in_(list(self.sessions)))).all()
        for sid, _, _, state in leases:
            assert state == "active", f"{state} session {sid} still holds a lease"
        held = {sid: (address, port) for sid, address, port, _ in leases}
        for sid, v in active.items():
            assert held.get(sid) == (v["tunnel_address"], v["listen_port"]), f"active {sid} holds {held.get(sid)}, shows {v}"
        for site in SITES:
            mine = [v for v in active.values() if v["site"] == site]
            for part in ("tunnel_address", "listen_port"):
                values = [v[part] for v in mine]
                assert len(values) == len(set(values)), f"two active sessions at {site} share a {part}: {values}"
        for sid, state, mode, downloaded, sealed in keys:
            if sealed:
                assert state == "active" and downloaded is None and mode == "minted", (
                    f"the minted private key of {state} session {sid} (downloaded: {downloaded}) is still in the database")
            elif state == "active" and mode == "minted" and downloaded is None:
                raise AssertionError(f"active session {sid}'s minted key went before its config was downloaded")


@pytest.fixture
def world(ctl):
    return World(ctl)


def test_session_machine(world):
    """The issue's state-machine test: random orders of every session action, invariants after each step."""
    run_seed = int(os.environ.get("WICKET_MACHINE_SEED") or random.getrandbits(32))

    @seed(run_seed)
    class Machine(SessionMachine):
        pass

    Machine.world = world
    try:
        run_state_machine_as_test(Machine, settings=machine_settings(world.ctl.settings.database_url.split(":")[0].split("+")[0]))
    except BaseException as exc:
        print(f"session machine failed: replay with WICKET_MACHINE_SEED={run_seed}")
        if world.first_failure and not isinstance(exc, AssertionError):
            raise AssertionError(world.first_failure) from exc
        raise
    finally:
        if os.environ.get("WICKET_MACHINE_STATS") == "1":
            print("\n".join(f"{n:6d}  {what}" for what, n in sorted(world.seen.items())))
