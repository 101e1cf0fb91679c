"""Turning what a lane left in the kernel into its evidence record.

Per-connection detail comes from conntrack: connections still open at teardown (cut) and those that
ended while the lane lived (DESTROY events, journalled to disk as they arrive). Totals come from nft
counters, which live in the kernel and survive an agent restart; if the agent was not running when a
connection ended, that connection is in the totals but not in the list, and the record says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from .clock import Clock
from .ctnl import PROTO_NAMES, Flow
from .firewall import LaneRules
from .state import LaneRecord
from .wg.base import PeerStats
from .wire import (
    BlockedAttempt,
    EndReason,
    FlowRecord,
    LaneEvidence,
    LaneTotals,
    RecordingInfo,
    WireGuardStats,
)


@dataclass
class Harvest:
    closed_mono: float = 0.0
    closed_wall: float = 0.0
    cut_flows: list[Flow] = field(default_factory=list)
    cut_transport: list[Flow] = field(default_factory=list)
    ended_flows: list[dict] = field(default_factory=list)
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)
    blocked: list[tuple[str, str, int | None, int]] = field(default_factory=list)
    blocked_truncated: bool = False
    wireguard: PeerStats | None = None
    recording: RecordingInfo | None = None


def flow_to_dict(flow: Flow) -> dict:
    return {
        "id": flow.id, "mark": flow.mark, "proto": flow.proto, "src": flow.src, "dst": flow.dst,
        "sport": flow.sport, "dport": flow.dport, "po": flow.packets_orig, "bo": flow.bytes_orig,
        "pr": flow.packets_reply, "br": flow.bytes_reply, "start": flow.start_ns, "stop": flow.stop_ns,
        "finished": flow.finished,
    }


def build_evidence(
    node_id: str,
    backend: str,
    name: str,
    rec: LaneRecord | None,
    rules: LaneRules | None,
    reason: EndReason,
    h: Harvest,
    clock: Clock,
) -> LaneEvidence:
    spec = rec.lane if rec else None
    notes: list[str] = []
    data_flows, transport = merge_flows(h, rules)
    tx = h.counters.get("lane_tx", (0, 0))
    rx = h.counters.get("lane_rx", (0, 0))
    refused = h.counters.get("lane_refused", (0, 0))
    lateness = None
    if rec is not None:
        if reason == EndReason.expired:
            lateness = int(round((h.closed_mono - rec.deadline) * 1000))
        for start, end in rec.agent_gaps or []:
            notes.append(
                f"the agent was not running from {_iso(start)} to {_iso(end)}: connections that ended in that "
                "window are counted in the totals but not listed"
            )
        if rec.flow_overrun:
            notes.append("conntrack events were lost under load: some ended connections may be missing from the list")
    else:
        notes.append("orphan lane found in the kernel without a record: swept")
    if h.blocked_truncated:
        notes.append("more refused destinations than listed")
    wg = None
    if h.wireguard is not None:
        wg = WireGuardStats(
            rx_bytes=h.wireguard.rx_bytes,
            tx_bytes=h.wireguard.tx_bytes,
            last_handshake=datetime.fromtimestamp(h.wireguard.last_handshake, UTC) if h.wireguard.last_handshake else None,
            handshakes_observed=rec.handshakes_observed if rec else 0,
            endpoint=h.wireguard.endpoint,
        )
    return LaneEvidence(
        node_id=node_id,
        session_id=rec.session_id if rec else (rules.session_id if rules else None),
        revision=spec.revision if spec else None,
        device_id=spec.device_id if spec else None,
        lane=name,
        backend=backend,
        engineer_public_key=spec.engineer_public_key if spec else None,
        node_public_key=rec.node_public_key if rec else None,
        engineer_address=str(spec.engineer_address) if spec else None,
        device_address=str(spec.device_address) if spec else None,
        service=spec.service if spec else None,
        allowed=[f.label() for f in spec.flows] if spec else [],
        listen_port=spec.listen_port if spec else None,
        planned_end=spec.end_time if spec else None,
        opened_at=datetime.fromtimestamp(rec.opened_at, UTC) if rec else None,
        closed_at=datetime.fromtimestamp(h.closed_wall or clock.wall(), UTC),
        end_reason=reason,
        lateness_ms=lateness,
        totals=LaneTotals(
            packets_out=tx[0], bytes_out=tx[1], packets_in=rx[0], bytes_in=rx[1],
            packets_refused=refused[0], bytes_refused=refused[1],
        ),
        flows=data_flows,
        transport=transport,
        blocked=[BlockedAttempt(destination=d, proto=p, port=port, packets=n) for d, p, port, n in h.blocked],
        blocked_truncated=h.blocked_truncated,
        wireguard=wg,
        notes=notes,
        recording=h.recording,
    )


def merge_flows(h: Harvest, rules: LaneRules | None) -> tuple[list[FlowRecord], list[FlowRecord]]:
    """Connections by conntrack id: an ended-event record wins over the teardown dump (final counters)."""
    seen: dict[int, tuple[bool, FlowRecord]] = {}
    transport_mark = rules.transport_mark if rules else None
    cut = {f.id for f in h.cut_flows} | {f.id for f in h.cut_transport}
    # A TCP connection already closed (TIME_WAIT) whose entry the teardown flushed ended on its own.
    for d in h.ended_flows:
        flushed = d.get("cut") or d["id"] in cut
        if flushed and d.get("finished"):
            d = {**d, "stop": None}  # it ended before the teardown, when exactly conntrack no longer says
        seen[d["id"]] = (d["mark"] == transport_mark, _record(d, "cut" if flushed and not d.get("finished") else "ended"))
    for f in h.cut_flows:
        seen.setdefault(f.id, (False, _record(flow_to_dict(f), "ended" if f.finished else "cut")))
    for f in h.cut_transport:
        seen.setdefault(f.id, (True, _record(flow_to_dict(f), "ended" if f.finished else "cut")))
    data = sorted((r for t, r in seen.values() if not t), key=_order)
    transport = sorted((r for t, r in seen.values() if t), key=_order)
    return data, transport


def _record(d: dict, observed: str) -> FlowRecord:
    return FlowRecord(
        proto=PROTO_NAMES.get(d["proto"], str(d["proto"])),
        src=d["src"], sport=d["sport"], dst=d["dst"], dport=d["dport"],
        packets_out=d["po"], bytes_out=d["bo"], packets_in=d["pr"], bytes_in=d["br"],
        start=datetime.fromtimestamp(d["start"] / 1e9, UTC) if d.get("start") else None,
        stop=datetime.fromtimestamp(d["stop"] / 1e9, UTC) if d.get("stop") else None,
        observed=observed,
    )


def _order(r: FlowRecord):
    return (r.start or datetime.min.replace(tzinfo=UTC), r.src, r.sport or 0)


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")
