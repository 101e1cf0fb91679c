"""Device reports (protocol v4) from the agent link into the audit chain (`controller.device_reports`).

Over a real LinkServer on loopback: a frame-level peer (`Peer`) sends signed reports as an agent would, or the
agent's own link client (`SimAgent`) delivers what its spool holds. A report is recorded once, receipted every
time, refused (and nothing recorded) when its signature or node is wrong; breaches are aggregated per device and
rate-limited into a summary; DNS changes become destination records; every record renders as valid CEF, ECS and
OCSF. Recording runs on SQLite and PostgreSQL; the rest on SQLite.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from controller.audit import formats
from controller.models import Event, LaneEvidenceRecord
from nodeagent.enroll import LinkFiles
from nodeagent.state import StateDir
from nodeagent.wire import (
    Breach,
    DeviceReport,
    NameStatus,
    ReportReceipt,
    SignedReport,
    Welcome,
    report_bytes,
)
from tests.siemlab import parse_cef
from tests.test_siem_formats import ECS_EXPECTED_TYPES, ECS_FIELDS, OCSF_ACTIVITIES, flatten

from .linkpeer import LinkHarness, lane_evidence, signed, wait_for
from .session_helpers import POOL, RTU, SITE, policy_files

NODE = "rtr-1"
OTHER = "rtr-2"
SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
TYPES = ("device.breach", "device.breach_summary", "destination.resolved", "destination.stale", "destination.failed")
T0 = datetime(2030, 1, 2, 3, 4, 0, tzinfo=UTC)


@pytest.fixture
def lctl(tmp_path, db_url):
    """North-1 with RTU-17 (10.20.0.17) and two agents enrolled (first: the harness clock moves with each login)."""
    h = LinkHarness(tmp_path, db_url)
    try:
        h.add_site(SITE, tunnel_pool=POOL)
        h.enrolled(SITE, NODE)
        h.enrolled(SITE, OTHER)
        h.apply_policy(policy_files())
        h.add_device(RTU, SITE, addresses=["10.20.0.17"])
        yield h
    finally:
        h.close()


def report(node: str = NODE, breaches=(), names=(), changes=(), left_out: int = 0) -> DeviceReport:
    return DeviceReport(node_id=node, window_start=T0, window_end=T0 + timedelta(minutes=1), devices=3,
                        breaches=list(breaches), breaches_left_out=left_out, names=list(names), name_changes=list(changes))


def breach(asset: str | None, source: str, destination: str, port: int | None = 443, packets: int = 1, proto: str = "tcp"):
    return Breach(asset_id=asset, source=source, destination=destination, proto=proto, port=port, packets=packets)


def signed_report(h: LinkHarness, ident: str, rep: DeviceReport, node: str = NODE, key=None) -> SignedReport:
    """`rep` signed as the agent signs it: with `node`'s evidence key, or with `key`."""
    key = key or LinkFiles.of(h.state_dir(node)).evidence_key()
    return SignedReport(ident=ident, report=rep, signature=base64.b64encode(key.sign(report_bytes(ident, rep))).decode())


def linked_peer(h: LinkHarness, node: str = NODE):
    peer = h.peer(node)
    assert isinstance(peer.hello(node), Welcome)
    return peer


def recorded(h: LinkHarness, *types: str) -> list[Event]:
    with h.app.state.auth.factory() as s:
        return list(s.scalars(select(Event).where(Event.type.in_(types or TYPES)).order_by(Event.seq)))


def stored_reports(h: LinkHarness) -> list[LaneEvidenceRecord]:
    with h.app.state.auth.factory() as s:
        return list(s.scalars(select(LaneEvidenceRecord).order_by(LaneEvidenceRecord.id)))


BREACHES = [
    breach(RTU, "10.20.0.17", "203.0.113.9", 443, packets=5),
    breach(RTU, "10.20.0.17", "203.0.113.9", 443, packets=2, proto="udp"),
    breach(RTU, "10.20.0.17", "198.51.100.3", None, packets=9, proto="icmp"),
    breach(None, "10.20.0.99", "203.0.113.50", 22, packets=3),
]


# ---- recorded once -------------------------------------------------------------------------------------------


def test_a_report_is_recorded_once_in_one_go_and_receipted_each_time(lctl):
    peer = linked_peer(lctl)
    rep = report(breaches=BREACHES)
    msg = signed_report(lctl, "report-1893553445678", rep)
    for _ in range(2):  # the first receipt was lost in a cut, say
        peer.send(msg)
        assert peer.until(ReportReceipt).ident == "report-1893553445678"
    events = recorded(lctl)
    assert [(e.type, e.subject, e.result, e.reason) for e in events] == [
        ("device.breach", RTU, "failure", "outside_baseline"),
        ("device.breach", "10.20.0.99", "failure", "no_passport"),
    ]
    rtu, host = events
    assert len({e.seq for e in events}) == 2 and rtu.seq + 1 == host.seq, "one transaction: next to each other"
    assert (rtu.actor, rtu.source, rtu.device_ref, rtu.session_ref) == (f"agent:{NODE}", "10.20.0.17", RTU, None)
    assert rtu.body["destinations"] == [
        {"destination": "198.51.100.3", "proto": "icmp", "port": None, "packets": 9},
        {"destination": "203.0.113.9", "proto": "tcp", "port": 443, "packets": 5},
        {"destination": "203.0.113.9", "proto": "udp", "port": 443, "packets": 2},
    ]
    assert {k: rtu.body[k] for k in ("node", "site", "report", "start", "end", "device", "device_type", "sources", "rows",
                                     "packets")} == {
        "node": NODE, "site": SITE, "report": "report-1893553445678", "start": "2030-01-02T03:04:00Z",
        "end": "2030-01-02T03:05:00Z", "device": RTU, "device_type": "substation-rtu", "sources": ["10.20.0.17"],
        "rows": 3, "packets": 16}
    assert (host.device_ref, host.body["device"], host.body["sources"], host.body["packets"]) == (None, None, ["10.20.0.99"], 3)
    row, = stored_reports(lctl)
    assert (row.node, row.ident, row.session_id, row.end_reason) == (NODE, "report-1893553445678", None, "device_report")
    assert row.signature == msg.signature and DeviceReport.model_validate(row.body) == rep, "kept as signed"


@SQLITE
def test_a_report_with_nothing_to_record_is_receipted_and_not_kept(lctl):
    peer = linked_peer(lctl)
    peer.send(signed_report(lctl, "report-1893553445678", report(names=[NameStatus(fqdn="a.example.net", state="ok")])))
    assert peer.until(ReportReceipt).ident == "report-1893553445678"
    assert recorded(lctl) == [] and stored_reports(lctl) == []


@SQLITE
def test_a_bad_signature_another_nodes_report_or_a_taken_ident_is_refused_and_records_nothing(lctl):
    peer = linked_peer(lctl)
    rep = report(breaches=BREACHES)
    forged = signed_report(lctl, "report-1", rep, key=Ed25519PrivateKey.generate())
    tampered = signed_report(lctl, "report-2", rep).model_copy(update={"report": rep.model_copy(update={"devices": 4})})
    renamed = signed_report(lctl, "report-3", rep).model_copy(update={"ident": "report-4"})
    about_other = signed_report(lctl, "report-5", report(OTHER, breaches=BREACHES))
    others_key = signed_report(lctl, "report-6", rep, node=OTHER)
    for msg in (forged, tampered, renamed, about_other, others_key):
        peer.send(msg)
        assert peer.sync() is None, "the link stays up"
    assert not any(isinstance(m, ReportReceipt) for m in peer.received)
    assert recorded(lctl) == [] and stored_reports(lctl) == []
    # an ident a lane's evidence already holds is not taken for "delivered before"
    peer.send(signed(lctl.state_dir(NODE), "report-7", lane_evidence(NODE, None)))
    assert peer.sync() is None
    peer.send(signed_report(lctl, "report-7", rep))
    assert peer.sync() is None
    assert not any(isinstance(m, ReportReceipt) for m in peer.received) and recorded(lctl) == []


# ---- rate limit --------------------------------------------------------------------------------------------------


@SQLITE
def test_more_devices_than_the_limit_are_summarised_with_the_agents_own_left_outs(lctl):
    lctl.link.breach_records_per_report = 3
    peer = linked_peer(lctl)
    many = [breach(f"dev-{i}", f"10.20.1.{i}", "203.0.113.9", packets=10 + i) for i in range(5)]
    many += [breach("dev-0", "10.20.1.0", "203.0.113.10", packets=100),  # dev-0 has the most packets in all
             breach(None, "10.20.2.1", "203.0.113.9", packets=1), breach(None, "10.20.2.1", "203.0.113.11", packets=1)]
    peer.send(signed_report(lctl, "report-1893553445678", report(breaches=many, left_out=7)))
    peer.until(ReportReceipt)
    events = recorded(lctl)
    assert [(e.type, e.subject) for e in events] == [("device.breach", "dev-0"), ("device.breach", "dev-4"),
                                                      ("device.breach", "dev-3"), ("device.breach_summary", NODE)]
    summary = events[-1]
    assert (summary.result, summary.reason, summary.device_ref) == ("failure", "rate_limited", None)
    assert {k: summary.body[k] for k in ("limit", "devices", "rows", "packets", "left_out", "breaches_left_out")} == {
        "limit": 3, "devices": 3, "rows": 4, "packets": 12 + 11 + 2, "left_out": ["dev-2", "dev-1", "10.20.2.1"],
        "breaches_left_out": 7}


@SQLITE
def test_rows_the_agent_left_out_are_summarised_even_under_the_limit(lctl):
    peer = linked_peer(lctl)
    peer.send(signed_report(lctl, "report-1893553445678", report(breaches=BREACHES[:1], left_out=2)))
    peer.until(ReportReceipt)
    assert [(e.type, e.reason) for e in recorded(lctl)] == [("device.breach", "outside_baseline"),
                                                             ("device.breach_summary", "left_out_by_agent")]
    assert recorded(lctl, "device.breach_summary")[0].body["devices"] == 0


# ---- DNS -----------------------------------------------------------------------------------------------------------


@SQLITE
def test_changed_names_become_destination_records_with_their_address_sets(lctl):
    peer = linked_peer(lctl)
    names = [
        NameStatus(fqdn="scada.example.net", addresses=["198.51.100.20", "198.51.100.21"], state="ok", ttl_s=300,
                   resolved_at=T0, stale_until=T0 + timedelta(hours=1)),
        NameStatus(fqdn="ntp.example.net", addresses=["198.51.100.30"], state="stale", ttl_s=60,
                   resolved_at=T0 - timedelta(minutes=5), stale_until=T0 + timedelta(minutes=55), error="SERVFAIL"),
        NameStatus(fqdn="historian.example.net", state="failed", error="NXDOMAIN"),
        NameStatus(fqdn="new.example.net", state="pending"),
        NameStatus(fqdn="same.example.net", addresses=["198.51.100.40"], state="ok"),
    ]
    changes = ["scada.example.net", "ntp.example.net", "historian.example.net", "new.example.net", "gone.example.net"]
    peer.send(signed_report(lctl, "report-1893553445678", report(names=names, changes=changes)))
    peer.until(ReportReceipt)
    events = recorded(lctl)
    assert [(e.type, e.subject, e.result, e.reason, e.category) for e in events] == [
        ("destination.resolved", "scada.example.net", "success", None, "agent"),
        ("destination.stale", "ntp.example.net", "failure", "resolver_failing", "agent"),
        ("destination.failed", "historian.example.net", "failure", "no_addresses", "agent"),
    ]
    assert {k: events[0].body[k] for k in ("fqdn", "state", "addresses", "ttl_s", "resolved_at", "stale_until", "error",
                                           "node", "report")} == {
        "fqdn": "scada.example.net", "state": "ok", "addresses": ["198.51.100.20", "198.51.100.21"], "ttl_s": 300,
        "resolved_at": "2030-01-02T03:04:00Z", "stale_until": "2030-01-02T04:04:00Z", "error": None, "node": NODE,
        "report": "report-1893553445678"}
    assert events[1].body["stale_until"] == "2030-01-02T03:59:00Z" and events[1].body["addresses"] == ["198.51.100.30"]
    assert events[2].body["addresses"] == [] and events[2].body["error"] == "NXDOMAIN"


# ---- the API and the SIEM ----------------------------------------------------------------------------------------------


@SQLITE
def test_the_records_show_in_the_events_api_and_render_as_valid_cef_ecs_and_ocsf(lctl):
    lctl.link.breach_records_per_report = 1
    peer = linked_peer(lctl)
    names = [NameStatus(fqdn="scada.example.net", addresses=["198.51.100.20"], state="ok", ttl_s=300, resolved_at=T0),
             NameStatus(fqdn="historian.example.net", state="failed", error="NXDOMAIN")]
    rep = report(breaches=BREACHES, names=names, changes=["scada.example.net", "historian.example.net"])
    peer.send(signed_report(lctl, "report-1893553445678", rep))
    peer.until(ReportReceipt)
    by_device = lctl.events(device=RTU)
    assert [e["type"] for e in by_device if e["type"] in TYPES] == ["device.breach"]
    listed = [e for e in lctl.events() if e["type"] in TYPES]
    assert [e["type"] for e in listed] == ["device.breach", "device.breach_summary", "destination.resolved",
                                           "destination.failed"]
    for e in listed:
        event = formats.canonical(e["line"], e["hash"])
        _check_cef(event)
        _check_ecs(event)
        _check_ocsf(event)
    breach_event = formats.canonical(listed[0]["line"], listed[0]["hash"])
    header, ext = parse_cef(formats.cef(breach_event))
    assert header[4:7] == ["device.breach", "Device flows outside its baseline blocked", "8"]
    assert (ext["src"], ext["dhost"], ext["cs5"], ext["outcome"], ext["reason"]) == (
        "10.20.0.17", RTU, RTU, "failure", "outside_baseline")
    assert int(ext["end"]) - int(ext["start"]) == 60_000
    ecs = formats.ecs(breach_event)
    assert (ecs["event"]["category"], ecs["event"]["type"], ecs["event"]["severity"]) == (["network"], ["connection", "denied"], 8)
    assert ecs["source"]["ip"] == "10.20.0.17" and ecs["wicket"]["device"] == RTU
    ocsf = formats.ocsf(breach_event)
    assert (ocsf["class_uid"], ocsf["activity_id"], ocsf["severity_id"]) == (4001, 5, 4)
    assert ocsf["dst_endpoint"] == {"name": RTU, "uid": RTU} and ocsf["src_endpoint"] == {"ip": "10.20.0.17"}
    summary = formats.canonical(listed[1]["line"], listed[1]["hash"])
    assert "dhost" not in parse_cef(formats.cef(summary))[1], "a summary's subject is a node, not a device"
    failed = formats.canonical(listed[3]["line"], listed[3]["hash"])
    assert formats.level(failed) == "high" and formats.level(formats.canonical(listed[2]["line"], listed[2]["hash"])) == "info"


def _check_cef(event: dict) -> None:
    header, ext = parse_cef(formats.cef(event, host="ctl-a"))
    assert header[4] == event["type"] and header[5] == formats.MAPPINGS[event["type"]].name
    assert ext["outcome"] == event["result"] and ext["cat"] == event["category"]
    assert (ext["cs3"], ext["cs4"]) == (str(event["seq"]), event["hash"])
    for k in ("src", "dst"):
        if k in ext:
            ipaddress.ip_address(ext[k])
    for k in ("dpt", "spt", "start", "end"):
        if k in ext:
            assert ext[k].isdigit()


def _check_ecs(event: dict) -> None:
    doc = json.loads(formats.payload(event, "ecs"))
    flat = flatten(doc)
    assert set(flat) - {"wicket"} <= ECS_FIELDS, sorted(set(flat) - {"wicket"} - ECS_FIELDS)
    cat = doc["event"]["category"][0]
    assert set(doc["event"]["type"]) <= ECS_EXPECTED_TYPES[cat]
    assert doc["event"]["outcome"] == event["result"] and doc["wicket"]["body"] == event["body"]


def _check_ocsf(event: dict) -> None:
    doc = json.loads(formats.payload(event, "ocsf"))
    c, a = doc["class_uid"], doc["activity_id"]
    assert a in OCSF_ACTIVITIES[c] and doc["type_uid"] == c * 100 + a
    assert doc["status_id"] == {"success": 1, "failure": 2}[event["result"]]
    if c == 4001:
        assert doc.get("src_endpoint") or doc.get("dst_endpoint")
    assert doc["unmapped"]["wicket"]["body"] == event["body"]


# ---- the agent's spool over its real link client ----------------------------------------------------------------------


@SQLITE
def test_a_spooled_report_is_delivered_and_deleted_once_receipted(lctl):
    spool = StateDir(lctl.state_dir(NODE)).reports
    ident = spool.spool(report(breaches=BREACHES[:1]))
    agent = lctl.sim(NODE)
    wait_for(lambda: not spool.idents(), "the report receipted and deleted")
    assert [(e.type, e.body["report"]) for e in recorded(lctl)] == [("device.breach", ident)]
    assert agent.client.connected


@SQLITE
def test_a_link_that_speaks_v3_keeps_reports_spooled_and_says_so_once(lctl, caplog):
    spool = StateDir(lctl.state_dir(NODE)).reports
    spool.spool(report(breaches=BREACHES[:1]))
    with caplog.at_level(logging.WARNING, logger="wicket.agent.link"):
        agent = lctl.sim(NODE, version=3)
        agent.wait_connected()
        wait_for(lambda: "takes no device reports" in caplog.text, "the warning")
        spool.spool(report(breaches=BREACHES[1:2]).model_copy(update={"window_end": T0 + timedelta(minutes=2)}))
        time.sleep(1.0)  # four turns of the link client's chores
    assert len(spool.idents()) == 2 and recorded(lctl) == [] and stored_reports(lctl) == []
    assert caplog.text.count("takes no device reports") == 1
