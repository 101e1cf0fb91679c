"""A curious contractor against our own lanes, in the lab: full nmap scans through a lane, forged sources
inside the tunnel, IPv6, another engineer's key. Real agent, wireguard-go, nftables and conntrack; the
engineer routes everything into the tunnel, as someone looking around would.

(A captured config replayed after its session is revoked needs the controller: tests/test_session_lab.py.)
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from tests.lab.peers import answering_ports
from tests.lab.site import (
    AgentProcess,
    Engineer,
    device_meter,
    device_meter_bytes,
    lane_for,
    router_leftovers,
    serve,
    wait_for,
)

pytestmark = pytest.mark.lab

# listeners everywhere a lane must not reach: other services on the device, the other device, the SCADA
# master, the controller's link and API ports, the router's own management port
LISTEN = {"rtu1": dict(tcp=(2404, 502, 4059), udp=(20000, 4059)), "rtu2": dict(tcp=(2404, 502), udp=(20000,)),
          "scada": dict(tcp=(2404,), udp=(2404,)), "ctl": dict(tcp=(7443, 8080)), "rtr": dict(tcp=(2222,), udp=(2222,))}


# the ports worth a second look (the full range is scanned from the first engineer, and from the second over UDP)
FEW = "1-1024,2222,2404,4059,7443,8080,20000"


@pytest.fixture
def adversary_lab():
    yield from _lab(ipv6=False)


@pytest.fixture
def adversary_lab6():
    yield from _lab(ipv6=True)


def _lab(ipv6: bool):
    from tests.lab import Lab, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Lab(masters=("scada", "ctl"), ipv6=ipv6) as lab:
        agent = AgentProcess(lab).start()
        servers = [serve(lab, role, v6=ipv6, **ports) for role, ports in LISTEN.items()]
        engineers = {role: Engineer(lab, role) for role in lab.engineers}
        try:
            yield lab, agent, engineers
        finally:
            for e in engineers.values():
                e.forget()
            agent.stop()
            for s in servers:
                s.kill()
            agent.remove_state()
    assert not lab.cleanup_errors, lab.cleanup_errors


def _targets(lab) -> list[str]:
    """Every lab host a lane's engineer could try, through the tunnel: both devices, the SCADA master, the
    controller, the router's device-side address (its WAN address is where the tunnel itself goes)."""
    return [lab.addr("rtu1"), lab.addr("rtu2"), lab.addr("scada"), lab.addr("ctl"), lab.router_lan]


def test_full_scans_through_lanes_find_exactly_the_granted_ports_and_nothing_after_expiry(adversary_lab):
    lab, agent, eng = adversary_lab
    e1, e2 = eng["eng1"], eng["eng2"]
    rtu1, rtu2 = lab.addr("rtu1"), lab.addr("rtu2")
    targets = _targets(lab)

    # the listeners are there and a scan sees them: the SCADA master (routed, no lane) finds them open
    seen = answering_ports(lab, "scada", [rtu1, rtu2, lab.addr("ctl"), lab.router_ops], ports="502,2222,2404,7443,8080")
    assert {(rtu1, 2404), (rtu1, 502), (rtu2, 2404), (lab.addr("ctl"), 7443), (lab.addr("ctl"), 8080),
            (lab.router_ops, 2222)} <= set(seen), seen

    # long enough for the scans on a slow machine; the end is brought forward once they are done
    tcp_lane = lane_for(e1, rtu1, "s-tcp", 600, port=2404, listen_port=51820, index=2)
    udp_lane = lane_for(e2, rtu2, "s-udp", 600, port=20000, transport="udp", listen_port=51821, index=3)
    report = agent.apply([tcp_lane, udp_lane])
    assert not report["errors"], report
    keys = {sid: agent.lane(sid)["node_public_key"] for sid in ("s-tcp", "s-udp")}
    e1.up(e1.config_for(tcp_lane, keys["s-tcp"]))
    e2.up(e2.config_for(udp_lane, keys["s-udp"]))
    e1.route_everything_into_tunnel(keys["s-tcp"], [*targets, lab.router_ops])
    e2.route_everything_into_tunnel(keys["s-udp"], [*targets, lab.router_ops])

    # each engineer: the full range of its lane's protocol on every host, the likely ports of the other one;
    # nothing may answer but the granted port
    # (the two engineers scan at the same time: each scan is bound by its own wireguard-go, on its own core)
    tcp_full, udp_full = _both(lambda: answering_ports(lab, "eng1", targets),
                               lambda: answering_ports(lab, "eng2", targets, udp=True))
    assert set(tcp_full) <= {(rtu1, 2404)}
    assert set(udp_full) <= {(rtu2, 20000)}
    assert answering_ports(lab, "eng1", [*targets, lab.router_ops], udp=True, ports=FEW) == {}
    assert answering_ports(lab, "eng1", [lab.router_ops], ports=FEW) == {}, "the router's other address"
    assert answering_ports(lab, "eng2", [*targets, lab.router_ops], ports=FEW) == {}, "a UDP lane opens no TCP port"
    # a scan at speed loses a probe now and then: the granted ports, asked again, do answer (the scans can see)
    assert answering_ports(lab, "eng1", [rtu1], ports="2404", retries=4) == {(rtu1, 2404): "open"}
    assert answering_ports(lab, "eng2", [rtu2], udp=True, ports="20000", retries=4) == {(rtu2, 20000): "open"}

    # the other engineer, with the first lane's config but their own key, gets nothing from it
    e2.up(e2.config_for(tcp_lane, keys["s-tcp"]))
    e2.route_everything_into_tunnel(keys["s-tcp"], targets)
    assert e2.probe(rtu1, 2404, timeout=2) == "timeout"
    assert answering_ports(lab, "eng2", [rtu1], ports="2404", retries=4) == {}
    e2.up(e2.config_for(udp_lane, keys["s-udp"]))
    e2.route_everything_into_tunnel(keys["s-udp"], targets)

    # the lanes' end comes forward (as when a session is shortened) and passes on the agent's clock
    end = datetime.now(UTC) + timedelta(seconds=2)
    assert not agent.apply([tcp_lane.model_copy(update={"end_time": end}), udp_lane.model_copy(update={"end_time": end})])["errors"]
    time.sleep(max(0.0, end.timestamp() + 2 - time.time()))
    assert wait_for(lambda: not any(router_leftovers(lab).values()), timeout=3), router_leftovers(lab)
    # nothing can answer now, so each probe goes once
    tcp_after, udp_after = _both(lambda: answering_ports(lab, "eng1", targets, retries=0),
                                 lambda: answering_ports(lab, "eng2", targets, udp=True, retries=0))
    assert tcp_after == {}, "a port still open after the lane ended"
    assert udp_after == {}, "a UDP port still answers after the lane ended"


def _both(first, second):
    """Two scans side by side; both results (an exception in either is raised here)."""
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(first), pool.submit(second)
        return a.result(), b.result()


def test_forged_sources_inside_the_tunnel_never_reach_the_device(adversary_lab):
    lab, agent, eng = adversary_lab
    e1 = eng["eng1"]
    rtu1 = lab.addr("rtu1")
    spec = lane_for(e1, rtu1, "s-1", 60, port=2404)
    assert not agent.apply([spec])["errors"]
    lane = agent.lane("s-1")
    e1.up(e1.config_for(spec, lane["node_public_key"]))
    e1.route_everything_into_tunnel(lane["node_public_key"], [rtu1])
    device_meter(lab, "rtu1", "tcp", 2404)
    assert e1.probe(rtu1, 2404) == "open"
    genuine = device_meter_bytes(lab, "rtu1")
    assert genuine > 0

    # sources an engineer might pretend to be: a neighbour's tunnel address, a device, the SCADA master
    forged = ["100.64.0.99", lab.addr("rtu2"), lab.addr("scada")]
    for addr in forged:
        lab.exec("eng1", ["ip", "addr", "add", f"{addr}/32", "dev", e1.ifname])

    def attempt() -> None:  # every forged source, TCP and UDP, side by side (each waits for its timeout)
        tries = [(addr, udp) for addr in forged for udp in (False, True)]
        with ThreadPoolExecutor(len(tries)) as pool:
            got = list(pool.map(lambda t: e1.probe(rtu1, 2404, udp=t[1], timeout=1.5, source=t[0]), tries))
        assert got == ["timeout"] * len(tries), dict(zip(tries, got, strict=True))

    # 1. WireGuard's own check: the router's peer accepts only the engineer's tunnel address
    attempt()
    assert device_meter_bytes(lab, "rtu1") == genuine, "a forged packet reached the device"
    # 2. with that check taken away (the router's peer told to accept any source), the lane's rules alone
    #    still refuse them, and count them as the lane's refused attempts
    before = _refused(lab, lane["lane"])
    lab.exec("rtr", ["wg", "set", lane["lane"], "peer", e1.public_key, "allowed-ips", "0.0.0.0/0"])
    attempt()
    assert device_meter_bytes(lab, "rtu1") == genuine, "a forged packet reached the device past the lane's rules"
    assert _refused(lab, lane["lane"]) > before, "the forged packets did not reach the lane's rules: the test proved nothing"
    assert e1.probe(rtu1, 2404) == "open", "the genuine source still works"


def _refused(lab, lane: str) -> int:
    """Packets the lane's rules refused so far: the lane's element of the agent table's `lane_refused` set."""
    out = json.loads(lab.exec("rtr", ["nft", "-j", "list", "set", "inet", "wicket", "lane_refused"]).stdout)
    for item in out["nftables"]:
        for e in (item.get("set") or {}).get("elem", []):
            if isinstance(e, dict) and e["elem"]["val"] == lane:
                return e["elem"]["counter"]["packets"]
    return 0


def test_no_ipv6_path_through_a_lane(adversary_lab6):
    lab, agent, eng = adversary_lab6
    e1 = eng["eng1"]
    rtu1 = lab.addr("rtu1")
    six = [lab.hosts[r].address6 for r in ("rtu1", "rtu2", "scada", "ctl")] + [lab.router_lan6, lab.router_ops6]
    # the devices do answer on IPv6: the SCADA master reaches the RTU's v6 address through the router
    assert answering_ports(lab, "scada", [lab.hosts["rtu1"].address6], ports="2404") == {(lab.hosts["rtu1"].address6, 2404): "open"}

    spec = lane_for(e1, rtu1, "s-1", 60, port=2404)
    assert not agent.apply([spec])["errors"]
    lane = agent.lane("s-1")
    e1.up(e1.config_for(spec, lane["node_public_key"]))
    # the engineer sends IPv6 into the tunnel from a v6 address of its own; the router's peer is told to take it
    lab.exec("eng1", ["ip", "-6", "addr", "add", "2001:db8:64::2/128", "dev", e1.ifname, "nodad"])
    lab.exec("eng1", ["wg", "set", e1.ifname, "peer", lane["node_public_key"], "allowed-ips", "0.0.0.0/0,::/0"])
    for addr in six:
        lab.exec("eng1", ["ip", "-6", "route", "replace", f"{addr}/128", "dev", e1.ifname])
    lab.exec("rtr", ["wg", "set", lane["lane"], "peer", e1.public_key, "allowed-ips", f"{spec.engineer_address}/32,::/0"])
    lab.exec("rtu1", ["nft", "add table ip6 devmeter6; add chain ip6 devmeter6 input { type filter hook input priority 0; }; "
                             "add rule ip6 devmeter6 input ip6 saddr 2001:db8:64::2 counter"])

    assert e1.probe(rtu1, 2404) == "open", "the lane itself works over IPv4"
    assert e1.probe(lab.hosts["rtu1"].address6, 2404, timeout=2) != "open"
    assert answering_ports(lab, "eng1", six, ports=FEW) == {}
    assert answering_ports(lab, "eng1", six, udp=True, ports=FEW) == {}
    counter = lab.exec("rtu1", ["nft", "list", "table", "ip6", "devmeter6"]).stdout
    assert "packets 0 bytes 0" in counter, f"IPv6 from the tunnel reached the device:\n{counter}"
