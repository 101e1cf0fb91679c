"""Devices' own traffic on one node: baselines, grants, the FQDNs they name, and breach reports.

The agent's loop calls `reconcile` with each desired state and `tick` every pass. DNS is resolved on a
thread of its own (a slow resolver must never delay a lane's or a grant's end); when an answer changes,
the next tick re-applies the baseline and the grants that name it. Refused attempts are read from the
kernel every `breach_report_s`, aggregated per device and destination, and spooled as one signed device
report for the controller's audit chain.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from .baseline import Baselines
from .errors import FirewallError
from .grants import Grants
from .wire import (
    MAX_BREACHES,
    BaselineSummary,
    Breach,
    DesiredNodeState,
    DeviceReport,
    EndReason,
    NameStatus,
    ObservedLane,
)

log = logging.getLogger("wicket.agent.devices")


class Names:
    """A NameWatcher run on its own thread; the loop reads a snapshot."""

    def __init__(self, watcher):
        self.watcher = watcher
        self._lock = threading.Lock()
        self._snapshot: dict[str, list[str]] = {}
        self._status: list[NameStatus] = []
        self._changed: list[str] = []
        self._wanted: set[str] | None = None  # set by the loop, taken up by the resolver thread
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def want(self, fqdns: set[str]) -> None:
        """Names to watch; the resolver thread takes them up (a new name is empty until it resolves)."""
        with self._lock:
            if fqdns == set(self._snapshot) and self._wanted is None:
                return
            self._wanted = set(fqdns)
            self._snapshot = {f: self._snapshot.get(f, []) for f in fqdns}
        if fqdns and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wicket-dns", daemon=True)
            self._thread.start()
        self._wake.set()

    def addresses(self, fqdn: str) -> list[str]:
        with self._lock:
            return list(self._snapshot.get(fqdn, []))

    def status(self) -> list[NameStatus]:
        with self._lock:
            return list(self._status)

    def take_changes(self) -> list[str]:
        with self._lock:
            out, self._changed = self._changed, []
            return out

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        # Only this thread calls the watcher: it is not thread-safe, and a slow resolver must not block the loop.
        while not self._stop.is_set():
            with self._lock:
                wanted, self._wanted = self._wanted, None
            if wanted is not None:
                self.watcher.want(wanted)
            due = self.watcher.due()
            wait = 5.0 if due is None else max(0.0, due - time.monotonic())
            if wait > 0 and wanted is None:
                self._wake.wait(min(wait, 5.0))
                self._wake.clear()
                continue
            try:
                changed = self.watcher.refresh()
            except Exception:  # a resolver bug must not stop name refreshes for good
                log.exception("resolving destination names failed")
                self._wake.wait(5.0)
                continue
            with self._lock:
                self._snapshot = {f: self.watcher.addresses(f) for f in self._snapshot}
                self._status = self.watcher.status()
                self._changed += [c for c in changed if c not in self._changed]


class DeviceTraffic:
    def __init__(self, fw, ct, state, clock, node_id: str, backend_kind: str, *, names: Names | None,
                 breach_report_s: float, on_ended=None):
        self.fw, self.state, self.clock, self.node_id = fw, state, clock, node_id
        self.baselines = Baselines(fw)
        self.grants = Grants(fw, ct, state, clock, node_id, backend_kind, on_ended=on_ended)
        self.names = names
        self.breach_report_s = breach_report_s
        self.desired: DesiredNodeState | None = None
        self._window_start = clock.wall()
        self._next_report = clock.mono() + breach_report_s
        self._pending_names: list[str] = []

    def load(self) -> list[str]:
        return self.baselines.load() + self.grants.load()

    def resolve(self, fqdn: str) -> list[str]:
        return self.names.addresses(fqdn) if self.names is not None else []

    def reconcile(self, desired: DesiredNodeState | None, closed: set[str], removed: dict) -> tuple[list[str], list[str]]:
        self.desired = desired
        baseline = desired.baseline if desired else None
        if self.names is not None:
            self.names.want({d.fqdn for d in baseline.destinations if d.fqdn} if baseline else set())
        changes: list[str] = []
        errors: list[str] = []
        try:
            changes += self.baselines.apply(baseline, self.resolve)
        except FirewallError as exc:
            errors.append(f"baseline not applied: {exc}")
        c, e = self.grants.reconcile(desired.grants if desired else [], closed, removed, baseline, self.resolve)
        return changes + c, errors + e

    def tick(self, closed: set[str], removed: dict) -> tuple[list[str], list[str]]:
        """Deadlines, changed DNS answers, breach reports. Returns (changes, errors) when anything changed."""
        changes: list[str] = []
        errors: list[str] = []
        now = self.clock.mono()
        renamed = self.names.take_changes() if self.names is not None else []
        due = self.grants.next_deadline()
        if renamed or (due is not None and due <= now):
            self._pending_names += [n for n in renamed if n not in self._pending_names]
            c, e = self.reconcile(self.desired, closed, removed)
            changes += c
            errors += e
        if now >= self._next_report:
            self._next_report = now + self.breach_report_s
            try:
                self.report()
            except (FirewallError, OSError) as exc:
                errors.append(f"breach report: {exc}")
        return changes, errors

    def next_due(self) -> float | None:
        times = [t for t in (self.grants.next_deadline(), self._next_report) if t is not None]
        return min(times) if times else None

    def report(self) -> DeviceReport | None:
        """Read the kernel's refused attempts, spool one report (when there is anything to say), clear them."""
        rows, keys = self.fw.device_blocked()
        self.grants.note_blocked(rows)
        start, end = self._window_start, self.clock.wall()
        names = self._pending_names
        if not rows and not names:
            self._window_start = end
            return None
        owner = {}
        if self.desired and self.desired.baseline:
            owner = {str(a): d.asset_id for d in self.desired.baseline.devices for a in d.addresses}
        rows.sort(key=lambda r: -r[4])
        breaches = [Breach(asset_id=owner.get(src), source=src, destination=dst, proto=proto, port=port, packets=n)
                    for src, dst, proto, port, n in rows[:MAX_BREACHES]]
        status = self.names.status() if self.names is not None else []
        report = DeviceReport(
            node_id=self.node_id, window_start=datetime.fromtimestamp(start, UTC), window_end=datetime.fromtimestamp(end, UTC),
            devices=len(self.baselines.applied.devices), breaches=breaches, breaches_left_out=max(0, len(rows) - MAX_BREACHES),
            names=status, name_changes=names[:256])
        self.state.spool_report(report)
        if keys:
            self.fw.clear_device_blocked(keys)
        self._window_start, self._pending_names = end, []
        if breaches:
            log.warning("device breaches %s..%s: %d attempt(s) outside baselines from %d host(s)",
                        report.window_start.isoformat(timespec="seconds"), report.window_end.isoformat(timespec="seconds"),
                        len(rows), len({r[0] for r in rows}))
        return report

    def summary(self) -> BaselineSummary | None:
        baseline = self.desired.baseline if self.desired else None
        if baseline is None:
            return None
        return BaselineSummary(devices=len(self.baselines.applied.devices), profiles=len(baseline.profiles),
                               unpassported=baseline.unpassported, grants=len(self.grants.records),
                               names=self.names.status() if self.names is not None else [])

    def observed(self) -> list[ObservedLane]:
        return self.grants.observed()

    def close_all(self, reason: EndReason) -> tuple[list[str], list[str]]:
        return self.grants.close_now(reason)

    def stop(self) -> None:
        if self.names is not None:
            self.names.stop()


__all__ = ["DeviceTraffic", "Names"]
