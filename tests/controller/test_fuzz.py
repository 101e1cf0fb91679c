"""Fuzzing the controller's API from its own OpenAPI document (acceptance check 22), with schemathesis.

For every operation the document lists, schemathesis generates requests from the schema (valid ones, and
some that break it); each is sent to the ASGI app in-process and its answer checked: no 5xx, a status code
the document lists for the operation, a body that matches the documented schema. Once as an administrator
(Authorization: Bearer), once without any login.

An administrator's request that changes something needs a fresh TOTP code (X-Wicket-TOTP). A generated
header value is never one, so each request is steered (`Run.steer`): the clock moves one TOTP step and
most step-up calls carry the admin's current code, some none, some the generated value. Path ids are
steered towards accounts that exist, login and own-password bodies sometimes towards the right
credentials, account and role bodies sometimes towards valid ones, so that the handlers' success paths
are fuzzed too, not only their refusals (the test asserts every operation answered 2xx at least once).
The administrator the run authenticates as is never the target of a change that would lock the run out
(its roles, TOTP secret, password); disabling or deleting it is allowed, as the API refuses both.

Bugs this fuzzer found (`KNOWN_BUGS`, all fixed) stay as regression tests (`test_fuzz_finding`): one
minimal request each, which must get a client error, not a crash. Should one come back, the fuzz run
tolerates only a crash that matches it exactly while its probe reproduces it, and the regression test fails.

Deterministic: Hypothesis runs derandomized, with no example database.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from .conftest import Harness

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
STEP_UP_HEADER = "X-Wicket-TOTP"
EXAMPLES = {  # per operation: (valid requests, requests that break the schema)
    "admin": (40, 15),
    "anonymous": (12, 5),
}
USER_ID_ROUTES = ("GET /api/v1/users/{user_id}", "PUT /api/v1/users/{user_id}/roles",
                  "POST /api/v1/users/{user_id}/disable", "POST /api/v1/users/{user_id}/enable",
                  "DELETE /api/v1/users/{user_id}", "POST /api/v1/users/{user_id}/totp",
                  "PUT /api/v1/users/{user_id}/password")
# What the fuzzer may point at the run's own administrator: reading it, and the two changes the API refuses.
MAY_TARGET_SELF = ("GET /api/v1/users/{user_id}", "POST /api/v1/users/{user_id}/disable", "DELETE /api/v1/users/{user_id}")


def dialect_of(ctl: Harness) -> str:
    return ctl.settings.database_url.split(":", 1)[0].split("+", 1)[0]


# ---- known bugs: found by this fuzzer, pinned by strict xfail tests ----

# The largest id the `users.id` / `events.seq` columns hold (INTEGER: int4 on PostgreSQL, int8 on SQLite).
DB_INT_LIMIT = {"postgresql": 2**31, "sqlite": 2**63}


def _ints(case) -> list[int]:
    values = [*(case.path_parameters or {}).values(), *(case.query or {}).values()]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _request_strings(case) -> list[str]:
    body = case.body if case.body is not NOT_SET else None
    return _strings([case.path_parameters or {}, case.query or {}, body])


def _beyond_db_int(case, dialect: str) -> bool:
    limit = DB_INT_LIMIT[dialect]
    return any(v >= limit or v < -limit for v in _ints(case))


def _has_nul(case, _dialect: str) -> bool:
    return any("\x00" in s for s in _request_strings(case))


def _utc_unrepresentable(case, _dialect: str) -> bool:
    """An aware date-time that exists but has no UTC equivalent (year 1 east of UTC, year 9999 west)."""
    for s in _request_strings(case):
        try:
            value = datetime.fromisoformat(s)
        except ValueError:
            continue
        if value.tzinfo is not None:
            try:
                value.astimezone(UTC)
            except OverflowError:
                return True
    return False


def _not_utf8(case, _dialect: str) -> bool:
    if not isinstance(case.body, bytes):
        return False
    try:
        case.body.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _no_crash(res) -> bool:
    return res.status_code < 500


def _documented_error(res) -> bool:
    """A status the OpenAPI document lists for every operation, with the API's error body."""
    try:
        body = res.json()
    except ValueError:
        return False
    return res.status_code in (401, 403, 404, 409, 422, 429) and isinstance(body, dict) and "error" in body


@dataclass(frozen=True)
class KnownBug:
    reason: str
    dialects: tuple[str, ...]  # where it shows (its xfail is strict there; elsewhere the probe must pass)
    operations: tuple[str, ...]
    error: str  # regular expression the crash's text (or "<status> <body>" of the answer) matches
    trigger: Callable  # (case, dialect) -> does this request carry the input that triggers it
    probe: Callable  # (ctl, client, dialect) -> response of a minimal request that shows it
    acceptable: Callable = _no_crash  # (response) -> what the probe's answer should be once fixed

    def reproduces(self, ctl: Harness) -> bool:
        client = TestClient(ctl.app, raise_server_exceptions=False)
        return not self.acceptable(self.probe(ctl, client, dialect_of(ctl)))

    def matches(self, label: str, case, dialect: str, error: str) -> bool:
        return label in self.operations and self.trigger(case, dialect) and re.search(self.error, error) is not None


def _admin_get(path: str, **params):
    def probe(ctl, client, dialect):
        ctl.advance(30)
        limit = DB_INT_LIMIT[dialect]
        return client.get(path.format(limit=limit), params={k: v.format(limit=limit) for k, v in params.items()},
                          headers=ctl.auth(ctl.admin_token()))
    return probe


def _probe_old_contractor(ctl, client, _dialect):
    body = {"username": f"probe{int(ctl.t)}", "display_name": "Probe", "password": "probe password 1!",
            "kind": "contractor", "sponsor": ctl.admin.username, "valid_from": "0001-01-01T00:00:00+05:00",
            "valid_until": "0001-01-02T00:00:00+05:00", "roles": [{"role": "contractor", "site": "north-1"}]}
    return client.post("/api/v1/users", json=body, headers=ctl.step_up_admin())


def _probe_nul_account(ctl, client, _dialect):
    body = {"username": f"probe{int(ctl.t)}", "display_name": "Pro\x00be", "password": "probe password 1!"}
    return client.post("/api/v1/users", json=body, headers=ctl.step_up_admin())


def _probe_nul_login(ctl, client, _dialect):
    return client.post("/api/v1/auth/login", json={"username": "ro\x00ot", "password": "whatever"})


def _probe_not_utf8(ctl, client, _dialect):
    return client.post("/api/v1/auth/login", content=b'{"username": "r\xefot", "password": "whatever"}',
                       headers={"Content-Type": "application/json"})


JSON_BODY_ROUTES = ("POST /api/v1/auth/login", "POST /api/v1/auth/password", "POST /api/v1/users",
                    "PUT /api/v1/users/{user_id}/roles", "PUT /api/v1/users/{user_id}/password")


KNOWN_BUGS: dict[str, KnownBug] = {
    "user-id-beyond-db-integer": KnownBug(
        "BUG: a /users/{user_id} id beyond the id column's range (≥ 2**31 on PostgreSQL, ≥ 2**63 on SQLite) "
        "reaches the database and crashes the request (500: NumericValueOutOfRange / OverflowError) instead "
        "of 404 or 422; every /users/{user_id} route",
        ("sqlite", "postgresql"), USER_ID_ROUTES,
        r"out of range|too large|Overflow", _beyond_db_int, _admin_get("/api/v1/users/{limit}")),
    "events-after-beyond-db-integer": KnownBug(
        "BUG: GET /events?after= beyond the seq column's range (≥ 2**31 on PostgreSQL, ≥ 2**63 on SQLite) "
        "crashes the request (500) instead of 200 [] or 422: `after` has ge=0 but no upper bound",
        ("sqlite", "postgresql"), ("GET /api/v1/events",),
        r"out of range|too large|Overflow", _beyond_db_int, _admin_get("/api/v1/events", after="{limit}")),
    "events-since-outside-utc": KnownBug(
        "BUG: GET /events?since=0001-01-01T00:00:00+05:00 (a valid aware date-time with no UTC equivalent) "
        "crashes in UtcDateTime.process_bind_param (OverflowError: date value out of range) → 500, not 422",
        ("sqlite", "postgresql"), ("GET /api/v1/events",),
        r"date value out of range|Overflow", _utc_unrepresentable,
        _admin_get("/api/v1/events", since="0001-01-01T00:00:00+05:00")),
    "account-validity-outside-utc": KnownBug(
        "BUG: POST /users for a contractor with valid_from/valid_until that has no UTC equivalent "
        "(0001-01-01T00:00:00+05:00, or 9999-12-31T22:00:00-05:00) passes validation and crashes on INSERT "
        "(OverflowError: date value out of range) → 500, not 422",
        ("sqlite", "postgresql"), ("POST /api/v1/users",),
        r"date value out of range|Overflow", _utc_unrepresentable, _probe_old_contractor),
    "nul-in-login-username": KnownBug(
        "BUG (PostgreSQL): POST /auth/login with a NUL character in the user name crashes (500: text fields "
        "cannot contain NUL, in the throttle lookup) instead of 401/422; an anonymous caller can do it",
        ("postgresql",), ("POST /api/v1/auth/login",), r"NUL", _has_nul, _probe_nul_login),
    "nul-in-events-subject": KnownBug(
        "BUG (PostgreSQL): GET /events?subject=a%00 crashes (500: text fields cannot contain NUL) "
        "instead of 200 [] or 422",
        ("postgresql",), ("GET /api/v1/events",), r"NUL", _has_nul,
        _admin_get("/api/v1/events", subject="a\x00")),
    "nul-in-account-fields": KnownBug(
        "BUG (PostgreSQL): POST /users with a NUL character in display_name, email or sponsor crashes "
        "(500: text fields cannot contain NUL) instead of 422 (on SQLite the NUL is stored as given)",
        ("postgresql",), ("POST /api/v1/users",), r"NUL", _has_nul, _probe_nul_account),
    "non-utf8-body-400": KnownBug(
        "BUG: a JSON body that is not UTF-8 gets FastAPI's own 400 {\"detail\": \"There was an error parsing "
        "the body\"}: a status the OpenAPI document does not list and a body without \"error\" (errors.install "
        "handles DomainError and RequestValidationError, not Starlette's HTTPException); expected 422 invalid",
        ("sqlite", "postgresql"), JSON_BODY_ROUTES, r"^400 .*error parsing the body", _not_utf8, _probe_not_utf8,
        _documented_error),
}


@pytest.mark.parametrize("bug", list(KNOWN_BUGS))
def test_fuzz_finding(ctl, bug):
    """Each bug the fuzzer found, as one minimal request: a client error is fine, a crash is not."""
    known = KNOWN_BUGS[bug]
    client = TestClient(ctl.app, raise_server_exceptions=False)
    res = known.probe(ctl, client, dialect_of(ctl))
    assert known.acceptable(res), f"{res.status_code} {res.text[:200]}"
    assert res.headers.get("content-type", "").startswith("application/json")


# ---- the fuzz run ----


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: findings are collected, not raised
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


@dataclass
class Finding:
    operation: str
    status: int | None
    what: str
    request: str


@dataclass
class Run:
    ctl: Harness
    mode: str  # "admin" | "anonymous"
    tolerate: dict[str, KnownBug] = field(default_factory=dict)
    token: str | None = None
    findings: list[Finding] = field(default_factory=list)
    tolerated: Counter = field(default_factory=Counter)
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def admin(self):
        return self.ctl.admin

    @property
    def dialect(self) -> str:
        return dialect_of(self.ctl)

    def login(self) -> None:
        self.ctl.advance(30)
        self.token = self.ctl.login(self.admin)

    def accounts(self):
        return self.ctl.app.state.users.list()

    # ---- steering a generated case ----

    def steer(self, case, data) -> None:
        label = case.operation.label
        if label == "POST /api/v1/auth/login":
            self.steer_login(case, data)
        if self.mode != "admin":
            return
        if label in USER_ID_ROUTES:
            self.steer_user_id(case, data, label)
        if STEP_UP_HEADER in case.operation.headers:
            choice = data.draw(st.sampled_from(["fresh", "fresh", "fresh", "absent", "generated"]), label="step-up")
            headers = dict(case.headers or {})
            if choice == "fresh":
                headers[STEP_UP_HEADER] = self.ctl.code(self.admin)
            elif choice == "absent":
                headers.pop(STEP_UP_HEADER, None)
            case.headers = headers
        if not isinstance(case.body, dict):
            return
        if label == "POST /api/v1/auth/password":
            if data.draw(st.booleans(), label="right current password"):
                case.body = {**case.body, "current_password": self.admin.password}
        elif label == "POST /api/v1/users":
            if data.draw(st.booleans(), label="plausible account"):
                case.body = self.plausible_account(case.body)
        elif label == "PUT /api/v1/users/{user_id}/roles" and isinstance(case.body.get("roles"), list):
            if data.draw(st.booleans(), label="plausible roles"):
                case.body = {**case.body, "roles": self.plausible_roles(case.body["roles"], contractor=False)}

    def steer_user_id(self, case, data, label: str) -> None:
        user_id = (case.path_parameters or {}).get("user_id")
        if not isinstance(user_id, int) or isinstance(user_id, bool):
            return  # a request that breaks the schema on purpose: leave it broken
        may_target_self = label in MAY_TARGET_SELF
        ids = [u.id for u in self.accounts() if not u.deleted and (may_target_self or u.id != self.admin.user_id)]
        if ids and data.draw(st.integers(0, 2), label="existing account") > 0:
            # a fixed-range draw mapped onto today's accounts: the list changes between cases, the draw must not
            user_id = ids[data.draw(st.integers(0, 63), label="account") % len(ids)]
        if user_id == self.admin.user_id and not may_target_self:
            user_id = ids[0] if ids else 10**6
        case.path_parameters = {**case.path_parameters, "user_id": user_id}

    def steer_login(self, case, data) -> None:
        if isinstance(case.body, dict) and data.draw(st.booleans(), label="right credentials"):
            body = {k: v for k, v in case.body.items() if k != "recovery_code"}
            body.update(username=self.admin.username, password=self.admin.password, totp_code=self.ctl.code(self.admin))
            case.body = body

    @staticmethod
    def plausible_roles(grants: list, *, contractor: bool) -> list[dict]:
        if contractor:
            return [{"role": "contractor", "site": "north-1"}]
        roles = {}
        for grant in grants:
            role = grant.get("role") if isinstance(grant, dict) else None
            if role is None or role == "contractor":
                continue
            site = None if role in ("admin", "soc") or grant.get("site") is None else "north-1"
            roles[(role, site)] = {"role": role, "site": site}
        return list(roles.values())

    def plausible_account(self, body: dict) -> dict:
        n = next(self.counter)
        out = {**body, "username": f"fz{n}", "password": f"fuzzed password {n}"}
        contractor = body.get("kind") == "contractor"
        if contractor:
            now = datetime.fromtimestamp(self.ctl.t, UTC)
            out.update(sponsor=self.admin.username, valid_from=None, valid_until=(now + timedelta(days=2)).isoformat())
        else:
            out.update(sponsor=None, valid_from=None, valid_until=None)
        out["roles"] = self.plausible_roles(body.get("roles") or [], contractor=contractor)
        return out

    # ---- keeping the run's own login usable ----

    def after(self, case, response) -> None:
        label = case.operation.label
        if self.mode != "admin" or not 200 <= response.status_code < 300:
            return
        if label == "POST /api/v1/auth/logout":
            self.login()
        elif label == "POST /api/v1/auth/password":
            self.admin.password = case.body["new_password"]

    # ---- one operation ----

    def fuzz(self, operation, mode: GenerationMode, max_examples: int) -> None:
        label = operation.label

        @fuzz_settings(max_examples)
        @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
        def one(case, data):
            self.ctl.advance(30)  # a fresh TOTP step for every request
            self.steer(case, data)
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            try:
                response = case.call(headers=headers)
            except Exception as exc:  # the application raised: a client would have seen a 500
                self.crashed(label, case, f"{type(exc).__name__}: {exc}")
                return
            self.statuses[label][response.status_code] += 1
            try:
                case.validate_response(response, checks=CHECKS, headers=headers)
            except FailureGroup as group:
                if self.known(label, case, f"{response.status_code} {response.text}"):
                    return
                for failure in group.exceptions:
                    self.findings.append(Finding(label, response.status_code, f"{failure.title}: {failure.message}",
                                                 describe(case)))
            self.after(case, response)

        try:
            one()
        except Unsatisfiable:
            if mode == GenerationMode.POSITIVE:
                raise  # (only a request without any parameter or body cannot be broken on purpose)

    def crashed(self, label: str, case, error: str) -> None:
        self.statuses[label][500] += 1
        if not self.known(label, case, error):
            self.findings.append(Finding(label, 500, error, describe(case)))

    def known(self, label: str, case, error: str) -> bool:
        for name, bug in self.tolerate.items():
            if bug.matches(label, case, self.dialect, error):
                self.tolerated[name] += 1
                return True
        return False


def describe(case) -> str:
    parts = [f"{case.operation.method.upper()} {case.formatted_path}"]
    if case.query:
        parts.append(f"query={case.query!r}")
    if case.headers:
        parts.append(f"headers={dict(case.headers)!r}")
    if case.body is not NOT_SET:
        parts.append(f"body={case.body!r}")
    return " ".join(parts)[:600]


def provision(ctl: Harness) -> None:
    """Accounts for the fuzzer to aim at (it creates more; it may disable and delete any of them)."""
    until = (datetime.fromtimestamp(ctl.t, UTC) + timedelta(days=3)).isoformat()
    ctl.add_user("pool.eng", roles=[("engineer", "north-1")])
    ctl.add_user("pool.appr", roles=[("approver", "north-1"), ("engineer", "south-2")])
    ctl.add_user("pool.soc", roles=[("soc", None)])
    ctl.add_user("pool.admin", roles=[("admin", None)])
    ctl.add_user("pool.ctr", roles=[("contractor", "north-1")], kind="contractor", sponsor="pool.eng", valid_until=until)
    for n in range(3):
        ctl.add_user(f"pool.e{n}", roles=[("engineer", "north-1")], enrol=n == 0)


@pytest.mark.parametrize("mode", ["admin", "anonymous"])
def test_fuzz_the_api_from_its_schema(ctl, mode):
    started = time.monotonic()
    schema = schemathesis.openapi.from_asgi("/openapi.json", ctl.app)
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) >= 16, [op.label for op in ops]
    tolerate = {name: bug for name, bug in KNOWN_BUGS.items() if bug.reproduces(ctl)}
    if mode == "admin":
        provision(ctl)
    run = Run(ctl, mode, tolerate)
    valid, broken = EXAMPLES[mode]
    for operation in ops:
        ctl.advance(ctl.settings.throttle.window_s + 1)  # no hold-off carried over from the last operation
        if mode == "admin":
            run.login()
        run.fuzz(operation, GenerationMode.POSITIVE, valid)
        run.fuzz(operation, GenerationMode.NEGATIVE, broken)

    print(f"\n[{dialect_of(ctl)}, {mode}] {sum(sum(c.values()) for c in run.statuses.values())} requests "
          f"in {time.monotonic() - started:.1f} s; known bugs tolerated: {dict(run.tolerated) or 'none'}")
    for label, counts in sorted(run.statuses.items()):
        print(f"  {label:<42} {dict(sorted(counts.items()))}")

    distinct = {}
    for f in run.findings:
        distinct.setdefault((f.operation, f.status, f.what[:50]), f)
    assert not distinct, f"{len(run.findings)} finding(s), {len(distinct)} distinct:\n" + "\n".join(
        f"  {f.operation} → {f.status}: {f.what[:400]}\n      {f.request}" for f in distinct.values())

    if mode == "admin":  # the success paths were fuzzed, not only the refusals
        never = sorted(op.label for op in ops if not any(200 <= s < 300 for s in run.statuses[op.label]))
        assert not never, f"operations that never answered 2xx: {never}"
    else:  # without a login, nothing but logging in (and the health check) gets anywhere
        open_ops = {"POST /api/v1/auth/login", "GET /healthz"}
        leaked = sorted(label for label, counts in run.statuses.items()
                        if label not in open_ops and any(200 <= s < 300 for s in counts))
        assert not leaked, f"answered 2xx without a login: {leaked}"
