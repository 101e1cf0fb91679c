"""What every `wicket` command module shares: the logged-in API client (`connect`), the error every
command raises for an expected failure (`CliError`), step-up codes, times, and table/pair/JSON output.

`cli.py` builds the root app and turns `CliError` into an exit code; `cli_policy.py` and
`cli_inventory.py` add their commands to it. Local state (config.toml, token) is written only by
`wicket login`, in `cli.py`; here it is only read.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import ip_address
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer

from . import __version__

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
TIMEOUT_S = 15.0

JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
TotpOpt = Annotated[str | None, typer.Option("--totp", metavar="CODE", help="a fresh TOTP code for this change (else you are asked)")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]


class CliError(Exception):
    """An expected failure: printed as `wicket: <message>`, then `lines` (one problem each) and a hint,
    never as a traceback. `body` is the API's error body, when the controller refused."""

    def __init__(self, message: str, *, exit_code: int = EXIT_REFUSED, hint: str | None = None,
                 lines: list[str] | None = None, body: dict | None = None):
        super().__init__(message)
        self.exit_code, self.hint, self.lines, self.body = exit_code, hint, lines or [], body or {}


@dataclass(frozen=True)
class Options:
    """The root command's options, as ctx.obj for every command."""

    controller: str | None


# ---- the controller's API ----


class Api:
    """Calls to one controller; API refusals and transport failures become CliError."""

    def __init__(self, url: str, token: str | None = None):
        self.url, self._token = url, token

    def call(self, method: str, path: str, *, body: dict | None = None, params: dict | None = None,
             totp: str | None = None, text: bool = False) -> Any:
        """The answer's JSON (None when empty), or its text with `text=True` (e.g. a CSV export)."""
        headers = {"User-Agent": f"wicket-cli/{__version__}", "Accept": "text/csv, application/json" if text else "application/json"}
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
        if text:
            return res.text
        return _json(res) if res.content else None


    def download(self, path: str, out: str, *, params: dict | None = None, timeout: float = 600) -> dict[str, str]:
        """Stream a file the controller sends to `out` (0600, written whole or not at all); its headers."""
        headers = {"User-Agent": f"wicket-cli/{__version__}"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        tmp = f"{out}.part"
        try:
            with httpx.stream("GET", self.url + path, params=params, headers=headers, timeout=timeout) as res:
                if res.status_code >= 400:
                    res.read()
                    raise _refusal(res)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    for block in res.iter_bytes():
                        f.write(block)
                os.replace(tmp, out)
                return dict(res.headers)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the controller at {self.url} ({str(exc) or type(exc).__name__})",
                           exit_code=EXIT_UNREACHABLE) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _refusal(res: httpx.Response) -> CliError:
    try:
        data = res.json()
        detail, code = data["detail"], data.get("error")
    except (ValueError, KeyError, TypeError):
        return CliError(f"the controller answered {res.status_code} {res.reason_phrase}",
                        hint="is this the wicket controller's address?")
    hint = "wicket login" if code in ("not_authenticated", "invalid_token") else None
    # A rejected policy, device or CSV import lists every problem: one line each, not one long sentence.
    problems, rows = data.get("problems"), data.get("rows")
    if isinstance(rows, list) and rows:
        return CliError(f"{len(rows)} problem(s), nothing was written:", lines=[row_problem(r) for r in rows], body=data)
    if isinstance(problems, list) and (code == "policy_invalid" or len(problems) > 1):
        head = "the policy is not valid" if code == "policy_invalid" else "refused"
        return CliError(f"{head} ({len(problems)} problem(s), nothing changed):", lines=[_problem(p) for p in problems], body=data)
    return CliError(str(detail), hint=hint, body=data)


def _problem(p: Any) -> str:
    """A policy problem is a line of text ('file:line: …'); a device problem is {field, error}."""
    return f"{p.get('field')}: {p.get('error')}" if isinstance(p, dict) else str(p)


def row_problem(row: dict, file: str | None = None) -> str:
    """One rejected CSV row as 'FILE:LINE: ASSET: FIELD: error' (FILE only when known)."""
    where = f"{file}:{row.get('line')}" if file else f"line {row.get('line')}"
    asset = f" {row['asset_id']}:" if row.get("asset_id") else ""
    return f"{where}:{asset} {row.get('field')}: {row.get('error')}"


def _json(res: httpx.Response) -> Any:
    try:
        return res.json()
    except ValueError:
        raise CliError(f"{res.url} did not answer like the wicket API",
                       hint="is this the wicket controller's address?") from None


def connect(ctx: typer.Context) -> Api:
    """The API as the logged-in user; the token only ever goes to the controller that issued it."""
    state = state_dir()
    cfg = read_config(state)
    token = read_token(state)
    if token is None:
        raise CliError("you are not logged in", hint="wicket login")
    url = controller_url(ctx.obj.controller or cfg.controller)
    if cfg.controller and controller_url(cfg.controller) != url:
        raise CliError(f"you are logged in to {cfg.controller}, not {url}", exit_code=EXIT_USAGE,
                       hint=f"wicket --controller {url} login")
    return Api(url, token)


def controller_url(raw: str | None) -> str:
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


# ---- local state (read) ----


@dataclass(frozen=True)
class Config:
    controller: str | None = None
    user: str | None = None


def state_dir() -> Path:
    raw = os.environ.get("WICKET_CONFIG_DIR")
    return Path(raw).expanduser() if raw else Path.home() / ".config" / "wicket"


def read_config(state: Path) -> Config:
    path = state / "config.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{path}: {exc}", exit_code=EXIT_USAGE) from None
    for key in ("controller", "user"):
        if not isinstance(data.get(key, ""), str):
            raise CliError(f"{path}: {key} must be a string", exit_code=EXIT_USAGE)
    return Config(controller=data.get("controller") or None, user=data.get("user") or None)


def read_token(state: Path) -> str | None:
    path = state / "token"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    if mode & 0o077:
        raise CliError(f"{path} can be read by others", exit_code=EXIT_USAGE,
                       hint=f"chmod 600 {path}, or delete it and log in again")
    return path.read_text().strip() or None


# ---- input ----


def step_up(given: str | None) -> str:
    """The TOTP code for a change: --totp, else asked for (after every other question)."""
    return code(given if given is not None else typer.prompt("TOTP code for this change", hide_input=True))


def code(text: str) -> str:
    value = text.replace(" ", "").strip()
    if not (len(value) == 6 and value.isdigit()):
        raise CliError("a TOTP code is 6 digits", exit_code=EXIT_USAGE)
    return value


def segment(value: str) -> str:
    """A name for a URL path segment: refused, rather than quoted, when it would change the path."""
    if not value or any(c in value for c in "/?#%\\") or value in (".", ".."):
        raise CliError(f"{value!r} is not a valid name", exit_code=EXIT_USAGE)
    return value


def instant(text: str, flag: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CliError(f"{flag} {text!r} is not a time: use e.g. 2026-12-31T18:00Z", exit_code=EXIT_USAGE) from None
    if value.tzinfo is None:
        raise CliError(f"{flag} {text!r} needs a time zone, e.g. {text}Z for UTC", exit_code=EXIT_USAGE)
    return value


# ---- output ----


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


def table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def pairs(items: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _v in items) + 1
    for key, value in items:
        typer.echo(f"{(key + ':').ljust(width)}  {value}")


def when(iso: str | None, *, seconds: bool = False) -> str:
    if not iso:
        return "-"
    value = datetime.fromisoformat(iso).astimezone(UTC)
    return value.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M UTC")


def listed(values: list | None) -> str:
    return ", ".join(str(v) for v in values) if values else "-"


def replace_private(path: Path, data: bytes) -> None:
    """Write an owner-only file, replaced atomically: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
