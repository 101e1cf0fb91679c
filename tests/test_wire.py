"""The wire types: hostile and malformed input is refused with an error that names the field and the rule."""

from __future__ import annotations

import base64
import ipaddress
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from nodeagent.wire import (
    MAX_LANES,
    MAX_PORTS_PER_LANE,
    PROTOCOL_VERSION,
    AgentStatus,
    AssetId,
    BlockedAttempt,
    DesiredNodeState,
    EndReason,
    FlowRecord,
    FlowSpec,
    LaneEvidence,
    LaneSpec,
    LaneTotals,
    NodeId,
    NodeSettings,
    ObservedLane,
    ReconcileReport,
    ServiceName,
    SessionId,
    WireGuardKey,
    WireGuardStats,
)

KEY_BYTES = [bytes([i] * 32) for i in range(8)]
KEYS = [base64.b64encode(b).decode() for b in KEY_BYTES]
END = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def lane_dict(i: int = 0, **kw) -> dict:
    d = dict(
        session_id=f"s-{i}",
        engineer_public_key=KEYS[i % len(KEYS)],
        engineer_address=f"100.64.0.{i + 2}",
        device_address="192.0.2.10",
        service="iec104",
        flows=[{"transport": "tcp", "port": 2404}],
        listen_port=51820 + i,
        end_time=END.isoformat(),
    )
    d.update(kw)
    return d


def state_dict(lanes: list[dict], **kw) -> dict:
    d = dict(node_id="rtr-1", generation=3, lanes=lanes)
    d.update(kw)
    return d


def errors(exc: pytest.ExceptionInfo) -> list[tuple[tuple, str, str]]:
    return [(tuple(e["loc"]), e["type"], e["msg"]) for e in exc.value.errors()]


def assert_rejected(fn, *, loc: tuple | None = None, type_: str | None = None, msg: str | None = None) -> None:
    with pytest.raises(ValidationError) as exc:
        fn()
    errs = errors(exc)
    assert len(errs) >= 1
    if loc is not None:
        assert any(e[0][: len(loc)] == loc for e in errs), errs
    if type_ is not None:
        assert any(e[1] == type_ for e in errs), errs
    if msg is not None:
        assert any(msg in e[2] for e in errs), errs


# ---- identifiers -----------------------------------------------------------------------------------------

HOSTILE = [
    "",
    "a;b",
    "a$(id)",
    "$(id)",
    "a`id`",
    "a'b",
    'a"b',
    "a{b",
    "a}b",
    "a b",
    " a",
    "a\n",
    "a\nb",
    "a\tb",
    "a\x00b",
    "a/b",
    "../etc",
    "..",
    ".hidden",
    "-rf",
    "\uff41bc",  # fullwidth 'a'
    "\u0430bc",  # Cyrillic 'a'
    "ab\u200bc",  # zero-width space
    "caf\u00e9",
    "a" * 65,
    "a*",
    "a|b",
    "a&b",
    "a>b",
    "a\\b",
    "a,b",
    "a#b",
]


@pytest.mark.parametrize(
    "ident,value",
    [(i, v) for i in (SessionId, NodeId, AssetId) for v in HOSTILE if not (i is AssetId and v == "a/b")],
    ids=lambda x: repr(x) if isinstance(x, str) else None,
)
def test_identifiers_reject_metacharacters(ident, value):
    ta = TypeAdapter(ident)
    with pytest.raises(ValidationError) as exc:
        ta.validate_python(value)
    assert errors(exc)[0][1] == "string_pattern_mismatch"


@pytest.mark.parametrize("value", HOSTILE + ["A", "Iec104", "_iec", "a" * 33, "a.b", "a:b"], ids=repr)
def test_service_names_reject_metacharacters_and_capitals(value):
    with pytest.raises(ValidationError) as exc:
        TypeAdapter(ServiceName).validate_python(value)
    assert errors(exc)[0][1] == "string_pattern_mismatch"


def test_identifier_accepts_its_alphabet_and_max_length():
    assert TypeAdapter(SessionId).validate_python("a" * 64) == "a" * 64
    assert TypeAdapter(SessionId).validate_python("S-1.2_3:4") == "S-1.2_3:4"
    assert TypeAdapter(NodeId).validate_python("rtr-01.site_a") == "rtr-01.site_a"
    # asset ids take '.' and ':' as separators but never '/': they may end up in paths and URLs
    assert TypeAdapter(AssetId).validate_python("substation.rtu:1") == "substation.rtu:1"
    for bad in ("substation/rtu:1", "x/../../etc", "../passwd"):
        with pytest.raises(ValidationError):
            TypeAdapter(AssetId).validate_python(bad)
    assert TypeAdapter(ServiceName).validate_python("iec104") == "iec104"
    assert TypeAdapter(ServiceName).validate_python("a" * 32) == "a" * 32
    # ':' is a session id character but not a node id one (node ids become host-like names)
    with pytest.raises(ValidationError):
        TypeAdapter(NodeId).validate_python("a:b")


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=80))
def test_session_id_accepts_only_the_conservative_alphabet(value):
    ok = (
        1 <= len(value) <= 64
        and value[0].isascii() and value[0].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "._:-") for c in value)
    )
    ta = TypeAdapter(SessionId)
    if ok:
        assert ta.validate_python(value) == value
    else:
        with pytest.raises(ValidationError):
            ta.validate_python(value)


@pytest.mark.parametrize("field", ["session_id", "service", "device_id"])
def test_lane_spec_field_names_the_bad_identifier(field):
    assert_rejected(lambda: LaneSpec(**lane_dict(**{field: "x;rm -rf /"})), loc=(field,), type_="string_pattern_mismatch")


def test_node_id_in_desired_state_is_checked():
    assert_rejected(lambda: DesiredNodeState(**state_dict([], node_id="rtr$(reboot)")), loc=("node_id",))


# ---- WireGuard keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value,msg",
    [
        ("not a key", "not base64"),
        ("", "32 bytes"),
        (KEYS[1].rstrip("="), "not base64"),  # padding missing
        (KEYS[1] + "\n", "not base64"),
        (" " + KEYS[1], "not base64"),
        (base64.urlsafe_b64encode(b"\xff" * 32).decode(), "not base64"),  # url-safe alphabet
        (base64.b64encode(b"\x01" * 31).decode(), "32 bytes"),
        (base64.b64encode(b"\x01" * 33).decode(), "32 bytes"),
        (base64.b64encode(b"\x01" * 64).decode(), "32 bytes"),
        (bytes(32).hex(), "32 bytes"),  # hex (the UAPI form) is not the wire form
        ("$(id)" + KEYS[1][5:], "not base64"),
    ],
)
def test_wireguard_key_rejects_non_keys(value, msg):
    assert_rejected(lambda: TypeAdapter(WireGuardKey).validate_python(value), msg=msg)
    assert_rejected(lambda: LaneSpec(**lane_dict(engineer_public_key=value)), loc=("engineer_public_key",), msg=msg)


def test_wireguard_key_round_trips_normalised():
    raw = bytes(range(32))
    canonical = base64.b64encode(raw).decode()
    ta = TypeAdapter(WireGuardKey)
    assert ta.validate_python(canonical) == canonical
    # the same 32 bytes with non-zero unused trailing bits: decoded, then re-encoded canonically
    sloppy = canonical[:-2] + chr(ord(canonical[-2]) + 1) + "="
    assert sloppy != canonical
    assert ta.validate_python(sloppy) == canonical
    assert base64.b64decode(ta.validate_python(sloppy)) == raw
    spec = LaneSpec(**lane_dict(engineer_public_key=sloppy))
    assert spec.engineer_public_key == canonical


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_any_32_bytes_is_a_key(raw):
    key = base64.b64encode(raw).decode()
    assert TypeAdapter(WireGuardKey).validate_python(key) == key


# ---- ports and flows -------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", [0, -1, 65536, 10**9])
def test_flow_port_out_of_range(port):
    assert_rejected(lambda: FlowSpec(transport="tcp", port=port), loc=("port",))
    assert_rejected(lambda: FlowSpec(transport="tcp", port=80, port_end=port), loc=("port_end",))


@pytest.mark.parametrize("port,ok", [(0, False), (-1, False), (1023, False), (65536, False), (1024, True), (65535, True)])
def test_listen_port_range(port, ok):
    if ok:
        assert LaneSpec(**lane_dict(listen_port=port)).listen_port == port
    else:
        assert_rejected(lambda: LaneSpec(**lane_dict(listen_port=port)), loc=("listen_port",))


def test_flow_transport_must_be_tcp_or_udp():
    assert_rejected(lambda: FlowSpec(transport="sctp", port=1), loc=("transport",), type_="enum")
    assert_rejected(lambda: FlowSpec(transport="tcp;", port=1), loc=("transport",))


def test_port_range_width_and_order():
    assert FlowSpec(transport="tcp", port=100, port_end=100 + MAX_PORTS_PER_LANE - 1).ports() == range(100, 164)
    assert FlowSpec(transport="tcp", port=100, port_end=100).ports() == range(100, 101)
    assert_rejected(lambda: FlowSpec(transport="tcp", port=100, port_end=100 + MAX_PORTS_PER_LANE), msg="span at most 64")
    assert_rejected(lambda: FlowSpec(transport="tcp", port=100, port_end=99), msg="port_end must be ≥ port")
    assert_rejected(lambda: FlowSpec(transport="udp", port=65535, port_end=1), msg="port_end")


def test_flow_labels():
    assert FlowSpec(transport="tcp", port=2404).label() == "tcp/2404"
    assert FlowSpec(transport="udp", port=100, port_end=110).label() == "udp/100-110"


def test_more_than_64_ports_in_total():
    flows = [{"transport": "tcp", "port": 1000, "port_end": 1063}, {"transport": "udp", "port": 2000}]
    assert_rejected(lambda: LaneSpec(**lane_dict(flows=flows)), msg="at most 64 ports in all")
    ok = [{"transport": "tcp", "port": 1000, "port_end": 1031}, {"transport": "udp", "port": 1000, "port_end": 1031}]
    assert sum(len(f.ports()) for f in LaneSpec(**lane_dict(flows=ok)).flows) == 64


def test_flow_list_length_limits():
    assert_rejected(lambda: LaneSpec(**lane_dict(flows=[])), loc=("flows",), type_="too_short")
    many = [{"transport": "tcp", "port": 1000 + i} for i in range(17)]
    assert_rejected(lambda: LaneSpec(**lane_dict(flows=many)), loc=("flows",), type_="too_long")


@pytest.mark.parametrize(
    "flows,dup",
    [
        ([{"transport": "tcp", "port": 80}, {"transport": "tcp", "port": 80}], "tcp/80"),
        ([{"transport": "tcp", "port": 80, "port_end": 90}, {"transport": "tcp", "port": 85}], "tcp/85"),
        ([{"transport": "udp", "port": 10, "port_end": 20}, {"transport": "udp", "port": 20, "port_end": 30}], "udp/20"),
    ],
)
def test_duplicate_flows_rejected(flows, dup):
    assert_rejected(lambda: LaneSpec(**lane_dict(flows=flows)), msg=f"flow {dup} listed twice")


def test_same_port_on_both_transports_is_not_a_duplicate():
    spec = LaneSpec(**lane_dict(flows=[{"transport": "tcp", "port": 53}, {"transport": "udp", "port": 53}]))
    assert [f.label() for f in spec.flows] == ["tcp/53", "udp/53"]


# ---- addresses -------------------------------------------------------------------------------------------


def test_engineer_and_device_must_differ():
    assert_rejected(
        lambda: LaneSpec(**lane_dict(engineer_address="192.0.2.10", device_address="192.0.2.10")),
        msg="engineer_address and device_address must differ",
    )


@pytest.mark.parametrize("addr", ["224.0.0.1", "239.255.255.250", "127.0.0.1", "127.1.2.3", "0.0.0.0", "255.255.255.255"])
@pytest.mark.parametrize("field", ["engineer_address", "device_address"])
def test_non_unicast_addresses_rejected(field, addr):
    assert_rejected(lambda: LaneSpec(**lane_dict(**{field: addr})), loc=(field,), msg="not a unicast host address")


@pytest.mark.parametrize("addr", ["2001:db8::1", "192.0.2.300", "192.0.2.1/32", "host.example", "192.0.2.1;"])
def test_malformed_or_ipv6_addresses_rejected(addr):
    assert_rejected(lambda: LaneSpec(**lane_dict(device_address=addr)), loc=("device_address",))


def test_engineer_sources_are_networks():
    spec = LaneSpec(**lane_dict(engineer_sources=["198.51.100.0/24", "203.0.113.7/32"]))
    assert spec.engineer_sources == [ipaddress.IPv4Network("198.51.100.0/24"), ipaddress.IPv4Network("203.0.113.7/32")]
    assert_rejected(lambda: LaneSpec(**lane_dict(engineer_sources=["198.51.100.1/24"])), loc=("engineer_sources",))


# ---- time ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("naive", ["2030-01-02T03:04:05", datetime(2030, 1, 2, 3, 4, 5)])
def test_naive_end_time_rejected(naive):
    assert_rejected(lambda: LaneSpec(**lane_dict(end_time=naive)), loc=("end_time",), type_="timezone_aware")


@pytest.mark.parametrize(
    "aware",
    [
        "2030-01-02T05:04:05+02:00",
        "2030-01-01T22:04:05-05:00",
        "2030-01-02T03:04:05Z",
        datetime(2030, 1, 2, 12, 34, 5, tzinfo=timezone(timedelta(hours=9, minutes=30))),
    ],
)
def test_aware_end_time_normalised_to_utc(aware):
    spec = LaneSpec(**lane_dict(end_time=aware))
    expected = END if not isinstance(aware, datetime) else aware
    assert spec.end_time == expected
    assert spec.end_time.utcoffset() == timedelta(0)
    assert spec.end_time.tzinfo == UTC
    assert spec.model_dump_json().count("+00:00") + spec.model_dump_json().count("Z") >= 1


def test_issued_at_normalised_and_naive_rejected():
    s = DesiredNodeState(**state_dict([], issued_at="2030-01-02T05:04:05+02:00"))
    assert s.issued_at == END and s.issued_at.tzinfo == UTC
    assert_rejected(lambda: DesiredNodeState(**state_dict([], issued_at="2030-01-02T05:04:05")), loc=("issued_at",))


# ---- unknown fields, versions, limits ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,loc",
    [
        (lambda: FlowSpec(transport="tcp", port=1, ports=[2]), ("ports",)),
        (lambda: LaneSpec(**lane_dict(allowed_ips="0.0.0.0/0")), ("allowed_ips",)),
        (lambda: DesiredNodeState(**state_dict([], bogus=1)), ("bogus",)),
        (lambda: NodeSettings(tunnel_networks=[], dns="1.1.1.1"), ("dns",)),
        (lambda: DesiredNodeState(**state_dict([lane_dict(extra=True)])), ("lanes", 0, "extra")),
    ],
)
def test_unknown_fields_rejected(build, loc):
    assert_rejected(build, loc=loc, type_="extra_forbidden")


def test_newer_protocol_version_rejected():
    assert DesiredNodeState(**state_dict([], protocol_version=PROTOCOL_VERSION)).protocol_version == PROTOCOL_VERSION
    assert_rejected(
        lambda: DesiredNodeState(**state_dict([], protocol_version=PROTOCOL_VERSION + 1)),
        msg=f"protocol_version {PROTOCOL_VERSION + 1} is newer than this agent's {PROTOCOL_VERSION}",
    )


def test_kind_is_fixed():
    assert_rejected(lambda: DesiredNodeState(**state_dict([], kind="agent_status")), loc=("kind",), type_="literal_error")


def test_generation_not_negative():
    assert_rejected(lambda: DesiredNodeState(**state_dict([], generation=-1)), loc=("generation",))


def test_too_many_lanes_rejected():
    lane = LaneSpec(**lane_dict())
    # the length check runs before any per-lane check, so one object repeated is enough to show it
    with pytest.raises(ValidationError) as exc:
        DesiredNodeState(node_id="n", generation=1, lanes=[lane] * (MAX_LANES + 1))
    assert [e[1] for e in errors(exc)] == ["too_long"]


def test_max_lanes_accepted():
    lanes = [
        LaneSpec(**lane_dict(
            session_id=f"s{i}", engineer_address=str(ipaddress.IPv4Address("100.64.0.2") + i),
            listen_port=20000 + i,
        ))
        for i in range(MAX_LANES)
    ]
    assert len(DesiredNodeState(node_id="n", generation=1, lanes=lanes).lanes) == MAX_LANES


@pytest.mark.parametrize(
    "field,value,what",
    [
        ("session_id", "s-0", "session_id s-0"),
        ("listen_port", 51820, "listen_port 51820"),
        ("engineer_address", "100.64.0.2", "engineer_address 100.64.0.2"),
    ],
)
def test_duplicates_across_lanes_rejected(field, value, what):
    a = lane_dict(0)
    b = lane_dict(1, **{field: value})
    assert_rejected(lambda: DesiredNodeState(**state_dict([a, b])), msg=f"two lanes share {what}")


def test_same_device_in_two_lanes_is_fine():
    s = DesiredNodeState(**state_dict([lane_dict(0), lane_dict(1)]))
    assert [lane.device_address for lane in s.lanes] == [ipaddress.IPv4Address("192.0.2.10")] * 2


def test_engineer_address_outside_tunnel_networks():
    settings_ = {"tunnel_networks": ["100.64.0.0/24"]}
    assert DesiredNodeState(**state_dict([lane_dict(0)], settings=settings_)).lanes[0].session_id == "s-0"
    assert_rejected(
        lambda: DesiredNodeState(**state_dict([lane_dict(0, engineer_address="100.65.0.2")], settings=settings_)),
        msg="lane s-0: engineer_address 100.65.0.2 is outside tunnel_networks",
    )


def test_device_inside_tunnel_networks():
    settings_ = {"tunnel_networks": ["100.64.0.0/24", "10.0.0.0/8"]}
    assert_rejected(
        lambda: DesiredNodeState(**state_dict([lane_dict(0, device_address="10.1.2.3")], settings=settings_)),
        msg="lane s-0: device_address 10.1.2.3 is inside tunnel_networks",
    )


def test_no_tunnel_networks_means_no_containment_check():
    s = DesiredNodeState(**state_dict([lane_dict(0, engineer_address="10.9.9.9")]))
    assert str(s.lanes[0].engineer_address) == "10.9.9.9"


@pytest.mark.parametrize("host", ["rtr.example.net", "192.0.2.1", "2001:db8::1"])
def test_endpoint_host_accepts_names_and_addresses(host):
    assert NodeSettings(endpoint_host=host).endpoint_host == host


@pytest.mark.parametrize("host", ["", "a b", "a;b", "[2001:db8::1]", "a/b", "a\n", "x" * 254])
def test_endpoint_host_rejects_junk(host):
    assert_rejected(lambda: NodeSettings(endpoint_host=host), loc=("endpoint_host",))


def test_messages_are_frozen():
    spec = LaneSpec(**lane_dict())
    with pytest.raises(ValidationError):
        spec.listen_port = 1  # type: ignore[misc]


# ---- round trips -----------------------------------------------------------------------------------------


def full_state() -> DesiredNodeState:
    return DesiredNodeState(
        node_id="rtr-1",
        generation=42,
        issued_at="2030-01-01T00:00:00+01:00",
        settings=NodeSettings(tunnel_networks=["100.64.0.0/16"], endpoint_host="rtr.example.net"),
        lanes=[
            LaneSpec(**lane_dict(0, revision=2, device_id="sub-1.rtu:7", engineer_sources=["198.51.100.0/24"])),
            LaneSpec(**lane_dict(
                1, service="modbus", device_address="192.0.2.11",
                flows=[{"transport": "tcp", "port": 502}, {"transport": "udp", "port": 20000, "port_end": 20010}],
                end_time="2030-06-01T12:00:00.123456-07:00",
            )),
        ],
    )


def test_desired_state_round_trips_unchanged():
    s = full_state()
    text = s.model_dump_json()
    back = DesiredNodeState.model_validate_json(text)
    assert back == s
    assert back.model_dump_json() == text
    assert back.lanes[1].end_time == datetime(2030, 6, 1, 19, 0, 0, 123456, tzinfo=UTC)
    assert back.lanes[0].device_id == "sub-1.rtu:7"
    assert back.kind == "desired_node_state" and back.protocol_version == PROTOCOL_VERSION


def test_lane_evidence_round_trips():
    ev = LaneEvidence(
        node_id="rtr-1", session_id="s-0", revision=2, device_id="rtu-1", lane="wkab1abcdefghij", backend="kernel",
        engineer_public_key=KEYS[0], node_public_key=KEYS[1], engineer_address="100.64.0.2",
        device_address="192.0.2.10", service="iec104", allowed=["tcp/2404"], listen_port=51820,
        planned_end=END, opened_at=END - timedelta(hours=1), closed_at="2030-01-02T04:04:06+01:00",
        end_reason=EndReason.expired, lateness_ms=1000,
        totals=LaneTotals(packets_out=3, bytes_out=300, packets_in=2, bytes_in=200, packets_refused=1, bytes_refused=60),
        flows=[FlowRecord(proto="tcp", src="100.64.0.2", sport=40000, dst="192.0.2.10", dport=2404, packets_out=3,
                          bytes_out=300, start=END - timedelta(minutes=5), observed="cut")],
        transport=[FlowRecord(proto="udp", src="203.0.113.5", dst="198.51.100.1", dport=51820, observed="ended")],
        blocked=[BlockedAttempt(destination="192.0.2.99", proto="tcp", port=22, packets=4)],
        blocked_truncated=True,
        wireguard=WireGuardStats(rx_bytes=5, tx_bytes=6, last_handshake=END, handshakes_observed=2, endpoint="203.0.113.5:4000"),
        notes=["a note"],
    )
    assert ev.closed_at == END + timedelta(seconds=1) and ev.closed_at.tzinfo == UTC
    back = LaneEvidence.model_validate_json(ev.model_dump_json())
    assert back == ev
    assert back.end_reason is EndReason.expired
    assert back.flows[0].observed == "cut"


def test_flow_record_observed_is_closed_set():
    assert_rejected(lambda: FlowRecord(proto="tcp", src="a", dst="b", observed="maybe"), loc=("observed",))


def test_agent_status_round_trips():
    st_ = AgentStatus(
        node_id="rtr-1", agent_version="0.1.0", backend="userspace", applied_generation=7,
        lanes=[ObservedLane(
            session_id="s-0", lane="wkab1abcdefghij", listen_port=51820, node_public_key=KEYS[2],
            engineer_address="100.64.0.2", device_address="192.0.2.10", allowed=["tcp/2404"], end_time=END,
            seconds_left=12.5, wireguard=WireGuardStats(rx_bytes=1),
        )],
        pending_evidence=1, clock_synchronized=True,
        last_reconcile=ReconcileReport(generation=7, changes=["opened lane s-0"], errors=[]),
    )
    back = AgentStatus.model_validate_json(st_.model_dump_json())
    assert back == st_
    assert back.lanes[0].seconds_left == 12.5
    assert back.last_reconcile.changes == ["opened lane s-0"]
    assert_rejected(lambda: AgentStatus.model_validate_json(st_.model_dump_json().replace('"userspace"', '"bpf"')),
                    loc=("backend",))
