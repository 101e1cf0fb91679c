"""The SIEM renderings of audit records, checked against each format's own conventions.

Events are made the way the chain makes them (`chain.record_line`, then `formats.canonical`), with the
bodies the controller writes (auth.py, sessions.py, session_evidence.py, agent_link.py, policy_store.py).
For each format the test parses what was rendered with a parser written here (CEF, RFC 5424) or checks
names and values against the schema's published lists (ECS field names and categorisation values, OCSF
classes, activities and required attributes), so a wrong field name, a missing escape, an impossible
`event.type` or a `type_uid` that is not class*100+activity fails.
"""

from __future__ import annotations

import ipaddress
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.audit import chain, formats
from tests.siemlab import RFC5424, parse_cef, parse_rfc5424

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 26, 11, 10, 29, 123456, tzinfo=UTC)
NASTY = 'o"brien]\\x|y=z\nnext line é'  # every character some format must escape, and a non-ASCII one


def make(seq: int, type_: str, category: str, *, result="success", actor=None, actor_id=None, subject=None,
         source=None, reason=None, at=T0, clock="synced", **body) -> dict:
    """A canonical event, as the chain makes and the shipper reads it."""
    session = body.get("session_id") or (subject if category in ("session", "evidence") else None)
    device = body.get("device") or body.get("device_id")
    line = chain.record_line(seq=seq, at=at, clock=clock, category=category, type=type_, result=result, actor=actor,
                             actor_id=actor_id, subject=subject, source=source, reason=reason, session=session,
                             device=device, body=body)
    return formats.canonical(line, chain.chain_hash(chain.GENESIS, chain.leaf_hash(line)))


DECISION = {"outcome": "allow_with_approval", "policy_version": "sha256:" + "5" * 64,
            "access": [{"address": "10.20.0.17", "port": 2404, "protocol": "iec104", "transport": "tcp"}],
            "approvals_required": 1, "failed_checks": [], "trace": []}
LANE_EVIDENCE = {"node_id": "edge-north-1", "session_id": "s-abc", "device_address": "10.20.0.17",
                 "engineer_address": "100.64.9.2", "opened_at": "2026-11-26T11:00:00Z",
                 "closed_at": "2026-11-26T11:30:00.5Z", "totals": {"bytes_out": 1500, "bytes_in": 98000,
                                                                     "packets_out": 30, "packets_in": 80},
                 "flows": [{"proto": "tcp", "src": "100.64.9.2", "dst": "10.20.0.17", "dport": 2404,
                            "bytes_out": 1500, "bytes_in": 98000}] * 3, "blocked": []}
SESSION_EVIDENCE_BODY = {
    "session_id": "s-abc", "user": "erin", "device": "RTU-17", "site": "north-1", "task": "rtu-two-person",
    "approvals_required": 2, "break_glass": False,
    "approvals": [{"approver": "alex", "verdict": "approve", "kind": "request"},
                  {"approver": "ana", "verdict": "approve", "kind": "request"},
                  {"approver": "zed", "verdict": "reject", "kind": "extension"}],
    "protocols": [{"protocol": "iec104", "transport": "tcp", "port": 2404}],
    "node": "edge-north-1", "tunnel_address": "100.64.9.2", "device_address": "10.20.0.17", "listen_port": 51207,
    "requested": {"at": "2026-11-26T10:50:00Z", "duration_s": 1800},
    "planned": {"start": "2026-11-26T10:59:00Z", "end": "2026-11-26T11:29:00Z"},
    "actual": {"start": "2026-11-26T11:00:00Z", "end": "2026-11-26T11:30:00.5Z"},
    "end_reason": "closed", "policy_version": "sha256:" + "5" * 64, "decision": DECISION,
    "totals": {"packets_out": 30, "bytes_out": 1500, "packets_in": 80, "bytes_in": 98000, "packets_refused": 2,
               "bytes_refused": 120},
    "wireguard": {"rx_bytes": 3000, "tx_bytes": 101000, "handshakes_observed": 2},
    "anomalies": [{"kind": "blocked_attempt", "destination": "10.20.0.99", "proto": "tcp", "port": 22, "packets": 2}],
    "node_evidence": "delivered",
    "lanes": [{"node": "edge-north-1", "ident": "ev-1", "end_reason": "closed", "signature": "c2ln",
               "evidence": LANE_EVIDENCE}],
}


def samples() -> dict[str, dict]:
    return {
        "login_ok": make(1, "login", "authentication", actor="erin", actor_id=2, subject="erin", source="198.51.100.7",
                         factor="totp", token_kind="api"),
        "login_failed": make(2, "login", "authentication", result="failure", subject="mallory", source="2001:db8::7",
                             reason="invalid_credentials"),
        "approve": make(3, "session.approve", "session", actor="alex", actor_id=3, subject="s-abc", source="198.51.100.9",
                        approver_reason="checked WO-4711", approvals=1, approvals_required=1, state="approved",
                        session_id="s-abc", user="erin", device="RTU-17", site="north-1", task="rtu-two-person",
                        break_glass=False, policy_version=DECISION["policy_version"], decision=DECISION),
        "evidence": make(4, "session.evidence", "evidence", actor="system", subject="s-abc", clock="unsynced",
                         **SESSION_EVIDENCE_BODY),
        "policy": make(5, "policy.apply", "policy", actor="root", actor_id=1, subject="policy-3", source="198.51.100.1",
                       version="sha256:" + "a" * 64, previous="sha256:" + "b" * 64, changes=["+ tasks.x → y"],
                       change_count=1, files=["tasks.yaml"]),
        "link_down": make(6, "agent.link_down", "agent", actor="agent:edge-north-1", subject="edge-north-1",
                          source="192.0.2.10:40512", replica="ctl-a"),
        "lane_evidence": make(7, "lane.evidence", "evidence", actor="agent:edge-north-1", subject="s-abc", ident="ev-1",
                              end_reason="closed", closed_at="2026-11-26T11:30:00.5Z", lateness_ms=None,
                              bytes_out=1500, bytes_in=98000, flows=3, blocked=1),
        "break_glass": make(8, "break_glass.open", "session", actor="bea", actor_id=5, subject="s-bg", severity="high",
                            state="active", incident="INC-1", session_id="s-bg", user="bea", device="RTU-17",
                            policy_version=DECISION["policy_version"], decision=DECISION),
        "unknown": make(9, "frobnicate.twiddle", "widgets", actor="root", subject="w-1"),
        "nasty": make(10, "user_created", "account", actor=NASTY, actor_id=1, subject=NASTY[:20], source="local",
                      reason=NASTY[:30], roles=["engineer@north-1"]),
        "big_seq": make(2147483648, "logout", "authentication", actor="erin", subject="erin"),
    }


SAMPLES = samples()


# ---- the mapping table covers every recorded type and stays inside each taxonomy -----------------------

# ECS 8.11 categorisation: allowed event.kind, and per event.category the expected event.type values.
ECS_KINDS = {"alert", "asset", "enrichment", "event", "metric", "state", "pipeline_error", "signal"}
ECS_EXPECTED_TYPES = {
    "api": {"access", "admin", "allowed", "change", "creation", "deletion", "denied", "end", "info", "start", "user"},
    "authentication": {"start", "end", "info"},
    "configuration": {"access", "change", "creation", "deletion", "info"},
    "database": {"access", "change", "info", "error"},
    "driver": {"change", "end", "info", "start"},
    "email": {"info"},
    "file": {"access", "change", "creation", "deletion", "info"},
    "host": {"access", "change", "end", "info", "start"},
    "iam": {"admin", "change", "creation", "deletion", "group", "info", "user"},
    "intrusion_detection": {"allowed", "denied", "info"},
    "library": {"start"},
    "malware": {"info"},
    "network": {"access", "allowed", "connection", "denied", "end", "info", "protocol", "start"},
    "package": {"access", "change", "deletion", "info", "installation", "start"},
    "process": {"access", "change", "end", "info", "start"},
    "registry": {"access", "change", "creation", "deletion"},
    "session": {"start", "end", "info"},
    "threat": {"indicator"},
    "vulnerability": {"info"},
    "web": {"access", "error", "info"},
}
# OCSF 1.3: the classes we use, their activity_id enums and the attributes each class requires.
OCSF_ACTIVITIES = {
    0: {0, 99},
    3001: {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 99},
    3002: {1, 2, 3, 4, 5, 6, 99},
    3003: {1, 2, 99},
    4001: {1, 2, 3, 4, 5, 6, 7, 99},
    6003: {1, 2, 3, 4, 99},
}


def recorded_types() -> set[str]:
    """Every event type the controller writes, read from its source."""
    found: set[str] = set()
    for path in (REPO / "controller").rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'\btype="([a-z_]+(?:\.[a-z_]+)?)"', text))
        found |= set(re.findall(r'\btype="[a-z_.]+" if [^"\n]+ else "([a-z_.]+)"', text))
        if path.name == "inventory.py":
            found |= set(re.findall(r'_event\(s, caller, now, source, "([a-z_]+\.[a-z_]+)"', text))
        if path.name == "sessions.py":
            found |= set(re.findall(r'_Refusal\([^"]*?"(session\.[a-z_]+)"', text, re.S))
            if 'type=f"session.{_verb(to)}"' in text:
                found |= {"session.close", "session.expire", "session.revoke"}
    found.discard("")
    return found


def test_every_recorded_event_type_has_its_own_mapping():
    types = recorded_types()
    assert {"login", "session.approve", "site.create", "session.revoke", "user_enabled"} <= types  # the scan works
    missing = sorted(t for t in types if t not in formats.MAPPINGS)
    assert not missing, f"event types without a SIEM mapping in controller/audit/formats.py: {missing}"


@pytest.mark.parametrize("name", sorted(formats.MAPPINGS) + ["<category:" + c for c in sorted(formats._BY_CATEGORY)]
                         + ["<generic>"])
def test_mappings_use_only_values_of_each_taxonomy(name):
    if name == "<generic>":
        m = formats.mapping("no.such", "no-such-category")
    elif name.startswith("<category:"):
        m = formats._BY_CATEGORY[name.split(":", 1)[1]]
    else:
        m = formats.MAPPINGS[name]
    assert m.ecs_category in ECS_EXPECTED_TYPES
    assert set(m.ecs_type) <= ECS_EXPECTED_TYPES[m.ecs_category], (m.ecs_category, m.ecs_type)
    assert m.ocsf_activity in OCSF_ACTIVITIES[m.ocsf_class]
    assert m.ocsf_activity in formats.OCSF_ACTIVITIES[m.ocsf_class]
    assert m.level in formats.LEVELS and m.failure_level in formats.LEVELS
    assert m.name and "|" not in m.name


def test_an_unknown_type_is_mapped_by_its_category_or_generically():
    assert formats.mapping("session.something_new", "session").ocsf_class == 6003
    assert formats.mapping("account.something_new", "account").ecs_category == "iam"
    generic = formats.mapping("frobnicate.twiddle", "widgets")
    assert (generic.ocsf_class, generic.ocsf_activity) == (0, 99)


# ---- every rendering carries seq and hash --------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(SAMPLES))
@pytest.mark.parametrize("fmt", ["cef", "ecs", "ocsf", "json", "rfc5424", "hec"])
def test_every_rendering_carries_seq_and_hash(key, fmt):
    e = SAMPLES[key]
    if fmt == "rfc5424":
        sd = parse_rfc5424(formats.rfc5424(e, "json", host="ctl-a"))["sd"][formats.SD_ID]
        assert (sd["seq"], sd["hash"]) == (str(e["seq"]), e["hash"])
    elif fmt == "hec":
        env = formats.hec(e, "ecs", host="ctl-a")
        assert (env["fields"]["seq"], env["fields"]["hash"]) == (str(e["seq"]), e["hash"])
    elif fmt == "cef":
        _, ext = parse_cef(formats.cef(e))
        assert (ext["cs3"], ext["cs3Label"], ext["cs4"], ext["cs4Label"]) == (str(e["seq"]), "seq", e["hash"], "hash")
    elif fmt == "ecs":
        doc = formats.ecs(e)
        assert (doc["event"]["sequence"], doc["event"]["hash"]) == (e["seq"], e["hash"])
    elif fmt == "ocsf":
        doc = formats.ocsf(e)
        assert (doc["metadata"]["sequence"], doc["metadata"]["uid"]) == (e["seq"], e["hash"])
    else:
        doc = json.loads(formats.payload(e, "json"))
        assert (doc["seq"], doc["hash"]) == (e["seq"], e["hash"])


# ---- CEF --------------------------------------------------------------------------------------------------

CEF_KEYS = {"act", "app", "cat", "cnt", "dhost", "dpt", "dst", "duser", "dvchost", "end", "externalId", "in", "msg",
            "out", "outcome", "proto", "reason", "rt", "shost", "spt", "src", "start", "suid", "suser",
            *(f"cs{i}" for i in range(1, 7)), *(f"cs{i}Label" for i in range(1, 7)),
            *(f"cn{i}" for i in range(1, 4)), *(f"cn{i}Label" for i in range(1, 4))}


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_cef_header_and_extension_follow_the_spec(key):
    e = SAMPLES[key]
    text = formats.cef(e, host="ctl-a")
    assert "\n" not in text and "\r" not in text
    header, ext = parse_cef(text)
    assert header[0] == "CEF:0" and header[1:3] == ["wicket", "wicket"]
    assert header[4] == e["type"] and header[5] == formats.mapping(e["type"], e["category"]).name
    assert 0 <= int(header[6]) <= 10
    assert set(ext) <= CEF_KEYS, set(ext) - CEF_KEYS
    for k in ext:  # every custom field has its label, and no label stands alone
        if re.fullmatch(r"c[sn]\d", k):
            assert f"{k}Label" in ext
        if k.endswith("Label"):
            assert k[:-5] in ext
    assert int(ext["rt"]) == int(datetime.fromisoformat(e["time"]).timestamp() * 1000)
    assert ext["outcome"] == e["result"] and ext["cat"] == e["category"] == ext["cs6"]
    for k in ("src", "dst"):
        if k in ext:
            ipaddress.ip_address(ext[k])
    for k in ("dpt", "spt", "in", "out", "start", "end", "suid"):
        if k in ext:
            assert ext[k].isdigit()


def test_cef_fields_of_an_approval_and_an_evidence_record():
    _, ext = parse_cef(formats.cef(SAMPLES["approve"]))
    assert ext["suser"] == "alex" and ext["duser"] == "erin" and ext["cs2"] == "alex"
    assert (ext["dst"], ext["dhost"], ext["dpt"], ext["proto"], ext["app"]) == ("10.20.0.17", "RTU-17", "2404", "TCP", "iec104")
    assert ext["cs1"] == "rtu-two-person@sha256:" + "5" * 64 and ext["cs1Label"] == "policy"
    assert ext["externalId"] == "s-abc" and ext["src"] == "198.51.100.9" and ext["act"] == "approve"
    _, ext = parse_cef(formats.cef(SAMPLES["evidence"]))
    # CEF: `in` flows source (engineer) → destination (device), `out` the other way
    assert (ext["in"], ext["out"]) == ("1500", "98000")
    assert ext["cs2"] == "alex,ana" and ext["cn1"] == "3" and ext["cn2"] == "1"
    assert ext["src"] == "100.64.9.2" and ext["dst"] == "10.20.0.17"
    assert int(ext["end"]) - int(ext["start"]) == 30 * 60 * 1000 + 500
    header, ext = parse_cef(formats.cef(SAMPLES["login_failed"]))
    assert ext["suser"] == "mallory" and ext["src"] == "2001:db8::7" and int(header[6]) >= 6


def test_cef_escaping_round_trips_a_hostile_value():
    header, ext = parse_cef(formats.cef(SAMPLES["nasty"]))
    assert ext["suser"] == NASTY and ext["reason"] == NASTY[:30]
    text = formats.cef(dict(SAMPLES["nasty"], type="a|b\\c"))
    header, _ = parse_cef(text)
    assert header[4] == "a|b\\c" and len(header) == 7


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
       st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40))
def test_cef_escaping_round_trips_any_text(value, head):
    text = f"CEF:0|{formats.cef_header(head)}|p|1|sig|name|5|suser={formats.cef_value(value)} cs1={formats.cef_value(value)}"
    header, ext = parse_cef(text)
    assert header[1] == head
    if value.strip(" ") == value or value == "":  # CEF values cannot keep trailing spaces before the next key
        assert ext["cs1"] == value.replace("\r\n", "\n")


# ---- ECS --------------------------------------------------------------------------------------------------

ECS_FIELDS = {
    "@timestamp", "message", "ecs.version",
    *(f"event.{k}" for k in ("kind", "category", "type", "action", "outcome", "severity", "sequence", "hash", "id",
                             "module", "dataset", "provider", "reason", "start", "end", "duration")),
    "observer.vendor", "observer.product", "observer.version", "observer.type", "observer.hostname",
    "user.name", "user.id", "user.target.name",
    *(f"source.{k}" for k in ("address", "ip", "port", "bytes", "packets")),
    *(f"destination.{k}" for k in ("address", "ip", "port", "bytes", "packets")),
    "network.transport", "network.protocol", "network.bytes", "network.packets",
    "rule.id", "rule.name", "rule.version", "rule.ruleset", "related.user", "related.ip",
}


def flatten(doc: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict) and not (prefix + k).startswith("wicket"):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_ecs_uses_ecs_field_names_and_allowed_values(key):
    e = SAMPLES[key]
    doc = json.loads(formats.payload(e, "ecs", host="ctl-a"))
    flat = flatten(doc)
    custom = {k for k in flat if k == "wicket"}
    assert set(flat) - custom <= ECS_FIELDS, sorted(set(flat) - custom - ECS_FIELDS)
    ev = doc["event"]
    assert ev["kind"] in ECS_KINDS
    assert len(ev["category"]) == 1 and ev["category"][0] in ECS_EXPECTED_TYPES
    assert set(ev["type"]) <= ECS_EXPECTED_TYPES[ev["category"][0]]
    assert ev["outcome"] in ("success", "failure", "unknown") and ev["outcome"] == e["result"]
    assert ev["action"] == e["type"] and doc["@timestamp"] == e["time"]
    for k in ("source.ip", "destination.ip"):
        if k in flat:
            ipaddress.ip_address(flat[k])
    for k in ("source.port", "destination.port", "source.bytes", "destination.bytes", "event.duration"):
        if k in flat:
            assert isinstance(flat[k], int) and flat[k] >= 0
    if "network.transport" in flat:
        assert flat["network.transport"] == flat["network.transport"].lower()
    assert doc["wicket"]["body"] == e["body"] and doc["wicket"]["seq"] == e["seq"]


def test_ecs_fields_of_an_evidence_record_and_a_failed_login():
    doc = formats.ecs(SAMPLES["evidence"])
    assert doc["source"]["bytes"] == 1500 and doc["destination"]["bytes"] == 98000  # engineer → device is source
    assert doc["source"]["ip"] == "100.64.9.2" and doc["destination"] == {"ip": "10.20.0.17", "address": "10.20.0.17",
                                                                            "port": 2404, "bytes": 98000, "packets": 80}
    assert doc["event"]["duration"] == (30 * 60 + 0.5) * 10**9
    assert doc["event"]["start"] == "2026-11-26T11:00:00.000000Z" and doc["event"]["end"] == "2026-11-26T11:30:00.500000Z"
    assert doc["network"] == {"transport": "tcp", "protocol": "iec104", "bytes": 99500, "packets": 110}
    assert doc["rule"]["name"] == "rtu-two-person" and doc["rule"]["id"] == "sha256:" + "5" * 64
    assert doc["user"] == {"name": "system", "target": {"name": "erin"}}
    assert doc["wicket"]["approvers"] == ["alex", "ana"]
    doc = formats.ecs(SAMPLES["login_failed"])
    assert doc["user"] == {"name": "mallory"} and doc["source"]["ip"] == "2001:db8::7"
    assert doc["event"]["outcome"] == "failure" and doc["event"]["reason"] == "invalid_credentials"


# ---- OCSF -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_ocsf_has_its_required_attributes(key):
    e = SAMPLES[key]
    doc = json.loads(formats.payload(e, "ocsf"))
    for k in ("activity_id", "category_uid", "class_uid", "severity_id", "time", "type_uid", "metadata"):
        assert k in doc, k
    c, a = doc["class_uid"], doc["activity_id"]
    assert a in OCSF_ACTIVITIES[c]
    assert doc["type_uid"] == c * 100 + a and doc["category_uid"] == c // 1000
    assert doc["type_name"] == f"{doc['class_name']}: {doc['activity_name']}"
    assert 1 <= doc["severity_id"] <= 6
    assert doc["status_id"] == {"success": 1, "failure": 2}[e["result"]]
    assert isinstance(doc["time"], int) and doc["time"] == int(datetime.fromisoformat(e["time"]).timestamp() * 1000)
    meta = doc["metadata"]
    assert meta["version"] == formats.OCSF_VERSION and meta["product"]["name"] and meta["product"]["vendor_name"]
    if c in (3001, 3002, 3003):
        assert doc["user"]["name"]
    if c == 3002:
        assert doc.get("service") or doc.get("dst_endpoint")
    if c == 3003:
        assert doc["privileges"] or doc.get("groups")
    if c == 6003:
        assert doc["actor"] and doc["api"]["operation"] == e["type"] and doc["src_endpoint"]
    if c == 4001:
        assert doc.get("src_endpoint") or doc.get("dst_endpoint")
    for end in ("src_endpoint", "dst_endpoint"):
        if "ip" in doc.get(end, {}):
            ipaddress.ip_address(doc[end]["ip"])
    assert doc["unmapped"]["wicket"]["body"] == e["body"]


def test_ocsf_classes_of_the_representative_events():
    cls = {k: (formats.ocsf(e)["class_uid"], formats.ocsf(e)["activity_id"]) for k, e in SAMPLES.items()}
    assert cls["login_ok"] == cls["login_failed"] == (3002, 1)
    assert cls["approve"] == (6003, 3) and cls["policy"] == (6003, 3)
    assert cls["evidence"] == cls["lane_evidence"] == (4001, 6)
    assert cls["link_down"] == (4001, 2) and cls["break_glass"] == (3003, 1) and cls["nasty"] == (3001, 1)
    assert cls["unknown"] == (0, 99)
    doc = formats.ocsf(SAMPLES["evidence"])
    assert doc["traffic"] == {"bytes_in": 98000, "bytes_out": 1500, "packets_in": 80, "packets_out": 30, "bytes": 99500}
    assert doc["dst_endpoint"] == {"ip": "10.20.0.17", "port": 2404, "name": "RTU-17", "uid": "RTU-17"}
    assert doc["src_endpoint"] == {"ip": "100.64.9.2"}
    assert doc["connection_info"]["protocol_name"] == "tcp" and doc["duration"] == 1800500
    assert doc["session"]["uid"] == "s-abc" and doc["policy"]["name"] == "rtu-two-person"
    bg = formats.ocsf(SAMPLES["break_glass"])
    assert bg["severity_id"] == 4 and bg["privileges"] == ["RTU-17:tcp/2404"] and bg["user"]["name"] == "bea"
    assert formats.ocsf(SAMPLES["link_down"])["src_endpoint"] == {"ip": "192.0.2.10", "port": 40512}


# ---- RFC 5424 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(SAMPLES))
@pytest.mark.parametrize("fmt", formats.PAYLOAD_FORMATS)
def test_rfc5424_grammar_structured_data_and_payload(key, fmt):
    e = SAMPLES[key]
    text = formats.rfc5424(e, fmt, host="ctl-a", procid="4242")
    assert RFC5424.match(text)
    m = parse_rfc5424(text)
    lv = formats.LEVELS[formats.level(e)]
    facility = 10 if e["category"] in ("authentication", "account") else 20
    assert (m["facility"], m["severity"]) == (facility, lv.syslog)
    assert (m["version"], m["timestamp"], m["hostname"], m["app"], m["procid"], m["msgid"]) == (
        1, e["time"], "ctl-a", "wicket", "4242", e["type"])
    assert m["sd"]["timeQuality"] == {"tzKnown": "1", "isSynced": "1" if e["clock"] == "synced" else "0"}
    assert m["sd"]["origin"] == {"software": "wicket", "swVersion": formats.__version__}
    assert 1 <= int(m["sd"]["meta"]["sequenceId"]) <= 2147483647
    own = m["sd"]["wicket@32473"]
    assert own == sd_expected(e)
    assert m["bom"] == (not m["msg"].isascii() or not formats.payload(e, fmt).isascii())
    assert m["msg"] == formats.payload(e, fmt, host="ctl-a")


def test_rfc5424_sequence_id_wraps_as_the_rfc_says():
    assert formats.sequence_id(1) == 1 and formats.sequence_id(2147483647) == 2147483647
    assert formats.sequence_id(2147483648) == 1
    m = parse_rfc5424(formats.rfc5424(SAMPLES["big_seq"], "json"))
    assert m["sd"]["meta"]["sequenceId"] == "1" and m["sd"]["wicket@32473"]["seq"] == "2147483648"


def sd_expected(e: dict) -> dict:
    """Our SD element's params as an RFC 5424 reader decodes them: the event's fields, with a control
    character shown as `#` and its octal code (`formats.sd_escape`)."""
    return {k: str(e[k]).replace("\n", "#012") for k in ("v", "seq", "hash", "category", "type", "result", "clock",
                                                          "actor", "actor_id", "subject", "source", "reason",
                                                          "session", "device") if e.get(k) is not None}


def test_rfc5424_escapes_sd_values():
    text = formats.rfc5424(SAMPLES["nasty"], "cef")
    assert 'actor="o\\"brien\\]\\\\x|y=z#012next line é"' in text
    assert "\n" not in text
    assert parse_rfc5424(text)["sd"]["wicket@32473"]["actor"] == NASTY.replace("\n", "#012")
    assert formats.sd_escape("a\tb\x7f\\n") == "a#011b#177\\\\n"


def test_rfc5424_facility_can_be_fixed_and_too_long_records_lose_only_their_body():
    m = parse_rfc5424(formats.rfc5424(SAMPLES["login_ok"], "json", facility="local7"))
    assert m["facility"] == 23
    e = SAMPLES["evidence"]
    full = formats.rfc5424(e, "ecs")
    cut = formats.rfc5424(e, "ecs", max_bytes=2048)
    assert len(full.encode()) > 2048 >= len(cut.encode())
    m = parse_rfc5424(cut)
    assert m["sd"]["wicket@32473"]["truncated"] == "1" and m["sd"]["wicket@32473"]["hash"] == e["hash"]
    doc = json.loads(m["msg"])
    assert doc["wicket"]["body"]["truncated"] is True and doc["event"]["sequence"] == e["seq"]


# ---- HEC, native JSON, canonical ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", formats.PAYLOAD_FORMATS)
def test_hec_envelope(fmt):
    e = SAMPLES["evidence"]
    env = json.loads(json.dumps(formats.hec(e, fmt, host="ctl-a", index="ot")))
    assert set(env) == {"time", "host", "source", "sourcetype", "event", "fields", "index"}
    assert env["time"] == pytest.approx(datetime.fromisoformat(e["time"]).timestamp(), abs=1e-6)
    assert env["host"] == "ctl-a" and env["source"] == "wicket" and env["sourcetype"] == f"wicket:{fmt}"
    assert all(isinstance(v, str) for v in env["fields"].values())
    assert env["fields"] == {"seq": "4", "hash": e["hash"], "category": "evidence", "type": "session.evidence",
                             "result": "success", "session": "s-abc", "device": "RTU-17"}
    if fmt == "cef":
        assert parse_cef(env["event"])[1]["cs4"] == e["hash"]
    else:
        assert env["event"] == json.loads(formats.payload(e, fmt, host="ctl-a"))


def test_native_json_is_the_canonical_event_on_one_line():
    e = SAMPLES["nasty"]
    line = formats.payload(e, "json")
    assert "\n" not in line and json.loads(line) == e
    record = {k: v for k, v in e.items() if k != "hash"}
    assert chain.record_line(seq=record["seq"], at=datetime.fromisoformat(record["time"]), clock=record["clock"],
                             category=record["category"], type=record["type"], result=record["result"],
                             actor=record["actor"], actor_id=record["actor_id"], subject=record["subject"],
                             source=record["source"], reason=record["reason"], session=record["session"],
                             device=record["device"], body=record["body"]) == json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def test_a_damaged_record_still_exports_under_its_seq():
    e = formats.canonical('{"seq": 12, "trunc', "f" * 64, seq=12)
    assert (e["type"], e["seq"], e["hash"], e["result"]) == ("audit.unreadable", 12, "f" * 64, "failure")
    assert parse_cef(formats.cef(e))[1]["cs3"] == "12"
    assert formats.ocsf(e)["severity_id"] == 4


def test_levels_raise_failures_and_break_glass():
    assert formats.level(SAMPLES["login_ok"]) == "info"
    assert formats.level(SAMPLES["login_failed"]) == "warning"
    assert formats.level(SAMPLES["break_glass"]) == "high"
    assert formats.level(dict(SAMPLES["lane_evidence"], result="failure")) == "high"  # a bad signature
    assert formats.LEVELS["high"].syslog < formats.LEVELS["info"].syslog


def test_times_without_fraction_or_with_offsets_are_read():
    e = make(11, "session.close", "session", actor="erin", subject="s-1", at=T0 + timedelta(seconds=1),
             session_id="s-1", started_at="2026-11-26T12:00:00+01:00", ended_at="2026-11-26T11:05:00Z")
    doc = formats.ecs(e)
    assert doc["event"]["duration"] == 5 * 60 * 10**9


def test_a_damaged_record_that_is_still_json_exports_as_unreadable_in_every_format():
    """A stored line that parses but is not a record must not stop a sink: it goes out as audit.unreadable."""
    from controller.audit import formats as f

    for line in ('{"seq":5,"v":1}', '{"seq":5,"type":7,"time":"x","category":"c","result":"r"}',
                 '{"seq":5,"type":"t","time":"x","category":"c","result":"r","body":[1]}'):
        event = f.canonical(line, "ab" * 32, seq=5)
        assert event["type"] == "audit.unreadable" and event["seq"] == 5 and event["hash"] == "ab" * 32
        for fmt in f.PAYLOAD_FORMATS:
            assert f.payload(event, fmt)
