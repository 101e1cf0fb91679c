"""Golden tests for the policy engine: every case in tests/golden/policy/ is one request's facts and,
beside it, the decision the engine must give. The expected files are the spec, read by people.

  NAME.yaml   the case: `description`, optional `policy`, and the facts it changes from base.facts.yaml
  NAME.json   `Decision.as_dict()` for it, pretty-printed with sorted keys

After an intended change of the engine or of docs/policy-example/, rewrite the expected files with
    WICKET_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_policy_golden.py
and read every rewritten file (`git diff tests/golden/policy/`) before keeping it.

Case files, key by key:
  description   what the case pins, in a sentence or two
  policy        optional: {files: {NAME: TEXT, …}, only: false}. Without it the example policy in
                docs/policy-example/ is used; `files` are added to it (a name it already has is replaced);
                `only: true` uses just these files.
  at, task, duration, source, break_glass, user, site, device
                facts, merged over base.facts.yaml (mappings merge key by key; lists and scalars replace).
  Times are ISO 8601 with a zone, or relative to `at`: "25h ago", "in 20m". Durations as in policy
  files ("45m"), or an integer number of seconds. Roles are "role@site", or "role@*" for every site.
"""

from __future__ import annotations

import difflib
import json
import os
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path

import pytest
import yaml

from controller.policy import CHECKS, AccessRequest, DeviceFacts, SiteFacts, UserFacts, evaluate, load_files
from controller.policy.durations import parse_duration

CASES = Path(__file__).parent / "golden" / "policy"
EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "policy-example"
BASE = "base.facts.yaml"
UPDATE = os.environ.get("WICKET_UPDATE_GOLDEN") == "1"

# Checks that may honestly say "nothing to check here"; each must be seen doing so in some case.
MAY_BE_NOT_APPLICABLE = ("device_seen", "change_window", "location")


def case_names() -> list[str]:
    return sorted(p.stem for p in CASES.glob("*.yaml") if p.name != BASE)


# ---- the golden comparison -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", case_names())
def test_case(name: str) -> None:
    actual = render(decide(name))
    path = CASES / f"{name}.json"
    if UPDATE:
        if not path.exists() or path.read_text() != actual:
            path.write_text(actual)
            pytest.skip(f"rewrote {path.name}: read it before keeping it")
        return
    assert path.exists(), f"{path} is missing: run with WICKET_UPDATE_GOLDEN=1, then read it"
    expected = path.read_text()
    if actual != expected:
        diff = difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                    f"{name}.json (expected)", f"{name}.json (engine)")
        pytest.fail(f"the decision for {name} differs from its golden file:\n" + "".join(diff), pytrace=False)


def test_every_check_is_seen_passing_and_failing() -> None:
    """So that coverage cannot shrink silently when a case is deleted or rewritten."""
    seen: dict[str, set[str]] = {c: set() for c in CHECKS}
    outcomes, approvers = set(), set()
    for name in case_names():
        expected = json.loads((CASES / f"{name}.json").read_text())
        outcomes.add(expected["outcome"])
        approvers.add(expected["approvals_required"])
        for entry in expected["trace"]:
            seen[entry["check"]].add(entry["result"])
    missing = [f"{c}: {r}" for c in CHECKS for r in ("fail",) if r not in seen[c]]
    missing += [f"{c}: pass" for c in CHECKS if not seen[c] & {"pass", "not_applicable"}]
    missing += [f"{c}: not_applicable" for c in MAY_BE_NOT_APPLICABLE if "not_applicable" not in seen[c]]
    assert not missing, "no golden case shows " + "; ".join(missing)
    assert outcomes == {"allow", "allow_with_approval", "deny"}
    assert {0, 1, 2} <= approvers, "cases should show no approval, one approver and two approvers"


def test_every_case_has_its_pair_and_says_what_it_is_for() -> None:
    stems = {p.stem for p in CASES.glob("*.json")}
    assert stems == set(case_names()), "each NAME.yaml needs a NAME.json beside it, and no JSON without its case"
    for name in case_names():
        case = yaml.safe_load((CASES / f"{name}.yaml").read_text())
        assert str(case.get("description", "")).strip(), f"{name}.yaml needs a description"
        unknown = set(case) - {"description", "policy", "at", "task", "duration", "source", "break_glass", "user", "site", "device"}
        assert not unknown, f"{name}.yaml: unknown keys {sorted(unknown)}"


def test_zero_duration_is_reported_as_asked() -> None:
    facts = merged_facts("allow-engineer-basic") | {"duration": 0}
    decision = evaluate(policy_for({}), request(facts))
    duration = next(c for c in decision.checks if c.name == "duration")
    assert decision.outcome == "deny" and duration.result == "fail"
    assert duration.inputs["requested"] == "0s"
    assert decision.duration == timedelta(0)


def test_a_device_seen_this_instant_reads_well() -> None:
    facts = merged_facts("allow-engineer-basic")
    facts = facts | {"device": facts["device"] | {"last_seen": facts["at"]}}
    seen = next(c for c in evaluate(policy_for({}), request(facts)).checks if c.name == "device_seen")
    assert seen.result == "pass"
    assert seen.reason == "last seen just now"


# ---- cases → requests --------------------------------------------------------------------------------------


def decide(name: str):
    case = yaml.safe_load((CASES / f"{name}.yaml").read_text())
    return evaluate(policy_for(case.get("policy") or {}), request(merged_facts(name)))


def render(decision) -> str:
    return json.dumps(decision.as_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def merged_facts(name: str) -> dict:
    base = yaml.safe_load((CASES / BASE).read_text())
    case = yaml.safe_load((CASES / f"{name}.yaml").read_text())
    return _merge(base, {k: v for k, v in case.items() if k not in ("description", "policy")})


def policy_for(spec: dict):
    files = dict(spec.get("files") or {})
    return _load(tuple(sorted(files.items())), bool(spec.get("only")))


@cache
def _load(extra: tuple[tuple[str, str], ...], only: bool):
    files = {} if only else {p.name: p.read_text() for p in sorted(EXAMPLE.glob("*.yaml"))}
    return load_files(files | dict(extra))


def request(facts: dict) -> AccessRequest:
    at = _time(facts["at"], None)
    u, s, d = facts["user"], facts["site"], facts["device"]
    user = UserFacts(
        username=u["username"], kind=u["kind"], disabled=u["disabled"], deleted=u["deleted"],
        valid_from=_time(u["valid_from"], at), valid_until=_time(u["valid_until"], at),
        roles=tuple(_role(r) for r in u["roles"]), active_sessions=u["active_sessions"],
    )
    site = SiteFacts(name=s["name"], timezone=s["timezone"], change_windows=tuple(s["change_windows"]),
                     lan_networks=tuple(s["lan_networks"]))
    device = DeviceFacts(asset_id=d["asset_id"], device_type=d["device_type"], site=d["site"],
                         addresses=tuple(d["addresses"]), lifecycle=d["lifecycle"],
                         last_seen=_time(d["last_seen"], at), ports=tuple(sorted((d["ports"] or {}).items())))
    return AccessRequest(user=user, device=device, site=site, task=facts["task"], duration=_duration(facts["duration"]),
                         at=at, source=facts["source"], break_glass=facts["break_glass"])


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _time(value, at: datetime | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value.endswith(" ago"):
        return at - parse_duration(value.removesuffix(" ago"))
    elif isinstance(value, str) and value.startswith("in "):
        return at + parse_duration(value.removeprefix("in "))
    else:
        parsed = datetime.fromisoformat(str(value))
    assert parsed.tzinfo is not None, f"{value!r}: give times with a zone (…Z or +01:00)"
    return parsed


def _duration(value) -> timedelta | None:
    if value is None:
        return None
    if isinstance(value, int):
        return timedelta(seconds=value)
    return parse_duration(value)


def _role(text: str) -> tuple[str, str | None]:
    role, _, site = text.partition("@")
    assert site, f"{text!r}: write roles as role@site or role@*"
    return role, None if site == "*" else site
