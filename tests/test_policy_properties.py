"""Properties of the policy engine, the loader and change windows, checked with hypothesis.

(a) A request built to pass every check is never denied; breaking exactly one check (one strategy per
    check) denies it and names that check. No decision is ever an allow while a check failed.
(b) Neither the version nor any decision depends on how the policy is written down: entry order, list
    order and the split of sections across files.
(c) `windows.containing` and `next_opening` agree with a brute-force reference that walks the local
    wall clock, in zones with DST, across midnight and on the days the clocks change.

Every test is deterministic (derandomize) and bounded; the file runs in a few seconds.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.policy import (
    ALLOW,
    ALLOW_WITH_APPROVAL,
    CHECKS,
    DENY,
    AccessRequest,
    DeviceFacts,
    SiteFacts,
    UserFacts,
    evaluate,
    load_files,
)
from controller.policy.model import DAYS, ChangeWindow
from controller.policy.windows import HORIZON, containing, next_opening

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "policy-example"
ZONES = ("Europe/Berlin", "America/New_York", "Australia/Sydney", "UTC")
SETTINGS = settings(derandomize=True, deadline=None, max_examples=150,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
HOUR, MINUTE = timedelta(hours=1), timedelta(minutes=1)
SITE, LAN = "north", "10.20.0.0/24"
REQUESTING = ("engineer", "contractor")
OTHER_ROLES = ("approver", "site_admin", "soc", "admin")


def example_files() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(EXAMPLE.glob("*.yaml"))}


@cache
def example():
    return load_files(example_files())


# ---- (a) one check broken at a time ----------------------------------------------------------------------


@st.composite
def good_requests(draw, tasks: tuple[str, ...] | None = None, location: bool = False) -> AccessRequest:
    """A request on the example policy that passes every check. `location`: one location rule applies."""
    doc = example().document
    task_name = draw(st.sampled_from(tasks or sorted(doc.tasks)))
    task = doc.tasks[task_name]
    device_type = draw(st.sampled_from(sorted(task.device_types)))
    tz = draw(st.sampled_from(ZONES))
    role = draw(st.sampled_from(sorted(task.roles)))
    if location and not _task_rules(doc, task_name):
        role = "contractor"
    if role == "contractor" and _task_rules(doc, task_name):
        role = "engineer"  # a contractor's rule and a task's rule allow disjoint networks in the example
    extra = draw(st.lists(st.sampled_from(OTHER_ROLES), max_size=2, unique=True))
    roles = ((role, draw(st.sampled_from((SITE, None)))), *((r, SITE) for r in extra), ("engineer", "south"))
    kind = draw(st.sampled_from(("internal", "contractor")))

    if task.change_window:
        duration = draw(st.integers(1, int(task.duration.max / MINUTE)).map(lambda m: m * MINUTE))
        opens, closes = _weeknight(draw, tz)
        at = opens + draw(st.integers(0, int((closes - opens - duration) / MINUTE))) * MINUTE
        windows = ("weeknights", *draw(st.lists(st.sampled_from(("weekend", "winter-outage-2026")), unique=True)))
        asked = None if duration == task.duration.default and draw(st.booleans()) else duration
    else:
        at = datetime(2026, 1, 1, tzinfo=UTC) + draw(st.integers(0, 2 * 365 * 24 * 60)) * MINUTE
        asked = draw(st.one_of(st.none(), st.integers(1, int(task.duration.max / MINUTE)).map(lambda m: m * MINUTE)))
        duration = asked or task.duration.default
        windows = tuple(draw(st.lists(st.sampled_from(sorted(doc.change_windows)), unique=True)))
    limit = doc.device_types[device_type].max_silence or doc.limits.max_silence
    last_seen = at - draw(st.integers(0, int(limit / MINUTE))) * MINUTE
    valid_from = draw(st.one_of(st.none(), st.integers(0, 10_000).map(lambda m: at - m * MINUTE)))
    valid_until = draw(st.one_of(st.none(), st.integers(0, 10_000).map(lambda m: at + duration + m * MINUTE)))
    lan = draw(st.sampled_from(((LAN,), ())))
    user = UserFacts("alice", kind=kind, valid_from=valid_from, valid_until=valid_until, roles=roles,
                     active_sessions=draw(st.integers(0, doc.limits.concurrent_sessions_per_user - 1)))
    device = DeviceFacts("dev-1", device_type, SITE, addresses=(f"10.20.0.{draw(st.integers(1, 254))}",),
                         last_seen=last_seen, ports=draw(st.sampled_from(((), (("ssh", 2222),), (("iec104", 2405),)))))
    request = AccessRequest(user, device, SiteFacts(SITE, tz, windows, lan), task_name, asked, at, None)
    rules = _applicable(doc, request)
    if rules:
        network = ipaddress.ip_network(doc.locations[rules[0]].networks[0])
        source = str(network[draw(st.integers(0, network.num_addresses - 1))])
    else:
        source = draw(st.sampled_from((None, "198.51.100.9", "2001:db8::7")))
    return replace(request, source=source)


def _weeknight(draw, tz: str) -> tuple[datetime, datetime]:
    """One opening of the example's weeknights window (Mon–Thu 22:00–04:00) in `tz`, in UTC."""
    monday = datetime(2026, 1, 5) + timedelta(weeks=draw(st.integers(0, 100)))
    day = monday + timedelta(days=draw(st.integers(0, 3)))
    zone = ZoneInfo(tz)
    opens = datetime.combine(day.date(), time(22), zone).astimezone(UTC)
    closes = datetime.combine((day + timedelta(days=1)).date(), time(4), zone).astimezone(UTC)
    return opens, closes


def _task_rules(doc, task: str) -> list[str]:
    return [n for n, loc in doc.locations.items() if task in loc.tasks]


def _applicable(doc, r: AccessRequest) -> list[str]:
    roles = set(r.user.roles_at(r.device.site))
    return sorted(n for n, loc in doc.locations.items()
                  if (not loc.roles or roles & set(loc.roles)) and (not loc.users or r.user.username in loc.users)
                  and (not loc.tasks or r.task in loc.tasks))


def _break(check: str, draw, r: AccessRequest) -> tuple[AccessRequest, set[str]]:
    """`r` with `check` broken, and the checks allowed to fail with it (those a change drags along)."""
    doc, task = example().document, example().document.tasks[r.task]
    effective = r.duration or task.duration.default
    u, d, s = r.user, r.device, r.site
    way = draw(st.integers(0, 3))
    match check:
        case "account":
            if way == 3:
                return replace(r, user=replace(u, valid_until=r.at - draw(st.integers(0, 999)) * MINUTE)), {"account", "duration"}
            changed = (replace(u, disabled=True), replace(u, deleted=True),
                       replace(u, valid_from=r.at + draw(st.integers(1, 999)) * MINUTE))[way]
            return replace(r, user=changed), {"account"}
        case "site_scope":
            if way % 2:
                return replace(r, site=replace(s, name="south")), {"site_scope"}
            moved = tuple((role, "elsewhere") for role, _site in u.roles)
            return replace(r, user=replace(u, roles=moved)), {"site_scope", "task_role"}
        case "task":
            return replace(r, task=draw(st.sampled_from(("fw-push", "x", "iec104_diagnostics")))), {"task"}
        case "task_role":
            not_task = [role for role in OTHER_ROLES if role not in task.roles]
            others = tuple((role, SITE) for role in draw(st.lists(st.sampled_from(not_task), min_size=1, unique=True)))
            return replace(r, user=replace(u, roles=others)), {"task_role"}
        case "task_device_type":
            other = draw(st.sampled_from(sorted(({*doc.device_types} - set(task.device_types)) | {"gas-rtu"})))
            return replace(r, device=replace(d, device_type=other)), {"task_device_type", "protocol", "device_seen"}
        case "device_lifecycle":
            state = draw(st.sampled_from(("provisioned", "quarantined", "decommissioned", "retired", "")))
            return replace(r, device=replace(d, lifecycle=state)), {"device_lifecycle"}
        case "device_seen":
            limit = doc.device_types[d.device_type].max_silence or doc.limits.max_silence
            seen = None if way == 0 else r.at - limit - draw(st.integers(1, 10_000)) * timedelta(seconds=1)
            return replace(r, device=replace(d, last_seen=seen)), {"device_seen"}
        case "protocol":
            if way == 0:
                return replace(r, device=replace(d, addresses=())), {"protocol"}
            outside = f"10.99.{draw(st.integers(0, 255))}.{draw(st.integers(1, 254))}"
            return replace(r, device=replace(d, addresses=(outside,)), site=replace(s, lan_networks=(LAN,))), {"protocol"}
        case "change_window":
            # weeknights is open at `at`; weekend (Saturday daytime, same zone) never is then
            windows = ((), ("weekend",), ("weeknights", "no-such-window"), ("weekend", "no-such-window"))[way]
            return replace(r, site=replace(s, change_windows=windows)), {"change_window"}
        case "location":
            source = (None, "not-an-address", "198.51.100.9", "2001:db8::7")[way]
            return replace(r, source=source), {"location"}
        case "duration":
            if way % 2:
                asked = task.duration.max + draw(st.integers(1, 600)) * MINUTE
                return replace(r, duration=asked), {"duration", "change_window"}
            until = r.at + effective - draw(st.integers(1, int(effective.total_seconds()) - 1)) * timedelta(seconds=1)
            return replace(r, user=replace(u, valid_until=until)), {"duration"}
        case "concurrency":
            limit = doc.limits.concurrent_sessions_per_user
            return replace(r, user=replace(u, active_sessions=limit + draw(st.integers(0, 5)))), {"concurrency"}
    raise AssertionError(check)


def _needs(check: str) -> dict:
    """What the good request must have for `check` to be breakable at all."""
    if check == "change_window":
        return {"tasks": ("rtu-config-change", "dlms-firmware-push")}
    if check == "location":  # a location rule must apply: the task's own, or contractors' (then the task takes them)
        doc = example().document
        return {"location": True, "tasks": tuple(sorted(n for n, t in doc.tasks.items()
                                                        if _task_rules(doc, n) or "contractor" in t.roles))}
    if check == "concurrency":  # a grant is nobody's tunnel: the per-person limit does not apply to it
        return {"tasks": tuple(sorted(n for n, t in example().document.tasks.items() if not t.is_grant))}
    return {}


@SETTINGS
@given(good_requests())
def test_a_request_built_to_pass_passes(request: AccessRequest) -> None:
    decision = evaluate(example(), request)
    assert decision.outcome in (ALLOW, ALLOW_WITH_APPROVAL), decision.as_dict()
    assert {c.result for c in decision.checks} <= {"pass", "not_applicable"}
    task = example().document.tasks[request.task]
    roles_here = set(request.user.roles_at(SITE))
    contractor = request.user.kind == "contractor" or not roles_here & (set(task.roles) - {"contractor"})
    assert (decision.outcome == ALLOW_WITH_APPROVAL) == (task.approval.required or contractor)
    assert decision.approvals_required == (task.approval.approvers if decision.outcome == ALLOW_WITH_APPROVAL else 0)
    assert decision.ends_at == request.at + (request.duration or task.duration.default)
    if task.is_grant:  # a grant: the device's flows, from its first address; no engineer's access
        assert decision.grant and decision.grant_address == request.device.addresses[0] and not decision.access
    else:
        assert decision.access and all(a.address == request.device.addresses[0] for a in decision.access)


@pytest.mark.parametrize("check", CHECKS)
@settings(SETTINGS, max_examples=100)
@given(data=st.data())
def test_breaking_one_check_denies_and_names_it(check: str, data) -> None:
    good = data.draw(good_requests(**_needs(check)), label="good request")
    assert evaluate(example(), good).outcome != DENY
    broken, may_fail = _break(check, data.draw, good)
    decision = evaluate(example(), broken)
    failed = set(decision.failed)
    assert decision.outcome == DENY
    assert check in failed, decision.as_dict()["trace"]
    assert failed <= may_fail, f"breaking {check} also failed {sorted(failed - may_fail)}"
    assert decision.reason == next(c.reason for c in decision.checks if c.result == "fail")
    assert decision.ends_at is None and decision.approvals_required == 0 and not decision.access and not decision.grant


def _request_from(at_minute: int, f: dict) -> AccessRequest:
    at = datetime(2026, 1, 1, tzinfo=UTC) + at_minute * MINUTE
    t = {k: None if f[k] is None else at + f[k] * MINUTE for k in ("valid_from", "valid_until", "last_seen")}
    user = UserFacts(f["username"], kind=f["kind"], disabled=f["disabled"], deleted=f["deleted"], valid_from=t["valid_from"],
                     valid_until=t["valid_until"], roles=tuple(f["roles"]), active_sessions=f["active_sessions"])
    device = DeviceFacts("dev-1", f["device_type"], f["device_site"], addresses=tuple(f["addresses"]), lifecycle=f["lifecycle"],
                         last_seen=t["last_seen"])
    site = SiteFacts(SITE, f["timezone"], tuple(f["windows"]), f["lan"])
    duration = None if f["duration"] is None else f["duration"] * MINUTE
    return AccessRequest(user, device, site, f["task"], duration, at, f["source"])


_minutes_around = st.none() | st.integers(-3000, 3000)
# Requests with every fact drawn from small pools (names from the example policy and some it lacks), good and bad mixed.
any_requests = st.builds(_request_from, st.integers(0, 2 * 365 * 24 * 60), st.fixed_dictionaries({
    "username": st.sampled_from(("alice", "bob")), "kind": st.sampled_from(("internal", "contractor")),
    "disabled": st.booleans(), "deleted": st.booleans(),
    "valid_from": _minutes_around, "valid_until": _minutes_around, "last_seen": _minutes_around,
    "roles": st.lists(st.tuples(st.sampled_from(REQUESTING + OTHER_ROLES), st.sampled_from((SITE, "south", None))), max_size=3),
    "active_sessions": st.integers(0, 3),
    "device_type": st.sampled_from(("substation-rtu", "meter-concentrator", "der-gateway", "gas-rtu")),
    "device_site": st.sampled_from((SITE, "south")),
    "addresses": st.lists(st.sampled_from(("10.20.0.5", "10.99.0.5", "2001:db8::5")), max_size=2),
    "lifecycle": st.sampled_from(("active", "active", "quarantined", "provisioned")),
    "timezone": st.sampled_from(ZONES),
    "windows": st.lists(st.sampled_from(("weeknights", "weekend", "winter-outage-2026", "x"))),
    "lan": st.sampled_from(((), (LAN,))),
    "task": st.sampled_from(("iec104-diagnostics", "rtu-config-change", "dlms-firmware-push", "der-commissioning", "fw-push")),
    "duration": st.none() | st.integers(-5, 300),
    "source": st.sampled_from((None, "192.0.2.7", "203.0.113.5", "198.51.100.9", "nowhere", "2001:db8::1")),
}))


@settings(SETTINGS, max_examples=300)
@given(any_requests)
def test_never_allowed_while_a_check_fails(request: AccessRequest) -> None:
    decision = evaluate(example(), request)
    results = [c.result for c in decision.checks]
    assert [c.name for c in decision.checks] == list(CHECKS)
    assert set(results) <= {"pass", "fail", "not_applicable", "not_evaluated"}
    assert (decision.outcome == DENY) == ("fail" in results)
    if decision.outcome != DENY:
        assert "not_evaluated" not in results
    else:
        assert decision.reason == decision.checks[results.index("fail")].reason
    assert evaluate(example(), request).as_dict() == decision.as_dict()  # the same facts, the same decision


# ---- (b) how the policy is written does not matter -------------------------------------------------------


def rewritten(rnd: random.Random) -> dict[str, str]:
    """The example policy with every mapping and list shuffled and its entries spread over 1–4 files."""
    entries, limits = [], None
    for text in example_files().values():
        for key, value in yaml.safe_load(text).items():
            if key == "limits":
                limits = value
            elif key != "wicket_policy":
                entries += [(key, name, entry) for name, entry in value.items()]
    names = rnd.sample(["a.yaml", "b.yaml", "tasks.yaml", "z-last.yaml", "00.yaml"], rnd.randint(1, 4))
    files: dict[str, dict] = {n: {} for n in names}
    rnd.shuffle(entries)
    for section, name, entry in entries:
        files[rnd.choice(names)].setdefault(section, {})[name] = _shuffled(entry, rnd)
    files[rnd.choice(names)]["limits"] = _shuffled(limits, rnd)
    out = {}
    for name, data in files.items():
        items = [*_shuffled(data, rnd).items()]
        items.insert(rnd.randint(0, len(items)), ("wicket_policy", 1))
        out[name] = yaml.safe_dump(dict(items), sort_keys=False, default_flow_style=rnd.choice((False, None)))
    return out


def _shuffled(value, rnd: random.Random):
    # Every list in the policy format is a set (model.py), so any order must mean the same.
    if isinstance(value, dict):
        items = [(k, _shuffled(v, rnd)) for k, v in value.items()]
        rnd.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        items = [_shuffled(v, rnd) for v in value]
        rnd.shuffle(items)
        return items
    return value


@cache
def golden_requests() -> list[AccessRequest]:
    from tests.test_policy_golden import case_names, merged_facts, request

    cases = ((n, yaml.safe_load((Path(__file__).parent / "golden" / "policy" / f"{n}.yaml").read_text())) for n in case_names())
    return [request(merged_facts(n)) for n, case in cases if not case.get("policy")]


@settings(SETTINGS, max_examples=15)
@given(st.randoms(use_true_random=False))
def test_order_and_layout_change_neither_version_nor_decisions(rnd: random.Random) -> None:
    files = rewritten(rnd)
    policy = load_files(files)
    assert policy.version == example().version, files
    assert policy.canonical == example().canonical
    assert len(golden_requests()) > 30
    for r in golden_requests():
        assert evaluate(policy, r).as_dict() == evaluate(example(), r).as_dict()


# ---- (c) change windows against a brute-force reference --------------------------------------------------


def _transitions(tz: str) -> list[datetime]:
    zone, out = ZoneInfo(tz), []
    t = datetime(2026, 1, 1, tzinfo=UTC)
    before = t.astimezone(zone).utcoffset()
    while t < datetime(2028, 1, 1, tzinfo=UTC):
        t += HOUR
        if (now := t.astimezone(zone).utcoffset()) != before:
            out.append(t)
            before = now
    return out


TRANSITIONS = {tz: _transitions(tz) for tz in ZONES}
assert all(len(TRANSITIONS[tz]) == 4 for tz in ZONES[:3]) and not TRANSITIONS["UTC"]

# Strategies are built once, here: building them inside a draw costs more than the draw.
clock = st.tuples(st.integers(0, 23), st.sampled_from((0, 0, 15, 30, 45, 59))).map(lambda hm: f"{hm[0]:02d}:{hm[1]:02d}")
end_clock = st.one_of(clock, st.just("24:00"))
day_sets = st.lists(st.sampled_from(DAYS), min_size=1, max_size=7, unique=True)
weekly_rules = st.fixed_dictionaries({"days": day_sets, "start": clock, "end": end_clock}).filter(lambda r: r["start"] != r["end"])
once_shapes = st.tuples(st.integers(-3000, 3000), st.integers(1, 400), st.booleans())  # quarter hours from `at`, length, zoned
near_change = st.sampled_from([t for tz in ZONES for t in TRANSITIONS[tz]])
minutes_36h, minutes_2y = st.integers(-36 * 60, 36 * 60), st.integers(0, 2 * 365 * 24 * 60)
window_zones = st.sampled_from((None, *ZONES))


@st.composite
def instants(draw) -> datetime:
    """Mostly near a DST change (±36h) of one of the zones, otherwise anywhere in 2026–2027."""
    if draw(st.integers(0, 9)) < 7:
        base = draw(near_change) + draw(minutes_36h) * MINUTE
    else:
        base = datetime(2026, 1, 1, tzinfo=UTC) + draw(minutes_2y) * MINUTE
    return base + draw(st.sampled_from((0, 0, 1, 59))) * timedelta(seconds=1)


@st.composite
def window_sets(draw, at: datetime) -> dict[str, ChangeWindow]:
    out = {}
    for i in range(draw(st.integers(1, 3))):
        weekly = draw(st.lists(weekly_rules, max_size=3))
        once = [_once(at, *shape) for shape in draw(st.lists(once_shapes, min_size=0 if weekly else 1, max_size=2))]
        out[f"w{i}"] = ChangeWindow.model_validate({"timezone": draw(window_zones), "weekly": weekly, "once": once})
    return out


def _once(at: datetime, offset: int, length: int, zoned: bool) -> dict:
    start = at + offset * 15 * MINUTE
    end = start + length * 15 * MINUTE
    if not zoned:  # the same digits, read in the window's zone
        start, end = start.replace(tzinfo=None), end.replace(tzinfo=None)
    return {"start": start.isoformat(), "end": end.isoformat()}


@settings(SETTINGS, max_examples=300)
@given(data=st.data())
def test_windows_match_a_wall_clock_reference(data) -> None:
    at = data.draw(instants(), label="at")
    site_tz = data.draw(st.sampled_from(ZONES), label="site zone")
    windows = data.draw(window_sets(at), label="windows")
    spans = reference_openings(windows, site_tz, at)
    expected = next((o for o in spans if o[0] <= at < o[1]), None)
    found = containing(windows, site_tz, at)
    assert (found is not None) == (expected is not None), (found, expected)
    horizon = (at - timedelta(days=1), at + HORIZON)  # the implementation expands only this far
    if found is not None:
        assert found.start <= at < found.end
        if horizon[0] < expected[0] and expected[1] < horizon[1]:
            assert (found.start, found.end, set(found.windows)) == expected
    else:
        upcoming = next((o for o in spans if o[0] > at), None)
        nxt = next_opening(windows, site_tz, at)
        if upcoming is not None and upcoming[0] < horizon[1]:
            assert nxt is not None and nxt.start == upcoming[0], (nxt, upcoming)
        else:
            assert nxt is None or nxt.start > at


def reference_openings(windows: dict[str, ChangeWindow], site_tz: str, at: datetime) -> list[tuple]:
    """(start, end, names) in UTC of every opening around `at`, touching openings merged.

    Each edge is the first UTC instant whose local wall-clock reading is that edge, found by reading the
    clock at every candidate offset the zone has around it; an edge in a spring-forward gap is read with
    the offset in force before the change (as windows.py documents)."""
    spans = []
    for name, window in windows.items():
        zone = ZoneInfo(window.timezone or site_tz)
        today = at.astimezone(zone).date()
        for k in range(-3, 11):
            day = today + timedelta(days=k)
            for rule in window.weekly:
                if DAYS[day.weekday()] not in rule.days:
                    continue
                sh, sm = (int(x) for x in rule.start.split(":"))
                eh, em = (int(x) for x in rule.end.split(":"))
                begin = datetime.combine(day, time(sh, sm))
                end = datetime.combine(day, time()) + timedelta(hours=eh, minutes=em)  # "24:00" is the next midnight
                spans.append((_first_instant(zone, begin), _first_instant(zone, end if end > begin else end + timedelta(days=1)), name))
        for rule in window.once:
            spans.append(tuple(t.astimezone(UTC) if t.tzinfo else _first_instant(zone, t) for t in (rule.start, rule.end)) + (name,))
    merged: list[tuple] = []
    for start, end, name in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end), merged[-1][2] | {name})
        else:
            merged.append((start, end, {name}))
    return merged


def _first_instant(zone: ZoneInfo, wall: datetime) -> datetime:
    naive_utc = wall.replace(tzinfo=UTC)
    offsets = {(naive_utc + k * HOUR).astimezone(zone).utcoffset() for k in (-30, -15, 0, 15, 30)}
    readings = [naive_utc - o for o in offsets if (naive_utc - o).astimezone(zone).replace(tzinfo=None) == wall]
    if readings:
        return min(readings)
    before = (naive_utc - max(offsets)).astimezone(zone).utcoffset()  # just before the gap
    return naive_utc - before
