"""Authorisation matrix (acceptance check 15): every /api/v1 endpoint × every kind of caller × someone
else's object (and the caller's own, and one that does not exist).

The table below is the specification. A route the application serves but the table does not list fails
the test, so a new endpoint cannot ship without someone deciding who may call it.

Beyond the status code, every refused call is checked for side effects: no account changed, no account
event written, no step-up recorded, and the step-up code the caller sent is still unused afterwards
(refusal happens before the second factor is touched).
"""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import fastapi.routing
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from controller.models import Event

from .conftest import Harness, Person

API = "/api/v1"
SITE = "north-1"
MISSING_ID = 987_654

CALLERS = ("anon", "garbage", "forged", "engineer", "contractor", "approver", "site_admin", "soc", "admin")
PEOPLE = CALLERS[3:]  # callers with an account (the others have no identity at all)
_ = None  # not applicable: this caller has no "self" to use here

# Row key: "METHOD path" for routes that act on the caller; "METHOD path @target" where the request can
# name an object: @other = someone else's account, @self = the caller's own, @missing = no such account.
# For /auth/login, @self logs in with the caller's own credentials, @other with someone else's user name
# (and the caller's own password and code).
# fmt: off
#                                                       anon garb forg  eng  con appr sadm  soc  adm
_ROWS = {
    "POST /api/v1/auth/login @self":                    (_,   _,   _,   200, 200, 200, 200, 200, 200),
    "POST /api/v1/auth/login @other":                   (401, 401, 401, 401, 401, 401, 401, 401, 401),
    "GET /api/v1/auth/whoami":                          (401, 401, 401, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/auth/recovery-codes":                 (401, 401, 401, 200, 200, 200, 200, 200, 200),
    "POST /api/v1/auth/password":                       (401, 401, 401, 204, 204, 204, 204, 204, 204),
    "POST /api/v1/auth/logout":                         (401, 401, 401, 204, 204, 204, 204, 204, 204),
    "GET /api/v1/events":                               (401, 401, 401, 403, 403, 403, 403, 200, 200),
    "GET /api/v1/users":                                (401, 401, 401, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users":                               (401, 401, 401, 403, 403, 403, 403, 403, 201),
    "GET /api/v1/users/{user_id} @other":               (401, 401, 401, 403, 403, 403, 403, 403, 200),
    "GET /api/v1/users/{user_id} @self":                (401, 401, 401, 403, 403, 403, 403, 403, 200),
    "GET /api/v1/users/{user_id} @missing":             (401, 401, 401, 403, 403, 403, 403, 403, 404),
    "PUT /api/v1/users/{user_id}/roles @other":         (401, 401, 401, 403, 403, 403, 403, 403, 200),
    "PUT /api/v1/users/{user_id}/roles @self":          (401, 401, 401, 403, 403, 403, 403, 403, 200),
    "PUT /api/v1/users/{user_id}/roles @missing":       (401, 401, 401, 403, 403, 403, 403, 403, 404),
    "POST /api/v1/users/{user_id}/totp @other":         (401, 401, 401, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users/{user_id}/totp @self":          (401, 401, 401, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users/{user_id}/totp @missing":       (401, 401, 401, 403, 403, 403, 403, 403, 404),
    "PUT /api/v1/users/{user_id}/password @other":      (401, 401, 401, 403, 403, 403, 403, 403, 204),
    "PUT /api/v1/users/{user_id}/password @self":       (401, 401, 401, 403, 403, 403, 403, 403, 204),
    "PUT /api/v1/users/{user_id}/password @missing":    (401, 401, 401, 403, 403, 403, 403, 403, 404),
    "POST /api/v1/users/{user_id}/disable @other":      (401, 401, 401, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users/{user_id}/disable @self":       (401, 401, 401, 403, 403, 403, 403, 403, 409),
    "POST /api/v1/users/{user_id}/disable @missing":    (401, 401, 401, 403, 403, 403, 403, 403, 404),
    "POST /api/v1/users/{user_id}/enable @other":       (401, 401, 401, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users/{user_id}/enable @self":        (401, 401, 401, 403, 403, 403, 403, 403, 200),
    "POST /api/v1/users/{user_id}/enable @missing":     (401, 401, 401, 403, 403, 403, 403, 403, 404),
    "DELETE /api/v1/users/{user_id} @missing":          (401, 401, 401, 403, 403, 403, 403, 403, 404),
    "DELETE /api/v1/users/{user_id} @self":             (401, 401, 401, 403, 403, 403, 403, 403, 409),
    "DELETE /api/v1/users/{user_id} @other":            (401, 401, 401, 403, 403, 403, 403, 403, 204),
}
# fmt: on
MATRIX: dict[str, dict[str, int | None]] = {key: dict(zip(CALLERS, row, strict=True)) for key, row in _ROWS.items()}

# The routes a person uses on their own account: no path, query or body field can name anyone else.
SELF_SERVICE = {"GET /api/v1/auth/whoami", "POST /api/v1/auth/logout", "POST /api/v1/auth/recovery-codes",
                "POST /api/v1/auth/password"}
# The routes that need a fresh TOTP code (X-Wicket-TOTP) even inside a valid login.
STEP_UP = {"POST /api/v1/auth/password", "POST /api/v1/auth/recovery-codes", "POST /api/v1/users",
           "PUT /api/v1/users/{user_id}/roles", "POST /api/v1/users/{user_id}/disable",
           "POST /api/v1/users/{user_id}/enable", "DELETE /api/v1/users/{user_id}",
           "POST /api/v1/users/{user_id}/totp", "PUT /api/v1/users/{user_id}/password"}


def split_key(key: str) -> tuple[str, str]:
    route, _sep, target = key.partition(" @")
    return route, target or "self"


def api_routes(app) -> dict[str, APIRoute]:
    """Every "METHOD path" the app serves under /api/v1, with its APIRoute.

    `app.routes` is walked through FastAPI's own iterator where it has one (in recent releases an included router
    is a single entry of `app.routes`); the OpenAPI document is a second, independent listing, so that a
    route hidden from one of them still counts."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if iter_contexts is not None:
        pairs = [(c.original_route, c.path) for c in iter_contexts(app.routes)]
    else:
        pairs = [(r, getattr(r, "path", None)) for r in app.routes]
    out = {}
    for route, path in pairs:
        if isinstance(route, APIRoute) and path and path.startswith(API + "/"):
            for method in sorted(route.methods):
                out[f"{method} {path}"] = route
    for path, item in app.openapi().get("paths", {}).items():
        if path.startswith(API + "/"):
            for method in item:
                key = f"{method.upper()} {path}"
                assert key in out, f"{key} is in the OpenAPI document but not found among app.routes"
    assert f"GET {API}/auth/whoami" in out, "route discovery found nothing: has FastAPI changed its routing?"
    return out


def takes_step_up(route: APIRoute) -> bool:
    return any(p.alias == "X-Wicket-TOTP" for p in route.dependant.header_params)


# ---- the world: one account per role, plus someone whose account the others aim at ----


@dataclass
class World:
    ctl: Harness
    people: dict[str, Person] = field(default_factory=dict)
    tokens: dict[str, str | None] = field(default_factory=dict)
    victim: Person | None = None
    victim_token: str | None = None
    client: TestClient | None = None
    counter: itertools.count = field(default_factory=itertools.count)

    @classmethod
    def build(cls, ctl: Harness, roles=PEOPLE, victim_password: str | None = None) -> World:
        w = cls(ctl)
        # A client that turns a crash into a 500 (recorded as a mismatch) instead of raising.
        w.client = TestClient(ctl.app, raise_server_exceptions=False)
        until = (datetime.fromtimestamp(ctl.t, UTC) + timedelta(days=1)).isoformat()
        specs = {
            "engineer": dict(roles=[("engineer", SITE)]),
            "contractor": dict(roles=[("contractor", SITE)], kind="contractor", sponsor="eng", valid_until=until),
            "approver": dict(roles=[("approver", SITE)]),
            "site_admin": dict(roles=[("site_admin", SITE)]),
            "soc": dict(roles=[("soc", None)]),
            "admin": dict(roles=[("admin", None)]),
        }
        names = {"engineer": "eng", "contractor": "con", "approver": "appr", "site_admin": "sadm",
                 "soc": "soc", "admin": "adm2"}
        if "contractor" in roles and "engineer" not in roles:
            roles = ("engineer", *roles)  # the contractor's sponsor
        for caller in PEOPLE:
            if caller in roles:
                w.people[caller] = ctl.add_user(names[caller], **specs[caller])
        w.victim = ctl.add_user("victim", roles=[("engineer", SITE)],
                                **({"password": victim_password} if victim_password else {}))
        w.tokens = {"anon": None, "garbage": "not-a-login-token",
                    "forged": "wkt_" + secrets.token_urlsafe(32)}  # well-formed, but never issued
        for caller, person in w.people.items():
            w.tokens[caller] = ctl.login(person)
        return w

    # ---- helpers ----

    def fresh_code(self, caller: str) -> str | None:
        person = self.people.get(caller)
        return self.ctl.code(person) if person else None

    def call(self, caller: str, method: str, path: str, *, json=None, totp: str | None = None, params=None,
             token: str | None = ...):
        headers = {}
        token = self.tokens.get(caller) if token is ... else token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if totp:
            headers["X-Wicket-TOTP"] = totp
        return self.client.request(method, path, json=json, headers=headers, params=params)

    def relogin(self, caller: str) -> None:
        self.ctl.advance(30)
        self.tokens[caller] = self.ctl.login(self.people[caller])

    def last_seq(self) -> int:
        with self.ctl.app.state.auth.factory() as s:
            return s.scalar(select(func.max(Event.seq))) or 0

    def events_after(self, seq: int) -> list[Event]:
        with self.ctl.app.state.auth.factory() as s:
            return list(s.scalars(select(Event).where(Event.seq > seq).order_by(Event.seq)))

    def accounts(self) -> list[dict]:
        return [u.model_dump() for u in self.ctl.app.state.users.list()]

    def code_unused(self, caller: str, code: str) -> bool:
        """True when `code` still passes a step-up for `caller` (then it is spent, by this check)."""
        res = self.call(caller, "POST", f"{API}/auth/recovery-codes", totp=code)
        return res.status_code == 200

    def target_id(self, caller: str, target: str) -> int:
        if target == "missing":
            return MISSING_ID
        if target == "self" and caller in self.people:
            return self.people[caller].user_id
        return self.victim.user_id  # "other"; and "self" for callers without an account

    def person_by_id(self, user_id: int) -> Person | None:
        return next((p for p in [*self.people.values(), self.victim] if p.user_id == user_id), None)

    def request_for(self, route: str, caller: str, target: str) -> tuple[str, str, dict | None]:
        """Method, path and a minimal valid body for `route`, aimed at `target`."""
        method, template = route.split(" ", 1)
        path = template.replace("{user_id}", str(self.target_id(caller, target)))
        person = self.people.get(caller)
        is_admin = caller == "admin"
        n = next(self.counter)
        body = None
        if route == "POST /api/v1/auth/login":
            if target == "self":
                body = {"username": person.username, "password": person.password, "totp_code": self.fresh_code(caller)}
            else:
                body = {"username": self.victim.username, "password": person.password if person else "wrong-password-1",
                        "totp_code": self.fresh_code(caller) or "123456"}
        elif route == "POST /api/v1/auth/password":
            body = {"current_password": person.password if person else "whatever-it-was",
                    "new_password": f"new password number {n}"}
        elif route == "POST /api/v1/users":
            # non-administrators try to create an administrator; the administrator creates an engineer
            role = {"role": "engineer", "site": SITE} if is_admin else {"role": "admin", "site": None}
            body = {"username": f"made{n}", "display_name": f"Made {n}", "password": f"made password {n}!",
                    "roles": [role]}
        elif route == "PUT /api/v1/users/{user_id}/roles":
            if not is_admin:
                body = {"roles": [{"role": "admin", "site": None}]}  # an attempt to escalate
            elif target == "self":
                body = {"roles": [{"role": "admin", "site": None}]}  # unchanged: keep the admin an admin
            else:
                body = {"roles": [{"role": "engineer", "site": SITE}, {"role": "approver", "site": SITE}]}
        elif route == "PUT /api/v1/users/{user_id}/password":
            body = {"password": f"set password number {n}"}
        return method, path, body

    def after_success(self, route: str, caller: str, path: str, body: dict | None, res) -> None:
        """Keep our picture of the world true after a call that changed it."""
        if route == "POST /api/v1/auth/password":
            self.people[caller].password = body["new_password"]
        elif route == "POST /api/v1/auth/logout":
            self.relogin(caller)
        elif route == "PUT /api/v1/users/{user_id}/password":
            target = self.person_by_id(int(path.rsplit("/", 2)[-2]))
            if target is not None:
                target.password = body["password"]
        elif route == "POST /api/v1/users/{user_id}/totp":
            target = self.person_by_id(int(path.rsplit("/", 2)[-2]))
            if target is not None:
                target.secret = re.search(r"secret=([A-Z2-7]+)", res.json()["otpauth_uri"]).group(1)


@dataclass
class Mismatch:
    key: str
    caller: str
    expected: object
    got: object
    detail: str


def report(title: str, mismatches: list[Mismatch]) -> str:
    lines = [f"{title}: {len(mismatches)} mismatch(es)", ""]
    width = max(len(m.key) for m in mismatches)
    lines.append(f"  {'route':<{width}}  {'caller':<10}  {'expected':>8}  {'got':>8}  detail")
    for m in mismatches:
        lines.append(f"  {m.key:<{width}}  {m.caller:<10}  {m.expected!s:>8}  {m.got!s:>8}  {m.detail[:160]}")
    return "\n".join(lines)


def uncovered(app, table_routes: set[str]) -> tuple[set[str], set[str]]:
    served = set(api_routes(app))
    return served - table_routes, table_routes - served


# ---- the tests ----


def test_the_table_covers_every_route_and_its_step_up(ctl):
    routes = api_routes(ctl.app)
    missing, stale = uncovered(ctl.app, {split_key(k)[0] for k in MATRIX})
    assert not missing, f"routes with no row in the authorisation matrix (add them to _ROWS): {sorted(missing)}"
    assert not stale, f"matrix rows for routes the app does not serve: {sorted(stale)}"
    assert {k for k, r in routes.items() if takes_step_up(r)} == STEP_UP
    for key in SELF_SERVICE:
        assert key in routes


def test_every_route_by_every_caller(ctl):
    missing, stale = uncovered(ctl.app, {split_key(k)[0] for k in MATRIX})
    assert not missing and not stale, f"matrix out of date: missing {sorted(missing)}, stale {sorted(stale)}"
    w = World.build(ctl)
    mismatches: list[Mismatch] = []
    calls = 0
    for key, expected_by_caller in MATRIX.items():
        route, target = split_key(key)
        if route == "POST /api/v1/auth/logout":
            w.victim_token = ctl.login(w.victim)  # someone else's login, which nobody's logout may end
        for caller in CALLERS:
            expected = expected_by_caller[caller]
            if expected is None:
                continue
            ctl.advance(30)  # a fresh TOTP step: every caller with an account sends an unused code
            method, path, body = w.request_for(route, caller, target)
            code = w.fresh_code(caller)
            seq, accounts = w.last_seq(), w.accounts()
            res = w.call(caller, method, path, json=body, totp=code)
            calls += 1
            got = res.status_code
            if got != expected:
                mismatches.append(Mismatch(key, caller, expected, got, res.text))
            if 200 <= got < 300:
                w.after_success(route, caller, path, body, res)
            if got == 200 and route == "GET /api/v1/auth/whoami" and res.json()["username"] != w.people[caller].username:
                mismatches.append(Mismatch(key, caller, "own name", res.json()["username"], "whoami named someone else"))
            if route == "POST /api/v1/auth/logout" and got == 204:
                check = w.call("victim", "GET", f"{API}/auth/whoami", token=w.victim_token)
                if check.status_code != 200:
                    mismatches.append(Mismatch(key, caller, "victim on", check.status_code, "a logout ended someone else's login"))
            if expected >= 400:
                # refused: no account changed, no account event; and when refused for who is asking or
                # what is asked for (401/403/404), before the step-up: no step-up event, the code unspent
                before_step_up = expected in (401, 403, 404)
                bad = [f"{e.type}/{e.result}" for e in w.events_after(seq)
                       if e.category == "account" or (before_step_up and e.type == "step_up")]
                if bad:
                    mismatches.append(Mismatch(key, caller, "no events", "events", f"recorded {bad}"))
                if w.accounts() != accounts:
                    mismatches.append(Mismatch(key, caller, "unchanged", "changed", "a refused call changed an account"))
                if before_step_up and code is not None and not w.code_unused(caller, code):
                    mismatches.append(Mismatch(key, caller, "code unused", "spent", "a refused call consumed the step-up code"))
    assert calls > 200
    if mismatches:
        pytest.fail(report("authorisation matrix", mismatches), pytrace=False)


def test_step_up_is_required_and_single_use(ctl):
    """Admin routes with a valid login: no X-Wicket-TOTP → 401 step_up_required; a code already used → 401.
    The same for the self-service routes that change a secret, for every kind of account."""
    w = World.build(ctl)
    mismatches: list[Mismatch] = []
    for route in sorted(STEP_UP):
        admin_route = route.split(" ", 1)[1].startswith(f"{API}/users")
        for caller in ["admin"] if admin_route else PEOPLE:
            # (a reused code is a failed attempt that counts towards the throttle: a few callers suffice)
            variants = ("no header", "reused code") if caller in ("admin", "engineer", "contractor") else ("no header",)
            for variant in variants:
                ctl.advance(30)
                method, path, body = w.request_for(route, caller, "other")
                code = None
                if variant == "reused code":
                    code = w.fresh_code(caller)
                    spend = w.call(caller, "POST", f"{API}/auth/recovery-codes", totp=code)
                    assert spend.status_code == 200, spend.text
                seq, accounts = w.last_seq(), w.accounts()
                res = w.call(caller, method, path, json=body, totp=code)
                error = res.json().get("error") if res.headers.get("content-type", "").startswith("application/json") else None
                if (res.status_code, error) != (401, "step_up_required"):
                    mismatches.append(Mismatch(f"{route} [{variant}]", caller, "401 step_up_required",
                                               f"{res.status_code} {error}", res.text))
                if w.accounts() != accounts:
                    mismatches.append(Mismatch(f"{route} [{variant}]", caller, "unchanged", "changed", "account changed"))
                ok_steps = [e for e in w.events_after(seq) if e.type == "step_up" and e.result == "success"]
                if ok_steps:
                    mismatches.append(Mismatch(f"{route} [{variant}]", caller, "no step-up", "step-up", "a step-up succeeded"))
    if mismatches:
        pytest.fail(report("step-up", mismatches), pytrace=False)


def test_a_disabled_users_token_is_refused_on_every_route(ctl):
    w = World.build(ctl, roles=("engineer", "admin"))
    gone = ctl.add_user("gone", roles=[("engineer", SITE)])
    w.people["gone"] = gone
    w.tokens["gone"] = ctl.login(gone)
    ctl.advance(30)
    res = w.call("admin", "POST", f"{API}/users/{gone.user_id}/disable", totp=w.fresh_code("admin"))
    assert res.status_code == 200, res.text
    mismatches: list[Mismatch] = []
    routes = api_routes(ctl.app)
    for route in routes:
        for target in (("self", "other") if "{user_id}" in route else ("self",)):
            ctl.advance(30)
            method, path, body = w.request_for(route, "gone", target)  # a minimal valid body
            if route == "POST /api/v1/auth/login":
                # no token here: the right password and code still do not let a disabled account in
                body = {"username": gone.username, "password": gone.password, "totp_code": ctl.code(gone)}
                want = (403, "account_disabled")
            else:
                want = (401, "account_disabled")
            seq = w.last_seq()
            res = w.call("gone", method, path, json=body, totp=ctl.code(gone))
            error = res.json().get("error") if res.headers.get("content-type", "").startswith("application/json") else None
            if (res.status_code, error) != want:
                mismatches.append(Mismatch(f"{route} @{target}", "gone", f"{want[0]} {want[1]}",
                                           f"{res.status_code} {error}", res.text))
            done = [f"{e.type}/{e.result}" for e in w.events_after(seq)
                    if e.category == "account" or (e.type in ("step_up", "login") and e.result == "success")]
            if done:
                mismatches.append(Mismatch(f"{route} @{target}", "gone", "nothing done", "events", f"recorded {done}"))
    if mismatches:
        pytest.fail(report("disabled account", mismatches), pytrace=False)


def test_self_service_routes_cannot_address_someone_else(ctl):
    """whoami, logout, recovery codes and own password act on the caller and nothing names anyone else:
    no path or query parameter, a body that refuses extra fields; trying to smuggle a name in is ignored
    (query) or refused (body), and the other person is untouched."""
    routes = api_routes(ctl.app)
    for key in SELF_SERVICE:
        dep = routes[key].dependant
        assert not dep.path_params and not dep.query_params, f"{key} takes a parameter that could name someone"
        for p in dep.body_params:
            model = p.field_info.annotation
            assert model.model_config.get("extra") == "forbid", f"{key}: body accepts unknown fields"
            assert set(model.model_fields) <= {"current_password", "new_password"}, f"{key}: {set(model.model_fields)}"

    w = World.build(ctl, roles=("engineer", "admin"), victim_password="the victim's own password")
    victim = w.victim
    victim_token = ctl.login(victim)
    smuggle = {"user_id": victim.user_id, "username": victim.username, "subject": victim.username}
    for caller in ("engineer", "admin"):
        me = w.people[caller]

        res = w.call(caller, "GET", f"{API}/auth/whoami", params=smuggle)
        assert res.status_code == 200 and res.json()["username"] == me.username, res.text

        ctl.advance(30)
        seq = w.last_seq()
        res = w.call(caller, "POST", f"{API}/auth/recovery-codes", params=smuggle, json=smuggle, totp=w.fresh_code(caller))
        assert res.status_code == 200, res.text
        issued = [e.subject for e in w.events_after(seq) if e.type == "recovery_codes_issued"]
        assert issued == [me.username]

        ctl.advance(30)
        body = {"current_password": me.password, "new_password": "somebody else's new pw", **smuggle}
        res = w.call(caller, "POST", f"{API}/auth/password", params=smuggle, json=body, totp=w.fresh_code(caller))
        assert res.status_code == 422, res.text
        ctl.advance(30)  # the other person's current password does not change theirs, nor the caller's
        body = {"current_password": victim.password, "new_password": "somebody else's new pw"}
        res = w.call(caller, "POST", f"{API}/auth/password", params=smuggle, json=body, totp=w.fresh_code(caller))
        assert res.status_code == 401 and res.json()["error"] == "invalid_credentials", res.text

        res = w.call(caller, "POST", f"{API}/auth/logout", params=smuggle, json=smuggle)
        assert res.status_code == 204, res.text
        assert w.call(caller, "GET", f"{API}/auth/whoami").status_code == 401, "the caller's own login ended"
        assert w.call("victim", "GET", f"{API}/auth/whoami", token=victim_token).status_code == 200, \
            "a logout ended someone else's login"
        w.relogin(caller)

    # the victim still logs in with the old password: nobody changed it
    ctl.advance(30)
    assert ctl.login(victim)
