"""A session's evidence record: written once, when the session has ended and its node's record has
arrived (or, failing that, after the wait, saying the node's record is missing); the node's signed
record inside checks offline with the node's key."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select

from controller.db import session_factory, transaction
from controller.models import Event, LaneEvidenceRecord
from nodeagent.wire import EVIDENCE_SIGNATURE_CONTEXT

from .session_helpers import (
    DIAG,
    NODE,
    RTU,
    TWO_PERSON,
    activate,
    approve,
    break_glass,
    close,
    request,
    world,
)


def _evidence_records(ctl, sid: str) -> list[Event]:
    with session_factory(ctl.app.state.engine)() as s:
        return list(s.scalars(select(Event).where(Event.session_ref == sid, Event.type.in_(
            ["session.evidence", "session.anomaly"])).order_by(Event.seq)))


def _deliver(ctl, sid: str, key: Ed25519PrivateKey, end_reason: str = "removed", bytes_out: int = 1000, **extra) -> dict:
    """Store a lane evidence record as the link does after checking its signature (`extra`: more fields, e.g.
    a grant's `scope` and `destinations`)."""
    body = {"kind": "lane_evidence", "node_id": NODE, "session_id": sid, "end_reason": end_reason,
            "opened_at": "2026-11-26T10:00:00Z", "closed_at": "2026-11-26T10:05:00Z",
            "totals": {"packets_out": 10, "bytes_out": bytes_out, "packets_in": 8, "bytes_in": 640,
                       "packets_refused": 3, "bytes_refused": 180},
            "blocked": [{"destination": "10.20.0.18", "proto": "tcp", "port": 502, "packets": 3}],
            "wireguard": {"rx_bytes": 2000, "tx_bytes": 1500, "handshakes_observed": 1}, "flows": [], **extra}
    ident = f"{sid}-{end_reason}"
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    sig = key.sign(EVIDENCE_SIGNATURE_CONTEXT + ident.encode() + b"\n" + text.encode())
    public = base64.b64encode(key.public_key().public_bytes_raw()).decode()
    with transaction(session_factory(ctl.app.state.engine)) as s:
        s.add(LaneEvidenceRecord(node=NODE, ident=ident, session_id=sid, end_reason=end_reason, body=body,
                                 signature=base64.b64encode(sig).decode(), verified_with=public, received_at=datetime.now(UTC)))
    return body


def test_the_evidence_record_holds_the_whole_session_and_the_nodes_signature(ctl):
    w = world(ctl)
    sid = request(ctl, w.erin, RTU, TWO_PERSON)["id"]
    approve(ctl, w.alex, sid)
    approve(ctl, w.ana, sid)
    activate(ctl, w.erin, sid)
    close(ctl, w.erin, sid)
    assert ctl.tick().evidence == []  # ended, but the node's record has not arrived
    key = Ed25519PrivateKey.generate()
    node_body = _deliver(ctl, sid, key)
    ctl.app.state.sessions.evidence_arrived(NODE, sid, "removed")
    records = _evidence_records(ctl, sid)
    assert [r.type for r in records] == ["session.evidence", "session.anomaly"]
    ev = records[0]
    body = ev.body
    assert ev.result == "success" and ev.device_ref == RTU and body["node_evidence"] == "delivered"
    assert body["user"] == "erin" and sorted(a["approver"] for a in body["approvals"]) == ["alex", "ana"]
    assert body["passport"]["asset_id"] == RTU and body["passport"]["device_type"] == "substation-rtu"
    assert body["task"] == TWO_PERSON and body["protocols"] and body["tunnel_address"] and body["device_address"] == "10.20.0.17"
    assert body["requested"]["at"] and body["planned"]["start"] and body["planned"]["end"]
    assert body["actual"] == {"start": "2026-11-26T10:00:00Z", "end": "2026-11-26T10:05:00Z",
                              "session_ended_at": body["actual"]["session_ended_at"]}
    assert body["end_reason"] and body["policy_version"].startswith("sha256:") and body["decision"]["outcome"]
    assert body["totals"]["bytes_out"] == 1000 and body["wireguard"]["handshakes_observed"] == 1
    assert body["anomalies"] == [{"kind": "blocked_attempt", "destination": "10.20.0.18", "proto": "tcp", "port": 502, "packets": 3}]
    lane = body["lanes"][0]
    # Anyone can check the node's signature from the record alone.
    signed = (lane["signature_context"] + "\n" + lane["ident"] + "\n").encode() + \
        json.dumps(lane["evidence"], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    Ed25519PublicKey.from_public_bytes(base64.b64decode(lane["signed_with"])).verify(base64.b64decode(lane["signature"]), signed)
    assert lane["evidence"] == node_body
    # Once only.
    ctl.app.state.sessions.evidence_arrived(NODE, sid, "removed")
    assert ctl.tick().evidence == []
    assert len(_evidence_records(ctl, sid)) == 2


def test_missing_node_evidence_is_recorded_after_the_wait(ctl):
    w = world(ctl)
    sid = request(ctl, w.erin, RTU, DIAG)["id"]
    close(ctl, w.erin, sid)
    assert ctl.tick().evidence == []
    ctl.advance(ctl.app.state.settings.evidence_wait_s + 1)
    assert ctl.tick().evidence == [sid]
    (ev,) = _evidence_records(ctl, sid)
    assert ev.result == "failure" and ev.reason == "node_evidence_missing" and ev.body["node_evidence"] == "missing"


def test_a_session_that_never_had_a_lane_has_no_evidence_record(ctl):
    w = world(ctl)
    sid = request(ctl, w.erin, RTU, DIAG, activate=False)["id"]
    close(ctl, w.erin, sid)
    ctl.advance(ctl.app.state.settings.evidence_wait_s + 1)
    assert sid not in ctl.tick().evidence
    assert _evidence_records(ctl, sid) == []


def test_a_forced_recording_that_is_missing_or_failed_is_an_anomaly(ctl):
    """Break-glass forces payload recording: a lane whose node made none (an older agent), or whose
    recording failed, is a session.anomaly for the SOC, not only a field in the node's record."""
    w = world(ctl)
    sid = break_glass(ctl, w.bea, RTU)["id"]
    close(ctl, w.bea, sid)
    key = Ed25519PrivateKey.generate()
    _deliver(ctl, sid, key, end_reason="removed")  # a node record without any recording
    ctl.app.state.sessions.evidence_arrived(NODE, sid, "removed")
    ev, anomaly = _evidence_records(ctl, sid)
    assert ev.body["recording"] == "payload" and ev.body["recordings"] == []
    kinds = [a["kind"] for a in ev.body["anomalies"]]
    assert kinds == ["blocked_attempt", "recording_missing"], kinds
    assert anomaly.type == "session.anomaly" and anomaly.reason == "blocked_attempts_and_recording"
