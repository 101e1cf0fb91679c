"""Durations as policy files and the CLI write them: "15m", "1h30m", "90s", "2d"."""

from __future__ import annotations

import re
from datetime import timedelta

_PART = re.compile(r"(\d+)([dhms])")
_WHOLE = re.compile(r"^(?:\d+[dhms])+$")
_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}
MAX = timedelta(days=366)  # longer than any access window or silence limit a policy can mean


def parse_duration(text: object) -> timedelta:
    if isinstance(text, timedelta):
        return text
    if not isinstance(text, str) or not _WHOLE.match(text.strip()):
        raise ValueError(f"{text!r} is not a duration: write e.g. 30m, 1h30m, 90s or 2d")
    seconds = sum(int(n) * _UNIT[u] for n, u in _PART.findall(text.strip()))
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    if seconds > MAX.total_seconds():
        raise ValueError(f"{text!r} is longer than {MAX.days}d, the longest duration wicket accepts")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds <= 0:
        return "0s"
    out = ""
    for unit, size in _UNIT.items():
        n, seconds = divmod(seconds, size)
        if n:
            out += f"{n}{unit}"
    return out
