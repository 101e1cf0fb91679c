"""`wicket request|sessions|status|config|extend|close|…`: sessions, the engineer's and the approver's
commands. `cli.py` adds them to the root app (`register`).

\b
  engineer:  request → (approval) → activate → config → extend → close; status [--watch] shows the countdown
  approver:  approvals → approve | reject; revoke; review (break-glass); access (who had a device when)

The config of a session can be downloaded once: `wicket config` fetches the text one time and makes every
output asked for (file, terminal QR, PNG, SVG) from it, on this machine.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from . import wgconf
from .cli_common import (
    EXIT_REFUSED,
    EXIT_USAGE,
    Api,
    CliError,
    JsonOpt,
    TotpOpt,
    connect,
    instant,
    listed,
    pairs,
    print_json,
    replace_private,
    segment,
    step_up,
    table,
    when,
)
from .policy.durations import format_duration

STATES = ("denied", "pending_approval", "approved", "rejected", "active", "closed", "expired", "revoked")
OPEN = ("pending_approval", "approved", "active")
WARN_S = 300  # `status` warns when less than this is left
_SESSION_ID = re.compile(r"s-[a-z2-9]{12}")
_WG_QUICK_NAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")  # wg-quick names the interface after the file
_pause = time.sleep  # `status --watch` waits with this between refreshes (tests replace it)

SessionArg = Annotated[str, typer.Argument(metavar="SESSION", help="the session ID, e.g. s-ypd8szdrfxq4")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="ASSET", help="the device's asset ID")]
ForOpt = Annotated[str | None, typer.Option("--for", metavar="DURATION", help="e.g. 30m, 1h30m (default: the task's)")]
ReasonOpt = Annotated[str, typer.Option("--reason", metavar="TEXT", help="why: a work order, a ticket, a fault")]
PublicKeyOpt = Annotated[str | None, typer.Option("--public-key", metavar="KEY",
                                                  help="bring your own key: your WireGuard public key (`wg pubkey`)")]
PublicKeyFileOpt = Annotated[Path | None, typer.Option("--public-key-file", metavar="FILE", help="the same, read from a file")]
TraceOpt = Annotated[bool, typer.Option("--trace", help="show every policy check, not only the failed ones")]


def register(app: typer.Typer) -> None:
    for name, command in (("request", request), ("sessions", sessions), ("status", status), ("approvals", approvals),
                          ("approve", approve), ("reject", reject), ("activate", activate), ("config", config),
                          ("extend", extend), ("close", close), ("revoke", revoke), ("break-glass", break_glass),
                          ("review", review), ("access", access)):
        app.command(name)(command)


# ---- the engineer ----


def request(ctx: typer.Context, device: DeviceOpt,
            task: Annotated[str, typer.Option("--task", metavar="NAME", help="the task (wicket tasks list)")],
            reason: ReasonOpt, duration: ForOpt = None, public_key: PublicKeyOpt = None,
            public_key_file: PublicKeyFileOpt = None,
            no_activate: Annotated[bool, typer.Option("--no-activate", help="when no approval is needed, do not open "
                                                      "the lane yet (`wicket activate` later)")] = False,
            trace: TraceOpt = False, totp: TotpOpt = None, as_json: JsonOpt = False) -> None:
    """Ask for access to one device for one task (needs a fresh TOTP code). The answer comes at once:
    active, waiting for approval, or denied with every failed check (exit 1)."""
    key = _public_key(public_key, public_key_file)
    body = {"device": device, "task": task, "reason": reason, "activate": not no_activate}
    body |= {k: v for k, v in (("duration", duration), ("public_key", key)) if v}
    api = connect(ctx)
    s = api.call("POST", "/api/v1/sessions", body=body, totp=step_up(totp))
    if as_json:
        print_json(s)
    elif trace:
        _trace(s["decision"])
    if s["state"] == "denied":
        if as_json:
            raise typer.Exit(EXIT_REFUSED)
        raise _denied(s["decision"], s["id"], traced=trace)
    if not as_json:
        _outcome(s)
    if s["activation_error"]:
        raise CliError(f"the lane did not open: {s['activation_error']}", hint=f"wicket activate {s['id']}")


def activate(ctx: typer.Context, sid: SessionArg, public_key: PublicKeyOpt = None, public_key_file: PublicKeyFileOpt = None,
             totp: TotpOpt = None, as_json: JsonOpt = False) -> None:
    """Open the lane of your approved session (needs a fresh TOTP code)."""
    key = _public_key(public_key, public_key_file)
    api = connect(ctx)
    s = _post(api, sid, "activate", {"public_key": key} if key else {}, totp=step_up(totp))
    _done(s, as_json, _outcome)


def config(ctx: typer.Context, sid: SessionArg,
           output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="write the wg-quick file (0600); - for stdout")] = None,
           qr: Annotated[bool, typer.Option("--qr", help="print a QR code in the terminal (WireGuard app: scan from QR code)")] = False,
           png: Annotated[Path | None, typer.Option("--png", metavar="FILE", help="write the QR code as PNG (0600)")] = None,
           svg: Annotated[Path | None, typer.Option("--svg", metavar="FILE", help="write the QR code as SVG (0600)")] = None,
           private_key_file: Annotated[Path | None, typer.Option("--private-key-file", metavar="FILE",
                                       help="bring your own key: fill your private key in here, on this machine")] = None,
           force: Annotated[bool, typer.Option("--force", help="overwrite files that exist")] = False) -> None:
    """Your session's one-time WireGuard config, as a file, a QR code, or both.

    It can be downloaded ONCE: ask for every output you need in this one call (e.g. -o FILE --qr); they
    are all made on this machine from the one download. Files are written 0600 and never overwritten
    without --force."""
    sid = _sid(sid)
    if output is None and not (qr or png or svg):
        raise CliError("where should the one-time config go? -o FILE, --qr, --png FILE or --svg FILE (several at once are fine)",
                       exit_code=EXIT_USAGE)
    to_stdout = output is not None and str(output) == "-"
    files = [p for p in (None if to_stdout else output, png, svg) if p is not None]
    _check_targets(files, force)
    private = _wg_key(_read_line(private_key_file, "--private-key-file"), "--private-key-file") if private_key_file else None
    api = connect(ctx)
    s = api.call("GET", f"/api/v1/sessions/{sid}")
    byok = s["key_mode"] == "byok"
    if private and not byok:
        raise CliError(f"session {sid}'s key was made by the controller and is in the config already: drop --private-key-file",
                       exit_code=EXIT_USAGE)
    if byok and not private and (qr or png or svg):
        raise CliError("you brought your own key, so a QR code of the downloaded config would lack it and not import: "
                       "add --private-key-file FILE", exit_code=EXIT_USAGE)
    try:
        text = api.call("GET", f"/api/v1/sessions/{sid}/config", params={"format": "conf"}, text=True)
    except CliError as exc:
        if exc.body.get("error") == "gone":
            raise CliError(f"already downloaded: {exc}", hint=f"wicket close {sid}, then wicket request …") from None
        raise
    say = _err if to_stdout else typer.echo  # keep stdout for the config itself
    if private:
        try:
            text = wgconf.with_private_key(text, private)
        except ValueError as exc:  # the download is spent: keep what came, say what is missing
            say(f"warning: could not fill in your private key ({exc}); the file keeps the placeholder")
    if to_stdout:
        sys.stdout.write(text)
    elif output is not None:
        _write_private(output, text.encode(), force)
    if png:
        _write_private(png, wgconf.qr_png(text), force)
    if svg:
        _write_private(svg, wgconf.qr_svg(text), force)
    if qr:
        typer.echo(wgconf.qr_terminal(text), err=to_stdout)
    _import_hint(say, s, output if not to_stdout else None, [p for p in (png, svg) if p], qr,
                 placeholder=wgconf.PLACEHOLDER in text)


def extend(ctx: typer.Context, sid: SessionArg,
           by: Annotated[str, typer.Option("--by", metavar="DURATION", help='how much longer, e.g. "15m"')],
           reason_code: Annotated[str, typer.Option("--reason-code", metavar="CODE", help="one of the task's codes (wicket tasks show TASK)")],
           note: Annotated[str, typer.Option("--note", metavar="TEXT")] = "",
           totp: TotpOpt = None, as_json: JsonOpt = False) -> None:
    """Extend your active session (needs a fresh TOTP code; some tasks need re-approval)."""
    api = connect(ctx)
    s = _post(api, sid, "extend", {"by": by, "reason_code": reason_code, "note": note}, totp=step_up(totp))

    def say(s: dict) -> None:
        if s["extension_request"]:
            typer.echo(f"Extension of {s['id']} by {by} requested: it waits for approval; the session still {_countdown(s)}.")
        else:
            typer.echo(f"Extended {s['id']} by {by}: it now {_countdown(s)}.")
    _done(s, as_json, say)


def close(ctx: typer.Context, sid: SessionArg,
          reason: Annotated[str | None, typer.Option("--reason", metavar="TEXT")] = None, as_json: JsonOpt = False) -> None:
    """End your session now (or withdraw your request)."""
    s = _post(connect(ctx), sid, "close", {"reason": reason} if reason else {})
    _done(s, as_json, lambda s: typer.echo(f"Closed {s['id']}" + ("; its lane is being removed." if s["node"] else ".")))


def status(ctx: typer.Context, sid: Annotated[str | None, typer.Argument(metavar="[SESSION]", help="default: your one open session")] = None,
           watch: Annotated[bool, typer.Option("--watch", "-w", help="refresh every second until the session ends (Ctrl-C stops)")] = False,
           as_json: JsonOpt = False) -> None:
    """One session in detail, with the time left."""
    api = connect(ctx)
    s = _get(api, sid) if sid else _my_open_session(api)
    if s is None:
        typer.echo("You have no open sessions (wicket sessions lists them all).")
        return
    if as_json and not watch:
        print_json(s)
        return
    _show(s)
    if watch:
        try:
            _watch(api, s)
        except KeyboardInterrupt:
            typer.echo("")


def sessions(ctx: typer.Context,
             every: Annotated[bool, typer.Option("--all", help="every session you may see (approver, soc, site_admin, admin), not only yours")] = False,
             state: Annotated[list[str] | None, typer.Option("--state", metavar="STATE", help=f"repeatable: {' | '.join(STATES)}")] = None,
             site: Annotated[str | None, typer.Option("--site", metavar="NAME")] = None,
             device: Annotated[str | None, typer.Option("--device", metavar="ASSET")] = None,
             unreviewed: Annotated[bool, typer.Option("--unreviewed", help="only break-glass sessions nobody has reviewed yet")] = False,
             limit: Annotated[int, typer.Option("--limit", metavar="N", min=1, max=1000)] = 100,
             as_json: JsonOpt = False) -> None:
    """Sessions, newest first: yours, or (--all) every one at your sites."""
    bad = [x for x in state or [] if x not in STATES]
    if bad:
        raise CliError(f"unknown state {bad[0]!r}: one of {', '.join(STATES)}", exit_code=EXIT_USAGE)
    params: dict[str, Any] = {"scope": "all" if every else "mine", "limit": limit, "state": state or []}
    params |= {k: v for k, v in (("site", site), ("device", device)) if v}
    if unreviewed:
        params["unreviewed"] = "true"
    rows = connect(ctx).call("GET", "/api/v1/sessions", params=params)
    if as_json:
        print_json(rows)
    elif rows:
        table(["ID", "STATE", "USER", "DEVICE", "TASK", "ENDS/ENDED", "LEFT"],
              [[s["id"], s["state"], s["user"], s["device"], _task(s), when(s["ended_at"] or s["end_at"]),
                _left(s["seconds_left"]) if s["seconds_left"] is not None else "-"] for s in rows])
    else:
        typer.echo("No sessions.")


# ---- approvers, the SOC ----


def approvals(ctx: typer.Context, trace: TraceOpt = False, as_json: JsonOpt = False) -> None:
    """Requests and extensions waiting for your approval, each with the policy's decision."""
    items = connect(ctx).call("GET", "/api/v1/approvals")
    if as_json:
        print_json(items)
        return
    if not items:
        typer.echo("Nothing waits for your approval.")
        return
    for n, item in enumerate(items):
        s, d = item["session"], item["session"]["decision"]
        if n:
            typer.echo("")
        if item["kind"] == "request":
            typer.echo(f"{s['id']}  request: {s['user']} asks for {_task(s)} on {s['device']} at {s['site']} for {s['duration']}")
            typer.echo(f"  reason:    {s['reason']}")
            typer.echo(f"  decision:  {d['reason']}")
            typer.echo(f"  lapses:    {when(s['expires_at'])} unless approved")
        else:
            ext = s["extension_request"]
            typer.echo(f"{s['id']}  extension: {s['user']} asks for {_by(ext)} more of {_task(s)} on {s['device']} at {s['site']}")
            typer.echo(f"  reason:    {ext['reason_code']}" + (f" ({ext['note']})" if ext.get("note") else ""))
            typer.echo(f"  now:       {_countdown(s)}")
        typer.echo(f"  approvals: {item['approvals_so_far']} of {item['approvals_required']}")
        typer.echo(f"  policy:    {d['policy_version']}")
        if trace:
            _trace(d, indent="  ")
    typer.echo("")
    typer.echo("Answer with: wicket approve|reject SESSION --reason TEXT")


def approve(ctx: typer.Context, sid: SessionArg, reason: Annotated[str, typer.Option("--reason", metavar="TEXT", help="why you approve")],
            totp: TotpOpt = None, as_json: JsonOpt = False) -> None:
    """Approve a request or an extension (approver at the site; never your own; needs a fresh TOTP code)."""
    api = connect(ctx)
    s = _post(api, sid, "approve", {"reason": reason}, totp=step_up(totp))
    _done(s, as_json, _approved)


def reject(ctx: typer.Context, sid: SessionArg, reason: Annotated[str, typer.Option("--reason", metavar="TEXT", help="why you reject")],
           as_json: JsonOpt = False) -> None:
    """Reject a request or an extension (approver at the site)."""
    s = _post(connect(ctx), sid, "reject", {"reason": reason})
    _done(s, as_json, lambda s: typer.echo(
        f"Rejected request {s['id']}." if s["state"] == "rejected" else f"Rejected the extension of {s['id']}; it still {_countdown(s)}."))


def revoke(ctx: typer.Context, sid: SessionArg, reason: Annotated[str, typer.Option("--reason", metavar="TEXT")],
           as_json: JsonOpt = False) -> None:
    """End someone's session now (approver at the site, soc, admin)."""
    s = _post(connect(ctx), sid, "revoke", {"reason": reason})
    _done(s, as_json, lambda s: typer.echo(f"Revoked {s['id']} ({s['user']}, {s['task']} on {s['device']})."))


def review(ctx: typer.Context, sid: SessionArg,
           note: Annotated[str, typer.Option("--note", metavar="TEXT", help="what you checked and concluded")],
           totp: TotpOpt = None, as_json: JsonOpt = False) -> None:
    """Review a break-glass session afterwards (a second person: approver, soc or admin at the site; fresh TOTP code)."""
    api = connect(ctx)
    s = _post(api, sid, "review", {"note": note}, totp=step_up(totp))
    _done(s, as_json, lambda s: typer.echo(f"Reviewed break-glass session {s['id']} (incident {s['incident']}, {s['user']})."))


def access(ctx: typer.Context, device: Annotated[str, typer.Argument(metavar="ASSET", help="the device's asset ID")],
           start: Annotated[str, typer.Option("--from", metavar="TIME", help="e.g. 2026-06-01T00:00Z")],
           end: Annotated[str | None, typer.Option("--to", metavar="TIME", help="default: now")] = None,
           as_json: JsonOpt = False) -> None:
    """Who had access to a device between two times (approver, soc, site_admin, admin at its site)."""
    params = {"from": instant(start, "--from").isoformat(),
              "to": instant(end, "--to").isoformat() if end else datetime.now(UTC).isoformat()}
    rows = connect(ctx).call("GET", f"/api/v1/devices/{segment(device)}/access", params=params)
    if as_json:
        print_json(rows)
    elif rows:
        table(["SESSION", "USER", "TASK", "FROM", "TO", "STATE", "APPROVED BY", "TUNNEL ADDRESS"],
              [[r["session_id"], r["user"], _task(r), when(r["start"], seconds=True), when(r["end"], seconds=True),
                r["state"] if r["state"] == "active" else r["end_reason"] or r["state"], listed(r["approved_by"]),
                r["tunnel_address"] or "-"] for r in rows])
    else:
        typer.echo(f"Nobody had access to {device} between {when(params['from'])} and {when(params['to'])}.")


# ---- break-glass ----


def break_glass(ctx: typer.Context, device: DeviceOpt,
                reason: Annotated[str, typer.Option("--reason", metavar="TEXT", help="what the emergency is")],
                incident: Annotated[str, typer.Option("--incident", metavar="ID", help="the incident or ticket")],
                task: Annotated[str | None, typer.Option("--task", metavar="NAME", help="default: the device type's one break-glass task")] = None,
                duration: ForOpt = None, public_key: PublicKeyOpt = None, public_key_file: PublicKeyFileOpt = None,
                trace: TraceOpt = False, totp: TotpOpt = None, as_json: JsonOpt = False) -> None:
    """EMERGENCY access without approval (break_glass grant at the site; fresh TOTP code). Payload is recorded,
    the SOC is alerted at once, and a second person must review the session afterwards."""
    key = _public_key(public_key, public_key_file)
    api = connect(ctx)
    task = task or _break_glass_task(api, device)
    for line in _BANNER:
        _err(line)
    body = {"device": device, "task": task, "reason": reason, "incident": incident}
    body |= {k: v for k, v in (("duration", duration), ("public_key", key)) if v}
    try:
        s = api.call("POST", "/api/v1/break-glass", body=body, totp=step_up(totp))
    except CliError as exc:
        decision = exc.body.get("decision")
        if not decision:
            raise
        if as_json:
            print_json(exc.body)
        elif trace:
            _trace(decision)
        raise _denied(decision, exc.body.get("session_id"), traced=trace or as_json, what="break-glass") from None
    if as_json:
        print_json(s)
        return
    if trace:
        _trace(s["decision"])
    _outcome(s)
    typer.echo(f"Incident {s['incident']}. Recording: {s['recording']}. A second person (approver, soc or admin at "
               f"{s['site']}) must review it: wicket review {s['id']} --note …")


_BANNER = (
    "=" * 72,
    "  BREAK-GLASS: emergency access WITHOUT approval.",
    "  Everything is recorded (payload included), the SOC is alerted now, and a",
    "  second person reviews this session afterwards. Use it only for an emergency.",
    "=" * 72,
)


def _break_glass_task(api: Api, device: str) -> str:
    """The device type's break-glass task, when there is exactly one; else a usage error naming the choices."""
    tasks = api.call("GET", "/api/v1/tasks")
    every = sorted(name for name, t in tasks.items() if t.get("break_glass"))
    try:
        device_type = api.call("GET", f"/api/v1/devices/{segment(device)}")["device_type"]
    except CliError as exc:
        if exc.exit_code != EXIT_REFUSED:
            raise
        raise CliError(f"name the task with --task: the type of {device} cannot be read ({exc})",
                       lines=[f"break-glass tasks: {listed(every)}"], exit_code=EXIT_USAGE) from None
    fits = sorted(name for name in every if device_type in tasks[name]["device_types"])
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise CliError(f"no task may be opened under break-glass on a {device_type} ({device}); the policy marks none")
    raise CliError(f"{device} ({device_type}) has {len(fits)} break-glass tasks: name one with --task",
                   lines=[f"  {name}" for name in fits], exit_code=EXIT_USAGE)


# ---- what the commands print ----


def _outcome(s: dict) -> None:
    """After a request, activation or break-glass: where the session stands, and the next step."""
    sid, what = s["id"], f"{s['task']} on {s['device']}"
    if s["state"] == "active":
        flows = listed([f"{f['protocol']} {f['transport']}/{f['port']}" for f in s["flows"]])
        typer.echo(f"Session {sid} is active: {what} ({s['device_address']}: {flows}), {s['duration']}.")
        typer.echo(f"It {_countdown(s)}.")
        key = " --private-key-file YOUR-KEY" if s["key_mode"] == "byok" else ""
        typer.echo(f"Next: wicket config {sid} -o {sid}.conf{key}   (once only; add --qr for a phone)")
    elif s["state"] == "pending_approval":
        d = s["decision"]
        typer.echo(f"Request {sid} waits for approval: {what}, {s['duration']}.")
        typer.echo(f"It needs {s['approvals_required']} approver(s) with the approver role at site {s['site']}, "
                   "none of them you.")
        for why in d.get("approval_reasons") or []:
            typer.echo(f"  why: {why}")
        typer.echo(f"It lapses at {when(s['expires_at'])} unless approved. Follow it: wicket status {sid} --watch")
    elif s["state"] == "approved":
        typer.echo(f"Session {sid} is approved: {what}, {s['duration']}. Open it when you are ready: wicket activate {sid}")
        typer.echo(f"The approval lapses at {when(s['expires_at'])}.")
    else:
        typer.echo(f"Session {sid} is {s['state']}.")


def _approved(s: dict) -> None:
    sid = s["id"]
    if s["state"] == "approved":
        opens = f"wicket grant activate {sid}" if s.get("kind") == "grant" else f"wicket activate {sid}"
        typer.echo(f"Approved {sid}: {s['user']} can open it ({opens}) until {when(s['expires_at'])}.")
    elif s["state"] == "pending_approval":
        typer.echo(f"Approved {sid}: {_approvals(s)} of {s['approvals_required']} approvals; it waits for another approver.")
    elif s["extension_request"]:
        typer.echo(f"Approved the extension of {sid}; it waits for another approver.")
    else:
        typer.echo(f"Approved the extension of {sid}: it now {_countdown(s)}.")


def _show(s: dict) -> None:
    items = [("session", s["id"]), ("state", _state(s)), ("user", s["user"]),
             ("device", f"{s['device']} at {s['site']}" + (f" ({s['device_address']})" if s["device_address"] else "")),
             ("task", _task(s)), ("reason", s["reason"]), ("requested", when(s["requested_at"], seconds=True) + " UTC")]
    if s["break_glass"]:
        review = f"by {s['reviewed_by']} at {when(s['reviewed_at'])}: {s['review_note']}" if s["reviewed_at"] else "owed"
        items += [("incident", s["incident"]), ("review", review)]
    asked = [a for a in s["approvals"] if a["kind"] == "request"]  # extensions' answers are on their own lines
    if s["approvals_required"] or asked:
        answers = "; ".join(f"{a['approver']} {a['verdict']}d ({a['reason']})" for a in asked)
        items.append(("approvals", f"{_approvals(s)} of {s['approvals_required']}" + (f": {answers}" if answers else "")))
    if s["state"] == "active":
        items.append(("ends", _countdown(s)))
    elif s["state"] in ("pending_approval", "approved"):
        items.append(("lapses", when(s["expires_at"])))
    if s["tunnel_address"]:
        flows = listed([f"{f['protocol']} {f['transport']}/{f['port']}" for f in s["flows"]])
        items.append(("lane", f"{s['tunnel_address']} → {s['device_address']} ({flows}) via {s['node']} port {s['listen_port']}"))
    if s["state"] == "active":
        items.append(("config", f"downloaded {when(s['config_downloaded_at'])}" if s["config_downloaded_at"] else
                      f"not downloaded yet: wicket config {s['id']} -o {s['id']}.conf" if s["config_available"] else "-"))
    for n, e in enumerate(s["extensions"], 1):
        items.append((f"extension {n}", f"+{_by(e)} ({e['reason_code']})" + (f", approved by {listed(e['approved_by'])}" if e.get("approved_by") else "")))
    if s["extension_request"]:
        items.append(("extension", f"+{_by(s['extension_request'])} ({s['extension_request']['reason_code']}) waits for approval"))
    items += [("recording", s["recording"]), ("policy", s["policy_version"])]
    pairs(items)
    _warn_if_ending(s)


def _watch(api: Api, s: dict) -> None:
    """Refresh every second while the session waits for approval or is live; then say how it stands."""
    sid, shown, tty = s["id"], None, sys.stdout.isatty()
    warned = _live(s) and s["seconds_left"] < WARN_S
    while s["state"] == "pending_approval" or _live(s):
        _pause(1)
        was, s = s["state"], _get(api, sid)
        if s["state"] != was and tty:
            typer.echo("")
        if not _live(s):
            continue
        if was != "active":
            typer.echo(f"{sid} is active now: it {_countdown(s)}")
        if not warned and s["seconds_left"] < WARN_S:
            warned = True
            if tty:
                typer.echo("")
            _warn_if_ending(s)
        line = f"{sid}: {_countdown(s)}"
        if tty:
            typer.echo(f"\r\033[K{line}", nl=False)
        elif shown != (s["end_at"], s["seconds_left"] // 60):  # a log, not a screen: a line a minute
            shown = (s["end_at"], s["seconds_left"] // 60)
            typer.echo(line)
    if tty:
        typer.echo("")
    if s["state"] == "approved":
        typer.echo(f"{sid} is approved: open it with wicket activate {sid}")
    elif s["state"] == "active":
        typer.echo(f"{sid} has reached its end time ({when(s['end_at'])}); the lane is closing")
    else:
        typer.echo(f"{sid} has ended: {_state(s)}")


def _warn_if_ending(s: dict) -> None:
    if _live(s) and s["seconds_left"] < WARN_S:
        hint = "" if s["break_glass"] else f"; to extend: wicket extend {s['id']} --by 15m --reason-code CODE"
        typer.echo(f"warning: {s['id']} ends in less than {WARN_S // 60} minutes{hint}")


def _import_hint(say, s: dict, conf: Path | None, images: list[Path], qr: bool, *, placeholder: bool) -> None:
    for path in filter(None, [conf, *images]):
        say(f"Wrote {path} (0600).")
    say(f"This was the only download of {s['id']}'s config: keep it private, and delete it after the session.")
    if placeholder:
        say(f"The file has a placeholder for your private key ({wgconf.PLACEHOLDER}): put your key there before use.")
    if conf is not None:
        say(f"  Linux, macOS:     sudo wg-quick up {conf.resolve()}   (and `wg-quick down` the same way when done)")
        say(f"  WireGuard app:    Import tunnel(s) from file → {conf.name}, then Activate")
        if not _WG_QUICK_NAME.fullmatch(conf.stem):
            say(f"note: wg-quick names the interface after the file; {conf.stem!r} is not a valid interface name "
                f"(at most 15 of a-z A-Z 0-9 _=+.-), so rename it first, e.g. {s['id']}.conf")
    if qr or images:
        say("  Phone:            WireGuard app → + → Scan from QR code")
    if s["end_at"]:
        say(f"The session {_countdown(s)}; the tunnel stops working then.")


def _trace(decision: dict, indent: str = "") -> None:
    typer.echo(f"{indent}policy checks ({decision['outcome']}, policy {decision['policy_version']}):")
    for c in decision["trace"]:
        typer.echo(f"{indent}  {c['result']:<14} {c['check']}: {c['reason'] or '-'}")


def _denied(decision: dict, sid: str | None, *, traced: bool, what: str = "request") -> CliError:
    failed = [c for c in decision["trace"] if c["result"] == "fail"]
    head = f"{what} {sid} denied" if sid else f"{what} denied"
    return CliError(f"{head}: {len(failed)} check(s) failed:", lines=[f"  {c['check']}: {c['reason']}" for c in failed],
                    hint=None if traced else "--trace shows every check")


def _countdown(s: dict) -> str:
    """"ends in 12m 30s at 14:05 UTC", measured on the controller's clock (its seconds_left)."""
    if s["seconds_left"] is None:
        return f"ended {when(s['ended_at'] or s['end_at'])}"
    end = datetime.fromisoformat(s["end_at"]).astimezone(UTC)
    now = end - timedelta(seconds=s["seconds_left"])
    at = end.strftime("%H:%M UTC") if end.date() == now.date() else when(s["end_at"])
    return f"ends in {_left(s['seconds_left'])} at {at}"


def _left(seconds: int) -> str:
    h, rest = divmod(max(0, int(seconds)), 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h {m}m"
    return f"{m}m {sec}s" if m else f"{sec}s"


def _state(s: dict) -> str:
    if s["state"] in ("closed", "expired", "revoked", "rejected"):
        by = f" by {s['ended_by']}" if s["ended_by"] and s["ended_by"] != "system" else ""
        why = f", {s['end_reason']}" if s["end_reason"] and s["end_reason"] not in (s["state"], "rejected") else ""
        return f"{s['state']}{by} at {when(s['ended_at'])}{why}"
    if s["state"] == "denied":
        return f"denied: {s['decision'].get('reason')}"
    return s["state"]


def _approvals(s: dict) -> int:
    return sum(1 for a in s["approvals"] if a["kind"] == "request" and a["verdict"] == "approve")


def _live(s: dict) -> bool:
    """Active and before its end; past it, the controller's clock is about to mark it expired."""
    return s["state"] == "active" and s["seconds_left"] is not None


def _task(s: dict) -> str:
    return s["task"] + (" (break-glass)" if s["break_glass"] else " (grant)" if s.get("kind") == "grant" else "")


def _by(ext: dict) -> str:
    return format_duration(timedelta(seconds=ext["by_s"]))


def _done(s: dict, as_json: bool, say) -> None:
    if as_json:
        print_json(s)
    else:
        say(s)


def _err(line: str) -> None:
    typer.echo(line, err=True)


# ---- calls and input ----


def _get(api: Api, sid: str) -> dict:
    return api.call("GET", f"/api/v1/sessions/{_sid(sid)}")


def _post(api: Api, sid: str, action: str, body: dict, totp: str | None = None) -> dict:
    return api.call("POST", f"/api/v1/sessions/{_sid(sid)}/{action}", body=body, totp=totp)


def _my_open_session(api: Api) -> dict | None:
    mine = api.call("GET", "/api/v1/sessions", params={"scope": "mine", "state": list(OPEN), "kind": "lane"})
    active = [s for s in mine if s["state"] == "active"]
    candidates = active if len(active) == 1 else mine
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    raise CliError(f"you have {len(candidates)} open sessions: name one", exit_code=EXIT_USAGE,
                   lines=[f"  {s['id']}  {s['state']:<16} {s['task']} on {s['device']}" for s in candidates])


def _sid(value: str) -> str:
    if not _SESSION_ID.fullmatch(value):
        raise CliError(f"{value!r} is not a session ID (s- and 12 letters or digits, e.g. s-ypd8szdrfxq4)", exit_code=EXIT_USAGE)
    return value


def _public_key(given: str | None, path: Path | None) -> str | None:
    if given and path:
        raise CliError("give --public-key or --public-key-file, not both", exit_code=EXIT_USAGE)
    if path:
        given = _read_line(path, "--public-key-file")
    return _wg_key(given.strip(), "--public-key") if given else None


def _read_line(path: Path, flag: str) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{flag} {path}: {exc.strerror if isinstance(exc, OSError) else exc}", exit_code=EXIT_USAGE) from None


def _wg_key(value: str, flag: str) -> str:
    """A WireGuard key as `wg genkey`/`wg pubkey` print it: 32 bytes in base64 (44 characters)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise CliError(f"{flag}: not a WireGuard key (44 characters of base64, as `wg genkey` and `wg pubkey` print)",
                       exit_code=EXIT_USAGE)
    return value


def _check_targets(paths: list[Path], force: bool) -> None:
    """Before the one download: every file can be written, and none is silently replaced."""
    if len({p.resolve() for p in paths}) != len(paths):
        raise CliError("-o, --png and --svg must name different files", exit_code=EXIT_USAGE)
    for p in paths:
        if p.exists() and (not force or p.is_dir()):
            raise CliError(f"{p} exists: the config is downloaded once, so nothing is overwritten without --force",
                           exit_code=EXIT_USAGE)
        if not p.parent.is_dir() or not os.access(p.parent, os.W_OK):
            raise CliError(f"cannot write {p}: {p.parent} is not a writable directory", exit_code=EXIT_USAGE)


def _write_private(path: Path, data: bytes, force: bool) -> None:
    try:
        _write_0600(path, data, force)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_0600(path: Path, data: bytes, force: bool) -> None:
    """Owner-only. Without --force an existing file is never replaced, even one made a moment ago."""
    if force:
        replace_private(path, data)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
