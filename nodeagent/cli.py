"""`wicket-agent`: the node agent daemon and the site admin's local commands.

  wicket-agent enroll --controller HOST:PORT [--token T]   enrol with a controller (one-time join token)
  wicket-agent run                    start the daemon (foreground; systemd runs it like this)
  wicket-agent apply FILE             hand the daemon a desired node state (JSON; "-" reads stdin)
  wicket-agent status [--json]        lanes being enforced, seconds left, last changes
  wicket-agent close SESSION          end one lane now (evidence is written)
  wicket-agent evidence [--ack ID]    evidence records waiting to be collected
  wicket-agent engineer-config SESSION --endpoint HOST [--private-key-file F] [-o FILE]
  wicket-agent doctor [--json]        can this router enforce lanes, and how
  wicket-agent reset                  close every lane and remove the agent's ruleset
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from datetime import UTC, datetime

from pydantic import ValidationError

from . import __version__
from .config import ConfigError, load
from .control import ControlError, call
from .errors import AgentError
from .wire import DesiredNodeState, LaneSpec


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, {"state_dir": args.state_dir, "tag": getattr(args, "tag", None),
                                 "node_id": getattr(args, "node_id", None), "backend": getattr(args, "backend", None),
                                 "log_level": getattr(args, "log_level", None),
                                 "strict_after_s": getattr(args, "strict_after_s", None),
                                 "clock_sync": getattr(args, "clock_sync", None)})
    except ConfigError as exc:
        print(f"wicket-agent: configuration: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(cfg, args)
    except ControlError as exc:
        print(f"wicket-agent: {exc}", file=sys.stderr)
        return 3
    except AgentError as exc:
        print(f"wicket-agent: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wicket-agent", description="wicket node agent", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--version", action="version", version=f"wicket-agent {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="settings file (default /etc/wicket/agent.toml when present)")
    common.add_argument("--state-dir", default=argparse.SUPPRESS, help="state directory (default /var/lib/wicket-agent)")
    p.add_argument("--config", help="settings file (default /etc/wicket/agent.toml when present)")
    p.add_argument("--state-dir", help="state directory (default /var/lib/wicket-agent)")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    _add = sub.add_parser

    def add_parser(name, **kw):
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser

    r = sub.add_parser("run", help="run the daemon in the foreground")
    r.add_argument("--tag", help="3-character interface tag (lane interfaces are wk<tag>…)")
    r.add_argument("--node-id")
    r.add_argument("--backend", choices=["auto", "userspace", "kernel"])
    r.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    r.add_argument("--strict-after", type=float, dest="strict_after_s", metavar="SECONDS",
                   help="strict mode: end every lane this long after the controller was last heard (0: off)")
    r.add_argument("--clock-sync", choices=["require", "warn"], help="refuse new lanes on an unsynchronised clock (require)")
    r.set_defaults(func=_run)

    n = sub.add_parser("enroll", help="enrol this agent with a controller, using a site admin's one-time join token")
    n.add_argument("--controller", required=True, metavar="HOST:PORT", help="the controller's agent link (default port 7443)")
    n.add_argument("--token", help="the join token (else read from stdin, so it stays out of shell history)")
    n.add_argument("--node-id", help="this agent's name at the controller (default: node_id from the config, or the host name)")
    n.add_argument("--force", action="store_true", help="enrol again, replacing this agent's keys")
    n.set_defaults(func=_enroll)

    a = sub.add_parser("apply", help="apply a desired node state file")
    a.add_argument("file")
    a.set_defaults(func=_apply)

    s = sub.add_parser("status", help="what the agent enforces now")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_status)

    c = sub.add_parser("close", help="close one session's lane now")
    c.add_argument("session")
    c.set_defaults(func=_close)

    e = sub.add_parser("evidence", help="evidence waiting to be collected")
    e.add_argument("--ack", metavar="ID", help="mark one record collected (deletes it from the spool)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_evidence)

    g = sub.add_parser("engineer-config", help="the engineer's wg-quick file for a lane")
    g.add_argument("session")
    g.add_argument("--endpoint", required=True, help="host or address the engineer's client dials")
    g.add_argument("--private-key-file", help="the engineer's private key (else a placeholder line)")
    g.add_argument("-o", "--output", help="write here (0600) instead of stdout")
    g.set_defaults(func=_engineer_config)

    d = sub.add_parser("doctor", help="check this node's kernel, nftables, WireGuard, conntrack, clock and controller link")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_doctor)

    x = sub.add_parser("reset", help="close every lane (with evidence) and remove the ruleset")
    x.set_defaults(func=_reset)
    return p


def _run(cfg, args) -> int:
    from .agent import Agent
    from .control import ControlServer, handler

    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .enroll import LinkFiles
    from .link import LinkClient

    log = logging.getLogger("wicket.agent")
    files = LinkFiles.of(cfg.state_dir)
    if files.enrolled:
        enrolled_as = files.controller()["node_id"]
        if cfg.node_id != enrolled_as:
            log.warning("node_id %s in the settings differs from the enrolled name %s: using %s", cfg.node_id, enrolled_as, enrolled_as)
            cfg.node_id = enrolled_as
    agent = Agent(cfg)
    try:
        agent.start()
    except AgentError as exc:
        log.error("cannot start: %s", exc)
        return 1
    server = ControlServer(cfg.control_socket, agent.requests)
    server.start()
    if files.enrolled:
        agent.link = LinkClient(cfg.state_dir, _submitter(agent), str(agent.state.root / "evidence"), agent.clock.mono, agent.clock.wall)
        agent.link.start()
        log.info("linked mode: desired state comes from the controller at %s:%s; strict mode %s", agent.link.info["host"],
                 agent.link.info["port"], f"after {cfg.strict_after_s:g} s" if cfg.strict_after_s else "off")
    else:
        log.warning("not enrolled: no controller link (`wicket-agent enroll`); desired state only through the local socket")
    synced, why = agent.clock_check()
    if not synced:
        log.log(logging.ERROR if cfg.clock_sync == "require" else logging.WARNING, "clock: %s — %s", why,
                "new lanes are refused until it is synchronised" if cfg.clock_sync == "require" else "clock_sync=warn: opening lanes anyway")

    def _stop(signum, _frame):
        logging.getLogger("wicket.agent").info("signal %d: stopping (lanes stay up and keep their end times)", signum)
        agent.stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    logging.getLogger("wicket.agent").info("wicket-agent %s ready: node %s, control socket %s", __version__, cfg.node_id, cfg.control_socket)
    try:
        agent.serve(handler(agent))
    finally:
        if agent.link is not None:
            agent.link.stop()
        server.close()
        agent.stop()
    return 0


def _submitter(agent):
    """Run one request on the agent's loop thread and wait for its answer (for the link's thread)."""
    import threading

    def submit(request: dict) -> dict:
        done, answer = threading.Event(), {}

        def reply(result: dict) -> None:
            answer.update(result)
            done.set()

        agent.requests.put((request, reply))
        if not done.wait(300):
            return {"ok": False, "error": "agent busy"}
        return answer

    return submit


def _enroll(cfg, args) -> int:
    from .enroll import enroll

    if not args.token and sys.stdin.isatty():
        print("join token (from `wicket sites join-token`): ", end="", file=sys.stderr, flush=True)
    token = args.token if args.token else sys.stdin.readline().strip()
    node = args.node_id or cfg.node_id
    done = enroll(cfg.state_dir, args.controller, token, node, force=args.force)
    print(f"enrolled as {done.node_id} at site {done.site}; certificate valid until {done.not_after.isoformat()}")
    print(f"keys and certificate in {cfg.state_dir}/link (0600). Start the agent: systemctl restart wicket-agent")
    return 0


def _apply(cfg, args) -> int:
    text = sys.stdin.read() if args.file == "-" else open(args.file).read()
    try:
        desired = DesiredNodeState.model_validate_json(text)
    except ValidationError as exc:
        print(f"wicket-agent: {args.file} is not a valid desired state:", file=sys.stderr)
        for err in exc.errors()[:20]:
            print(f"  {'.'.join(str(x) for x in err['loc']) or '(top)'}: {err['msg']}", file=sys.stderr)
        return 2
    answer = call(cfg.control_socket, {"op": "apply", "desired": desired.model_dump(mode="json")})
    return _print_report(answer)


def _close(cfg, args) -> int:
    return _print_report(call(cfg.control_socket, {"op": "close", "session_id": args.session}))


def _reset(cfg, args) -> int:
    return _print_report(call(cfg.control_socket, {"op": "reset"}))


def _print_report(answer: dict) -> int:
    if not answer.get("ok"):
        print(f"wicket-agent: refused: {answer.get('error')}", file=sys.stderr)
        return 1
    report = answer["report"]
    for line in report.get("changes", []):
        print(f"[#] {line}")
    for line in report.get("errors", []):
        print(f"[!] {line}", file=sys.stderr)
    if not report.get("changes") and not report.get("errors"):
        print("no change")
    return 1 if report.get("errors") else 0


def _status(cfg, args) -> int:
    answer = call(cfg.control_socket, {"op": "status"})
    st = answer["status"]
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    print(f"node {st['node_id']}  agent {st['agent_version']}  backend {st['backend']}  generation {st['applied_generation']}")
    print(f"clock synchronised: {st['clock_synchronized']}  evidence waiting: {st['pending_evidence']}")
    if st.get("clock_detail"):
        print(f"clock: {st['clock_detail']}")
    print(f"controller link: {st.get('link') or 'not enrolled (local control socket only)'}"
          + (f"  strict mode: lanes end {st['strict_after_s']:g} s after control is lost" if st.get("strict_after_s") else ""))
    base = st.get("baseline")
    if base:
        print(f"device baselines: {base['devices']} device address(es), {base['profiles']} profile(s), "
              f"hosts without a passport: {'denied' if base['unpassported'] == 'deny' else 'left to the router'}, "
              f"{base['grants']} grant(s)")
        for n in base["names"]:
            extra = f" (kept until {n['stale_until']})" if n["state"] == "stale" else ""
            print(f"  dns {n['fqdn']}: {n['state']}{extra} {','.join(n['addresses']) or '(empty)'}"
                  + (f"  {n['error']}" if n.get("error") else ""))
    else:
        print("device baselines: none (the controller sends none, or this node is not linked)")
    if not st["lanes"]:
        print("no lanes or grants")
    for lane in st["lanes"]:
        left = max(0, int(lane["seconds_left"]))
        if not lane["listen_port"]:  # a grant: a device's own flow, no tunnel
            print(f"  {lane['session_id']:<24} {lane['lane']}  grant  {lane['device_address']} "
                  f"{','.join(lane['allowed'])}  {left // 60:d}m{left % 60:02d}s left")
            continue
        print(
            f"  {lane['session_id']:<24} {lane['lane']}  {lane['engineer_address']} → {lane['device_address']} "
            f"{','.join(lane['allowed'])}  udp/{lane['listen_port']}  {left // 60:d}m{left % 60:02d}s left"
        )
    return 0


def _evidence(cfg, args) -> int:
    if args.ack:
        answer = call(cfg.control_socket, {"op": "evidence", "ack": args.ack})
        print("acknowledged" if answer.get("ok") else f"no evidence record {args.ack}")
        return 0 if answer.get("ok") else 1
    answer = call(cfg.control_socket, {"op": "evidence"})
    records = answer["evidence"]
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    for ident, ev in records.items():
        t = ev["totals"]
        print(
            f"{ident}: {ev['end_reason']} lane {ev['lane']} {ev['engineer_address']} → {ev['device_address']} "
            f"out {t['bytes_out']} B / in {t['bytes_in']} B, refused {t['packets_refused']} pkts, "
            f"{len(ev['flows'])} connections, {len(ev['blocked'])} refused destinations"
        )
    if not records:
        print("no evidence waiting")
    return 0


def _engineer_config(cfg, args) -> int:
    import os

    from .wgquick import render

    st = call(cfg.control_socket, {"op": "status"})["status"]
    lane = next((x for x in st["lanes"] if x["session_id"] == args.session), None)
    if lane is None:
        print(f"wicket-agent: no open lane for session {args.session}", file=sys.stderr)
        return 1
    private = None
    if args.private_key_file:
        private = open(args.private_key_file).read().strip()
    spec = _spec_from_status(lane, private)
    text = render(spec, node_public_key=lane["node_public_key"], endpoint_host=args.endpoint, engineer_private_key=private)
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _spec_from_status(lane: dict, private: str | None) -> LaneSpec:
    from .keys import generate_private, public_of

    flows = []
    for label in lane["allowed"]:
        transport, ports = label.split("/")
        start, _, end = ports.partition("-")
        flows.append({"transport": transport, "port": int(start), "port_end": int(end) if end else None})
    return LaneSpec(
        session_id=lane["session_id"],
        engineer_public_key=public_of(private or generate_private()),
        engineer_address=lane["engineer_address"],
        device_address=lane["device_address"],
        service="lane",
        flows=flows,
        listen_port=lane["listen_port"],
        end_time=datetime.fromisoformat(lane["end_time"]).astimezone(UTC),
    )


def _doctor(cfg, args) -> int:
    from .doctor import run_checks

    checks = run_checks(cfg)
    if args.json:
        print(json.dumps([c.__dict__ for c in checks], indent=1))
    else:
        for c in checks:
            print(f"  [{c.status:>4}] {c.name:<22} {c.detail}")
    return 1 if any(c.status == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
