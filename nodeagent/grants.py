"""Temporary grants: a scoped change to one device's own flows, with an end time the agent enforces on its
own clock, exactly like a lane's.

A grant is elements of the `grant_flow` map — device . destination . protocol . port → the grant's ct
mark — each with a kernel timeout a little past the grant's end, so the kernel stops it even when the
agent is not running. The agent ends it on time itself: removes the elements, reads and then flushes the
grant's connections (conntrack, by mark: established connections die with it), and writes its evidence
(flows, bytes, what its FQDNs resolved to, the device's refused attempts meanwhile).

Records live in `<state>/grants/<session>.json`, so a restarted agent knows its grants and their deadlines.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from .clock import Clock
from .errors import FirewallError
from .evidence import Harvest, flow_to_dict, merge_flows
from .firewall import Firewall
from .naming import MARK_ID, mark_id
from .state import StateDir, write_atomic
from .wire import (
    BaselineState,
    BlockedAttempt,
    EndReason,
    GrantSpec,
    LaneEvidence,
    LaneTotals,
    ObservedLane,
)

log = logging.getLogger("wicket.agent.grants")

GRANT_MARK = 0x58000000  # ct mark class of grant connections (lanes use 0x56/0x57)
MAX_BLOCKED = 256
Key = tuple[str, str, str, int]  # device, destination, protocol, port


@dataclass
class GrantRecord:
    session_id: str
    name: str
    spec: dict
    mark: int
    opened_at: float  # wall
    deadline: float  # monotonic (CLOCK_BOOTTIME)
    boot_id: str
    end_time: float  # the spec's end time the deadline came from (wall)
    keys: list = field(default_factory=list)  # [[device, destination, proto, port]] in the kernel
    destinations: dict = field(default_factory=dict)  # name → addresses as enforced
    blocked: dict = field(default_factory=dict)  # "dst|proto|port" → packets
    evidence: str | None = None

    @property
    def grant(self) -> GrantSpec:
        return GrantSpec.model_validate(self.spec)


def grant_name(session_id: str) -> str:
    return "g" + hashlib.blake2b(session_id.encode(), digest_size=6).hexdigest()


def wanted_keys(spec: GrantSpec, baseline: BaselineState | None, resolve: Callable[[str], list[str]]) -> tuple[list[Key], dict]:
    """The grant's kernel keys, and what each destination resolved to."""
    keys: set[Key] = set()
    resolved: dict[str, list[str]] = {}
    for f in spec.flows:
        for name in f.to:
            d = baseline.destination(name) if baseline else None
            addrs = [] if d is None else ([str(a) for a in d.addresses] if d.addresses else resolve(d.fqdn or ""))
            resolved[name] = sorted(set(addrs))
            keys |= {(str(spec.device_address), a, t, p) for a in addrs for t, p in f.keys()}
    return sorted(keys), resolved


class Grants:
    def __init__(self, fw: Firewall, ct, state: StateDir, clock: Clock, node_id: str, backend_kind: str,
                 on_ended: Callable[[str, EndReason, float, int], None] | None = None):
        self.fw, self.ct, self.state, self.clock = fw, ct, state, clock
        self.node_id, self.backend_kind, self.on_ended = node_id, backend_kind, on_ended
        self.dir = state.root / "grants"
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.records: dict[str, GrantRecord] = {}
        self.listener = None
        self._closing: dict[int, GrantRecord] = {}  # mark → a grant being closed (its DESTROY events still count)
        self.kernel: dict[Key, tuple[int, float | None]] = {}  # grant elements as last written: key → (mark, deadline)

    # ---- start-up ----

    def load(self) -> list[str]:
        """Read the records; sweep grant elements and connections nobody records."""
        notes = []
        self.records = {}
        for p in sorted(self.dir.glob("*.json")):
            try:
                rec = GrantRecord(**json.loads(p.read_text()))
            except (OSError, ValueError, TypeError) as exc:
                notes.append(f"grant record {p.name} unreadable ({exc}): removed")
                p.unlink(missing_ok=True)
                continue
            self.records[rec.session_id] = rec
        try:
            in_kernel = self.fw.grant_marks()
        except FirewallError as exc:
            return [*notes, f"error: reading grants: {exc}"]
        ours = {r.mark for r in self.records.values()}
        orphans = [k for k, mark in in_kernel.items() if mark not in ours]
        if orphans:
            self.fw.delete_tolerant([self.fw.grant_keys(orphans)])
            for mark in {in_kernel[k] for k in orphans}:
                self._flush(mark)
            notes.append(f"swept {len(orphans)} grant element(s) nobody records")
        # timeouts are unknown here: the next sync writes every element again with its grant's deadline
        self.kernel = {k: (mark, None) for k, mark in in_kernel.items() if mark in ours}
        return notes

    # ---- reconcile ----

    def reconcile(self, specs: list[GrantSpec], closed: set[str], removed: dict[str, tuple[int, float]],
                  baseline: BaselineState | None, resolve: Callable[[str], list[str]]) -> tuple[list[str], list[str]]:
        changes: list[str] = []
        errors: list[str] = []
        now = self.clock.mono()
        boot = self.clock.boot_id()
        wanted: dict[str, GrantSpec] = {}
        for spec in specs:
            sid = spec.session_id
            if sid in closed:
                continue
            gone = removed.get(sid)
            if gone is not None and spec.revision <= gone[0]:
                errors.append(f"grant {sid} revision {spec.revision} was removed from this node before: not reopened")
                continue
            rec = self.records.get(sid)
            if rec is None and self.clock.deadline_for(spec.end_time) <= now:
                self.state.mark_closed(sid, spec.end_time.timestamp())  # over before it opened: never opens
                continue
            wanted[sid] = spec
        ending = []
        for sid, rec in list(self.records.items()):
            spec = wanted.get(sid)
            if spec is None or rec.deadline <= now:
                reason = EndReason.closed if sid in closed else (
                    EndReason.expired if spec is not None or rec.deadline <= now else EndReason.removed)
                ending.append((rec, reason))
        self._close(ending, changes, errors)
        for rec, _reason in ending:
            wanted.pop(rec.session_id, None)  # ended now: the same pass must not open it again
        for sid, spec in sorted(wanted.items()):
            self._converge(spec, self.records.get(sid), boot, baseline, resolve, changes)
        self._sync(errors)
        return changes, errors

    def _sync(self, errors: list[str]) -> None:
        """Make the kernel's grant elements those the live grants want. Two grants may want the same key
        (one device, one destination, one port): the one that ends last holds it, so ending the other
        leaves the flow open, and its connections are taken up by the grant still holding the key."""
        desired: dict[Key, tuple[int, float]] = {}
        for rec in sorted(self.records.values(), key=lambda r: (r.deadline, r.session_id)):
            for k in rec.keys:
                desired[tuple(k)] = (rec.mark, rec.deadline)
        stale = sorted(k for k, v in self.kernel.items() if desired.get(k) != v)
        add = sorted(k for k, v in desired.items() if self.kernel.get(k) != v)
        try:
            if stale:  # the kernel keeps an element's first timeout: a changed element is removed, then added
                for err in self.fw.delete_tolerant([self.fw.grant_keys(stale)]):
                    errors.append(f"removing grant elements: {err}")
            now = self.clock.mono()
            groups: dict[tuple[int, float], list[Key]] = {}
            for k in add:
                groups.setdefault(desired[k], []).append(k)
            self.fw.commit(add=[self.fw.grant_elements(keys, mark, deadline - now) for (mark, deadline), keys in groups.items()])
            self.kernel = desired
        except (FirewallError, OSError) as exc:
            # the controller takes a grant whose id no error names as open: name every grant this touched
            marks = {desired[k][0] for k in add}
            errors += [f"grant {r.session_id}: {exc}" for r in self.records.values() if r.mark in marks] or [f"grants: {exc}"]
            self.kernel = {k: v for k, v in self.kernel.items() if k not in stale}

    def _converge(self, spec: GrantSpec, rec: GrantRecord | None, boot: str, baseline: BaselineState | None,
                  resolve, changes: list[str]) -> None:
        """Bring one grant's record up to date with its spec and its destinations' addresses now."""
        keys, resolved = wanted_keys(spec, baseline, resolve)
        spec_json = spec.model_dump(mode="json")
        if rec is None:
            rec = GrantRecord(session_id=spec.session_id, name=grant_name(spec.session_id), spec=spec_json,
                              mark=self._mark(spec.session_id), opened_at=self.clock.wall(),
                              deadline=self.clock.deadline_for(spec.end_time), boot_id=boot,
                              end_time=spec.end_time.timestamp())
            verb = "opened"
        elif rec.end_time != spec.end_time.timestamp() or rec.boot_id != boot:
            rec.deadline, rec.end_time, rec.boot_id = self.clock.deadline_for(spec.end_time), spec.end_time.timestamp(), boot
            verb = "extended"
        elif [tuple(k) for k in rec.keys] == keys and rec.spec == spec_json:
            return
        else:
            verb = "changed"
        rec.keys = [list(k) for k in keys]
        rec.spec = spec_json
        rec.destinations = resolved
        self._save(rec)
        self.records[spec.session_id] = rec
        dests = "; ".join(f"{n}={','.join(a) or '(unresolved)'}" for n, a in sorted(resolved.items()))
        changes.append(f"{verb} grant {spec.session_id} ({rec.name}): {spec.device_address} → {dests} "
                       f"{','.join(f'{t}/{p}' for f in spec.flows for t, p in f.keys())} until {spec.end_time.isoformat()}")

    # ---- ending ----

    def close_now(self, reason: EndReason) -> tuple[list[str], list[str]]:
        changes: list[str] = []
        errors: list[str] = []
        self._close([(r, reason) for r in list(self.records.values())], changes, errors)
        return changes, errors

    def _close(self, ending: list[tuple[GrantRecord, EndReason]], changes: list[str], errors: list[str]) -> None:
        if not ending:
            return
        for rec, _ in ending:
            self.records.pop(rec.session_id, None)
            self._closing[rec.mark] = rec
        self._sync(errors)  # first the flows go, then the connections: none can come back in between
        cut = {}
        for rec, _ in ending:
            cut[rec.session_id] = self._flush(rec.mark, errors)
        if self.listener is not None:
            self.listener.wait_idle(0.5)
        for rec, reason in ending:
            closed_wall, closed_mono = self.clock.wall(), self.clock.mono()
            if rec.evidence is None or not self.state.has_evidence(rec.evidence):
                evidence = self._evidence(rec, reason, cut[rec.session_id], closed_wall, closed_mono)
                ident = self.state.evidence_ident(evidence)
                rec.evidence = ident
                self._save(rec)
                self.state.spool(evidence, ident)
            self.state.drop_flows(rec.name)
            (self.dir / f"{rec.session_id}.json").unlink(missing_ok=True)
            self.records.pop(rec.session_id, None)
            self._closing.pop(rec.mark, None)
            if self.on_ended:
                self.on_ended(rec.session_id, reason, rec.end_time, rec.grant.revision)
            late = ""
            if reason == EndReason.expired:
                late = f", {int(round((closed_mono - rec.deadline) * 1000))} ms after its end"
            changes.append(f"closed grant {rec.session_id} ({rec.name}): {reason.value}{late}")

    def _flush(self, mark: int, errors: list[str] | None = None) -> list:
        try:
            flows = self.ct.dump(mark) if self.listener is None else []
            self.ct.flush(mark)
            return flows
        except OSError as exc:
            if errors is not None:
                errors.append(f"grant connections (mark {mark:#x}): {exc}")
            return []

    def _evidence(self, rec: GrantRecord, reason: EndReason, cut, closed_wall: float, closed_mono: float) -> LaneEvidence:
        spec = rec.grant
        h = Harvest(cut_flows=cut, ended_flows=self.state.read_flows(rec.name))
        flows, _ = merge_flows(h, None)
        blocked = sorted(((k.split("|"), n) for k, n in rec.blocked.items()), key=lambda x: -x[1])
        return LaneEvidence(
            node_id=self.node_id, session_id=rec.session_id, revision=spec.revision, device_id=spec.device_id,
            lane=rec.name, backend=self.backend_kind, engineer_public_key=None, node_public_key=None,
            engineer_address=None, device_address=str(spec.device_address), service=spec.flows[0].protocol,
            allowed=[f"{t}/{p} to {','.join(f.to)}" for f in spec.flows for t, p in f.keys()],
            listen_port=None, planned_end=spec.end_time, opened_at=datetime.fromtimestamp(rec.opened_at, UTC),
            closed_at=datetime.fromtimestamp(closed_wall, UTC), end_reason=reason,
            lateness_ms=int(round((closed_mono - rec.deadline) * 1000)) if reason == EndReason.expired else None,
            totals=LaneTotals(packets_out=sum(f.packets_out for f in flows), bytes_out=sum(f.bytes_out for f in flows),
                              packets_in=sum(f.packets_in for f in flows), bytes_in=sum(f.bytes_in for f in flows)),
            flows=flows, transport=[],
            blocked=[BlockedAttempt(destination=d, proto=p, port=int(port) if port != "-" else None, packets=n)
                     for (d, p, port), n in blocked[:MAX_BLOCKED]],
            blocked_truncated=len(blocked) > MAX_BLOCKED, wireguard=None,
            notes=["grant: totals are the sums of the grant's connections (conntrack accounting)"],
            scope="grant", destinations=rec.destinations,
        )

    # ---- events and views ----

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self.records.values()), default=None)

    def has_mark(self, mark: int) -> bool:
        return mark in self._closing or any(r.mark == mark for r in list(self.records.values()))

    def on_flow_ended(self, flow) -> None:
        """Conntrack DESTROY of one of our grants' connections (event thread)."""
        closing = self._closing.get(flow.mark)
        rec = closing or next((r for r in list(self.records.values()) if r.mark == flow.mark), None)
        if rec is not None:
            record = flow_to_dict(flow)
            record["cut"] = closing is not None
            self.state.append_flow(rec.name, record)

    def note_blocked(self, rows) -> None:
        """Refused attempts the breach reporter read: those of a device under a grant go into its evidence."""
        by_device: dict[str, list[GrantRecord]] = {}
        for rec in self.records.values():
            by_device.setdefault(rec.spec["device_address"], []).append(rec)
        touched: dict[str, GrantRecord] = {}
        for src, dst, proto, port, packets in rows:
            for rec in by_device.get(src, ()):
                k = f"{dst}|{proto}|{port if port is not None else '-'}"
                rec.blocked[k] = rec.blocked.get(k, 0) + packets
                touched[rec.session_id] = rec
        for rec in touched.values():
            self._save(rec)

    def observed(self) -> list[ObservedLane]:
        now = self.clock.mono()
        out = []
        for rec in sorted(self.records.values(), key=lambda r: r.session_id):
            spec = rec.grant
            out.append(ObservedLane(
                session_id=rec.session_id, lane=rec.name, listen_port=0, node_public_key=None, engineer_address="",
                device_address=str(spec.device_address),
                allowed=[f"{t}/{p} to {','.join(f.to)}" for f in spec.flows for t, p in f.keys()],
                end_time=spec.end_time, seconds_left=round(rec.deadline - now, 3)))
        return out

    # ---- helpers ----

    def _mark(self, session_id: str) -> int:
        return GRANT_MARK | mark_id(session_id, {r.mark & MARK_ID for r in self.records.values()})

    def _save(self, rec: GrantRecord) -> None:
        write_atomic(self.dir / f"{rec.session_id}.json", json.dumps(asdict(rec)), durable=True)


__all__ = ["GRANT_MARK", "GrantRecord", "Grants", "grant_name", "wanted_keys"]
