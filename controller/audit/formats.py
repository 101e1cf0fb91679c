"""SIEM renderings of one audit record: RFC 5424 syslog, CEF, Elastic ECS, OCSF, native JSON and the
Splunk HEC envelope. The sinks (`controller.audit.sinks`) call these; so can anyone who wants to see what
a SOC receives (`docs/soc-reference.md` lists every field).

Everything starts from THE canonical event — `canonical(row.line, row.hash)`: the record's own JSON object
(v, seq, time, clock, category, type, result, actor, actor_id, subject, source, reason, session, device,
body) plus its chain hash. Every rendering carries `seq` and `hash`, so a SOC can detect a gap (a missing
sequence number), an edit (a hash that the offline verifier rejects) and a duplicate (same seq and hash:
delivery is at-least-once).

How an event type maps to each taxonomy is one table, `MAPPINGS` (type → CEF name and severity, ECS
category and type, OCSF class and activity). A type not in it gets a mapping by its wicket category
(`mapping`), so a new event type is exported sanely before anyone adds it here.

Directions of traffic: wicket's evidence counts `bytes_out` engineer → device and `bytes_in` device →
engineer. The engineer is the source and the device the destination, so:
  ECS   source.bytes = bytes_out, destination.bytes = bytes_in
  CEF   in = bytes_out, out = bytes_in  (ArcSight: `in` flows source → destination, `out` the reverse)
  OCSF  traffic.bytes_out = bytes_out, traffic.bytes_in = bytes_in  (OCSF: out is source → destination)

Severity: each mapping has a level (info, notice, warning, high); a failed action is at least
`warning`; a body with severity "high" (break-glass) is `high`. Levels → CEF 3/4/6/8, OCSF severity_id
1/2/3/4, syslog severity 6/5/4/2.

Syslog facility: "auto" (the default) sends authentication and account events as authpriv (10) and the
rest as local4 (20); a sink may fix one facility by name.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .. import __version__

PEN = 32473  # IANA's enterprise number for documentation (RFC 5612); our SD-ID is wicket@32473
SD_ID = f"wicket@{PEN}"
VENDOR = PRODUCT = APP_NAME = "wicket"
ECS_VERSION = "8.11.0"
OCSF_VERSION = "1.3.0"
PAYLOAD_FORMATS = ("cef", "ecs", "ocsf", "json")
_REQUIRED = ("time", "category", "type", "result")
SEQUENCE_ID_MAX = 2147483647  # RFC 5424 §7.3.1: meta sequenceId is 1..2^31-1, then wraps to 1


def canonical(line: str, hash_: str, seq: int | None = None) -> dict:
    """THE canonical event of a stored record: its hashed JSON text, parsed, plus its chain hash.

    A line that is not a JSON object (the stored log was damaged) still exports, as type
    `audit.unreadable`, so the stream goes on and the SOC sees the damage at that sequence number."""
    try:
        event = json.loads(line)
        if not isinstance(event, dict):
            raise ValueError("not an object")
        if not all(isinstance(event.get(k), str) for k in _REQUIRED) or not isinstance(event.get("body", {}), dict):
            raise ValueError("not a record")  # a damaged record must not stop the stream (the renderers read these)
    except ValueError:
        event = {"v": 1, "seq": seq if seq is not None else _seq_from_damaged(line), "time": rfc3339(datetime.now(UTC)), "clock": "unknown", "category": "audit",
                 "type": "audit.unreadable", "result": "failure", "actor": None, "actor_id": None, "subject": None,
                 "source": None, "reason": "unreadable_record", "session": None, "device": None,
                 "body": {"line_sha256": hashlib.sha256(line.encode()).hexdigest(), "line_prefix": line[:200]}}
    event["hash"] = hash_
    return event


# ---- the mapping table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    cef: int
    ocsf: int
    syslog: int


LEVELS = {"info": Level(3, 1, 6), "notice": Level(4, 2, 5), "warning": Level(6, 3, 4), "high": Level(8, 4, 2)}
_ORDER = list(LEVELS)


@dataclass(frozen=True)
class Mapping:
    """How one event type is classified in each SIEM taxonomy."""

    name: str  # CEF Name; also the start of ECS `message` and OCSF `message`
    level: str  # on success; see LEVELS
    ecs_category: str
    ecs_type: tuple[str, ...]
    ocsf_class: int
    ocsf_activity: int
    failure_level: str = "warning"


def _m(name, level, ecs_category, ecs_type, ocsf_class, ocsf_activity, failure_level="warning") -> Mapping:
    return Mapping(name, level, ecs_category, tuple(ecs_type.split(",")), ocsf_class, ocsf_activity, failure_level)


MAPPINGS: dict[str, Mapping] = {
    # authentication (controller/auth.py)
    "login": _m("User login", "info", "authentication", "start", 3002, 1),
    "logout": _m("User logout", "info", "authentication", "end", 3002, 2),
    "step_up": _m("Step-up authentication", "info", "authentication", "info", 3002, 99),
    "token_refused": _m("API token refused", "warning", "authentication", "info", 3002, 99),
    "password_check": _m("Password re-check", "info", "authentication", "info", 3002, 99),
    # accounts (controller/users.py, controller/auth.py)
    "password_changed": _m("Password changed", "notice", "iam", "change,user", 3001, 3),
    "password_rehashed": _m("Password hash upgraded", "info", "iam", "change,user", 3001, 99),
    "recovery_codes_issued": _m("Recovery codes issued", "notice", "iam", "change,user", 3001, 10),
    "totp_enrolled": _m("TOTP enrolled", "notice", "iam", "change,user", 3001, 10),
    "user_created": _m("User created", "notice", "iam", "creation,user", 3001, 1),
    "user_deleted": _m("User deleted", "notice", "iam", "deletion,user", 3001, 6),
    "user_disabled": _m("User disabled", "notice", "iam", "change,user", 3001, 5),
    "user_enabled": _m("User enabled", "notice", "iam", "change,user", 3001, 2),
    "roles_changed": _m("Roles changed", "notice", "iam", "change,user", 3001, 99),
    # policy (controller/policy_store.py)
    "policy.apply": _m("Policy applied", "notice", "configuration", "change", 6003, 3),
    # inventory (controller/inventory.py, controller/devicecsv.py)
    "device.import": _m("Devices imported", "notice", "configuration", "creation,change", 6003, 3),
    "device.create": _m("Device created", "notice", "configuration", "creation", 6003, 1),
    "device.update": _m("Device updated", "notice", "configuration", "change", 6003, 3),
    "device.delete": _m("Device deleted", "notice", "configuration", "deletion", 6003, 4),
    "device.bind": _m("Device bound", "notice", "configuration", "change", 6003, 3),
    "site.create": _m("Site created", "notice", "configuration", "creation", 6003, 1),
    "site.update": _m("Site updated", "notice", "configuration", "change", 6003, 3),
    "site.delete": _m("Site deleted", "notice", "configuration", "deletion", 6003, 4),
    "agent.add": _m("Node agent added", "notice", "configuration", "creation", 6003, 1),
    "agent.remove": _m("Node agent removed", "notice", "configuration", "deletion", 6003, 4),
    # sessions (controller/sessions.py, controller/session_clock.py)
    "session.request": _m("Access requested", "info", "api", "creation", 6003, 1),
    "session.approve": _m("Access request approved", "notice", "api", "change,allowed", 6003, 3),
    "session.reject": _m("Access request rejected", "notice", "api", "change,denied", 6003, 3),
    "session.activate": _m("Access granted", "notice", "session", "start", 3003, 1),
    "session.open": _m("Lane opened", "info", "network", "connection,start", 4001, 1),
    "session.config": _m("Tunnel configuration downloaded", "info", "api", "access", 6003, 2),
    "session.extension_request": _m("Extension requested", "info", "api", "creation", 6003, 1),
    "session.extension_approve": _m("Extension approved", "notice", "api", "change,allowed", 6003, 3),
    "session.extension_reject": _m("Extension rejected", "notice", "api", "change,denied", 6003, 3),
    "session.extend": _m("Access extended", "notice", "session", "info", 3003, 1),
    "session.ending_soon": _m("Access ending soon", "info", "session", "info", 0, 99),
    "session.close": _m("Session closed", "info", "session", "end", 4001, 2),
    "session.expire": _m("Session expired", "info", "session", "end", 4001, 2),
    "session.revoke": _m("Session revoked", "notice", "session", "end", 4001, 3),
    "break_glass.open": _m("Break-glass access opened", "high", "session", "start", 3003, 1, "high"),
    "break_glass.review": _m("Break-glass session reviewed", "notice", "api", "change", 6003, 3),
    "break_glass.review_overdue": _m("Break-glass review overdue", "high", "session", "info", 0, 99, "high"),
    # node agents (controller/enrolment.py, controller/agent_link.py)
    "join_token.create": _m("Join token created", "notice", "iam", "creation", 6003, 1),
    "join_token.revoke": _m("Join token revoked", "notice", "iam", "deletion", 6003, 4),
    "agent.enrol": _m("Node agent enrolled", "notice", "iam", "creation", 6003, 1),
    "agent.certificate_renew": _m("Node agent certificate renewed", "info", "iam", "change", 6003, 3),
    "agent.revoke": _m("Node agent revoked", "warning", "iam", "deletion", 6003, 4),
    "agent.link_up": _m("Node agent link up", "info", "network", "connection,start", 4001, 1),
    "agent.link_down": _m("Node agent link down", "warning", "network", "connection,end", 4001, 2),
    # evidence
    "lane.evidence": _m("Lane evidence", "info", "network", "connection,end", 4001, 6, "high"),
    "session.evidence": _m("Session evidence", "info", "network", "connection,end", 4001, 6, "high"),
    "session.recording": _m("Payload recording stored", "info", "file", "creation", 6003, 1, "high"),
    "session.recording_download": _m("Payload recording downloaded", "notice", "file", "access", 6003, 2),
    "session.anomaly": _m("Blocked attempts in a session", "warning", "network", "connection,denied", 4001, 5),
    # device baselines and DNS, from node agents' reports (controller/device_reports.py)
    "device.breach": _m("Device flows outside its baseline blocked", "warning", "network", "connection,denied", 4001, 5, "high"),
    "device.breach_summary": _m("Device baseline breaches not listed", "warning", "network", "connection,denied", 4001, 5,
                                "high"),
    "destination.resolved": _m("Destination resolved", "info", "configuration", "change", 0, 99),
    "destination.stale": _m("Destination resolution failing, last addresses kept", "notice", "configuration", "info", 0, 99),
    "destination.failed": _m("Destination without addresses", "warning", "configuration", "info", 0, 99, "high"),
    # the audit log itself
    "audit.checkpoint": _m("Audit checkpoint signed", "info", "configuration", "info", 0, 99, "high"),
    "audit.export": _m("Audit records exported", "notice", "api", "access", 6003, 2),
    "audit.sink_failed": _m("SIEM sink failing", "warning", "configuration", "info", 0, 99),
    "audit.sink_recovered": _m("SIEM sink delivering again", "notice", "configuration", "info", 0, 99),
    "audit.unreadable": _m("Unreadable audit record", "high", "configuration", "info", 0, 99, "high"),
}

# A type not in MAPPINGS: by its wicket category.
_BY_CATEGORY: dict[str, Mapping] = {
    "authentication": _m("Authentication event", "info", "authentication", "info", 3002, 99),
    "account": _m("Account event", "notice", "iam", "info", 3001, 99),
    "session": _m("Session event", "info", "session", "info", 6003, 99),
    "policy": _m("Policy event", "notice", "configuration", "info", 6003, 99),
    "inventory": _m("Inventory event", "notice", "configuration", "info", 6003, 99),
    "agent": _m("Node agent event", "info", "host", "info", 6003, 99),
    "evidence": _m("Evidence", "info", "network", "info", 4001, 99, "high"),
    "anomaly": _m("Anomaly", "warning", "network", "info", 4001, 99, "high"),
    "audit": _m("Audit log event", "info", "configuration", "info", 0, 99),
}
_GENERIC = _m("wicket event", "info", "configuration", "info", 0, 99)

OCSF_CLASSES = {  # class_uid → (class name, category_uid, category name)
    0: ("Base Event", 0, "Uncategorized"),
    3001: ("Account Change", 3, "Identity & Access Management"),
    3002: ("Authentication", 3, "Identity & Access Management"),
    3003: ("Authorize Session", 3, "Identity & Access Management"),
    4001: ("Network Activity", 4, "Network Activity"),
    6003: ("API Activity", 6, "Application Activity"),
}
OCSF_ACTIVITIES = {
    0: {0: "Unknown", 99: "Other"},
    3001: {1: "Create", 2: "Enable", 3: "Password Change", 4: "Password Reset", 5: "Disable", 6: "Delete",
           7: "Attach Policy", 8: "Detach Policy", 9: "Lock", 10: "MFA Factor Enable", 11: "MFA Factor Disable",
           99: "Other"},
    3002: {1: "Logon", 2: "Logoff", 3: "Authentication Ticket", 4: "Service Ticket Request",
           5: "Service Ticket Renew", 6: "Preauth", 99: "Other"},
    3003: {1: "Assign Privileges", 2: "Assign Groups", 99: "Other"},
    4001: {1: "Open", 2: "Close", 3: "Reset", 4: "Fail", 5: "Refuse", 6: "Traffic", 7: "Listen", 99: "Other"},
    6003: {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other"},
}
_OCSF_SEVERITY = {1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical"}

FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
              "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13, "alert": 14, "clock": 15,
              **{f"local{i}": 16 + i for i in range(8)}}


def mapping(event_type: str, category: str | None = None) -> Mapping:
    """The mapping of an event type; by its category, or a generic one, when the type is not listed."""
    return MAPPINGS.get(event_type) or _BY_CATEGORY.get(category or "") or _GENERIC


def level(event: dict) -> str:
    """The event's level name (info, notice, warning, high)."""
    m = mapping(event.get("type", ""), event.get("category"))
    name = m.level
    if event.get("result") == "failure":
        name = max(name, m.failure_level, key=_ORDER.index)
    if (event.get("body") or {}).get("severity") == "high":
        name = "high"
    return name


# ---- facts: what the formats share, read once from the event and its body ------------------------


@dataclass
class Facts:
    actor: str | None
    target_user: str | None  # the account acted on, or the engineer a session is for
    approvers: list[str]
    device: str | None
    device_ip: str | None
    port: int | None
    transport: str | None  # tcp | udp
    protocol: str | None  # the application protocol (modbus, iec104, ssh…)
    src_ip: str | None
    src_port: int | None
    src_raw: str | None
    session: str | None
    policy_id: str | None
    policy_version: str | None
    start: datetime | None
    end: datetime | None
    bytes_out: int | None  # engineer → device
    bytes_in: int | None  # device → engineer
    packets_out: int | None
    packets_in: int | None
    flows: int | None
    blocked: int | None
    end_reason: str | None


# records whose subject is a passport's asset ID (a breach's subject may be a bare address, a summary's a node)
_PASSPORT_TYPES = {"device.create", "device.update", "device.delete"}
_APPROVING = {"session.approve", "session.reject", "session.extension_approve", "session.extension_reject"}


def facts(event: dict) -> Facts:
    """The fields every format needs, from the event and its body. Evidence bodies (`session.evidence`,
    controller/session_evidence.py; `lane.evidence`, controller/agent_link.py) give addresses, ports,
    bytes, flows and times; a decision's first `access` entry gives the device address and port."""
    body = event.get("body") if isinstance(event.get("body"), dict) else {}
    nested = [body] + [body[k] for k in ("evidence", "totals", "actual", "traffic") if isinstance(body.get(k), dict)]
    access = _first_access(body)

    def pick(*keys):
        for d in nested:
            for k in keys:
                v = d.get(k)
                if v is not None and not isinstance(v, dict | list):
                    return v
        return None

    category, etype = event.get("category"), event.get("type", "")
    actor = event.get("actor")
    subject = event.get("subject")
    if category in ("authentication", "account"):
        target = subject or actor
    elif category in ("session", "evidence"):
        target = pick("user", "requester", "engineer")
    else:
        target = None
    approvers = _approvers(body)
    if not approvers and etype in _APPROVING and actor:
        approvers = [actor]
    src_ip, src_port = _split_address(event.get("source"))
    if event.get("source") is None and category in ("evidence", "session"):
        src_ip = _ip(pick("engineer_address", "tunnel_address"))  # no API client: the lane's engineer end
    version = pick("policy_version")
    if version is None and etype.startswith("policy."):
        version = body.get("version")
    policy_id = pick("task") if version is not None else None
    if etype.startswith("policy."):
        policy_id = subject or "policy"
    return Facts(
        actor=actor,
        target_user=str(target) if target else None,
        approvers=approvers,
        device=event.get("device") or _str(pick("device", "device_id")) or (subject if etype in _PASSPORT_TYPES else None),
        device_ip=_ip(pick("device_address", "device_ip")) or _ip(access.get("address")),
        port=_int(pick("port", "dport", "device_port")) or _int(access.get("port")),
        transport=_lower(pick("transport", "proto")) or _lower(access.get("transport")),
        protocol=_lower(pick("protocol", "service")) or _lower(access.get("protocol")),
        src_ip=src_ip,
        src_port=src_port,
        src_raw=event.get("source"),
        session=event.get("session"),
        policy_id=str(policy_id) if policy_id is not None else ("policy" if version is not None else None),
        policy_version=str(version) if version is not None else None,
        start=_time(pick("actual_start", "started_at", "opened_at", "start")),
        end=_time(pick("actual_end", "ended_at", "closed_at", "end")),
        bytes_out=_int(pick("bytes_out")),
        bytes_in=_int(pick("bytes_in")),
        packets_out=_int(pick("packets_out")),
        packets_in=_int(pick("packets_in")),
        flows=_count(body, "flows"),
        blocked=_count(body, "blocked") if "blocked" in body else _count(body, "anomalies"),
        end_reason=_str(pick("end_reason")),
    )


# ---- CEF -----------------------------------------------------------------------------------------


def cef(event: dict, *, host: str | None = None) -> str:
    """One CEF:0 line. Header escapes `\\` and `|`; extension values escape `\\`, `=` and newlines."""
    m, f, lv = mapping(event["type"], event.get("category")), facts(event), LEVELS[level(event)]
    header = ["CEF:0", VENDOR, PRODUCT, __version__, event["type"], m.name, str(lv.cef)]
    ext: list[tuple[str, object]] = [
        ("rt", _ms(_time(event.get("time")))),
        ("cat", event.get("category")),
        ("act", event["type"].rsplit(".", 1)[-1]),
        ("outcome", event.get("result")),
        ("reason", event.get("reason")),
        ("suser", f.actor or (f.target_user if event.get("category") == "authentication" else None)),
        ("suid", event.get("actor_id")),
        ("duser", f.target_user if f.target_user != f.actor else None),
        ("src", f.src_ip),
        ("spt", f.src_port),
        ("shost", f.src_raw if f.src_ip is None else None),
        ("dst", f.device_ip),
        ("dhost", f.device),
        ("dpt", f.port),
        ("proto", f.transport.upper() if f.transport else None),
        ("app", f.protocol),
        ("start", _ms(f.start)),
        ("end", _ms(f.end)),
        ("in", f.bytes_out),
        ("out", f.bytes_in),
        ("externalId", f.session),
        ("dvchost", host),
        ("msg", summary(event)),
        ("cs1", f"{f.policy_id}@{f.policy_version}" if f.policy_version else None), ("cs1Label", "policy"),
        ("cs2", ",".join(f.approvers) or None), ("cs2Label", "approvers"),
        ("cs3", event.get("seq")), ("cs3Label", "seq"),
        ("cs4", event.get("hash")), ("cs4Label", "hash"),
        ("cs5", f.device), ("cs5Label", "device"),
        ("cs6", event.get("category")), ("cs6Label", "category"),
        ("cn1", f.flows), ("cn1Label", "flows"),
        ("cn2", f.blocked), ("cn2Label", "blocked"),
    ]
    present = {k for k, v in ext if v is not None and not k.endswith("Label")}
    parts = [f"{k}={cef_value(v)}" for k, v in ext
             if v is not None and (not k.endswith("Label") or k[: -len("Label")] in present)]
    return "|".join(cef_header(h) for h in header) + "|" + " ".join(parts)


def cef_header(value: object) -> str:
    text = re.sub(r"[\r\n]+", " ", str(value))
    return text.replace("\\", "\\\\").replace("|", "\\|")


def cef_value(value: object) -> str:
    text = str(value)
    return (text.replace("\\", "\\\\").replace("=", "\\=").replace("\r\n", "\\n")
            .replace("\n", "\\n").replace("\r", "\\r"))


# ---- ECS -----------------------------------------------------------------------------------------


def ecs(event: dict, *, host: str | None = None) -> dict:
    """An Elastic Common Schema document (nested objects; our own fields under `wicket`)."""
    m, f, lv = mapping(event["type"], event.get("category")), facts(event), LEVELS[level(event)]
    outcome = event.get("result") if event.get("result") in ("success", "failure") else "unknown"
    ev: dict = {"kind": "event", "category": [m.ecs_category], "type": list(m.ecs_type), "action": event["type"],
                "outcome": outcome, "severity": lv.cef, "sequence": event.get("seq"), "hash": event.get("hash"),
                "id": event.get("hash"), "module": "wicket", "dataset": "wicket.audit", "provider": event.get("category")}
    if event.get("reason"):
        ev["reason"] = event["reason"]
    if f.start:
        ev["start"] = rfc3339(f.start)
    if f.end:
        ev["end"] = rfc3339(f.end)
    if f.start and f.end and f.end >= f.start:
        ev["duration"] = (f.end - f.start) // timedelta(microseconds=1) * 1000
    doc: dict = {"@timestamp": event.get("time"), "ecs": {"version": ECS_VERSION}, "message": summary(event), "event": ev,
                 "observer": {"vendor": VENDOR, "product": PRODUCT, "version": __version__, "type": "gateway"}}
    if host:
        doc["observer"]["hostname"] = host
    user: dict = {}
    name = f.actor or (f.target_user if event.get("category") == "authentication" else None)
    if name:
        user["name"] = name
    if event.get("actor_id") is not None:
        user["id"] = str(event["actor_id"])
    if f.target_user and f.target_user != name:
        user["target"] = {"name": f.target_user}
    if user:
        doc["user"] = user
    source: dict = {}
    if f.src_raw or f.src_ip:
        source["address"] = f.src_raw or f.src_ip
    if f.src_ip:
        source["ip"] = f.src_ip
    if f.src_port:
        source["port"] = f.src_port
    if f.bytes_out is not None:
        source["bytes"] = f.bytes_out
    if f.packets_out is not None:
        source["packets"] = f.packets_out
    if source:
        doc["source"] = source
    dest: dict = {}
    if f.device_ip:
        dest["ip"] = dest["address"] = f.device_ip
    if f.port:
        dest["port"] = f.port
    if f.bytes_in is not None:
        dest["bytes"] = f.bytes_in
    if f.packets_in is not None:
        dest["packets"] = f.packets_in
    if dest:
        doc["destination"] = dest
    network: dict = {}
    if f.transport:
        network["transport"] = f.transport
    if f.protocol:
        network["protocol"] = f.protocol
    if f.bytes_in is not None and f.bytes_out is not None:
        network["bytes"] = f.bytes_in + f.bytes_out
    if f.packets_in is not None and f.packets_out is not None:
        network["packets"] = f.packets_in + f.packets_out
    if network:
        doc["network"] = network
    if f.policy_version:
        doc["rule"] = {"id": f.policy_version, "name": f.policy_id, "version": f.policy_version, "ruleset": "wicket-policy"}
    related_users = sorted({u for u in (name, f.target_user, *f.approvers) if u})
    related_ips = sorted({ip for ip in (f.src_ip, f.device_ip) if ip})
    if related_users or related_ips:
        doc["related"] = {k: v for k, v in (("user", related_users), ("ip", related_ips)) if v}
    doc["wicket"] = _wicket_fields(event, f)
    return doc


# ---- OCSF ----------------------------------------------------------------------------------------


def ocsf(event: dict, *, host: str | None = None) -> dict:
    """An OCSF event of the mapped class; what OCSF has no attribute for goes under `unmapped`."""
    m, f, lv = mapping(event["type"], event.get("category")), facts(event), LEVELS[level(event)]
    class_uid, activity_id = m.ocsf_class, m.ocsf_activity
    class_name, category_uid, category_name = OCSF_CLASSES[class_uid]
    activity_name = OCSF_ACTIVITIES[class_uid][activity_id]
    status_id = {"success": 1, "failure": 2}.get(event.get("result"), 0)
    product = {"name": PRODUCT, "vendor_name": VENDOR, "version": __version__}
    doc: dict = {
        "class_uid": class_uid, "class_name": class_name, "category_uid": category_uid, "category_name": category_name,
        "activity_id": activity_id, "activity_name": activity_name, "type_uid": class_uid * 100 + activity_id,
        "type_name": f"{class_name}: {activity_name}", "severity_id": lv.ocsf, "severity": _OCSF_SEVERITY[lv.ocsf],
        "status_id": status_id, "status": {0: "Unknown", 1: "Success", 2: "Failure"}[status_id],
        "time": _ms(_time(event.get("time"))), "timezone_offset": 0, "message": summary(event),
        "metadata": {"version": OCSF_VERSION, "product": product, "uid": event.get("hash"), "sequence": event.get("seq"),
                     "event_code": event["type"], "log_name": "wicket-audit", "original_time": event.get("time")},
    }
    if event.get("reason"):
        doc["status_detail"] = event["reason"]
    if f.session:
        doc["metadata"]["correlation_uid"] = f.session
        doc["session"] = {"uid": f.session}
    if host:
        doc["metadata"]["log_provider"] = host
    if class_uid == 3003 and f.approvers:
        actor_user = {"name": f.approvers[-1], "type_id": 1}  # who authorised the grant (all in unmapped)
    else:
        actor_user = {"name": f.actor or "system", "type_id": 3 if f.actor in (None, "system") else 1}
        if event.get("actor_id") is not None:
            actor_user["uid"] = str(event["actor_id"])
    doc["actor"] = {"user": actor_user}
    src: dict = {}
    if f.src_ip:
        src["ip"] = f.src_ip
    if f.src_port:
        src["port"] = f.src_port
    if f.src_raw and not f.src_ip:
        src["name"] = f.src_raw
    dst: dict = {}
    if f.device_ip:
        dst["ip"] = f.device_ip
    if f.port:
        dst["port"] = f.port
    if f.device:
        dst["name"] = dst["uid"] = f.device
    if class_uid == 6003 and not src:
        src = {"name": "wicket-controller"}  # required: a call without a client address is the controller's own
    if class_uid == 4001 and not src and not dst:
        dst = {"name": event.get("subject") or "wicket-controller"}
    if src:
        doc["src_endpoint"] = src
    if dst:
        doc["dst_endpoint"] = dst
    if class_uid in (3001, 3002, 3003):
        doc["user"] = {"name": f.target_user or f.actor or "unknown"}
    if class_uid == 3002:
        doc["service"] = {"name": PRODUCT}
        doc["is_remote"] = True
    if class_uid == 3003:
        target = f.device or "device"
        access = f"{f.transport}/{f.port}" if f.transport and f.port else (f.protocol or "lane")
        doc["privileges"] = [f"{target}:{access}"]
    if class_uid == 6003:
        doc["api"] = {"operation": event["type"], "service": {"name": PRODUCT}}
        if event.get("subject"):
            doc["resources"] = [{"uid": event["subject"], "type": event.get("category")}]
    if f.transport or f.protocol:
        info: dict = {"direction_id": 1, "direction": "Inbound"}  # into the site, from a remote engineer
        if f.transport:
            info["protocol_name"] = f.transport
            num = {"tcp": 6, "udp": 17}.get(f.transport)
            if num:
                info["protocol_num"] = num
        if f.protocol:
            doc["app_name"] = f.protocol
        doc["connection_info"] = info
    traffic = {k: v for k, v in (("bytes_in", f.bytes_in), ("bytes_out", f.bytes_out), ("packets_in", f.packets_in),
                                 ("packets_out", f.packets_out)) if v is not None}
    if f.bytes_in is not None and f.bytes_out is not None:
        traffic["bytes"] = f.bytes_in + f.bytes_out
    if traffic:
        doc["traffic"] = traffic
    if f.start:
        doc["start_time"] = _ms(f.start)
    if f.end:
        doc["end_time"] = _ms(f.end)
    if f.start and f.end and f.end >= f.start:
        doc["duration"] = (f.end - f.start) // timedelta(milliseconds=1)
    if f.policy_version:
        doc["policy"] = {"name": f.policy_id, "uid": f.policy_version, "version": f.policy_version}
    doc["unmapped"] = {"wicket": _wicket_fields(event, f)}
    return doc


# ---- native JSON, payload text, HEC and syslog ---------------------------------------------------


def native(event: dict) -> dict:
    """The canonical event as it is."""
    return event


def payload(event: dict, fmt: str, *, host: str | None = None) -> str:
    """The payload text of one event in `fmt` (cef, ecs, ocsf, json): one line, no newline."""
    if fmt == "cef":
        return cef(event, host=host)
    if fmt == "ecs":
        return _json(ecs(event, host=host))
    if fmt == "ocsf":
        return _json(ocsf(event, host=host))
    if fmt == "json":
        return _json(native(event))
    raise ValueError(f"unknown payload format {fmt!r}: one of {', '.join(PAYLOAD_FORMATS)}")


def hec(event: dict, fmt: str = "ecs", *, host: str | None = None, source: str = "wicket",
        sourcetype: str | None = None, index: str | None = None) -> dict:
    """A Splunk HEC event envelope; `fields` are indexed (strings only)."""
    at = _time(event.get("time"))
    body = {"ecs": ecs, "ocsf": ocsf}.get(fmt)
    if fmt == "json":
        inner: object = native(event)
    elif fmt == "cef":
        inner = cef(event, host=host)
    elif body is not None:
        inner = body(event, host=host)
    else:
        raise ValueError(f"unknown payload format {fmt!r}: one of {', '.join(PAYLOAD_FORMATS)}")
    fields = {k: str(event[k]) for k in ("seq", "hash", "category", "type", "result", "session", "device")
              if event.get(k) is not None}
    env = {"time": round(at.timestamp(), 6) if at else None, "host": host or hostname(), "source": source,
           "sourcetype": sourcetype or f"wicket:{fmt}", "event": inner, "fields": fields}
    if index:
        env["index"] = index
    return env


def rfc5424(event: dict, fmt: str = "cef", *, host: str | None = None, procid: str | None = None,
            facility: str = "auto", max_bytes: int | None = None) -> str:
    """One RFC 5424 message (without transport framing):

        <PRI>1 TIME HOST wicket PROCID TYPE [timeQuality …][origin …][meta sequenceId=…][wicket@32473 …] PAYLOAD

    `max_bytes` bounds the encoded message: a longer one is sent with its body left out of the payload,
    marked `truncated="1"` in our SD element (seq and hash still let the SOC fetch the full record)."""
    host = _printable(host or hostname(), 255)
    pri = _facility(facility, event.get("category")) * 8 + LEVELS[level(event)].syslog
    msgid = _printable(event.get("type") or "", 32)
    header = f"<{pri}>1 {event.get('time') or '-'} {host} {APP_NAME} {_printable(procid or str(os.getpid()), 128)} {msgid} "
    text = header + _structured(event, truncated=False) + " " + _msg(payload(event, fmt, host=host))
    if max_bytes is None or len(text.encode()) <= max_bytes:
        return text
    slim = dict(event, body={"truncated": True, "body_bytes": len(_json(event.get("body") or {}).encode())})
    text = header + _structured(event, truncated=True) + " " + _msg(payload(slim, fmt, host=host))
    raw = text.encode()
    if len(raw) > max_bytes:  # a huge reason or subject: cut at a character boundary, keeping the SD
        text = raw[:max_bytes].decode(errors="ignore")
    return text


def sd_escape(value: object) -> str:
    """An SD-PARAM value (RFC 5424 §6.3.3): `"`, `\\` and `]` are escaped with a backslash. A control
    character is written as `#` and its three octal digits (a newline: `#012`), as rsyslog shows them:
    the RFC allows no other escape, and a raw one breaks line-based receivers. The payload keeps the
    exact value."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return _CONTROL.sub(lambda m: f"#{ord(m.group()):03o}", text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def sequence_id(seq: int) -> int:
    """RFC 5424 meta sequenceId for a chain seq: equal to it up to 2^31-1, then wrapping to 1 as the RFC
    says. The exact seq is always in our own SD element."""
    return (int(seq) - 1) % SEQUENCE_ID_MAX + 1


def summary(event: dict) -> str:
    """One human line: type, result, who, for whom, where, why."""
    f = facts(event)
    parts = [f"{event.get('type')} {event.get('result')}"]
    if f.actor:
        parts.append(f"by {f.actor}")
    if f.target_user and f.target_user != f.actor:
        parts.append(f"for {f.target_user}")
    if f.session:
        parts.append(f"session {f.session}")
    if f.device:
        parts.append(f"device {f.device}")
    if event.get("reason"):
        parts.append(f"reason {event['reason']}")
    return " ".join(parts)


def hostname() -> str:
    return socket.gethostname() or "-"


def rfc3339(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- helpers -------------------------------------------------------------------------------------

_SD_FIELDS = ("v", "seq", "hash", "category", "type", "result", "clock", "actor", "actor_id", "subject", "source",
              "reason", "session", "device")


def _structured(event: dict, *, truncated: bool) -> str:
    synced = "1" if event.get("clock") == "synced" else "0"
    own = " ".join(f'{k}="{sd_escape(event[k])}"' for k in _SD_FIELDS if event.get(k) is not None)
    if truncated:
        own += ' truncated="1"'
    seq = event.get("seq") or 0
    meta = f'[meta sequenceId="{sequence_id(seq)}"]' if seq > 0 else ""
    return (f'[timeQuality tzKnown="1" isSynced="{synced}"][origin software="{APP_NAME}" swVersion="{sd_escape(__version__)}"]'
            f"{meta}[{SD_ID} {own}]")


def _msg(text: str) -> str:
    # RFC 5424 §6.4: a UTF-8 MSG starts with a BOM; plain ASCII needs none.
    return text if text.isascii() else "\ufeff" + text


def _facility(name: str, category: str | None) -> int:
    if name == "auto":
        return FACILITIES["authpriv"] if category in ("authentication", "account") else FACILITIES["local4"]
    return FACILITIES[name]


def _printable(text: str, limit: int) -> str:
    """PRINTUSASCII without spaces (RFC 5424 header fields), or the NILVALUE."""
    clean = "".join(c if "!" <= c <= "~" else "_" for c in text)[:limit]
    return clean or "-"


def _wicket_fields(event: dict, f: Facts) -> dict:
    out = {k: event.get(k) for k in ("v", "seq", "hash", "category", "type", "result", "clock", "actor_id", "subject",
                                     "source", "reason", "session", "device")}
    out = {k: v for k, v in out.items() if v is not None}
    if f.approvers:
        out["approvers"] = f.approvers
    if f.end_reason:
        out["end_reason"] = f.end_reason
    if f.flows is not None:
        out["flows"] = f.flows
    if f.blocked is not None:
        out["blocked"] = f.blocked
    out["body"] = event.get("body") or {}
    return out


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _first_access(body: dict) -> dict:
    """The session's first allowed flow: `protocols` of an evidence record, or the decision's `access`."""
    decision = body.get("decision")
    for access in (body.get("protocols"), decision.get("access") if isinstance(decision, dict) else None):
        if isinstance(access, list) and access and isinstance(access[0], dict):
            return access[0]
    return {}


def _approvers(body: dict) -> list[str]:
    """Who approved: `approvals` entries with verdict approve (evidence records), or `approved_by`."""
    out: list[str] = []
    approvals = body.get("approvals")
    if isinstance(approvals, list):
        out = [str(a["approver"]) for a in approvals
               if isinstance(a, dict) and a.get("approver") and a.get("verdict", "approve") == "approve"]
    by = body.get("approved_by")
    if not out and isinstance(by, list):
        out = [str(a) for a in by if a]
    return list(dict.fromkeys(out))


def _count(body: dict, key: str) -> int | None:
    """A count given as a number, or the length of a list; for flows, also summed over evidence lanes."""
    value = body.get(key)
    if isinstance(value, list):
        return len(value)
    if _int(value) is not None:
        return _int(value)
    lanes = body.get("lanes")
    if key == "flows" and isinstance(lanes, list):
        return sum(len((lane.get("evidence") or {}).get("flows") or []) for lane in lanes if isinstance(lane, dict))
    return None


def _split_address(raw) -> tuple[str | None, int | None]:
    """An IP, or "ip:port" / "[v6]:port" (how the agent link names a peer), into its parts."""
    if not isinstance(raw, str) or not raw:
        return None, None
    ip = _ip(raw)
    if ip:
        return ip, None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([0-9.]+):(\d{1,5})", raw)
    if m:
        host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if _ip(host) and 0 < int(port) < 65536:
            return _ip(host), int(port)
    return None, None


def _ip(value) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.ip_address(value.split("/")[0]))
    except ValueError:
        return None


def _int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _str(value) -> str | None:
    return str(value) if value is not None and value != "" else None


def _lower(value) -> str | None:
    return str(value).lower() if isinstance(value, str) and value else None


def _time(value) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _ms(at: datetime | None) -> int | None:
    if at is None:
        return None
    return (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _seq_from_damaged(line: str) -> int:
    m = re.search(r'"seq"\s*:\s*(\d+)', line)
    return int(m.group(1)) if m else 0
