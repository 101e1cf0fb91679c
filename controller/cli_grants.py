"""`wicket grant …`: temporary flows for devices' own traffic (a firmware window, commissioning), for one
device or a group. `cli.py` adds the group to the root app (`register`); `wicket grants` is the same.

\b
  wicket grant open TASK --device ASSET [--device ASSET]... | --type TYPE --site SITE  [--for 2h] --reason TEXT [--no-activate]
  wicket grant list [--all] [--state S]... [--site S] [--device A] [--group G] [--task T] [--json]
  wicket grant show ID|GROUP [--json]
  wicket grant approve|reject ID|GROUP --reason TEXT        (approver at the devices' site, not the requester)
  wicket grant activate ID|GROUP                              (the requester, once approved)
  wicket grant close ID|GROUP --reason TEXT                   (sign-off: the requester ends them early)
  wicket grant revoke ID|GROUP --reason TEXT                  (approver, soc, admin)

ID is a grant's session ID (s-…), GROUP the ID of the grants requested together (g-…): an action on a
group acts on each of its grants that it fits. Opening, approving and activating need a fresh TOTP code.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer

from .cli_common import (
    EXIT_USAGE,
    CliError,
    JsonOpt,
    TotpOpt,
    connect,
    listed,
    pairs,
    print_json,
    step_up,
    table,
    when,
)

STATES = ("pending_approval", "approved", "rejected", "opening", "active", "closed", "expired", "revoked")
_REF = re.compile(r"[sg]-[a-z2-9]{12}")

grant_app = typer.Typer(help="Grants: temporary flows for devices' own traffic, one device or a group.",
                        no_args_is_help=True, rich_markup_mode=None)

RefArg = Annotated[str, typer.Argument(metavar="ID|GROUP", help="a grant (s-…) or a group of grants (g-…)")]
ReasonOpt = Annotated[str, typer.Option("--reason", metavar="TEXT", help="why: recorded with the action")]


def register(app: typer.Typer) -> None:
    app.add_typer(grant_app, name="grant")
    app.add_typer(grant_app, name="grants", hidden=True)


@grant_app.command("open")
def grant_open(ctx: typer.Context, task: Annotated[str, typer.Argument(metavar="TASK", help="a grant task of the policy")],
               reason: ReasonOpt,
               device: Annotated[list[str] | None, typer.Option("--device", metavar="ASSET", help="repeatable")] = None,
               device_type: Annotated[str | None, typer.Option("--type", metavar="TYPE", help="every active device of this type …")] = None,
               site: Annotated[str | None, typer.Option("--site", metavar="SITE", help="… at this site")] = None,
               duration: Annotated[str | None, typer.Option("--for", metavar="DURATION", help="e.g. 2h (default: the task's)")] = None,
               no_activate: Annotated[bool, typer.Option("--no-activate", help="when no approval is needed, do not open "
                                                         "them yet (`wicket grant activate` later)")] = False,
               totp: TotpOpt = None, as_json: JsonOpt = False) -> None:
    """Ask for a grant on devices: one per device, decided all or nothing by the policy. Needs a fresh TOTP code."""
    by_type = device_type is not None or site is not None
    if bool(device) == by_type or (by_type and not (device_type and site)):
        raise CliError("name the devices (--device, repeatable), or a type and a site (--type and --site)", exit_code=EXIT_USAGE)
    body: dict[str, Any] = {"task": task, "reason": reason, "activate": not no_activate}
    body |= {"devices": device} if device else {"device_type": device_type, "site": site}
    if duration:
        body["duration"] = duration
    api = connect(ctx)
    try:
        out = api.call("POST", "/api/v1/grants", body=body, totp=step_up(totp))
    except CliError as exc:
        if exc.body.get("refusals"):
            exc.lines = [f"  {r['device']}: {r['reason']}" for r in exc.body["refusals"]]
            exc.hint = "no grant was created; ask again without those devices, or once they qualify"
        raise
    if as_json:
        print_json(out)
        return
    _say_group(out)
    if out["activation_error"]:
        raise CliError(f"the grants did not open: {out['activation_error']}", hint=f"wicket grant activate {out['grant_group']}")


@grant_app.command("list")
def grant_list(ctx: typer.Context,
               every: Annotated[bool, typer.Option("--all", help="every grant you may see, not only yours")] = False,
               state: Annotated[list[str] | None, typer.Option("--state", metavar="STATE", help=f"repeatable: {' | '.join(STATES)}")] = None,
               site: Annotated[str | None, typer.Option("--site", metavar="SITE")] = None,
               device: Annotated[str | None, typer.Option("--device", metavar="ASSET")] = None,
               group: Annotated[str | None, typer.Option("--group", metavar="GROUP")] = None,
               task: Annotated[str | None, typer.Option("--task", metavar="TASK")] = None,
               limit: Annotated[int, typer.Option("--limit", metavar="N", min=1, max=1000)] = 200,
               as_json: JsonOpt = False) -> None:
    """Grants, newest first: yours, or (--all) every one at your sites."""
    bad = [x for x in state or [] if x not in STATES]
    if bad:
        raise CliError(f"unknown state {bad[0]!r}: one of {', '.join(STATES)}", exit_code=EXIT_USAGE)
    params: dict[str, Any] = {"scope": "all" if every else "mine", "limit": limit, "state": state or []}
    params |= {k: v for k, v in (("site", site), ("device", device), ("group", group), ("task", task)) if v}
    rows = connect(ctx).call("GET", "/api/v1/grants", params=params)
    if as_json:
        print_json(rows)
    elif rows:
        _table(rows, with_user=True)
    else:
        typer.echo("No grants.")


@grant_app.command("show")
def grant_show(ctx: typer.Context, ref: RefArg, as_json: JsonOpt = False) -> None:
    """A grant, or every grant of a group, with its flows and where it stands."""
    out = connect(ctx).call("GET", f"/api/v1/grants/{_ref(ref)}")
    if as_json:
        print_json(out)
        return
    if len(out["grants"]) == 1:
        g = out["grants"][0]
        items = [("grant", g["id"]), ("group", g["grant_group"] or "-"), ("state", g["state"]), ("user", g["user"]),
                 ("device", f"{g['device']} at {g['site']}" + (f" ({g['device_address']})" if g["device_address"] else "")),
                 ("task", g["task"]), ("reason", g["reason"]), ("decision", g["decision_reason"]),
                 ("approvals", f"{g['approvals']} of {g['approvals_required']}"), ("duration", g["duration"])]
        if g["flows"]:
            items.append(("flows", listed([_flow(f) for f in g["flows"]])))
        items += [("ends", when(g["end_at"])) if g["state"] in ("opening", "active") else ("ended", when(g["ended_at"]))]
        if g["end_reason"]:
            items.append(("end reason", f"{g['end_reason']} (by {g['ended_by']})"))
        pairs(items)
        return
    typer.echo(f"Group {out['grant_group']}: {out['task']}, {len(out['grants'])} grant(s)")
    _table(out["grants"], with_user=False)


@grant_app.command("approve")
def grant_approve(ctx: typer.Context, ref: RefArg, reason: ReasonOpt, totp: TotpOpt = None, as_json: JsonOpt = False) -> None:
    """Approve a grant, or every grant of a group that waits for you (needs a fresh TOTP code)."""
    out = connect(ctx).call("POST", f"/api/v1/grants/{_ref(ref)}/approve", body={"reason": reason}, totp=step_up(totp))
    _done(out, as_json, "Approved")


@grant_app.command("reject")
def grant_reject(ctx: typer.Context, ref: RefArg, reason: ReasonOpt, as_json: JsonOpt = False) -> None:
    """Reject a grant, or every grant of a group that waits for approval."""
    out = connect(ctx).call("POST", f"/api/v1/grants/{_ref(ref)}/reject", body={"reason": reason})
    _done(out, as_json, "Rejected")


@grant_app.command("activate")
def grant_activate(ctx: typer.Context, ref: RefArg, totp: TotpOpt = None, as_json: JsonOpt = False) -> None:
    """Open your approved grant(s): the site's agent adds the flows until the end time (needs a fresh TOTP code)."""
    out = connect(ctx).call("POST", f"/api/v1/grants/{_ref(ref)}/activate", totp=step_up(totp))
    _done(out, as_json, "Opened")


@grant_app.command("close")
def grant_close(ctx: typer.Context, ref: RefArg, reason: ReasonOpt, as_json: JsonOpt = False) -> None:
    """Sign off: end your grant(s) now; the agent takes the flows away and the reason is recorded."""
    out = connect(ctx).call("POST", f"/api/v1/grants/{_ref(ref)}/close", body={"reason": reason})
    _done(out, as_json, "Closed")


@grant_app.command("revoke")
def grant_revoke(ctx: typer.Context, ref: RefArg, reason: ReasonOpt, as_json: JsonOpt = False) -> None:
    """End someone's grant(s) now (approver at the site, soc, admin)."""
    out = connect(ctx).call("POST", f"/api/v1/grants/{_ref(ref)}/revoke", body={"reason": reason})
    _done(out, as_json, "Revoked")


# ---- what the commands print ----


def say_grant(g: dict, indent: str = "") -> None:
    """Where one grant stands, and the next step (also for the commissioning grant of `wicket devices bind`)."""
    what = f"{g['task']} on {g['device']}"
    if g["state"] == "active":
        typer.echo(f"{indent}Grant {g['id']} is active: {what} ({listed([_flow(f) for f in g['flows']])}) until {when(g['end_at'])}.")
        typer.echo(f"{indent}Sign off when done: wicket grant close {g['id']} --reason TEXT")
    elif g["state"] == "pending_approval":
        typer.echo(f"{indent}Grant {g['id']} waits for approval: {what}, {g['duration']} "
                   f"({g['approvals_required']} approver(s) at {g['site']}, not you).")
        typer.echo(f"{indent}Once approved, open it: wicket grant activate {g['id']}")
    elif g["state"] == "approved":
        typer.echo(f"{indent}Grant {g['id']} is approved: {what}. Open it: wicket grant activate {g['id']}")
    else:
        typer.echo(f"{indent}Grant {g['id']} is {g['state']}: {what}.")


def _say_group(out: dict) -> None:
    grants = out["grants"]
    if len(grants) == 1:
        say_grant(grants[0])
        return
    counts: dict[str, int] = {}
    for g in grants:
        counts[g["state"]] = counts.get(g["state"], 0) + 1
    states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    typer.echo(f"Group {out['grant_group']}: {out['task']} on {len(grants)} devices ({states}).")
    if counts.get("pending_approval"):
        typer.echo(f"Once approved, open them: wicket grant activate {out['grant_group']}")
    if counts.get("active"):
        typer.echo(f"Sign off when done: wicket grant close {out['grant_group']} --reason TEXT")


def _done(out: dict, as_json: bool, verb: str) -> None:
    if as_json:
        print_json(out)
        return
    grants = out["grants"]
    if len(grants) == 1:
        say_grant(grants[0])
    else:
        typer.echo(f"{verb} group {out['grant_group']}:")
        _table(grants, with_user=False)


def _table(rows: list[dict], *, with_user: bool) -> None:
    header = ["ID", "GROUP", "STATE", *(["USER"] if with_user else []), "DEVICE", "TASK", "ENDS/ENDED"]
    table(header, [[g["id"], g["grant_group"] or "-", g["state"], *([g["user"]] if with_user else []), g["device"],
                    g["task"], when(g["ended_at"] or g["end_at"])] for g in rows])


def _flow(f: dict) -> str:
    return f"{f['protocol']} {f['transport']}/{','.join(str(p) for p in f['ports'])} → {', '.join(f['to'])}"


def _ref(value: str) -> str:
    if not _REF.fullmatch(value):
        raise CliError(f"{value!r} is not a grant (s-…) or group (g-…) ID", exit_code=EXIT_USAGE)
    return value
