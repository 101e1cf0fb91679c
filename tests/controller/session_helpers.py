"""Shared set-up and calls for the session tests.

  w = world(ctl)                                    # example policy, site north-1, its agent, three devices, people
  s = request(ctl, w.erin, RTU, "iec104-diagnostics")   # → the SessionOut JSON; active at once under the example policy
  approve(ctl, w.alex, sid); activate(ctl, w.erin, sid); close(ctl, w.erin, sid)
  lane(ctl, sid)                                    # the lane the fake node holds for the session, or None

Every call takes `expect` (the HTTP status the test wants) and asserts it, and returns the parsed JSON
(or the response, for a config download). Calls that need a step-up send a fresh TOTP code; logins and
step-ups move the test's clock on by 30 s each (helpers.headers), so a test that times things reads
`ctl.t` after its set-up, not before.
"""

from __future__ import annotations

from datetime import UTC, datetime

from .conftest import Person, example_policy_files
from .helpers import API, headers, iso

SITE = "north-1"
NODE = "edge-north-1"
POOL = "100.64.9.0/24"  # north-1's tunnel pool
RTU, METER, DER = "RTU-17", "MC-1", "DER-1"
ADDRESSES = {RTU: "10.20.0.17", METER: "10.20.0.18", DER: "10.20.0.19"}
DIAG = "iec104-diagnostics"  # no approval, 30m by default, at most 1h; extensions: 2, 30m in all
TWO_PERSON = "rtu-two-person"  # in TEST_TASKS: two approvers, no change window, extensions re-approved

# A policy file added to the example one: a task that needs two approvers but no change window and no
# particular source network (the example's rtu-config-change needs both, which a test client cannot give).
TEST_TASKS = """\
wicket_policy: 1
tasks:
  rtu-two-person:
    title: Two-person IEC-104 work (tests)
    protocols: [iec104]
    device_types: [substation-rtu]
    roles: [engineer]
    duration: {default: 30m, max: 1h}
    approval: {required: true, approvers: 2}
    extensions: {reason_codes: [work-overrun], max_count: 1, max_total: 30m, reapproval: true}
"""


def policy_files(**extra: str) -> dict[str, str]:
    """The example policy plus TEST_TASKS, plus any files given (name → text)."""
    return {**example_policy_files(), "sessions-test.yaml": TEST_TASKS, **extra}


# The people of `world()`: name → (roles, other add_user arguments).
PEOPLE = {
    "erin": ([("engineer", SITE)], {}),
    "eve": ([("engineer", SITE)], {}),  # a second engineer
    "alex": ([("approver", SITE)], {}),
    "ana": ([("approver", SITE)], {}),  # a second approver
    "sam": ([("soc", None)], {}),
    "carl": ([("contractor", SITE)], {"kind": "contractor", "sponsor": "erin"}),  # valid for 90 days
    "bea": ([("engineer", SITE), ("break_glass", SITE)], {}),  # an engineer with a break-glass grant
}


class World:
    """The people of a test, by first name: `w.erin`… (see PEOPLE); `w.root` is the first admin.

    Each person is made on first use: an account costs a password hash, and most tests need three or
    four people. Making one moves the test's clock on by a minute (the admin's step-ups)."""

    def __init__(self, ctl):
        self._ctl = ctl
        self._made: dict[str, Person] = {"root": ctl.admin}

    def __getattr__(self, name: str) -> Person:
        if name.startswith("_") or (name not in PEOPLE and name != "root"):
            raise AttributeError(name)
        if name not in self._made:
            if name == "carl":
                self.erin  # noqa: B018 -- the sponsor must exist first
            roles, extra = PEOPLE[name]
            if extra.get("kind") == "contractor":
                extra = {**extra, "valid_until": iso(self._ctl.t + 90 * 86400)}
            self._made[name] = self._ctl.add_user(name, roles=roles, **extra)
        return self._made[name]


def world(ctl, files: dict[str, str] | None = None) -> World:
    """Policy (default: `policy_files()`), site north-1 with agent edge-north-1, devices RTU-17
    (substation-rtu), MC-1 (meter-concentrator) and DER-1 (der-gateway) seen now, and the people of PEOPLE."""
    ctl.apply_policy(files or policy_files())
    ctl.add_site(SITE, tunnel_pool=POOL)
    ctl.add_agent(SITE, NODE)
    for asset, device_type in ((RTU, "substation-rtu"), (METER, "meter-concentrator"), (DER, "der-gateway")):
        ctl.add_device(asset, SITE, device_type=device_type, addresses=[ADDRESSES[asset]], last_seen=iso(ctl.t))
    return World(ctl)


def grant(ctl, person: Person, role: str, site: str | None) -> None:
    """Add a role grant to `person`'s roles (the admin sets the whole list)."""
    roles = [*person.roles, (role, site)]
    body = {"roles": [{"role": r, "site": s} for r, s in roles]}
    res = ctl.client.put(f"{API}/users/{person.user_id}/roles", json=body, headers=ctl.step_up_admin())
    assert res.status_code == 200, res.text
    person.roles = roles


def seen_now(ctl, *assets: str) -> None:
    """Mark devices as seen at the test's current time (the policy refuses devices silent too long)."""
    for asset in assets or (RTU, METER, DER):
        res = ctl.client.patch(f"{API}/devices/{asset}", json={"last_seen": iso(ctl.t)}, headers=ctl.step_up_admin())
        assert res.status_code == 200, res.text


# ---- calls ----


def _check(res, expect: int):
    assert res.status_code == expect, f"{res.request.method} {res.request.url.path}: {res.status_code} {res.text}"
    return res.json() if res.headers.get("content-type", "").startswith("application/json") else res


def request(ctl, person: Person, device: str, task: str, *, duration: str | None = None, reason: str = "work order WO-4711",
            public_key: str | None = None, activate: bool = True, expect: int = 201) -> dict:
    body = {"device": device, "task": task, "reason": reason, "activate": activate}
    if duration:
        body["duration"] = duration
    if public_key:
        body["public_key"] = public_key
    return _check(ctl.client.post(f"{API}/sessions", json=body, headers=headers(ctl, person, step_up=True)), expect)


def break_glass(ctl, person: Person, device: str, task: str = DIAG, *, incident: str = "INC-1001",
                duration: str | None = None, reason: str = "feeder trip, control room blind", expect: int = 201) -> dict:
    body = {"device": device, "task": task, "reason": reason, "incident": incident}
    if duration:
        body["duration"] = duration
    return _check(ctl.client.post(f"{API}/break-glass", json=body, headers=headers(ctl, person, step_up=True)), expect)


def get(ctl, person: Person, sid: str, expect: int = 200) -> dict:
    return _check(ctl.client.get(f"{API}/sessions/{sid}", headers=headers(ctl, person)), expect)


def approve(ctl, person: Person, sid: str, reason: str = "checked the work order", expect: int = 200) -> dict:
    return _check(ctl.client.post(f"{API}/sessions/{sid}/approve", json={"reason": reason},
                                  headers=headers(ctl, person, step_up=True)), expect)


def reject(ctl, person: Person, sid: str, reason: str = "no work order for this", expect: int = 200) -> dict:
    return _check(ctl.client.post(f"{API}/sessions/{sid}/reject", json={"reason": reason}, headers=headers(ctl, person)), expect)


def activate(ctl, person: Person, sid: str, public_key: str | None = None, expect: int = 200) -> dict:
    body = {"public_key": public_key} if public_key else {}
    return _check(ctl.client.post(f"{API}/sessions/{sid}/activate", json=body, headers=headers(ctl, person, step_up=True)), expect)


def config(ctl, person: Person, sid: str, fmt: str = "conf", expect: int = 200):
    """The download's response (its text, bytes and content type); JSON for an error."""
    res = ctl.client.get(f"{API}/sessions/{sid}/config", params={"format": fmt}, headers=headers(ctl, person))
    assert res.status_code == expect, f"config {sid}: {res.status_code} {res.text[:300]}"
    return res


def extend(ctl, person: Person, sid: str, by: str = "15m", reason_code: str = "fault-still-open", note: str = "",
           expect: int = 200) -> dict:
    return _check(ctl.client.post(f"{API}/sessions/{sid}/extend", json={"by": by, "reason_code": reason_code, "note": note},
                                  headers=headers(ctl, person, step_up=True)), expect)


def close(ctl, person: Person, sid: str, reason: str | None = None, expect: int = 200) -> dict:
    return _check(ctl.client.post(f"{API}/sessions/{sid}/close", json={"reason": reason} if reason else None,
                                  headers=headers(ctl, person)), expect)


def revoke(ctl, person: Person, sid: str, reason: str = "suspicious traffic", expect: int = 200) -> dict:
    return _check(ctl.client.post(f"{API}/sessions/{sid}/revoke", json={"reason": reason}, headers=headers(ctl, person)), expect)


def review(ctl, person: Person, sid: str, note: str = "matches the incident log", expect: int = 200) -> dict:
    return _check(ctl.client.post(f"{API}/sessions/{sid}/review", json={"note": note},
                                  headers=headers(ctl, person, step_up=True)), expect)


def queue(ctl, person: Person) -> list[dict]:
    return _check(ctl.client.get(f"{API}/approvals", headers=headers(ctl, person)), 200)


def access(ctl, person: Person, device: str, start: float, end: float, expect: int = 200) -> list[dict]:
    return _check(ctl.client.get(f"{API}/devices/{device}/access", params={"from": iso(start), "to": iso(end)},
                                 headers=headers(ctl, person)), expect)


def disable(ctl, person: Person) -> None:
    res = ctl.client.post(f"{API}/users/{person.user_id}/disable", headers=ctl.step_up_admin())
    assert res.status_code == 200, res.text


# ---- what happened ----


def events_of(ctl, sid: str, type_: str | None = None) -> list[dict]:
    """The audit events about session `sid` (optionally of one type), oldest first."""
    found = ctl.events(subject=sid)
    return [e for e in found if type_ is None or e["type"] == type_]


def lane(ctl, sid: str, node: str = NODE):
    """The lane the (fake) node was last handed for `sid`, or None."""
    desired = ctl.nodes.desired.get(node)
    return next((x for x in desired.lanes if x.session_id == sid), None) if desired else None


def generation(ctl, node: str = NODE) -> int:
    desired = ctl.nodes.desired.get(node)
    return desired.generation if desired else -1


def at(value: str) -> float:
    """A Unix time from the API's RFC 3339 text."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).timestamp()
