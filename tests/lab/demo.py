"""`make demo`: the whole product in a lab built for the purpose, on this machine.

The controller runs as its own process (`wicket-controller serve`, SQLite, the shipped timing defaults) in the
lab's `ctl` namespace. The edge router's agent enrols with a one-time join token and dials out to it. An
engineer asks for one device, one port, for a short window; an approver approves; the engineer imports the
one-time config into the standard wg-quick client. We show what passes, what does not, the lane closing on
the agent's own clock, and the signed evidence and audit events the controller keeps.

Every fact shown is also checked: the demo exits 1 with `demo failed: …` when one does not hold.

  python -m tests.lab.demo [--seconds 25] [--fast]
"""

from __future__ import annotations

import argparse
import base64
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime

from . import Lab, unavailable_reason
from .controller import DEVICE, SITE, TASK, LabController, conf_value, ts
from .otpeers import IEC104_POINTS, Master, iec104_gi, start_server
from .site import NODE_ID, AgentProcess, Engineer, py, router_leftovers, serve, wait_for

BOLD, DIM, CYAN, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[36m", "\033[32m", "\033[31m", "\033[0m"
GRACE_S = 2.0  # the product's promise: a lane is gone at most this long after its end time
WHY = "WO-4711 counters stuck on feeder 3"


class DemoFailed(Exception):
    pass


class Narrator:
    def __init__(self, fast: bool):
        self.fast = fast
        self.color = sys.stdout.isatty()
        self.n = 0

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.color else text

    def title(self, text: str) -> None:
        print(self._c(BOLD, text), flush=True)

    def step(self, title: str) -> None:
        self.pause(1.2)
        self.n += 1
        print(f"\n{self._c(BOLD, f'{self.n}. {title}')}", flush=True)

    def say(self, text: str) -> None:
        print(f"   {text}", flush=True)

    def cmd(self, text: str) -> None:
        """What a person would type for this step."""
        print(self._c(CYAN, f"   $ {text}"), flush=True)

    def show(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            print(self._c(DIM, f"   │ {line}"), flush=True)

    def check(self, ok: bool, text: str) -> None:
        mark = self._c(GREEN, "✔") if ok else self._c(RED, "✘")
        print(f"   {mark} {text}", flush=True)
        if not ok:
            raise DemoFailed(text)
        self.pause(0.3)

    def pause(self, seconds: float) -> None:
        if not self.fast:
            time.sleep(seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="demo", description="wicket end to end in a network-namespace lab (needs root)")
    p.add_argument("--seconds", type=int, default=25, help="how long the session lasts (the task's default; 10-300)")
    p.add_argument("--fast", action="store_true", help="no pauses between steps")
    args = p.parse_args(argv)
    if not 10 <= args.seconds <= 300:
        p.error("--seconds must be between 10 and 300")
    if reason := unavailable_reason():
        print(f"demo: cannot build the lab: {reason}", file=sys.stderr)
        return 2
    n = Narrator(args.fast)
    n.title("wicket demo — just-in-time access to one field device, end to end")
    t0 = time.monotonic()
    try:
        with Lab(devices=("rtu1", "rtu2"), masters=("scada", "ctl"), engineers=("eng1",)) as lab:
            _run(lab, n, args.seconds)
    except KeyboardInterrupt:
        print("\ninterrupted: the controller, the agent and the servers are stopped and the lab is removed.", file=sys.stderr)
        return 130
    except DemoFailed as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    print(f"\nDone in {time.monotonic() - t0:.0f} s; the lab is removed. "
          "Next: `make test` runs the whole suite; docs/ explains the design.")
    return 0


def _run(lab: Lab, n: Narrator, seconds: int) -> None:
    workdir = tempfile.mkdtemp(prefix=f"wicket-demo-{lab.run_id}-")
    ctl = LabController(lab, workdir, engineers=1, default_s=seconds,
                        heartbeat_s=10, ack_timeout_s=10, tick_ms=1000)  # the settings' defaults
    agent = AgentProcess(lab)
    eng = Engineer(lab, "eng1")
    servers = []
    try:
        servers = [start_server(lab, "rtu1", "iec104"), serve(lab, "rtu1", tcp=(502,)), serve(lab, "rtu2", tcp=(2404,)),
                   serve(lab, "scada", tcp=(2404,))]
        _site(lab, n)
        _controller(lab, n, ctl, seconds)
        _agent(lab, n, ctl, agent)
        sid = _request_and_approve(n, ctl)
        conf, end = _activate_and_import(lab, n, ctl, eng, sid)
        _traffic(lab, n, ctl, eng, sid, conf)
        _expiry(lab, n, ctl, agent, sid, end)
        _evidence(lab, n, ctl, sid)
        _audit(n, ctl, sid)
        _proof(n, ctl, sid, workdir)
    except Exception:
        _tail("controller log", ctl.log())
        _tail("agent log", agent.log())
        raise
    finally:
        _quietly(eng.forget)
        _quietly(agent.stop)
        _quietly(ctl.close)
        for server in servers:
            _quietly(server.kill)
            _quietly(server.wait, 5)
        _quietly(agent.remove_state)
        shutil.rmtree(workdir, ignore_errors=True)


# ---- the steps ----


def _site(lab: Lab, n: Narrator) -> None:
    n.step("The site: network namespaces on this machine")
    n.say(f"edge router       rtr    public {lab.router_wan}, field LAN {lab.router_lan}, control centre {lab.router_ops}")
    n.say(f"{DEVICE}            rtu1   {lab.addr('rtu1')}   IEC-104 on tcp/2404, Modbus on tcp/502")
    n.say(f"RTU-18            rtu2   {lab.addr('rtu2')}   IEC-104 on tcp/2404")
    n.say(f"SCADA master      scada  {lab.addr('scada')}")
    n.say(f"controller host   ctl    {lab.addr('ctl')}")
    n.say(f"engineer laptop   eng1   {lab.addr('eng1')}   on the internet side: it reaches only the router's public address")
    n.say(f"{DEVICE} runs a real IEC-104 outstation (the c104 library), common address 1, {len(IEC104_POINTS)} points;")
    n.say("echo servers stand in for the other protocol servers")


def _controller(lab: Lab, n: Narrator, ctl: LabController, seconds: int) -> None:
    from sqlalchemy import select

    from controller.models import Device, Site, User

    n.step("The controller: set up once, then started")
    n.say("Set-up goes through the controller's services on its SQLite database (the code behind the API);")
    n.say("an admin types the commands shown, each confirmed with a fresh TOTP code.")
    ctl.setup()
    state = ctl.app.state
    n.cmd("wicket-controller init --admin root")
    with state.auth.factory() as s:
        root = s.scalar(select(User).where(User.username == "root"))
        roles = [g.role for g in root.grants]
        n.check(root is not None and "admin" in roles and root.totp_secret is not None,
                f"first administrator root created (roles: {', '.join(roles)}), TOTP enrolled")
    n.say(f"controller signing key (public): {state.auth.keys.public_signing_key()}")
    n.cmd("wicket policy apply lab.yaml")
    n.say(f"task {TASK}: IEC-104 only, on substation RTUs, for engineers; {seconds} s by default; one approval")
    with state.auth.factory() as s:
        site = s.scalar(select(Site).where(Site.name == SITE))
        device = s.scalar(select(Device).where(Device.asset_id == DEVICE))
        n.cmd(f"wicket sites add {site.name} --display-name {site.display_name!r} --time-zone {site.time_zone} "
              f"--tunnel-pool {site.tunnel_pool} --ports {site.port_min}-{site.port_max} --endpoint {site.public_endpoint} "
              + " ".join(f"--lan-network {net}" for net in site.lan_networks))
        n.cmd(f"wicket devices add {device.asset_id} --type {device.device_type} --site {site.name} "
              + " ".join(f"--address {a}" for a in device.addresses) + f" --lifecycle {device.lifecycle}")
    for who, role in (("alex", "approver"), ("erin", "engineer")):
        n.cmd(f"wicket users add {who} --display-name {who.title()} --role {role}@{SITE}")
        n.cmd(f"wicket users enrol-totp {who} --qr")
    n.cmd(f"wicket-controller serve --port 8080   # in namespace ctl; the agent link listens on {ctl.link} (TLS)")
    ctl.start()
    n.check(ctl.proc is not None and ctl.proc.poll() is None,
            f"controller running (pid {ctl.proc.pid}), database {ctl.env['WICKET_DATABASE_URL']}")
    n.say(f"settings: session clock every {ctl.env['WICKET_SESSION_TICK_MS']} ms, link heartbeat {ctl.env['WICKET_LINK_HEARTBEAT_S']} s, "
          f"a lane must be acknowledged within {ctl.env['WICKET_ACK_TIMEOUT_S']} s")
    with state.auth.factory() as s:
        people = {u.username: u for u in s.scalars(select(User).where(User.username.in_(("alex", "erin"))))}
        for who in ("alex", "erin"):
            u = people.get(who)
            n.check(u is not None and u.totp_confirmed,
                    f"{who} logged in with password and TOTP ({', '.join(f'{g.role}@{g.site}' for g in u.grants) if u else '-'})")


def _agent(lab: Lab, n: Narrator, ctl: LabController, agent: AgentProcess) -> None:
    from nodeagent.clock import clock_synchronized

    n.step("The router's agent joins with a one-time token")
    made = ctl.app.state.agents.create_token(ctl.root, SITE, None, None)
    n.cmd(f"wicket sites join-token {SITE} --link {ctl.link}")
    n.say(f"join token {_redact_token(made.token)}")
    n.say(f"(the secret part is redacted here; usable once, until {_hms(made.expires_at)})")
    n.say("on the router, as root (the token on stdin):")
    n.cmd(f"wicket-agent enroll --controller {ctl.link} --node-id {NODE_ID}")
    # ctl.enrol(agent) does the same with a token of its own; this one is made here so it can be shown
    out = lab.exec("rtr", py("nodeagent.cli", "enroll", "--state-dir", agent.state_dir, "--controller", ctl.link,
                             "--node-id", NODE_ID), input=made.token + "\n", timeout=60, check=False)
    n.show(out.stdout)
    n.check(out.returncode == 0 and f"enrolled as {NODE_ID}" in out.stdout,
            f"enrolled over TLS: the agent checked the controller's CA pin, the controller issued its certificate{_err(out)}")
    spare = tempfile.mkdtemp(prefix=f"wicket-demo-{lab.run_id}-spare-")
    try:
        again = lab.exec("rtr", py("nodeagent.cli", "enroll", "--state-dir", spare, "--controller", ctl.link,
                                   "--node-id", "site-2"), input=made.token + "\n", timeout=60, check=False)
    finally:
        shutil.rmtree(spare, ignore_errors=True)
    n.check(again.returncode != 0, f"the same token a second time: refused ({_last_line(again.stderr or again.stdout)})")

    synced, why = clock_synchronized()
    n.cmd(f"wicket-agent run --node-id {NODE_ID}" + ("" if synced else " --clock-sync warn"))
    if not synced:
        n.say(f"(this machine's {why}: a real router runs NTP and keeps the default, which refuses new lanes then)")
    agent.start()
    linked = wait_for(lambda: (agent.status().get("link") or "").startswith("connected"), timeout=15)
    n.check(bool(linked), f"agent: {agent.status().get('link')}")
    n.cmd("wicket agents")
    rows = wait_for(lambda: [r for r in ctl.agents() if r["name"] == NODE_ID and r["connected"]], timeout=10)
    row = rows[0] if rows else {}
    n.check(bool(rows), f"controller: {NODE_ID} at {row.get('site')} connected, protocol {row.get('protocol_version')}, "
                        f"agent {row.get('agent_version')}, certificate until {_hms(row.get('certificate_not_after'))}")


def _request_and_approve(n: Narrator, ctl: LabController) -> str:
    n.step(f"Erin asks for {DEVICE}, for one task")
    n.cmd(f"wicket request --device {DEVICE} --task {TASK} --reason {WHY!r}   # asks for a TOTP code")
    asked = ctl.call("POST", "/sessions", "erin", step_up=True, expect=201,
                     json={"device": DEVICE, "task": TASK, "reason": WHY}).json()
    sid = asked["id"]
    decision = asked["decision"]
    n.say(f"policy {decision.get('policy_version', '?')[:19]}…: {decision.get('outcome')}; the checks it made:")
    n.show("\n".join(f"{c['result']:<6} {c['check']}: {c.get('reason') or '-'}" for c in decision.get("trace", [])))
    n.check(asked["state"] == "pending_approval", f"session {sid}: {asked['state']} (the task needs one approver)")

    n.step("Alex, the approver, sees the queue and approves")
    n.cmd("wicket approvals")
    queue = ctl.call("GET", "/approvals", "alex").json()
    n.show("\n".join(f"{q['session']['id']}  {q['session']['user']} → {q['session']['device']}  {q['session']['task']}  "
                     f"{q['session']['duration']}  \"{q['session']['reason']}\"  ({q['approvals_so_far']}/{q['approvals_required']})"
                     for q in queue) or "(empty)")
    n.check(any(q["session"]["id"] == sid for q in queue), f"{sid} is in alex's queue")
    n.cmd(f"wicket approve {sid} --reason 'matches the fault ticket'")
    answered = ctl.call("POST", f"/sessions/{sid}/approve", "alex", step_up=True,
                        json={"reason": "matches the fault ticket"}).json()
    n.check(answered["state"] == "approved" and any(a["approver"] == "alex" for a in answered["approvals"]),
            f"{sid}: {answered['state']} by alex (nobody approves their own request)")
    return sid


def _activate_and_import(lab: Lab, n: Narrator, ctl: LabController, eng: Engineer, sid: str) -> tuple[str, float]:
    n.step("Erin opens the lane and imports the one-time config")
    n.cmd(f"wicket activate {sid}")
    t = time.monotonic()
    active = ctl.call("POST", f"/sessions/{sid}/activate", "erin", step_up=True, json={}).json()
    took = time.monotonic() - t
    end = ts(active["end_at"])
    n.check(active["state"] == "active" and active["node"] == NODE_ID,
            f"{sid}: {active['state']} in {took:.1f} s — the agent on {active['node']} acknowledged the lane over the link")
    n.say(f"{active['device']} {', '.join(_flow(f) for f in active['flows'])} for {active['duration']}: "
          f"ends at {_hms(active['end_at'])} UTC; erin's tunnel address {active['tunnel_address']}")
    n.cmd(f"wicket config {sid} -o {sid}.conf")
    res = ctl.call("GET", f"/sessions/{sid}/config", "erin")
    conf = res.text
    n.show("\n".join("PrivateKey = (redacted here: minted for this session, erased from the controller now)"
                     if line.startswith("PrivateKey") else line for line in conf.splitlines()))
    n.check(conf_value(conf, "AllowedIPs") == f"{lab.addr('rtu1')}/32", "AllowedIPs is the one device")
    n.cmd(f"wg-quick up ./{sid}.conf")
    eng.up(conf)
    n.say(f"(the lab names the file {eng.ifname}.conf, so the interface name is unique on this machine)")
    return conf, end


def _traffic(lab: Lab, n: Narrator, ctl: LabController, eng: Engineer, sid: str, conf: str) -> None:
    n.step("What passes, and what does not")
    rtu1 = lab.addr("rtu1")
    n.say("erin's IEC-104 client (c104) connects, starts data transfer and asks for a general interrogation:")
    n.cmd(f"python -m tests.lab.otpeers iec104-gi --host {rtu1} --port 2404")
    got = iec104_gi(lab, "eng1", rtu1, timeout=3)
    points = got.get("points") or {}
    n.show("\n".join(f"IOA {ioa}  {IEC104_POINTS[int(ioa)][0] if int(ioa) in IEC104_POINTS else '?':<10} {value}"
                     for ioa, value in sorted(points.items())) or f"(no points: {got.get('error')})")
    wanted = {str(ioa): value for ioa, (_, value) in IEC104_POINTS.items()}
    n.check(got.get("exit") == 0 and points == wanted,
            f"the lane reached {DEVICE} tcp/2404: the general interrogation returned its {len(points)} points "
            f"in {got.get('seconds', 0):.2f} s" if points == wanted else
            f"the general interrogation of {DEVICE} through the lane did not return its points: {got}")
    result = eng.probe(lab.addr("rtu1"), 502)
    n.check(result == "refused", f"{DEVICE} tcp/502 (Modbus, not granted): {result}")
    n.say("a curious engineer routes more into the tunnel (AllowedIPs 0.0.0.0/0 on their side):")
    eng.route_everything_into_tunnel(conf_value(conf, "PublicKey"), [lab.addr("rtu2"), lab.router_lan, lab.addr("scada")])
    for name, host, port in (("RTU-18", lab.addr("rtu2"), 2404), ("SCADA master", lab.addr("scada"), 2404),
                             ("the router itself", lab.router_lan, 22)):
        result = eng.probe(host, port)
        n.check(result == "refused", f"{name} {host} tcp/{port}: {result} by the router")
    n.say("(each refusal is a TCP reset from the router, and counted for the evidence)")
    n.cmd(f"wicket config {sid} -o again.conf")
    again = ctl.call("GET", f"/sessions/{sid}/config", "erin", expect=None)
    n.check(again.status_code == 410, f"a second download of the config: refused ({again.status_code} {_detail(again)})")


def _expiry(lab: Lab, n: Narrator, ctl: LabController, agent: AgentProcess, sid: str, end: float) -> None:
    n.step("The end time: the agent closes the lane on its own clock")
    lane = agent.lane(sid)
    n.check(lane is not None, f"lane {lane and lane['lane']} is open on the router")
    master = Master(lab, "eng1", lab.addr("rtu1"), interval=0.2, timeout=0.5, seconds=end - time.time() + 10,
                    stop_on_failure=True).start()
    n.say(f"erin's IEC-104 client keeps one connection and interrogates {DEVICE} every 0.2 s through the end ({_hms(end)} UTC)")
    last_said = None
    while (left := end - time.time()) > 0.5:
        if n.color:
            print(f"\r   the lane closes in {left:4.1f} s ", end="", flush=True)
        elif last_said is None or last_said - left >= 5:
            n.say(f"the lane closes in {left:.0f} s")
            last_said = left
        time.sleep(0.2)
    if n.color:
        print()
    gone_at = wait_for(lambda: time.time() if agent.lane(sid) is None else None, timeout=end - time.time() + 10, interval=0.05)
    late = gone_at - end if gone_at else None
    n.check(late is not None and late <= GRACE_S, f"the lane was gone {late:.2f} s after the end time (at most {GRACE_S:.0f} s)"
            if late is not None else "the lane was still there 10 s after the end time")
    held = master.wait(30)
    broke, last = held.get("broken"), held.get("last_ok")
    n.check(broke is not None and last is not None and broke - end <= GRACE_S,
            f"erin's open connection: {held.get('ok')} interrogations answered, the last {last - end:+.2f} s from the end "
            f"time; dead {broke - end:.2f} s after it ({held.get('error')}; her client waits 0.5 s for each answer)"
            if broke and last else f"erin's open connection did not die as it should: {held}")
    leftovers = router_leftovers(lab)
    n.check(not any(leftovers.values()), "nothing of the lane is left on the router: no interface, no rule, no connection"
            if not any(leftovers.values()) else f"left on the router: {leftovers}")
    n.cmd(f"wicket status {sid}")
    after = wait_for(lambda: (s := ctl.session(sid))["state"] == "expired" and s, timeout=10, interval=0.25) or ctl.session(sid)
    n.check(after["state"] == "expired",
            f"the controller shows {sid} {after['state']} ({after['end_reason']}) at {_hms(after['ended_at'])} UTC")


def _evidence(lab: Lab, n: Narrator, ctl: LabController, sid: str) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from sqlalchemy import select

    from controller.models import LaneEvidenceRecord, NodeAgent
    from nodeagent.wire import LaneEvidence, evidence_bytes

    n.step("The evidence the controller received over the link")
    got = wait_for(lambda: [e for e in ctl.evidence() if e["session_id"] == sid], timeout=20, interval=0.25)
    n.check(bool(got), f"evidence received for {sid} from {NODE_ID}")
    ev = got[-1]
    with ctl.app.state.auth.factory() as s:
        rec = s.scalar(select(LaneEvidenceRecord).where(LaneEvidenceRecord.session_id == sid))
        key = s.scalar(select(NodeAgent.evidence_public_key).where(NodeAgent.name == NODE_ID))
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(key)).verify(
            base64.b64decode(rec.signature), evidence_bytes(rec.ident, LaneEvidence.model_validate(rec.body)))
        verified = True
    except (InvalidSignature, ValueError, TypeError):
        verified = False
    n.check(verified, f"signed by the agent (Ed25519 {rec.signature[:16]}…); the signature verifies with the key it enrolled")
    t = ev["totals"]
    n.say(f"{ev['device_id']} {', '.join(ev['allowed'])}, lane {ev['lane']} ({ev['backend']} WireGuard): "
          f"opened {_hms(ev['opened_at'])}, closed {_hms(ev['closed_at'])}, {ev['end_reason']}")
    n.check(ev["end_reason"] == "expired" and ev["lateness_ms"] is not None and ev["lateness_ms"] <= GRACE_S * 1000,
            f"lateness on the agent's own clock: {ev['lateness_ms']} ms after the planned end")
    n.say(f"totals: {t['packets_out']} packets / {t['bytes_out']} B to the device, {t['packets_in']} / {t['bytes_in']} B back, "
          f"{t['packets_refused']} packets refused")
    n.say("connections (IP bytes, from conntrack):")
    n.show("\n".join(f"{f['src']}:{f['sport']} → {f['dst']}:{f['dport']} {f['proto']}: {f['bytes_out']} B out, "
                     f"{f['bytes_in']} B in ({f['observed']})" for f in ev["flows"]) or "(none)")
    n.check(any(f["dst"] == lab.addr("rtu1") and f["dport"] == 2404 and f["bytes_out"] > 0 and f["bytes_in"] > 0 for f in ev["flows"]),
            f"the connections to {DEVICE} tcp/2404 are recorded with their bytes")
    n.say("blocked attempts:")
    n.show("\n".join(f"{b['destination']} {b['proto']}/{b['port']} × {b['packets']}" for b in ev["blocked"]) or "(none)")
    wanted = {(lab.addr("rtu1"), 502), (lab.addr("rtu2"), 2404), (lab.addr("scada"), 2404), (lab.router_lan, 22)}
    seen = {(b["destination"], b["port"]) for b in ev["blocked"]}
    missing = wanted - seen
    n.check(not missing, "every refused attempt is in the evidence" if not missing else f"blocked attempts missing from the evidence: {sorted(missing)}")
    if ev.get("wireguard"):
        wg = ev["wireguard"]
        n.say(f"WireGuard: peer endpoint {wg.get('endpoint')}, {wg.get('rx_bytes')} B received, {wg.get('tx_bytes')} B sent")


def _audit(n: Narrator, ctl: LabController, sid: str) -> None:
    from sqlalchemy import or_, select

    from controller.models import Event

    n.step("The audit trail (the controller's events table)")
    n.cmd("wicket events   # the agent's events and the session's")
    with ctl.app.state.auth.factory() as s:
        rows = s.scalars(select(Event).where(or_(Event.subject == sid, Event.category == "agent")).order_by(Event.seq)).all()
    n.show("\n".join(f"{e.seq:>3}  {_hms(e.at)}  {e.type:<24} {e.result:<8} {e.actor or '-':<14} {e.reason or ''}" for e in rows))
    types = {e.type for e in rows if e.result == "success"}
    needed = ["session.request", "session.approve", "session.activate", "session.open", "session.config",
              "session.expire", "lane.evidence"]
    missing = [t for t in needed if t not in types]
    refused = any(e.type == "session.config" and e.result == "failure" for e in rows)
    n.check(not missing and refused, "request, approval, activation, opening, download, expiry and evidence are recorded, "
            "and the refused second download too" if not missing and refused else f"audit events missing: {missing or 'refused download'}")


def _proof(n: Narrator, ctl: LabController, sid: str, workdir: str) -> None:
    """The session's evidence record, an export bundle verified offline, and a tampered copy caught."""
    import io
    import tarfile

    from controller.audit import bundle, verify

    n.step("The proof: one evidence record, a bundle anyone can check offline")
    state = ctl.app.state
    ev = wait_for(lambda: _evidence_record(state, sid), timeout=15, interval=0.25)
    n.check(ev is not None, f"session.evidence record {ev.seq if ev else '?'} in the chain: who asked and approved, the "
            "device's passport, times, end reason, policy, flows and bytes, the agent's signature" if ev else
            "no session.evidence record")
    if ev:
        b = ev.body
        n.say(f"{b['user']} on {b['device']} ({b['task']}), approved by {', '.join(a['approver'] for a in b['approvals'])}; "
              f"{b['totals']['bytes_out']} B out, {b['totals']['bytes_in']} B in, {len(b['anomalies'])} refused attempts; "
              f"ended: {b['end_reason']}; node evidence {b['node_evidence']}")
    path = f"{workdir}/proof.tar.gz"
    kid = state.audit_signer.key_id
    n.cmd(f"wicket audit export --session {sid} -o proof.tar.gz")
    summary = bundle.export_bundle(state.auth.factory, path, signer=state.audit_signer, session=sid, exported_by="root",
                                   checkpoint_now=lambda: state.checkpointer.run_once(at_head=True))
    n.say(f"records {summary.first_seq}..{summary.last_seq}: {summary.full} of this session in full, "
          f"{summary.redacted} others as hashes only, {summary.checkpoints} signed checkpoint(s)")
    n.cmd(f"wicket audit verify proof.tar.gz --trust {kid}")
    report = verify.verify_bundle(path, [kid])
    n.show(report.text())
    n.check(report.ok, "the bundle verifies offline with the pinned key")
    rows = bundle.who_had_access(verify.bundle_events(path), DEVICE)
    n.check([r["session"] for r in rows] == [sid], f"who had access to {DEVICE}, from the bundle alone: "
            + ", ".join(f"{r['engineer']} ({r['session']}, approved by {', '.join(r['approvers'])})" for r in rows))
    # Change one byte of one record, as someone editing the stored log would, and check again.
    tampered = f"{workdir}/tampered.tar.gz"
    with tarfile.open(path) as src, tarfile.open(tampered, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith("records.log"):
                data = data.replace(b'"result":"success"', b'"result":"failure"', 1)
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    n.cmd("wicket audit verify tampered.tar.gz   # one byte of one record changed")
    bad = verify.verify_bundle(tampered, [kid])
    n.show(bad.text(limit=3))
    n.check(not bad.ok and bad.problems[0].where in ("record", "bundle", "manifest"), f"the change is caught: {bad.problems[0]}"
            if bad.problems else "the change was NOT caught")


def _evidence_record(state, sid: str):
    from sqlalchemy import select

    from controller.models import Event

    with state.auth.factory() as s:
        return s.scalar(select(Event).where(Event.session_ref == sid, Event.type == "session.evidence"))


# ---- helpers ----


def _redact_token(token: str) -> str:
    prefix, ident, secret, pin = token.split(".", 3)
    return f"{prefix}.{ident}.{'•' * 8}.{pin[:12]}…   (wkj1.<id>.<secret>.<controller CA pin>)"


def _hms(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, UTC)
    return value.astimezone(UTC).strftime("%H:%M:%S")


def _flow(f: dict) -> str:
    return f"{f.get('transport', f.get('proto', '?'))}/{f.get('port')}"


def _detail(res) -> str:
    try:
        return res.json().get("detail", res.text)
    except ValueError:
        return res.text


def _err(out) -> str:
    return "" if out.returncode == 0 else f" — exit {out.returncode}: {_last_line(out.stderr)}"


def _last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _tail(what: str, text: str, lines: int = 25) -> None:
    if text.strip():
        print(f"\n--- last lines of the {what} ---", file=sys.stderr)
        print("\n".join(text.rstrip().splitlines()[-lines:]), file=sys.stderr)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - cleanup goes on; the lab's own teardown is the backstop
        print(f"cleanup: {getattr(fn, '__qualname__', fn)}: {exc!r}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
