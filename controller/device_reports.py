"""Device reports from node agents (protocol v4) into the audit chain: baseline breaches and DNS health.

The agent link (`controller.agent_link`) checks a report's signature and calls `record` in its transaction,
so a report's records are written together or not at all. What is written (docs/soc-reference.md):

  device.breach          one per device (per source address for a host without a passport), the report's
                         window aggregated: every destination it tried, with protocol, port and packets.
                         At most `limit` per report, the devices with the most packets first;
  device.breach_summary  when devices were left out (here, or by the agent: `breaches_left_out`): counts;
  destination.resolved   an FQDN in `name_changes` resolved: its addresses are enforced from now on;
  destination.stale      its resolver fails; the last good addresses stay enforced until `stale_until`;
  destination.failed     no addresses are enforced for it.

A report is recorded once: it is kept, as signed, as a row of `lane_evidence` (the table of signed records
agents deliver, unique per node and ident) with `end_reason` "device_report" and no session. A report sent
again because its receipt was lost finds the row and records nothing. A report with nothing to record
(no breaches, no changed names) is receipted and not kept.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from nodeagent.wire import Breach, DeviceReport, NameStatus

from . import events
from .models import Device, LaneEvidenceRecord

REPORT_KIND = "device_report"  # `end_reason` of a report's row in lane_evidence
BREACH_RECORDS_PER_REPORT = 50
LEFT_OUT_LISTED = 100  # the summary names this many of the devices it stands for


class ReportRefused(Exception):
    """The report cannot be recorded as sent (the agent gets no receipt and keeps it)."""


def record(s: Session, *, node: str, site: str | None, ident: str, report: DeviceReport, signature: str, signed_with: str,
           now: datetime, limit: int = BREACH_RECORDS_PER_REPORT) -> bool:
    """Record one report whose signature was checked, in the caller's transaction. False: it was recorded
    before (or holds nothing to record); either way the agent may delete it."""
    if not (report.breaches or report.breaches_left_out or report.name_changes):
        return False
    prior = s.scalar(select(LaneEvidenceRecord.end_reason).where(LaneEvidenceRecord.node == node,
                                                                LaneEvidenceRecord.ident == ident))
    if prior is not None:
        if prior != REPORT_KIND:
            raise ReportRefused(f"ident {ident} is taken by a lane's evidence from this node")
        return False  # delivered before; the receipt was lost
    try:
        with s.begin_nested():
            s.add(LaneEvidenceRecord(node=node, ident=ident, session_id=None, end_reason=REPORT_KIND,
                                     body=report.model_dump(mode="json"), signature=signature, verified_with=signed_with,
                                     received_at=now))
    except IntegrityError:
        return False  # another replica recorded it in the same moment
    common = {"node": node, "site": site, "report": ident, "start": _iso(report.window_start), "end": _iso(report.window_end)}
    _breaches(s, node, common, report, now, limit)
    _names(s, node, common, report, now)
    return True


# ---- breaches ----


def _breaches(s: Session, node: str, common: dict, report: DeviceReport, now: datetime, limit: int) -> None:
    groups: dict[tuple[str | None, str | None], list[Breach]] = {}
    for b in report.breaches:
        # a device by its passport, whatever address it used; a host without one by its address
        key = (b.asset_id, None) if b.asset_id else (None, b.source)
        groups.setdefault(key, []).append(b)
    ranked = sorted(groups.items(), key=lambda kv: (-sum(b.packets for b in kv[1]), kv[0][0] or "", kv[0][1] or ""))
    shown, left = ranked[:limit], ranked[limit:]
    types = _device_types(s, [asset for (asset, _), _rows in shown if asset])
    actor = events.agent_actor(node)
    for (asset, address), rows in shown:
        sources = sorted({b.source for b in rows})
        dests = [{"destination": b.destination, "proto": b.proto, "port": b.port, "packets": b.packets}
                 for b in sorted(rows, key=lambda b: (-b.packets, b.destination, b.proto, b.port or 0))]
        events.record(s, at=now, category="anomaly", type="device.breach", result="failure", actor=actor,
                      subject=(asset or address)[:64], source=sources[0][:64],
                      reason="outside_baseline" if asset else "no_passport", device=asset,
                      device_type=types.get(asset), sources=sources, destinations=dests, rows=len(dests),
                      packets=sum(b.packets for b in rows), **common)
    if left or report.breaches_left_out:
        events.record(s, at=now, category="anomaly", type="device.breach_summary", result="failure", actor=actor,
                      subject=node, reason="rate_limited" if left else "left_out_by_agent", limit=limit,
                      devices=len(left), rows=sum(len(rows) for _k, rows in left),
                      packets=sum(b.packets for _k, rows in left for b in rows),
                      left_out=[asset or address for (asset, address), _rows in left[:LEFT_OUT_LISTED]],
                      breaches_left_out=report.breaches_left_out, **common)


def _device_types(s: Session, assets: list[str]) -> dict[str, str]:
    if not assets:
        return {}
    return dict(s.execute(select(Device.asset_id, Device.device_type).where(Device.asset_id.in_(assets))).all())


# ---- DNS ----


def _names(s: Session, node: str, common: dict, report: DeviceReport, now: datetime) -> None:
    by_fqdn = {n.fqdn: n for n in report.names}
    actor = events.agent_actor(node)
    for fqdn in dict.fromkeys(report.name_changes):
        status = by_fqdn.get(fqdn)
        if status is None or status.state == "pending":
            continue  # nothing resolved yet, nothing enforced differently: no record
        body = {**common, **_name_fields(status)}
        if status.state == "ok":
            events.record(s, at=now, category="agent", type="destination.resolved", result="success", actor=actor,
                          subject=fqdn[:64], **body)
        elif status.state == "stale":
            events.record(s, at=now, category="agent", type="destination.stale", result="failure", actor=actor,
                          subject=fqdn[:64], reason="resolver_failing", **body)
        else:
            events.record(s, at=now, category="agent", type="destination.failed", result="failure", actor=actor,
                          subject=fqdn[:64], reason="no_addresses", **body)


def _name_fields(n: NameStatus) -> dict:
    return {"fqdn": n.fqdn, "state": n.state, "addresses": n.addresses, "ttl_s": n.ttl_s, "resolved_at": _iso(n.resolved_at),
            "stale_until": _iso(n.stale_until), "error": n.error}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
