"""Change windows in local time, evaluated in UTC.

A weekly rule "mon 22:00–04:00" opens Monday 22:00 local time and closes Tuesday 04:00 local time, on
whatever UTC offsets those instants have (DST changes included). A local time that does not exist (the
hour skipped in spring) is read with the offset before the change, so that edge moves with the clock;
a local time that exists twice (autumn) is read as the first. Windows that touch or overlap merge, so a
session may run from one into the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from .model import DAYS, ChangeWindow

HORIZON = timedelta(days=8)  # how far around `at` windows are expanded: longer than any session


@dataclass(frozen=True)
class Opening:
    start: datetime  # UTC
    end: datetime  # UTC
    windows: tuple[str, ...]  # the names of the windows merged into this opening


def openings(windows: dict[str, ChangeWindow], site_tz: str, at: datetime) -> list[Opening]:
    """Every opening of the given windows that overlaps [at − 1 day, at + HORIZON], merged, in order."""
    lo, hi = at - timedelta(days=1), at + HORIZON
    spans: list[tuple[datetime, datetime, str]] = []
    for name, window in windows.items():
        zone = ZoneInfo(window.timezone or site_tz)
        for start, end in _expand(window, zone, lo, hi):
            if end > lo and start < hi:
                spans.append((start, end, name))
    spans.sort()
    merged: list[Opening] = []
    for start, end, name in spans:
        if merged and start <= merged[-1].end:
            last = merged[-1]
            names = last.windows if name in last.windows else tuple(sorted((*last.windows, name)))
            merged[-1] = Opening(last.start, max(last.end, end), names)
        else:
            merged.append(Opening(start, end, (name,)))
    return merged


def containing(windows: dict[str, ChangeWindow], site_tz: str, at: datetime) -> Opening | None:
    """The opening `at` lies in (start inclusive, end exclusive), or None."""
    for o in openings(windows, site_tz, at):
        if o.start <= at < o.end:
            return o
    return None


def next_opening(windows: dict[str, ChangeWindow], site_tz: str, at: datetime) -> Opening | None:
    for o in openings(windows, site_tz, at):
        if o.start > at:
            return o
    return None


def _expand(window: ChangeWindow, zone: ZoneInfo, lo: datetime, hi: datetime):
    first = (lo.astimezone(zone) - timedelta(days=1)).date()
    last = (hi.astimezone(zone) + timedelta(days=1)).date()
    for rule in window.weekly:
        start_t, end_t = rule.bounds()
        days = {DAYS.index(d) for d in rule.days}
        day = first
        while day <= last:
            if day.weekday() in days:
                start = _local(day, start_t, zone)
                if end_t is None:
                    end = _local(day + timedelta(days=1), None, zone)
                elif end_t <= start_t:
                    end = _local(day + timedelta(days=1), end_t, zone)
                else:
                    end = _local(day, end_t, zone)
                yield start, end
            day += timedelta(days=1)
    for rule in window.once:
        start = rule.start if rule.start.tzinfo else rule.start.replace(tzinfo=zone)
        end = rule.end if rule.end.tzinfo else rule.end.replace(tzinfo=zone)
        yield start.astimezone(UTC), end.astimezone(UTC)


def _local(day: date, t, zone: ZoneInfo) -> datetime:
    if t is None:
        return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)
    return datetime(day.year, day.month, day.day, t.hour, t.minute, tzinfo=zone).astimezone(UTC)
