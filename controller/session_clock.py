"""The session clock: what happens to sessions because time passes or the world changed under them.

Each tick (every second in the service) ends active sessions whose end has come, lapses pending
requests and unused approvals, warns engineers before their end, ends sessions whose user was disabled
or whose device left service or which the newest policy no longer allows, reminds reviewers of
break-glass sessions left unreviewed, and hands nodes any generation they have not taken yet. Every
move is the same locked transaction an API call uses, so a tick racing a call (or another replica's
tick) changes a session once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from . import events, session_evidence
from .db import scrub, transaction
from .models import AccessSession, Device, SessionState, User
from .policy import DENY
from .sessions import RECHECK_IGNORES, Sessions

log = logging.getLogger("wicket.controller.clock")
S = SessionState
# Besides the sessions a trigger points at, each tick decides this many more active sessions again, in
# turn: a role taken away or a location rule's networks edited leave no trace a trigger would see. A
# batch keeps a tick's cost flat however many sessions are open (docs/benchmarks.md, "Sessions").
RECHECK_BATCH = 25
# After a policy change, at most this many sessions are decided again per tick, so that expiries and
# pushes keep their one-second rhythm while thousands of sessions are re-decided (~1 s at 4 ms each).
CHANGE_BATCH = 250


@dataclass
class TickReport:
    expired: list[str] = field(default_factory=list)
    lapsed: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)
    reminded: list[str] = field(default_factory=list)
    push_failures: dict[str, str] = field(default_factory=dict)
    unacknowledged: list[str] = field(default_factory=list)  # openings no node acknowledged: back to approved
    evidence: list[str] = field(default_factory=list)  # sessions whose evidence record was written


class SessionClock:
    def __init__(self, sessions: Sessions, *, warn_before_s: int):
        self.sessions, self.factory, self.auth = sessions, sessions.factory, sessions.auth
        self.warn_before = timedelta(seconds=warn_before_s)
        self._recheck_after = ""  # the round of periodic re-decisions goes on after this session ID
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> TickReport:
        now = self.auth.now()
        report = TickReport()
        nodes: set[str] = set()
        with self.factory() as s:
            due = s.execute(select(AccessSession.id, AccessSession.state).where(or_(
                (AccessSession.state == S.active.value) & (AccessSession.end_at <= now),
                AccessSession.state.in_([S.pending_approval.value, S.approved.value]) & (AccessSession.expires_at <= now),
            ))).all()
        for sid, state in due:
            moved = self._end_if(sid, lambda r, n: (r.state == S.active.value and r.end_at <= n) or
                                 (r.state in (S.pending_approval.value, S.approved.value) and r.expires_at and r.expires_at <= n),
                                 S.expired, "end_time" if state == S.active.value else
                                 ("not_approved_in_time" if state == S.pending_approval.value else "approval_unused"))
            if moved is not False:
                (report.expired if state == S.active.value else report.lapsed).append(sid)
                nodes.add(moved or "")
        for sid, reason in self._no_longer_allowed(now):
            moved = self._end_if(sid, lambda r, n: r.state in (S.active.value, S.approved.value, S.pending_approval.value),
                                 S.revoked, reason)
            if moved is not False:
                report.revoked.append(sid)
                nodes.add(moved or "")
        if report.expired or report.lapsed or report.revoked:
            scrub(self.factory.kw["bind"])
        report.warned = self._warn(now)
        report.reminded = self._remind(now)
        report.evidence = session_evidence.record_ready(self.sessions.factory, now, self.sessions.settings.evidence_wait_s)
        report.unacknowledged = self.sessions.fail_stale_openings(timedelta(seconds=self.sessions.settings.ack_timeout_s + 5))
        nodes |= set(self.sessions.pusher.behind())
        report.push_failures = self.sessions.pusher.push_quietly(nodes)
        return report

    # ---- ending ----

    def _end_if(self, sid: str, still, to: SessionState, reason: str):
        """End `sid` if `still(row, now)` holds under the lock: its node (or None), or False if nothing moved."""
        now = self.auth.now()
        with transaction(self.factory) as s:
            row = self.sessions._lock_any(s, sid)
            if row is None or not still(row, now):
                return False
            return self.sessions._end(s, row, to, reason, None, None)

    def _no_longer_allowed(self, now: datetime) -> list[tuple[str, str]]:
        """Open sessions to revoke: the user was disabled or deleted, the device left service, or the newest
        policy no longer allows the session. Only sessions where something changed are re-decided."""
        policy = self.sessions.policies.active()
        version = policy.version if policy else None
        with self.factory() as s:
            rows = s.execute(
                select(AccessSession.id, AccessSession.state, AccessSession.checked_policy, AccessSession.policy_version,
                       User.disabled, User.deleted_at, User.valid_until, Device.lifecycle)
                .join(User, User.id == AccessSession.user_id)
                .outerjoin(Device, Device.asset_id == AccessSession.asset_id)
                .where(AccessSession.state.in_([S.active.value, S.approved.value, S.pending_approval.value]))
            ).all()
        in_turn = self._next_in_turn([sid for sid, state, *_ in rows if state == S.active.value])
        out, changed_budget = [], CHANGE_BATCH
        for sid, state, checked, requested_under, disabled, deleted_at, valid_until, lifecycle in rows:
            if disabled or deleted_at is not None:
                out.append((sid, "user_disabled"))
            elif valid_until is not None and valid_until <= now:
                out.append((sid, "account_expired"))
            elif lifecycle != "active":
                out.append((sid, "device_not_active"))
            elif state == S.active.value and version and (sid in in_turn or (
                    (checked or requested_under) != version and changed_budget > 0)):
                if sid not in in_turn:
                    changed_budget -= 1
                reason = self._recheck(sid, version, now)
                if reason:
                    out.append((sid, reason))
        return out

    def _next_in_turn(self, active: list[str]) -> set[str]:
        ids = sorted(active)
        batch = [sid for sid in ids if sid > self._recheck_after][:RECHECK_BATCH]
        if len(batch) < RECHECK_BATCH:  # wrap around
            batch += [sid for sid in ids if sid not in batch][:RECHECK_BATCH - len(batch)]
        self._recheck_after = batch[-1] if batch and len(batch) < len(ids) else ""
        return set(batch)

    def _recheck(self, sid: str, version: str, now: datetime) -> str | None:
        """Decide an active session again under a new policy; the revocation reason, or None (and the
        session is marked as held against this version)."""
        with self.factory() as s:
            row = s.get(AccessSession, sid)
        if row is None or row.state != S.active.value or row.end_at <= now:
            return None
        decision = self.sessions._decide_again(row, row.end_at - now, now)
        failed = [c.name for c in decision.checks if c.result == "fail" and c.name not in RECHECK_IGNORES]
        if decision.outcome == DENY and failed:
            return "policy_change"
        if row.checked_policy == version:
            return None
        with transaction(self.factory) as s:
            s.query(AccessSession).filter(AccessSession.id == sid, AccessSession.state == S.active.value).update(
                {"checked_policy": version}, synchronize_session=False)
        return None

    # ---- reminders ----

    def _warn(self, now: datetime) -> list[str]:
        with self.factory() as s:
            ids = s.scalars(select(AccessSession.id).where(
                AccessSession.state == S.active.value, AccessSession.warned_at.is_(None),
                AccessSession.end_at > now, AccessSession.end_at <= now + self.warn_before)).all()
        warned = []
        for sid in ids:
            with transaction(self.factory) as s:
                row = self.sessions._lock_any(s, sid)
                if row is None or row.state != S.active.value or row.warned_at is not None or row.end_at <= now:
                    continue
                row.warned_at = now
                left = int((row.end_at - now).total_seconds())
                events.record(s, at=now, category="session", type="session.ending_soon", result="success", actor="system",
                              subject=sid, reason="ending_soon", seconds_left=left,
                              end_at=row.end_at.isoformat().replace("+00:00", "Z"),
                              user=row.username, device=row.asset_id, site=row.site, task=row.task,
                              **({"kind": "grant", "grant_group": row.grant_group} if row.kind == "grant" else {}))
                warned.append(sid)
        return warned

    def _remind(self, now: datetime) -> list[str]:
        """Unreviewed break-glass sessions past their review deadline: a high-severity reminder, again
        every deadline period until someone reviews."""
        policy = self.sessions.policies.active()
        if policy is None:
            return []
        within = policy.document.limits.break_glass_review_within
        with self.factory() as s:
            rows = s.execute(select(AccessSession.id, AccessSession.requested_at, AccessSession.review_reminded_at).where(
                AccessSession.break_glass.is_(True), AccessSession.reviewed_at.is_(None),
                AccessSession.state != S.denied.value)).all()
        reminded = []
        for sid, requested_at, last in rows:
            if now < (last or requested_at) + within:
                continue
            with transaction(self.factory) as s:
                row = self.sessions._lock_any(s, sid)
                if row is None or row.reviewed_at is not None or now < (row.review_reminded_at or row.requested_at) + within:
                    continue
                row.review_reminded_at = now
                overdue = int((now - row.requested_at - within).total_seconds())
                events.record(s, at=now, category="session", type="break_glass.review_overdue", result="failure",
                              actor="system", subject=sid, reason="review_overdue", severity="high", overdue_s=overdue,
                              user=row.username, device=row.asset_id, site=row.site, incident=row.incident)
                reminded.append(sid)
        return reminded

    # ---- running ----

    def start(self, interval_s: float) -> None:
        def run():
            while not self._stop.wait(interval_s):
                try:
                    self.tick()
                except Exception:  # the clock must keep ticking; the next tick retries what failed
                    log.exception("session clock tick failed")

        self._thread = threading.Thread(target=run, name="session-clock", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
