"""Ships the audit chain to SIEM sinks, at least once, from a durable cursor per sink.

The controller starts one `Shipper` with the configured sinks (`controller.audit.sinks.load_sinks`) and
stops it on shutdown; `wicket audit sinks` shows `sink_health`. For each sink a thread loops:

  1. take (or renew) the sink's lease in `audit_sink_cursors`: one replica ships a sink at a time, so
     several replicas on one PostgreSQL do not ship it twice; a replica that dies loses the lease after
     `lease_s` and another takes over;
  2. read the records after the cursor, in seq order, one batch (only the unbroken run after it);
  3. render and send them (`Sink.send`); then, in one transaction, move the cursor to the batch's last
     seq — only if this replica still holds the lease and nobody moved the cursor;
  4. on failure record `last_error` and `last_attempt_at`, wait (1 s, doubling to 30 s) and send the
     same batch again. Nothing is skipped, so an outage loses nothing.

A crash between 3's send and its cursor update sends that batch again after the restart: duplicates are
possible and carry the same seq and hash. The first failure after deliveries worked, and the first
delivery after failures, are themselves audit records (`audit.sink_failed`, `audit.sink_recovered`).

Leases compare wall-clock times written by different replicas: their clocks must agree to well within
`lease_s` (NTP). `lease_s` must exceed the longest send (twice the sink's timeout_s at least).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .. import events
from ..db import transaction
from ..models import AuditSinkCursor, Event
from . import formats
from .sinks import Sink, SinkConfig, SinkError, open_sink

log = logging.getLogger("wicket.controller.audit.shipper")
Clock = Callable[[], datetime]
C = AuditSinkCursor

SHIPPED, IDLE, STANDBY, FAILED = "shipped", "idle", "standby", "failed"


class Shipper:
    """Delivers the chain to every sink in `sinks`. `start()`/`stop()` run it in threads (one per sink);
    `run_once()` does the same work in the caller's thread (tests)."""

    def __init__(self, factory: sessionmaker[Session], sinks: list[SinkConfig], replica_id: str, *,
                 lease_s: float = 30.0, poll_s: float = 1.0, backoff_s: tuple[float, float] = (1.0, 30.0),
                 gap_grace_s: float = 10.0, clock: Clock | None = None,
                 opener: Callable[[SinkConfig], Sink] = open_sink):
        if not replica_id:
            raise ValueError("the shipper needs a replica id (it names the lease holder)")
        self.factory, self.replica_id = factory, replica_id[:64]
        self.lease_s, self.poll_s, self.backoff_s, self.gap_grace_s = lease_s, poll_s, backoff_s, gap_grace_s
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self.configs = list(sinks)
        self.workers = [_Worker(self, opener(c)) for c in self.configs]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for w in self.workers:
            t = threading.Thread(target=self._loop, args=(w,), name=f"audit-sink-{w.name}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.workers:
            log.info("shipping the audit chain to %s as replica %s",
                     ", ".join(f"{w.name} ({w.config.kind} {w.config.target})" for w in self.workers), self.replica_id)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the threads, give up the leases (another replica takes over at once), close the sinks."""
        self._stop.set()
        for w in self.workers:
            w.wake.set()
        for t in self._threads:
            t.join(timeout=timeout)
        self._threads = []
        for w in self.workers:
            w.release()
            w.sink.close()

    def notify(self) -> None:
        """New records were committed: idle sinks look now instead of at their next poll."""
        for w in self.workers:
            w.wake.set()

    def run_once(self, now: datetime | None = None) -> dict[str, int]:
        """Ship every sink until it is caught up, fails once, or is held by another replica; the number
        of records delivered per sink. Failures are recorded (see `sink_health`), not raised."""
        out = {}
        for w in self.workers:
            total = 0
            while True:
                outcome, n = w.step(now)
                total += n
                if outcome != SHIPPED:
                    break
            out[w.name] = total
        return out

    def health(self, now: datetime | None = None) -> list[dict]:
        return sink_health(self.factory, self.configs, now=now or self.clock())

    def _loop(self, w: _Worker) -> None:
        while not self._stop.is_set():
            outcome, _ = w.step()
            if outcome == SHIPPED:
                continue
            if outcome == FAILED:
                self._stop.wait(w.backoff())  # a commit does not cut a back-off short
                continue
            w.wake.wait(self.poll_s if outcome == IDLE else max(self.poll_s, self.lease_s / 6))
            w.wake.clear()


def sink_health(factory: sessionmaker[Session], sinks: list[SinkConfig] | None = None, *,
                now: datetime | None = None) -> list[dict]:
    """One dict per sink: name, kind, format, target, status (ok | lagging | failing | idle | unconfigured),
    cursor and head seq, lag_records, lag_seconds (age of the oldest undelivered record), delivered,
    last_ok_at, last_attempt_at, last_error, lease_holder, lease_until (times RFC 3339 or None).
    Without `sinks`: every cursor in the database (kind, format and target None). With them: theirs, then
    any cursor no configured sink has (status "unconfigured": a renamed sink starts again from seq 1)."""
    now = now or datetime.now(UTC)
    configs = {c.name: c for c in sinks} if sinks is not None else {}
    with factory() as s:
        head = s.scalar(select(func.max(Event.seq))) or 0
        rows = {r.name: r for r in s.scalars(select(C))}
        names = list(configs) + sorted(set(rows) - set(configs)) if sinks is not None else sorted(rows)
        out = []
        for name in names:
            c, row = configs.get(name), rows.get(name)
            cursor = row.seq if row else 0
            lag = max(0, head - cursor)
            oldest = s.scalar(select(Event.at).where(Event.seq == cursor + 1)) if lag else None
            failing = bool(row and row.last_error and (row.last_ok_at is None or
                                                        (row.last_attempt_at or now) >= row.last_ok_at))
            if sinks is not None and c is None:
                status = "unconfigured"
            else:
                status = "failing" if failing else "lagging" if lag else "ok" if row and row.last_ok_at else "idle"
            out.append({
                "name": name, "kind": c.kind if c else None, "format": c.format if c else None,
                "target": c.target if c else None, "status": status, "cursor": cursor, "head": head,
                "lag_records": lag, "lag_seconds": round((now - oldest).total_seconds(), 3) if oldest else 0.0,
                "delivered": row.delivered if row else 0,
                "last_ok_at": _iso(row.last_ok_at) if row else None,
                "last_attempt_at": _iso(row.last_attempt_at) if row else None,
                "last_error": row.last_error if row else None,
                "lease_holder": row.lease_holder if row else None,
                "lease_until": _iso(row.lease_until) if row else None,
            })
    return out


# ---- one sink's work ------------------------------------------------------------------------------


@dataclass
class _Cursor:
    seq: int
    failing: bool


class _Worker:
    def __init__(self, shipper: Shipper, sink: Sink):
        self.shipper, self.sink, self.config = shipper, sink, sink.config
        self.name = sink.config.name
        self.wake = threading.Event()
        self.failures = 0
        self._gap_since: float | None = None

    def backoff(self) -> float:
        first, most = self.shipper.backoff_s
        return min(most, first * 2 ** max(0, self.failures - 1))

    def step(self, now: datetime | None = None) -> tuple[str, int]:
        """At most one batch. Never raises: a failure is recorded and reported as FAILED."""
        sh = self.shipper
        now = now or sh.clock()
        try:
            cursor = self._lease(now)
        except Exception as exc:  # noqa: BLE001 - the database is away: retry later
            self.failures += 1
            log.warning("sink %s: cannot take its lease: %s", self.name, exc)
            return FAILED, 0
        if cursor is None:
            return STANDBY, 0
        try:
            with sh.factory() as s:
                rows = s.execute(select(Event.seq, Event.line, Event.hash).where(Event.seq > cursor.seq)
                                 .order_by(Event.seq).limit(self.config.batch)).all()
                head = (s.scalar(select(func.max(Event.seq))) or 0) if not rows else None
        except Exception as exc:  # noqa: BLE001
            self.failures += 1
            log.warning("sink %s: cannot read the chain: %s", self.name, exc)
            return FAILED, 0
        if not rows:
            if head is not None and head < cursor.seq:
                return self._failed(now, cursor, f"the cursor ({cursor.seq}) is past the chain's head ({head}): "
                                                 "was the database restored from a backup?")
            return IDLE, 0
        rows = self._unbroken(rows, cursor.seq)
        if not rows:
            return IDLE, 0
        batch = [formats.canonical(r.line, r.hash, r.seq) for r in rows]
        try:
            self.sink.send(batch)
        except SinkError as exc:
            return self._failed(now, cursor, str(exc).removeprefix(f"sink {self.name}: "))
        except Exception as exc:  # noqa: BLE001 - a bug in a renderer must not stop the other sinks
            log.exception("sink %s: sending failed", self.name)
            return self._failed(now, cursor, f"sink {self.name}: {type(exc).__name__}: {exc}")
        return self._advance(now, cursor, rows[-1].seq, len(rows))

    # ---- steps ----

    def _lease(self, now: datetime) -> _Cursor | None:
        """The cursor if this replica holds (or now took) the sink's lease, else None."""
        sh, name = self.shipper, self.name
        until = now + timedelta(seconds=sh.lease_s)
        with transaction(sh.factory) as s:
            row = s.execute(select(C.seq, C.last_error, C.lease_holder, C.lease_until).where(C.name == name)).first()
            if row is None:
                try:
                    with s.begin_nested():
                        s.add(AuditSinkCursor(name=name, seq=0, delivered=0))
                except IntegrityError:
                    return None  # another replica made it this moment; try again at the next step
                row = s.execute(select(C.seq, C.last_error, C.lease_holder, C.lease_until).where(C.name == name)).one()
            if row.lease_holder == sh.replica_id and row.lease_until and row.lease_until > now + timedelta(seconds=sh.lease_s / 2):
                return _Cursor(row.seq, row.last_error is not None)
            took = s.execute(update(C).where(C.name == name, or_(C.lease_holder.is_(None), C.lease_holder == sh.replica_id,
                                                                 C.lease_until.is_(None), C.lease_until < now))
                             .values(lease_holder=sh.replica_id, lease_until=until)
                             .execution_options(synchronize_session=False)).rowcount
            if took != 1:
                return None
            if row.lease_holder != sh.replica_id:
                log.info("sink %s: replica %s ships it from seq %d (the lease was held by %s)", name, sh.replica_id,
                         row.seq + 1, row.lease_holder or "nobody")
            return _Cursor(row.seq, row.last_error is not None)

    def _unbroken(self, rows, after: int):
        """The run of rows that follows `after` without a hole. The chain numbers records at commit under
        a lock, so a hole means records were removed from the table: wait `gap_grace_s`, then go on (the
        verifier names the hole; the SOC sees the jump in seq)."""
        out = []
        expected = after + 1
        for r in rows:
            if r.seq != expected:
                break
            out.append(r)
            expected += 1
        if out:
            self._gap_since = None
            return out
        if self._gap_since is None:
            self._gap_since = time.monotonic()
        if time.monotonic() - self._gap_since < self.shipper.gap_grace_s:
            return []
        log.error("sink %s: records %d..%d are missing from the audit chain; shipping on from %d",
                  self.name, after + 1, rows[0].seq - 1, rows[0].seq)
        self._gap_since = None
        out, expected = [], rows[0].seq
        for r in rows:
            if r.seq != expected:
                break
            out.append(r)
            expected += 1
        return out

    def _advance(self, now: datetime, cursor: _Cursor, last: int, n: int) -> tuple[str, int]:
        sh = self.shipper
        try:
            with transaction(sh.factory) as s:
                moved = s.execute(update(C).where(C.name == self.name, C.lease_holder == sh.replica_id, C.seq == cursor.seq)
                                  .values(seq=last, delivered=C.delivered + n, last_ok_at=now, last_attempt_at=now,
                                          last_error=None, lease_until=now + timedelta(seconds=sh.lease_s))
                                  .execution_options(synchronize_session=False)).rowcount
                if moved == 1 and cursor.failing:
                    events.record(s, at=now, category="audit", type="audit.sink_recovered", result="success", actor="system",
                                  subject=self.name[:64], reason=None, sink=self.name, kind=self.config.kind,
                                  delivered_to=last)
        except Exception as exc:  # noqa: BLE001 - sent but not recorded: it is sent again (a duplicate)
            self.failures += 1
            log.warning("sink %s: records up to %d were sent but the cursor could not move: %s", self.name, last, exc)
            return FAILED, 0
        if moved != 1:
            log.warning("sink %s: lost the lease while sending up to %d; another replica ships it now", self.name, last)
            return STANDBY, 0
        if cursor.failing:
            log.warning("sink %s: delivering again (up to seq %d)", self.name, last)
        self.failures = 0
        return SHIPPED, n

    def _failed(self, now: datetime, cursor: _Cursor, error: str) -> tuple[str, int]:
        sh = self.shipper
        self.failures += 1
        error = error[:500]
        (log.warning if self.failures == 1 else log.info)("sink %s: %s (attempt %d; retrying in %.0f s)",
                                                          self.name, error, self.failures, self.backoff())
        try:
            with transaction(sh.factory) as s:
                held = s.execute(update(C).where(C.name == self.name, C.lease_holder == sh.replica_id)
                                 .values(last_error=error, last_attempt_at=now)
                                 .execution_options(synchronize_session=False)).rowcount
                if held == 1 and not cursor.failing:
                    events.record(s, at=now, category="audit", type="audit.sink_failed", result="failure", actor="system",
                                  subject=self.name[:64], reason="delivery_failed", sink=self.name, kind=self.config.kind,
                                  error=error[:300], delivered_to=cursor.seq)
        except Exception as exc:  # noqa: BLE001
            log.warning("sink %s: cannot record its failure: %s", self.name, exc)
        return FAILED, 0

    def release(self) -> None:
        sh = self.shipper
        try:
            with transaction(sh.factory) as s:
                s.execute(update(C).where(C.name == self.name, C.lease_holder == sh.replica_id)
                          .values(lease_holder=None, lease_until=None).execution_options(synchronize_session=False))
        except Exception as exc:  # noqa: BLE001
            log.warning("sink %s: could not give up its lease: %s", self.name, exc)


def _iso(at: datetime | None) -> str | None:
    return formats.rfc3339(at) if at else None
