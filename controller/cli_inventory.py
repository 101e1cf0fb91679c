"""`wicket sites …` and `wicket devices …`: the inventory (sites, their node agents, device passports).
`cli.py` adds these commands to the root app (`register`). Changes need site_admin at the site (or
admin) and a fresh TOTP code.

\b
  wicket sites list|show NAME [--json]
  wicket sites add NAME --display-name TEXT --time-zone TZ --tunnel-pool CIDR --ports MIN-MAX --endpoint HOST
                        [--lan-network CIDR]... [--window NAME]... [--unpassported router|deny] [--device-network CIDR]...
  wicket sites update NAME [the same options] [--clear lan-networks|windows|device-networks]
  wicket sites delete NAME [--yes] | agent-add SITE NAME [--description TEXT] | agent-remove SITE NAME
  wicket devices list [--site NAME] [--type TYPE] [--lifecycle STATE] [--prefix TEXT] [--json]
  wicket devices show ASSET [--json] | delete ASSET [--yes]
  wicket devices add ASSET --type TYPE --site NAME --address ADDR... [--mac --iccid --eid --imsi... --firmware
                         --lifecycle --last-seen --port PROTO=PORT... --description]
  wicket devices update ASSET [the same options; only those given change] [--clear FIELD]...
  wicket devices import FILE [--update] [--dry-run] | export [--site NAME] [-o FILE]
  wicket devices passport ASSET [--verify]
  wicket devices bind ASSET --iccid ICCID [--imsi IMSI]... [--eid EID] [--mac MAC] [--address ADDR]... [--rebind]
  (`wicket device …` is the same group)
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from nodeagent.wire import SignedPassport

from . import cli_grants
from .cli_common import (
    EXIT_USAGE,
    CliError,
    JsonOpt,
    TotpOpt,
    YesOpt,
    connect,
    instant,
    listed,
    pairs,
    print_json,
    row_problem,
    segment,
    step_up,
    table,
    when,
)

PAGE = 1000
LIFECYCLES = ("provisioned", "active", "quarantined", "decommissioned")
SITE_CLEARABLE = {"lan-networks": ("lan_networks", []), "windows": ("change_windows", []),
                  "device-networks": ("device_networks", [])}
UNPASSPORTED = ("router", "deny")
DEVICE_CLEARABLE = {"mac": ("mac", None), "iccid": ("iccid", None), "eid": ("eid", None), "imsis": ("imsis", []),
                    "firmware": ("firmware", None), "last-seen": ("last_seen", None), "ports": ("ports", {}),
                    "description": ("description", "")}

sites_app = typer.Typer(help="Sites and their node agents (changes: admin, or site_admin of the site).",
                        no_args_is_help=True, rich_markup_mode=None)
devices_app = typer.Typer(help="Device passports (changes: site_admin of the device's site, or admin).",
                          no_args_is_help=True, rich_markup_mode=None)


def register(app: typer.Typer) -> None:
    app.add_typer(sites_app, name="sites")
    app.add_typer(devices_app, name="devices")
    app.add_typer(devices_app, name="device", hidden=True)  # `wicket device bind …` reads naturally too


SiteArg = Annotated[str, typer.Argument(metavar="NAME", help="the site's name")]
AssetArg = Annotated[str, typer.Argument(metavar="ASSET", help="the device's asset ID")]
DisplayNameOpt = Annotated[str | None, typer.Option("--display-name", metavar="TEXT")]
TimeZoneOpt = Annotated[str | None, typer.Option("--time-zone", metavar="TZ", help="e.g. Europe/Berlin; change windows use it")]
PoolOpt = Annotated[str | None, typer.Option("--tunnel-pool", metavar="CIDR", help="engineers' tunnel addresses, e.g. 100.64.0.0/22")]
PortsOpt = Annotated[str | None, typer.Option("--ports", metavar="MIN-MAX", help="lane listen ports, e.g. 51000-51999")]
EndpointOpt = Annotated[str | None, typer.Option("--endpoint", metavar="HOST", help="host or address engineers' clients dial")]
LanOpt = Annotated[list[str] | None, typer.Option("--lan-network", metavar="CIDR", help="repeatable; device addresses must lie inside")]
WindowOpt = Annotated[list[str] | None, typer.Option("--window", metavar="NAME", help="repeatable; a change window of the policy")]
UnpassportedOpt = Annotated[str | None, typer.Option("--unpassported", metavar="router|deny",
                                                     help="hosts in the device networks without an active passport: "
                                                          "left to the router's firewall (router), or dropped (deny)")]
DeviceNetOpt = Annotated[list[str] | None, typer.Option("--device-network", metavar="CIDR",
                                                        help="repeatable; where the site's devices live (needed for deny)")]
TypeOpt = Annotated[str | None, typer.Option("--type", metavar="TYPE", help="a device type of the policy")]
SiteOpt = Annotated[str | None, typer.Option("--site", metavar="NAME")]
AddressOpt = Annotated[list[str] | None, typer.Option("--address", metavar="ADDR", help="repeatable: the device's addresses")]
MacOpt = Annotated[str | None, typer.Option("--mac", metavar="MAC")]
IccidOpt = Annotated[str | None, typer.Option("--iccid", metavar="ICCID", help="the SIM's ICCID (Luhn-checked)")]
EidOpt = Annotated[str | None, typer.Option("--eid", metavar="EID", help="the eUICC's EID")]
ImsiOpt = Annotated[list[str] | None, typer.Option("--imsi", metavar="IMSI", help="repeatable")]
FirmwareOpt = Annotated[str | None, typer.Option("--firmware", metavar="VERSION")]
LifecycleOpt = Annotated[str | None, typer.Option("--lifecycle", metavar="STATE", help=" | ".join(LIFECYCLES))]
LastSeenOpt = Annotated[str | None, typer.Option("--last-seen", metavar="TIME", help="e.g. 2026-06-01T10:00Z")]
PortOpt = Annotated[list[str] | None, typer.Option("--port", metavar="PROTO=PORT", help="repeatable: where the device differs from the catalogue")]
DescriptionOpt = Annotated[str | None, typer.Option("--description", metavar="TEXT")]


# ---- sites ----


@sites_app.command("list")
def sites_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The sites where you hold a role (every site, for admins and the SOC)."""
    rows = connect(ctx).call("GET", "/api/v1/sites")
    if as_json:
        print_json(rows)
    elif rows:
        table(["SITE", "TIME ZONE", "TUNNEL POOL", "PORTS", "ENDPOINT", "DEVICES", "AGENTS", "NAME"],
              [[s["name"], s["time_zone"], s["tunnel_pool"], f"{s['port_min']}-{s['port_max']}", s["public_endpoint"],
                s["devices"], listed([a["name"] for a in s["agents"]]), s["display_name"]] for s in rows])
    else:
        typer.echo("No sites.")


@sites_app.command("show")
def sites_show(ctx: typer.Context, name: SiteArg, as_json: JsonOpt = False) -> None:
    """One site, with its node agents."""
    s = connect(ctx).call("GET", f"/api/v1/sites/{segment(name)}")
    if as_json:
        print_json(s)
        return
    agents = [a["name"] + (f" ({a['description']})" if a["description"] else "") for a in s["agents"]]
    pairs([("site", s["name"]), ("display name", s["display_name"]), ("time zone", s["time_zone"]),
           ("tunnel pool", s["tunnel_pool"]), ("ports", f"{s['port_min']}-{s['port_max']}"),
           ("endpoint", s["public_endpoint"]), ("lan networks", listed(s["lan_networks"])),
           ("change windows", listed(s["change_windows"])), ("unpassported", s["unpassported"]),
           ("device networks", listed(s["device_networks"])), ("agents", listed(agents)), ("devices", s["devices"]),
           ("revision", s["revision"]), ("updated", when(s["updated_at"]))])


@sites_app.command("add")
def sites_add(ctx: typer.Context, name: SiteArg, display_name: DisplayNameOpt = None, time_zone: TimeZoneOpt = None,
              tunnel_pool: PoolOpt = None, ports: PortsOpt = None, endpoint: EndpointOpt = None,
              lan_network: LanOpt = None, window: WindowOpt = None, unpassported: UnpassportedOpt = None,
              device_network: DeviceNetOpt = None, totp: TotpOpt = None) -> None:
    """Create a site (admin)."""
    missing = [flag for flag, value in (("--display-name", display_name), ("--time-zone", time_zone),
                                        ("--tunnel-pool", tunnel_pool), ("--ports", ports), ("--endpoint", endpoint)) if not value]
    if missing:
        raise CliError(f"a new site needs {', '.join(missing)}", exit_code=EXIT_USAGE)
    body = {"name": name, **_site_body(display_name, time_zone, tunnel_pool, ports, endpoint, lan_network, window,
                                       unpassported, device_network)}
    api = connect(ctx)
    s = api.call("POST", "/api/v1/sites", body=body, totp=step_up(totp))
    typer.echo(f"Created site {s['name']} ({s['display_name']}); next: `wicket sites agent-add {s['name']} NAME`.")


@sites_app.command("update")
def sites_update(ctx: typer.Context, name: SiteArg, display_name: DisplayNameOpt = None, time_zone: TimeZoneOpt = None,
                 tunnel_pool: PoolOpt = None, ports: PortsOpt = None, endpoint: EndpointOpt = None,
                 lan_network: LanOpt = None, window: WindowOpt = None, unpassported: UnpassportedOpt = None,
                 device_network: DeviceNetOpt = None,
                 clear: Annotated[list[str] | None, typer.Option("--clear", metavar="FIELD", help=" | ".join(SITE_CLEARABLE))] = None,
                 totp: TotpOpt = None) -> None:
    """Change a site: only the options given change; a list given replaces the old one."""
    body = _site_body(display_name, time_zone, tunnel_pool, ports, endpoint, lan_network, window, unpassported, device_network)
    s = _patch(ctx, f"/api/v1/sites/{segment(name)}", body, clear, SITE_CLEARABLE, totp)
    typer.echo(f"Updated site {s['name']} (revision {s['revision']}).")


@sites_app.command("delete")
def sites_delete(ctx: typer.Context, name: SiteArg, yes: YesOpt = False, totp: TotpOpt = None) -> None:
    """Delete a site without devices (admin)."""
    _delete(ctx, f"/api/v1/sites/{segment(name)}", yes, totp, lambda s: f"site {name} ({s['display_name']})")


@sites_app.command("agent-add")
def sites_agent_add(ctx: typer.Context, site: Annotated[str, typer.Argument(metavar="SITE")],
                    name: Annotated[str, typer.Argument(metavar="NAME", help="the node agent's name")],
                    description: Annotated[str, typer.Option("--description", metavar="TEXT")] = "",
                    totp: TotpOpt = None) -> None:
    """Register a node agent for a site."""
    api = connect(ctx)
    api.call("POST", f"/api/v1/sites/{segment(site)}/agents", body={"name": name, "description": description}, totp=step_up(totp))
    typer.echo(f"Registered agent {name} at site {site}.")


@sites_app.command("agent-remove")
def sites_agent_remove(ctx: typer.Context, site: Annotated[str, typer.Argument(metavar="SITE")],
                       name: Annotated[str, typer.Argument(metavar="NAME", help="the node agent's name")],
                       totp: TotpOpt = None) -> None:
    """Remove a node agent from a site."""
    api = connect(ctx)
    api.call("DELETE", f"/api/v1/sites/{segment(site)}/agents/{segment(name)}", totp=step_up(totp))
    typer.echo(f"Removed agent {name} from site {site}.")


# ---- devices ----


@devices_app.command("list")
def devices_list(ctx: typer.Context, site: SiteOpt = None, device_type: TypeOpt = None, lifecycle: LifecycleOpt = None,
                 prefix: Annotated[str | None, typer.Option("--prefix", metavar="TEXT", help="asset IDs starting with")] = None,
                 as_json: JsonOpt = False) -> None:
    """Device passports at your sites, by asset ID (every page)."""
    api = connect(ctx)
    params = {k: v for k, v in (("site", site), ("device_type", device_type), ("lifecycle", lifecycle), ("prefix", prefix)) if v}
    devices: list[dict] = []
    after = None
    while True:
        page = api.call("GET", "/api/v1/devices", params={**params, "limit": PAGE, **({"after": after} if after else {})})
        devices += page["devices"]
        if not page["next_after"] or page["next_after"] == after:
            break
        after = page["next_after"]
    if as_json:
        print_json(devices)
    elif devices:
        table(["ASSET", "TYPE", "SITE", "LIFECYCLE", "ADDRESSES", "FIRMWARE", "LAST SEEN", "REV"],
              [[d["asset_id"], d["device_type"], d["site"], d["lifecycle"], listed(d["addresses"]), d["firmware"] or "-",
                when(d["last_seen"]), d["revision"]] for d in devices])
    else:
        typer.echo("No devices.")


@devices_app.command("show")
def devices_show(ctx: typer.Context, asset: AssetArg, as_json: JsonOpt = False) -> None:
    """One device passport."""
    d = connect(ctx).call("GET", f"/api/v1/devices/{segment(asset)}")
    if as_json:
        print_json(d)
        return
    pairs([("asset", d["asset_id"]), ("type", d["device_type"]), ("site", d["site"]), ("lifecycle", d["lifecycle"]),
           ("addresses", listed(d["addresses"])), ("mac", d["mac"] or "-"), ("iccid", d["iccid"] or "-"),
           ("eid", d["eid"] or "-"), ("imsis", listed(d["imsis"])), ("firmware", d["firmware"] or "-"),
           ("ports", listed([f"{k}={v}" for k, v in sorted(d["ports"].items())])), ("last seen", when(d["last_seen"])),
           ("description", d["description"] or "-"), ("revision", d["revision"]), ("updated", when(d["updated_at"]))])


@devices_app.command("add")
def devices_add(ctx: typer.Context, asset: AssetArg, device_type: TypeOpt = None, site: SiteOpt = None,
                address: AddressOpt = None, mac: MacOpt = None, iccid: IccidOpt = None, eid: EidOpt = None,
                imsi: ImsiOpt = None, firmware: FirmwareOpt = None, lifecycle: LifecycleOpt = None,
                last_seen: LastSeenOpt = None, port: PortOpt = None, description: DescriptionOpt = None,
                totp: TotpOpt = None) -> None:
    """Create a device passport (lifecycle: provisioned unless given)."""
    missing = [flag for flag, value in (("--type", device_type), ("--site", site), ("--address", address)) if not value]
    if missing:
        raise CliError(f"a new device needs {', '.join(missing)}", exit_code=EXIT_USAGE)
    body = {"asset_id": asset, **_device_body(device_type, site, address, mac, iccid, eid, imsi, firmware, lifecycle,
                                              last_seen, port, description)}
    api = connect(ctx)
    d = api.call("POST", "/api/v1/devices", body=body, totp=step_up(totp))
    typer.echo(f"Created device {d['asset_id']} ({d['device_type']} at {d['site']}, {d['lifecycle']}).")


@devices_app.command("update")
def devices_update(ctx: typer.Context, asset: AssetArg, device_type: TypeOpt = None, site: SiteOpt = None,
                   address: AddressOpt = None, mac: MacOpt = None, iccid: IccidOpt = None, eid: EidOpt = None,
                   imsi: ImsiOpt = None, firmware: FirmwareOpt = None, lifecycle: LifecycleOpt = None,
                   last_seen: LastSeenOpt = None, port: PortOpt = None, description: DescriptionOpt = None,
                   clear: Annotated[list[str] | None, typer.Option("--clear", metavar="FIELD", help=" | ".join(DEVICE_CLEARABLE))] = None,
                   totp: TotpOpt = None) -> None:
    """Change a passport: only the options given change; a list given (--address, --imsi, --port) replaces the old one."""
    body = _device_body(device_type, site, address, mac, iccid, eid, imsi, firmware, lifecycle, last_seen, port, description)
    d = _patch(ctx, f"/api/v1/devices/{segment(asset)}", body, clear, DEVICE_CLEARABLE, totp)
    typer.echo(f"Updated device {d['asset_id']} (revision {d['revision']}).")


@devices_app.command("delete")
def devices_delete(ctx: typer.Context, asset: AssetArg, yes: YesOpt = False, totp: TotpOpt = None) -> None:
    """Delete a decommissioned device's passport."""
    _delete(ctx, f"/api/v1/devices/{segment(asset)}", yes, totp, lambda d: f"device {asset} ({d['device_type']} at {d['site']})")


@devices_app.command("import")
def devices_import(ctx: typer.Context, file: Annotated[str, typer.Argument(metavar="FILE", help="a CSV file, or - for stdin")],
                   update: Annotated[bool, typer.Option("--update", help="change existing passports too (else they are errors)")] = False,
                   dry_run: Annotated[bool, typer.Option("--dry-run", help="check everything, write nothing")] = False,
                   totp: TotpOpt = None) -> None:
    """Import passports from CSV, all or nothing: every bad row is listed and nothing is written."""
    text = _read_text(file)
    api = connect(ctx)
    try:
        out = api.call("POST", "/api/v1/devices/import", body={"csv": text, "update": update, "dry_run": dry_run},
                       totp=step_up(totp))
    except CliError as exc:
        if exc.body.get("rows"):
            exc.lines = [row_problem(r, file if file != "-" else "stdin") for r in exc.body["rows"]]
        raise
    counts = f"{out['created']} created, {out['updated']} updated, {out['unchanged']} unchanged"
    typer.echo(f"Dry run, nothing was written: {counts}." if out["dry_run"] else f"Imported: {counts}.")


@devices_app.command("export")
def devices_export(ctx: typer.Context, site: SiteOpt = None,
                   output: Annotated[Path | None, typer.Option("--output", "-o", metavar="FILE", help="write here instead of stdout")] = None) -> None:
    """Passports at your sites as CSV (the format `devices import` reads)."""
    text = connect(ctx).call("GET", "/api/v1/devices/export", params={"site": site} if site else None, text=True)
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{output}: {exc}", exit_code=EXIT_USAGE) from None
    rows = max(len(list(csv.reader(io.StringIO(text)))) - 1, 0)
    typer.echo(f"Exported {rows} device(s) to {output}.", err=True)


@devices_app.command("passport")
def devices_passport(ctx: typer.Context, asset: AssetArg,
                     verify: Annotated[bool, typer.Option("--verify", help="check the signature with the controller's signing key")] = False) -> None:
    """The device's passport as the controller signs it for node agents (JSON)."""
    api = connect(ctx)
    signed = api.call("GET", f"/api/v1/devices/{segment(asset)}/passport")
    if verify:
        key = api.call("GET", "/api/v1/controller/signing-key")
        verify_passport(signed, key["public_key"], asset)
        typer.echo(f"signature OK (key {key['key_id']})", err=True)
    print_json(signed)


@devices_app.command("bind")
def devices_bind(ctx: typer.Context, asset: Annotated[str | None, typer.Argument(metavar="ASSET", help="the device's asset ID")] = None,
                 asset_opt: Annotated[str | None, typer.Option("--asset", metavar="ASSET", help="the same, as an option")] = None,
                 iccid: IccidOpt = None, imsi: ImsiOpt = None, eid: EidOpt = None, mac: MacOpt = None,
                 address: AddressOpt = None,
                 rebind: Annotated[bool, typer.Option("--rebind", help="replace identifiers the device is bound to already")] = False,
                 reason: Annotated[str | None, typer.Option("--reason", metavar="TEXT", help="work order; also the commissioning grant's reason")] = None,
                 totp: TotpOpt = None, as_json: JsonOpt = False) -> None:
    """Bind the identifiers read off a device at installation: its passport turns active (the site's agent
    enforces its baseline), and its type's commissioning grant is asked for you. Needs a fresh TOTP code."""
    if bool(asset) == bool(asset_opt):
        raise CliError("name the device once: ASSET, or --asset ASSET", exit_code=EXIT_USAGE)
    if not (iccid or eid or mac):
        raise CliError("give the identifiers read off the device: --iccid, --eid or --mac at least", exit_code=EXIT_USAGE)
    body = {k: v for k, v in (("iccid", iccid), ("imsis", imsi or None), ("eid", eid), ("mac", mac),
                              ("addresses", address or None), ("reason", reason)) if v}
    if rebind:
        body["rebind"] = True
    asset_id = asset or asset_opt
    out = connect(ctx).call("POST", f"/api/v1/devices/{segment(asset_id)}/bind", body=body, totp=step_up(totp))
    if as_json:
        print_json(out)
        return
    d = out["device"]
    ids = listed([f"{k} {', '.join(v) if isinstance(v, list) else v}" for k, v in
                  (("iccid", d["iccid"]), ("eid", d["eid"]), ("imsi", d["imsis"]), ("mac", d["mac"])) if v])
    typer.echo(f"{'Rebound' if out['rebound'] else 'Bound'} {d['asset_id']} ({ids}): its passport is {d['lifecycle']} "
               f"(revision {d['revision']}); the agents at {d['site']} enforce its baseline from their next generation.")
    c = out["commissioning"]
    if c is None:
        return
    if c["grant"] is None:
        raise CliError(f"the commissioning grant ({c['task']}) was refused: {c['refused']}")
    cli_grants.say_grant(c["grant"])
    if c["activation_error"]:
        raise CliError(f"the commissioning grant did not open: {c['activation_error']}",
                       hint=f"wicket grant activate {c['grant']['id']}")


def verify_passport(signed: Any, public_key: str, asset: str | None = None) -> None:
    """Raise CliError unless `signed` is a passport (for `asset`, when given) signed by `public_key`."""
    try:
        passport = SignedPassport.model_validate(signed).verify(public_key)
    except ValidationError as exc:
        raise CliError(f"not a signed passport: {exc.error_count()} problem(s), e.g. {exc.errors()[0]['msg']}") from None
    except ValueError as exc:
        raise CliError(f"signature check failed: {exc}") from None
    if asset is not None and passport.asset_id != asset:
        raise CliError(f"signature check failed: the passport is for {passport.asset_id}, not {asset}")


# ---- helpers ----


def _site_body(display_name, time_zone, tunnel_pool, ports, endpoint, lan_network, window, unpassported=None,
               device_network=None) -> dict:
    if unpassported and unpassported not in UNPASSPORTED:
        raise CliError(f"--unpassported {unpassported!r}: one of {', '.join(UNPASSPORTED)}", exit_code=EXIT_USAGE)
    body: dict[str, Any] = {"display_name": display_name, "time_zone": time_zone, "tunnel_pool": tunnel_pool,
                            "public_endpoint": endpoint, "lan_networks": lan_network or None, "change_windows": window or None,
                            "unpassported": unpassported, "device_networks": device_network or None}
    if ports:
        body["port_min"], body["port_max"] = _port_range(ports)
    return {k: v for k, v in body.items() if v is not None}


def _device_body(device_type, site, address, mac, iccid, eid, imsi, firmware, lifecycle, last_seen, port, description) -> dict:
    if lifecycle and lifecycle not in LIFECYCLES:
        raise CliError(f"--lifecycle {lifecycle!r}: one of {', '.join(LIFECYCLES)}", exit_code=EXIT_USAGE)
    body: dict[str, Any] = {
        "device_type": device_type, "site": site, "addresses": address or None, "mac": mac, "iccid": iccid, "eid": eid,
        "imsis": imsi or None, "firmware": firmware, "lifecycle": lifecycle, "description": description,
        "last_seen": instant(last_seen, "--last-seen").isoformat() if last_seen else None,
        "ports": _ports(port) if port else None,
    }
    return {k: v for k, v in body.items() if v is not None}


def _cleared(fields: list[str] | None, clearable: dict[str, tuple[str, Any]], given: dict) -> dict:
    out = {}
    for name in fields or []:
        if name not in clearable:
            raise CliError(f"--clear {name!r}: one of {', '.join(clearable)}", exit_code=EXIT_USAGE)
        key, empty = clearable[name]
        if key in given:
            raise CliError(f"--clear {name} and a new value for it: give one of them", exit_code=EXIT_USAGE)
        out[key] = empty
    return out


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        return (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise CliError(f"--ports {text!r}: write MIN-MAX, e.g. 51000-51999", exit_code=EXIT_USAGE) from None


def _ports(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        proto, sep, number = item.partition("=")
        if not sep or not proto.strip() or not number.strip().isdigit():
            raise CliError(f"--port {item!r}: write PROTOCOL=PORT, e.g. iec104=2405", exit_code=EXIT_USAGE)
        if proto.strip() in out:
            raise CliError(f"--port: {proto.strip()} is given twice", exit_code=EXIT_USAGE)
        out[proto.strip()] = int(number)
    return out


def _read_text(file: str) -> str:
    try:
        return sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{file}: {getattr(exc, 'strerror', None) or exc}", exit_code=EXIT_USAGE) from None


def _patch(ctx: typer.Context, path: str, body: dict, clear: list[str] | None, clearable: dict[str, tuple[str, Any]],
           totp: str | None) -> dict:
    """PATCH the options given and the fields to --clear; refuses an empty change before asking for a code."""
    body.update(_cleared(clear, clearable, body))
    if not body:
        raise CliError("nothing to change: give the options to change", exit_code=EXIT_USAGE)
    return connect(ctx).call("PATCH", path, body=body, totp=step_up(totp))


def _delete(ctx: typer.Context, path: str, yes: bool, totp: str | None, describe) -> None:
    """Show what will go (describe: the object → 'site x (…)'), confirm unless --yes, then DELETE."""
    api = connect(ctx)
    what = describe(api.call("GET", path))
    if not yes:
        typer.confirm(f"Delete {what}?", abort=True)
    api.call("DELETE", path, totp=step_up(totp))
    typer.echo(f"Deleted {what.split(' (')[0]}.")
