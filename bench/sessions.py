"""The controller's session path, side by side in one run; results go to docs/bench/sessions.json and the
sessions section of docs/benchmarks.md (the other sections are kept: bench.report).

  python -m bench.sessions [--levels 0,1000,4000] [--rounds 16] [--budget 60] [--change-max 1000] [--no-postgres]

One controller per level, each with one site and one node agent that already carries 0, 1 000 or 4 000
active sessions (by default), spread over 80 engineers and 500 RTUs. Those sessions are set up directly
in the database — the rows, leases and audit events an activation writes, with a real policy decision
for each device — and handed to the node once. The measured operations then go through the real API
(fastapi TestClient, step-up codes as tests/controller do it) and the real session clock:
  1. activation: POST /api/v1/sessions for iec104-diagnostics (no approval) → active, including the push
     of the node's whole desired state through an in-process link that validates it as the agent does
     (tests/controller/fakenode.FakeNodes) and the status read that finds the new lane's node key;
     where each activation's time goes; and, apart from the API, building, serialising and validating
     the desired state at each size;
  2. one session-clock tick: with nothing due (it still re-decides its batch of RECHECK_BATCH sessions in
     turn), with --expire sessions ending in it, and the tick right after a policy change, which decides
     every active session again once: one re-decision on a sample at every level, and the whole tick up to
     --change-max sessions (seconds per thousand sessions), projected by the report at every level;
  3. the one-time config download, and approving a request that needs one approver.
The levels take turns within each round, so that drift on a shared machine hits them alike. On SQLite,
and on PostgreSQL when WICKET_TEST_POSTGRES_URL is set (a scratch database per level, dropped after).
Bounded: once a backend's --budget seconds have passed, every measure stops after its minimum repetitions.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_section  # noqa: E402
from tests.controller.fakenode import FakeNodes  # noqa: E402

API = "/api/v1"
PASSWORD = "correct horse battery staple"
BASE = datetime(2026, 11, 25, 18, 0, tzinfo=UTC)  # the controller's clock at the start of every run
SITE, NODE = "bench-1", "edge-bench-1"
POOL, PORTS, LAN = "100.64.0.0/18", (40000, 59999), "10.20.0.0/16"  # 16 382 tunnel addresses, 20 000 ports
DEVICES, HOLDERS, PER_USER_LIMIT = 500, 80, 100
DIAG, ONE_APPROVER = "iec104-diagnostics", "bench-one-approver"
BENCH_TASKS = f"""\
wicket_policy: 1
tasks:
  {ONE_APPROVER}:
    title: IEC-104 work with one approver (bench)
    protocols: [iec104]
    device_types: [substation-rtu]
    roles: [engineer]
    duration: {{default: 30m, max: 1h}}
    approval: {{required: true}}
"""
PARTS = ("step_up", "decide", "lease", "desired_state", "node_push", "node_status")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.sessions")
    p.add_argument("--levels", default="0,1000,4000", help="active sessions already on the node, per controller")
    p.add_argument("--rounds", type=int, default=16, help="activations (and config downloads, approvals) per level")
    p.add_argument("--min-rounds", type=int, default=10)
    p.add_argument("--tick-reps", type=int, default=10)
    p.add_argument("--change-reps", type=int, default=2, help="ticks right after a policy change")
    p.add_argument("--change-max", type=int, default=1000, help="the largest level whose policy-change tick runs whole")
    p.add_argument("--recheck-sample", type=int, default=100, help="sessions re-decided one by one, per level")
    p.add_argument("--expire-reps", type=int, default=2)
    p.add_argument("--expire", type=int, default=100, help="sessions ending in one tick")
    p.add_argument("--state-reps", type=int, default=3, help="desired-state builds per level")
    p.add_argument("--budget", type=float, default=60.0, help="seconds per backend")
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the section from docs/bench/sessions.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    raw = out.parent / "bench" / "sessions.json"
    if args.report_only:
        write_section(out, "sessions", report(json.loads(raw.read_text())))
        return 0
    results = run(args)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1) + "\n")
    write_section(out, "sessions", report(results))
    print(json.dumps(results["summary"], indent=1))
    print(f"[bench] written to {out} and {raw}")
    return 0


def run(args) -> dict:
    from bench.policy import machine
    from controller.session_clock import RECHECK_BATCH
    from nodeagent.wire import MAX_LANES

    started = time.monotonic()
    levels = [int(x) for x in args.levels.split(",")]
    if levels != sorted(levels) or levels[0] != 0 or max(levels) + 1 > MAX_LANES or args.expire > max(max(levels), 1):
        raise SystemExit(f"levels: ascending from 0, at most {MAX_LANES - 1} (one activation on top); --expire at most the largest")
    results: dict = {"params": {k: v for k, v in vars(args).items() if k not in ("out", "report_only")}, "levels": levels,
                     "recheck_batch": RECHECK_BATCH, "load_before": os.getloadavg()[0], "backends": {}}
    results["backends"]["sqlite"] = bench_backend(args, levels, None, started)
    base = os.environ.get("WICKET_TEST_POSTGRES_URL")
    if args.no_postgres or not base:
        why = "--no-postgres" if args.no_postgres else "WICKET_TEST_POSTGRES_URL is not set"
        print(f"[bench] PostgreSQL skipped: {why}", flush=True)
        results["backends"]["postgresql"] = {"skipped": why}
    else:
        results["backends"]["postgresql"] = bench_backend(args, levels, base, started)
    results["machine"] = machine(results["backends"]["postgresql"].get("server"))
    results["load_after"] = os.getloadavg()[0]
    results["duration_s"] = round(time.monotonic() - started, 1)
    results = json.loads(json.dumps(results))  # level keys as strings, as report() reads them back from the file
    results["summary"] = summary(results)
    return results


def bench_backend(args, levels: list[int], pg_base: str | None, started: float) -> dict:
    from tests.pgscratch import scratch_database

    name = "postgresql" if pg_base else "sqlite"
    t0 = time.monotonic()
    budget = Budget(t0 + args.budget)
    with ExitStack() as stack:
        worlds = []
        for level in levels:
            url = stack.enter_context(scratch_database(pg_base, "wicket_bs")) if pg_base else None
            worlds.append(stack.enter_context(World(url, level)))
        _say(started, f"{name}: set up {', '.join(map(str, levels))} active sessions")
        for w in worlds:
            w.populate()
            w.fill(w.level)
        METER.install(worlds)
        # Three controllers and their fake nodes share this process; keep what they hold now out of the garbage
        # collector's full passes, which would otherwise walk it all (a controller process holds one of each).
        gc.collect()
        gc.freeze()
        stack.callback(gc.unfreeze)
        out: dict = {"setup_s": round(time.monotonic() - t0, 1)}
        if pg_base:
            for w in worlds:
                w.vacuum()
            out["server"] = worlds[0].server_version()
        _say(started, f"{name}: desired state by size")
        out["desired_state"] = {w.level: desired_state_costs(w, args.state_reps) for w in worlds}
        _say(started, f"{name}: API rounds")
        out["api"] = api_rounds(worlds, args, budget)
        _say(started, f"{name}: clock ticks")
        out["tick"] = ticks(worlds, args, budget)
        out["cpu_share"] = budget.cpu_share()
        out["duration_s"] = round(time.monotonic() - t0, 1)
        return out


# ---- what is measured ----


def api_rounds(worlds: list[World], args, budget: Budget) -> dict:
    """Each round, at every level in turn: an activation, its config download, and a request needing one
    approver and its approval. Afterwards (not timed) the approved request is closed through the API and the
    activated session is ended behind it, without a push of its own (at thousands of lanes that push costs
    as much as the activation): the next activation's push carries it. So the levels hold."""
    runs: dict = {w.level: {"activate": [], "parts": [], "config": [], "request_pending": [], "approve": []} for w in worlds}
    done = 0
    while budget.go(done, args.min_rounds, args.rounds):
        gc.collect()
        order = worlds[done % len(worlds):] + worlds[: done % len(worlds)]
        for w in order:
            w.t += 30  # a fresh TOTP step: each person steps up once per round
        for w in order:
            ask = {"device": w.device(done), "task": DIAG, "reason": "bench: WO-1"}
            dt, body = budget.timed(lambda w=w, ask=ask: w.post(w.eng, "/sessions", step_up=True, json=ask), parts=True)
            if body.get("state") != "active":
                raise SystemExit(f"[bench] the activation at level {w.level} answered {body}")
            runs[w.level]["activate"].append(dt)
            runs[w.level]["parts"].append(budget.parts | {"statements": budget.statements})
            w.sid = body["id"]
        for w in order:
            dt, text = budget.timed(lambda w=w: w.get(w.eng, f"/sessions/{w.sid}/config"))
            if "[Peer]" not in text:
                raise SystemExit(f"[bench] the config download at level {w.level} answered {text[:200]}")
            runs[w.level]["config"].append(dt)
        for w in order:
            w.end_behind(w.sid)
            ask = {"device": w.device(done + 1), "task": ONE_APPROVER, "reason": "bench: WO-2"}
            dt, body = budget.timed(lambda w=w, ask=ask: w.post(w.req, "/sessions", step_up=True, json=ask))
            if body.get("state") != "pending_approval":
                raise SystemExit(f"[bench] the request at level {w.level} answered {body}")
            runs[w.level]["request_pending"].append(dt)
            sid = body["id"]
            dt, body = budget.timed(lambda w=w, sid=sid: w.post(w.approver, f"/sessions/{sid}/approve", step_up=True,
                                                                 json={"reason": "bench: checked"}))
            if body.get("state") != "approved":
                raise SystemExit(f"[bench] the approval at level {w.level} answered {body}")
            runs[w.level]["approve"].append(dt)
            w.post(w.req, f"/sessions/{sid}/close", json={"reason": "bench"})
        done += 1
    for w in worlds:
        if w.active() != w.level:
            raise SystemExit(f"[bench] level {w.level} holds {w.active()} active sessions after the rounds")
    out = {}
    for level, r in runs.items():
        parts = {k: _ms(statistics.median(p.get(k, 0.0) for p in r["parts"])) for k in PARTS}
        parts["rest"] = _ms(statistics.median(a - sum(p.get(k, 0.0) for k in PARTS) for a, p in zip(r["activate"], r["parts"], strict=True)))
        out[level] = {k: latency(v) for k, v in r.items() if k != "parts"} | {"activate_parts_ms": parts}
        out[level]["activate_statements"] = statistics.median(p["statements"] for p in r["parts"])
        out[level]["activate_gc_ms"] = _ms(statistics.median(p.get("gc", 0.0) for p in r["parts"]))
    return out


def ticks(worlds: list[World], args, budget: Budget) -> dict:
    """One tick of the session clock: nothing due (the tick still re-decides its batch of sessions in turn),
    --expire sessions ending, and the tick right after a policy change, which decides every active session
    again. The last costs seconds per thousand sessions, so it runs whole only up to --change-max sessions;
    the report projects it at every level from one re-decision's cost, measured on --recheck-sample sessions."""
    import controller.session_clock as session_clock
    from controller.session_clock import RECHECK_BATCH

    # the whole re-decision after a policy change, in one tick: the clock itself spreads it over ticks
    session_clock.CHANGE_BATCH = 10**9
    out: dict = {w.level: {} for w in worlds}

    def rounds(kind: str, before, check, reps: int, least: int, among: list[World] = worlds) -> None:
        times: dict = {w.level: [] for w in among}
        parts: dict = {w.level: [] for w in among}
        done = 0
        while budget.go(done, least, reps):
            gc.collect()
            for w in among:
                before(w)
                dt, rep = budget.timed(w.clock.tick, parts=True)
                check(w, rep)
                times[w.level].append(dt)
                parts[w.level].append(budget.parts | {"statements": budget.statements, "rest": dt - budget.parts.get("recheck", 0.0)})
            done += 1
        for level, v in times.items():
            # where the tick's time went: its re-decisions, and the push of the nodes whose lanes changed
            med = {k: statistics.median(x.get(k, 0.0) for x in parts[level]) for k in ("statements", "recheck", "push", "rest")}
            out[level][kind] = latency(v) | {"statements": med["statements"], "recheck_ms": _ms(med["recheck"]),
                                             "push_ms": _ms(med["push"]), "without_recheck_ms": _ms(med["rest"])}

    def quiet(w, rep) -> None:
        moved = rep.expired + rep.lapsed + rep.revoked + rep.warned + rep.reminded
        if moved or rep.push_failures:
            raise SystemExit(f"[bench] a tick with nothing due at level {w.level} did something: {rep}")

    def in_turn(w) -> None:
        w.batch_from = w.clock._recheck_after

    def took_batch(w, rep) -> None:
        quiet(w, rep)
        if w.level > RECHECK_BATCH and w.clock._recheck_after == w.batch_from:
            raise SystemExit(f"[bench] the tick at level {w.level} did not move on through its re-decisions in turn")

    def due(w) -> None:
        w.trim(max(w.level, args.expire) - args.expire)  # level 0 holds none; the others hold level - expire
        w.fill(args.expire, ended=True)

    def expired(w, rep) -> None:
        if len(rep.expired) != args.expire or rep.revoked or rep.push_failures:
            raise SystemExit(f"[bench] the expiry tick at level {w.level}: {len(rep.expired)} expired, {rep}")

    def rechecked_all(w, rep) -> None:
        quiet(w, rep)
        if w.behind_policy():
            raise SystemExit(f"[bench] after the policy-change tick at level {w.level}, {w.behind_policy()} sessions "
                             "were not decided under the new version")

    rounds("nothing_due", in_turn, took_batch, args.tick_reps, 5)
    rounds("expire", due, expired, args.expire_reps, 1)
    for w in worlds:
        w.fill(w.level - w.active())
    for w in worlds:  # one re-decision, on a sample: as the tick's batch makes it, and right after a policy change
        if w.level:
            for kind, change in (("batch", False), ("change", True)):
                if change:
                    w.change_policy()
                dt, n = budget.timed(lambda w=w, change=change: w.recheck_sample(args.recheck_sample, change))
                out[w.level][f"recheck_{kind}_ms"] = _ms(dt / n)
                out[w.level][f"recheck_{kind}_statements"] = round(budget.statements / n, 1)
    small = [w for w in worlds if w.level <= args.change_max]
    rounds("policy_change", lambda w: w.change_policy(), rechecked_all, args.change_reps, 1, small)
    return out


def desired_state_costs(w: World, reps: int) -> dict:
    """The node's desired state at this size, apart from the API: the database read of its lanes' columns, the
    whole build (read + wire types, as the pusher does it), the JSON, the agent's validation of it, and
    the status the activation reads back (the fake agent builds one observed lane per lane)."""
    from sqlalchemy import select

    from controller import session_lanes
    from controller.models import AccessSession, SessionState
    from nodeagent.wire import AgentStatus, DesiredNodeState

    # the columns session_lanes.desired_state reads: what a lane needs
    lane_columns = (AccessSession.id, AccessSession.lane_revision, AccessSession.asset_id, AccessSession.engineer_public_key,
                    AccessSession.tunnel_address, AccessSession.device_address, AccessSession.flows, AccessSession.listen_port,
                    AccessSession.end_at)
    times: dict = {k: [] for k in ("read_rows", "build", "serialize", "validate", "status", "status_wire")}
    for _ in range(reps):
        gc.collect()
        with w.factory() as s:
            t0 = time.perf_counter()
            s.execute(select(*lane_columns).where(AccessSession.node == NODE, AccessSession.state == SessionState.active.value)
                      .order_by(AccessSession.id)).all()
            times["read_rows"].append(time.perf_counter() - t0)
        with w.factory() as s:
            t0 = time.perf_counter()
            desired = session_lanes.desired_state(s, NODE)
            times["build"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        text = desired.model_dump_json()
        times["serialize"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        DesiredNodeState.model_validate_json(text)
        times["validate"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        status = FakeNodes.status(w.nodes, NODE)
        times["status"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        AgentStatus.model_validate_json(status.model_dump_json())
        times["status_wire"].append(time.perf_counter() - t0)
    if len(desired.lanes) != w.level or len(status.lanes) != w.level:
        raise SystemExit(f"[bench] level {w.level}: the desired state has {len(desired.lanes)} lanes, the node {len(status.lanes)}")
    return {"lanes": w.level, "bytes": len(text), **{f"{k}_ms": _ms(statistics.median(v)) for k, v in times.items()}}


# ---- the world ----


class World:
    """An initialised controller (temporary directory; SQLite there, or the database at `url`) whose
    node holds `level` active sessions; its clock is `t` (seconds), moved by the bench."""

    def __init__(self, url: str | None, level: int):
        self.dir = Path(tempfile.mkdtemp(prefix="wicket-bench-sessions-"))
        self.url, self.level, self.t = url or f"sqlite:///{self.dir}/controller.db", level, BASE.timestamp()
        self.rng = random.Random(level)
        self.sid = ""

    def __enter__(self) -> World:
        from fastapi.testclient import TestClient
        from sqlalchemy import event

        from controller.app import create_app
        from controller.auth import Principal
        from controller.bootstrap import init
        from controller.settings import load

        try:
            settings = load({"WICKET_DATA_DIR": str(self.dir / "data"), "WICKET_DATABASE_URL": self.url,
                             "WICKET_SESSION_TICK_MS": "0"})
            init(settings, "root", "First Admin", PASSWORD)
            self.nodes = BenchNodes()
            self.app = create_app(settings, clock=lambda: self.t, link=self.nodes)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.client = TestClient(self.app)
        st = self.app.state
        event.listen(st.engine, "before_cursor_execute", METER.statement)
        self.factory, self.sessions, self.clock = st.auth.factory, st.sessions, st.session_clock
        self.admin = Principal(user_id=1, username="root", kind="internal", roles=(("admin", None),), token_hash="",
                               token_kind="bench", expires_at=BASE + timedelta(days=1))
        return self

    def __exit__(self, *exc) -> None:
        self.app.state.engine.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

    def populate(self) -> None:
        """Policy (the example's, the per-user limit raised, one task with one approver), the site and its
        node, the devices, the three people who call the API, and the engineers who hold the sessions."""
        from sqlalchemy import insert, select

        from controller.db import transaction
        from controller.devicecsv import COLUMNS, import_devices
        from controller.inventory_schemas import SiteCreate
        from controller.models import RoleGrant, User

        st = self.app.state
        st.policies.apply(self.admin, policy_files(), "bench policy", "bench")
        st.inventory.create_site(self.admin, SiteCreate(
            name=SITE, display_name="Bench site", time_zone="UTC", tunnel_pool=POOL, port_min=PORTS[0], port_max=PORTS[1],
            public_endpoint="203.0.113.1", lan_networks=[LAN]), "bench")
        st.inventory.add_agent(self.admin, SITE, NODE, "", "bench")
        seen = self.now().isoformat().replace("+00:00", "Z")
        rows = [{"asset_id": f"RTU-{i:05d}", "device_type": "substation-rtu", "site": SITE, "lifecycle": "active",
                 "addresses": f"10.20.{i // 250}.{i % 250 + 1}", "last_seen": seen} for i in range(DEVICES)]
        text = "\n".join(",".join(r.get(c, "") for c in COLUMNS) for r in [dict(zip(COLUMNS, COLUMNS, strict=True)), *rows])
        import_devices(st.inventory, self.admin, text + "\n", source="bench")
        self.eng, self.req, self.approver = (self._person(n, r) for n, r in (
            ("eng", "engineer"), ("req", "engineer"), ("appr", "approver")))
        self.t += 30  # the logins used this step's codes
        now = self.now()
        with transaction(self.factory) as s:
            pw = s.scalar(select(User.password_hash).where(User.username == "eng"))
            s.execute(insert(User), [{"username": f"holder-{i:02d}", "display_name": f"Holder {i}", "kind": "internal",
                                      "password_hash": pw, "created_at": now, "updated_at": now} for i in range(HOLDERS)])
            ids = s.scalars(select(User.id).where(User.username.like("holder-%")).order_by(User.username)).all()
            s.execute(insert(RoleGrant), [{"user_id": u, "role": "engineer", "site": SITE, "granted_by": 1, "granted_at": now}
                                          for u in ids])
        self.holders = list(zip(ids, [f"holder-{i:02d}" for i in range(HOLDERS)], strict=True))
        self._decisions: dict[str, object] = {}

    def _person(self, username: str, role: str) -> dict:
        st = self.app.state
        user = st.users.create(self.admin, username=username, display_name=username, password=PASSWORD,
                               roles=[(role, SITE)], source="bench")
        secret = re.search(r"secret=([A-Z2-7]+)", st.users.enrol_totp(self.admin, user.id).otpauth_uri).group(1)
        person = {"username": username, "secret": secret}
        res = self.client.post(f"{API}/auth/login", json={"username": username, "password": PASSWORD, "totp_code": self.code(person)})
        if res.status_code != 200:
            raise SystemExit(f"[bench] login of {username}: {res.status_code} {res.text}")
        person["token"] = res.json()["token"]
        return person

    def code(self, person: dict) -> str:
        import pyotp

        return pyotp.TOTP(person["secret"]).at(self.t)

    def device(self, n: int) -> str:
        return f"RTU-{n * 7 % DEVICES:05d}"

    # ---- calls (the measured path) ----

    def post(self, person: dict, path: str, *, step_up: bool = False, json: dict) -> dict:
        headers = {"Authorization": f"Bearer {person['token']}"} | ({"X-Wicket-TOTP": self.code(person)} if step_up else {})
        return self.client.post(API + path, json=json, headers=headers).json()

    def get(self, person: dict, path: str) -> str:
        return self.client.get(API + path, headers={"Authorization": f"Bearer {person['token']}"}).text

    # ---- set-up behind the API ----

    def fill(self, count: int, *, ended: bool = False, push: bool = True) -> None:
        """`count` more active sessions on the node, written as an activation writes them: the session row
        (a real decision for its device, the lease, a minted key whose config was downloaded), its lease,
        its request and activation events, the node's generation bumped; then handed to the node (unless not
        `push`). They end 50–60 min from now, or (`ended`) a second ago."""
        from sqlalchemy import insert, select

        from controller import session_lanes
        from controller.db import transaction
        from controller.models import AccessSession, Event, LaneLease, SessionState, Site
        from controller.sessions import _flows, new_id

        if count <= 0:
            return
        now = self.now()
        with transaction(self.factory) as s:
            site = s.scalar(select(Site).where(Site.name == SITE))
            held = s.execute(select(LaneLease.address, LaneLease.port).where(LaneLease.site_id == site.id)).all()
            used_addresses, used_ports = {a for a, _ in held}, {p for _, p in held}
            hosts = (str(h) for h in ipaddress.ip_network(POOL).hosts())
            addresses = [h for h in hosts if h not in used_addresses][:count] if count else []
            ports = self.rng.sample(sorted(set(range(PORTS[0], PORTS[1] + 1)) - used_ports), count)
            sessions, leases, events = [], [], []
            for i, (address, port) in enumerate(zip(addresses, ports, strict=True)):
                sid, (uid, username) = new_id(), self.holders[self.rng.randrange(HOLDERS)]
                asset = f"RTU-{self.rng.randrange(DEVICES):05d}"
                decision = self._decision(asset, uid)
                end = now - timedelta(seconds=1) if ended else now + timedelta(seconds=3000 + (i * 37) % 600)
                activated = end - timedelta(hours=1)
                sessions.append({
                    "id": sid, "user_id": uid, "username": username, "asset_id": asset, "site": SITE, "node": NODE, "task": DIAG,
                    "reason": "bench: held", "break_glass": False, "state": SessionState.active.value, "duration_s": 3600,
                    "approvals_required": 0, "policy_version": decision.policy_version, "decision": decision.as_dict(),
                    "recording": decision.recording or "metadata", "requested_at": activated, "approved_at": activated,
                    "expires_at": activated + timedelta(hours=1), "activated_at": activated, "end_at": end,
                    "checked_policy": decision.policy_version, "extensions": [], "flows": _flows(decision.access),
                    "key_mode": "minted", "engineer_public_key": session_lanes.mint_keypair()[1],
                    "node_public_key": session_lanes.mint_keypair()[1], "tunnel_address": address,
                    "device_address": decision.access[0].address, "listen_port": port, "lane_revision": 1,
                    "config_downloaded_at": activated + timedelta(seconds=20)})
                leases.append({"session_id": sid, "site_id": site.id, "address": address, "port": port})
                context = {"session_id": sid, "user": username, "device": asset, "site": SITE, "task": DIAG, "break_glass": False}
                for type_, at in (("session.request", activated), ("session.activate", activated)):
                    events.append({"at": at, "category": "session", "type": type_, "result": "success", "actor_id": uid,
                                   "actor": username, "subject": sid, "body": {**context, "state": "active"}})
            s.execute(insert(AccessSession), sessions)
            s.execute(insert(LaneLease), leases)
            s.execute(insert(Event), events)
            session_lanes.bump(s, NODE)
        if push:
            self.sessions.pusher.push(NODE)

    def trim(self, keep: int) -> None:
        """Remove the held sessions beyond `keep` (with their leases), as if they had never been; not pushed."""
        from sqlalchemy import delete, select

        from controller import session_lanes
        from controller.db import transaction
        from controller.models import AccessSession, LaneLease, SessionState

        with transaction(self.factory) as s:
            ids = s.scalars(select(AccessSession.id).where(AccessSession.node == NODE, AccessSession.reason == "bench: held",
                                                           AccessSession.state == SessionState.active.value)
                            .order_by(AccessSession.id)).all()[keep:]
            for i in range(0, len(ids), 500):
                s.execute(delete(LaneLease).where(LaneLease.session_id.in_(ids[i:i + 500])))
                s.execute(delete(AccessSession).where(AccessSession.id.in_(ids[i:i + 500])))
            session_lanes.bump(s, NODE)

    def end_behind(self, sid: str) -> None:
        """Close a session as `Sessions.close` writes it (state, lease, generation), without its event or push."""
        from controller import session_lanes
        from controller.db import transaction
        from controller.models import AccessSession, SessionState

        with transaction(self.factory) as s:
            row = s.get(AccessSession, sid)
            row.state, row.ended_at, row.end_reason, row.ended_by = SessionState.closed.value, self.now(), "closed_by_engineer", "eng"
            row.sealed_private_key = row.expires_at = None
            session_lanes.release(s, sid)
            session_lanes.bump(s, NODE)

    def recheck_sample(self, n: int, changed: bool) -> int:
        """Re-decide `n` active sessions one by one as the tick does: held against the newest policy version
        already (the batch in turn; nothing written), or (`changed`) still against an older one (the
        version written). How many."""
        from sqlalchemy import select

        from controller.models import AccessSession, SessionState

        version, now = self.app.state.policies.active().version, self.now()
        with self.factory() as s:
            held = AccessSession.checked_policy != version if changed else AccessSession.checked_policy == version
            ids = s.scalars(select(AccessSession.id).where(AccessSession.state == SessionState.active.value, held)
                            .order_by(AccessSession.id).limit(n)).all()
        if len(ids) < min(n, self.level):
            raise SystemExit(f"[bench] level {self.level}: only {len(ids)} sessions to re-decide (changed: {changed})")
        for sid in ids:
            if self.clock._recheck(sid, version, now) is not None:
                raise SystemExit(f"[bench] re-deciding {sid} at level {self.level} would revoke it")
        return len(ids)

    def change_policy(self) -> None:
        """Apply a new policy version that allows what the old one did (one task's title changes)."""
        self.changes = getattr(self, "changes", 0) + 1
        self.app.state.policies.apply(self.admin, policy_files(self.changes), f"bench change {self.changes}", "bench")

    def behind_policy(self) -> int:
        """Active sessions not yet decided under the newest policy version."""
        from sqlalchemy import func, select

        from controller.models import AccessSession, SessionState

        version = self.app.state.policies.active().version
        with self.factory() as s:
            return s.scalar(select(func.count()).select_from(AccessSession).where(
                AccessSession.state == SessionState.active.value, AccessSession.checked_policy != version))

    def _decision(self, asset: str, user_id: int):
        """The policy's decision for this device (the holders' grants are alike), made once per device."""
        if asset not in self._decisions:
            d = self.app.state.decisions.decide(user_id=user_id, asset_id=asset, task=DIAG, duration=timedelta(hours=1),
                                                source=None, at=self.now())
            if d.outcome != "allow":
                raise SystemExit(f"[bench] the policy does not allow the held sessions: {d.reason}")
            self._decisions[asset] = d
        return self._decisions[asset]

    def active(self) -> int:
        from sqlalchemy import func, select

        from controller.models import AccessSession, SessionState

        with self.factory() as s:
            return s.scalar(select(func.count()).select_from(AccessSession).where(AccessSession.state == SessionState.active.value))

    def vacuum(self) -> None:
        from sqlalchemy import text

        with self.app.state.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))

    def server_version(self) -> str:
        from sqlalchemy import text

        with self.factory() as s:
            return s.execute(text("SHOW server_version")).scalar()


class BenchNodes(FakeNodes):
    """FakeNodes that time the push and the status read for the breakdown, and keep no push history (at
    thousands of lanes a state, the list would grow by megabytes a push)."""

    def push(self, desired):
        t0 = time.perf_counter()
        try:
            return super().push(desired)
        finally:
            self.pushes.clear()
            METER.add("node_push", time.perf_counter() - t0)

    def status(self, node):
        t0 = time.perf_counter()
        try:
            return super().status(node)
        finally:
            METER.add("node_status", time.perf_counter() - t0)


def policy_files(change: int = 0) -> dict[str, str]:
    files = {p.name: p.read_text() for p in sorted((REPO / "docs" / "policy-example").glob("*.yaml"))}
    limits = files["windows-and-locations.yaml"]
    raised = re.sub(r"concurrent_sessions_per_user: \d+", f"concurrent_sessions_per_user: {PER_USER_LIMIT}", limits)
    if raised == limits:
        raise SystemExit("[bench] the example policy no longer sets concurrent_sessions_per_user")
    tasks = BENCH_TASKS.replace("(bench)", f"(bench, change {change})") if change else BENCH_TASKS
    return files | {"windows-and-locations.yaml": raised, "bench.yaml": tasks}


# ---- timing ----


class Meter:
    """Time spent inside named steps of the activation path, summed while one measured call runs. The
    steps are wrapped in place once (module functions, and each controller's own objects)."""

    def __init__(self):
        self.spent: Counter = Counter()
        self.on = False
        self.statements = 0  # SQL statements sent by any of the controllers (pings and commits not counted)
        self._gc_start = 0.0

    def statement(self, *_a) -> None:
        self.statements += 1

    def collector(self, phase: str, _info: dict) -> None:
        """gc.callbacks: the garbage collector's pauses, which fall inside the timed steps (reported apart)."""
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self.on:
            self.spent["gc"] += time.perf_counter() - self._gc_start

    def add(self, key: str, seconds: float) -> None:
        if self.on:
            self.spent[key] += seconds

    def wrap(self, key: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(key, time.perf_counter() - t0)
        return timed

    def install(self, worlds: list[World]) -> None:
        from controller import session_lanes

        if self.collector not in gc.callbacks:
            gc.callbacks.append(self.collector)
        if not getattr(session_lanes.lease, "_bench", False):
            for name in ("lease", "desired_state"):
                fn = self.wrap(name, getattr(session_lanes, name))
                fn._bench = True
                setattr(session_lanes, name, fn)
        for w in worlds:
            st = w.app.state
            st.decisions.decide = self.wrap("decide", st.decisions.decide)
            st.auth.step_up = self.wrap("step_up", st.auth.step_up)
            w.clock._recheck = self.wrap("recheck", w.clock._recheck)
            st.sessions.pusher.push = self.wrap("push", st.sessions.pusher.push)


METER = Meter()


class Budget:
    """Repetitions, stopped early (after each measure's minimum) once the deadline has passed; and this
    process's CPU time over the wall time of what it timed (near 1.0 on SQLite when the bench had a core
    to itself)."""

    def __init__(self, deadline: float):
        self.deadline, self.cpu, self.wall, self.parts, self.statements = deadline, 0.0, 0.0, {}, 0

    def go(self, done: int, least: int, most: int) -> bool:
        return done < most and (done < least or time.monotonic() < self.deadline)

    def timed(self, fn, parts: bool = False):
        METER.spent.clear()
        METER.on = parts
        s0, c0, t0 = METER.statements, time.process_time(), time.perf_counter()
        try:
            out = fn()
        finally:
            wall, METER.on = time.perf_counter() - t0, False
        self.statements = METER.statements - s0
        self.cpu += time.process_time() - c0
        self.wall += wall
        self.parts = dict(METER.spent)
        return wall, out

    def cpu_share(self) -> float:
        return round(self.cpu / self.wall, 2) if self.wall else 0.0


def latency(times: list[float]) -> dict:
    """Median and p95 (nearest rank: the ceil(0.95 n)-th fastest, which is the slowest run up to n = 19)."""
    ordered = sorted(times)
    p95 = ordered[math.ceil(0.95 * len(ordered)) - 1]
    return {"median_ms": _ms(statistics.median(times)), "p95_ms": _ms(p95), "n": len(times), "runs_ms": [_ms(t) for t in times]}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _say(started: float, what: str) -> None:
    print(f"[bench] {time.monotonic() - started:5.1f} s  {what}", flush=True)



# ---- the report ----


def summary(r: dict) -> dict:
    """The headline figures per backend; level keys are strings (as in the JSON)."""
    levels = [str(x) for x in r["levels"]]
    lo, hi = levels[0], levels[-1]
    out = {}
    for name, b in r["backends"].items():
        if "skipped" in b:
            out[name] = {"skipped": b["skipped"]}
            continue
        api, tick, state = b["api"], b["tick"], b["desired_state"]
        # the tick with nothing due, its batch's re-decisions (nothing written) taken out, and one re-decision
        # (the version written) for every active session
        projected = {lv: round(tick[lv]["nothing_due"]["without_recheck_ms"] + int(lv) * tick[lv].get("recheck_change_ms", 0.0), 1)
                     for lv in levels}
        out[name] = {
            "activate_median_ms": {lv: api[lv]["activate"]["median_ms"] for lv in levels},
            "activate_p95_ms": {lv: api[lv]["activate"]["p95_ms"] for lv in levels},
            f"activate_ratio_{hi}_over_{lo}": round(api[hi]["activate"]["median_ms"] / api[lo]["activate"]["median_ms"], 2),
            "activate_growth_ms_per_lane": round((api[hi]["activate"]["median_ms"] - api[lo]["activate"]["median_ms"]) / int(hi), 3),
            "state_build_send_ms": {lv: round(state[lv]["build_ms"] + state[lv]["serialize_ms"] + state[lv]["validate_ms"], 1)
                                    for lv in levels},
            "config_median_ms": {lv: api[lv]["config"]["median_ms"] for lv in levels},
            "approve_median_ms": {lv: api[lv]["approve"]["median_ms"] for lv in levels},
            "tick_nothing_due_ms": {lv: tick[lv]["nothing_due"]["median_ms"] for lv in levels},
            "tick_expire_ms": {lv: tick[lv]["expire"]["median_ms"] for lv in levels},
            "tick_policy_change_ms": {lv: tick[lv]["policy_change"]["median_ms"] for lv in levels if "policy_change" in tick[lv]},
            "tick_policy_change_projected_ms": projected,
        }
    return out


def report(r: dict) -> str:
    """The sessions section of docs/benchmarks.md, from the raw results."""
    m, a, s = r["machine"], r["params"], r["summary"]
    levels = [str(x) for x in r["levels"]]
    lo, hi = levels[0], levels[-1]
    backends = [(n, b) for n, b in r["backends"].items() if "skipped" not in b]
    skipped = [f"{n} was skipped ({b['skipped']})" for n, b in r["backends"].items() if "skipped" in b]
    names = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
    cpu = ", ".join(f"{names[n]} {b['cpu_share']}" for n, b in backends)
    n_act = {n: b["api"][lo]["activate"]["n"] for n, b in backends}
    text = f"""## Sessions: activation, the session clock, config download and approval

Generated by `make bench-sessions` (`python -m bench.sessions`) on {m['date']}; every number in this section
comes from that one run (raw numbers and every run: `docs/bench/sessions.json`). Machine: {m['cpus']} × {m['cpu']},
Linux {m['kernel']}, Python {m['python']}, SQLite {m['sqlite']}, PostgreSQL {m['postgresql'] or 'not measured'}, SQLAlchemy
{m['sqlalchemy']}, pydantic {m['pydantic']}. Whole run: {r['duration_s']} s. Load average {r['load_before']:.1f} at the start and
{r['load_after']:.1f} at the end; the bench's CPU time over the wall time it measured: {cpu} (1.0: it had a core to
itself; lower: other work took turns with it, and every figure here is that much slower).{' ' + '; '.join(skipped) + '.' if skipped else ''}

**Set-up.** One controller per level, each with one site (tunnel pool `{POOL}`, ports {PORTS[0]}–{PORTS[1]}), one
node agent, {DEVICES} RTUs, and the example policy with `concurrent_sessions_per_user` raised to {PER_USER_LIMIT} plus one
task that needs one approver. The node already carries {', '.join(f'{int(x):,}' for x in levels)} active sessions
(`iec104-diagnostics`, ending 50–60 min ahead, spread over {HOLDERS} engineers). Those are written straight into the
database — the rows, leases and audit events an activation writes, with the policy's real decision for each
device — and handed to the node once; nothing else bypasses the controller.

**What is timed.** The real API path, through FastAPI's TestClient: a login token, a fresh TOTP code for each
step-up (the controller's clock moves 30 s a round, as the controller tests do), the route, the `Sessions`
service, the database, and the link to the node. The link is in-process (`tests/controller/fakenode.FakeNodes`)
but does what the agent's side does to a message: the desired state goes to JSON and back through the wire types
(`nodeagent.wire.DesiredNodeState`, every lane validated), and the status read returns every lane the node
holds. Nothing of the data plane is in these numbers (see *Lanes on one node agent* above). Each round, the
levels take turns; medians of {', '.join(f'{v} ({names[n]})' for n, v in n_act.items())} rounds. The p95 is by nearest rank: with
fewer than 20 runs, it is the slowest one.

### Activation: `POST /api/v1/sessions` → active

A task allowed without approval, so the request is decided, written, activated (decided again, a lease, the
node's generation bumped) and pushed in one call. Milliseconds:

| active sessions on the node | {' | '.join(f'{names[n]} median | {names[n]} p95' for n, _ in backends)} |
|---|{'---|---|' * len(backends)}
"""
    for lv in levels:
        cells = " | ".join(f"{b['api'][lv]['activate']['median_ms']} | {b['api'][lv]['activate']['p95_ms']}" for _, b in backends)
        text += f"| {int(lv):,} | {cells} |\n"
    ratio = ", ".join(f"{names[n]} **{s[n][f'activate_ratio_{hi}_over_{lo}']}**" for n, _ in backends)
    per_lane = ", ".join(f"{names[n]} {s[n]['activate_growth_ms_per_lane'] * 1000:.0f} µs" for n, _ in backends)
    text += f"""
Median ratio {int(hi):,} / {int(lo):,} active sessions: {ratio}. Each lane already on the node adds about {per_lane}
to an activation.

Where an activation's time goes (medians, ms; the steps are timed in place, "rest" is the HTTP round trip,
the login check and the service's own transactions and audit events); the garbage collector's pauses, which
fall inside those steps; and the SQL statements an activation sends (pings and commits not counted):

| backend | active | step-up | 2 decisions | lease | desired state: read + build | push: JSON + agent validation | status read | rest | GC pauses within | statements |
|---|---|---|---|---|---|---|---|---|---|---|
"""
    for n, b in backends:
        for lv in levels:
            p, x = b["api"][lv]["activate_parts_ms"], b["api"][lv]
            text += (f"| {names[n]} | {int(lv):,} | {p['step_up']} | {p['decide']} | {p['lease']} | {p['desired_state']} | "
                     f"{p['node_push']} | {p['node_status']} | {p['rest']} | {x['activate_gc_ms']} | {x['activate_statements']:g} |\n")
    text += f"""
### The node's desired state, by size

Apart from the API, medians of {a['state_reps']} (ms): reading the lane columns of the node's active sessions; the
whole build as the pusher does it (that read, then one `LaneSpec` per lane); `model_dump_json`; the agent's
`DesiredNodeState.model_validate_json`; the fake agent's status (one observed lane per lane) and that status
through JSON and back, as a remote link would carry it.

| backend | lanes | JSON bytes | read rows | build | serialise | agent validation | status | status over the wire |
|---|---|---|---|---|---|---|---|---|
"""
    for n, b in backends:
        for lv in levels:
            d = b["desired_state"][lv]
            text += (f"| {names[n]} | {d['lanes']:,} | {d['bytes']:,} | {d['read_rows_ms']} | {d['build_ms']} | {d['serialize_ms']} | "
                     f"{d['validate_ms']} | {d['status_ms']} | {d['status_wire_ms']} |\n")
    sq = backends[0][1]["desired_state"][hi]
    batch = r["recheck_batch"]
    both = [(n, lv) for n, _ in backends for lv in levels if int(lv) and lv in s[n]["tick_policy_change_ms"]]
    check = (" Where both exist, the projection " + ", ".join(
        f"{'overstates' if s[n]['tick_policy_change_projected_ms'][lv] >= s[n]['tick_policy_change_ms'][lv] else 'understates'} the "
        f"measured tick by {abs(s[n]['tick_policy_change_projected_ms'][lv] / s[n]['tick_policy_change_ms'][lv] - 1) * 100:.0f} % "
        f"({names[n]}, {int(lv):,} sessions)" for n, lv in both) + ".") if both else ""
    tick0, api0 = backends[0][1]["tick"][hi], backends[0][1]["api"]
    per_end = round((tick0["expire"]["statements"] - tick0["nothing_due"]["statements"]) / a["expire"])
    change_at_hi = {n: s[n]["tick_policy_change_projected_ms"][hi] / 1000 for n, _ in backends}
    read_share = sq["read_rows_ms"] / (sq["build_ms"] + sq["serialize_ms"] + sq["validate_ms"])
    gc_text = " and ".join(f"{b['api'][hi]['activate_gc_ms']:.0f} of an activation's {b['api'][hi]['activate']['median_ms']:.0f} ms on {names[n]}"
                           for n, b in backends)
    gc_growth = round(api0[hi]["activate_gc_ms"] / max(api0[levels[1]]["activate_gc_ms"], 0.01), 1) if len(levels) > 2 else "–"
    growth20 = " and ".join(f"{s[n]['activate_growth_ms_per_lane'] * 20:.0f} ms on {names[n]}" for n, _ in backends)
    state_share = " and ".join(
        f"{sum(b['api'][hi]['activate_parts_ms'][k] for k in ('desired_state', 'node_push', 'node_status')) / b['api'][hi]['activate']['median_ms'] * 100:.0f} %"
        f"{' of an activation' if i == 0 else ''} on {names[n]}" for i, (n, b) in enumerate(backends))
    mid = levels[1] if len(levels) > 2 else hi

    def over_empty(b, lv, gc_out=False):  # an activation's cost above the empty node's, less the collector's pauses
        x = b["api"]
        return x[lv]["activate"]["median_ms"] - x[lo]["activate"]["median_ms"] - (x[lv]["activate_gc_ms"] if gc_out else 0.0)

    steeper = "; ".join(f"{names[n]} × {over_empty(b, hi) / over_empty(b, mid):.1f}, without the pauses × "
                        f"{over_empty(b, hi, True) / over_empty(b, mid, True):.1f}" for n, b in backends)
    ticks_of = {n: b["tick"] for n, b in backends}
    batch_flat = " and ".join(f"{ticks_of[n][mid]['nothing_due']['recheck_ms']:.0f} → {ticks_of[n][hi]['nothing_due']['recheck_ms']:.0f} ms on {names[n]}"
                              for n, _ in backends)
    rest = {n: {lv: ticks_of[n][lv]["nothing_due"]["without_recheck_ms"] for lv in levels} for n, _ in backends}
    rest_text = " and ".join(f"{rest[n][lo]:.0f} → {rest[n][mid]:.0f} → {rest[n][hi]:.0f} ms on {names[n]} (about "
                             f"{(rest[n][hi] - rest[n][lo]) / int(hi) * 1000:.0f} µs per open session)" for n, _ in backends)
    one_each = " and ".join(f"{ticks_of[n][mid].get('recheck_batch_ms', 0)} → {ticks_of[n][hi].get('recheck_batch_ms', 0)} ms on {names[n]}"
                            for n, _ in backends)
    stmts = " / ".join(f"{ticks_of[backends[0][0]][lv]['nothing_due']['statements']:g}" for lv in levels)
    busy = " and ".join(f"{ticks_of[n][hi]['nothing_due']['recheck_ms']:.0f} ms ({names[n]})" for n, _ in backends)
    text += f"""
**What grows with the lanes on a node, and why.** The desired state is level-triggered: every change to a node's
lanes (an activation, an end, an extension) makes the controller rebuild the node's whole state from the
database — every active lane on that node — and send all of it; the agent validates every lane; and the activation
then reads the node's status, every lane again, to find the new lane's node key. So an activation costs time in
proportion to the lanes already on its node: at {int(hi):,} lanes the state is {sq['bytes'] / 1e6:.1f} MB of JSON, and
reading, building and pushing it and reading the status back take {state_share}.
`session_lanes.desired_state` reads only the nine columns a lane needs; that read is {read_share * 100:.0f} % of building,
sending and validating the state ({names[backends[0][0]]}), the rest is Python: one `LaneSpec` per lane, its JSON, and the
agent's validation. The lease is linear too (`session_lanes.lease` reads every lease at the site and walks the pool
from its first address), and so is the count of the node's active lanes that enforces `MAX_LANES` at activation;
both are small beside the state. The step-up and the decisions do not grow.

The growth is a little steeper than the lanes, because of the garbage collector. Building a state allocates
several Python objects per lane (rows, decoded flow lists, wire models, their strings and times) that all live
until the push, and CPython's collector keeps walking that growing set while it is built. At {int(hi):,} lanes
its pauses took {gc_text}; from {int(mid):,} to {int(hi):,} lanes they grew × {gc_growth} ({names[backends[0][0]]}). Over
those × {int(hi) / int(mid):g} lanes, an activation's cost above the empty node's grew {steeper}. The pauses are the
controller's own: the bench keeps its set-up (three controllers in one process) out of the collector with `gc.freeze`.

A node with {int(hi):,} lanes is far beyond a real site: an edge router serves one substation or one group of meter
concentrators — tens of devices — and carries a handful of sessions at once; at 20 lanes the per-lane figure above
(which the collector inflates at thousands) comes to at most {growth20}. A node takes at most `MAX_LANES` = 4,096
lanes: the agent refuses a larger state, and the controller refuses the activation (409) that would pass it. The
levels here stop below it (one activation on top of {int(hi):,}).

### The session clock: one tick

The clock ticks every second. Each tick reads every open session with its user and device in one query (disabled
users, devices out of service, a newer policy), and besides re-decides the next {batch} active sessions in turn (a
role taken away or a location rule's networks edited leave no trace the cheaper checks would see): at
{int(hi):,} sessions the round comes back to a session every {int(hi) / batch:.0f} s. "Nothing due": no session ends,
lapses or is warned, only that batch. "{a['expire']} end": that many of the node's active sessions (of those in the
level; {a['expire']} at level 0) reach their end in the tick. "Re-decisions" and "push": the part of the tick spent
re-deciding sessions, and pushing the node's desired state. "Policy change": the tick right after a new policy
version is applied, which decides every active session again once. "One re-decision": its cost, on a sample of
{a['recheck_sample']} sessions, as the batch makes it (the session already holds under the newest version: nothing
is written) and after a policy change (the new version is written). The policy-change tick is measured whole up
to {a['change_max']:,} sessions (it takes seconds per thousand); at every level it is also projected: the tick with
nothing due without its re-decisions, plus the level times one re-decision after a change.{check} Milliseconds,
median (statements):

| backend | active | nothing due | of it, re-decisions | {a['expire']} end | of it, push | one re-decision: in the batch | after a change | policy-change tick: measured | projected |
|---|---|---|---|---|---|---|---|---|---|
"""
    for n, b in backends:
        for lv in levels:
            t = b["tick"][lv]
            change = f"{t['policy_change']['median_ms']} ({t['policy_change']['statements']:g})" if "policy_change" in t else "–"
            one = (f"{t['recheck_batch_ms']} ({t['recheck_batch_statements']:g}) | {t['recheck_change_ms']} ({t['recheck_change_statements']:g})"
                   if "recheck_batch_ms" in t else "– | –")
            due, end = t["nothing_due"], t["expire"]
            text += (f"| {names[n]} | {int(lv):,} | {due['median_ms']} ({due['statements']:g}) | {due['recheck_ms']} | "
                     f"{end['median_ms']} ({end['statements']:g}) | {end['push_ms']} | {one} | {change} | "
                     f"{s[n]['tick_policy_change_projected_ms'][lv]} |\n")
    text += f"""
- *Nothing due*: the batch keeps the re-decisions flat, {batch} sessions a tick however many are open: from
  {int(mid):,} to {int(hi):,} sessions they took {batch_flat} ({stmts} statements a tick at
  {' / '.join(f'{int(x):,}' for x in levels)}; a session that still holds under the newest version is read and
  decided, nothing is written). One re-decision costs about the same at every level ({one_each} on the
  sample), so most of the difference is noise on this shared machine. Their price is steady: with {batch} or more sessions open, the clock spends
  {busy} of every second re-deciding, on its one thread, even when nothing changed. What grows is the rest of the tick, chiefly the
  one query over every open session with its user and device, and the sort of their IDs: {rest_text}.
- *Ending sessions* costs one locked transaction per session (the lease released, the generation bumped, the
  audit event; about {per_end:g} statements each), then one push of the node's remaining lanes (the table above),
  and on SQLite a WAL checkpoint. The push grows with the lanes on the node, for the reason an activation does.
- *A policy change* costs one re-decision per active session, once: each is loaded, decided again and the new
  version written, one transaction per session. Measured here as one tick that re-decides them all: at
  {int(hi):,} active sessions about {' and '.join(f'{v:.0f} s on {names[n]}' for n, v in change_at_hi.items())}
  (projected). The clock spreads that work: it re-decides at most 250 changed sessions per tick
  (`CHANGE_BATCH`, about 1 s of work on SQLite), so expiries and pushes keep their rhythm and every session is
  held against the new policy within a few seconds per thousand.

Apart from the ends' push, the tick's costs grow with every open session of the controller, across all its
nodes, not with one node's lanes.

### Config download and approval

`GET /api/v1/sessions/{{id}}/config` (the one-time wg-quick file: the minted key unsealed, erased, and on SQLite
the WAL checkpointed so no copy stays), and `POST /api/v1/sessions/{{id}}/approve` with a step-up, for a request
that needs one approver (request → approved; no lane opens). For reference, the request that made it pending.
Milliseconds, median (p95):

| backend | active | config download | approve | request → pending |
|---|---|---|---|---|
"""
    for n, b in backends:
        for lv in levels:
            x = b["api"][lv]
            text += (f"| {names[n]} | {int(lv):,} | {x['config']['median_ms']} ({x['config']['p95_ms']}) | {x['approve']['median_ms']} "
                     f"({x['approve']['p95_ms']}) | {x['request_pending']['median_ms']} ({x['request_pending']['p95_ms']}) |\n")
    text += """
Neither grows with the node's lanes: both touch one session.
"""
    return text


if __name__ == "__main__":
    sys.exit(main())
