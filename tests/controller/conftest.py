"""Fixtures for controller tests: every test runs on SQLite and on PostgreSQL (a fresh database each),
against an initialised controller with a clock the test moves.

  def test_x(ctl):                       # ctl: Harness
      token = ctl.login(ctl.admin)
      bob = ctl.add_user("bob", roles=[("engineer", "north-1")])
      ctl.advance(30)                    # TOTP codes are single-use per 30-s step: move on for a new one
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyotp
import pytest

from controller.app import create_app
from controller.bootstrap import init
from controller.settings import load

from ..pgscratch import scratch_database
from . import portal
from .fakenode import FakeNodes

PASSWORD = "correct horse battery staple"
REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO / "docs" / "policy-example"


def example_policy_files() -> dict[str, str]:
    """The commented example policy of docs/policy.md: three device types, seven tasks (three of them grants)."""
    return {p.name: p.read_text() for p in sorted(EXAMPLE_POLICY.glob("*.yaml"))}


@dataclass
class Person:
    username: str
    password: str
    secret: str | None
    user_id: int | None = None
    roles: list = field(default_factory=list)


def _pg_base() -> str | None:
    return os.environ.get("WICKET_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/controller.db"
        return
    base = _pg_base()
    if not base:
        pytest.skip("no PostgreSQL: set WICKET_TEST_POSTGRES_URL (`make test` starts one and sets it)")
    with scratch_database(base, "wicket_t") as url:
        yield url


class Harness:
    def __init__(self, tmp_path, db_url: str, extra_env: dict | None = None):
        env = {"WICKET_DATA_DIR": str(tmp_path / "data"), "WICKET_DATABASE_URL": db_url, "WICKET_SESSION_TICK_MS": "0",
               **(extra_env or {})}
        self.settings = load(env)
        self.t = time.time()
        result = init(self.settings, "root", "First Admin", PASSWORD)
        self.admin = Person("root", PASSWORD, _secret(result.enrolment.otpauth_uri), user_id=1, roles=[("admin", None)])
        self.nodes = FakeNodes()  # in-process stand-in for agents; the lab tests use the real one
        self.app = create_app(self.settings, clock=lambda: self.t, link=self.nodes)
        self.client = portal.shared_client(self.app)
        self._admin_token: str | None = None
        self.default_addresses: dict[str, int] = {}  # site → passports given a default address there

    # ---- time ----

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def code(self, person: Person, offset_steps: int = 0) -> str:
        return pyotp.TOTP(person.secret).at(self.t + 30 * offset_steps)

    # ---- calls ----

    def login(self, person: Person, *, code: str | None = None, expect: int = 200) -> str | None:
        res = self.client.post("/api/v1/auth/login", json={
            "username": person.username, "password": person.password, "totp_code": code or self.code(person)})
        assert res.status_code == expect, res.text
        return res.json().get("token") if res.status_code == 200 else None

    @staticmethod
    def auth(token: str, totp: str | None = None) -> dict:
        h = {"Authorization": f"Bearer {token}"}
        if totp:
            h["X-Wicket-TOTP"] = totp
        return h

    def admin_token(self) -> str:
        """The admin's login, renewed when the test's clock has let it lapse."""
        if self._admin_token is not None:
            res = self.client.get("/api/v1/auth/whoami", headers=self.auth(self._admin_token))
            if res.status_code != 200:
                self._admin_token = None
        if self._admin_token is None:
            self.advance(30)
            self._admin_token = self.login(self.admin)
        return self._admin_token

    def step_up_admin(self) -> dict:
        """Headers for an admin action: a fresh step, so the code has not been used yet."""
        token = self.admin_token()
        self.advance(30)
        return self.auth(token, self.code(self.admin))

    def add_user(self, username: str, *, roles=(("engineer", None),), kind: str = "internal", sponsor: str | None = None,
                 valid_until: str | None = None, password: str = PASSWORD, enrol: bool = True) -> Person:
        body = {"username": username, "display_name": username.title(), "password": password, "kind": kind,
                "roles": [{"role": r, "site": s} for r, s in roles]}
        if sponsor:
            body["sponsor"] = sponsor
        if valid_until:
            body["valid_until"] = valid_until
        res = self.client.post("/api/v1/users", json=body, headers=self.step_up_admin())
        assert res.status_code == 201, res.text
        person = Person(username, password, None, user_id=res.json()["id"], roles=list(roles))
        if enrol:
            res = self.client.post(f"/api/v1/users/{person.user_id}/totp", headers=self.step_up_admin())
            assert res.status_code == 200, res.text
            person.secret = _secret(res.json()["otpauth_uri"])
        return person

    def apply_policy(self, files: dict[str, str] | None = None, comment: str = "test policy") -> dict:
        """Apply policy files (default: the example policy) as the admin."""
        res = self.client.post("/api/v1/policy/apply", json={"files": files or example_policy_files(), "comment": comment},
                               headers=self.step_up_admin())
        assert res.status_code == 200, res.text
        return res.json()

    def add_site(self, name: str, **fields) -> dict:
        """A site, created by the admin. Tunnel pools are distinct per name unless given."""
        n = int(hashlib.sha256(name.encode()).hexdigest()[:4], 16) % 1000
        body = {"name": name, "display_name": name.title(), "time_zone": "UTC",
                "tunnel_pool": f"100.{64 + n // 250}.{(n % 250)}.0/24", "port_min": 51000, "port_max": 51999,
                "public_endpoint": "203.0.113.1", **fields}
        res = self.client.post("/api/v1/sites", json=body, headers=self.step_up_admin())
        assert res.status_code == 201, res.text
        return res.json()

    def add_device(self, asset_id: str, site: str, device_type: str = "substation-rtu", **fields) -> dict:
        """A passport; without `addresses`, the site's next free one from 10.20.0.17 (one address, one device per site)."""
        if "addresses" not in fields:
            n = self.default_addresses.get(site, 0)
            self.default_addresses[site] = n + 1
            fields["addresses"] = [f"10.20.{(17 + n) // 256}.{(17 + n) % 256}"]
        body = {"asset_id": asset_id, "site": site, "device_type": device_type, "lifecycle": "active", **fields}
        res = self.client.post("/api/v1/devices", json=body, headers=self.step_up_admin())
        assert res.status_code == 201, res.text
        return res.json()

    def add_agent(self, site: str, name: str) -> None:
        res = self.client.post(f"/api/v1/sites/{site}/agents", json={"name": name}, headers=self.step_up_admin())
        assert res.status_code == 201, res.text

    def tick(self):
        """One turn of the session clock (the service runs it every second; tests turn it by hand)."""
        return self.app.state.session_clock.tick()

    def events(self, **params) -> list[dict]:
        res = self.client.get("/api/v1/events", params={"limit": 1000, **params}, headers=self.auth(self.admin_token()))
        assert res.status_code == 200, res.text
        return res.json()


def _secret(uri: str) -> str:
    return re.search(r"secret=([A-Z2-7]+)", uri).group(1)


@pytest.fixture(scope="session", autouse=True)
def _one_event_loop_for_api_calls():
    yield
    portal.close()


@pytest.fixture
def ctl(tmp_path, db_url):
    harness = Harness(tmp_path, db_url)
    yield harness
    harness.app.state.engine.dispose()
