"""The lane manager: carries out a reconcile plan against the kernel and keeps the model of what exists.

Order within one pass (add before delete, keep going after a failure, report everything):
  1. lanes being replaced are closed first (their name and port are about to be reused);
  2. new lanes' boxes are built (no traffic can flow yet: the router refuses an interface without rules);
  3. ONE nft transaction adds the new lanes' elements, refreshes extended ones and removes closing ones;
  4. closing lanes are torn down: connections dumped (final counters) and flushed, counters read,
     the box stopped, evidence written.
If the transaction fails, it is retried lane by lane so one bad lane does not hold up the others.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import keys
from . import naming as nm
from .clock import Clock
from .errors import AgentError, FirewallError
from .evidence import Harvest, build_evidence, flow_to_dict
from .firewall import Firewall, LaneRules
from .lane_recording import Recorders
from .reconcile import Have, Plan, Want, plan, structural_diff
from .state import LaneRecord, StateDir
from .wg.base import Backend, Box, BoxRequest
from .wire import EndReason, LaneSpec, ReconcileReport

log = logging.getLogger("wicket.agent.lanes")


@dataclass
class Lane:
    name: str
    rec: LaneRecord | None
    rules: LaneRules | None
    box: Box | None
    healthy: bool = True
    session_hint: str | None = None  # from the kernel (nft comment) when there is no record
    box_ok: bool = True  # its WireGuard side is up (if only its rules are missing, they are re-added)


class LaneManager:
    def __init__(
        self,
        naming: nm.Naming,
        backend: Backend,
        firewall: Firewall,
        conntrack,
        state: StateDir,
        clock: Clock,
        node_id: str,
        on_ended: Callable[[str, EndReason, float, int], None] | None = None,
        listener=None,
        recording_cap_bytes: int = 64 * 1024 * 1024,
    ):
        self.naming, self.backend, self.fw, self.ct = naming, backend, firewall, conntrack
        self.state, self.clock, self.node_id = state, clock, node_id
        self.on_ended = on_ended
        self.listener = listener
        self.lanes: dict[str, Lane] = {}
        self._marks: dict[int, str] = {}  # ct mark → lane name, for the conntrack event thread
        self._lock = threading.Lock()
        self._slot_cursor = 0
        self._have_cache: dict[str, Have] = {}
        self._closing: set[str] = set()
        self.recorders = Recorders(state.root / "recordings", recording_cap_bytes)

    # ---- model ----

    def load(self, agent_gap: tuple[float, float] | None = None) -> list[str]:
        """Rebuild the model from the kernel and the lane records (start-up and resync)."""
        boxes = self.backend.observe()
        view = self.fw.view()
        records = {r.name: r for r in self.state.lane_records().values()}
        names = set(boxes) | set(view.marks) | set(view.flows) | set(view.accounted) | set(records)
        notes = []
        lanes = {}
        for name in sorted(names):
            if not self.naming.is_ours(name):
                continue
            rec = records.get(name)
            box = boxes.get(name)
            if rec is not None and agent_gap is not None:
                rec.agent_gaps = (rec.agent_gaps or []) + [list(agent_gap)]
                self.state.save_lane(rec)
            rules = self._rules_for(rec, box) if rec else None
            box_ok = bool(box and (box.device or box.router_link))  # a UAPI hiccup alone is not damage
            healthy = bool(rec and box_ok and name in view.marks)
            if rec and rules and rules.mark != view.marks.get(name, rules.mark):
                healthy = False
            lanes[name] = Lane(name, rec, rules, box, healthy, session_hint=view.sessions.get(name), box_ok=box_ok)
            if rec is None:
                notes.append(f"found orphan lane {name} (session {view.sessions.get(name, 'unknown')})")
            elif not healthy:
                notes.append(f"lane {rec.session_id} ({name}) is incomplete in the kernel")
        for lane in lanes.values():
            if lane.rec is not None and lane.rec.opened and lane.healthy:
                self.recorders.ensure(lane.name, lane.rec.lane, resume=True)
        with self._lock:
            self.lanes = lanes
            self._have_cache = {}
            self._marks = {}
            for lane in lanes.values():
                mark = lane.rules.mark if lane.rules else view.marks.get(lane.name)
                if mark:
                    self._marks[mark] = lane.name
                    self._marks[nm.TRANSPORT_MARK | (mark & nm.MARK_ID)] = lane.name
        return notes

    def haves(self, wanted_names: dict[str, str] | None = None) -> list[Have]:
        """`wanted_names` maps lane names of wanted sessions to their ids: a box without a record whose
        name is one of them is that session's damaged lane (say, a crash mid-open), not a stranger."""
        out = []
        cache = self._have_cache
        for lane in self.lanes.values():
            have = cache.get(lane.name)
            if have is None:
                rec = lane.rec
                sid = rec.session_id if rec else (wanted_names or {}).get(lane.name)
                have = Have(
                    name=lane.name,
                    session_id=sid,
                    spec=rec.lane if rec else None,
                    deadline=rec.deadline if rec else None,
                    healthy=lane.healthy and (rec is None or rec.opened),
                )
                if rec is not None:  # a record-less lane's session depends on what is wanted
                    cache[lane.name] = have
            out.append(have)
        return out

    def _touch(self, name: str) -> None:
        """A lane changed: its cached view for planning is stale."""
        self._have_cache.pop(name, None)

    def next_deadline(self) -> float | None:
        deadlines = [lane.rec.deadline for lane in self.lanes.values() if lane.rec]
        return min(deadlines) if deadlines else None

    def lane_of_mark(self, mark: int) -> str | None:
        return self._marks.get(mark)

    # ---- reconcile ----

    def reconcile(self, wants: dict[str, Want], closed: set[str], generation: int) -> ReconcileReport:
        now = self.clock.mono()
        names = {self.naming.lane_name(sid): sid for sid in wants}
        p = plan(wants, self.haves(names), closed, now)
        report = ReconcileReport(generation=generation)
        if p.empty():
            return report
        changes: list[str] = []
        errors: list[str] = []
        self._execute(p, changes, errors)
        for line in changes:
            log.info("[#] %s", line)
        for line in errors:
            log.error("%s", line)
        return ReconcileReport(generation=generation, changes=changes, errors=errors)

    def _execute(self, p: Plan, changes: list[str], errors: list[str]) -> None:
        now = self.clock.mono()
        # 0. a lane whose box is fine but whose rules went missing (the table was flushed) gets its
        #    rules back: same key, same box, the engineer's config keeps working
        repairs = []
        for item in list(p.replace):
            have, want, _why = item
            lane = self.lanes[have.name]
            if lane.rec is not None and lane.rec.opened and lane.box_ok and lane.rules is not None and not structural_diff(lane.rec.lane, want.spec):
                p.replace.remove(item)
                repairs.append((lane, want))
        # 1. replaced lanes go first: the new lane reuses their name
        for have, want, why in p.replace:
            self._close([(self.lanes[have.name], EndReason.replaced)], changes, errors, wait=True)
            p.open.append(want)
            changes.append(f"replacing lane {want.spec.session_id}: {why}")
        # A closing lane whose UDP port a new lane needs must go first, as with a replacement.
        needed = {w.spec.listen_port for w in p.open}
        first = [(h, r) for h, r in p.close if h.spec is not None and h.spec.listen_port in needed]
        if first:
            self._close([(self.lanes[h.name], r) for h, r in first], changes, errors, wait=True)
            p.close = [(h, r) for h, r in p.close if (h, r) not in first]
        # 2. build new lanes' boxes
        prepared: list[tuple[Want, LaneRecord, LaneRules, Box]] = []
        for want in p.open:
            try:
                prepared.append(self._prepare(want))
            except (AgentError, OSError) as exc:
                errors.append(f"lane {want.spec.session_id}: could not open: {exc}")
        # 3. one transaction
        add, delete = [], []
        for want, _rec, rules, _box in prepared:
            add += self.fw.policy_elements(rules, want.deadline - now) + self.fw.accounting_elements(rules.name)
        for have, want in p.extend:
            lane = self.lanes[have.name]
            delete += self.fw.policy_keys(lane.rules)
            add += self.fw.policy_elements(lane.rules, want.deadline - now)
        if repairs:
            # some of a damaged lane's elements may remain: clear them first, outside the transaction
            self.fw.delete_tolerant([k for lane, _w in repairs for k in self.fw.policy_keys(lane.rules)])
            for lane, want in repairs:
                add += self.fw.policy_elements(lane.rules, want.deadline - now) + self.fw.accounting_elements(lane.name)
        closing = [(self.lanes[h.name], reason) for h, reason in p.close]
        fresh, stale = [], []
        for lane, _reason in closing:
            if lane.rules is None:
                continue
            # A lane past its kernel timeout may already have lost its elements: delete those one by one.
            live = lane.rec is not None and lane.rec.deadline > now - 0.5
            (fresh if live and lane.healthy else stale).extend(self.fw.policy_keys(lane.rules))
        delete += fresh
        try:
            self.fw.commit(add=add, delete=delete)
            committed = prepared
        except FirewallError as exc:
            log.warning("nft transaction failed (%s); retrying lane by lane", exc)
            committed = self._commit_one_by_one(prepared, p.extend, fresh, now, errors)
        if stale:
            for err in self.fw.delete_tolerant(stale):
                errors.append(f"removing expired elements: {err}")
        for want, rec, rules, box in committed:
            rec.opened = True
            self.state.save_lane(rec)
            self._touch(rules.name)
            with self._lock:
                self.lanes[rules.name] = Lane(rules.name, rec, rules, box, True)
                self._marks[rules.mark] = rules.name
                self._marks[rules.transport_mark] = rules.name
            changes.append(_describe_open(want.spec, rules, box))
            note = self.recorders.ensure(rules.name, want.spec)
            if note:
                errors.append(f"lane {want.spec.session_id}: {note}")
        for have, want in p.extend:
            lane = self.lanes[have.name]
            self._touch(lane.name)
            lane.rec.spec = want.spec.model_dump(mode="json")
            lane.rec.deadline, lane.rec.end_time = want.deadline, want.spec.end_time.timestamp()
            self.state.save_lane(lane.rec)
            changes.append(f"extended lane {want.spec.session_id} to {want.spec.end_time.isoformat()}")
        for lane, want in repairs:
            self._touch(lane.name)
            lane.healthy = True
            changes.append(f"restored the rules of lane {want.spec.session_id} ({lane.name})")
        for have, want in p.relabel:
            lane = self.lanes[have.name]
            self._touch(lane.name)
            lane.rec.spec = want.spec.model_dump(mode="json")
            self.state.save_lane(lane.rec)
        # 4. tear down what closes
        self._close(closing, changes, errors, wait=False, rules_removed=True)

    def _prepare(self, want: Want) -> tuple[Want, LaneRecord, LaneRules, Box]:
        spec = want.spec
        name = self.naming.lane_name(spec.session_id)
        taken_ids = {lane.rules.mark & nm.MARK_ID for lane in self.lanes.values() if lane.rules}
        lane_id = nm.mark_id(spec.session_id, taken_ids)
        slot = None
        if self.backend.kind == "userspace":
            used = {lane.box.slot for lane in self.lanes.values() if lane.box and lane.box.slot}
            used |= {lane.rec.slot for lane in self.lanes.values() if lane.rec and lane.rec.slot}
            # Rotate rather than take the lowest free slot: a just-closed lane's box may still be going away.
            total = self.naming.max_slots()
            slot = next((s for s in ((self._slot_cursor + i) % total + 1 for i in range(total)) if s not in used), None)
            if slot is None:
                raise AgentError("no free lane link address")
            self._slot_cursor = slot
        private, public = keys.generate_pair()
        rec = LaneRecord(
            session_id=spec.session_id,
            name=name,
            spec=spec.model_dump(mode="json"),
            opened_at=self.clock.wall(),
            deadline=want.deadline,
            boot_id=self.clock.boot_id(),
            end_time=spec.end_time.timestamp(),
            mark_id=lane_id,
            slot=slot,
            node_public_key=public,
            backend=self.backend.kind,
        )
        # The record goes first: a crash from here on leaves a lane the next start recognises and cleans.
        self.state.save_lane(rec)
        try:
            box = self._create_box(name, private, public, spec, slot)
        except BaseException:
            self.state.drop_lane(spec.session_id)
            raise
        rules = _rules(name, spec, lane_id, box)
        return want, rec, rules, box

    def _create_box(self, name: str, private: str, public: str, spec: LaneSpec, slot: int | None) -> Box:
        return self.backend.create(
            BoxRequest(
                name=name,
                private_key=private,
                listen_port=spec.listen_port,
                peer_public_key=spec.engineer_public_key,
                engineer_address=str(spec.engineer_address),
                slot=slot or 0,
                engineer_sources=tuple(str(n) for n in spec.engineer_sources),
                node_public_key=public,
            )
        )

    def _commit_one_by_one(self, prepared, extends, deletes, now, errors):
        if deletes:
            for err in self.fw.delete_tolerant(deletes):
                errors.append(f"removing lane elements: {err}")
        committed = []
        for item in prepared:
            want, _rec, rules, _box = item
            try:
                self.fw.commit(add=self.fw.policy_elements(rules, want.deadline - now) + self.fw.accounting_elements(rules.name))
                committed.append(item)
            except FirewallError as exc:
                errors.append(f"lane {want.spec.session_id}: rules refused: {exc}")
                self.backend.destroy(rules.name, wait=True)
                self.state.drop_lane(want.spec.session_id)
        for have, want in extends:
            lane = self.lanes[have.name]
            try:
                self.fw.delete_tolerant(self.fw.policy_keys(lane.rules))
                self.fw.commit(add=self.fw.policy_elements(lane.rules, want.deadline - now))
            except FirewallError as exc:
                errors.append(f"lane {want.spec.session_id}: extension refused: {exc}")
        return committed

    # ---- teardown ----

    def close_now(self, names: list[str], reason: EndReason) -> ReconcileReport:
        """Close lanes outside a plan (reset, shutdown): same path, same evidence."""
        changes: list[str] = []
        errors: list[str] = []
        self._close([(self.lanes[n], reason) for n in names if n in self.lanes], changes, errors, wait=True)
        return ReconcileReport(generation=-1, changes=changes, errors=errors)

    def _close(self, closing: list[tuple[Lane, EndReason]], changes, errors, wait: bool, rules_removed: bool = False) -> None:
        """End lanes. Crash-safe order: harvest, write the evidence (durably, its id noted in the lane
        record first), and only then clear counters, connections' journal and the box. A restart in
        between finds either the evidence written or the kernel counters still there."""
        if not closing:
            return
        if not rules_removed:
            live = [k for lane, _ in closing if lane.rules for k in self.fw.policy_keys(lane.rules)]
            for err in self.fw.delete_tolerant(live):
                errors.append(f"removing lane elements: {err}")
        harvests = {lane.name: self._harvest_connections(lane, errors) for lane, _ in closing}
        # Connections flushed above report their end asynchronously; let the event thread catch up
        # so the evidence sees every connection exactly once.
        if self.listener is not None:
            self.listener.wait_idle(0.5)
        try:
            blocked, blocked_keys = self.fw.blocked({lane.name for lane, _ in closing})
        except (FirewallError, OSError) as exc:
            errors.append(f"reading refused attempts: {exc}")
            blocked, blocked_keys = {}, []
        for lane, reason in closing:
            h = harvests[lane.name]
            h.blocked, h.blocked_truncated = blocked.get(lane.name, ([], False))
            counters = None
            try:
                counters = self.fw.counters(lane.name)
            except (FirewallError, OSError) as exc:
                errors.append(f"lane {lane.name}: reading counters: {exc}")
            h.counters = counters or {}
            h.ended_flows = self.state.read_flows(lane.name)
            rec = lane.rec
            evidence = None
            h.recording = self.recorders.stop(lane.name, rec.lane if rec else None)
            already = rec is not None and rec.evidence is not None and self.state.has_evidence(rec.evidence)
            if not already and (rec is None or rec.opened or counters is not None):
                evidence = build_evidence(self.node_id, self.backend.kind, lane.name, rec, lane.rules, reason, h, self.clock)
                ident = self.state.evidence_ident(evidence)
                self.recorders.file_as(lane.name, ident)
                if rec is not None:
                    rec.evidence = ident
                    self.state.save_lane(rec)
                self.state.spool(evidence, ident)
            self.fw.delete_tolerant(self.fw.accounting_elements(lane.name))
            self.backend.destroy(lane.name, wait=wait)
            self._touch(lane.name)
            with self._lock:
                self._closing.discard(lane.name)
                self.lanes.pop(lane.name, None)
                for mark, name in list(self._marks.items()):
                    if name == lane.name:
                        del self._marks[mark]
            if rec is not None:
                self.state.drop_lane(rec.session_id)
                if self.on_ended:
                    self.on_ended(rec.session_id, reason, rec.end_time, rec.lane.revision)
            self.state.drop_flows(lane.name)
            sid = rec.session_id if rec else f"unknown session {lane.session_hint or ''}".strip()
            late = ""
            if evidence is not None and evidence.lateness_ms is not None and reason == EndReason.expired:
                late = f", {evidence.lateness_ms} ms after its end"
            changes.append(f"closed lane {sid} ({lane.name}): {reason.value}{late}")
        if blocked_keys:
            for err in self.fw.delete_all(blocked_keys):
                errors.append(f"clearing refused attempts: {err}")

    def _harvest_connections(self, lane: Lane, errors: list[str]) -> Harvest:
        h = Harvest()
        h.closed_mono = self.clock.mono()
        h.closed_wall = self.clock.wall()
        h.wireguard = self.backend.stats(lane.name)
        if lane.rules is None:
            return h
        try:
            if self.listener is None:
                # Without the event thread, read the final counters first (a dump walks the whole table).
                h.cut_flows = self.ct.dump(lane.rules.mark)
                h.cut_transport = self.ct.dump(lane.rules.transport_mark)
            else:
                self._closing.add(lane.name)  # their DESTROY events now carry "cut" and the final counters
            self.ct.flush(lane.rules.mark, nm.LANE_MASK)
        except OSError as exc:
            errors.append(f"lane {lane.name}: conntrack: {exc}")
        return h

    # ---- events and sampling ----

    def on_flow_ended(self, flow) -> None:
        """Called from the conntrack event thread for a DESTROY event with one of our marks."""
        name = self._marks.get(flow.mark)
        if name is not None:
            record = flow_to_dict(flow)
            record["cut"] = name in self._closing
            self.state.append_flow(name, record)

    def on_events_lost(self) -> None:
        for lane in list(self.lanes.values()):
            if lane.rec and not lane.rec.flow_overrun:
                lane.rec.flow_overrun = True
                self.state.save_lane(lane.rec)

    def sample_handshakes(self) -> None:
        for lane in list(self.lanes.values()):
            if lane.rec is None:
                continue
            st = self.backend.stats(lane.name)
            if st and st.last_handshake and st.last_handshake != lane.rec.last_handshake_seen:
                lane.rec.last_handshake_seen = st.last_handshake
                lane.rec.handshakes_observed += 1
                self.state.save_lane(lane.rec)

    def _rules_for(self, rec: LaneRecord, box: Box | None) -> LaneRules:
        return _rules(rec.name, rec.lane, rec.mark_id, box, rec.slot, self.naming)


def _rules(name: str, spec: LaneSpec, lane_id: int, box: Box | None, slot: int | None = None, naming=None) -> LaneRules:
    transport = box.transport_address if box else None
    if transport is None and slot and naming is not None:
        transport = naming.link_pair(slot)[1]
    return LaneRules(
        name=name,
        session_id=spec.session_id,
        engineer_address=str(spec.engineer_address),
        device_address=str(spec.device_address),
        flows=tuple((f.transport.value, p) for f in spec.flows for p in f.ports()),
        mark=nm.data_mark(lane_id),
        transport_mark=nm.transport_mark(lane_id),
        listen_port=spec.listen_port if transport else None,
        transport_address=transport,
    )


def _describe_open(spec: LaneSpec, rules: LaneRules, box: Box) -> str:
    flows = ",".join(f.label() for f in spec.flows)
    return (
        f"opened lane {spec.session_id} ({rules.name}): {spec.engineer_address} → {spec.device_address} "
        f"{flows} until {spec.end_time.isoformat()}, udp/{spec.listen_port}"
    )


__all__ = ["Lane", "LaneManager"]
