"""Failed-login throttling, per account and per source address.

After `free_failures` failures, each further failure doubles a hold-off (1 s, 2 s, 4 s …) capped at
`max_delay_s` (5 min by default); the count is forgotten after `window_s` without failures. An attacker
who keeps trying gets about one guess per 5 minutes; an approver whose name is being attacked is never
held off longer than the cap. A source address gets four times the
free failures of an account (many people share an office NAT). A success clears the account's record.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from ..models import Throttle
from ..settings import ThrottlePolicy

SOURCE_FACTOR = 4


def keys_for(username: str, source: str | None) -> list[tuple[str, int]]:
    out = [(f"user:{username.lower()[:64]}", 1)]
    if source:
        out.append((f"ip:{source}", SOURCE_FACTOR))
    return out


def retry_after(session: Session, keys: list[tuple[str, int]], now: datetime) -> int | None:
    """Seconds until an attempt is allowed, or None when it is allowed now."""
    wait = 0.0
    for key, _factor in keys:
        row = session.get(Throttle, key)
        if row is not None and row.blocked_until is not None and row.blocked_until > now:
            wait = max(wait, (row.blocked_until - now).total_seconds())
    return max(1, int(wait + 0.999)) if wait > 0 else None


def record_failure(session: Session, keys: list[tuple[str, int]], now: datetime, policy: ThrottlePolicy) -> None:
    # Rows of names nobody tries any more (often made-up names) go once they are forgotten anyway.
    quiet = now - timedelta(seconds=policy.window_s)
    session.execute(delete(Throttle).where(Throttle.last_failure_at < quiet,
                                           (Throttle.blocked_until.is_(None)) | (Throttle.blocked_until < now)))
    for key, factor in keys:
        row = _locked_row(session, key)
        # Forgotten only after `window_s` of quiet: an attacker who keeps trying stays at the cap.
        if row.last_failure_at is None or row.last_failure_at < now - timedelta(seconds=policy.window_s):
            row.failures, row.first_failure_at = 0, now
        row.failures += 1
        row.last_failure_at = now
        free = policy.free_failures * factor
        if row.failures > free:
            delay = min(2 ** (row.failures - free - 1), policy.max_delay_s)
            row.blocked_until = now + timedelta(seconds=delay)


def _locked_row(session: Session, key: str) -> Throttle:
    """The key's row, created if missing and locked: concurrent failures for one account must not race
    to create it (on PostgreSQL the loser would hit the primary key)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(insert(Throttle).values(key=key, failures=0).on_conflict_do_nothing(index_elements=["key"]))
    return session.get(Throttle, key, with_for_update=True, populate_existing=True)


def record_success(session: Session, username: str) -> None:
    row = session.get(Throttle, f"user:{username.lower()[:64]}")
    if row is not None:
        session.delete(row)


def clear(session: Session, key: str) -> bool:
    row = session.get(Throttle, key)
    if row is None:
        return False
    session.delete(row)
    return True
