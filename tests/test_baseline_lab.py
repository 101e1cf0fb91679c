"""Device baselines and grants in the lab: the real agent on the router, real nftables and conntrack,
real peers (a mosquitto broker, a dnsmasq resolver for the FQDN destinations), checked by scanning.

Site: meter1, rtu1, der1 have passports; stray1 has none. Masters: scada (IEC-104 front end), mdm (meter
data management, found by FQDN), broker (MQTT, by FQDN), dns (the resolver). Every master listens on
every protocol's port, so a port that is not open in a scan is closed by the agent, not by the host.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nodeagent.wire import BaselineState, DeviceReport, GrantSpec
from tests.lab.peers import Dnsmasq, mosquitto, open_tcp_ports
from tests.lab.site import AgentProcess, py, serve, wait_for

pytestmark = pytest.mark.lab

PORTS = (2404, 4059, 1883, 443, 502, 22)
MASTERS = ("scada", "mdm", "broker", "dns")
MDM_NAME, BROKER_NAME, FW_NAME = "mdm.grid.example", "broker.der.example", "fw.grid.example"


def baseline(lab, *, unpassported: str = "router") -> BaselineState:
    return BaselineState.model_validate({
        "unpassported": unpassported,
        "device_networks": ["192.0.2.0/24"],
        "destinations": [
            {"name": "scada-master", "addresses": [lab.addr("scada")]},
            {"name": "mdm", "fqdn": MDM_NAME},
            {"name": "der-broker", "fqdn": BROKER_NAME},
            {"name": "fw-repo", "fqdn": FW_NAME},
        ],
        "profiles": [
            {"name": "substation-rtu", "flows": [{"protocol": "iec104", "transport": "tcp", "ports": [2404], "to": ["scada-master"]}]},
            {"name": "meter-concentrator", "flows": [{"protocol": "dlms", "transport": "tcp+udp", "ports": [4059], "to": ["mdm"]}]},
            {"name": "der-gateway", "flows": [{"protocol": "mqtt", "transport": "tcp", "ports": [1883], "to": ["der-broker"]}]},
        ],
        "devices": [
            {"asset_id": "MTR-1", "addresses": [lab.addr("meter1")], "profile": "meter-concentrator"},
            {"asset_id": "RTU-1", "addresses": [lab.addr("rtu1")], "profile": "substation-rtu"},
            {"asset_id": "DER-1", "addresses": [lab.addr("der1")], "profile": "der-gateway"},
        ],
    })


def grant(lab, sid: str, seconds: float, device: str = "meter1", asset: str = "MTR-1") -> GrantSpec:
    return GrantSpec.model_validate({
        "session_id": sid, "device_id": asset, "device_address": lab.addr(device),
        "flows": [{"protocol": "https", "transport": "tcp", "ports": [443], "to": ["fw-repo"]}],
        "end_time": (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(),
    })


@pytest.fixture(scope="module")
def site():
    from tests.lab import Lab, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Lab(devices=("meter1", "rtu1", "der1", "stray1"), masters=MASTERS, engineers=()) as lab:
        for role in ("scada", "mdm"):
            serve(lab, role, tcp=PORTS, udp=(4059,), push=(8443,) if role == "mdm" else ())
        serve(lab, "broker", tcp=tuple(p for p in PORTS if p != 1883))
        mosquitto(lab, "broker", 1883)
        dns = Dnsmasq(lab, "dns", {MDM_NAME: [lab.addr("mdm")], BROKER_NAME: [lab.addr("broker")],
                                   FW_NAME: [lab.addr("mdm")]}, ttl=1).start()
        agent = AgentProcess(lab, extra=["--clock-sync", "warn"])
        conf = Path(agent.state_dir) / "agent.toml"
        conf.write_text(f'dns_servers = "{lab.addr("dns")}"\ndns_min_ttl_s = 1.0\ndns_stale_s = 4.0\nbreach_report_s = 1.0\n')
        agent.extra += ["--config", str(conf)]
        agent.start()
        try:
            yield lab, agent, dns
        finally:
            agent.stop()
            dns.stop()
            agent.remove_state()


def apply(agent, lab, **kw) -> dict:
    grants = kw.pop("grants", ())
    report = agent.apply([], baseline=kw.pop("baseline", None) or baseline(lab, **kw), grants=grants)
    assert not report["errors"], report
    return report


def resolved(agent, lab) -> None:
    """Wait until the agent's report shows both FQDN destinations resolved."""
    wait_for(lambda: _probe(lab, "meter1", lab.addr("mdm"), 4059) == "open", 10)


def _probe(lab, role, host, port, udp=False, timeout=1.0) -> str:
    argv = py("tests.lab.traffic", "probe", host, str(port), "--timeout", str(timeout)) + (["--udp"] if udp else [])
    return lab.exec(role, argv, timeout=timeout + 10).stdout.strip()


def test_each_device_type_reaches_its_destinations_and_nothing_else(site):
    lab, agent, _dns = site
    apply(agent, lab)
    resolved(agent, lab)
    masters = [lab.addr(m) for m in MASTERS]
    ports = ",".join(map(str, PORTS)) + ",53,80,8883,20000"

    assert open_tcp_ports(lab, "meter1", masters, ports) == {(lab.addr("mdm"), 4059)}
    assert _probe(lab, "meter1", lab.addr("mdm"), 4059, udp=True) == "open", "DLMS over UDP too"
    assert open_tcp_ports(lab, "rtu1", masters, ports) == {(lab.addr("scada"), 2404)}
    assert _probe(lab, "rtu1", lab.addr("mdm"), 2404) == "refused", "an RTU's masters only, not the MDM"
    assert open_tcp_ports(lab, "der1", masters, ports) == {(lab.addr("broker"), 1883)}
    # the broker is a real one: a publish from the DER gateway is delivered to a subscriber on the broker host
    assert _mqtt_roundtrip(lab, "der1", lab.addr("broker")) == "delivered"
    # a host without a passport is left to the router's own firewall (the default)
    assert (lab.addr("mdm"), 2404) in open_tcp_ports(lab, "stray1", [lab.addr("mdm")], "2404,4059")
    # the site admin's view
    shown = lab.exec("rtr", py("nodeagent.cli", "--state-dir", agent.state_dir, "status")).stdout
    assert "device baselines: 3 device address(es), 3 profile(s), hosts without a passport: left to the router" in shown
    assert f"dns {MDM_NAME}: ok {lab.addr('mdm')}" in shown, shown


def test_unpassported_hosts_denied_when_the_site_says_so(site):
    lab, agent, _dns = site
    apply(agent, lab, unpassported="deny")
    resolved(agent, lab)
    assert open_tcp_ports(lab, "stray1", [lab.addr(m) for m in MASTERS], ",".join(map(str, PORTS))) == set()
    assert open_tcp_ports(lab, "rtu1", [lab.addr("scada")], "2404") == {(lab.addr("scada"), 2404)}, "passported devices keep theirs"
    apply(agent, lab, unpassported="router")
    assert _probe(lab, "stray1", lab.addr("mdm"), 2404) == "open"


def test_grant_opens_for_its_window_and_kills_connections_at_the_end(site):
    lab, agent, _dns = site
    apply(agent, lab)
    resolved(agent, lab)
    fw = lab.addr("mdm")
    assert _probe(lab, "meter1", fw, 443) == "refused", "no firmware flow before the grant"

    report = apply(agent, lab, grants=[grant(lab, "g-fw-1", 6)])
    assert any("opened grant g-fw-1" in c for c in report["changes"]), report
    assert _probe(lab, "meter1", fw, 443) == "open"
    assert _probe(lab, "rtu1", fw, 443) == "refused", "the grant is the meter's only"
    assert _probe(lab, "meter1", lab.addr("scada"), 443) == "refused", "only to the firmware repository"
    # an established connection during the window dies when the window ends: the agent removes the flow
    # and flushes the grant's conntrack entries
    end = time.time() + 6
    held = lab.spawn("meter1", py("tests.lab.traffic", "hold", fw, "443", "--seconds", "14"), stdout=-1, text=True)
    out = json.loads(held.communicate(timeout=30)[0].strip().splitlines()[-1])
    assert out["broken"] is not None, out
    assert out["last_ok"] > end - 3 and out["broken"] < end + 3, (out, end)
    assert _probe(lab, "meter1", fw, 443) == "refused"
    ev = agent.evidence_for("g-fw-1", timeout=10)
    assert ev["scope"] == "grant" and ev["end_reason"] == "expired", agent.log()[-3000:]
    assert ev["destinations"] == {"fw-repo": [fw]}
    assert ev["flows"] and all(f["dport"] == 443 and f["dst"] == fw for f in ev["flows"])
    assert ev["totals"]["bytes_out"] > 0 and ev["totals"]["bytes_in"] > 0
    assert 0 <= ev["lateness_ms"] < 2000


def test_a_connection_the_far_end_keeps_talking_on_dies_with_the_grant_too(site):
    # After the grant's connections are flushed, the far end's next packet would be taken up by conntrack as a
    # new connection *toward* the device, and the device's answers would then be replies, which no baseline
    # checks. The router drops such a mid-stream packet toward a device.
    lab, agent, _dns = site
    apply(agent, lab)
    resolved(agent, lab)
    fw = lab.addr("mdm")
    spec = grant(lab, "g-fw-push", 5)
    spec = spec.model_copy(update={"flows": [spec.flows[0].model_copy(update={"ports": [8443]})]})
    apply(agent, lab, grants=[spec])
    end = time.time() + 5
    listener = lab.spawn("meter1", py("tests.lab.traffic", "listen", fw, "8443", "--seconds", "12"), stdout=-1, text=True)
    out = json.loads(listener.communicate(timeout=30)[0].strip().splitlines()[-1])
    assert out["connected"] and out["broken"] is not None, out
    assert out["last_rx"] < end + 2, (out, end)


def test_grant_sign_off_ends_it_before_its_time(site):
    lab, agent, _dns = site
    fw = lab.addr("mdm")
    apply(agent, lab, grants=[grant(lab, "g-fw-2", 300)])
    resolved(agent, lab)
    assert _probe(lab, "meter1", fw, 443) == "open"
    agent.close("g-fw-2")  # the local sign-off; the controller's removes it from the desired state
    assert _probe(lab, "meter1", fw, 443) == "refused"
    assert agent.evidence_for("g-fw-2")["end_reason"] == "closed"
    report = apply(agent, lab, grants=[grant(lab, "g-fw-3", 300)])
    assert any("opened grant g-fw-3" in c for c in report["changes"])
    report = apply(agent, lab, grants=[])
    assert any("closed grant g-fw-3" in c and "removed" in c for c in report["changes"]), report
    assert _probe(lab, "meter1", fw, 443) == "refused"


def test_fqdn_set_follows_dns_and_survives_an_outage_for_the_stale_time(site):
    lab, agent, dns = site
    apply(agent, lab)
    resolved(agent, lab)
    mdm, scada = lab.addr("mdm"), lab.addr("scada")
    assert _probe(lab, "meter1", scada, 4059) == "refused"
    # the MDM moves: the resolver now answers the SCADA host's address
    dns.set({MDM_NAME: [scada], BROKER_NAME: [lab.addr("broker")], FW_NAME: [mdm]})
    dns.reload()
    wait_for(lambda: _probe(lab, "meter1", scada, 4059) == "open", 10)
    assert _probe(lab, "meter1", mdm, 4059) == "refused", "the old address is gone from the set"
    # the resolver stops answering: the last good set holds for dns_stale_s (4 s) past the answer's TTL
    dns.pause()
    try:
        t0 = time.monotonic()
        time.sleep(2.5)
        assert _probe(lab, "meter1", scada, 4059) == "open", "last good set kept"
        wait_for(lambda: _probe(lab, "meter1", scada, 4059, timeout=0.5) != "open", 15)
        held_for = time.monotonic() - t0
        assert 3.0 <= held_for <= 12.0, held_for
    finally:
        dns.set({MDM_NAME: [mdm], BROKER_NAME: [lab.addr("broker")], FW_NAME: [mdm]})
        dns.resume()
        dns.reload()
    wait_for(lambda: _probe(lab, "meter1", mdm, 4059) == "open", 15)


def test_breaches_are_reported_aggregated_per_device(site):
    lab, agent, _dns = site
    apply(agent, lab)
    resolved(agent, lab)
    reports = Path(agent.state_dir) / "reports"
    before = set(reports.glob("*.json")) if reports.exists() else set()
    for port in (2404, 2404, 502):
        _probe(lab, "meter1", lab.addr("scada"), port)
    _probe(lab, "rtu1", lab.addr("mdm"), 4059)

    def rows():
        out = []
        for p in sorted(set(reports.glob("*.json")) - before):
            out += [b.model_dump() for b in DeviceReport.model_validate_json(p.read_text()).breaches]
        return out

    wait_for(lambda: len({(r["asset_id"], r["port"]) for r in rows()}) >= 3, 10)
    got = {(r["asset_id"], r["destination"], r["proto"], r["port"]) for r in rows()}
    assert got == {("MTR-1", lab.addr("scada"), "tcp", 2404), ("MTR-1", lab.addr("scada"), "tcp", 502),
                   ("RTU-1", lab.addr("mdm"), "tcp", 4059)}
    by_key = {}
    for r in rows():
        by_key[(r["asset_id"], r["port"])] = by_key.get((r["asset_id"], r["port"]), 0) + r["packets"]
    assert by_key[("MTR-1", 2404)] >= 2, "two attempts, one row"


def test_full_port_range_scan_finds_only_the_baseline(site):
    # last in the module: a full scan leaves some 260 000 short-lived conntrack entries on the router
    lab, agent, _dns = site
    apply(agent, lab)
    resolved(agent, lab)
    masters = [lab.addr(m) for m in MASTERS]
    assert open_tcp_ports(lab, "meter1", masters) == {(lab.addr("mdm"), 4059)}


def _mqtt_roundtrip(lab, role: str, broker: str) -> str:
    """Publish from `role`; a subscriber on the broker's own host must receive it."""
    import sys

    sub = ("import sys,time,paho.mqtt.client as m\n"
           "got=[]\n"
           "c=m.Client(m.CallbackAPIVersion.VERSION2);c.on_message=lambda c,u,msg:got.append(msg.payload)\n"
           f"c.connect('{broker}',1883,5);c.subscribe('der/1/status',1);c.loop_start();time.sleep(0.5)\n"
           "print('ready',flush=True)\n"
           "t=time.time()\n"
           "while not got and time.time()-t<10: time.sleep(0.05)\n"
           "print('delivered' if got==[b'online'] else 'lost',flush=True)\n")
    pub = ("import paho.mqtt.client as m\n"
           "p=m.Client(m.CallbackAPIVersion.VERSION2)\n"
           f"p.connect('{broker}',1883,5);p.loop_start();p.publish('der/1/status',b'online',1).wait_for_publish(5)\n"
           "p.disconnect()\n")
    proc = lab.spawn("broker", [sys.executable, "-c", sub], stdout=-1, text=True)
    assert proc.stdout.readline().strip() == "ready"
    lab.exec(role, [sys.executable, "-c", pub], timeout=20)
    return proc.communicate(timeout=20)[0].strip()
