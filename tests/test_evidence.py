"""build_evidence: what a lane left in the kernel (conntrack, nft counters, WireGuard) becomes its record."""

from __future__ import annotations

import base64
from dataclasses import asdict
from datetime import UTC, datetime

import pytest

from nodeagent.ctnl import Flow
from nodeagent.evidence import Harvest, build_evidence, flow_to_dict, merge_flows
from nodeagent.firewall import LaneRules
from nodeagent.naming import Naming, data_mark, transport_mark
from nodeagent.state import LaneRecord
from nodeagent.wg.base import PeerStats
from nodeagent.wire import BlockedAttempt, EndReason, FlowRecord, LaneEvidence, LaneSpec, LaneTotals
from tests.fakes import FakeClock

NAMING = Naming("ab1")
LANE_ID = 0x00ABCD
DATA = data_mark(LANE_ID)
TRANSPORT = transport_mark(LANE_ID)
ENG_KEY = base64.b64encode(bytes([3] * 32)).decode()
NODE_KEY = base64.b64encode(bytes([4] * 32)).decode()
T0 = 1_800_000_000  # wall seconds
NS = 1_000_000_000


def spec() -> LaneSpec:
    return LaneSpec(
        session_id="s-42", revision=3, device_id="rtu-9", engineer_public_key=ENG_KEY,
        engineer_address="100.64.0.2", device_address="192.0.2.10", service="iec104",
        flows=[{"transport": "tcp", "port": 2404}, {"transport": "udp", "port": 20000, "port_end": 20002}],
        listen_port=51820, end_time=datetime.fromtimestamp(T0 + 600, UTC),
    )


NAME = NAMING.lane_name("s-42")


def record(**kw) -> LaneRecord:
    d = dict(
        session_id="s-42", name=NAME, spec=spec().model_dump(mode="json"), opened_at=float(T0), deadline=1600.0,
        boot_id="fake-boot", end_time=float(T0 + 600), mark_id=LANE_ID, slot=1, node_public_key=NODE_KEY,
        backend="userspace", handshakes_observed=2,
    )
    d.update(kw)
    return LaneRecord(**d)


def rules() -> LaneRules:
    return LaneRules(
        name=NAME, session_id="s-42", engineer_address="100.64.0.2", device_address="192.0.2.10",
        flows=(("tcp", 2404), ("udp", 20000), ("udp", 20001), ("udp", 20002)), mark=DATA, transport_mark=TRANSPORT,
        listen_port=51820, transport_address="169.254.0.3",
    )


def flow(id_, *, mark=DATA, proto=6, src="100.64.0.2", dst="192.0.2.10", sport=40000, dport=2404,
         po=1, bo=100, pr=1, br=100, start=T0 + 10, stop=None) -> Flow:
    return Flow(id_, mark, proto, src, dst, sport, dport, po, bo, pr, br,
                start * NS if start else None, stop * NS if stop else None)


def ended(f: Flow) -> dict:
    return flow_to_dict(f)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(wall=T0 + 700.0, mono=1700.0)


def build(h: Harvest, clock, *, rec="default", rules_="default", reason=EndReason.expired) -> LaneEvidence:
    return build_evidence(
        "rtr-1", "userspace", NAME,
        record() if rec == "default" else rec,
        rules() if rules_ == "default" else rules_,
        reason, h, clock,
    )


def test_flow_to_dict_round_trip_fields():
    f = flow(7, stop=T0 + 20)
    assert flow_to_dict(f) == {
        "id": 7, "mark": DATA, "proto": 6, "src": "100.64.0.2", "dst": "192.0.2.10", "sport": 40000, "dport": 2404,
        "po": 1, "bo": 100, "pr": 1, "br": 100, "start": (T0 + 10) * NS, "stop": (T0 + 20) * NS, "finished": False,
    }


def test_a_finished_tcp_connection_flushed_at_teardown_is_recorded_as_ended(clock):
    # a connection that closed during the lane lingers in conntrack (TIME_WAIT); the teardown flushes it
    lingering = Flow(4, DATA, 6, "100.64.0.2", "192.0.2.10", 40004, 2404, 3, 300, 3, 300, (T0 + 10) * NS, None, tcp_state=7)
    open_one = Flow(5, DATA, 6, "100.64.0.2", "192.0.2.10", 40005, 2404, 3, 300, 3, 300, (T0 + 11) * NS, None, tcp_state=3)
    flushed_event = {**flow_to_dict(lingering), "stop": (T0 + 600) * NS, "cut": True}
    data, _ = merge_flows(Harvest(ended_flows=[flushed_event], cut_flows=[open_one]), None)
    by_port = {r.sport: r for r in data}
    assert by_port[40004].observed == "ended" and by_port[40004].stop is None
    assert by_port[40005].observed == "cut"


def test_ended_and_cut_flows_merge_by_conntrack_id(clock):
    # id 1: ended (event) AND still in the teardown dump (the flush's own DESTROY event): event counters, cut
    # id 2: ended during the lane only; id 3: only in the dump
    event1 = flow(1, po=10, bo=1000, pr=8, br=800, start=T0 + 10, stop=T0 + 650)
    dump1 = flow(1, po=5, bo=500, pr=4, br=400, start=T0 + 10)
    event2 = flow(2, sport=40001, po=2, bo=120, pr=2, br=130, start=T0 + 20, stop=T0 + 30)
    dump3 = flow(3, proto=17, sport=40002, dport=20001, po=3, bo=300, pr=0, br=0, start=T0 + 30)
    h = Harvest(closed_mono=1600.0, closed_wall=T0 + 600.5, cut_flows=[dump1, dump3], ended_flows=[ended(event1), ended(event2)])
    ev = build(h, clock)
    assert ev.flows == [
        FlowRecord(proto="tcp", src="100.64.0.2", sport=40000, dst="192.0.2.10", dport=2404, packets_out=10, bytes_out=1000,
                   packets_in=8, bytes_in=800, start=datetime.fromtimestamp(T0 + 10, UTC),
                   stop=datetime.fromtimestamp(T0 + 650, UTC), observed="cut"),
        FlowRecord(proto="tcp", src="100.64.0.2", sport=40001, dst="192.0.2.10", dport=2404, packets_out=2, bytes_out=120,
                   packets_in=2, bytes_in=130, start=datetime.fromtimestamp(T0 + 20, UTC),
                   stop=datetime.fromtimestamp(T0 + 30, UTC), observed="ended"),
        FlowRecord(proto="udp", src="100.64.0.2", sport=40002, dst="192.0.2.10", dport=20001, packets_out=3, bytes_out=300,
                   packets_in=0, bytes_in=0, start=datetime.fromtimestamp(T0 + 30, UTC), stop=None, observed="cut"),
    ]
    assert ev.transport == []


def test_each_connection_listed_once(clock):
    fs = [flow(i, sport=41000 + i, start=T0 + i) for i in range(1, 30)]
    h = Harvest(closed_mono=1600.0, cut_flows=fs[::2], ended_flows=[ended(f) for f in fs[::3]] * 2)
    ev = build(h, clock)
    assert sorted(r.sport for r in ev.flows) == sorted({f.sport for f in fs[::2]} | {f.sport for f in fs[::3]})
    observed = {r.sport: r.observed for r in ev.flows}
    for f in fs:
        if f in fs[::2]:
            assert observed[f.sport] == "cut"
        elif f in fs[::3]:
            assert observed[f.sport] == "ended"


def test_transport_flows_go_to_transport(clock):
    outer = dict(mark=TRANSPORT, proto=17, src="203.0.113.5", dst="198.51.100.1", sport=61000, dport=51820)
    ended_outer = flow(10, **outer, po=50, bo=5000, pr=40, br=4000, start=T0 + 1, stop=T0 + 300)
    cut_outer_dump = flow(11, **{**outer, "sport": 61001}, po=5, bo=500, pr=5, br=500, start=T0 + 301)
    cut_outer_event = flow(11, **{**outer, "sport": 61001}, po=6, bo=600, pr=7, br=700, start=T0 + 301, stop=T0 + 600)
    data_dump = flow(12, start=T0 + 5)
    h = Harvest(
        closed_mono=1600.0, cut_flows=[data_dump], cut_transport=[cut_outer_dump],
        ended_flows=[ended(ended_outer), ended(cut_outer_event)],
    )
    ev = build(h, clock)
    assert [(r.sport, r.observed) for r in ev.flows] == [(40000, "cut")]
    assert [(r.src, r.sport, r.dport, r.observed, r.packets_out, r.bytes_in) for r in ev.transport] == [
        ("203.0.113.5", 61000, 51820, "ended", 50, 4000),
        ("203.0.113.5", 61001, 51820, "cut", 6, 700),  # event counters win over the dump's
    ]
    assert all(r.proto == "udp" for r in ev.transport)


def test_flows_are_ordered_by_start_then_source(clock):
    a = flow(1, src="100.64.0.2", sport=3, start=T0 + 50)
    b = flow(2, src="100.64.0.2", sport=1, start=T0 + 50)
    c = flow(3, src="100.64.0.2", sport=9, start=T0 + 5)
    d = flow(4, src="100.64.0.2", sport=2, start=None)
    ev = build(Harvest(closed_mono=1600.0, cut_flows=[a, b, c, d]), clock)
    assert [r.sport for r in ev.flows] == [2, 9, 1, 3]
    assert ev.flows[0].start is None


@pytest.mark.parametrize("proto,name", [(6, "tcp"), (17, "udp"), (1, "icmp"), (132, "sctp"), (99, "99")])
def test_protocol_names(clock, proto, name):
    ev = build(Harvest(closed_mono=1600.0, cut_flows=[flow(1, proto=proto, sport=None, dport=None)]), clock)
    assert (ev.flows[0].proto, ev.flows[0].sport, ev.flows[0].dport) == (name, None, None)


def test_totals_come_from_counters(clock):
    h = Harvest(
        closed_mono=1600.0,
        counters={"lane_tx": (11, 1100), "lane_rx": (22, 2200), "lane_refused": (3, 180)},
        cut_flows=[flow(1, po=1, bo=1)],  # the listed flows do not feed the totals
    )
    assert build(h, clock).totals == LaneTotals(
        packets_out=11, bytes_out=1100, packets_in=22, bytes_in=2200, packets_refused=3, bytes_refused=180,
    )
    assert build(Harvest(closed_mono=1600.0), clock).totals == LaneTotals()


def test_spec_fields_are_copied(clock):
    ev = build(Harvest(closed_mono=1600.0, closed_wall=T0 + 600.25), clock)
    assert (ev.node_id, ev.session_id, ev.revision, ev.device_id, ev.lane, ev.backend) == (
        "rtr-1", "s-42", 3, "rtu-9", NAME, "userspace",
    )
    assert (ev.engineer_public_key, ev.node_public_key, ev.engineer_address, ev.device_address, ev.service) == (
        ENG_KEY, NODE_KEY, "100.64.0.2", "192.0.2.10", "iec104",
    )
    assert ev.allowed == ["tcp/2404", "udp/20000-20002"]
    assert ev.listen_port == 51820
    assert ev.planned_end == datetime.fromtimestamp(T0 + 600, UTC)
    assert ev.opened_at == datetime.fromtimestamp(T0, UTC)
    assert ev.closed_at == datetime.fromtimestamp(T0 + 600.25, UTC)
    assert ev.end_reason is EndReason.expired
    assert ev.notes == []
    assert LaneEvidence.model_validate_json(ev.model_dump_json()) == ev


def test_closed_at_falls_back_to_the_clock(clock):
    ev = build(Harvest(closed_mono=1600.0, closed_wall=0.0), clock)
    assert ev.closed_at == datetime.fromtimestamp(T0 + 700.0, UTC)


@pytest.mark.parametrize(
    "closed_mono,lateness",
    [(1600.0, 0), (1600.25, 250), (1600.0004, 0), (1600.0006, 1), (1615.5, 15500), (1599.0, -1000)],
)
def test_lateness_from_deadline_and_closed_mono(clock, closed_mono, lateness):
    assert build(Harvest(closed_mono=closed_mono), clock, rec=record(deadline=1600.0)).lateness_ms == lateness


def test_agent_gaps_produce_notes(clock):
    gaps = [[T0 + 100.0, T0 + 160.0], [T0 + 300.0, T0 + 301.0]]
    ev = build(Harvest(closed_mono=1600.0), clock, rec=record(agent_gaps=gaps))
    assert ev.notes == [
        "the agent was not running from 2027-01-15T08:01:40+00:00 to 2027-01-15T08:02:40+00:00: connections that "
        "ended in that window are counted in the totals but not listed",
        "the agent was not running from 2027-01-15T08:05:00+00:00 to 2027-01-15T08:05:01+00:00: connections that "
        "ended in that window are counted in the totals but not listed",
    ]


def test_overrun_and_truncation_notes(clock):
    h = Harvest(closed_mono=1600.0, blocked=[("192.0.2.99", "tcp", 22, 7), ("192.0.2.10", "icmp", None, 1)],
                blocked_truncated=True)
    ev = build(h, clock, rec=record(flow_overrun=True))
    assert ev.notes == [
        "conntrack events were lost under load: some ended connections may be missing from the list",
        "more refused destinations than listed",
    ]
    assert ev.blocked == [
        BlockedAttempt(destination="192.0.2.99", proto="tcp", port=22, packets=7),
        BlockedAttempt(destination="192.0.2.10", proto="icmp", port=None, packets=1),
    ]
    assert ev.blocked_truncated is True


def test_orphan_lane(clock):
    h = Harvest(closed_mono=1600.0, closed_wall=T0 + 5.0, cut_flows=[flow(1)], counters={"lane_tx": (1, 60)})
    ev = build(h, clock, rec=None, rules_=None, reason=EndReason.removed)
    assert ev.session_id is None
    assert ev.notes == ["orphan lane found in the kernel without a record: swept"]
    assert (ev.revision, ev.device_id, ev.engineer_public_key, ev.node_public_key, ev.service) == (None,) * 5
    assert (ev.engineer_address, ev.device_address, ev.listen_port, ev.planned_end, ev.opened_at) == (None,) * 5
    assert ev.allowed == [] and ev.lateness_ms is None
    assert ev.end_reason is EndReason.removed
    assert ev.totals.packets_out == 1 and [r.observed for r in ev.flows] == ["cut"]
    assert ev.closed_at == datetime.fromtimestamp(T0 + 5.0, UTC)


def test_orphan_with_rules_keeps_their_session(clock):
    ev = build(Harvest(closed_mono=1600.0), clock, rec=None, rules_=rules(), reason=EndReason.removed)
    assert ev.session_id == "s-42" and ev.lateness_ms is None
    assert "orphan lane found in the kernel without a record: swept" in ev.notes


def test_orphan_without_rules_cannot_tell_transport_flows(clock):
    outer = flow(5, mark=TRANSPORT, proto=17, src="203.0.113.5", sport=61000, dport=51820)
    ev = build(Harvest(closed_mono=1600.0, ended_flows=[ended(outer)]), clock, rec=None, rules_=None)
    assert [r.sport for r in ev.flows] == [61000] and ev.transport == []


def test_wireguard_stats(clock):
    h = Harvest(closed_mono=1600.0, wireguard=PeerStats(rx_bytes=10, tx_bytes=20, last_handshake=T0 + 590.5,
                                                         endpoint="203.0.113.5:61000"))
    wg = build(h, clock).wireguard
    assert (wg.rx_bytes, wg.tx_bytes, wg.handshakes_observed, wg.endpoint) == (10, 20, 2, "203.0.113.5:61000")
    assert wg.last_handshake == datetime.fromtimestamp(T0 + 590.5, UTC)
    never = build(Harvest(closed_mono=1600.0, wireguard=PeerStats()), clock).wireguard
    assert never.last_handshake is None and never.handshakes_observed == 2
    assert build(Harvest(closed_mono=1600.0), clock).wireguard is None
    orphan = build(Harvest(closed_mono=1600.0, wireguard=PeerStats(rx_bytes=1)), clock, rec=None, rules_=None).wireguard
    assert orphan.handshakes_observed == 0


def test_record_is_not_mutated(clock):
    rec = record(agent_gaps=[[T0 + 1.0, T0 + 2.0]])
    before = asdict(rec)
    build(Harvest(closed_mono=1600.0), clock, rec=rec)
    assert asdict(rec) == before
