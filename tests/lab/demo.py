"""`make demo`: one lane end to end in a lab built for the purpose, on this machine.

An edge router runs the real wicket agent; an engineer uses the standard wg-quick client; two RTUs and
a SCADA master sit behind the router. The engineer gets one device, one port, for a short window: we
show what passes, what does not, the lane closing on its own, and the evidence it leaves.

  python -m tests.lab.demo [--seconds 25] [--fast]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from nodeagent.wire import DesiredNodeState

from . import Lab
from .site import NODE_ID, TUNNEL_NET, AgentProcess, Engineer, lane_for, router_leftovers, serve

BOLD, DIM, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"


class Narrator:
    def __init__(self, fast: bool):
        self.fast = fast
        self.color = sys.stdout.isatty()

    def _c(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.color else text

    def step(self, n: int, title: str) -> None:
        self.pause(0.8)
        print(f"\n{self._c(BOLD, f'{n}. {title}')}")

    def say(self, text: str) -> None:
        print(f"   {text}")

    def show(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            print(self._c(DIM, f"   │ {line}"))

    def check(self, ok: bool, text: str) -> None:
        mark = self._c(GREEN, "✔") if ok else self._c(RED, "✘")
        print(f"   {mark} {text}")
        if not ok:
            raise SystemExit(f"demo failed: {text}")

    def pause(self, seconds: float) -> None:
        if not self.fast:
            time.sleep(seconds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="demo")
    p.add_argument("--seconds", type=int, default=25, help="how long the lane lives")
    p.add_argument("--fast", action="store_true", help="no pauses between steps")
    args = p.parse_args(argv)
    n = Narrator(args.fast)
    print(f"{BOLD if n.color else ''}wicket demo — a just-in-time WireGuard lane, end to end{RESET if n.color else ''}")
    with Lab(devices=("rtu1", "rtu2"), masters=("scada",), engineers=("eng1",)) as lab:
        n.step(1, "The site (network namespaces on this machine)")
        n.say(f"edge router   rtr    public {lab.router_wan}, field LAN {lab.router_lan}, control centre {lab.router_ops}")
        n.say(f"RTU-17        rtu1   {lab.addr('rtu1')}  (IEC-104 on tcp/2404, Modbus on tcp/502)")
        n.say(f"RTU-18        rtu2   {lab.addr('rtu2')}  (IEC-104 on tcp/2404)")
        n.say(f"SCADA master  scada  {lab.addr('scada')}")
        n.say(f"engineer      eng1   {lab.addr('eng1')}  (no route to the site: only the router's public address)")
        servers = [serve(lab, "rtu1", tcp=(2404, 502)), serve(lab, "rtu2", tcp=(2404,)), serve(lab, "scada", tcp=(2404,))]
        agent = AgentProcess(lab).start()
        eng = Engineer(lab, "eng1")
        try:
            status = agent.status()
            n.say(f"wicket-agent runs on the router: backend {status['backend']}, no lanes yet")
            n.check(eng.probe(lab.addr("rtu1"), 2404) in ("unreachable", "timeout", "error:ENETUNREACH"),
                    "without a lane the engineer cannot reach RTU-17")

            n.step(2, "An approved job arrives: IEC-104 diagnostics on RTU-17, for a short window")
            spec = lane_for(eng, lab.addr("rtu1"), "demo-session-1", args.seconds, device_id="RTU-17")
            desired = DesiredNodeState(node_id=NODE_ID, generation=1, settings={"tunnel_networks": [TUNNEL_NET]}, lanes=[spec])
            n.say("the desired node state the controller sends (the engineer brought their own public key):")
            n.show(json.dumps(desired.model_dump(mode="json")["lanes"][0], indent=1))
            t0 = time.perf_counter()
            report = agent.apply([spec])
            took = (time.perf_counter() - t0) * 1000
            for line in report["changes"]:
                n.show(f"[#] {line}")
            n.say(f"the lane was ready in {took:.0f} ms: its own network namespace with one wireguard-go and one peer,")
            n.say("and nft set elements that allow exactly engineer → RTU-17 tcp/2404 until the end time:")
            lane = agent.lane("demo-session-1")
            flow = lab.exec("rtr", ["nft", "list", "set", "inet", "wicket", "lane_flow"]).stdout
            n.show("\n".join(line for line in flow.splitlines() if lane["lane"] in line))

            n.step(3, "The engineer imports the one-peer config into a standard WireGuard client")
            conf = eng.config_for(spec, lane["node_public_key"])
            n.show("\n".join("PrivateKey = (stays on the laptop)" if line.startswith("PrivateKey") else line for line in conf.splitlines()))
            eng.up(conf)
            n.say(f"wg-quick up {eng.ifname}")

            n.step(4, "What passes, and what does not")
            n.check(eng.probe(lab.addr("rtu1"), 2404) == "open", "RTU-17 tcp/2404 (the granted port): open")
            n.check(eng.probe(lab.addr("rtu1"), 502) == "refused", "RTU-17 tcp/502 (Modbus, not granted): refused")
            eng.route_everything_into_tunnel(lane["node_public_key"], [lab.addr("rtu2"), lab.router_lan, lab.addr("scada")])
            n.say("a curious engineer routes everything into the tunnel (AllowedIPs 0.0.0.0/0 on their side):")
            n.check(eng.probe(lab.addr("rtu2"), 2404) != "open", "RTU-18 tcp/2404: refused by the router")
            n.check(eng.probe(lab.addr("scada"), 2404) != "open", "SCADA master: refused")
            n.check(eng.probe(lab.router_lan, 22) != "open", "the router itself: refused")

            n.step(5, "The window closes — on the agent's own clock, connections included")
            holder = eng.start("hold", lab.addr("rtu1"), "2404", "--seconds", str(args.seconds + 10))
            last_said = None
            while (left := spec.end_time.timestamp() - time.time()) > 0:
                if n.color:
                    print(f"\r   an IEC-104 connection is open; the lane closes in {left:4.1f} s ", end="", flush=True)
                elif last_said is None or last_said - left >= 5:
                    n.say(f"an IEC-104 connection is open; the lane closes in {left:.0f} s")
                    last_said = left
                time.sleep(0.2)
            if n.color:
                print()
            result = json.loads(holder.communicate(timeout=30)[0].strip().splitlines()[-1])
            late = result["broken"] - spec.end_time.timestamp() if result["broken"] else None
            n.check(late is not None and late <= 2.0, f"the open connection died {late:.2f} s after the end time ({result['error']})")
            clean = not any(router_leftovers(lab).values())
            n.check(clean, "nothing of the lane is left on the router: no interface, no rule element, no connection")

            n.step(6, "The evidence the agent hands back")
            ev = agent.evidence_for("demo-session-1")
            t = ev["totals"]
            n.say(f"session {ev['session_id']} on {ev['device_id']} ({ev['service']}): {ev['end_reason']}, "
                  f"{ev['lateness_ms']} ms after its end")
            n.say(f"engineer {ev['engineer_address']} from {ev['wireguard']['endpoint']} → device {ev['device_address']} {', '.join(ev['allowed'])}")
            n.say(f"totals: {t['packets_out']} packets / {t['bytes_out']} B out, {t['packets_in']} / {t['bytes_in']} B in, "
                  f"{t['packets_refused']} refused")
            for f in ev["flows"]:
                n.say(f"connection {f['src']}:{f['sport']} → {f['dst']}:{f['dport']} {f['proto']}: "
                      f"{f['bytes_out']} B out, {f['bytes_in']} B in ({f['observed']})")
            for b in ev["blocked"]:
                n.say(f"refused: {b['destination']} {b['proto']}/{b['port']} × {b['packets']}")
            n.say(f"the full record (JSON) stays in {agent.state_dir}/evidence/ after the demo")
            n.show(json.dumps({k: ev[k] for k in ("session_id", "lane", "opened_at", "closed_at", "end_reason", "totals")}, indent=1))
        finally:
            eng.forget()
            agent.stop()
            for s in servers:
                s.kill()
    print("\nlab removed. Next: `make test` runs the whole suite; docs/ explains the design.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
