"""Bulk import and export of device passports as CSV.

Import is all or nothing: every row is checked (formats, then the same checks as the API, then
duplicates inside the file and against the database) and every problem is reported with its line,
asset ID and field; only a file without problems is written, in one transaction.

Columns: asset_id, device_type, site, addresses, mac, iccid, eid, imsis, firmware, lifecycle,
last_seen, ports, description. Lists are separated by ';' (addresses, imsis); ports are
'protocol=port;…'. Empty cells are unset. With `update`, an existing passport changes only in the
columns the file has (an empty cell in a present column clears the field); a missing column keeps it.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import ValidationError
from sqlalchemy import insert, select, update

from . import baselines, events
from .auth import Principal
from .db import transaction
from .errors import Invalid
from .inventory import DEVICE_FIELDS, MANAGE_ROLES, Inventory, check_device, shown_to
from .inventory_schemas import DeviceCreate, ImportResult, ImportRowError
from .models import Device, Site
from .policy_schemas import CSV_MAX_CHARS

COLUMNS = ("asset_id", *DEVICE_FIELDS)
REQUIRED = ("asset_id", "device_type", "site", "addresses")
MAX_ROWS, MAX_CHARS = 100_000, CSV_MAX_CHARS  # the API refuses a larger body first; this guards other callers


class ImportRejected(Invalid):
    code = "import_rejected"

    def __init__(self, rows: list[ImportRowError]):
        head = "; ".join(f"line {r.line}{f' ({r.asset_id})' if r.asset_id else ''}, {r.field}: {r.error}" for r in rows[:10])
        more = f"; … {len(rows) - 10} more" if len(rows) > 10 else ""
        super().__init__(f"{len(rows)} problem(s), nothing was written: {head}{more}")
        self.rows = rows

    def extra(self) -> dict:
        return {"rows": [r.model_dump() for r in self.rows]}


class _Stored(NamedTuple):
    """A passport already in the database, as an import checks against it."""

    id: int
    iccid: str | None
    eid: str | None
    site: str
    addresses: tuple[str, ...]


@dataclass
class _Row:
    line: int
    device: DeviceCreate
    columns: frozenset[str]  # an update changes only these fields: an absent column keeps its value


def import_devices(inventory: Inventory, caller: Principal, text: str, *, update_existing: bool = False,
                   dry_run: bool = False, source: str | None = None) -> ImportResult:
    policy = inventory.policies.require_active()
    if len(text) > MAX_CHARS:
        raise Invalid(f"the file is larger than {MAX_CHARS // 1024 // 1024} Mi characters: split it")
    problems: list[ImportRowError] = []
    rows = _parse(text, problems)
    now = inventory.auth.now()
    with transaction(inventory.factory) as s:
        sites = {site.name: site for site in s.scalars(select(Site))}
        site_names = {site.id: name for name, site in sites.items()}
        existing = {a: _Stored(i, ic, e, site_names[sid], tuple(addrs)) for i, a, ic, e, sid, addrs in
                    s.execute(select(Device.id, Device.asset_id, Device.iccid, Device.eid, Device.site_id, Device.addresses))}
        sim_owner = {}
        for asset, stored in existing.items():
            if stored.iccid:
                sim_owner[("iccid", stored.iccid)] = asset
            if stored.eid:
                sim_owner[("eid", stored.eid)] = asset
        seen_asset: dict[str, int] = {}
        seen_sim: dict[tuple[str, str], tuple[int, str]] = {}
        for row in rows:
            d = row.device
            if d.asset_id in seen_asset:
                problems.append(_err(row, "asset_id", f"also on line {seen_asset[d.asset_id]}"))
            seen_asset.setdefault(d.asset_id, row.line)
            if d.asset_id in existing and not update_existing:
                problems.append(_err(row, "asset_id", "exists already (import with --update to change existing passports)"))
            elif d.asset_id in existing and not caller.can(existing[d.asset_id].site, *MANAGE_ROLES):
                problems.append(_err(row, "site", f"{d.asset_id} is at a site you do not manage; it cannot be changed or moved from here"))
            for p in check_device(caller, policy, d, sites.get(d.site), now=now):
                problems.append(_err(row, p.field, p.error))
            for field in ("iccid", "eid"):
                value = getattr(d, field)
                if not value:
                    continue
                owner = sim_owner.get((field, value))
                if owner and owner != d.asset_id:
                    problems.append(_err(row, field, f"{value} is already bound to {shown_to(caller, existing[owner].site, [owner])}"))
                if (field, value) in seen_sim and seen_sim[(field, value)][1] != d.asset_id:
                    problems.append(_err(row, field, f"{value} is also on line {seen_sim[(field, value)][0]}"))
                seen_sim.setdefault((field, value), (row.line, d.asset_id))
        problems += _address_clashes(caller, rows, existing)
        if problems:
            problems.sort(key=lambda p: (p.line, p.field))
            raise ImportRejected(problems)
        created = updated = unchanged = 0
        fresh, changed = [], []
        moved_sites: set[int] = set()  # sites whose baselines the import changes
        for row in rows:
            d = row.device
            values = d.model_dump(exclude={"asset_id", "site"})
            values["site_id"] = sites[d.site].id
            if d.asset_id not in existing:
                fresh.append({"asset_id": d.asset_id, **values, "revision": 1, "created_at": now, "updated_at": now})
                if baselines.in_baseline(values["site_id"], d.lifecycle, d.device_type, d.addresses):
                    moved_sites.add(values["site_id"])
                created += 1
            else:
                given = row.columns | {"site_id"}  # site is a required column
                changed.append((existing[d.asset_id].id, {k: v for k, v in values.items() if k in given}))
        if changed:
            current = {dev.id: dev for dev in s.scalars(select(Device).where(Device.id.in_([i for i, _ in changed])))}
            for device_id, values in changed:
                dev = current[device_id]
                diff = {k: v for k, v in values.items() if getattr(dev, k) != v}
                if not diff:
                    unchanged += 1
                    continue
                revision = dev.revision + (1 if set(diff) - {"last_seen"} else 0)
                before = _baseline_of(dev, {})
                after = _baseline_of(dev, diff)
                if before != after:
                    moved_sites.update(x[0] for x in (before, after) if x)
                s.execute(update(Device).where(Device.id == device_id).values(**diff, revision=revision, updated_at=now))
                updated += 1
        bumped = baselines.bump_site(s, *moved_sites)
        if fresh:
            s.execute(insert(Device), fresh)
        if dry_run:
            s.rollback()
        else:
            events.record(s, at=now, category="inventory", type="device.import", result="success", actor_id=caller.user_id,
                          actor=caller.username, subject=f"{len(rows)} rows", source=source, created=created, updated=updated,
                          unchanged=unchanged, sha256=hashlib.sha256(text.encode()).hexdigest(),
                          asset_ids=[r.device.asset_id for r in rows[:100]])
    if not dry_run:
        inventory.on_nodes_changed(bumped)
    return ImportResult(created=created, updated=updated, unchanged=unchanged, dry_run=dry_run)


def _baseline_of(dev: Device, diff: dict) -> tuple | None:
    """The device's part of a baseline, with `diff` (column → new value) applied."""
    v = {k: diff.get(k, getattr(dev, k)) for k in ("site_id", "lifecycle", "device_type", "addresses")}
    return baselines.in_baseline(v["site_id"], v["lifecycle"], v["device_type"], v["addresses"])


def export_devices(inventory: Inventory, caller: Principal, site: str | None = None) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    after = None
    while True:
        page = inventory.list_devices(caller, site=site, after=after, limit=1000)
        for d in page.devices:
            writer.writerow([
                d.asset_id, d.device_type, d.site, ";".join(d.addresses), d.mac or "", d.iccid or "", d.eid or "",
                ";".join(d.imsis), d.firmware or "", d.lifecycle,
                d.last_seen.isoformat().replace("+00:00", "Z") if d.last_seen else "",
                ";".join(f"{k}={v}" for k, v in sorted(d.ports.items())), d.description,
            ])
        if page.next_after is None:
            return out.getvalue()
        after = page.next_after


def _address_clashes(caller: Principal, rows: list[_Row], existing: dict[str, _Stored]) -> list[ImportRowError]:
    """Rows whose device would share a LAN address with another device at its site, after the import:
    the devices it leaves alone as they are, the ones in the file as the file says."""
    in_file = {row.device.asset_id for row in rows}
    placed = [(asset, stored.site, stored.addresses) for asset, stored in existing.items() if asset not in in_file]
    placed += [(row.device.asset_id, row.device.site, row.device.addresses) for row in rows]
    holders: dict[tuple[str, str], set[str]] = {}
    for asset, site, addrs in placed:
        for address in addrs:
            holders.setdefault((site, address), set()).add(asset)
    out = []
    for row in rows:
        d = row.device
        for address in d.addresses:
            others = sorted(holders[(d.site, address)] - {d.asset_id})
            if others:
                out.append(_err(row, "addresses", f"{address} is also the address of {shown_to(caller, d.site, others)}"))
    return out


# ---- parsing ----


def _parse(text: str, problems: list[ImportRowError]) -> list[_Row]:
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise Invalid("the file is empty: the first line names the columns") from None
    except csv.Error as exc:
        raise Invalid(f"line 1: {exc}") from None
    unknown = [h for h in header if h not in COLUMNS]
    missing = [h for h in REQUIRED if h not in header]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if unknown or missing or dupes:
        parts = []
        if unknown:
            parts.append(f"unknown column(s) {', '.join(unknown)}")
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if dupes:
            parts.append(f"column(s) given twice: {', '.join(dupes)}")
        raise Invalid(f"line 1: {'; '.join(parts)}. Columns: {', '.join(COLUMNS)}")
    rows: list[_Row] = []
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(rows) >= MAX_ROWS:
                raise Invalid(f"more than {MAX_ROWS} devices in one file: split it")
            asset = cells[0].strip() if header[0] == "asset_id" and cells else None
            if len(cells) != len(header):
                problems.append(ImportRowError(line=line, asset_id=asset, field="(row)",
                                               error=f"{len(cells)} cells, the header has {len(header)}"))
                continue
            raw = dict(zip(header, (c.strip() for c in cells), strict=True))
            asset = raw.get("asset_id") or None
            try:
                rows.append(_Row(line, DeviceCreate.model_validate(_cells_to_fields(raw)), frozenset(header)))
            except _CellError as exc:
                problems.append(ImportRowError(line=line, asset_id=asset, field=exc.field, error=exc.message))
            except ValidationError as exc:
                for err in exc.errors():
                    loc = [str(x) for x in err["loc"]]
                    field = loc[0] if loc else "(row)"
                    problems.append(ImportRowError(line=line, asset_id=asset, field=field,
                                                   error=err["msg"].removeprefix("Value error, ")))
    except csv.Error as exc:
        raise Invalid(f"line {reader.line_num}: {exc}") from None
    return rows


class _CellError(Exception):
    def __init__(self, field: str, message: str):
        self.field, self.message = field, message


def _cells_to_fields(raw: dict[str, str]) -> dict:
    out: dict = {}
    for key, value in raw.items():
        if value == "":
            continue
        if key in ("addresses", "imsis"):
            out[key] = [v.strip() for v in value.split(";") if v.strip()]
        elif key == "ports":
            ports = {}
            for part in value.split(";"):
                name, sep, num = part.partition("=")
                if not sep or not num.strip().isdigit():
                    raise _CellError("ports", f"{part!r} is not protocol=port")
                ports[name.strip()] = int(num)
            out[key] = ports
        else:
            out[key] = value
    return out


def _err(row: _Row, field: str, message: str) -> ImportRowError:
    return ImportRowError(line=row.line, asset_id=row.device.asset_id, field=field, error=message)
