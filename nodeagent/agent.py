"""The node agent daemon: holds the desired state, ends lanes on time, answers the local CLI.

One thread owns every change to the kernel (the loop in `serve`). The conntrack event thread only
appends to the flow journal; the control socket only queues requests for the loop. Deadlines are
monotonic (CLOCK_BOOTTIME) and come from the absolute end time the first time the agent sees it, so a
stepped wall clock moves nothing. The kernel's own element timeouts stop a lane's traffic even while
the agent is not running; the agent then finishes the teardown and writes the evidence when it is back.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from . import __version__, prereq
from .clock import Clock, clock_synchronized
from .config import AgentConfig
from .ctnl import Conntrack, DestroyListener
from .device_traffic import DeviceTraffic, Names
from .errors import InvalidDesiredState
from .firewall import Firewall
from .lanes import LaneManager
from .naming import Naming
from .reconcile import Want
from .state import StateDir
from .wire import AgentStatus, DesiredNodeState, EndReason, ObservedLane, ReconcileReport, WireGuardStats

log = logging.getLogger("wicket.agent")
HEARTBEAT_S = 2.0
# How long an ended session stays unreopenable after it is no longer listed (defence against a
# controller, or a replayed message, listing it again).
TOMBSTONE_RETENTION_S = 7 * 24 * 3600


class Agent:
    def __init__(self, cfg: AgentConfig, *, clock: Clock | None = None, backend=None, firewall=None, conntrack=None,
                 listen_events: bool = True, names="auto"):
        self.cfg = cfg
        self.clock = clock or Clock()
        self.naming = Naming(cfg.tag)
        self.state = StateDir(cfg.state_dir)
        self._backend, self._firewall, self._conntrack = backend, firewall, conntrack
        self.listen_events = listen_events
        self._names_given = names  # "auto": resolve FQDNs with the configured servers; tests pass their own (or None)
        self.desired: DesiredNodeState | None = None
        self.last_report: ReconcileReport | None = None
        self.requests: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.backend_kind = "userspace"
        self.backend_reason = ""
        self.listener: DestroyListener | None = None
        self.lanes: LaneManager | None = None
        self.devices: DeviceTraffic | None = None
        self.link = None  # a LinkClient once enrolled (`cli._run` starts it)
        self.clock_check = clock_synchronized  # () -> (synchronised, why); replaceable in tests
        self._strict_fired = False
        self._next_resync = self._next_stats = self._next_heartbeat = 0.0

    # ---- start / stop ----

    def start(self) -> list[str]:
        notes: list[str] = []
        if self._backend is None:
            prereq.require_root()
            notes += prereq.enable_conntrack_accounting()
            kind, why = prereq.choose_backend(self.cfg.backend, self.cfg.wireguard_go)
            self.backend_kind, self.backend_reason = kind, why
            if kind == "userspace":
                from .wg.userspace import UserspaceBackend

                notes += prereq.ensure_inotify(self.cfg.max_lanes)
                self._backend = UserspaceBackend(self.naming, self.cfg.wireguard_go, str(Path(self.cfg.state_dir) / "wireguard-go.log"))
            else:
                from .wg.kernel import KernelBackend

                self._backend = KernelBackend(self.naming)
            notes.append(f"WireGuard backend: {kind} ({why})")
        else:
            self.backend_kind = self._backend.kind
        fw = self._firewall or Firewall(self.naming, self.cfg.table, self.cfg.blocked_size)
        if (did := fw.ensure()):
            notes.append(did)
        ct = self._conntrack or Conntrack()
        self.lanes = LaneManager(self.naming, self._backend, fw, ct, self.state, self.clock, self.cfg.node_id,
                                 on_ended=self._on_ended, recording_cap_bytes=self.cfg.recording_cap_bytes)
        self.devices = DeviceTraffic(fw, ct, self.state, self.clock, self.cfg.node_id, self.backend_kind,
                                     names=self._names() if self._names_given == "auto" else self._names_given, breach_report_s=self.cfg.breach_report_s, on_ended=self._on_ended)
        if self.listen_events:
            self.listener = DestroyListener(
                want=lambda mark: self.lanes.lane_of_mark(mark) is not None or self.devices.grants.has_mark(mark),
                on_flow=self._flow_ended,
                on_overrun=self.lanes.on_events_lost,
            )
            self.lanes.listener = self.listener
            self.devices.grants.listener = self.listener
            self.listener.start()
        self.desired = self.state.load_desired()
        if self.desired:
            fw.set_tunnel_nets([str(n) for n in self.desired.settings.tunnel_networks])
        notes += self.lanes.load(agent_gap=self._agent_gap())
        notes += self.devices.load()
        self.last_report = self.reconcile()
        notes += self.last_report.changes + [f"error: {e}" for e in self.last_report.errors]
        self._heartbeat()
        for line in notes:
            log.info("%s", line)
        return notes

    def stop(self) -> None:
        self.stopping.set()
        if self.listener:
            self.listener.stop()
        if self.lanes is not None:
            self.lanes.recorders.stop_all()
        if self.devices is not None:
            self.devices.stop()
        self._heartbeat()

    # ---- operations (called on the loop thread) ----

    def apply(self, desired: DesiredNodeState, raw: str | None = None) -> ReconcileReport:
        """Apply a desired state. `raw` is the JSON it was parsed from, persisted as received (cheaper
        than serialising it again, and exactly what the sender sent)."""
        current = self.desired
        if current is not None:
            if desired.node_id != current.node_id:
                raise InvalidDesiredState(f"desired state is for node {desired.node_id}, this node is {current.node_id}")
            if desired.generation < current.generation:
                raise InvalidDesiredState(
                    f"generation {desired.generation} is older than the applied {current.generation}: refused"
                )
            if desired.generation == current.generation and desired != current:
                raise InvalidDesiredState(f"generation {desired.generation} was already applied with other content: refused")
        if desired.node_id != self.cfg.node_id:
            raise InvalidDesiredState(f"desired state is for node {desired.node_id}, this node is {self.cfg.node_id}")
        if len(desired.lanes) > self.cfg.max_lanes:
            raise InvalidDesiredState(f"{len(desired.lanes)} lanes exceed this node's max_lanes={self.cfg.max_lanes}")
        self.state.save_desired(desired, raw)
        if current is None or desired.settings.tunnel_networks != current.settings.tunnel_networks:
            self.lanes.fw.set_tunnel_nets([str(n) for n in desired.settings.tunnel_networks])
        self.desired = desired
        return self.reconcile()

    def close(self, session_id: str) -> ReconcileReport:
        lane = next((lane for lane in self.lanes.lanes.values() if lane.rec and lane.rec.session_id == session_id), None)
        grant = self.devices.grants.records.get(session_id)
        if lane is None and grant is None:
            raise InvalidDesiredState(f"no open lane or grant for session {session_id}")
        self.state.mark_closed(session_id, lane.rec.end_time if lane else grant.end_time)
        return self.reconcile()

    def reset(self) -> ReconcileReport:
        """Close every lane (with evidence) and remove the agent's table: for uninstalling or a lab's end."""
        report = self.lanes.close_now(list(self.lanes.lanes), EndReason.removed)
        changes, errors = self.devices.close_all(EndReason.removed)
        report = report.model_copy(update={"changes": [*report.changes, *changes], "errors": [*report.errors, *errors]})
        self.desired = None
        (Path(self.cfg.state_dir) / "desired.json").unlink(missing_ok=True)
        self.lanes.fw.remove()
        return report

    def reconcile(self) -> ReconcileReport:
        generation = self.desired.generation if self.desired else 0
        wants, refused = self._wants()
        closed = set(self.state.closed())
        report = self.lanes.reconcile(wants, closed, generation)
        changes, errors = self.devices.reconcile(self.desired, closed, self.state.removed())
        if refused or changes or errors:
            report = report.model_copy(update={"changes": [*report.changes, *changes], "errors": [*report.errors, *refused, *errors]})
        if report.changes or report.errors:
            self.last_report = report
        return report

    def status(self) -> AgentStatus:
        now = self.clock.mono()
        observed = []
        for lane in sorted(self.lanes.lanes.values(), key=lambda lane: lane.name):
            if lane.rec is None:
                continue
            spec = lane.rec.lane
            st = self.lanes.backend.stats(lane.name)
            observed.append(
                ObservedLane(
                    session_id=spec.session_id,
                    lane=lane.name,
                    listen_port=spec.listen_port,
                    node_public_key=lane.rec.node_public_key,
                    engineer_address=str(spec.engineer_address),
                    device_address=str(spec.device_address),
                    allowed=[f.label() for f in spec.flows],
                    end_time=spec.end_time,
                    seconds_left=round(lane.rec.deadline - now, 3),
                    wireguard=WireGuardStats(
                        rx_bytes=st.rx_bytes, tx_bytes=st.tx_bytes, endpoint=st.endpoint,
                        handshakes_observed=lane.rec.handshakes_observed,
                    ) if st else None,
                )
            )
        synced, why = self.clock_check()
        return AgentStatus(
            node_id=self.cfg.node_id,
            agent_version=__version__,
            backend=self.backend_kind,
            applied_generation=self.desired.generation if self.desired else None,
            lanes=observed + self.devices.observed(),
            pending_evidence=len(list((Path(self.cfg.state_dir) / "evidence").glob("*.json"))),
            clock_synchronized=synced,
            last_reconcile=self.last_report,
            clock_detail=why if synced or self.cfg.clock_sync == "warn" else f"{why}: new lanes are refused",
            link=self.link.describe() if self.link is not None else None,
            strict_after_s=self.cfg.strict_after_s or None,
            baseline=self.devices.summary(),
        )

    # ---- the loop ----

    def tick(self) -> None:
        now = self.clock.mono()
        due = self.lanes.next_deadline()
        if due is not None and due <= now:
            self.reconcile()
        self._strict_mode()
        changes, errors = self.devices.tick(set(self.state.closed()), self.state.removed())
        if changes or errors:
            self.last_report = ReconcileReport(generation=self.desired.generation if self.desired else 0, changes=changes, errors=errors)
            for line in changes:
                log.info("%s", line)
            for line in errors:
                log.error("%s", line)
        self._expire_tombstones()
        if now >= self._next_resync:
            self._next_resync = now + self.cfg.resync_interval
            if self.lanes.fw.ensure():  # someone removed our table: load it again, with its settings
                log.warning("resync: the nft table was missing; reloaded it")
                if self.desired:
                    self.lanes.fw.set_tunnel_nets([str(n) for n in self.desired.settings.tunnel_networks])
                self.devices.load()
            notes = self.lanes.load()
            if notes:
                log.warning("resync: %s", "; ".join(notes))
            self.reconcile()
        if now >= self._next_stats:
            self._next_stats = now + self.cfg.stats_interval
            self.lanes.sample_handshakes()
        if now >= self._next_heartbeat:
            self._heartbeat()
        self.lanes.backend.reap()

    def serve(self, handle) -> None:
        """Run until stopped. `handle(request)` answers one control request (see `control`)."""
        now = self.clock.mono()
        self._next_resync = now + self.cfg.resync_interval
        self._next_stats = now + self.cfg.stats_interval
        while not self.stopping.is_set():
            timeout = self._sleep_for()
            try:
                request, reply = self.requests.get(timeout=timeout)
            except queue.Empty:
                pass
            else:
                reply(handle(request))
            self.tick()

    def _sleep_for(self) -> float:
        now = self.clock.mono()
        times = [self._next_resync, self._next_stats, self._next_heartbeat]
        for due in (self.lanes.next_deadline(), self.devices.next_due()):
            if due is not None:
                times.append(due)
        return max(0.0, min(min(times) - now, 1.0))

    # ---- helpers ----

    def _wants(self) -> tuple[dict[str, Want], list[str]]:
        """The lanes to hold, and why any new ones are refused."""
        if self.desired is None:
            return {}, []
        records = {lane.rec.session_id: lane.rec for lane in self.lanes.lanes.values() if lane.rec}
        refused: list[str] = []
        clock_ok, clock_why = (True, "") if self.cfg.clock_sync == "warn" else (None, "")
        boot = self.clock.boot_id()
        closed = self.state.closed()
        removed = self.state.removed()
        now = self.clock.mono()
        wants = {}
        for spec in self.desired.lanes:
            if spec.session_id in closed:
                continue
            gone = removed.get(spec.session_id)
            if gone is not None and spec.revision <= gone[0]:
                refused.append(f"lane {spec.session_id} revision {spec.revision} was removed from this node before: "
                               "not reopened (a stale or restored desired state)")
                continue
            rec = records.get(spec.session_id)
            if rec is not None and rec.lane.end_time == spec.end_time and rec.boot_id == boot:
                deadline = rec.deadline  # first seen earlier: keep it, whatever the wall clock did since
            else:
                deadline = self.clock.deadline_for(spec.end_time)
            if deadline <= now and rec is None:
                # Over before it ever opened (or while it could not): an extension sent later does
                # not bring it back. Hard expiry holds for lanes that never opened too.
                self.state.mark_closed(spec.session_id, spec.end_time.timestamp())
                continue
            if rec is None and self._control_lost():
                refused.append(f"lane {spec.session_id} not opened: strict mode, the controller has been silent for "
                               f"{self.link.silent_for():.0f} s")
                continue
            if rec is None:
                if clock_ok is None:
                    clock_ok, clock_why = self.clock_check()
                if not clock_ok:
                    # end times are only as good as the clock that reads them: nothing new on a clock nobody disciplines
                    refused.append(f"lane {spec.session_id} not opened: this node's clock is not synchronised ({clock_why}); "
                                   "fix NTP (chrony/systemd-timesyncd) or set clock_sync = \"warn\"")
                    continue
            wants[spec.session_id] = Want(spec=spec, deadline=deadline)
        return wants, refused

    def _on_ended(self, session_id: str, reason: EndReason, end_time: float, revision: int = 0) -> None:
        # A session that ended stays ended while the desired state still lists it, whatever the wall
        # clock says: without this, a clock set back would reopen an expired lane.
        if reason in (EndReason.expired, EndReason.closed, EndReason.control_lost):
            self.state.mark_closed(session_id, end_time)
        elif reason == EndReason.removed:
            self.state.mark_removed(session_id, revision, self.clock.wall())

    def _flow_ended(self, flow) -> None:
        if self.devices.grants.has_mark(flow.mark):
            self.devices.grants.on_flow_ended(flow)
        else:
            self.lanes.on_flow_ended(flow)

    def _names(self) -> Names | None:
        """The FQDN watcher for destinations (None: dnspython is missing, FQDN destinations stay empty)."""
        try:
            from .dnsnames import NameWatcher
        except ImportError as exc:
            log.error("FQDN destinations cannot be resolved (%s): they stay empty, so flows to them are denied", exc)
            return None
        watcher = NameWatcher(self.cfg.dns_server_list(), min_ttl_s=self.cfg.dns_min_ttl_s, max_ttl_s=self.cfg.dns_max_ttl_s,
                              stale_s=self.cfg.dns_stale_s)
        return Names(watcher)

    def _control_lost(self) -> bool:
        return bool(self.cfg.strict_after_s and self.link is not None and self.link.silent_for() >= self.cfg.strict_after_s)

    def _strict_mode(self) -> None:
        """Strict mode: once the controller has been silent for `strict_after_s`, every lane ends (and stays
        ended: a controller back later cannot reopen it)."""
        if not self.cfg.strict_after_s or self.link is None:
            return
        silent = self.link.silent_for()
        if silent < self.cfg.strict_after_s:
            self._strict_fired = False
            return
        names = [lane.name for lane in self.lanes.lanes.values() if lane.rec is not None]
        if self.devices.grants.records:
            changes, _errors = self.devices.close_all(EndReason.control_lost)
            for line in changes:
                log.info("%s", line)
        if names:
            log.warning("strict mode: the controller has been silent for %.0f s (limit %s s): ending %d lane(s)",
                        silent, self.cfg.strict_after_s, len(names))
            report = self.lanes.close_now(names, EndReason.control_lost)
            for line in report.changes + report.errors:
                log.info("%s", line)
        elif not self._strict_fired:
            log.warning("strict mode: the controller has been silent for %.0f s; no lanes open", silent)
        self._strict_fired = True

    def _expire_tombstones(self) -> None:
        wall = self.clock.wall()
        listed = {x.session_id for x in [*self.desired.lanes, *self.desired.grants]} if self.desired else set()
        for sid, until in list(self.state.closed().items()):
            if sid not in listed and until < wall - TOMBSTONE_RETENTION_S:
                self.state.forget_closed(sid)
        for sid, (_rev, at) in list(self.state.removed().items()):
            if sid not in listed and at < wall - TOMBSTONE_RETENTION_S:
                self.state.forget_removed(sid)

    def _agent_gap(self) -> tuple[float, float] | None:
        p = Path(self.cfg.state_dir) / "heartbeat"
        try:
            last = float(p.read_text())
        except (OSError, ValueError):
            return None
        now = self.clock.wall()
        return (last, now) if now - last > 2 * HEARTBEAT_S else None

    def _heartbeat(self) -> None:
        self._next_heartbeat = self.clock.mono() + HEARTBEAT_S
        p = Path(self.cfg.state_dir) / "heartbeat"
        p.write_text(f"{self.clock.wall():.3f}")


