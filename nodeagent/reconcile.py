"""The diff between the lanes the node should have and the lanes it has: a pure function.

`plan()` never touches the kernel; `LaneManager.reconcile` carries the plan out. Keeping them apart lets
tests drive every combination of desired and actual state without root.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .wire import EndReason, LaneSpec

# Fields whose change needs a new lane (new key, new port, other addresses); end_time is an extension,
# revision and device_id only relabel the record.
_STRUCTURAL = ("engineer_public_key", "engineer_address", "device_address", "service", "flows", "listen_port", "engineer_sources")


@dataclass(frozen=True)
class Want:
    spec: LaneSpec
    deadline: float  # monotonic


@dataclass(frozen=True)
class Have:
    name: str
    session_id: str | None
    spec: LaneSpec | None  # None: an orphan nobody recorded
    deadline: float | None
    healthy: bool


@dataclass
class Plan:
    open: list[Want] = field(default_factory=list)
    extend: list[tuple[Have, Want]] = field(default_factory=list)
    relabel: list[tuple[Have, Want]] = field(default_factory=list)
    replace: list[tuple[Have, Want, str]] = field(default_factory=list)
    close: list[tuple[Have, EndReason]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.open or self.extend or self.relabel or self.replace or self.close)


def plan(wants: dict[str, Want], haves: list[Have], closed: set[str], now: float) -> Plan:
    """`wants` by session id (already without locally closed sessions); `closed` names those."""
    p = Plan()
    by_session: dict[str, Have] = {}
    for h in haves:
        if h.session_id is not None and h.session_id not in by_session:
            by_session[h.session_id] = h
        else:
            p.close.append((h, EndReason.removed))  # an orphan, or a second lane for one session
    for sid, h in by_session.items():
        want = wants.get(sid)
        if want is None or want.deadline <= now:
            p.close.append((h, _end_reason(sid, h, want, closed, now)))
        elif not h.healthy or h.spec is None:
            p.replace.append((h, want, "lane was damaged"))
        elif h.spec == want.spec:
            continue
        elif (diff := structural_diff(h.spec, want.spec)):
            p.replace.append((h, want, f"{', '.join(diff)} changed"))
        elif h.spec.end_time != want.spec.end_time:
            p.extend.append((h, want))
        elif h.spec != want.spec:
            p.relabel.append((h, want))
    for sid, want in wants.items():
        if sid not in by_session and want.deadline > now:
            p.open.append(want)
    p.open.sort(key=lambda w: w.spec.session_id)
    return p


def structural_diff(a: LaneSpec, b: LaneSpec) -> list[str]:
    """Fields whose change needs a new lane. Flows and source networks are sets: order means nothing."""
    return [f for f in _STRUCTURAL if _canonical(getattr(a, f)) != _canonical(getattr(b, f))]


def _canonical(value):
    if isinstance(value, list):
        return sorted(repr(v) for v in value)
    return value


def _end_reason(sid: str, h: Have, want: Want | None, closed: set[str], now: float) -> EndReason:
    if sid in closed:
        return EndReason.closed
    if want is not None or (h.deadline is not None and h.deadline <= now):
        return EndReason.expired
    return EndReason.removed
