"""The controller ↔ agent link, side by side in one run; results go to docs/bench/link.json and the
agent-link section of docs/benchmarks.md (the other sections are kept: bench.report).

  python -m bench.link [--runs 30] [--warmup 1] [--levels 20,100,200] [--push-reps 3] [--one-reps 10] [--lab-budget 150]

1. Approval → first packet, in the lab (tests.lab; needs root): the controller as its own process in the
   `ctl` namespace (tests.lab.controller.LabController, SQLite, production link timings), the real agent on
   the router enrolled with a join token, an echo server on rtu1:2404, and an engineer. Each run: a request
   is made (not timed); then, timed from the approver's POST: approve, the engineer's activate (answered once
   the node has acknowledged the lane), the one-time config download, bringing the config up, and TCP
   connects to rtu1:2404 through the lane until one succeeds. Runs alternate between two ways of bringing
   the config up: `wg setconf` on a wireguard-go interface made beforehand (eng1), and `wg-quick up`, which
   starts a wireguard-go of its own (eng2). Each run has its own engineer and approver (a step-up code is
   single-use per person, three per 30 s), and its session is closed afterwards.
2. One controller and many agents, on loopback: the controller is `wicket-controller serve`'s own code in a
   process of its own (this module's --controller-worker, which adds a command line on stdin), the agents
   are `nodeagent.link.LinkClient`s in this process with a fake agent that records when each desired state
   arrives, each enrolled with its own join token. With 20, 100, 200 agents linked, each level from a fresh
   controller: the controller's RSS, threads and idle CPU; link-up of all at once; push latency for one node
   while the rest idle, and for every node bumped in one transaction, made inside the controller process
   (which wakes the connections at once) and made by another process (found by the controller's 0.5 s
   generation poll); the time until every agent is linked again after the controller is restarted (three
   times in a row at the top level); and one SQLite commit on this disk, for scale.
Bounded: at most --runs (+ warm-up) lab runs, fewer once --lab-budget seconds have passed (at least
--min-runs); every wait has a time limit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_section  # noqa: E402

PASSWORD = "correct horse battery staple"
TARGET_P50_MS, TARGET_P99_MS = 50.0, 150.0
MODES = ("precreated", "wg_quick")
MODE_TEXT = {"precreated": "`wg setconf` on an interface made beforehand", "wg_quick": "`wg-quick up`"}
FLEET_SITE = "fleet-1"
PATHS = ("same_process", "cross_process")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.link")
    p.add_argument("--runs", type=int, default=30, help="measured lab runs (the two ways of bringing the config up alternate)")
    p.add_argument("--min-runs", type=int, default=12)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured lab runs per way, first")
    p.add_argument("--lab-budget", type=float, default=150.0, help="seconds of lab runs before stopping at --min-runs")
    p.add_argument("--levels", default="20,100,200", help="agents linked to one controller")
    p.add_argument("--push-reps", type=int, default=3, help="bumps of every node's generation per path and level")
    p.add_argument("--one-reps", type=int, default=10, help="pushes to one node per level, the others linked and idle")
    p.add_argument("--skip-lab", action="store_true")
    p.add_argument("--skip-fleet", action="store_true")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the section from docs/bench/link.json")
    p.add_argument("--controller-worker", type=int, metavar="API_PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.controller_worker:
        return controller_worker(args.controller_worker)
    out = Path(args.out)
    raw = out.parent / "bench" / "link.json"
    if args.report_only:
        write_section(out, "link", report(json.loads(raw.read_text())))
        return 0
    levels = [int(x) for x in args.levels.split(",")]
    if levels != sorted(levels) or levels[0] < 1 or levels[-1] > 500:
        raise SystemExit("--levels: ascending, from 1 to 500 agents")
    started = time.monotonic()
    results: dict = {"params": {k: v for k, v in vars(args).items() if k not in ("out", "report_only", "controller_worker")},
                     "load_before": os.getloadavg()[0]}
    if not args.skip_lab:
        results["lane"] = lane_bench(args, started)
    if not args.skip_fleet:
        results["fleet"] = fleet_bench(args, levels, started)
    results["machine"] = machine()
    results["load_after"] = os.getloadavg()[0]
    results["duration_s"] = round(time.monotonic() - started, 1)
    results = json.loads(json.dumps(results))  # level keys as strings, as report() reads them back from the file
    results["summary"] = summary(results)
    if "lane" in results and "fleet" in results:
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(results, indent=1) + "\n")
        write_section(out, "link", report(results))
        print(f"[bench] written to {out} and {raw}")
    else:  # a partial run leaves the report and its raw numbers as they were
        fd, path = tempfile.mkstemp(prefix="wicket-bench-link-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(results, indent=1) + "\n")
        print(f"[bench] a partial run: raw numbers in {path}; {out} and {raw} left as they were")
    print(json.dumps(results["summary"], indent=1))
    return 0


# ---- 1. approval → first packet, in the lab ----


def lane_bench(args, started: float) -> dict:
    from tests.lab import Lab, unavailable_reason
    from tests.lab.controller import LabController
    from tests.lab.site import AgentProcess, Engineer, serve, wait_for

    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"[bench] the lab is unavailable: {reason}")
    people = args.runs + 2 * args.warmup
    work = Path(tempfile.mkdtemp(prefix="wicket-bench-link-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        lab = stack.enter_context(Lab(masters=("scada", "ctl")))
        _say(started, f"lab {lab.run_id} built in {lab.build_seconds:.1f} s; controller set-up with {people} engineers and approvers")
        # production link timings (heartbeat and ack timeout 10 s, clock tick 1 s): a push does not wait for either
        ctl = LabController(lab, work / "ctl", engineers=people, default_s=300, heartbeat_s=10, ack_timeout_s=10, tick_ms=1000)
        stack.callback(ctl.close)
        ctl.setup()
        approvers = ["alex"] + [ctl._person(f"appr{i}", "approver").username for i in range(1, people)]
        engineers = ["erin"] + [f"erin{i}" for i in range(1, people)]
        agent = AgentProcess(lab)
        stack.callback(agent.remove_state)
        stack.callback(agent.stop)
        t0 = time.monotonic()
        ctl.start()
        logins_s = time.monotonic() - t0
        enrolled = ctl.enrol(agent)
        if "enrolled as" not in enrolled.stdout:
            raise SystemExit(f"[bench] enrolment failed: {enrolled.stdout}{enrolled.stderr}")
        agent.start()
        if not wait_for(lambda: (agent.status().get("link") or "").startswith("connected"), timeout=15):
            raise SystemExit(f"[bench] the agent did not link: {agent.status()}\n{agent.log()[-3000:]}")
        server = serve(lab, "rtu1", tcp=(2404,))
        stack.callback(server.wait)
        stack.callback(server.kill)
        quick = Engineer(lab, "eng2")
        stack.callback(quick.forget)
        pre = Precreated(lab, "eng1")
        stack.callback(shutil.rmtree, pre.dir, True)
        api = NsThread(lab.ns("ctl"))
        stack.callback(api.close)
        api.call(api.open_http)
        eng_threads = {"eng1": NsThread(lab.ns("eng1")), "eng2": NsThread(lab.ns("eng2"))}
        for t in eng_threads.values():
            stack.callback(t.close)
        device = lab.addr("rtu1")
        _say(started, f"controller up ({logins_s:.1f} s with the logins), agent linked; lab runs")

        runs: list[dict] = []
        deadline = time.monotonic() + args.lab_budget
        total = args.runs + 2 * args.warmup
        for i in range(total):
            warm = i < 2 * args.warmup
            measured = sum(1 for r in runs if not r["warmup"])
            if not warm and measured >= args.min_runs and time.monotonic() > deadline:
                _say(started, f"lab budget spent after {measured} runs")
                break
            mode = MODES[i % 2]
            run = one_run(ctl, api, agent, pre if mode == "precreated" else quick, eng_threads["eng1" if mode == "precreated" else "eng2"],
                          mode, engineers[i], approvers[i], device, i, (ctl.proc.pid, agent.proc.pid))
            run["warmup"] = warm
            runs.append(run)
            if i % 6 == 5 or i == total - 1:
                _say(started, f"lab run {i + 1}/{total}: {run['total_ms']} ms ({mode})")
        out = {"runs": runs, "logins_s": round(logins_s, 1), "lab_build_s": round(lab.build_seconds, 1),
               "agent_log_errors": [ln for ln in agent.log().splitlines() if " ERROR " in ln][:10]}
    out["stats"] = lane_stats([r for r in runs if not r["warmup"]])
    return out


def one_run(ctl, api: NsThread, agent, client, eng_thread: NsThread, mode: str, engineer: str, approver: str,
            device: str, i: int, pids: tuple[int, int]) -> dict:
    from tests.lab.controller import DEVICE, TASK
    from tests.lab.site import wait_for

    # not timed: the request, and the two step-up codes (fetched first, so that waiting for a TOTP step never
    # falls inside the timeline)
    asked = api.call(api.post, ctl, engineer, "/sessions", step_up=True,
                     json={"device": DEVICE, "task": TASK, "reason": f"bench run {i}"})
    if asked.get("state") != "pending_approval":
        raise SystemExit(f"[bench] run {i}: the request answered {asked}")
    sid = asked["id"]
    approve_code, activate_code = ctl.people[approver].code(), ctl.people[engineer].code()

    waited = _waited(*pids)
    t0 = time.monotonic()
    approved = api.call(api.post, ctl, approver, f"/sessions/{sid}/approve", code=approve_code, json={"reason": "bench: checked"})
    t_approved = time.monotonic()
    active = api.call(api.post, ctl, engineer, f"/sessions/{sid}/activate", code=activate_code, json={})
    t_active = time.monotonic()
    conf = api.call(api.get_text, ctl, engineer, f"/sessions/{sid}/config")
    t_config = time.monotonic()
    client.up(conf)
    t_up = time.monotonic()
    attempts = eng_thread.call(first_connect, device, 2404)
    t1 = time.monotonic()
    waited = _waited(*pids) - waited

    if approved.get("state") != "approved" or active.get("state") != "active" or "[Peer]" not in conf:
        raise SystemExit(f"[bench] run {i}: approve {approved}, activate {active}, config {conf[:200]!r}")
    ack_ms = _ack_ms(ctl, sid)
    # not timed: the session closed, the lane gone from the node, the client taken down
    api.call(api.post, ctl, engineer, f"/sessions/{sid}/close", json={"reason": "bench run over"})
    if not wait_for(lambda: agent.lane(sid) is None, timeout=10):
        raise SystemExit(f"[bench] run {i}: the lane of {sid} outlived its session")
    client.down()
    return {"mode": mode, "session": sid, "approve_ms": _ms(t_approved - t0), "activate_ms": _ms(t_active - t_approved),
            "config_ms": _ms(t_config - t_active), "up_ms": _ms(t_up - t_config), "connect_ms": _ms(t1 - t_up),
            "connect_attempts": attempts, "controller_agent_ms": _ms(t_active - t0), "config_to_packet_ms": _ms(t1 - t_active),
            "total_ms": _ms(t1 - t0), "ack_ms": ack_ms, "cpu_wait_ms": _ms(waited)}


def _ack_ms(ctl, sid: str) -> float | None:
    """From the controller's audit events: the activation's start (its `session.activate` event) to the node's
    acknowledgement of the lane (`session.open`), on the controller's clock."""
    from sqlalchemy import select

    from controller.models import Event

    with ctl.app.state.auth.factory() as s:
        at = dict(s.execute(select(Event.type, Event.at).where(Event.subject == sid, Event.result == "success",
                                                                Event.type.in_(("session.activate", "session.open")))).all())
    if "session.activate" not in at or "session.open" not in at:
        return None
    return _ms((at["session.open"] - at["session.activate"]).total_seconds())


def first_connect(host: str, port: int, limit_s: float = 10.0) -> int:
    """TCP connects until one succeeds (runs inside the engineer's namespace); how many it took."""
    end = time.monotonic() + limit_s
    attempts = 0
    while True:
        attempts += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect((host, port))
            return attempts
        except OSError as exc:
            if time.monotonic() > end:
                raise TimeoutError(f"no TCP connect to {host}:{port} through the lane in {limit_s:g} s: {exc}") from None
            time.sleep(0.002)
        finally:
            s.close()


class Precreated:
    """The engineer's WireGuard client made once (wireguard-go, up): each run only loads the session's
    config into it (`wg setconf` with the wg-quick-only lines left out) and sets the address and the route,
    in one shell in the engineer's namespace."""

    def __init__(self, lab, role: str):
        from tests.lab.site import wait_for

        self.lab, self.role = lab, role
        self.ifname = lab.engineer_ifname(role)
        self.dir = tempfile.mkdtemp(prefix=f"wicket-bench-{lab.run_id}-{role}-")
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
        lab.spawn(role, ["wireguard-go", "-f", self.ifname], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_for(lambda: os.path.exists(f"/var/run/wireguard/{self.ifname}.sock"), timeout=10):
            raise SystemExit(f"[bench] wireguard-go for {self.ifname} did not start")
        lab.exec(role, ["ip", "link", "set", self.ifname, "mtu", "1420", "up"])
        self.peer = ""

    def up(self, conf: str) -> None:
        kept, address, device = [], "", ""
        for line in conf.splitlines():
            key, _, value = (x.strip() for x in line.partition("="))
            if key == "Address":
                address = value
                continue
            if key == "AllowedIPs":
                device = value
            if key == "PublicKey":
                self.peer = value
            if line.strip() and not line.lstrip().startswith("#"):
                kept.append(line)
        path = os.path.join(self.dir, "wg.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(kept) + "\n")
        script = (f"wg setconf {self.ifname} {path} && ip address replace {address} dev {self.ifname} && "
                  f"ip route replace {device} dev {self.ifname}")
        self.lab.exec(self.role, ["sh", "-c", script])

    def down(self) -> None:
        """Not timed: the session's peer and address removed, as the next session's config replaces them."""
        if self.peer:
            self.lab.exec(self.role, ["wg", "set", self.ifname, "peer", self.peer, "remove"], check=False)
        self.lab.exec(self.role, ["ip", "address", "flush", "dev", self.ifname], check=False)
        os.unlink(os.path.join(self.dir, "wg.conf"))


class NsThread:
    """A thread inside one lab namespace that runs what it is handed: sockets it makes (an HTTP client's
    kept-alive connection) stay in that namespace, and no thread is started per call."""

    def __init__(self, netns: str):
        from tests.lab.nsutil import in_netns

        self.jobs: queue.Queue = queue.Queue()
        self.http = None
        self.thread = threading.Thread(target=in_netns, args=(netns, self._serve), daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fn, args, kw, box, done = job
            try:
                box["result"] = fn(*args, **kw)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            done.set()

    def call(self, fn, *args, **kw):
        box, done = {}, threading.Event()
        self.jobs.put((fn, args, kw, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def close(self) -> None:
        if self.http is not None:
            self.call(self.http.close)
        self.jobs.put(None)
        self.thread.join(5)

    # ---- the controller's API (run on the thread inside `ctl`) ----

    def open_http(self) -> None:
        import httpx

        self.http = httpx.Client(base_url="http://127.0.0.1:8080/api/v1", timeout=60, trust_env=False)

    def _headers(self, ctl, who: str, code: str | None, step_up: bool) -> dict:
        headers = {"Authorization": f"Bearer {ctl.people[who].token}"}
        if step_up or code:
            headers["X-Wicket-TOTP"] = code or ctl.people[who].code()
        return headers

    def post(self, ctl, who: str, path: str, *, json: dict, step_up: bool = False, code: str | None = None) -> dict:
        res = self.http.post(path, json=json, headers=self._headers(ctl, who, code, step_up))
        if res.status_code not in (200, 201):
            raise SystemExit(f"[bench] POST {path} as {who}: {res.status_code} {res.text}\n{ctl.log()[-3000:]}")
        return res.json()

    def get_text(self, ctl, who: str, path: str) -> str:
        res = self.http.get(path, headers=self._headers(ctl, who, None, False))
        if res.status_code != 200:
            raise SystemExit(f"[bench] GET {path} as {who}: {res.status_code} {res.text}")
        return res.text


def lane_stats(runs: list[dict]) -> dict:
    keys = ("approve_ms", "activate_ms", "ack_ms", "config_ms", "up_ms", "connect_ms", "controller_agent_ms",
            "config_to_packet_ms", "total_ms", "cpu_wait_ms")
    out: dict = {"all": {k: stats([r[k] for r in runs if r[k] is not None]) for k in keys}}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if mine:
            out[mode] = {k: stats([r[k] for r in mine if r[k] is not None]) for k in keys}
            out[mode]["connect_attempts_max"] = max(r["connect_attempts"] for r in mine)
    return out


# ---- 2. one controller, many agents, on loopback ----


def fleet_bench(args, levels: list[int], started: float) -> dict:
    from controller.app import create_app
    from controller.bootstrap import init
    from controller.inventory_schemas import SiteCreate
    from controller.nodelink import NoLink
    from controller.settings import load

    logging.getLogger("wicket.agent.link").setLevel(logging.ERROR)  # each client's reconnect notices, times 200
    work = Path(tempfile.mkdtemp(prefix="wicket-bench-fleet-"))
    most = levels[-1]
    sims: list[SimAgent] = []
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        api_port, link_port = _free_port(), _free_port()
        env = {"WICKET_DATA_DIR": str(work / "data"), "WICKET_DATABASE_URL": f"sqlite:///{work / 'controller.db'}",
               "WICKET_LINK_LISTEN": f"127.0.0.1:{link_port}", "WICKET_LINK_NAMES": "127.0.0.1"}
        settings = load({**env, "WICKET_LINK_LISTEN": "off", "WICKET_SESSION_TICK_MS": "0"})
        boot = init(settings, "root", "Root", PASSWORD)
        app = create_app(settings, link=NoLink())
        stack.callback(app.state.engine.dispose)
        root = _login_root(app, boot)
        app.state.inventory.create_site(root, SiteCreate(
            name=FLEET_SITE, display_name="Fleet", tunnel_pool="100.64.8.0/24", port_min=51000, port_max=51099,
            public_endpoint="203.0.113.1", lan_networks=["192.0.2.0/24"]), None)
        tokens = [app.state.agents.create_token(root, FLEET_SITE, None, None).token for _ in range(most)]

        ctl = ControllerProc(env, api_port, work / "controller.log")
        stack.callback(ctl.stop)
        stack.callback(_stop_sims, sims, ctl)  # runs first: the clients told to stop, then the controller
        ctl.start()
        out: dict = {"start_s": round(ctl.start_s, 2)}
        _say(started, f"fleet: controller up in {ctl.start_s:.1f} s; enrolling {most} agents")
        enrol_s = []
        for i, token in enumerate(tokens):
            sim = SimAgent(f"fleet-{i:03d}", work / "agents" / f"{i:03d}")
            t0 = time.monotonic()
            sim.enrol(f"127.0.0.1:{link_port}", token)
            enrol_s.append(time.monotonic() - t0)
            sims.append(sim)
        out["enrol"] = latency(enrol_s) | {"total_s": round(sum(enrol_s), 2)}
        ctl.stop()
        out["commit"] = commit_cost(work / "commit.db")

        engine, factory = _db(env["WICKET_DATABASE_URL"])
        stack.callback(engine.dispose)
        out["levels"] = {}
        for level in levels:
            # each level from a fresh controller and fresh link clients: nothing carried over from the last
            ctl.start()
            time.sleep(2.0)
            row: dict = {"linked": level, "start_s": round(ctl.start_s, 2), "rss_fresh_kb": ctl.rss_kb(),
                         "threads_fresh": ctl.threads()}
            _say(started, f"fleet: {level} agents linking at once")
            here = sims[:level]
            t0 = time.monotonic()
            for sim in here:
                sim.start()
            c0, b0, q0 = ctl.cpu_s(), _cpu_of(os.getpid()), _waited(ctl.proc.pid)
            row["connect"] = latency(_wait_arrivals(here, t0, 60, f"{level} new links"))
            wall = time.monotonic() - t0
            row["connect"] |= {"controller_cpu_share": round((ctl.cpu_s() - c0) / wall, 2),
                               "controller_cpu_wait_ms": _ms(_waited(ctl.proc.pid) - q0),
                               "controller_cpu_ms_per_agent": round((ctl.cpu_s() - c0) / level * 1000, 2),
                               "agents_cpu_share": round((_cpu_of(os.getpid()) - b0) / wall, 2)}
            time.sleep(3.0)
            row["rss_kb"], row["threads"] = ctl.rss_kb(), ctl.threads()
            row["idle_cpu"] = _idle_cpu(ctl, 5.0)
            row["push"] = push_rounds(ctl, factory, here, args.push_reps, args.one_reps, row["idle_cpu"]["controller"])
            row["load"] = os.getloadavg()[0]
            row["rss_after_push_kb"] = ctl.rss_kb()
            _say(started, f"fleet: {level} agents: pushes done; restarting the controller")
            row["restart"] = restart(ctl, here)
            time.sleep(3.0)
            row["rss_restarted_kb"] = ctl.rss_kb()
            if level == most:
                _say(started, f"fleet: {level} agents: restarting the controller twice more")
                row["restarts_more"] = [restart(ctl, here) for _ in range(2)]
            _stop_sims(here, ctl)
            out["levels"][level] = row
        out["controller_log_errors"] = _errors(ctl.log())
    return out


def push_rounds(ctl: ControllerProc, factory, sims: list[SimAgent], reps: int, one_reps: int, idle: float) -> dict:
    """Latency from a commit to the agent's apply. One node at a time, bumped inside the controller process
    (what an activation does while the other links idle). Then every node bumped in one transaction, `reps`
    times per path, the paths taking turns: made in the controller process (it wakes each connection) and
    made here, in another process with its own database connection (each connection's watch poll finds
    it); for those, also until every acknowledgement is recorded, and the controller's CPU time per agent
    (its idle rate `idle` taken out)."""
    from controller.db import transaction
    from controller.session_lanes import bump

    one = []
    for i in range(one_reps):
        sim = sims[(i * 37) % len(sims)]
        time.sleep(random.uniform(0.1, 0.6))
        before = {sim.name: sim.gen}
        one += _wait_arrivals([sim], ctl.bump([sim.name]), 10, "one-node push", after=before)
    out: dict = {"one_node": latency(one) | {"runs_ms": [_ms(x) for x in one]}}

    names = [s.name for s in sims]
    took: dict = {p: [] for p in PATHS}
    rounds: dict = {p: [] for p in PATHS}
    for rep in range(reps):
        for path in (PATHS if rep % 2 == 0 else PATHS[::-1]):
            # past one watch period, so no connection is still busy with the last round; and at a random point of
            # the connections' 0.5 s watch cycle (a wake-up puts them all in step)
            time.sleep(random.uniform(0.7, 1.2))
            before = {s.name: s.gen for s in sims}
            c0, b0, q0, w0 = ctl.cpu_s(), _cpu_of(os.getpid()), _waited(ctl.proc.pid), time.monotonic()
            if path == "same_process":
                t0 = ctl.bump(names)
            else:
                with transaction(factory) as s:
                    for name in names:
                        bump(s, name)
                t0 = time.monotonic()
            times = _wait_arrivals(sims, t0, 30, f"{path} push", after=before)
            acked = _acked(factory, names, 30) - t0
            wall = time.monotonic() - w0
            took[path] += times
            rounds[path].append({"last_ms": _ms(max(times)), "acked_ms": _ms(acked), "wall_ms": _ms(wall),
                                 "controller_cpu_share": round((ctl.cpu_s() - c0) / wall, 2),
                                 "controller_cpu_wait_ms": _ms(_waited(ctl.proc.pid) - q0),
                                 "controller_cpu_ms_per_agent": round((ctl.cpu_s() - c0 - idle * wall) / len(sims) * 1000, 2),
                                 "agents_cpu_share": round((_cpu_of(os.getpid()) - b0) / wall, 2)})
    for p in PATHS:
        r = rounds[p]
        out[p] = latency(took[p]) | {"rounds": r} | {k: round(statistics.median(x[k] for x in r), 2) for k in (
            "last_ms", "acked_ms", "wall_ms", "controller_cpu_ms_per_agent", "controller_cpu_share", "controller_cpu_wait_ms",
            "agents_cpu_share")}
    return out


def commit_cost(path: Path, n: int = 50) -> dict:
    """One small write transaction, committed, on this disk with the controller's SQLite settings (WAL,
    synchronous=FULL): what each acknowledgement and each status update pays to be stored."""
    from sqlalchemy import text

    from controller.db import make_engine

    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))
        took = []
        for i in range(n):
            t0 = time.monotonic()
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": f"row {i}"})
            took.append(time.monotonic() - t0)
    finally:
        engine.dispose()
    return latency(took)


def _acked(factory, names: list[str], limit_s: float) -> float:
    """When every node's newest generation is recorded as applied (monotonic)."""
    from sqlalchemy import func, or_, select

    from controller.models import NodeAgent

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        with factory() as s:
            behind = s.scalar(select(func.count()).select_from(NodeAgent).where(
                NodeAgent.name.in_(names), or_(NodeAgent.applied_generation.is_(None),
                                               NodeAgent.applied_generation < NodeAgent.generation)))
        if not behind:
            return time.monotonic()
        time.sleep(0.01)
    raise SystemExit(f"[bench] {behind} nodes' acknowledgements were not recorded within {limit_s:g} s")


def restart(ctl: ControllerProc, sims: list[SimAgent]) -> dict:
    """SIGTERM (the controller says goodbye on every link), start again, and wait until every agent has its
    state pushed on a new link; per agent, from the moment the old controller was gone and the new one was
    started (its link listens a moment before its health check answers)."""
    connects = {s.name: s.client.connects for s in sims}
    t0 = time.monotonic()
    ctl.stop()
    t_down = time.monotonic()
    ctl.start()
    t_up = time.monotonic()
    times = _wait_arrivals(sims, t_down, 90, "re-links")
    again = sum(1 for s in sims if s.client.connects > connects[s.name])
    if again != len(sims):
        raise SystemExit(f"[bench] only {again} of {len(sims)} agents made a new link")
    return {"stop_s": round(t_down - t0, 2), "start_s": round(t_up - t_down, 2), "relink": latency(times),
            "all_s": round(max(times), 2), "all_after_up_s": round(max(times) - (t_up - t_down), 2)}


class SimAgent:
    """An enrolled agent without a data plane: the real link client, and a fake agent behind it that takes
    every desired state at once and records when it arrived (monotonic)."""

    arrived = threading.Condition()

    def __init__(self, name: str, state_dir: Path):
        self.name, self.dir = name, state_dir
        self.gen: int | None = None
        self.arrivals: list[tuple[float, int]] = []
        self.client = None

    def enrol(self, controller: str, token: str) -> None:
        from nodeagent.enroll import enroll

        (self.dir / "evidence").mkdir(parents=True)
        enroll(str(self.dir), controller, token, self.name)

    def start(self) -> None:
        from nodeagent.link import LinkClient

        self.arrivals = []
        self.client = LinkClient(str(self.dir), self.submit, str(self.dir / "evidence"), time.monotonic, time.time)
        self.client.start()

    def submit(self, request: dict) -> dict:
        from nodeagent.wire import ReconcileReport

        op = request["op"]
        if op == "apply":
            now, generation = time.monotonic(), request["desired"].generation
            with self.arrived:
                self.arrivals.append((now, generation))
                self.gen = generation
                self.arrived.notify_all()
            return {"ok": True, "report": ReconcileReport(generation=generation).model_dump(mode="json"), "status": self.status()}
        if op == "applied_generation":
            return {"ok": True, "generation": self.gen, "boot_id": "bench"}
        if op == "status":
            return {"ok": True, "status": self.status()}
        return {"ok": True}

    def status(self) -> dict:
        from nodeagent.wire import AgentStatus

        return AgentStatus(node_id=self.name, agent_version="bench", backend="userspace", applied_generation=self.gen, lanes=[],
                           pending_evidence=0, clock_synchronized=True, link=self.client.describe() if self.client else None
                           ).model_dump(mode="json")


def _wait_arrivals(sims: list[SimAgent], t0: float, limit_s: float, what: str, *, after: dict | None = None,
                   since: float | None = None) -> list[float]:
    """Seconds from t0 to each agent's first desired state newer than `after[name]` (or arrived after `since`)."""
    since = t0 if since is None else since

    def first(s: SimAgent) -> float | None:
        for at, gen in s.arrivals:
            if at >= since and (after is None or after[s.name] is None or gen > after[s.name]):
                return at
        return None

    end = time.monotonic() + limit_s
    with SimAgent.arrived:
        while True:
            got = [first(s) for s in sims]
            if all(x is not None for x in got):
                return [at - t0 for at in got]
            left = end - time.monotonic()
            if left <= 0:
                missing = [s.name for s, x in zip(sims, got, strict=True) if x is None]
                raise SystemExit(f"[bench] {what}: {len(missing)} of {len(sims)} agents got nothing in {limit_s:g} s "
                                 f"(e.g. {missing[:5]}: {[s.client.describe() for s in sims if s.name in missing[:3]]})")
            SimAgent.arrived.wait(min(left, 0.5))


def _stop_sims(sims: list[SimAgent], ctl: ControllerProc) -> None:
    """LinkClient.stop only returns once its session ends, which a connected client notices when the controller
    next speaks: tell every client first, then stop the controller (its goodbye ends them all)."""
    for s in sims:
        if s.client is not None:
            s.client.stopping.set()
    ctl.stop()
    for s in sims:
        if s.client is not None:
            s.client.thread.join(10)
            s.client = None


class ControllerProc:
    """The controller as its own process on loopback: `wicket-controller serve`, via --controller-worker."""

    def __init__(self, env: dict, api_port: int, log_path: Path):
        self.env, self.api_port, self.log_path = env, api_port, log_path
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    def start(self, timeout: float = 60) -> None:
        import httpx

        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bench.link", "--controller-worker", str(self.api_port)],
                                         cwd=REPO, env={**os.environ, **self.env}, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True)
        while time.monotonic() < t0 + timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"[bench] the controller exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.api_port}/healthz", timeout=2, trust_env=False).status_code == 200:
                    self.start_s = time.monotonic() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise SystemExit(f"[bench] the controller did not come up:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()

    def bump(self, names: list[str]) -> float:
        """Bump the nodes' generations inside the controller process and wake their links; when it committed."""
        self.proc.stdin.write(json.dumps({"bump": names}) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"[bench] the controller worker went away:\n{self.log()[-3000:]}")
            if line.startswith("@bench "):
                return float(json.loads(line[7:])["committed"])

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise SystemExit(f"[bench] no {key} for the controller")

    def rss_kb(self) -> int:
        return self._status("VmRSS")

    def threads(self) -> int:
        return self._status("Threads")

    def cpu_s(self) -> float:
        return _cpu_of(self.proc.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""


def controller_worker(api_port: int) -> int:
    """`wicket-controller serve --host 127.0.0.1 --port API_PORT`, and one more thread: for each JSON line
    {"bump": [node, …]} on stdin, the nodes' generations bumped in one transaction and their links woken, as
    the controller's own code does after it changes nodes' lanes; answers the commit time on stdout."""
    import controller.app as app_module
    from controller import server_cli

    made: dict = {}
    real = app_module.create_app

    def create_app(*a, **kw):
        made["app"] = real(*a, **kw)
        return made["app"]

    def commands() -> None:
        from controller.db import transaction
        from controller.session_lanes import bump

        for line in sys.stdin:
            names = json.loads(line)["bump"]
            state = made["app"].state
            with transaction(state.auth.factory) as s:
                for name in names:
                    bump(s, name)
            committed = time.monotonic()
            state.sessions.pusher.push_quietly(names)
            print("@bench " + json.dumps({"committed": committed}), flush=True)

    app_module.create_app = create_app
    threading.Thread(target=commands, name="bench-commands", daemon=True).start()
    return server_cli.main(["serve", "--host", "127.0.0.1", "--port", str(api_port)])


def _idle_cpu(ctl: ControllerProc, seconds: float) -> dict:
    """CPU time over wall time while nothing happens but the links' own traffic: the controller, and this
    process (the simulated agents)."""
    c0, b0, t0 = ctl.cpu_s(), _cpu_of(os.getpid()), time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return {"controller": round((ctl.cpu_s() - c0) / wall, 3), "agents": round((_cpu_of(os.getpid()) - b0) / wall, 3),
            "seconds": round(wall, 1)}


def _waited(*pids: int) -> float:
    """Seconds the processes' threads have spent runnable but waiting for a CPU (run queue), summed over
    their threads (/proc/<pid>/task/*/schedstat, second field). Threads that ended are not counted."""
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def _errors(log: str) -> list[str]:
    """The controller log's ERROR records, each with the lines that follow it (a traceback, a task)."""
    lines, out = log.splitlines(), []
    for i, line in enumerate(lines):
        if " ERROR " in line and len(out) < 10:
            out.append("\n".join([line, *lines[i + 1:i + 6]]))
    return out


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _db(url: str):
    from controller.db import make_engine, session_factory

    engine = make_engine(url)
    return engine, session_factory(engine)


def _login_root(app, boot):
    import pyotp

    secret = re.search(r"secret=([A-Z2-7]+)", boot.enrolment.otpauth_uri).group(1)
    return app.state.auth.login("root", PASSWORD, code=pyotp.TOTP(secret).now()).principal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- numbers ----


def latency(seconds: list[float]) -> dict:
    return stats([_ms(x) for x in seconds])


def stats(ms: list[float]) -> dict:
    """Median, p99 (nearest rank: the ceil(0.99 n)-th fastest, which is the slowest up to n = 100) and the
    slowest, in ms."""
    if not ms:
        return {"n": 0}
    ordered = sorted(ms)
    return {"p50": round(statistics.median(ordered), 2), "p99": ordered[math.ceil(0.99 * len(ordered)) - 1],
            "max": ordered[-1], "n": len(ordered)}


def machine() -> dict:
    from bench.lanes import machine as lanes_machine
    from bench.policy import machine as policy_machine

    return policy_machine(None) | {"wireguard_go": lanes_machine()["wireguard_go"]}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _say(started: float, what: str) -> None:
    print(f"[bench] {time.monotonic() - started:5.1f} s  {what}", flush=True)


def summary(r: dict) -> dict:
    out: dict = {}
    if "lane" in r:
        st = r["lane"]["stats"]
        out["lane"] = {
            "approval_to_packet_ms": {m: {k: st[m]["total_ms"][k] for k in ("p50", "p99", "max")} for m in MODES if m in st},
            "controller_agent_ms": {k: st["all"]["controller_agent_ms"][k] for k in ("p50", "p99", "max")},
            "targets_met": {**{m: _met(st[m]["total_ms"]) for m in MODES if m in st},
                            "controller_agent": _met(st["all"]["controller_agent_ms"])},
        }
    if "fleet" in r:
        lv = r["fleet"]["levels"]
        levels = list(lv)
        lo, hi = levels[0], levels[-1]

        def per(f):
            return {k: f(v) for k, v in lv.items()}

        fl = {
            "rss_fresh_mb": per(lambda v: round(v["rss_fresh_kb"] / 1024, 1)),
            "rss_linked_mb": per(lambda v: round(v["rss_kb"] / 1024, 1)),
            "rss_per_agent_kb": per(lambda v: round((v["rss_kb"] - v["rss_fresh_kb"]) / v["linked"])),
            "idle_cpu_share": per(lambda v: v["idle_cpu"]["controller"]),
            "connect_all_last_s": per(lambda v: round(v["connect"]["max"] / 1000, 2)),
            "one_node_push_p50_ms": per(lambda v: v["push"]["one_node"]["p50"]),
            "all_same_process_last_ms": per(lambda v: v["push"]["same_process"]["last_ms"]),
            "all_cross_process_last_ms": per(lambda v: v["push"]["cross_process"]["last_ms"]),
            "controller_cpu_ms_per_agent_push": per(lambda v: v["push"]["same_process"]["controller_cpu_ms_per_agent"]),
            "restart_all_linked_s": per(lambda v: v["restart"]["all_s"]),
        }
        if "restarts_more" in lv[hi]:
            fl["restarts_more_all_linked_s"] = [x["all_s"] for x in lv[hi]["restarts_more"]]
        fl[f"ratio_{hi}_over_{lo}"] = {k: round(v[hi] / v[lo], 2) for k, v in fl.items()
                                       if isinstance(v, dict) and v.get(lo) and k not in ("rss_fresh_mb",)}
        fl[f"ratio_{hi}_over_{lo}"]["rss_growth"] = round((lv[hi]["rss_kb"] - lv[hi]["rss_fresh_kb"]) /
                                                          max(1, lv[lo]["rss_kb"] - lv[lo]["rss_fresh_kb"]), 2)
        out["fleet"] = fl
    return out


def _met(x: dict) -> dict:
    return {"p50": x["p50"] <= TARGET_P50_MS, "p99": x["p99"] <= TARGET_P99_MS}


def report(r: dict) -> str:
    """The agent-link section of docs/benchmarks.md, from the raw results."""
    m, a, s = r["machine"], r["params"], r["summary"]
    lane, fleet = r["lane"], r["fleet"]
    st = lane["stats"]
    counted = [x for x in lane["runs"] if not x["warmup"]]
    n_mode = {mode: st[mode]["total_ms"]["n"] for mode in MODES if mode in st}

    def row(label, x, target=False):
        met = ""
        if target:
            ok = _met(x)
            met = f" | {'yes' if ok['p50'] else 'no'} / {'yes' if ok['p99'] else 'no'}"
        return f"| {label} | {x['n']} | {x['p50']} | {x['p99']} | {x['max']}{met} |\n"

    text = f"""## Agent link

Generated by `make bench-link` (`python -m bench.link`) on {m['date']}; every number in this section comes
from that one run (raw numbers and every run: `docs/bench/link.json`). Machine: {m['cpus']} × {m['cpu']},
Linux {m['kernel']}, {m['wireguard_go']}, Python {m['python']}, SQLite {m['sqlite']}. Whole run:
{r['duration_s']} s. Load average {r['load_before']:.1f} at the start and {r['load_after']:.1f} at the end: the
controller, the agent, the clients and anything else running shared the two vCPUs.

### Approval → first packet through the lane

**Set-up.** The lab (`tests.lab`: network namespaces on this machine). The controller runs as its own
process (`wicket-controller serve`, SQLite) in the `ctl` namespace, with the production link timings
(heartbeat and acknowledgement timeout 10 s, session clock 1 s). The real agent runs on the router,
enrolled with a join token and linked. An echo server listens on rtu1:2404. The lab policy's
`iec104-diagnostics` task needs one approver. The API is called over HTTP inside `ctl`, on one kept-alive
connection.

**What is timed.** The clock starts when the approver's `POST …/approve` (with its step-up code) is sent.
Then come the engineer's `POST …/activate` (step-up; answered once the node has acknowledged a generation
that holds the lane), `GET …/config` (the one-time wg-quick file), bringing that config up on the
engineer's host, and TCP connects to rtu1:2404 through the lane until one succeeds. The clock stops at
that connect: its SYN and SYN-ACK went through WireGuard, the lane's box and its nft rules. The request
itself and the step-up codes are made before the clock starts. Each run has its own engineer and approver
(a code is single-use, three per person per 30 s). Its session is closed afterwards, and the next run
starts once the lane is gone from the node. The runs alternate between two ways of bringing the config up:

- *interface made beforehand*: one wireguard-go interface, made once in the engineer's namespace; each run
  loads the session's key and peer into it with `wg setconf` and sets the address and the route, in one
  shell. A client that keeps its WireGuard running works like this.
- *`wg-quick up`*: what [engineer-quickstart.md](engineer-quickstart.md) tells engineers to run. This
  machine has no WireGuard kernel module, so wg-quick starts a new wireguard-go every time.

{a['warmup']} warm-up run(s) each way are not counted; {len(counted)} runs are ({', '.join(f'{n} {MODE_TEXT[k]}' for k, n in n_mode.items())}).
Milliseconds. The p99 is by nearest rank: with fewer than 100 runs it is the slowest run.

**Targets** (issue 6): approval → first packet p50 ≤ {TARGET_P50_MS:g} ms, p99 ≤ {TARGET_P99_MS:g} ms. Comparable
products take seconds.

| | runs | p50 | p99 | max | target met: p50 / p99 |
|---|---|---|---|---|---|
"""
    for mode in MODES:
        if mode in st:
            text += row(f"approval → first packet, {MODE_TEXT[mode]}", st[mode]["total_ms"], True)
    text += row("of it, the controller and the agent: approve and activate answered, the lane acknowledged (all runs)",
                st["all"]["controller_agent_ms"], True)
    text += """
Where the time goes (ms):

| step | runs | p50 | p99 | max |
|---|---|---|---|---|
"""
    a_all = st["all"]
    text += row("approve: `POST …/approve` answered", a_all["approve_ms"])
    text += row("activate: `POST …/activate` answered, the lane open on the node and acknowledged", a_all["activate_ms"])
    text += row("of it, from the activation's start to the node's acknowledgement (the controller's audit events "
                "`session.activate` → `session.open`)", a_all["ack_ms"])
    text += row("config: `GET …/config` answered", a_all["config_ms"])
    for mode in MODES:
        if mode in st:
            text += row(f"bringing the config up: {MODE_TEXT[mode]}", st[mode]["up_ms"])
    text += row("first TCP connect through the lane", a_all["connect_ms"])
    text += row("(not a step) the controller's and the agent's threads waiting for a CPU during the run, summed",
                a_all["cpu_wait_ms"])
    for mode in MODES:
        if mode in st:
            text += row(f"config → first packet (download, bring-up, connect): {MODE_TEXT[mode]}", st[mode]["config_to_packet_ms"])
    ca, pre, wq = a_all["controller_agent_ms"], st.get("precreated", {}), st.get("wg_quick", {})
    attempts = max(x["connect_attempts"] for x in counted)
    ca_ok = _met(ca)
    verdict = ("meets both targets" if all(ca_ok.values()) else "meets the p50 target, not the p99" if ca_ok["p50"]
               else "meets the p99 target, not the p50" if ca_ok["p99"] else "meets neither target")
    best = pre.get("total_ms") or wq.get("total_ms")
    whole = ("meets both targets" if all(_met(best).values()) else "is above the targets" if not any(_met(best).values())
             else "meets one target of the two")
    wq_share = (wq["up_ms"]["p50"] / wq["config_to_packet_ms"]["p50"]) if wq else 0
    first = sum(1 for x in counted if x["connect_attempts"] == 1)
    text += "\n" + (f"Every first connect succeeded at its first attempt ({len(counted)} runs)" if first == len(counted) else
                    f"The first connect succeeded at its first attempt in {first} of {len(counted)} runs (at most {attempts} attempts)")
    text += f""": the SYN waits inside the engineer's WireGuard
while it makes its handshake with the lane, and goes through after it.

**What it means.** The controller and the agent together take {ca['p50']} ms at the median and {ca['max']} ms
at worst, from the approval being sent to the activation being answered with the lane open. That part alone
{verdict}. It is spent in two API calls (medians). Approving takes {a_all['approve_ms']['p50']} ms: the step-up,
the request's row locked, the approval and its audit event written (SQLite). Activating takes
{a_all['activate_ms']['p50']} ms. Of that, {a_all['ack_ms']['p50']} ms runs from the activation's start to the node's
acknowledgement: the policy decides again, the lease, the commit, the desired state built and sent over the
link, the agent opening the lane (its own namespace, wireguard-go, nft; see *Lanes on one node agent*
above) and its `applied`. The rest is the step-up, the HTTP round trip and the answer. The engineer's side
then adds the config download ({a_all['config_ms']['p50']} ms) and the bring-up:
{pre.get('up_ms', {}).get('p50', '–')} ms for a client that keeps its interface, {wq.get('up_ms', {}).get('p50', '–')} ms for
`wg-quick up`, which starts a wireguard-go ({wq_share:.0%} of wg-quick's config → first packet). From approval to
first packet: {pre.get('total_ms', {}).get('p50', '–')} ms (p50) with the interface made beforehand,
{wq.get('total_ms', {}).get('p50', '–')} ms with wg-quick. The faster way {whole}; it is well under the seconds
comparable products take. These are the calls production makes, on a shared two-vCPU machine: in the median
run the controller's and the agent's threads waited {a_all['cpu_wait_ms']['p50']} ms in all for a CPU, in the worst
{a_all['cpu_wait_ms']['max']} ms (summed over threads, from `/proc/<pid>/task/*/schedstat`; it bounds what a quiet
machine would save rather than measuring it). A real approval has a person between approving and activating; that wait is not in
these numbers.

### One controller, many agents

**Set-up.** The controller runs as its own process on loopback. It is `wicket-controller serve`'s own
code (`create_app` and uvicorn, SQLite, the link on 127.0.0.1, heartbeat 10 s, session clock on), plus one
thread reading commands on stdin for the same-process push below (`--controller-worker`). The agents are
{', '.join(fleet['levels'])} copies of the real link client (`nodeagent.link.LinkClient`: TLS 1.3, client
certificates) in the bench process. Each was enrolled with its own join token (`nodeagent.enroll.enroll`).
Behind each client a fake agent takes every desired state at once and records when it arrived: no lanes,
no data plane. Each level starts from a fresh controller process and fresh clients.

Enrolling {fleet['enrol']['n']} agents one after another took {fleet['enrol']['p50']} ms each at the median
({fleet['enrol']['max']} ms at most): keys made, TLS, the token redeemed, a certificate issued.

What was measured, at each level:
- *RSS and threads*: `VmRSS` and `Threads` from `/proc/<pid>/status`, fresh (no agent linked) and 3 s after
  every agent was linked.
- *Idle CPU*: CPU time over 5 s of wall time while nothing happens but the links' own traffic (pings,
  each agent's status every 5 s, the generation poll), for the controller and for the bench process that
  holds the simulated agents.
- *Link-up*: all agents started at once; the time until each had received its first desired state.
- *One node's push*: one node's generation bumped inside the controller process, as an activation does,
  while the other links idle; {a['one_reps']} times, a different node each time.
- *Every node's push*: every node's generation bumped in one transaction, {a['push_reps']} times per path.
  *Same process*: inside the controller process, which then wakes each connection (what the controller's
  own changes do). *Other process*: from the bench process with its own database connection (what
  another replica or a tool does), found by the controller's generation poll every 0.5 s. Latency runs from
  the commit to each agent's apply (the p50 and p99 over every agent and round; "last" is the round's
  slowest agent, median of the rounds). "Acknowledged" runs until every node's `applied_generation` is
  stored. "CPU per agent" is the controller's CPU time during the round, less its idle rate, per agent.
- *A commit*: one small write transaction on this disk with the controller's SQLite settings (WAL,
  `synchronous=FULL`), {fleet['commit']['n']} times.
- *Restart*: SIGTERM (the controller says goodbye on every link), start again, until every agent has its
  state on a new link, timed from the moment the old process was gone. At {list(fleet['levels'])[-1]} agents the
  controller is restarted three times in a row.

| | {' | '.join(f'{int(k):,} agents' for k in fleet['levels'])} |
|---|{'---|' * len(fleet['levels'])}
"""
    lv = fleet["levels"]

    def line(label, f):
        return f"| {label} | {' | '.join(str(f(v)) for v in lv.values())} |\n"

    text += line("controller RSS, fresh → with the agents linked (MB)",
                 lambda v: f"{v['rss_fresh_kb'] / 1024:.1f} → {v['rss_kb'] / 1024:.1f}")
    text += line("of it, per linked agent (KB)", lambda v: round((v["rss_kb"] - v["rss_fresh_kb"]) / v["linked"]))
    text += line("controller threads, fresh → linked", lambda v: f"{v['threads_fresh']} → {v['threads']}")
    text += line("controller CPU while idle (share of one core)", lambda v: v["idle_cpu"]["controller"])
    text += line("simulated agents' CPU while idle (bench process)", lambda v: v["idle_cpu"]["agents"])
    text += line("link-up of all at once: p50 / last (ms)", lambda v: f"{v['connect']['p50']} / {v['connect']['max']}")
    text += line("one node's push, the others idle: p50 / p99 / max (ms)",
                 lambda v: f"{v['push']['one_node']['p50']} / {v['push']['one_node']['p99']} / {v['push']['one_node']['max']}")
    for path, label in (("same_process", "same process"), ("cross_process", "other process")):
        text += line(f"every node's push, {label}: p50 / p99 / last (ms)",
                     lambda v, p=path: f"{v['push'][p]['p50']} / {v['push'][p]['p99']} / {round(v['push'][p]['last_ms'], 1)}")
        text += line(f"every node's push, {label}: all acknowledged (ms)", lambda v, p=path: round(v["push"][p]["acked_ms"], 1))
        text += line(f"every node's push, {label}: controller CPU per agent (ms)",
                     lambda v, p=path: round(v["push"][p]["controller_cpu_ms_per_agent"], 2))
    text += line("restart: every agent linked again, after the stop (s)", lambda v: v["restart"]["all_s"])
    text += line("of it, until the new controller answered its health check (s)", lambda v: v["restart"]["start_s"])
    fs = s["fleet"]
    levels = list(lv)
    lo, hi = levels[0], levels[-1]
    ratio = fs[f"ratio_{hi}_over_{lo}"]
    top = lv[hi]
    again = top.get("restarts_more")
    per_kb = fs["rss_per_agent_kb"][hi]
    idle_per_agent_us = top["idle_cpu"]["controller"] / int(hi) * 1e6
    one = {k: v["push"]["one_node"]["p50"] for k, v in lv.items()}
    one_growth = one[hi] / one[lo] if one[lo] else 0
    slope_kb = (top["rss_kb"] - lv[lo]["rss_kb"]) / (int(hi) - int(lo))
    same_threads = len({v["threads"] for v in lv.values()}) == 1
    first_all = top["restart"]["all_s"]
    commit = fleet["commit"]
    sp = top["push"]["same_process"]
    busy_text = (" Much of the round went to waiting for a CPU, not to the controller's own work."
                 if sp["controller_cpu_wait_ms"] > 0.5 * sp["wall_ms"] else "")
    text += f"""
Ratios {int(hi):,} / {int(lo):,} agents (× {int(hi) / int(lo):g} agents): memory added by the links × {ratio['rss_growth']},
idle CPU × {ratio.get('idle_cpu_share', '–')}, link-up of all × {ratio.get('connect_all_last_s', '–')}, one node's push
(p50) × {ratio.get('one_node_push_p50_ms', '–')}, every node's push (last agent) × {ratio.get('all_same_process_last_ms', '–')} in the same process and
× {ratio.get('all_cross_process_last_ms', '–')} from another, everyone linked again after a restart × {ratio.get('restart_all_linked_s', '–')}.

**What it means for an operator.**
- *Memory*: {int(hi):,} linked agents added {(top['rss_kb'] - top['rss_fresh_kb']) / 1024:.0f} MB to a controller that
  started at {top['rss_fresh_kb'] / 1024:.0f} MB: {per_kb} KB per agent, and {slope_kb:.0f} KB per agent added between
  {int(lo):,} and {int(hi):,} (the first links also pay for code and buffers used the first time).
  {"The number of threads did not grow with the links: they share one asyncio loop and its worker threads." if same_threads else
   "The number of threads grew: " + " / ".join(str(v["threads"]) for v in lv.values()) + "."}
- *Idle*: with {int(hi):,} agents linked and nothing changing, the controller used {top['idle_cpu']['controller']:.1%} of
  one core, about {idle_per_agent_us:.0f} µs per agent per second. It pays for one generation query every 0.5 s
  for all links together, and per agent for a status every 5 s and a ping with a certificate check every
  heartbeat (10 s), each of the last two a write to the database: {int(hi) * (1 / 5 + 1 / 10):.0f} write transactions a second
  at {int(hi):,} agents.
- *An activation while many agents are linked*: one node's push took {' / '.join(f'{v} ms' for v in one.values())}
  at the median with {' / '.join(levels)} agents linked (the slowest of {a['one_reps']}:
  {' / '.join(f"{v['push']['one_node']['max']} ms" for v in lv.values())}). {"At the median, the idle links hardly delay another node's lane." if one_growth <= 1.5 else
  f"It grew × {one_growth:.1f} with the links."}
- *A change for many nodes at once* (the session clock ending sessions on many nodes in one tick, say): the
  last of {int(hi):,} agents had its state {round(top['push']['same_process']['last_ms'])} ms after the commit, and every
  acknowledgement was stored after {round(top['push']['same_process']['acked_ms'])} ms. The controller spent about
  {top['push']['same_process']['controller_cpu_ms_per_agent']} ms of CPU per agent (the state read, built and sent, the
  `applied` checked and stored). In a round of {sp['wall_ms'] / 1000:.1f} s it used {sp['controller_cpu_share']:.0%} of a
  core, and its threads waited {sp['controller_cpu_wait_ms'] / 1000:.1f} s in all for a CPU held by other
  processes: the simulated agents ({sp['agents_cpu_share']:.0%} of a core) and whatever else ran.{busy_text}
  Each acknowledgement is a write transaction of its own, and SQLite takes one writer at a time; one small
  commit costs {commit['p50']} ms on this disk (p99 {commit['p99']} ms), so the commits alone account for about
  {int(hi) * commit['p50'] / 1000:.1f} s of it. A change made by
  another process or replica waits for the 0.5 s generation poll as well: median
  {top['push']['cross_process']['p50']} ms, last agent {round(top['push']['cross_process']['last_ms'])} ms.
- *Restart*: after a controller restart every one of {int(hi):,} agents was linked again {first_all} s after
  the old process ended. The new process took {top['restart']['start_s']} s to answer; the rest is the agents'
  reconnect pauses and the link-ups themselves. An agent whose link dropped tries again after about 1 s, and
  after each failed attempt in a row waits twice as long (2, 4, 8 s…, up to 30 s, each ±25 %), so its attempts
  fall about 1, 3 and 7 s after the drop while the controller starts ({int(hi):,} agents
  dialling at once were all linked after {top['connect']['max'] / 1000:.1f} s on a running controller, which
  stores two write transactions per link-up).{_again_text(again, top) if again else ''}
- The simulated agents are not free either: {int(hi):,} link clients in one process used
  {top['idle_cpu']['agents']:.1%} of a core while idle. Each client looks at its evidence directory and its
  certificate every 0.25 s. On a router that is one client; here they took CPU from the controller on the
  same two vCPUs, so the times for many nodes at once are upper bounds for a controller on its own host.
"""
    return text


def _again_text(more: list[dict], top: dict) -> str:
    first = top["restart"]
    all_s = [first["all_s"], *(x["all_s"] for x in more)]
    text = (f" Restarted {len(all_s)} times in a row, every agent was linked again after "
            f"{' / '.join(f'{x} s' for x in all_s)} (per agent, p50 "
            f"{' / '.join(f'{x / 1000:.1f} s' for x in [first['relink']['p50'], *(m['relink']['p50'] for m in more)])}).")
    if all_s[-1] <= all_s[0] * 1.2:
        text += " Earlier drops do not lengthen the next pause: the count starts again after every link that was up."
    else:
        text += " The later restarts took longer."
    return text


if __name__ == "__main__":
    sys.exit(main())
