"""Property tests of the pure reconcile `plan()`: random desired lanes, observed lanes, local closes and times."""

from __future__ import annotations

import base64
import functools
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.reconcile import _STRUCTURAL, Have, Plan, Want, plan, structural_diff
from nodeagent.wire import EndReason, FlowSpec, LaneSpec

SIDS = [f"s{i}" for i in range(6)]
END = datetime(2030, 1, 1, tzinfo=UTC)


def base_spec(sid: str) -> LaneSpec:
    i = int(sid[1:])
    return LaneSpec(
        session_id=sid,
        revision=1,
        device_id=f"rtu-{i}",
        engineer_public_key=base64.b64encode(bytes([i + 1] * 32)).decode(),
        engineer_address=f"100.64.0.{i + 2}",
        device_address="192.0.2.10",
        service="iec104",
        flows=[{"transport": "tcp", "port": 2404}],
        listen_port=51820 + i,
        engineer_sources=[],
        end_time=END,
    )


BASE = {sid: base_spec(sid) for sid in SIDS}

# One way to change each field; structural fields need a new lane, the rest do not.
CHANGES = {
    "engineer_public_key": lambda s: {"engineer_public_key": base64.b64encode(bytes([200] * 32)).decode()},
    "engineer_address": lambda s: {"engineer_address": s.engineer_address + 100},
    "device_address": lambda s: {"device_address": s.device_address + 1},
    "service": lambda s: {"service": "modbus"},
    "flows": lambda s: {"flows": [FlowSpec(transport="tcp", port=502)]},
    "listen_port": lambda s: {"listen_port": s.listen_port + 1000},
    "engineer_sources": lambda s: {"engineer_sources": ["198.51.100.0/24"]},
    "end_time": lambda s: {"end_time": s.end_time + timedelta(minutes=30)},
    "revision": lambda s: {"revision": s.revision + 1},
    "device_id": lambda s: {"device_id": "rtu-renamed"},
    # fixed for a session's life by its task; not a reason to rebuild a lane
    "recording": lambda s: {"recording": "payload" if s.recording == "metadata" else "metadata"},
    "recording_cap_bytes": lambda s: {"recording_cap_bytes": (s.recording_cap_bytes or 1 << 20) * 2},
}
STRUCTURAL = set(_STRUCTURAL)


def changed(spec: LaneSpec, which: frozenset[str]) -> LaneSpec:
    if spec is BASE.get(spec.session_id):
        return _changed_base(spec.session_id, which)
    return _changed(spec, which)


@functools.cache
def _changed_base(sid: str, which: frozenset[str]) -> LaneSpec:
    return _changed(BASE[sid], which)


def _changed(spec: LaneSpec, which: frozenset[str]) -> LaneSpec:
    update: dict = {}
    for field in which:
        update.update(CHANGES[field](spec))
    return LaneSpec.model_validate({**spec.model_dump(), **update})


def test_change_table_covers_every_field():
    assert set(CHANGES) | {"session_id"} == set(LaneSpec.model_fields)
    assert STRUCTURAL == set(CHANGES) - {"end_time", "revision", "device_id", "recording", "recording_cap_bytes"}
    for field in CHANGES:
        assert getattr(changed(BASE["s0"], frozenset([field])), field) != getattr(BASE["s0"], field)


# ---- strategies ------------------------------------------------------------------------------------------

TIMES = st.floats(min_value=0.0, max_value=200.0, allow_nan=False)
# strategies are built once (building them per draw dominates the run time)
NOW = st.sampled_from([100.0, 100.5]) | TIMES
RELATIVE = st.sampled_from([0.0, -1.0, 1.0]).map(lambda d: ("rel", d)) | TIMES.map(lambda t: ("abs", t))
WANT_SIDS = st.lists(st.sampled_from(SIDS), unique=True, max_size=len(SIDS))
CLOSED = st.frozensets(st.sampled_from(SIDS))
HAVE_SID = st.none() | st.sampled_from(SIDS) | st.just("s-unknown")
WHICH = st.frozensets(st.sampled_from(sorted(CHANGES)), max_size=3)
UNREADABLE = st.integers(0, 9).map(lambda n: n == 0)  # now and then a record nobody can read
OPTIONAL_TIME = st.none() | RELATIVE
HEALTHY = st.booleans() | st.just(True)
N_HAVES = st.integers(0, 8)


def _at(now: float, t) -> float:
    kind, value = t
    return now + value if kind == "rel" else value


@st.composite
def scenarios(draw):
    now = draw(NOW)
    wants = {sid: Want(spec=BASE[sid], deadline=_at(now, draw(RELATIVE))) for sid in draw(WANT_SIDS)}
    closed = set(draw(CLOSED)) - set(wants)  # the caller leaves locally closed sessions out of `wants`
    haves = []
    for n in range(draw(N_HAVES)):
        sid = draw(HAVE_SID)
        which = draw(WHICH)
        unreadable = draw(UNREADABLE)
        spec = None if sid is None or unreadable else changed(BASE.get(sid, BASE["s0"]), which)
        t = draw(OPTIONAL_TIME)
        haves.append(
            Have(
                name=f"wktst{n:010d}",
                session_id=sid,
                spec=spec,
                deadline=None if t is None else _at(now, t),
                healthy=draw(HEALTHY),
            )
        )
    return wants, haves, closed, now


def placements(p: Plan) -> dict[int, list[str]]:
    """id(have) -> the plan lists it appears in."""
    out: dict[int, list[str]] = {}
    for h, _reason in p.close:
        out.setdefault(id(h), []).append("close")
    for h, _w, _why in p.replace:
        out.setdefault(id(h), []).append("replace")
    for h, _w in p.extend:
        out.setdefault(id(h), []).append("extend")
    for h, _w in p.relabel:
        out.setdefault(id(h), []).append("relabel")
    return out


# ---- properties ------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_invariants(scenario):
    wants, haves, closed, now = scenario
    p = plan(wants, haves, closed, now)
    have_sids = {h.session_id for h in haves if h.session_id is not None}

    # every live want without a lane is opened exactly once, in session order; nothing else is opened
    opened = [w.spec.session_id for w in p.open]
    assert opened == sorted(s for s, w in wants.items() if w.deadline > now and s not in have_sids)
    assert all(p.open[i] is wants[sid] for i, sid in enumerate(opened))

    # nothing is both opened and closed
    closed_sids = {h.session_id for h, _ in p.close}
    assert not set(opened) & closed_sids

    # every have lands in exactly one place (or none: unchanged)
    where = placements(p)
    assert all(len(v) == 1 for v in where.values()), where
    assert set(where) <= {id(h) for h in haves}

    first: dict[str, Have] = {}
    for h in haves:
        if h.session_id is not None:
            first.setdefault(h.session_id, h)
    reasons = {id(h): r for h, r in p.close}
    for h in haves:
        if h.session_id is None or first[h.session_id] is not h:
            assert reasons.get(id(h)) is EndReason.removed  # orphans and second lanes for one session
            continue
        want = wants.get(h.session_id)
        if want is None or want.deadline <= now:
            if h.session_id in closed:
                assert reasons[id(h)] is EndReason.closed
            elif want is not None:
                assert reasons[id(h)] is EndReason.expired  # its want is expired
            elif h.deadline is not None and h.deadline <= now:
                assert reasons[id(h)] is EndReason.expired
            else:
                assert reasons[id(h)] is EndReason.removed
        else:
            assert id(h) not in reasons, "a lane with a live want is never closed"

    # pairs carry the want of the same session
    for h, w, _ in p.replace:
        assert w is wants[h.session_id]
    for h, w in p.extend + p.relabel:
        assert w is wants[h.session_id]

    assert p.empty() == (not where and not p.open)


@settings(max_examples=200, deadline=None)
@given(
    sid=st.sampled_from(SIDS),
    which=st.frozensets(st.sampled_from(sorted(CHANGES)), max_size=4),
    now=TIMES,
    margin=st.floats(min_value=0.001, max_value=1000, allow_nan=False),
)
def test_change_classification(sid, which, now, margin):
    want_spec = BASE[sid]
    have = Have(name="wktst0000000000", session_id=sid, spec=changed(want_spec, which), deadline=now + margin, healthy=True)
    want = Want(spec=want_spec, deadline=now + margin)
    p = plan({sid: want}, [have], set(), now)
    assert p.open == [] and p.close == []
    structural = [f for f in _STRUCTURAL if f in which]
    if structural:
        assert p.replace == [(have, want, f"{', '.join(structural)} changed")]
        assert p.extend == [] and p.relabel == []
    elif "end_time" in which:
        assert p.extend == [(have, want)] and p.replace == [] and p.relabel == []
    elif which & {"revision", "device_id", "recording", "recording_cap_bytes"}:
        assert p.relabel == [(have, want)] and p.replace == [] and p.extend == []
    else:
        assert p.empty()
    assert structural_diff(have.spec, want.spec) == structural


# ---- examples --------------------------------------------------------------------------------------------


def test_unhealthy_or_unreadable_lane_is_replaced():
    want = Want(spec=BASE["s1"], deadline=500.0)
    sick = Have("wktst0000000001", "s1", BASE["s1"], 500.0, healthy=False)
    assert plan({"s1": want}, [sick], set(), 100.0).replace == [(sick, want, "lane was damaged")]
    unknown = Have("wktst0000000001", "s1", None, None, healthy=True)
    assert plan({"s1": want}, [unknown], set(), 100.0).replace == [(unknown, want, "lane was damaged")]


def test_expiry_at_exactly_now_closes():
    want = Want(spec=BASE["s1"], deadline=100.0)
    have = Have("wktst0000000001", "s1", BASE["s1"], 100.0, True)
    p = plan({"s1": want}, [have], set(), 100.0)
    assert p.close == [(have, EndReason.expired)] and p.open == []
    # and a want that expired before it was ever opened is not opened
    assert plan({"s1": want}, [], set(), 100.0).empty()


def test_orphan_and_duplicate_are_removed():
    a = Have("wktst0000000001", None, None, None, True)
    b = Have("wktst0000000002", "s2", BASE["s2"], 500.0, True)
    c = Have("wktst0000000003", "s2", BASE["s2"], 500.0, True)
    want = Want(spec=BASE["s2"], deadline=500.0)
    p = plan({"s2": want}, [a, b, c], set(), 100.0)
    assert p.close == [(a, EndReason.removed), (c, EndReason.removed)]
    assert p.open == [] and p.replace == [] and p.extend == [] and p.relabel == []


def test_locally_closed_session_is_closed_not_removed():
    have = Have("wktst0000000001", "s3", BASE["s3"], 500.0, True)
    assert plan({}, [have], {"s3"}, 100.0).close == [(have, EndReason.closed)]
    assert plan({}, [have], set(), 100.0).close == [(have, EndReason.removed)]
    assert plan({}, [Have("wktst0000000001", "s3", BASE["s3"], 50.0, True)], set(), 100.0).close[0][1] is EndReason.expired


def test_reordered_flows_are_not_a_structural_change():
    two = [FlowSpec(transport="tcp", port=2404), FlowSpec(transport="udp", port=2404)]
    have_spec = LaneSpec.model_validate({**BASE["s1"].model_dump(), "flows": two})
    want_spec = LaneSpec.model_validate({**BASE["s1"].model_dump(), "flows": list(reversed(two))})
    have = Have("wktst0000000001", "s1", have_spec, 500.0, True)
    p = plan({"s1": Want(spec=want_spec, deadline=500.0)}, [have], set(), 100.0)
    assert p.replace == []
