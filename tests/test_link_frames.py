"""The agent link's frames (`nodeagent.wire`): every kind round-trips, frames are bounded, bad frames are refused
with a message that names what is wrong; the version stamp; join tokens; the bytes an evidence signature covers."""

from __future__ import annotations

import base64
import json
import typing
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nodeagent.wire import (
    EVIDENCE_SIGNATURE_CONTEXT,
    MAX_FRAME,
    PROTOCOL_VERSION,
    REPORT_SIGNATURE_CONTEXT,
    AgentStatus,
    Applied,
    BlockedAttempt,
    Breach,
    Certificate,
    DesiredNodeState,
    DeviceReport,
    EndReason,
    EnrollBegin,
    EnrollCA,
    Enrolled,
    EnrollRequest,
    EvidenceReceipt,
    FlowRecord,
    FrameError,
    Goodbye,
    GrantSpec,
    Hello,
    LaneEvidence,
    LaneTotals,
    LinkFrame,
    NameStatus,
    ObservedLane,
    Ping,
    Pong,
    ReconcileReport,
    RecordingChunk,
    RecordingInfo,
    RecordingReceipt,
    Refused,
    Renew,
    ReportReceipt,
    SignedEvidence,
    SignedReport,
    Welcome,
    WireGuardStats,
    decode_frame,
    encode_frame,
    evidence_bytes,
    frame_length,
    parse_token,
    report_bytes,
)

KEYS = [base64.b64encode(bytes([i + 1] * 32)).decode() for i in range(4)]
END = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
PIN = "0123456789abcdef" * 4
TOKEN = f"wkj1.abcdefgh2345.{'S' * 43}.{PIN}"


def evidence(**kw) -> LaneEvidence:
    d = dict(
        node_id="rtr-1", session_id="s-0", revision=2, device_id="rtu-1", lane="wkab1abcdefghij", backend="kernel",
        engineer_public_key=KEYS[0], node_public_key=KEYS[1], engineer_address="100.64.0.2", device_address="192.0.2.10",
        service="iec104", allowed=["tcp/2404"], listen_port=51820, planned_end=END, opened_at=END - timedelta(hours=1),
        closed_at=END + timedelta(seconds=1), end_reason=EndReason.expired, lateness_ms=1000,
        totals=LaneTotals(packets_out=3, bytes_out=300, packets_in=2, bytes_in=200, packets_refused=1, bytes_refused=60),
        flows=[FlowRecord(proto="tcp", src="100.64.0.2", sport=40000, dst="192.0.2.10", dport=2404, packets_out=3,
                          bytes_out=300, start=END - timedelta(minutes=5), observed="cut")],
        transport=[FlowRecord(proto="udp", src="203.0.113.5", dst="198.51.100.1", dport=51820, observed="ended")],
        blocked=[BlockedAttempt(destination="192.0.2.99", proto="tcp", port=22, packets=4)],
        blocked_truncated=False,
        wireguard=WireGuardStats(rx_bytes=5, tx_bytes=6, last_handshake=END, handshakes_observed=2, endpoint="203.0.113.5:4000"),
        notes=["a note"],
    )
    d.update(kw)
    return LaneEvidence(**d)


def status(**kw) -> AgentStatus:
    d = dict(node_id="rtr-1", agent_version="0.2.0", backend="userspace", applied_generation=7,
             lanes=[ObservedLane(session_id="s-0", lane="wkab1abcdefghij", listen_port=51820, node_public_key=KEYS[2],
                                 engineer_address="100.64.0.2", device_address="192.0.2.10", allowed=["tcp/2404"],
                                 end_time=END, seconds_left=12.5)],
             pending_evidence=1, clock_synchronized=False, clock_detail="kernel reports the clock unsynchronised",
             link="connected to 192.0.2.1:7443", strict_after_s=60.0,
             last_reconcile=ReconcileReport(generation=7, changes=["opened lane s-0"], errors=["lane s-1 not opened"]))
    d.update(kw)
    return AgentStatus(**d)


def desired() -> DesiredNodeState:
    return DesiredNodeState(
        node_id="rtr-1", generation=9, issued_at=END, settings={"tunnel_networks": ["100.64.0.0/16"], "endpoint_host": "vpn.example"},
        lanes=[dict(session_id="s-0", revision=1, device_id="rtu-1", engineer_public_key=KEYS[0], engineer_address="100.64.0.2",
                    device_address="192.0.2.10", service="iec104", flows=[{"transport": "tcp", "port": 2404}],
                    listen_port=51820, engineer_sources=["198.51.100.0/24"], end_time=END)],
    )


def device_report() -> DeviceReport:
    return DeviceReport(
        node_id="rtr-1", window_start=END - timedelta(minutes=1), window_end=END, devices=2,
        breaches=[Breach(asset_id="rtu-1", source="192.0.2.10", destination="203.0.113.9", proto="tcp", port=443, packets=7),
                  Breach(asset_id=None, source="192.0.2.77", destination="198.51.100.3", proto="icmp", port=None, packets=1)],
        breaches_left_out=3,
        names=[NameStatus(fqdn="scada.example.net", addresses=["198.51.100.20"], state="ok", ttl_s=300,
                          resolved_at=END - timedelta(seconds=30), stale_until=END + timedelta(hours=1))],
        name_changes=["scada.example.net"],
    )


def one_of_each() -> list:
    ev = evidence()
    return [
        EnrollBegin(),
        EnrollCA(ca_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
        EnrollRequest(token=TOKEN, node_id="rtr-1", csr_pem="-----BEGIN CERTIFICATE REQUEST-----\n", evidence_public_key=KEYS[3],
                      agent_version="0.2.0"),
        Enrolled(node_id="rtr-1", site="north-1", certificate_pem="-----BEGIN CERTIFICATE-----\n", not_after=END,
                 controller_signing_key=KEYS[2]),
        Hello(protocol_version=PROTOCOL_VERSION, node_id="rtr-1", agent_version="0.2.0", applied_generation=4, boot_id="b-1"),
        Welcome(protocol_version=PROTOCOL_VERSION, controller_version="0.2.0", heartbeat_s=10, server_time=END),
        desired(),
        Applied(generation=9, report=ReconcileReport(generation=9, changes=["opened lane s-0"]), status=status()),
        Refused(generation=3, error="generation 3 is older than the applied 9: refused"),
        status(),
        SignedEvidence(ident="s-0-1893553445678-wkab1abcdefghij", evidence=ev, signature=base64.b64encode(b"\0" * 64).decode()),
        EvidenceReceipt(ident="s-0-1893553445678-wkab1abcdefghij"),
        RecordingChunk(ident="s-0-1893553445678-wkab1abcdefghij", offset=0, data=base64.b64encode(b"pcap").decode(),
                       last=True, sha256="a" * 64),
        RecordingReceipt(ident="s-0-1893553445678-wkab1abcdefghij", stored=False, error="hash mismatch"),
        SignedReport(ident="report-1893553445678", report=device_report(), signature=base64.b64encode(b"\0" * 64).decode()),
        ReportReceipt(ident="report-1893553445678"),
        Renew(csr_pem="-----BEGIN CERTIFICATE REQUEST-----\n"),
        Certificate(certificate_pem="-----BEGIN CERTIFICATE-----\n", not_after=END),
        Ping(sent=1893553445.25),
        Pong(sent=1893553445.25),
        Goodbye(reason="this agent was revoked", retry=False),
    ]


def _kinds_of_link_frame() -> set[str]:
    union = typing.get_args(LinkFrame)[0]
    return {cls.model_fields["kind"].default for cls in typing.get_args(union)}


def test_samples_cover_every_frame_kind():
    assert {m.kind for m in one_of_each()} == _kinds_of_link_frame(), "a LinkFrame kind has no round-trip sample here"


@pytest.mark.parametrize("msg", one_of_each(), ids=lambda m: m.kind)
def test_every_frame_round_trips(msg):
    frame = encode_frame(msg)
    assert frame_length(frame[:4]) == len(frame) - 4
    back = decode_frame(frame[4:])
    assert type(back) is type(msg)
    assert back == msg
    assert encode_frame(back) == frame


# ---- size --------------------------------------------------------------------------------------------------


def _certificate_of_body_size(size: int) -> Certificate:
    overhead = len(encode_frame(Certificate(certificate_pem="", not_after=END))) - 4
    return Certificate(certificate_pem="x" * (size - overhead), not_after=END)


def test_a_frame_of_exactly_max_frame_is_allowed_one_byte_more_is_refused():
    frame = encode_frame(_certificate_of_body_size(MAX_FRAME))
    assert len(frame) == MAX_FRAME + 4 and frame_length(frame[:4]) == MAX_FRAME
    with pytest.raises(ValueError, match=rf"a certificate frame of {MAX_FRAME + 1} bytes exceeds the {MAX_FRAME}-byte limit"):
        encode_frame(_certificate_of_body_size(MAX_FRAME + 1))


@pytest.mark.parametrize("n", [MAX_FRAME + 1, 0xFFFFFFFF])
def test_frame_length_refuses_a_header_over_the_limit(n):
    with pytest.raises(FrameError, match=f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit"):
        frame_length(n.to_bytes(4, "big"))


def test_frame_length_reads_big_endian():
    assert frame_length(b"\0\0\1\0") == 256 and frame_length(b"\0\0\0\0") == 0


# ---- bad frames -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body,message",
    [
        (b'{"kind":"nope"}', "invalid frame: (top): Input tag 'nope' found using 'kind' does not match"),
        (b'{"sent":1}', "invalid frame: (top): Unable to extract tag using discriminator 'kind'"),
        (b'{"kind":"ping","sent":1,"extra":2}', "invalid frame: ping.extra: Extra inputs are not permitted"),
        (b'{"kind":"ping","sent":"soon"}', "invalid frame: ping.sent: Input should be a valid number"),
        (b'{"kind":"ping"}', "invalid frame: ping.sent: Field required"),
        (b'{"kind":"goodbye","reason":["a"]}', "invalid frame: goodbye.reason: Input should be a valid string"),
        (b'{"kind":"welcome","protocol_version":2,"controller_version":"x","heartbeat_s":0,"server_time":"2030-01-01T00:00:00Z"}',
         "invalid frame: welcome.heartbeat_s: Input should be greater than 0"),
        (b'{"kind":"hello","protocol_version":2,"node_id":"../etc","agent_version":"x"}',
         "invalid frame: hello.node_id: String should match pattern"),
        (b'{"kind":"desired_node_state","node_id":"n","generation":1,"lanes":[{"session_id":"s"}]}',
         "invalid frame: desired_node_state.lanes.0.engineer_public_key: Field required"),
        (b'{"kind":"evidence_receipt","ident":"x","kind2":1}', "invalid frame: evidence_receipt.kind2: Extra inputs"),
        (b"[]", "invalid frame: (top): Input should be an object"),
        (b"not json", "invalid frame: (top): Invalid JSON"),
        (b"\xff\xfe{", "invalid frame: (top): Invalid JSON"),
        (b"", "invalid frame: (top): Invalid JSON: EOF"),
    ],
    ids=["unknown-kind", "no-kind", "extra-field", "bad-type", "missing-field", "list-for-string", "out-of-range",
         "bad-node-id", "nested", "extra-field-2", "array", "not-json", "not-utf8", "empty"],
)
def test_bad_frames_are_refused_with_a_readable_message(body, message):
    with pytest.raises(FrameError) as info:
        decode_frame(body)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text, "one line for the log and the goodbye"
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ---- version stamp ------------------------------------------------------------------------------------------


def test_encode_frame_stamps_the_peers_version_and_a_v1_stamped_desired_state_validates():
    d = desired()
    frame = encode_frame(d, 1)
    assert json.loads(frame[4:])["protocol_version"] == 1
    back = decode_frame(frame[4:])
    assert isinstance(back, DesiredNodeState) and back.protocol_version == 1
    assert back.model_copy(update={"protocol_version": PROTOCOL_VERSION}) == d, "only the version differs"
    # what a v1 agent does with it: validate the object on its own
    assert DesiredNodeState.model_validate_json(frame[4:]).protocol_version == 1


def test_a_frame_stamped_newer_than_this_agent_is_refused():
    with pytest.raises(FrameError, match=f"protocol_version {PROTOCOL_VERSION + 1} is newer than this agent's {PROTOCOL_VERSION}"):
        decode_frame(encode_frame(desired(), PROTOCOL_VERSION + 1)[4:])


@pytest.mark.parametrize("msg", [m for m in one_of_each() if "protocol_version" not in type(m).model_fields],
                         ids=lambda m: m.kind)
def test_frames_without_a_version_are_not_changed_by_the_stamp(msg):
    assert encode_frame(msg, 1) == encode_frame(msg, PROTOCOL_VERSION)


def test_a_v2_agent_gets_lanes_without_the_v3_recording_fields():
    d = desired()
    lane = d.lanes[0].model_copy(update={"recording": "payload", "recording_cap_bytes": 1 << 20})
    d = d.model_copy(update={"lanes": [lane]})
    v2 = json.loads(encode_frame(d, 2)[4:])
    assert "recording" not in v2["lanes"][0] and "recording_cap_bytes" not in v2["lanes"][0]
    v3 = json.loads(encode_frame(d, PROTOCOL_VERSION)[4:])
    assert v3["lanes"][0]["recording"] == "payload"


def test_evidence_without_a_recording_signs_the_bytes_a_v2_agent_signed():
    """A v2 agent's LaneEvidence has no `recording`; a v3 controller parsing it must check the same bytes."""
    ev, ident = evidence(), "s-0-1-wkab1abcdefghij"
    assert b'"recording"' not in evidence_bytes(ident, ev)
    with_rec = ev.model_copy(update={"recording": RecordingInfo(sha256="b" * 64, size=24)})
    assert b'"recording"' in evidence_bytes(ident, with_rec)


def test_the_stamp_touches_only_the_top_level_so_signed_evidence_still_verifies():
    key = Ed25519PrivateKey.generate()
    ev, ident = evidence(), "s-0-1-wkab1abcdefghij"
    msg = SignedEvidence(ident=ident, evidence=ev, signature=base64.b64encode(key.sign(evidence_bytes(ident, ev))).decode())
    for version in (1, PROTOCOL_VERSION):
        back = decode_frame(encode_frame(msg, version)[4:])
        assert back.evidence.protocol_version == PROTOCOL_VERSION
        key.public_key().verify(base64.b64decode(back.signature), evidence_bytes(back.ident, back.evidence))
    applied = decode_frame(encode_frame(Applied(generation=1, report=ReconcileReport(generation=1), status=status()), 1)[4:])
    assert applied.status.protocol_version == PROTOCOL_VERSION


# ---- join tokens ------------------------------------------------------------------------------------------------


def test_parse_token_accepts_a_well_formed_token():
    assert parse_token(TOKEN) == ("abcdefgh2345", "S" * 43, PIN)
    assert parse_token(f"  {TOKEN}\n") == ("abcdefgh2345", "S" * 43, PIN), "pasted with whitespace around it"
    assert parse_token(TOKEN.replace(PIN, PIN.upper()))[2] == PIN, "the pin compares lower-case"
    assert parse_token(f"wkj1.abcdefgh2345.{'a-_' * 7}.{PIN}")[1] == "a-_" * 7, "URL-safe secrets"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "wkj1",
        f"wkj2.abcdefgh2345.{'S' * 43}.{PIN}",
        f"WKJ1.abcdefgh2345.{'S' * 43}.{PIN}",
        f"abcdefgh2345.{'S' * 43}.{PIN}",
        f"wkj1.abcdefgh2345.{'S' * 43}.{PIN}.x",
        f"wkj1.abcdefgh2345.{'S' * 43}",
        f"wkj1.abcdefgh234.{'S' * 43}.{PIN}",
        f"wkj1.abcdefgh23456.{'S' * 43}.{PIN}",
        f"wkj1.abcdefgh-345.{'S' * 43}.{PIN}",
        f"wkj1.abcdefgh2345.{'S' * 19}.{PIN}",
        f"wkj1.abcdefgh2345.{'S' * 65}.{PIN}",
        f"wkj1.abcdefgh2345..{PIN}",
        f"wkj1.abcdefgh2345.{'S' * 43}.{PIN[:-1]}",
        f"wkj1.abcdefgh2345.{'S' * 43}.{PIN}0",
        f"wkj1.abcdefgh2345.{'S' * 43}.{'g' * 64}",
        f"wkj1.abcdefgh2345.{'S' * 43}.{PIN[:30]} {PIN[31:]}",
    ],
    ids=["empty", "prefix-only", "wrong-version", "upper-prefix", "no-prefix", "five-parts", "three-parts", "short-id",
         "long-id", "id-punctuation", "short-secret", "long-secret", "empty-secret", "short-pin", "long-pin", "pin-not-hex",
         "pin-with-space"],
)
def test_parse_token_rejects_malformed_tokens(token):
    with pytest.raises(ValueError, match=r"not a wicket join token|malformed join token"):
        parse_token(token)


@pytest.mark.parametrize("pin", ["0x" + PIN[2:], "+" + PIN[1:], PIN[:10] + "_" + PIN[11:], " " + PIN[1:], "\u0661" * 64],
                         ids=["0x-prefix", "sign", "underscore", "leading-space", "arabic-indic-digits"])
def test_parse_token_rejects_a_pin_that_is_not_64_hex_digits(pin):
    with pytest.raises(ValueError, match="malformed join token"):
        parse_token(f"wkj1.abcdefgh2345.{'S' * 43}.{pin}")


# ---- what an evidence signature covers ---------------------------------------------------------------------------


def test_evidence_bytes_are_deterministic():
    a, b = evidence(), evidence()
    assert a is not b and evidence_bytes("id-1", a) == evidence_bytes("id-1", b)
    shuffled = LaneEvidence.model_validate(dict(reversed(list(a.model_dump(mode="json").items()))))
    assert evidence_bytes("id-1", shuffled) == evidence_bytes("id-1", a), "field order in the input does not matter"
    via_json = LaneEvidence.model_validate_json(a.model_dump_json(indent=3))
    assert evidence_bytes("id-1", via_json) == evidence_bytes("id-1", a), "a stored and re-read record signs the same"
    assert evidence_bytes("id-1", a).startswith(EVIDENCE_SIGNATURE_CONTEXT + b"id-1\n")


# one different value for every field a record can vary in (kind is fixed by its type)
CHANGES = {
    "protocol_version": 1,
    "node_id": "rtr-2",
    "session_id": None,
    "revision": 3,
    "device_id": "rtu-2",
    "lane": "wkab1abcdefghik",
    "backend": "userspace",
    "engineer_public_key": KEYS[3],
    "node_public_key": None,
    "engineer_address": "100.64.0.3",
    "device_address": "192.0.2.11",
    "service": "modbus",
    "allowed": ["tcp/2405"],
    "listen_port": 51821,
    "planned_end": END + timedelta(microseconds=1),
    "opened_at": None,
    "closed_at": END + timedelta(seconds=1, microseconds=1),
    "end_reason": EndReason.control_lost,
    "lateness_ms": 1001,
    "totals": LaneTotals(packets_out=3, bytes_out=301, packets_in=2, bytes_in=200, packets_refused=1, bytes_refused=60),
    "flows": [],
    "transport": [FlowRecord(proto="udp", src="203.0.113.5", dst="198.51.100.1", dport=51821, observed="ended")],
    "blocked": [BlockedAttempt(destination="192.0.2.99", proto="tcp", port=22, packets=5)],
    "blocked_truncated": True,
    "wireguard": None,
    "notes": [],
    "recording": RecordingInfo(sha256="c" * 64, size=1024, packets=3),
    "scope": "grant",
    "destinations": {"scada": ["198.51.100.20"]},
}


def test_every_evidence_field_is_covered_by_a_change():
    assert set(CHANGES) | {"kind"} == set(LaneEvidence.model_fields)


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_evidence_bytes_change_when_any_field_changes(field):
    base = evidence()
    changed = LaneEvidence.model_validate({**base.model_dump(), field: CHANGES[field]})
    assert getattr(changed, field) != getattr(base, field)
    assert evidence_bytes("id-1", changed) != evidence_bytes("id-1", base)


def test_evidence_bytes_change_with_the_ident():
    ev = evidence()
    assert evidence_bytes("id-1", ev) != evidence_bytes("id-2", ev)


# ---- what a device report's signature covers ---------------------------------------------------------------------


def test_report_bytes_are_deterministic_and_cover_the_ident_and_every_part():
    rep = device_report()
    via_json = DeviceReport.model_validate_json(rep.model_dump_json(indent=2))
    assert report_bytes("report-1", via_json) == report_bytes("report-1", rep), "a spooled and re-read report signs the same"
    assert report_bytes("report-1", rep).startswith(REPORT_SIGNATURE_CONTEXT + b"report-1\n")
    assert report_bytes("report-2", rep) != report_bytes("report-1", rep)
    changed = {"breaches": rep.breaches[:1], "breaches_left_out": 0, "names": [], "name_changes": [], "devices": 3,
               "window_end": END + timedelta(seconds=1)}
    for field, value in changed.items():
        assert report_bytes("report-1", rep.model_copy(update={field: value})) != report_bytes("report-1", rep), field


def test_a_v3_agent_gets_no_baseline_or_grants_and_a_v4_agent_gets_both():
    from tests.test_baseline_rules import state

    d = desired().model_copy(update={"baseline": state(), "grants": [GrantSpec(
        session_id="g-1", device_id="rtu-1", device_address="192.0.2.11", end_time=END,
        flows=[{"protocol": "dlms", "transport": "tcp", "ports": [4059], "to": ["mdm"]}])]})
    v3 = json.loads(encode_frame(d, 3)[4:])
    assert "baseline" not in v3 and "grants" not in v3 and v3["lanes"], "lanes still go to a v3 agent"
    assert DesiredNodeState.model_validate(v3).baseline is None
    v4 = decode_frame(encode_frame(d, 4)[4:])
    assert v4.baseline == d.baseline and v4.grants == d.grants
