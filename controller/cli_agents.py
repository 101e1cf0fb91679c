"""`wicket agents …` and `wicket sites join-token …`: enrolling routers' agents and watching their links.

  wicket sites join-token SITE [--ttl 1h]          a one-time join token (shown once) and the enrol command
  wicket sites join-tokens SITE                    the site's tokens, without secrets
  wicket sites join-token-revoke ID                revoke an unused token
  wicket agents [--site SITE] [--json]             enrolment, link, applied generation, version, clock
  wicket agents revoke NAME --reason TEXT          cut an agent off: certificates revoked, link closed
"""

from __future__ import annotations

from typing import Annotated

import typer

from .cli_common import TotpOpt, connect, print_json, segment, step_up, table, when
from .cli_inventory import sites_app

agents_app = typer.Typer(help="Node agents: enrolment and the live link (site_admin, soc, admin).",
                         invoke_without_command=True, rich_markup_mode=None)



def register(app: typer.Typer) -> None:
    app.add_typer(agents_app, name="agents")


@sites_app.command("join-token")
def join_token(ctx: typer.Context, site: Annotated[str, typer.Argument(metavar="SITE")],
               ttl: Annotated[str | None, typer.Option("--ttl", metavar="DURATION", help="default 1h, at most 7d")] = None,
               controller: Annotated[str, typer.Option("--link", metavar="HOST:PORT",
                                                       help="the controller's agent link as routers reach it")] = "CONTROLLER:7443",
               totp: TotpOpt = None) -> None:
    """A one-time join token for a router's agent at SITE. Shown once: hand it over like a password."""
    api = connect(ctx)
    made = api.call("POST", f"/api/v1/sites/{segment(site)}/join-tokens", body={"ttl": ttl}, totp=step_up(totp))
    typer.echo(f"Join token {made['id']} for site {made['site']}, usable once until {when(made['expires_at'])}.")
    typer.echo("It is shown only now. On the router, as root:")
    typer.echo(f"  wicket-agent enroll --controller {controller} --node-id NAME   # paste the token when asked")
    typer.echo("")
    typer.echo(made["token"])


@sites_app.command("join-tokens")
def join_tokens(ctx: typer.Context, site: Annotated[str, typer.Argument(metavar="SITE")],
                as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """A site's join tokens (never their secrets)."""
    rows = connect(ctx).call("GET", f"/api/v1/sites/{segment(site)}/join-tokens")
    if as_json:
        print_json(rows)
        return
    table(["ID", "STATE", "MADE BY", "EXPIRES", "USED BY"],
          [[t["id"], t["state"], t["created_by"], when(t["expires_at"]), t["used_by"] or "-"] for t in rows])


@sites_app.command("join-token-revoke")
def join_token_revoke(ctx: typer.Context, ident: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke an unused join token."""
    connect(ctx).call("DELETE", f"/api/v1/join-tokens/{segment(ident)}")
    typer.echo(f"Join token {ident} revoked.")


@agents_app.callback()
def agents(ctx: typer.Context, site: Annotated[str | None, typer.Option("--site", metavar="SITE")] = None,
           as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List node agents with their link state."""
    if ctx.invoked_subcommand is not None:
        return
    rows = connect(ctx).call("GET", "/api/v1/agents", params={"site": site} if site else None)
    if as_json:
        print_json(rows)
        return
    table(["AGENT", "SITE", "LINK", "LAST SEEN", "GENERATION", "LANES", "VERSION", "CLOCK", "CERT UNTIL"],
          [[a["name"], a["site"], _link(a), when(a["last_seen"]), f"{a['applied_generation']}/{a['generation']}", a["lanes"],
            a["agent_version"] or "-", {True: "synced", False: "NOT SYNCED", None: "-"}[a["clock_synchronized"]],
            when(a["certificate_not_after"])] for a in rows])
    for a in rows:
        if a["last_error"]:
            typer.echo(f"{a['name']}: {a['last_error']}")


@agents_app.command("revoke")
def revoke(ctx: typer.Context, name: Annotated[str, typer.Argument(metavar="NAME")],
           reason: Annotated[str, typer.Option("--reason", metavar="TEXT")], totp: TotpOpt = None) -> None:
    """Revoke an agent: its certificates stop working and its live link is cut. Enrol it again with a new token."""
    connect(ctx).call("POST", f"/api/v1/agents/{segment(name)}/revoke", body={"reason": reason}, totp=step_up(totp))
    typer.echo(f"Agent {name} revoked; its link is cut. Its lanes keep their end times on the router.")


def _link(a: dict) -> str:
    if a["revoked_at"]:
        return "revoked"
    if not a["enrolled_at"]:
        return "not enrolled"
    return "connected" if a["connected"] else "down"
