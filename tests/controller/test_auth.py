"""Authentication, on SQLite and PostgreSQL: TOTP replay (also under concurrency), passwords, refusals
with reasons and events, throttling, step-up, cookies, and secrets kept out of logs."""

from __future__ import annotations

import logging
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from sqlalchemy import select

from controller.models import User
from controller.settings import SettingsError, load
from tests.controller.conftest import PASSWORD, Harness


def login_body(person, code=None, **extra):
    return {"username": person.username, "password": person.password, "totp_code": code, **extra}


class Server:
    """The app on a real socket, for real concurrency."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


# ---- TOTP ----


def test_the_same_code_sent_50_times_at_once_succeeds_once(ctl):
    bob = ctl.add_user("bob")
    code = ctl.code(bob)
    with Server(ctl.app) as url:
        with ThreadPoolExecutor(50) as pool, httpx.Client(base_url=url, timeout=60) as client:
            barrier = threading.Barrier(50)

            def attempt(_):
                barrier.wait()
                return client.post("/api/v1/auth/login", json=login_body(bob, code)).status_code

            statuses = list(pool.map(attempt, range(50)))
    assert statuses.count(200) == 1, statuses
    assert set(statuses) <= {200, 401, 429}
    reused = [e for e in ctl.events(subject="bob") if e["type"] == "login" and e["reason"] == "code_reused"]
    assert reused, "replays are recorded"


def test_totp_window_is_one_step_either_side(ctl):
    bob = ctl.add_user("bob")
    assert ctl.login(bob, code=ctl.code(bob, offset_steps=-2), expect=401) is None
    assert ctl.login(bob, code=ctl.code(bob, offset_steps=+2), expect=401) is None
    assert ctl.login(bob, code=ctl.code(bob, offset_steps=-1))
    ctl.advance(90)
    assert ctl.login(bob, code=ctl.code(bob, offset_steps=+1))


def test_an_accepted_step_is_never_accepted_again(ctl):
    bob = ctl.add_user("bob")
    code = ctl.code(bob)
    assert ctl.login(bob, code=code)
    ctl.advance(25)  # still inside the window: the code would match, but it was used
    res = ctl.client.post("/api/v1/auth/login", json=login_body(bob, code))
    assert res.status_code == 401 and res.json()["error"] == "code_reused"


def test_a_recovery_code_works_once(ctl):
    bob = ctl.add_user("bob")
    token = ctl.login(bob)
    ctl.advance(30)
    res = ctl.client.post("/api/v1/auth/recovery-codes", headers=ctl.auth(token, ctl.code(bob)))
    assert res.status_code == 200
    codes = res.json()["codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    body = {"username": "bob", "password": PASSWORD, "recovery_code": codes[3]}
    assert ctl.client.post("/api/v1/auth/login", json=body).status_code == 200
    assert ctl.client.post("/api/v1/auth/login", json=body).status_code == 401
    assert ctl.client.post("/api/v1/auth/login", json={**body, "recovery_code": codes[4]}).status_code == 200


def test_new_recovery_codes_replace_the_old_ones(ctl):
    bob = ctl.add_user("bob")
    token = ctl.login(bob)
    ctl.advance(30)
    old = ctl.client.post("/api/v1/auth/recovery-codes", headers=ctl.auth(token, ctl.code(bob))).json()["codes"]
    ctl.advance(30)
    ctl.client.post("/api/v1/auth/recovery-codes", headers=ctl.auth(token, ctl.code(bob)))
    res = ctl.client.post("/api/v1/auth/login", json={"username": "bob", "password": PASSWORD, "recovery_code": old[0]})
    assert res.status_code == 401


# ---- passwords ----


def test_passwords_are_argon2id_with_at_least_the_floor_parameters(ctl):
    ctl.add_user("bob")
    with ctl.app.state.auth.factory() as s:
        hashes = [u.password_hash for u in s.scalars(select(User))]
    assert hashes and all(h.startswith("$argon2id$v=19$m=19456,t=2,p=1$") for h in hashes), hashes
    assert all(PASSWORD not in h for h in hashes)


def test_stronger_parameters_rehash_at_the_next_login(tmp_path, db_url):
    ctl = Harness(tmp_path, db_url)
    bob = ctl.add_user("bob")
    ctl.app.state.engine.dispose()
    stronger = Harness.__new__(Harness)
    stronger.__dict__.update(ctl.__dict__)
    from controller.app import create_app

    settings = load({"WICKET_DATA_DIR": str(tmp_path / "data"), "WICKET_DATABASE_URL": db_url, "WICKET_ARGON2_TIME_COST": "3",
                     "WICKET_ARGON2_MEMORY_KIB": str(32 * 1024)})
    stronger.settings, stronger.app = settings, create_app(settings, clock=lambda: stronger.t)
    from fastapi.testclient import TestClient

    stronger.client = TestClient(stronger.app)
    stronger.advance(60)
    assert stronger.login(bob)
    with stronger.app.state.auth.factory() as s:
        stored = s.scalar(select(User).where(User.username == "bob")).password_hash
    assert stored.startswith("$argon2id$v=19$m=32768,t=3,p=1$")
    assert any(e["type"] == "password_rehashed" and e["subject"] == "bob" for e in stronger.events())
    stronger.app.state.engine.dispose()


def test_weak_argon2_settings_are_refused():
    with pytest.raises(SettingsError, match="below the minimum"):
        load({"WICKET_DATA_DIR": "/tmp/x", "WICKET_ARGON2_MEMORY_KIB": "8192"})


# ---- refusals: clear reason to the client, and an event ----


def test_expired_contractor_is_refused_with_a_reason(ctl):
    ctl.add_user("sam", roles=[("engineer", None)])
    from datetime import UTC, datetime, timedelta

    until = (datetime.fromtimestamp(ctl.t, UTC) + timedelta(hours=1)).isoformat()
    carol = ctl.add_user("carol", roles=[("contractor", None)], kind="contractor", sponsor="sam", valid_until=until)
    token = ctl.login(carol)
    assert ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(token)).status_code == 200
    ctl.advance(3600)
    res = ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(token))
    assert res.status_code == 401 and res.json()["error"] == "account_expired", res.text
    ctl.advance(30)
    res = ctl.client.post("/api/v1/auth/login", json=login_body(carol, ctl.code(carol)))
    assert res.status_code == 403 and res.json()["error"] == "account_expired"
    reasons = {e["reason"] for e in ctl.events(subject="carol") if e["result"] == "failure"}
    assert "account_expired" in reasons


def test_contractor_stops_when_the_sponsor_is_disabled(ctl):
    sam = ctl.add_user("sam")
    from datetime import UTC, datetime, timedelta

    until = (datetime.fromtimestamp(ctl.t, UTC) + timedelta(days=2)).isoformat()
    carol = ctl.add_user("carol", roles=[("contractor", None)], kind="contractor", sponsor="sam", valid_until=until)
    token = ctl.login(carol)
    res = ctl.client.post(f"/api/v1/users/{sam.user_id}/disable", headers=ctl.step_up_admin())
    assert res.status_code == 200
    res = ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(token))
    assert res.status_code == 401 and res.json()["error"] == "sponsor_inactive"


def test_disabled_user_is_refused_and_re_enabled_user_logs_in(ctl):
    bob = ctl.add_user("bob")
    token = ctl.login(bob)
    assert ctl.client.post(f"/api/v1/users/{bob.user_id}/disable", headers=ctl.step_up_admin()).status_code == 200
    res = ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(token))
    assert res.status_code == 401 and res.json()["error"] == "account_disabled"
    ctl.advance(30)
    res = ctl.client.post("/api/v1/auth/login", json=login_body(bob, ctl.code(bob)))
    assert res.status_code == 403 and res.json()["error"] == "account_disabled"
    assert ctl.client.post(f"/api/v1/users/{bob.user_id}/enable", headers=ctl.step_up_admin()).status_code == 200
    ctl.advance(30)
    assert ctl.login(bob)
    assert ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(token)).status_code == 401, "old logins stay ended"
    types = [e["type"] for e in ctl.events(subject="bob")]
    assert "user_disabled" in types and "user_enabled" in types


def test_expired_idle_and_logged_out_tokens_are_refused(ctl):
    bob = ctl.add_user("bob")
    idle = ctl.login(bob)
    ctl.advance(ctl.settings.token_idle_s + 1)
    res = ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(idle))
    assert res.status_code == 401 and res.json()["error"] == "token_expired"
    ctl.advance(30)
    busy = ctl.login(bob)
    for _ in range(ctl.settings.token_max_s // 600 + 1):  # used every 10 min: never idle, still ends at the max
        ctl.advance(600)
        last = ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(busy))
    assert last.status_code == 401 and last.json()["error"] == "token_expired"
    ctl.advance(30)
    token = ctl.login(bob)
    assert ctl.client.post("/api/v1/auth/logout", headers=ctl.auth(token)).status_code == 204
    res = ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(token))
    assert res.status_code == 401 and res.json()["error"] == "token_revoked"
    refused = [e["reason"] for e in ctl.events(subject="bob") if e["type"] == "token_refused"]
    assert "token_expired" in refused and "token_revoked" in refused


def test_deleted_user_cannot_log_in_and_the_name_is_not_reused(ctl):
    bob = ctl.add_user("bob")
    res = ctl.client.delete(f"/api/v1/users/{bob.user_id}", headers=ctl.step_up_admin())
    assert res.status_code == 204
    ctl.advance(30)
    assert ctl.client.post("/api/v1/auth/login", json=login_body(bob, ctl.code(bob))).status_code == 401
    body = {"username": "bob", "display_name": "Another Bob", "password": PASSWORD}
    assert ctl.client.post("/api/v1/users", json=body, headers=ctl.step_up_admin()).status_code == 409


# ---- step-up ----


def test_step_up_needs_a_fresh_unused_code(ctl):
    token = ctl.admin_token()
    body = {"username": "dave", "display_name": "Dave", "password": PASSWORD}
    res = ctl.client.post("/api/v1/users", json=body, headers=ctl.auth(token))
    assert res.status_code == 401 and res.json()["error"] == "step_up_required"
    ctl.advance(30)
    code = ctl.code(ctl.admin)
    assert ctl.client.post("/api/v1/users", json=body, headers=ctl.auth(token, code)).status_code == 201
    res = ctl.client.post("/api/v1/users", json={**body, "username": "erin"}, headers=ctl.auth(token, code))
    assert res.status_code == 401 and res.json()["error"] == "step_up_required", "a step-up code works once"


# ---- throttling ----


def test_failures_are_throttled_with_a_bounded_hold_off(ctl):
    bob = ctl.add_user("bob")
    policy = ctl.settings.throttle
    wrong = {"username": "bob", "password": "wrong password 123", "totp_code": "000000"}
    for _ in range(policy.free_failures):
        assert ctl.client.post("/api/v1/auth/login", json=wrong).status_code == 401
    assert ctl.client.post("/api/v1/auth/login", json=wrong).status_code == 401  # this one starts the hold-off
    res = ctl.client.post("/api/v1/auth/login", json=login_body(bob, ctl.code(bob)))
    assert res.status_code == 429 and int(res.headers["Retry-After"]) >= 1, "even right credentials wait"
    # an attacker who keeps trying: the hold-off doubles up to the cap, never beyond, and is not forgotten
    waits = []
    for _ in range(40):
        res = ctl.client.post("/api/v1/auth/login", json=wrong)
        if res.status_code == 429:
            waits.append(int(res.headers["Retry-After"]))
            ctl.advance(waits[-1])
    assert max(waits) == policy.max_delay_s and waits.count(policy.max_delay_s) > 3, waits
    assert waits[:4] == sorted(waits[:4])
    ctl.advance(policy.max_delay_s)
    assert ctl.login(bob), "after the cap, the right person gets in"
    throttled = [e for e in ctl.events(subject="bob") if e["reason"] == "throttled"]
    assert throttled and all(e["source"] for e in throttled)


def test_one_source_guessing_many_names_is_throttled(ctl):
    policy = ctl.settings.throttle
    statuses = []
    for i in range(policy.free_failures * 4 + 2):
        res = ctl.client.post("/api/v1/auth/login", json={"username": f"guess{i}", "password": "wrong password 123", "totp_code": "000000"})
        statuses.append(res.status_code)
    assert statuses[-1] == 429 and 429 not in statuses[: policy.free_failures * 4]


def test_unknown_users_take_as_long_as_known_ones(tmp_path, db_url):
    ctl = Harness(tmp_path, db_url, extra_env={"WICKET_THROTTLE_FREE_FAILURES": "100"})
    ctl.add_user("bob")

    def timed(name: str) -> float:
        t0 = time.perf_counter()
        res = ctl.client.post("/api/v1/auth/login", json={"username": name, "password": "wrong password 123", "totp_code": "000000"})
        assert res.status_code == 401 and res.json()["error"] == "invalid_credentials"
        return time.perf_counter() - t0

    known = [timed("bob") for _ in range(8)]
    unknown = [timed(f"nobody{i}") for i in range(8)]
    ratio = statistics.median(unknown) / statistics.median(known)
    # both pay for one argon2id verification; without the dummy hash the unknown name would be ~100x faster
    assert 0.5 < ratio < 2.0, (statistics.median(known), statistics.median(unknown))
    ctl.app.state.engine.dispose()


# ---- cookies ----


def test_cookie_login_is_http_only_strict_and_needs_the_csrf_header_for_changes(ctl, tmp_path, db_url):
    bob = ctl.add_user("bob")
    res = ctl.client.post("/api/v1/auth/login", json=login_body(bob, ctl.code(bob), mode="cookie"))
    assert res.status_code == 200 and res.json()["token"] is None
    cookie = res.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "; secure" in cookie
    ctl.client.cookies.clear()
    # the test client speaks plain http and rightly withholds a Secure cookie: use it without the flag
    from fastapi.testclient import TestClient

    from controller.app import create_app

    plain = create_app(load({"WICKET_DATA_DIR": str(ctl.settings.data_dir), "WICKET_DATABASE_URL": db_url,
                             "WICKET_COOKIE_SECURE": "false"}), clock=lambda: ctl.t)
    client = TestClient(plain)
    ctl.advance(30)
    assert client.post("/api/v1/auth/login", json=login_body(bob, ctl.code(bob), mode="cookie")).status_code == 200
    assert client.get("/api/v1/auth/whoami").status_code == 200
    assert client.post("/api/v1/auth/logout").status_code == 403
    assert client.post("/api/v1/auth/logout", headers={"X-Wicket-CSRF": "1"}).status_code == 204
    assert client.get("/api/v1/auth/whoami").status_code == 401
    plain.state.engine.dispose()


# ---- secrets stay out of logs and events ----


def test_tokens_passwords_and_codes_never_reach_logs_or_events(ctl, caplog):
    caplog.set_level(logging.DEBUG)
    bob = ctl.add_user("bob")
    code = ctl.code(bob)
    token = ctl.login(bob, code=code)
    ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(token))
    ctl.client.post("/api/v1/auth/login", json={"username": "bob", "password": "a wrong password", "totp_code": "123456"})
    ctl.advance(30)
    codes = ctl.client.post("/api/v1/auth/recovery-codes", headers=ctl.auth(token, ctl.code(bob))).json()["codes"]
    text = "\n".join(r.getMessage() for r in caplog.records) + "\n" + repr(ctl.events())
    assert caplog.records, "events are logged"
    for secret in [token, PASSWORD, "a wrong password", code, bob.secret, *codes]:
        assert secret not in text


# ---- settings and init fail fast ----


def test_missing_keys_and_bad_settings_stop_the_start(tmp_path):
    from controller.app import create_app

    with pytest.raises(SettingsError, match="wicket-controller init"):
        create_app(load({"WICKET_DATA_DIR": str(tmp_path / "empty")}))
    for env, needle in [({"WICKET_TOKEN_IDLE_S": "soon"}, "WICKET_TOKEN_IDLE_S"),
                        ({"WICKET_DATABASE_URL": "mysql://x"}, "WICKET_DATABASE_URL"),
                        ({"WICKET_DATA_DIR": "relative"}, "WICKET_DATA_DIR"),
                        ({"WICKET_COOKIE_SECURE": "maybe"}, "WICKET_COOKIE_SECURE")]:
        with pytest.raises(SettingsError, match=needle):
            load({"WICKET_DATA_DIR": str(tmp_path), **env})


def test_init_runs_once(ctl):
    from controller.bootstrap import init

    with pytest.raises(SettingsError, match="init runs once"):
        init(ctl.settings, "another", "Another Admin", PASSWORD)


def test_per_user_rows_stay_bounded(ctl):
    from controller.models import ApiToken, UsedTotp

    bob = ctl.add_user("bob")
    for _ in range(12):
        ctl.advance(3600 * 5)
        ctl.login(bob)
    with ctl.app.state.auth.factory() as s:
        steps = s.scalars(select(UsedTotp).where(UsedTotp.user_id == bob.user_id)).all()
        tokens = s.scalars(select(ApiToken).where(ApiToken.user_id == bob.user_id)).all()
    assert len(steps) <= 2, "old accepted steps are forgotten (they can never match again)"
    from datetime import timedelta

    now = ctl.app.state.auth.now()
    assert tokens and all(t.expires_at >= now - timedelta(days=1) for t in tokens), "tokens a day past their end are removed"
    assert len(tokens) < 12
