"""`wicket`: the command line for people (engineers, administrators, the SOC). It talks to the
controller's HTTP API v1 and keeps its state in $WICKET_CONFIG_DIR (default ~/.config/wicket):

\b
  config.toml   the controller's URL and your user name, remembered at login
  token         your login token (0600): never printed, sent only to the controller that issued it

\b
  wicket [--controller URL] login [--user NAME] [--recovery-code]
  wicket whoami [--json] | logout | password | recovery-codes
  wicket users list|show|add|roles|disable|enable|delete|enrol-totp|set-password …
  wicket events [--subject NAME] [--after SEQ] [--since TIME] [--limit N] [--json]

The controller URL comes from --controller, else $WICKET_CONTROLLER, else config.toml. Changes to
accounts, your password and your recovery codes need a fresh TOTP code (step-up): --totp CODE, or you
are asked.

\b
Exit status: 0 done, 1 refused (the reason is printed), 2 usage or configuration,
3 the controller cannot be reached.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import ip_address
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer
from typer.core import TyperGroup

from . import __version__

ROLES = ("engineer", "contractor", "approver", "site_admin", "soc", "admin")
EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
TIMEOUT_S = 15.0


class CliError(Exception):
    """An expected failure: printed as `wicket: <message>` (and a hint), never as a traceback."""

    def __init__(self, message: str, *, exit_code: int = EXIT_REFUSED, hint: str | None = None):
        super().__init__(message)
        self.exit_code, self.hint = exit_code, hint


class _Group(TyperGroup):
    # Every command runs inside the root group's invoke: the one place expected errors become exit codes.
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CliError as exc:
            typer.echo(f"wicket: {exc}", err=True)
            if exc.hint:
                typer.echo(f"hint: {exc.hint}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(cls=_Group, name="wicket", help=__doc__, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False, rich_markup_mode=None)
users_app = typer.Typer(help="Accounts and roles (administrators; changes need a fresh TOTP code).",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(users_app, name="users")

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
TotpOpt = Annotated[str | None, typer.Option("--totp", metavar="CODE", help="a fresh TOTP code for this change (else you are asked)")]
RoleOpt = Annotated[list[str] | None, typer.Option("--role", metavar="ROLE[@SITE]", help=f"repeatable; ROLE is one of {', '.join(ROLES)}")]
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="the user name")]
PasswordStdinOpt = Annotated[bool, typer.Option("--password-stdin", help="read the password from the first line of stdin")]


@dataclass(frozen=True)
class _Options:
    controller: str | None


@app.callback()
def _root(ctx: typer.Context,
          controller: Annotated[str | None, typer.Option("--controller", metavar="URL", envvar="WICKET_CONTROLLER",
                                                         help="the controller, e.g. https://wicket.example.org")] = None) -> None:
    ctx.obj = _Options(controller=controller)


# ---- your login ----


@app.command()
def login(ctx: typer.Context,
          user: Annotated[str | None, typer.Option("--user", "-u", metavar="NAME", help="your user name")] = None,
          recovery_code: Annotated[bool, typer.Option("--recovery-code", help="use a recovery code instead of a TOTP code")] = False) -> None:
    """Log in with your password and a TOTP code (or a recovery code); the login is remembered."""
    state = _state_dir()
    cfg = _read_config(state)
    api = Api(_controller_url(ctx.obj.controller or cfg.controller))
    api.call("GET", "/healthz")  # before anyone types a secret: is the controller there at all?
    username = user or typer.prompt("User name", default=cfg.user or _os_user())
    body = {"username": username, "password": typer.prompt("Password", hide_input=True), "mode": "token"}
    if recovery_code:
        body["recovery_code"] = typer.prompt("Recovery code", hide_input=True).strip()
    else:
        body["totp_code"] = _code(typer.prompt("TOTP code", hide_input=True))
    out = api.call("POST", "/api/v1/auth/login", body=body)
    previous = _previous_login(state, cfg)
    _write_private(state / "token", out["token"] + "\n")
    _write_config(state, _Config(controller=api.url, user=out["username"]))
    _end_login(previous)
    typer.echo(f"Logged in to {api.url} as {out['username']} (roles: {', '.join(out['roles']) or 'none'}).")
    typer.echo(f"The login ends at {_when(out['expires_at'])}, or at {_when(out['idle_expires_at'])} "
               "if unused (each command moves that on).")


@app.command()
def whoami(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Who you are logged in as, your roles, and when the login ends."""
    api = _api(ctx)
    me = api.call("GET", "/api/v1/auth/whoami")
    if as_json:
        _print_json(me)
        return
    typer.echo(f"{me['username']} ({me['kind']}) at {api.url}")
    typer.echo(f"roles: {_roles(me['roles'])}")
    typer.echo(f"login ends {_when(me['expires_at'])}")


@app.command()
def logout(ctx: typer.Context) -> None:
    """End your login on the controller and forget the token."""
    state = _state_dir()
    if not (state / "token").exists():
        typer.echo("Not logged in.")
        return
    note = ""
    try:
        _api(ctx).call("POST", "/api/v1/auth/logout")
    except CliError as exc:
        if exc.exit_code != EXIT_REFUSED:
            raise  # unreachable or misconfigured: keep the token so a retry can still end the login
        note = f" (the controller says: {exc})"
    (state / "token").unlink(missing_ok=True)
    typer.echo(f"Logged out.{note}")


@app.command()
def password(ctx: typer.Context, totp: TotpOpt = None) -> None:
    """Change your own password (needs a fresh TOTP code)."""
    api = _api(ctx)
    current = typer.prompt("Current password", hide_input=True)
    new = typer.prompt("New password", hide_input=True, confirmation_prompt="Repeat the new password")
    api.call("POST", "/api/v1/auth/password", body={"current_password": current, "new_password": new},
             totp=_step_up(totp))
    typer.echo("Password changed.")


@app.command("recovery-codes")
def recovery_codes(ctx: typer.Context, totp: TotpOpt = None) -> None:
    """New recovery codes for yourself, shown once; your earlier codes stop working."""
    api = _api(ctx)
    out = api.call("POST", "/api/v1/auth/recovery-codes", totp=_step_up(totp))
    typer.echo("Your new recovery codes. They are shown only now, each works once, and your earlier codes")
    typer.echo("no longer work. Keep them offline; `wicket login --recovery-code` takes one.")
    for code in out["codes"]:
        typer.echo(f"  {code}")


# ---- accounts ----


@users_app.command("list")
def users_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every account, deleted ones included."""
    rows = _api(ctx).call("GET", "/api/v1/users")
    if as_json:
        _print_json(rows)
        return
    if not rows:
        typer.echo("No users.")
        return
    _table(["USER", "NAME", "KIND", "STATE", "TOTP", "ROLES"],
           [[u["username"], u["display_name"], u["kind"], _account_state(u), u["totp"], _roles(u["roles"])] for u in rows])


@users_app.command("show")
def users_show(ctx: typer.Context, name: NameArg, as_json: JsonOpt = False) -> None:
    """One account."""
    u = _find_user(_api(ctx), name)
    if as_json:
        _print_json(u)
        return
    kind = u["kind"] + (f", sponsored by {u['sponsor']}" if u["sponsor"] else "")
    _pairs([("user", u["username"]), ("display name", u["display_name"]), ("email", u["email"] or "-"),
            ("kind", kind), ("state", _account_state(u)), ("totp", u["totp"]), ("roles", _roles(u["roles"])),
            ("created", _when(u["created_at"]))])


@users_app.command("add")
def users_add(ctx: typer.Context, name: NameArg,
              display_name: Annotated[str, typer.Option("--display-name", help="the person's full name")],
              email: Annotated[str | None, typer.Option("--email", metavar="ADDRESS")] = None,
              role: RoleOpt = None,
              contractor: Annotated[bool, typer.Option("--contractor", help="an external person: needs --sponsor and --until")] = False,
              sponsor: Annotated[str | None, typer.Option("--sponsor", metavar="NAME", help="the internal user answerable for a contractor")] = None,
              valid_from: Annotated[str | None, typer.Option("--from", metavar="TIME", help="a contractor's first moment, e.g. 2026-06-01T07:00Z (default now)")] = None,
              until: Annotated[str | None, typer.Option("--until", metavar="TIME", help="a contractor's last moment, e.g. 2026-12-31T18:00Z")] = None,
              password_stdin: PasswordStdinOpt = False, totp: TotpOpt = None) -> None:
    """Create an account with an initial password; enrol its TOTP next (`wicket users enrol-totp`)."""
    body = {"username": name, "display_name": display_name, "kind": "contractor" if contractor else "internal",
            **_validity(contractor, sponsor, valid_from, until)}
    body["roles"] = [_grant(r) for r in role] if role else ([_grant("contractor")] if contractor else [])
    if email:
        body["email"] = email
    api = _api(ctx)
    body["password"] = _new_password(f"Initial password for {name}", password_stdin)
    u = api.call("POST", "/api/v1/users", body=body, totp=_step_up(totp))
    who = f"contractor {u['username']}, sponsored by {u['sponsor']} until {_when(u['valid_until'])}" if contractor else u["username"]
    typer.echo(f"Created {who} (roles: {_roles(u['roles'])}).")
    typer.echo(f"Next: `wicket users enrol-totp {u['username']} --qr`; {u['username']} cannot log in before that.")


@users_app.command("roles")
def users_roles(ctx: typer.Context, name: NameArg, role: RoleOpt = None,
                none: Annotated[bool, typer.Option("--none", help="take every role away")] = False,
                totp: TotpOpt = None) -> None:
    """Replace an account's roles with the ones given."""
    if bool(role) == none:
        raise CliError("give the new roles with --role ROLE[@SITE] (repeatable), or --none", exit_code=EXIT_USAGE)
    grants = [_grant(r) for r in role or []]
    api, u = _target(ctx, name)
    u = api.call("PUT", f"/api/v1/users/{u['id']}/roles", body={"roles": grants}, totp=_step_up(totp))
    typer.echo(f"{name} now has the roles: {_roles(u['roles'])}." if u["roles"] else f"{name} has no roles now.")


@users_app.command("disable")
def users_disable(ctx: typer.Context, name: NameArg, totp: TotpOpt = None) -> None:
    """Disable an account: its logins end at once, and it cannot log in until enabled."""
    api, u = _target(ctx, name)
    api.call("POST", f"/api/v1/users/{u['id']}/disable", totp=_step_up(totp))
    typer.echo(f"Disabled {name}; their logins have ended.")


@users_app.command("enable")
def users_enable(ctx: typer.Context, name: NameArg, totp: TotpOpt = None) -> None:
    """Enable a disabled account again."""
    api, u = _target(ctx, name)
    api.call("POST", f"/api/v1/users/{u['id']}/enable", totp=_step_up(totp))
    typer.echo(f"Enabled {name}.")


@users_app.command("delete")
def users_delete(ctx: typer.Context, name: NameArg,
                 yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
                 totp: TotpOpt = None) -> None:
    """Delete an account: its secrets are wiped and its logins end; the name stays in the records and is never reused."""
    api, u = _target(ctx, name)
    if not yes:
        typer.confirm(f"Delete {name} ({u['display_name']})? This cannot be undone", abort=True)
    api.call("DELETE", f"/api/v1/users/{u['id']}", totp=_step_up(totp))
    typer.echo(f"Deleted {name}.")


@users_app.command("enrol-totp")
def users_enrol_totp(ctx: typer.Context, name: NameArg,
                     qr: Annotated[bool, typer.Option("--qr", help="also print the enrolment as a QR code")] = False,
                     totp: TotpOpt = None) -> None:
    """Give an account a new TOTP secret, shown once; any earlier secret stops working."""
    api, u = _target(ctx, name)
    out = api.call("POST", f"/api/v1/users/{u['id']}/totp", totp=_step_up(totp))
    typer.echo(f"New TOTP secret for {name}. It is shown only now, and any earlier one no longer works.")
    typer.echo("Add it to an authenticator app (the URI, or scan the QR code):")
    typer.echo(f"  {out['otpauth_uri']}")
    if qr:
        from .security.totp import qr_text

        typer.echo(qr_text(out["otpauth_uri"]))
    typer.echo(f"{name}'s first login with a code from it confirms it.")


@users_app.command("set-password")
def users_set_password(ctx: typer.Context, name: NameArg, password_stdin: PasswordStdinOpt = False,
                       totp: TotpOpt = None) -> None:
    """Set an account's password; the person's logins end (unless it is your own)."""
    api, u = _target(ctx, name)
    new = _new_password(f"New password for {name}", password_stdin)
    api.call("PUT", f"/api/v1/users/{u['id']}/password", body={"password": new}, totp=_step_up(totp))
    typer.echo(f"Password set for {name}.")


# ---- events ----


@app.command()
def events(ctx: typer.Context,
           subject: Annotated[str | None, typer.Option("--subject", metavar="NAME", help="only events about this user")] = None,
           after: Annotated[int, typer.Option("--after", metavar="SEQ", min=0, help="only events after this sequence number")] = 0,
           since: Annotated[str | None, typer.Option("--since", metavar="TIME", help="only events at or after this time")] = None,
           limit: Annotated[int, typer.Option("--limit", metavar="N", min=1, max=1000)] = 100,
           as_json: JsonOpt = False) -> None:
    """Authentication and account events, oldest first (admin, soc)."""
    params: dict[str, Any] = {"after": after, "limit": limit}
    if subject:
        params["subject"] = subject
    if since:
        params["since"] = _instant(since, "--since").isoformat()
    rows = _api(ctx).call("GET", "/api/v1/events", params=params)
    if as_json:
        _print_json(rows)
    elif rows:
        _table(["SEQ", "TIME (UTC)", "CATEGORY", "TYPE", "RESULT", "ACTOR", "SUBJECT", "SOURCE", "DETAILS"],
               [[e["seq"], _when(e["at"], seconds=True), e["category"], e["type"], e["result"], e["actor"] or "-",
                 e["subject"] or "-", e["source"] or "-", _details(e)] for e in rows])
    else:
        typer.echo("No events.")
    if len(rows) == limit:
        typer.echo(f"(more: wicket events --after {rows[-1]['seq']})", err=True)


# ---- the controller's API ----


class Api:
    """Calls to one controller; API refusals and transport failures become CliError."""

    def __init__(self, url: str, token: str | None = None):
        self.url, self._token = url, token

    def call(self, method: str, path: str, *, body: dict | None = None, params: dict | None = None,
             totp: str | None = None) -> Any:
        headers = {"User-Agent": f"wicket-cli/{__version__}", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if totp:
            headers["X-Wicket-TOTP"] = totp
        try:
            res = httpx.request(method, self.url + path, json=body, params=params, headers=headers, timeout=TIMEOUT_S)
        except httpx.InvalidURL as exc:
            raise CliError(f"{self.url}: {exc}", exit_code=EXIT_USAGE) from None
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the controller at {self.url} ({str(exc) or type(exc).__name__})",
                           exit_code=EXIT_UNREACHABLE,
                           hint="check the address (--controller, WICKET_CONTROLLER or config.toml) and that "
                                f"the controller is running: {self.url}/healthz should answer") from None
        if res.status_code >= 400:
            raise _refusal(res)
        return _json(res) if res.content else None


def _refusal(res: httpx.Response) -> CliError:
    try:
        data = res.json()
        detail, code = data["detail"], data.get("error")
    except (ValueError, KeyError, TypeError):
        return CliError(f"the controller answered {res.status_code} {res.reason_phrase}",
                        hint="is this the wicket controller's address?")
    hint = "wicket login" if code in ("not_authenticated", "invalid_token") else None
    return CliError(str(detail), hint=hint)


def _json(res: httpx.Response) -> Any:
    try:
        return res.json()
    except ValueError:
        raise CliError(f"{res.url} did not answer like the wicket API",
                       hint="is this the wicket controller's address?") from None


def _api(ctx: typer.Context) -> Api:
    """The API as the logged-in user; the token only ever goes to the controller that issued it."""
    state = _state_dir()
    cfg = _read_config(state)
    token = _read_token(state)
    if token is None:
        raise CliError("you are not logged in", hint="wicket login")
    url = _controller_url(ctx.obj.controller or cfg.controller)
    if cfg.controller and _controller_url(cfg.controller) != url:
        raise CliError(f"you are logged in to {cfg.controller}, not {url}", exit_code=EXIT_USAGE,
                       hint=f"wicket --controller {url} login")
    return Api(url, token)


def _controller_url(raw: str | None) -> str:
    if not raw:
        raise CliError("which controller? none is configured", exit_code=EXIT_USAGE,
                       hint="wicket --controller https://HOST login (it is remembered), or set WICKET_CONTROLLER")
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise CliError(f"{raw!r} is not a controller URL: use https://HOST[:PORT]", exit_code=EXIT_USAGE)
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise CliError(f"{url}: passwords and tokens would cross the network unencrypted", exit_code=EXIT_USAGE,
                       hint="use https:// (plain http is accepted only for this machine)")
    return url


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def _previous_login(state: Path, cfg: _Config) -> tuple[str, str] | None:
    try:
        token = _read_token(state)
        return (_controller_url(cfg.controller), token) if token and cfg.controller else None
    except CliError:
        return None


def _end_login(previous: tuple[str, str] | None) -> None:
    """Best effort: a new login replaces the old one, so the old token need not stay valid."""
    if previous is None:
        return
    try:
        Api(*previous).call("POST", "/api/v1/auth/logout")
    except CliError:
        pass


# ---- users, roles, codes ----


def _target(ctx: typer.Context, name: str) -> tuple[Api, dict]:
    api = _api(ctx)
    user = _find_user(api, name)
    if user["deleted"]:
        raise CliError(f"{name} was deleted: a deleted account cannot be changed")
    return api, user


def _find_user(api: Api, name: str) -> dict:
    for user in api.call("GET", "/api/v1/users"):
        if user["username"] == name:
            return user
    raise CliError(f"there is no user {name!r}", hint="wicket users list")


def _grant(text: str) -> dict:
    role, _, site = text.partition("@")
    if role not in ROLES:
        raise CliError(f"unknown role {role!r}: one of {', '.join(ROLES)}", exit_code=EXIT_USAGE)
    return {"role": role, "site": None if site in ("", "*") else site}


def _validity(contractor: bool, sponsor: str | None, valid_from: str | None, until: str | None) -> dict:
    if not contractor:
        if sponsor or valid_from or until:
            raise CliError("--sponsor, --from and --until are for contractors (--contractor)", exit_code=EXIT_USAGE)
        return {}
    if not sponsor or not until:
        raise CliError("a contractor needs --sponsor NAME and --until TIME", exit_code=EXIT_USAGE)
    out = {"sponsor": sponsor, "valid_until": _instant(until, "--until").isoformat()}
    if valid_from:
        out["valid_from"] = _instant(valid_from, "--from").isoformat()
    return out


def _instant(text: str, flag: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{flag} {text!r} is not a time: use e.g. 2026-12-31T18:00Z", exit_code=EXIT_USAGE) from None
    if value.tzinfo is None:
        raise CliError(f"{flag} {text!r} needs a time zone, e.g. {text}Z for UTC", exit_code=EXIT_USAGE)
    return value


def _step_up(given: str | None) -> str:
    return _code(given if given is not None else typer.prompt("TOTP code for this change", hide_input=True))


def _code(text: str) -> str:
    code = text.replace(" ", "").strip()
    if not (len(code) == 6 and code.isdigit()):
        raise CliError("a TOTP code is 6 digits", exit_code=EXIT_USAGE)
    return code


def _new_password(prompt: str, from_stdin: bool) -> str:
    if not from_stdin:
        return typer.prompt(prompt, hide_input=True, confirmation_prompt="Repeat it")
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise CliError("--password-stdin: the first line of stdin is empty", exit_code=EXIT_USAGE)
    return line


# ---- local state ----


@dataclass(frozen=True)
class _Config:
    controller: str | None = None
    user: str | None = None


def _state_dir() -> Path:
    raw = os.environ.get("WICKET_CONFIG_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".config" / "wicket"


def _read_config(state: Path) -> _Config:
    path = state / "config.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return _Config()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{path}: {exc}", exit_code=EXIT_USAGE) from None
    for key in ("controller", "user"):
        if not isinstance(data.get(key, ""), str):
            raise CliError(f"{path}: {key} must be a string", exit_code=EXIT_USAGE)
    return _Config(controller=data.get("controller") or None, user=data.get("user") or None)


def _write_config(state: Path, cfg: _Config) -> None:
    # JSON string syntax is valid TOML basic-string syntax for everything json.dumps emits
    lines = ["# written by `wicket login`"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in (("controller", cfg.controller), ("user", cfg.user)) if value]
    _write_private(state / "config.toml", "\n".join(lines) + "\n")


def _read_token(state: Path) -> str | None:
    path = state / "token"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & 0o077:
        raise CliError(f"{path} can be read by others", exit_code=EXIT_USAGE,
                       hint=f"chmod 600 {path}, or delete it and log in again")
    return path.read_text().strip() or None


def _write_private(path: Path, text: str) -> None:
    """Owner-only, replaced atomically: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return None


# ---- output ----


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def _table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _pairs(pairs: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _v in pairs) + 1
    for key, value in pairs:
        typer.echo(f"{(key + ':').ljust(width)}  {value}")


def _roles(grants: list[dict]) -> str:
    return ", ".join(f"{g['role']}@{g['site'] or '*'}" for g in grants) or "none"


def _account_state(u: dict) -> str:
    if u["deleted"]:
        return "deleted"
    if u["disabled"]:
        return "disabled"
    now = datetime.now(UTC)
    if u["valid_from"] and datetime.fromisoformat(u["valid_from"]) > now:
        return f"valid from {_when(u['valid_from'])}"
    if u["valid_until"]:
        ends = datetime.fromisoformat(u["valid_until"])
        return f"expired {_when(u['valid_until'])}" if ends <= now else f"active until {_when(u['valid_until'])}"
    return "active"


def _details(event: dict) -> str:
    parts = [f"reason={event['reason']}"] if event["reason"] else []
    parts += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in event["body"].items() if v is not None]
    return " ".join(parts)


def _when(iso: str, *, seconds: bool = False) -> str:
    value = datetime.fromisoformat(iso).astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M UTC")
