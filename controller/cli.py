"""`wicket`: the command line for people (engineers, administrators, the SOC). It talks to the
controller's HTTP API v1 and keeps its state in $WICKET_CONFIG_DIR (default ~/.config/wicket):

\b
  config.toml   the controller's URL and your user name, remembered at login
  token         your login token (0600): never printed, sent only to the controller that issued it

\b
  wicket [--controller URL] login [--user NAME] [--recovery-code]
  wicket whoami [--json] | logout | password | recovery-codes
  wicket users list|show|add|roles|disable|enable|delete|enrol-totp|set-password …
  wicket events [--subject NAME] [--type T] [--session ID] [--device ASSET] [--after SEQ] [--since T] [--until T] [--json]
  wicket policy check|diff|apply|show|history|explain …   (check works offline)
  wicket tasks list|show · wicket protocols · wicket device-types
  wicket sites list|show|add|update|delete|agent-add|agent-remove …
  wicket devices list|show|add|update|delete|import|export|passport|bind …
  wicket request|activate|config|extend|close|status [--watch]|sessions …   (sessions)
  wicket approvals|approve|reject|revoke|review|access · wicket break-glass …
  wicket grant open|list|show|approve|reject|activate|close|revoke …   (grants: devices' temporary flows)

The controller URL comes from --controller, else $WICKET_CONTROLLER, else config.toml. Changes
(accounts, your password and recovery codes, policy, sites, devices) need a fresh TOTP code (step-up):
--totp CODE, or you are asked.

\b
Exit status: 0 done, 1 refused (the reason is printed), 2 usage or configuration,
3 the controller cannot be reached; `wicket policy explain` exits 2 for a deny.
"""

from __future__ import annotations

import getpass
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from . import cli_agents, cli_audit, cli_grants, cli_inventory, cli_policy, cli_sessions
from .cli_common import (
    EXIT_REFUSED,
    EXIT_USAGE,
    Api,
    CliError,
    Config,
    JsonOpt,
    Options,
    TotpOpt,
    YesOpt,
    code,
    connect,
    controller_url,
    instant,
    pairs,
    print_json,
    read_config,
    read_token,
    replace_private,
    state_dir,
    step_up,
    table,
    when,
)

ROLES = ("engineer", "contractor", "approver", "site_admin", "soc", "admin", "break_glass")


class _Group(TyperGroup):
    # Every command runs inside the root group's invoke: the one place expected errors become exit codes.
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CliError as exc:
            typer.echo(f"wicket: {exc}", err=True)
            for line in exc.lines:
                typer.echo(line, err=True)
            if exc.hint:
                typer.echo(f"hint: {exc.hint}", err=True)
            raise typer.Exit(exc.exit_code) from None


app = typer.Typer(cls=_Group, name="wicket", help=__doc__, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False, rich_markup_mode=None)
users_app = typer.Typer(help="Accounts and roles (administrators; changes need a fresh TOTP code).",
                        no_args_is_help=True, rich_markup_mode=None)
app.add_typer(users_app, name="users")

RoleOpt = Annotated[list[str] | None, typer.Option("--role", metavar="ROLE[@SITE]", help=f"repeatable; ROLE is one of {', '.join(ROLES)}")]
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="the user name")]
PasswordStdinOpt = Annotated[bool, typer.Option("--password-stdin", help="read the password from the first line of stdin")]


@app.callback()
def _root(ctx: typer.Context,
          controller: Annotated[str | None, typer.Option("--controller", metavar="URL", envvar="WICKET_CONTROLLER",
                                                         help="the controller, e.g. https://wicket.example.org")] = None) -> None:
    ctx.obj = Options(controller=controller)


# ---- your login ----


@app.command()
def login(ctx: typer.Context,
          user: Annotated[str | None, typer.Option("--user", "-u", metavar="NAME", help="your user name")] = None,
          recovery_code: Annotated[bool, typer.Option("--recovery-code", help="use a recovery code instead of a TOTP code")] = False) -> None:
    """Log in with your password and a TOTP code (or a recovery code); the login is remembered."""
    state = state_dir()
    cfg = read_config(state)
    api = Api(controller_url(ctx.obj.controller or cfg.controller))
    api.call("GET", "/healthz")  # before anyone types a secret: is the controller there at all?
    username = user or typer.prompt("User name", default=cfg.user or _os_user())
    body = {"username": username, "password": typer.prompt("Password", hide_input=True), "mode": "token"}
    if recovery_code:
        body["recovery_code"] = typer.prompt("Recovery code", hide_input=True).strip()
    else:
        body["totp_code"] = code(typer.prompt("TOTP code", hide_input=True))
    out = api.call("POST", "/api/v1/auth/login", body=body)
    previous = _previous_login(state, cfg)
    _write_private(state / "token", out["token"] + "\n")
    _write_config(state, Config(controller=api.url, user=out["username"]))
    _end_login(previous)
    typer.echo(f"Logged in to {api.url} as {out['username']} (roles: {', '.join(out['roles']) or 'none'}).")
    typer.echo(f"The login ends at {when(out['expires_at'])}, or at {when(out['idle_expires_at'])} "
               "if unused (each command moves that on).")


@app.command()
def whoami(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Who you are logged in as, your roles, and when the login ends."""
    api = connect(ctx)
    me = api.call("GET", "/api/v1/auth/whoami")
    if as_json:
        print_json(me)
        return
    typer.echo(f"{me['username']} ({me['kind']}) at {api.url}")
    typer.echo(f"roles: {_roles(me['roles'])}")
    typer.echo(f"login ends {when(me['expires_at'])}")


@app.command()
def logout(ctx: typer.Context) -> None:
    """End your login on the controller and forget the token."""
    state = state_dir()
    if not (state / "token").exists():
        typer.echo("Not logged in.")
        return
    note = ""
    try:
        connect(ctx).call("POST", "/api/v1/auth/logout")
    except CliError as exc:
        if exc.exit_code != EXIT_REFUSED:
            raise  # unreachable or misconfigured: keep the token so a retry can still end the login
        note = f" (the controller says: {exc})"
    (state / "token").unlink(missing_ok=True)
    typer.echo(f"Logged out.{note}")


@app.command()
def password(ctx: typer.Context, totp: TotpOpt = None) -> None:
    """Change your own password (needs a fresh TOTP code)."""
    api = connect(ctx)
    current = typer.prompt("Current password", hide_input=True)
    new = typer.prompt("New password", hide_input=True, confirmation_prompt="Repeat the new password")
    api.call("POST", "/api/v1/auth/password", body={"current_password": current, "new_password": new},
             totp=step_up(totp))
    typer.echo("Password changed.")


@app.command("recovery-codes")
def recovery_codes(ctx: typer.Context, totp: TotpOpt = None) -> None:
    """New recovery codes for yourself, shown once; your earlier codes stop working."""
    api = connect(ctx)
    out = api.call("POST", "/api/v1/auth/recovery-codes", totp=step_up(totp))
    typer.echo("Your new recovery codes. They are shown only now, each works once, and your earlier codes")
    typer.echo("no longer work. Keep them offline; `wicket login --recovery-code` takes one.")
    for recovery in out["codes"]:
        typer.echo(f"  {recovery}")


# ---- accounts ----


@users_app.command("list")
def users_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Every account, deleted ones included."""
    rows = connect(ctx).call("GET", "/api/v1/users")
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("No users.")
        return
    table(["USER", "NAME", "KIND", "STATE", "TOTP", "ROLES"],
           [[u["username"], u["display_name"], u["kind"], _account_state(u), u["totp"], _roles(u["roles"])] for u in rows])


@users_app.command("show")
def users_show(ctx: typer.Context, name: NameArg, as_json: JsonOpt = False) -> None:
    """One account."""
    u = _find_user(connect(ctx), name)
    if as_json:
        print_json(u)
        return
    kind = u["kind"] + (f", sponsored by {u['sponsor']}" if u["sponsor"] else "")
    pairs([("user", u["username"]), ("display name", u["display_name"]), ("email", u["email"] or "-"),
            ("kind", kind), ("state", _account_state(u)), ("totp", u["totp"]), ("roles", _roles(u["roles"])),
            ("created", when(u["created_at"]))])


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
    api = connect(ctx)
    body["password"] = _new_password(f"Initial password for {name}", password_stdin)
    u = api.call("POST", "/api/v1/users", body=body, totp=step_up(totp))
    who = f"contractor {u['username']}, sponsored by {u['sponsor']} until {when(u['valid_until'])}" if contractor else u["username"]
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
    u = api.call("PUT", f"/api/v1/users/{u['id']}/roles", body={"roles": grants}, totp=step_up(totp))
    typer.echo(f"{name} now has the roles: {_roles(u['roles'])}." if u["roles"] else f"{name} has no roles now.")


@users_app.command("disable")
def users_disable(ctx: typer.Context, name: NameArg, totp: TotpOpt = None) -> None:
    """Disable an account: its logins end at once, and it cannot log in until enabled."""
    api, u = _target(ctx, name)
    api.call("POST", f"/api/v1/users/{u['id']}/disable", totp=step_up(totp))
    typer.echo(f"Disabled {name}; their logins have ended.")


@users_app.command("enable")
def users_enable(ctx: typer.Context, name: NameArg, totp: TotpOpt = None) -> None:
    """Enable a disabled account again."""
    api, u = _target(ctx, name)
    api.call("POST", f"/api/v1/users/{u['id']}/enable", totp=step_up(totp))
    typer.echo(f"Enabled {name}.")


@users_app.command("delete")
def users_delete(ctx: typer.Context, name: NameArg,
                 yes: YesOpt = False,
                 totp: TotpOpt = None) -> None:
    """Delete an account: its secrets are wiped and its logins end; the name stays in the records and is never reused."""
    api, u = _target(ctx, name)
    if not yes:
        typer.confirm(f"Delete {name} ({u['display_name']})? This cannot be undone", abort=True)
    api.call("DELETE", f"/api/v1/users/{u['id']}", totp=step_up(totp))
    typer.echo(f"Deleted {name}.")


@users_app.command("enrol-totp")
def users_enrol_totp(ctx: typer.Context, name: NameArg,
                     qr: Annotated[bool, typer.Option("--qr", help="also print the enrolment as a QR code")] = False,
                     totp: TotpOpt = None) -> None:
    """Give an account a new TOTP secret, shown once; any earlier secret stops working."""
    api, u = _target(ctx, name)
    out = api.call("POST", f"/api/v1/users/{u['id']}/totp", totp=step_up(totp))
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
    api.call("PUT", f"/api/v1/users/{u['id']}/password", body={"password": new}, totp=step_up(totp))
    typer.echo(f"Password set for {name}.")


# ---- events ----


@app.command()
def events(ctx: typer.Context,
           subject: Annotated[str | None, typer.Option("--subject", metavar="NAME", help="only events about this user")] = None,
           after: Annotated[int, typer.Option("--after", metavar="SEQ", min=0, help="only events after this sequence number")] = 0,
           since: Annotated[str | None, typer.Option("--since", metavar="TIME", help="only events at or after this time")] = None,
           until: Annotated[str | None, typer.Option("--until", metavar="TIME", help="only events at or before this time")] = None,
           type_: Annotated[str | None, typer.Option("--type", metavar="TYPE", help="e.g. session.approve")] = None,
           session: Annotated[str | None, typer.Option("--session", metavar="ID")] = None,
           device: Annotated[str | None, typer.Option("--device", metavar="ASSET")] = None,
           limit: Annotated[int, typer.Option("--limit", metavar="N", min=1, max=1000)] = 100,
           as_json: JsonOpt = False) -> None:
    """The audit chain's records, oldest first (admin, soc). To check them, see `wicket audit`."""
    params: dict[str, Any] = {"after": after, "limit": limit}
    for key, value in (("subject", subject), ("type", type_), ("session", session), ("device", device)):
        if value:
            params[key] = value
    if since:
        params["since"] = instant(since, "--since").isoformat()
    if until:
        params["until"] = instant(until, "--until").isoformat()
    rows = connect(ctx).call("GET", "/api/v1/events", params=params)
    if as_json:
        print_json(rows)
    elif rows:
        table(["SEQ", "TIME (UTC)", "CATEGORY", "TYPE", "RESULT", "ACTOR", "SUBJECT", "SOURCE", "DETAILS"],
               [[e["seq"], when(e["at"], seconds=True), e["category"], e["type"], e["result"], e["actor"] or "-",
                 e["subject"] or "-", e["source"] or "-", _details(e)] for e in rows])
    else:
        typer.echo("No events.")
    if len(rows) == limit:
        typer.echo(f"(more: wicket events --after {rows[-1]['seq']})", err=True)


# policy, sites and devices, sessions: their own modules, listed after the commands above
cli_policy.register(app)
cli_inventory.register(app)
cli_sessions.register(app)
cli_grants.register(app)
cli_agents.register(app)
cli_audit.register(app)


# ---- logins ----


def _previous_login(state: Path, cfg: Config) -> tuple[str, str] | None:
    try:
        token = read_token(state)
        return (controller_url(cfg.controller), token) if token and cfg.controller else None
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
    api = connect(ctx)
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
    out = {"sponsor": sponsor, "valid_until": instant(until, "--until").isoformat()}
    if valid_from:
        out["valid_from"] = instant(valid_from, "--from").isoformat()
    return out


def _new_password(prompt: str, from_stdin: bool) -> str:
    if not from_stdin:
        return typer.prompt(prompt, hide_input=True, confirmation_prompt="Repeat it")
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise CliError("--password-stdin: the first line of stdin is empty", exit_code=EXIT_USAGE)
    return line


# ---- local state (written only here, at login) ----


def _write_config(state: Path, cfg: Config) -> None:
    # JSON string syntax is valid TOML basic-string syntax for everything json.dumps emits
    lines = ["# written by `wicket login`"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in (("controller", cfg.controller), ("user", cfg.user)) if value]
    _write_private(state / "config.toml", "\n".join(lines) + "\n")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    replace_private(path, text.encode())


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return None


# ---- output ----


def _roles(grants: list[dict]) -> str:
    return ", ".join(f"{g['role']}@{g['site'] or '*'}" for g in grants) or "none"


def _account_state(u: dict) -> str:
    if u["deleted"]:
        return "deleted"
    if u["disabled"]:
        return "disabled"
    now = datetime.now(UTC)
    if u["valid_from"] and datetime.fromisoformat(u["valid_from"]) > now:
        return f"valid from {when(u['valid_from'])}"
    if u["valid_until"]:
        ends = datetime.fromisoformat(u["valid_until"])
        return f"expired {when(u['valid_until'])}" if ends <= now else f"active until {when(u['valid_until'])}"
    return "active"


def _details(event: dict) -> str:
    parts = [f"reason={event['reason']}"] if event["reason"] else []
    parts += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in event["body"].items() if v is not None]
    return " ".join(parts)
