"""The `wicket` CLI against a real HTTP server (uvicorn in a thread serving the harness's app), on SQLite
and PostgreSQL. Effects are checked through the API, not through the CLI's own output."""

from __future__ import annotations

import json
import re
import socket
import stat
import threading
import time
from datetime import UTC, datetime, timedelta

import pyotp
import pytest
import uvicorn
from typer.testing import CliRunner

from controller.cli import app

from .conftest import PASSWORD

NEW_PASSWORD = "another long passphrase 42"


class Cli:
    """Runs `wicket` in-process with its own state directory; remembers every output and every token."""

    def __init__(self, url: str, state_dir):
        self.url, self.state = url, state_dir
        self.runner = CliRunner()
        self.outputs: list[str] = []
        self.tokens: set[str] = set()

    def __call__(self, *args: str, input: str | None = None, controller: str | None = None):
        argv = ["--controller", controller or self.url, *args]
        res = self.runner.invoke(app, argv, input=input, env={"WICKET_CONFIG_DIR": str(self.state), "WICKET_CONTROLLER": None})
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        self.outputs.append(res.stdout + res.stderr)
        if (self.state / "token").exists():
            self.tokens.add(self.token())
        return res

    def token(self) -> str:
        return (self.state / "token").read_text().strip()

    def login(self, ctl, person) -> None:
        res = self("login", "--user", person.username, input=f"{person.password}\n{ctl.code(person)}\n")
        assert res.exit_code == 0, res.output


@pytest.fixture
def server(ctl):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(ctl.app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def cli(server, tmp_path):
    runner = Cli(server, tmp_path / "wicket-cli")
    yield runner
    for token in runner.tokens:  # whatever a test did, no token ever reached the terminal
        assert not any(token in out for out in runner.outputs)


@pytest.fixture
def admin(ctl, cli) -> Cli:
    cli.login(ctl, ctl.admin)
    return cli


def fresh(ctl) -> str:
    """A step-up code from a step nobody has used yet."""
    ctl.advance(30)
    return ctl.code(ctl.admin)


def api_user(ctl, cli, name: str) -> dict:
    res = ctl.client.get("/api/v1/users", headers=ctl.auth(cli.token()))
    assert res.status_code == 200, res.text
    return next(u for u in res.json() if u["username"] == name)


def add(ctl, cli, name: str, *extra: str):
    res = cli("users", "add", name, "--display-name", name.title(), *extra, "--password-stdin", "--totp", fresh(ctl),
              input=f"{PASSWORD}\n")
    assert res.exit_code == 0, res.output
    return res


def enrol(ctl, cli, name: str) -> str:
    res = cli("users", "enrol-totp", name, "--totp", fresh(ctl))
    assert res.exit_code == 0, res.output
    return re.search(r"secret=([A-Z2-7]+)", res.stdout).group(1)


# ---- login, whoami, logout ----


def test_login_stores_a_private_token_and_whoami_shows_the_roles(ctl, cli, caplog):
    ctl.add_site("north-1")
    bob = ctl.add_user("bob", roles=[("engineer", "north-1"), ("approver", "north-1")])
    caplog.set_level("DEBUG")
    code = ctl.code(bob)
    res = cli("login", "--user", "bob", input=f"{PASSWORD}\n{code}\n")
    assert res.exit_code == 0, res.output
    assert "Logged in to" in res.stdout and "as bob" in res.stdout
    token_file = cli.state / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f'controller = "{cli.url}"' in (cli.state / "config.toml").read_text()

    res = cli("whoami")
    assert res.exit_code == 0 and res.stdout.startswith("bob (internal)")
    assert "approver@north-1, engineer@north-1" in res.stdout
    me = json.loads(cli("whoami", "--json").stdout)
    assert me["username"] == "bob" and {"role": "engineer", "site": "north-1"} in me["roles"]

    res = cli("whoami", controller="http://localhost:1")  # the token only goes where it came from
    assert res.exit_code == 2 and f"you are logged in to {cli.url}" in res.stderr

    res = cli("users", "list")  # bob is no administrator: the API's refusal, as a sentence
    assert res.exit_code == 1 and res.stderr == "wicket: this needs the role admin\n"

    token = cli.token()
    assert ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(token)).status_code == 200
    for out in cli.outputs:
        assert token not in out and PASSWORD not in out and code not in out
    assert token not in caplog.text and PASSWORD not in caplog.text


def test_a_wrong_code_is_refused_and_nothing_is_stored(ctl, cli):
    wrong = ctl.code(ctl.admin, offset_steps=5)
    res = cli("login", "--user", "root", input=f"{PASSWORD}\n{wrong}\n")
    assert res.exit_code == 1
    assert res.stderr == "wicket: wrong user name, password or code\n"
    assert not (cli.state / "token").exists() and not (cli.state / "config.toml").exists()

    res = cli("login", "--user", "root", input=f"{PASSWORD}\n12ab\n")
    assert res.exit_code == 2 and "6 digits" in res.stderr
    assert "Traceback" not in "".join(cli.outputs)


def test_logout_makes_the_old_token_useless(ctl, admin):
    token = admin.token()
    res = admin("logout")
    assert res.exit_code == 0 and "Logged out" in res.stdout
    assert not (admin.state / "token").exists()
    refused = ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(token))
    assert refused.status_code == 401 and refused.json()["error"] == "token_revoked"

    res = admin("whoami")
    assert res.exit_code == 1 and "not logged in" in res.stderr and "hint: wicket login" in res.stderr
    assert admin("logout").stdout == "Not logged in.\n"


# ---- account administration ----


def test_admin_manages_an_account_with_step_up_codes(ctl, admin):
    res = admin("users", "add", "bob", "--display-name", "Bob Builder", "--role", "engineer@north-1",
                "--password-stdin", "--totp", fresh(ctl), input=f"{PASSWORD}\n")
    assert res.exit_code == 1 and "there is no site 'north-1'" in res.stderr  # a role needs its site to exist
    ctl.add_site("north-1")
    res = admin("users", "add", "bob", "--display-name", "Bob Builder", "--role", "engineer@north-1",
                input=f"{PASSWORD}\n{PASSWORD}\n{fresh(ctl)}\n")
    assert res.exit_code == 0, res.output
    assert "enrol-totp bob" in res.stdout
    bob = api_user(ctl, admin, "bob")
    assert bob["display_name"] == "Bob Builder" and bob["roles"] == [{"role": "engineer", "site": "north-1"}]

    used = ctl.code(ctl.admin)  # the step the add just used: a second use is refused
    res = admin("users", "disable", "bob", "--totp", used)
    assert res.exit_code == 1 and res.stderr == "wicket: that TOTP code is wrong or already used: use the next one\n"
    assert api_user(ctl, admin, "bob")["disabled"] is False

    res = admin("users", "roles", "bob", "--role", "engineer@north-1", "--role", "approver@*", "--totp", fresh(ctl))
    assert res.exit_code == 0, res.output
    assert api_user(ctl, admin, "bob")["roles"] == [{"role": "approver", "site": None}, {"role": "engineer", "site": "north-1"}]

    res = admin("users", "enrol-totp", "bob", "--qr", "--totp", fresh(ctl))
    assert res.exit_code == 0 and "otpauth://totp/" in res.stdout and "█" in res.stdout
    secret = re.search(r"secret=([A-Z2-7]+)", res.stdout).group(1)
    bob_token = _api_login(ctl, "bob", PASSWORD, secret)

    res = admin("users", "disable", "bob", "--totp", fresh(ctl))
    assert res.exit_code == 0 and api_user(ctl, admin, "bob")["disabled"] is True
    assert ctl.client.get("/api/v1/auth/whoami", headers=ctl.auth(bob_token)).status_code == 401
    res = admin("users", "enable", "bob", input=f"{fresh(ctl)}\n")  # the code from the prompt
    assert res.exit_code == 0 and api_user(ctl, admin, "bob")["disabled"] is False

    res = admin("users", "set-password", "bob", "--totp", fresh(ctl), input=f"{NEW_PASSWORD}\n{NEW_PASSWORD}\n")
    assert res.exit_code == 0, res.output
    ctl.advance(30)
    _api_login(ctl, "bob", NEW_PASSWORD, secret)

    listing = admin("users", "list").stdout
    assert re.search(r"^bob\s+Bob Builder\s+internal\s+active\s+active\s+approver@\*, engineer@north-1$", listing, re.M)

    res = admin("users", "delete", "bob", input="n\n")
    assert res.exit_code == 1 and api_user(ctl, admin, "bob")["deleted"] is False
    res = admin("users", "delete", "bob", "--yes", "--totp", fresh(ctl))
    assert res.exit_code == 0
    gone = api_user(ctl, admin, "bob")
    assert gone["deleted"] is True and gone["roles"] == [] and gone["totp"] == "none"
    assert "deleted" in admin("users", "show", "bob").stdout
    res = admin("users", "enable", "bob", "--totp", fresh(ctl))
    assert res.exit_code == 1 and "bob was deleted" in res.stderr
    res = admin("users", "add", "bob", "--display-name", "Bob Again", "--password-stdin", "--totp", fresh(ctl),
                input=f"{PASSWORD}\n")
    assert res.exit_code == 1 and "never reused" in res.stderr


def test_a_contractor_has_a_sponsor_and_an_end(ctl, admin):
    add(ctl, admin, "alice", "--role", "engineer")
    until = (datetime.fromtimestamp(ctl.t, UTC) + timedelta(days=30)).replace(second=0, microsecond=0)
    res = add(ctl, admin, "carol", "--contractor", "--sponsor", "alice", "--until", until.strftime("%Y-%m-%dT%H:%MZ"))
    assert "contractor carol, sponsored by alice" in res.stdout
    carol = api_user(ctl, admin, "carol")
    assert carol["kind"] == "contractor" and carol["sponsor"] == "alice"
    assert datetime.fromisoformat(carol["valid_until"]) == until
    assert carol["roles"] == [{"role": "contractor", "site": None}]
    shown = json.loads(admin("users", "show", "carol", "--json").stdout)
    assert shown["sponsor"] == "alice"

    res = admin("users", "add", "dave", "--display-name", "Dave", "--contractor", "--until", "2026-12-31T18:00Z")
    assert res.exit_code == 2 and "--sponsor" in res.stderr
    res = admin("users", "add", "dave", "--display-name", "Dave", "--contractor", "--sponsor", "alice", "--until", "2026-12-31T18:00")
    assert res.exit_code == 2 and "time zone" in res.stderr

    secret = enrol(ctl, admin, "carol")
    _api_login(ctl, "carol", PASSWORD, secret)
    assert admin("users", "disable", "alice", "--totp", fresh(ctl)).exit_code == 0
    refused = ctl.client.post("/api/v1/auth/login", json={
        "username": "carol", "password": PASSWORD, "totp_code": pyotp.TOTP(secret).at(ctl.t)})
    assert refused.status_code == 403 and refused.json()["error"] == "sponsor_inactive"


def test_recovery_codes_and_own_password(ctl, admin):
    res = admin("recovery-codes", "--totp", fresh(ctl))
    assert res.exit_code == 0, res.output
    codes = re.findall(r"^  (\S+-\S+)$", res.stdout, re.M)
    assert len(codes) == 10

    res = admin("password", "--totp", fresh(ctl), input=f"{PASSWORD}\n{NEW_PASSWORD}\n{NEW_PASSWORD}\n")
    assert res.exit_code == 0 and res.stdout.endswith("Password changed.\n")

    other = Cli(admin.url, admin.state.parent / "other")
    res = other("login", "--user", "root", "--recovery-code", input=f"{NEW_PASSWORD}\n{codes[0]}\n")
    assert res.exit_code == 0, res.output
    res = other("login", "--user", "root", "--recovery-code", input=f"{NEW_PASSWORD}\n{codes[0]}\n")
    assert res.exit_code == 1 and "wrong user name, password or code" in res.stderr
    assert not any(token in out for token in other.tokens for out in other.outputs)


# ---- events ----


def test_events_show_the_account_events(ctl, admin):
    add(ctl, admin, "bob", "--role", "soc")
    res = admin("events", "--subject", "bob")
    assert res.exit_code == 0, res.output
    assert re.search(r"\baccount\s+user_created\s+success\s+root\s+bob\b.*roles=\[\"soc@\*\"\]", res.stdout)

    rows = json.loads(admin("events", "--json").stdout)
    kinds = {(e["type"], e["subject"]) for e in rows}
    assert {("login", "root"), ("step_up", "root"), ("user_created", "bob")} <= kinds

    res = admin("events", "--after", str(rows[0]["seq"]), "--limit", "1", "--json")
    assert [e["seq"] for e in json.loads(res.stdout)] == [rows[1]["seq"]]
    assert f"--after {rows[1]['seq']}" in res.stderr
    res = admin("events", "--since", "2999-01-01T00:00Z")
    assert res.exit_code == 0 and res.stdout == "No events.\n"


# ---- reaching the controller ----


def test_an_unreachable_controller_exits_3_with_a_hint(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Cli(f"http://127.0.0.1:{port}", tmp_path / "state")
    res = cli("login", "--user", "root")
    assert res.exit_code == 3
    assert res.stderr.startswith(f"wicket: cannot reach the controller at http://127.0.0.1:{port}")
    assert "hint:" in res.stderr and "Traceback" not in res.output

    res = cli("login", controller="http://controller.example.org")
    assert res.exit_code == 2 and "unencrypted" in res.stderr


# ---- helpers ----


def _api_login(ctl, username: str, password: str, secret: str) -> str:
    res = ctl.client.post("/api/v1/auth/login", json={
        "username": username, "password": password, "totp_code": pyotp.TOTP(secret).at(ctl.t)})
    assert res.status_code == 200, res.text
    return res.json()["token"]
