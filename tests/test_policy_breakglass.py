"""Break-glass in the policy model and the engine: the grant, the task flag, the limits, and what a
break-glass request changes (task_role, change windows, the duration cap, approval, recording) and what
it leaves alone. The golden cases tests/golden/policy/break-glass-*.yaml show whole decisions; this file
pins the rules, with properties over many requests."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import cache

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy import (
    ALLOW,
    ALLOW_WITH_APPROVAL,
    DENY,
    AccessRequest,
    DeviceFacts,
    PolicyError,
    SiteFacts,
    UserFacts,
    break_glass_tasks,
    evaluate,
    load_files,
)
from controller.policy.model import Limits
from tests.test_policy_properties import SETTINGS, SITE, any_requests, example, example_files, good_requests

AT = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)  # Tuesday 11:00 in Berlin: no change window open
MINUTE = timedelta(minutes=1)


def policy(limits: dict | None = None, every_task: bool = False, extra: str | None = None):
    """The example policy, with other limits, with every task marked break_glass (every lane task: a grant
    task is never one), or with an extra file."""
    files = example_files()
    if limits is not None or every_task:
        tasks = yaml.safe_load(files["tasks.yaml"])
        for task in tasks["tasks"].values():
            if "grant" not in task:
                task["break_glass"] = task.get("break_glass", False) or every_task
        rest = yaml.safe_load(files["windows-and-locations.yaml"])
        rest["limits"] |= limits or {}
        files |= {"tasks.yaml": yaml.safe_dump(tasks), "windows-and-locations.yaml": yaml.safe_dump(rest)}
    if extra:
        files["extra.yaml"] = extra
    return load_files(files)


def problems(files: dict[str, str]) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_files(example_files() | files)
    return caught.value.problems


def ask(task: str = "iec104-diagnostics", roles=(("break_glass", SITE),), duration: timedelta | None = None,
        break_glass: bool = True, **device) -> AccessRequest:
    user = UserFacts("alice", roles=tuple(roles))
    dev = DeviceFacts("rtu-1", device.pop("device_type", "substation-rtu"), SITE, addresses=("10.20.0.11",),
                      last_seen=AT - MINUTE, **device)
    site = SiteFacts(SITE, "Europe/Berlin", ("weeknights", "weekend"), ("10.20.0.0/24",))
    return AccessRequest(user, dev, site, task, duration, AT, "192.0.2.7", break_glass=break_glass)


def check(decision, name: str):
    return next(c for c in decision.checks if c.name == name)


# ---- the model ----------------------------------------------------------------------------------------


def test_the_defaults() -> None:
    limits = Limits()
    assert (limits.break_glass_max_duration, limits.break_glass_review_within) == (timedelta(minutes=30), timedelta(hours=24))
    doc = example().document
    assert [n for n, t in doc.tasks.items() if t.break_glass] == ["iec104-diagnostics"]  # the example marks one
    assert AccessRequest(UserFacts("a"), DeviceFacts("d", "t", "s"), SiteFacts("s"), "x", None, AT).break_glass is False


def test_writing_the_limits_defaults_out_keeps_the_version() -> None:
    written = policy(limits={"break_glass_max_duration": "30m", "break_glass_review_within": "1d"})
    assert written.version == example().version
    assert policy(limits={"break_glass_max_duration": "20m"}).version != example().version


@pytest.mark.parametrize(("key", "value", "message"), [
    ("break_glass_max_duration", "25h", "break_glass_max_duration: 1d1h is too long; at most 1d"),
    ("break_glass_review_within", "31d", "break_glass_review_within: 31d is too long; at most 30d"),
    ("break_glass_max_duration", "0m", "break_glass_max_duration: '0m' is not a positive duration"),
    ("break_glass_review_within", "soon", "break_glass_review_within: 'soon' is not a duration"),
])
def test_limits_out_of_bounds_are_refused_with_file_and_line(key: str, value: str, message: str) -> None:
    text = f"wicket_policy: 1\nlimits:\n  max_silence: 1d\n  {key}: {value}\n"
    found = problems({"windows-and-locations.yaml": example_files()["windows-and-locations.yaml"].split("\nlimits:")[0],
                      "limits.yaml": text})
    assert any(p.startswith(f"limits.yaml:4: limits.{message}") for p in found), found


def test_the_limits_may_be_as_long_as_their_bounds() -> None:
    limits = Limits.model_validate({"break_glass_max_duration": "1d", "break_glass_review_within": "30d"})
    assert limits.break_glass_review_within == timedelta(days=30)


def test_break_glass_is_a_grant_not_a_role_that_requests_tasks() -> None:
    task = ("wicket_policy: 1\ntasks:\n  bg:\n    title: T\n    protocols: [iec104]\n    device_types: [substation-rtu]\n"
            "    roles: [engineer, break_glass]\n")
    found = problems({"extra.yaml": task})
    assert found == ["extra.yaml:7: tasks.bg.roles: break_glass is not a role that requests tasks: "
                     "set `break_glass: true` on the task instead"]


def test_location_rules_may_select_the_break_glass_grant() -> None:
    rule = "wicket_policy: 1\nlocations:\n  bg:\n    roles: [break_glass]\n    networks: [192.0.2.0/24]\n"
    doc = load_files(example_files() | {"extra.yaml": rule}).document
    assert doc.locations["bg"].roles == ["break_glass"]


def test_break_glass_tasks_lists_the_tasks_for_a_device_type_sorted() -> None:
    assert break_glass_tasks(example(), "substation-rtu") == ["iec104-diagnostics"]
    assert break_glass_tasks(example(), "der-gateway") == []
    assert break_glass_tasks(example(), "no-such-type") == []
    every = policy(every_task=True)
    assert break_glass_tasks(every, "substation-rtu") == ["iec104-diagnostics", "rtu-config-change"]
    assert break_glass_tasks(every, "meter-concentrator") == ["dlms-firmware-push"]


# ---- the engine ---------------------------------------------------------------------------------------


def test_allowed_at_once_recorded_and_marked() -> None:
    decision = evaluate(example(), ask())
    assert (decision.outcome, decision.approvals_required, decision.approval_reasons) == (ALLOW, 0, ())
    assert decision.recording == "payload" != example().document.tasks["iec104-diagnostics"].recording
    assert decision.duration == 30 * MINUTE and decision.ends_at == AT + 30 * MINUTE
    assert decision.as_dict()["break_glass"] is True
    assert "review it within 1d" in decision.reason


def test_the_review_deadline_in_the_reason_follows_the_limit() -> None:
    assert "review it within 4h" in evaluate(policy(limits={"break_glass_review_within": "4h"}), ask()).reason


def test_an_ordinary_request_is_as_before_and_the_grant_alone_does_not_open_tasks() -> None:
    ordinary = evaluate(example(), ask(roles=(("engineer", SITE),), break_glass=False))
    assert ordinary.outcome == ALLOW and ordinary.recording == "metadata"
    assert "break_glass" not in ordinary.as_dict() and not ordinary.break_glass
    assert check(ordinary, "task_role").inputs == {"task_roles": ["contractor", "engineer"], "roles_at_site": ["engineer"]}
    grant_only = evaluate(example(), ask(break_glass=False))
    assert grant_only.failed == ("task_role",)
    assert grant_only.reason == "task 'iec104-diagnostics' may be requested by contractor, engineer; your roles at north are: break_glass"


@pytest.mark.parametrize(("roles", "task", "reason"), [
    ((("engineer", SITE),), "iec104-diagnostics", "you hold no break-glass grant at site north"),
    ((("engineer", SITE), ("break_glass", "south")), "iec104-diagnostics", "you hold no break-glass grant at site north"),
    ((("break_glass", SITE),), "rtu-config-change", "task 'rtu-config-change' may not be used under break-glass"),
    ((("engineer", SITE),), "rtu-config-change",
     "you hold no break-glass grant at site north; task 'rtu-config-change' may not be used under break-glass"),
])
def test_task_role_says_what_is_missing(roles, task, reason) -> None:
    decision = evaluate(example(), ask(task=task, roles=roles))
    assert decision.outcome == DENY and decision.failed == ("task_role",)
    assert decision.reason == reason
    assert decision.recording == "payload" and decision.as_dict()["break_glass"] is True


def test_a_grant_for_every_site_counts() -> None:
    assert evaluate(example(), ask(roles=(("break_glass", None),))).outcome == ALLOW


def test_change_windows_do_not_apply_and_approval_is_not_needed() -> None:
    every = policy(every_task=True)
    ordinary = evaluate(every, ask(task="rtu-config-change", roles=(("engineer", SITE),), break_glass=False))
    assert set(ordinary.failed) == {"change_window"}  # closed on a Tuesday morning
    decision = evaluate(every, ask(task="rtu-config-change", duration=20 * MINUTE))
    assert (decision.outcome, decision.approvals_required) == (ALLOW, 0)
    window = check(decision, "change_window")
    assert (window.result, window.reason) == ("not_applicable", "break-glass ignores change windows")
    assert window.inputs["required"] is True


@pytest.mark.parametrize(("cap", "task", "asked", "most", "given"), [
    ("30m", "iec104-diagnostics", None, "30m", "30m"),     # task max 1h, default 30m
    ("2h", "iec104-diagnostics", None, "1h", "30m"),       # the task's max is the shorter
    ("10m", "iec104-diagnostics", None, "10m", "10m"),     # the default is cut to the cap
    ("45m", "rtu-config-change", None, "45m", "45m"),      # task default 45m, max 2h
    ("20m", "rtu-config-change", 20 * MINUTE, "20m", "20m"),
])
def test_the_longest_session_is_the_shorter_of_task_max_and_cap(cap, task, asked, most, given) -> None:
    decision = evaluate(policy(limits={"break_glass_max_duration": cap}, every_task=True), ask(task=task, duration=asked))
    duration = check(decision, "duration")
    assert decision.outcome == ALLOW, decision.reason
    assert duration.inputs["max"] == most and duration.inputs["break_glass_max"] == cap
    assert decision.as_dict()["duration"] == given


def test_asking_beyond_the_cap_is_refused_by_the_duration_check() -> None:
    decision = evaluate(example(), ask(duration=31 * MINUTE))
    assert decision.failed == ("duration",)
    assert decision.reason == "31m asked; task 'iec104-diagnostics' allows at most 30m under break-glass"
    assert evaluate(example(), ask(roles=(("engineer", SITE),), duration=31 * MINUTE, break_glass=False)).outcome == ALLOW


def test_the_other_checks_still_deny() -> None:
    assert evaluate(example(), ask(lifecycle="quarantined")).failed == ("device_lifecycle",)
    assert evaluate(example(), ask(device_type="der-gateway")).failed == ("task_device_type", "protocol")
    rule = "wicket_policy: 1\nlocations:\n  bg:\n    roles: [break_glass]\n    networks: [198.51.100.0/24]\n"
    assert evaluate(policy(extra=rule), ask()).failed == ("location",)


# ---- properties ---------------------------------------------------------------------------------------


@cache
def policies() -> tuple:
    """The example, every task break-glass capable with caps below, between and above the tasks' maxima."""
    return (example(), *(policy(limits={"break_glass_max_duration": cap}, every_task=True) for cap in ("10m", "30m", "90m", "1d")))


roles = st.lists(st.tuples(st.sampled_from(("engineer", "contractor", "approver", "break_glass")),
                           st.sampled_from((SITE, "south", None))), max_size=3)


@settings(SETTINGS, max_examples=400)
@given(st.one_of(any_requests, good_requests()), roles, st.booleans(), st.integers(0, 4))
def test_break_glass_never_needs_approval_never_runs_long_never_allows_without_the_grant(r, held, keep, which) -> None:
    # Good requests keep their roles (and so often pass); random ones mostly fail somewhere.
    p = policies()[which]
    r = replace(r, break_glass=True, user=replace(r.user, roles=(*r.user.roles, *held) if keep else tuple(held)))
    decision = evaluate(p, r)
    assert decision.outcome != ALLOW_WITH_APPROVAL
    assert decision.approvals_required == 0 and decision.approval_reasons == ()
    assert decision.as_dict()["break_glass"] is True
    task = p.document.tasks.get(r.task)
    assert decision.recording == (None if task is None else "payload")
    if decision.outcome == ALLOW:
        cap = min(task.duration.max, p.document.limits.break_glass_max_duration)
        assert decision.duration <= cap and decision.ends_at - r.at <= cap
        assert "break_glass" in r.user.roles_at(r.device.site)
        assert task.break_glass


@settings(SETTINGS, max_examples=150)
@given(good_requests(tasks=("iec104-diagnostics",)), st.sampled_from((SITE, None)))
def test_a_good_request_under_break_glass_needs_the_grant_and_a_short_enough_session(r, where) -> None:
    """Only the grant, the account kind and the 30m cap decide: the request passes everything else already."""
    short = (r.duration or timedelta(minutes=30)) <= timedelta(minutes=30)
    if r.user.kind == "contractor":
        assert evaluate(example(), replace(r, break_glass=True)).outcome == DENY
        return
    granted = replace(r, break_glass=True, user=replace(r.user, roles=(*r.user.roles, ("break_glass", where))))
    decision = evaluate(example(), granted)
    assert decision.outcome == (ALLOW if short else DENY), decision.as_dict()
    assert decision.failed == (() if short else ("duration",))
    ungranted = evaluate(example(), replace(r, break_glass=True))
    assert ungranted.outcome == DENY
    assert ungranted.failed == (("task_role",) if short else ("task_role", "duration"))


def test_a_contractor_account_cannot_use_break_glass_even_with_the_grant() -> None:
    request = ask()
    contractor = replace(request, user=replace(request.user, kind="contractor"))
    assert evaluate(example(), request).outcome == ALLOW
    decision = evaluate(example(), contractor)
    assert decision.outcome == DENY
    assert check(decision, "task_role").reason.startswith("contractor accounts cannot use break-glass")
