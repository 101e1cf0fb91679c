"""Lanes end to end in the lab: the real agent on the router, real wireguard-go, nftables and conntrack,
engineers using the standard wg-quick client, devices running servers."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from tests.lab.site import (
    AgentProcess,
    Engineer,
    device_meter,
    device_meter_bytes,
    lane_for,
    py,
    router_leftovers,
    serve,
    wait_for,
)

pytestmark = pytest.mark.lab


@pytest.fixture
def site(lab):
    agent = AgentProcess(lab).start()
    engineers = {role: Engineer(lab, role) for role in lab.engineers}
    servers = [serve(lab, "rtu1", tcp=(2404, 502), udp=(20000,), sink=(9000,)), serve(lab, "rtu2", tcp=(2404,))]
    yield lab, agent, engineers
    for e in engineers.values():
        e.forget()
    agent.stop()
    for s in servers:
        s.kill()
    if agent.proc and agent.proc.returncode not in (0, None, -15):
        print(agent.log())
    agent.remove_state()


def open_lane(agent, engineer, lab, sid="s-1", seconds=60.0, **kw):
    spec = lane_for(engineer, lab.addr("rtu1"), sid, seconds, **kw)
    report = agent.apply([spec])
    assert not report["errors"], report
    node_key = agent.lane(sid)["node_public_key"]
    engineer.up(engineer.config_for(spec, node_key))
    return spec, node_key


def test_lane_reaches_only_its_device_port_and_ends_on_time(site):
    lab, agent, eng = site
    e1, e2 = eng["eng1"], eng["eng2"]
    spec, node_key = open_lane(agent, e1, lab, seconds=8)
    rtu1, rtu2 = lab.addr("rtu1"), lab.addr("rtu2")

    assert e1.probe(rtu1, 2404) == "open"
    assert e1.probe(rtu1, 502) == "refused", "another port on the device"
    assert e1.probe(rtu1, 20000, udp=True) == "timeout", "UDP elsewhere is dropped (and counted)"
    # a curious contractor routes everything into the lane: the router refuses all of it
    e1.route_everything_into_tunnel(node_key, [rtu2, lab.router_lan, lab.router_ops, lab.addr("scada"), "169.254.0.3"])
    for host, port in [(rtu2, 2404), (lab.router_lan, 22), (lab.router_ops, 2404), (lab.addr("scada"), 2404), ("169.254.0.3", 51820)]:
        assert e1.probe(host, port) in ("refused", "prohibited", "timeout"), (host, port)
    assert e1.probe(rtu1, 2404) == "open"

    # another engineer with the lane's config but their own key gets nowhere
    e2.up(e2.config_for(spec, node_key))
    assert e2.probe(rtu1, 2404, timeout=2) == "timeout"

    # a connection held across the end time dies within 2 s of it
    holder = e1.start("hold", rtu1, "2404", "--seconds", "30")
    result = json.loads(holder.communicate(timeout=40)[0].strip().splitlines()[-1])
    end = spec.end_time.timestamp()
    assert result["connected"] is not None and result["broken"] is not None, result
    assert result["last_ok"] > end - 1.0, f"the lane closed early: {result}"
    assert result["broken"] - end <= 2.0, f"traffic {result['broken'] - end:.2f}s after the end"
    assert e1.probe(rtu1, 2404) in ("timeout", "refused", "prohibited")

    left = wait_for(lambda: not any(router_leftovers(lab).values()), timeout=2.0)
    assert left, router_leftovers(lab)
    ev = agent.evidence_for("s-1")
    assert ev["end_reason"] == "expired" and 0 <= ev["lateness_ms"] < 1000
    assert {b["port"] for b in ev["blocked"]} >= {502, 20000}
    assert any(b["destination"] == rtu2 for b in ev["blocked"])
    assert ev["wireguard"]["endpoint"].startswith(e1.address)
    assert ev["transport"] and ev["transport"][0]["src"] == e1.address


def test_evidence_counts_match_the_traffic(site):
    lab, agent, eng = site
    e1 = eng["eng1"]
    spec, _ = open_lane(agent, e1, lab, sid="s-count", seconds=120, port=20000, transport="udp")
    rtu1 = lab.addr("rtu1")
    # the device counts what reaches it (IP bytes), independently of the router
    device_meter(lab, "rtu1", "udp", 20000)
    sent = e1.run("blast", rtu1, "20000", "--count", "3000", "--size", "700")
    time.sleep(0.3)
    agent.close("s-count")
    ev = agent.evidence_for("s-count")
    counted = device_meter_bytes(lab, "rtu1")
    got = ev["totals"]["bytes_out"]
    assert ev["end_reason"] == "closed"
    assert abs(got - sent["ip_bytes"]) <= 0.01 * sent["ip_bytes"], (got, sent)
    assert abs(got - counted) <= 0.01 * counted, (got, counted)
    flow_bytes = sum(f["bytes_out"] for f in ev["flows"] if f["dport"] == 20000)
    assert abs(flow_bytes - sent["ip_bytes"]) <= 0.01 * sent["ip_bytes"]
    assert ev["totals"]["bytes_in"] >= 0.99 * sent["ip_bytes"], "the device echoes every datagram"


def test_tcp_bytes_match_the_receiving_device(site):
    lab, agent, eng = site
    e1 = eng["eng1"]
    open_lane(agent, e1, lab, sid="s-tcp", seconds=120, port=9000)
    device_meter(lab, "rtu1", "tcp", 9000)
    e1.run("send", lab.addr("rtu1"), "9000", "--bytes", str(5_000_000))
    agent.close("s-tcp")
    ev = agent.evidence_for("s-tcp")
    counted = device_meter_bytes(lab, "rtu1")
    assert counted > 5_000_000
    assert abs(ev["totals"]["bytes_out"] - counted) <= 0.01 * counted
    [flow] = [f for f in ev["flows"] if f["dport"] == 9000]
    assert abs(flow["bytes_out"] - counted) <= 0.01 * counted and flow["observed"] in ("ended", "cut")


def test_close_early_kills_established_connections(site):
    lab, agent, eng = site
    e1 = eng["eng1"]
    open_lane(agent, e1, lab, sid="s-close", seconds=300)
    holder = e1.start("hold", lab.addr("rtu1"), "2404", "--seconds", "20")
    time.sleep(1.5)
    closed_at = time.time()
    agent.close("s-close")
    result = json.loads(holder.communicate(timeout=30)[0].strip().splitlines()[-1])
    assert result["broken"] is not None and result["broken"] - closed_at < 2.0, result
    assert agent.evidence_for("s-close")["end_reason"] == "closed"
    assert not any(router_leftovers(lab).values())
    # re-sending the same desired state does not reopen it
    agent.apply([lane_for(e1, lab.addr("rtu1"), "s-close", 300)])
    assert agent.lane("s-close") is None


def test_kernel_ends_the_lane_while_the_agent_is_frozen(site):
    """The agent cannot act (SIGSTOP) through the end time: nft element timeouts stop the traffic."""
    lab, agent, eng = site
    e1 = eng["eng1"]
    spec, _ = open_lane(agent, e1, lab, sid="s-frozen", seconds=6)
    holder = e1.start("hold", lab.addr("rtu1"), "2404", "--seconds", "20")
    time.sleep(1)
    agent.pause()
    try:
        result = json.loads(holder.communicate(timeout=30)[0].strip().splitlines()[-1])
    finally:
        agent.resume()
    end = spec.end_time.timestamp()
    assert result["broken"] is not None and result["broken"] - end <= 2.0, result
    ev = agent.evidence_for("s-frozen", timeout=10)
    assert ev["end_reason"] == "expired" and ev["lateness_ms"] > 500, "the agent could not act on time"
    assert wait_for(lambda: not any(router_leftovers(lab).values()), timeout=3), router_leftovers(lab)


def test_agent_kill9_during_open_close_cycles(site):
    """kill -9 at random points of open/close cycles; after restart nothing is orphaned, no lane outlives
    its end, and every lane's evidence arrives with exact totals."""
    lab, agent, eng = site
    e1 = eng["eng1"]
    rnd = random.Random(7)
    device_meter(lab, "rtu1", "udp", 20000)
    sessions = []
    opened = 0
    for cycle in range(6):
        sid = f"s-k{cycle}"
        spec = lane_for(e1, lab.addr("rtu1"), sid, rnd.choice([3, 4, 6]), port=20000, transport="udp", listen_port=51830 + cycle)
        sessions.append((sid, spec))
        generation = agent.generation + 1
        # this apply opens the new lane and closes the previous one; the kill lands somewhere inside it
        sender = threading.Thread(target=_apply_quietly, args=(agent, [spec], generation))
        sender.start()
        time.sleep(rnd.uniform(0.0, 0.03))
        agent.kill9()
        sender.join()
        agent.start()
        agent.apply([spec], generation=generation)  # the controller re-sends its state
        lane = agent.lane(sid)
        assert lane is not None, f"cycle {cycle}: lane missing after restart:\n{agent.log()[-2000:]}"
        opened += 1
        e1.up(e1.config_for(spec, lane["node_public_key"]))
        e1.run("blast", lab.addr("rtu1"), "20000", "--count", "200", "--size", "500")
        if rnd.random() < 0.5:
            agent.kill9()
            time.sleep(rnd.uniform(0, 0.5))
            agent.start()
    # wait past every end time; then nothing may remain and every opened lane has evidence
    last_end = max(spec.end_time.timestamp() for _, spec in sessions)
    time.sleep(max(0, last_end - time.time()) + 1.5)
    assert wait_for(lambda: not any(router_leftovers(lab).values()), timeout=3), router_leftovers(lab)
    status = agent.status()
    assert status["lanes"] == []
    evidence = {e["session_id"]: e for e in agent.evidence()}
    counted = device_meter_bytes(lab, "rtu1")
    total = sum(e["totals"]["bytes_out"] for e in evidence.values())
    assert opened >= 3 and counted >= opened * 200 * 528, "the test must actually move traffic through lanes"
    assert abs(total - counted) <= 0.01 * counted, (total, counted)
    for sid, _spec in sessions:
        if sid in evidence:
            assert evidence[sid]["end_reason"] in ("expired", "removed", "replaced")


def _apply_quietly(agent, lanes, generation):
    try:
        agent.apply(lanes, generation=generation)
    except Exception:  # the agent was killed under it: that is the point
        pass


def test_hostile_desired_state_is_refused_and_changes_nothing(site):
    lab, agent, eng = site
    before = lab.exec("rtr", ["nft", "list", "ruleset"]).stdout
    bad = {
        "node_id": "site-1", "generation": 99,
        "lanes": [{"session_id": "x;nft flush ruleset", "engineer_public_key": eng["eng1"].public_key,
                   "engineer_address": "100.64.0.2", "device_address": "192.0.2.10", "service": "iec104",
                   "flows": [{"transport": "tcp", "port": 70000}], "listen_port": 51820, "end_time": "2030-01-01T00:00:00Z"}],
    }
    answer = agent.call({"op": "apply", "desired": bad})
    assert not answer["ok"] and "session_id" in answer["error"] and "port" in answer["error"]
    res = lab.exec("rtr", py("nodeagent.cli", "apply", "-", "--state-dir", agent.state_dir), check=False, input=json.dumps(bad))
    assert res.returncode == 2 and "session_id" in res.stderr
    assert lab.exec("rtr", ["nft", "list", "ruleset"]).stdout == before
    assert agent.status()["applied_generation"] is None


def test_engineer_source_networks_restrict_the_lane(site):
    lab, agent, eng = site
    e1 = eng["eng1"]
    open_lane(agent, e1, lab, sid="s-src-no", seconds=60, sources=["198.51.100.0/24"])
    assert e1.probe(lab.addr("rtu1"), 2404, timeout=2) == "timeout", "a source outside the allowed networks"
    e1.down()
    agent.close("s-src-no")
    open_lane(agent, e1, lab, sid="s-src-yes", seconds=60, sources=["203.0.113.0/24"], listen_port=51821)
    assert e1.probe(lab.addr("rtu1"), 2404, timeout=2) == "open"


def test_agent_restart_keeps_lanes_working(site):
    lab, agent, eng = site
    e1 = eng["eng1"]
    open_lane(agent, e1, lab, sid="s-keep", seconds=120)
    holder = e1.start("hold", lab.addr("rtu1"), "2404", "--seconds", "4")
    agent.kill9()
    time.sleep(0.5)
    agent.start()
    result = json.loads(holder.communicate(timeout=20)[0].strip().splitlines()[-1])
    assert result["broken"] is None, f"an agent restart must not cut a lane: {result}"
    assert agent.lane("s-keep") is not None
    assert e1.probe(lab.addr("rtu1"), 2404) == "open"
