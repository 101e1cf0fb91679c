"""One evidence record per session that had a lane (or a grant), in the audit chain (`session.evidence`).

It is written once the session has ended and the node's signed evidence of its lane has arrived, or,
if that evidence never comes, `evidence_wait_s` after the end, saying it is missing. It carries what an
assessor asks for in one place: who asked and who approved, the device and its passport, the task,
protocol and ports, the addresses, the requested and the actual times, why it ended, the policy and
its decision, and the node's own record (flows, bytes, WireGuard, blocked attempts) with the node's
signature, which anyone can check offline with the node's key (docs/audit.md). A grant's record adds
`kind: grant`, its group, its flows and what each destination resolved to on the node.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from nodeagent.wire import EVIDENCE_SIGNATURE_CONTEXT

from . import events
from .db import transaction
from .models import AccessSession, Device, LaneEvidenceRecord

_NO_LANE_STATES = ("pending_approval", "approved", "denied", "rejected")


def record_ready(factory: sessionmaker[Session], now: datetime, wait_s: float, sid: str | None = None) -> list[str]:
    """Write the evidence record of every ended session that is ready (or of `sid` only). Returns their IDs."""
    with factory() as s:
        q = select(AccessSession.id).where(AccessSession.ended_at.is_not(None), AccessSession.activated_at.is_not(None),
                                           AccessSession.evidence_recorded_at.is_(None))
        if sid is not None:
            q = q.where(AccessSession.id == sid)
        candidates = list(s.scalars(q))
    done = []
    for candidate in candidates:
        with transaction(factory) as s:
            s.execute(update(AccessSession).where(AccessSession.id == candidate).values(state=AccessSession.state)
                      .execution_options(synchronize_session=False))
            row = s.get(AccessSession, candidate, populate_existing=True)
            if row is None or row.evidence_recorded_at is not None or row.ended_at is None:
                continue
            lanes = list(s.scalars(select(LaneEvidenceRecord).where(LaneEvidenceRecord.session_id == candidate)
                                   .order_by(LaneEvidenceRecord.id)))
            final = any(lane.end_reason != "replaced" for lane in lanes)
            if not final and now - row.ended_at < timedelta(seconds=wait_s):
                continue
            device = s.scalar(select(Device).where(Device.asset_id == row.asset_id))
            body = compose(row, lanes, device)
            events.record(s, at=now, category="evidence", type="session.evidence",
                          result="success" if body["node_evidence"] == "delivered" else "failure",
                          actor="system", subject=row.id, reason=None if final else "node_evidence_missing", **body)
            if body["anomalies"]:
                events.record(s, at=now, category="evidence", type="session.anomaly", result="failure", actor="system",
                              subject=row.id, reason=_anomaly_reason(body["anomalies"]), session_id=row.id, device=row.asset_id,
                              user=row.username, site=row.site, anomalies=body["anomalies"][:50],
                              anomalies_total=len(body["anomalies"]))
            row.evidence_recorded_at = now
            done.append(candidate)
    return done


def compose(row: AccessSession, lanes: list[LaneEvidenceRecord], device: Device | None) -> dict:
    """The evidence record's body (the field reference is docs/soc-reference.md)."""
    approvals = [{"approver": a.approver, "verdict": a.verdict, "reason": a.reason, "at": _iso(a.at), "kind": a.kind}
                 for a in row.approvals]
    totals = {"packets_out": 0, "bytes_out": 0, "packets_in": 0, "bytes_in": 0, "packets_refused": 0, "bytes_refused": 0}
    anomalies, handshakes, wg_rx, wg_tx = [], 0, 0, 0
    opened, closed = None, None
    for lane in lanes:
        ev = lane.body
        for k in totals:
            totals[k] += int((ev.get("totals") or {}).get(k, 0))
        for b in ev.get("blocked") or []:
            anomalies.append({"kind": "blocked_attempt", **b})
        wg = ev.get("wireguard") or {}
        handshakes += int(wg.get("handshakes_observed") or 0)
        wg_rx += int(wg.get("rx_bytes") or 0)
        wg_tx += int(wg.get("tx_bytes") or 0)
        opened = opened or ev.get("opened_at")
        closed = ev.get("closed_at") or closed
    final = [lane for lane in lanes if lane.end_reason != "replaced"]
    recordings = [{"ident": lane.ident, **{k: (lane.body.get("recording") or {}).get(k)
                                           for k in ("sha256", "size", "packets", "truncated", "error")}}
                  for lane in lanes if lane.body.get("recording")]
    if row.recording == "payload":
        anomalies += _recording_anomalies(lanes)
    grant = {}
    if row.kind == "grant":  # only then, so that lanes' records keep their shape
        resolved: dict[str, list[str]] = {}
        for lane in lanes:
            for name, addresses in (lane.body.get("destinations") or {}).items():
                resolved[name] = sorted(set(resolved.get(name, [])) | set(addresses))
        grant = {"kind": "grant", "grant_group": row.grant_group, "flows": row.flows, "destinations": resolved}
    return {
        "session_id": row.id, "user": row.username, "device": row.asset_id, "site": row.site, "task": row.task,
        "reason_given": row.reason, "incident": row.incident, "break_glass": row.break_glass,
        "approvals_required": row.approvals_required, "approvals": approvals,
        "passport": _passport(device) if device else None,
        "protocols": row.flows, "node": row.node, "tunnel_address": row.tunnel_address,
        "device_address": row.device_address, "listen_port": row.listen_port,
        "engineer_public_key": row.engineer_public_key, "key_mode": row.key_mode,
        "requested": {"at": _iso(row.requested_at), "duration_s": row.duration_s},
        "planned": {"start": _iso(row.activated_at), "end": _iso(row.end_at)},
        "actual": {"start": opened or _iso(row.activated_at), "end": closed or _iso(row.ended_at),
                   "session_ended_at": _iso(row.ended_at)},
        "end_reason": row.end_reason, "ended_by": row.ended_by, "extensions": row.extensions,
        "policy_version": row.policy_version, "decision": row.decision,
        "recording": row.recording,
        "recordings": recordings,  # as the node signed them; the files follow (`session.recording` records)
        "totals": totals,
        "wireguard": {"rx_bytes": wg_rx, "tx_bytes": wg_tx, "handshakes_observed": handshakes},
        "anomalies": anomalies,
        "node_evidence": "delivered" if final else ("partial" if lanes else "missing"),
        "lanes": [_lane(lane) for lane in lanes],
        **grant,
    }


def _anomaly_reason(anomalies: list[dict]) -> str:
    kinds = {a["kind"] for a in anomalies}
    if kinds == {"blocked_attempt"}:
        return "blocked_attempts"
    return "recording_failed" if "blocked_attempt" not in kinds else "blocked_attempts_and_recording"


def _recording_anomalies(lanes: list[LaneEvidenceRecord]) -> list[dict]:
    """The task asked for a payload recording (break-glass always does): a lane without a whole one is an
    anomaly for the SOC, not a detail in the node's record."""
    out = []
    for lane in lanes:
        rec = lane.body.get("recording")
        if rec is None:
            out.append({"kind": "recording_missing", "lane": lane.ident,
                        "detail": "the node made no payload recording (an agent older than protocol v3, or none was started)"})
        elif rec.get("error") or not rec.get("sha256"):
            out.append({"kind": "recording_failed", "lane": lane.ident, "detail": rec.get("error") or "no recording file"})
        elif rec.get("truncated"):
            out.append({"kind": "recording_truncated", "lane": lane.ident,
                        "detail": f"the recording stopped at its cap ({rec.get('size')} bytes); "
                                  f"{rec.get('dropped_by_cap')} packets were not written"})
    return out


def _lane(lane: LaneEvidenceRecord) -> dict:
    return {"node": lane.node, "ident": lane.ident, "end_reason": lane.end_reason,
            "signature": lane.signature, "signed_with": lane.verified_with,
            "signature_context": EVIDENCE_SIGNATURE_CONTEXT.decode().strip(), "evidence": lane.body}


def _passport(d: Device) -> dict:
    return {"asset_id": d.asset_id, "device_type": d.device_type, "site": d.site.name if d.site else None,
            "addresses": d.addresses, "mac": d.mac, "iccid": d.iccid, "imsis": d.imsis, "firmware": d.firmware,
            "lifecycle": d.lifecycle, "revision": d.revision}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
