"""Sites, their node agents, and device passports: reading (scoped to the caller's sites) and changes
(site admins for their sites, admins everywhere). Every change is an inventory event in the same
transaction. Device checks live in `check_device`, which the API and the CSV import share, so a field
is refused with the same words either way.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import timedelta

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from . import baselines, events
from .auth import Auth, Principal
from .db import transaction
from .errors import Conflict, Forbidden, Invalid, NotFound
from .inventory_schemas import (
    AgentIO,
    DeviceBind,
    DeviceCreate,
    DevicePage,
    DevicePublic,
    DeviceUpdate,
    SiteCreate,
    SitePublic,
    SiteUpdate,
)
from .models import AccessSession, Device, LaneLease, Lifecycle, NodeAgent, RoleGrant, Site
from .policy import Policy
from .policy_store import PolicyStore

READ_ROLES = ("engineer", "contractor", "approver", "site_admin", "soc", "admin", "break_glass")
MANAGE_ROLES = ("site_admin", "admin")
_SKEW = timedelta(minutes=5)  # a last_seen this far ahead of the controller's clock is still believed
DEVICE_FIELDS = ("device_type", "site", "addresses", "mac", "iccid", "eid", "imsis", "firmware", "lifecycle",
                 "last_seen", "ports", "description")


@dataclass(frozen=True)
class FieldProblem:
    field: str
    error: str


class Inventory:
    def __init__(self, auth: Auth, policies: PolicyStore):
        self.auth, self.factory, self.policies = auth, auth.factory, policies
        # nodes whose desired state a committed change moved (their baselines, settings): the app hands
        # them their new generation at once (`Pusher.push_quietly`); the clock would within a second
        self.on_nodes_changed = lambda nodes: None

    # ---- sites ----

    def list_sites(self, caller: Principal) -> list[SitePublic]:
        scope = caller.sites(*READ_ROLES)
        with self.factory() as s:
            q = select(Site).order_by(Site.name)
            if scope is not None:
                q = q.where(Site.name.in_(scope))
            return [_site_public(s, site) for site in s.scalars(q)]

    def get_site(self, caller: Principal, name: str) -> SitePublic:
        with self.factory() as s:
            return _site_public(s, self._readable_site(s, caller, name))

    def create_site(self, caller: Principal, body: SiteCreate, source: str | None) -> SitePublic:
        if not caller.has_any("admin"):
            raise Forbidden("only an admin creates sites")
        self._check_site_windows(body.change_windows)
        now = self.auth.now()
        with transaction(self.factory) as s:
            if s.scalar(select(Site.id).where(Site.name == body.name)) is not None:
                raise Conflict(f"site {body.name} exists already")
            _check_pool(s, body.tunnel_pool, None)
            site = Site(name=body.name, display_name=body.display_name, time_zone=body.time_zone, tunnel_pool=body.tunnel_pool,
                        port_min=body.port_min, port_max=body.port_max, public_endpoint=body.public_endpoint,
                        lan_networks=body.lan_networks, change_windows=body.change_windows,
                        unpassported=body.unpassported, device_networks=body.device_networks, revision=1,
                        created_at=now, updated_at=now)
            s.add(site)
            s.flush()
            _event(s, caller, now, source, "site.create", body.name, **body.model_dump(exclude={"name"}))
            return _site_public(s, site)

    def update_site(self, caller: Principal, name: str, body: SiteUpdate, source: str | None) -> SitePublic:
        changes = body.model_dump(exclude_unset=True)
        if any(v is None for v in changes.values()):
            raise Invalid("null is not a value for a site field: leave the field out to keep it")
        if "change_windows" in changes:
            self._check_site_windows(changes["change_windows"])
        now = self.auth.now()
        bumped: list[str] = []
        with transaction(self.factory) as s:
            site = self._managed_site(s, caller, name, lock=True)
            merged = _revalidate(SiteCreate, {**_site_fields(site), **changes, "name": site.name})
            if "tunnel_pool" in changes:
                _check_pool(s, merged.tunnel_pool, site.id)
            if "lan_networks" in changes:
                outside = _devices_outside(s, site, merged.lan_networks)
                if outside:
                    raise Conflict(f"devices would lie outside the site's networks: {', '.join(outside[:5])}")
            diff = {k: v for k, v in changes.items() if getattr(site, k) != v}
            if "tunnel_pool" in diff:
                holding = s.scalars(select(LaneLease.session_id).where(LaneLease.site_id == site.id).limit(5)).all()
                if holding:
                    raise Conflict(f"sessions hold tunnel addresses from the current pool ({', '.join(holding)}): "
                                   "the pool can change once they end")
            for k, v in diff.items():
                setattr(site, k, v)
            if diff.keys() & {"tunnel_pool", "public_endpoint", "unpassported", "device_networks"}:
                # all are in the nodes' desired state: a new generation carries them there
                bumped = baselines.bump_site(s, site.id)
            if diff:
                site.revision += 1
                site.updated_at = now
                _event(s, caller, now, source, "site.update", name, changes=diff)
            out = _site_public(s, site)
        self.on_nodes_changed(bumped)
        return out

    def delete_site(self, caller: Principal, name: str, source: str | None) -> None:
        if not caller.has_any("admin"):
            raise Forbidden("only an admin deletes sites")
        now = self.auth.now()
        with transaction(self.factory) as s:
            site = self._readable_site(s, caller, name, lock=True)
            devices = s.scalar(select(func.count()).select_from(Device).where(Device.site_id == site.id))
            agents = s.scalar(select(func.count()).select_from(NodeAgent).where(NodeAgent.site_id == site.id))
            grants = s.scalar(select(func.count()).select_from(RoleGrant).where(RoleGrant.site == name))
            if devices or agents or grants:
                raise Conflict(f"site {name} still has {devices} device(s), {agents} agent(s) and {grants} role grant(s): remove them first")
            s.delete(site)
            _event(s, caller, now, source, "site.delete", name)

    def add_agent(self, caller: Principal, site_name: str, name: str, description: str, source: str | None) -> SitePublic:
        now = self.auth.now()
        with transaction(self.factory) as s:
            site = self._managed_site(s, caller, site_name)
            if s.scalar(select(NodeAgent.id).where(NodeAgent.name == name)) is not None:
                raise Conflict(f"an agent named {name} exists already")
            s.add(NodeAgent(name=name, site_id=site.id, description=description, created_at=now))
            s.flush()
            _event(s, caller, now, source, "agent.add", name, site=site_name)
            return _site_public(s, site)

    def remove_agent(self, caller: Principal, site_name: str, name: str, source: str | None) -> None:
        now = self.auth.now()
        with transaction(self.factory) as s:
            site = self._managed_site(s, caller, site_name)
            agent = s.scalar(select(NodeAgent).where(NodeAgent.name == name, NodeAgent.site_id == site.id))
            if agent is None:
                raise NotFound(f"site {site_name} has no agent {name}")
            carrying = s.scalars(select(AccessSession.id).where(AccessSession.node == name,
                                                                AccessSession.state.in_(("opening", "active"))).limit(5)).all()
            if carrying:
                raise Conflict(f"agent {name} carries active sessions ({', '.join(carrying)}): they must end first "
                               "(close or revoke them), or the agent could no longer be told to end them")
            s.delete(agent)
            _event(s, caller, now, source, "agent.remove", name, site=site_name)

    # ---- devices ----

    def list_devices(self, caller: Principal, *, site: str | None = None, device_type: str | None = None,
                     lifecycle: str | None = None, prefix: str | None = None, after: str | None = None,
                     limit: int = 100) -> DevicePage:
        scope = caller.sites(*READ_ROLES)
        with self.factory() as s:
            q = select(Device).join(Site).order_by(Device.asset_id).limit(limit + 1)
            if scope is not None:
                q = q.where(Site.name.in_(scope))
            if site:
                q = q.where(Site.name == site)
            if device_type:
                q = q.where(Device.device_type == device_type)
            if lifecycle:
                q = q.where(Device.lifecycle == lifecycle)
            if prefix:
                q = q.where(func.substr(Device.asset_id, 1, len(prefix)) == prefix)  # LIKE ignores case on SQLite
            if after:
                q = q.where(Device.asset_id > after)
            rows = list(s.scalars(q))
        more = len(rows) > limit
        rows = rows[:limit]
        return DevicePage(devices=[device_public(d) for d in rows], next_after=rows[-1].asset_id if more else None)

    def get_device(self, caller: Principal, asset_id: str) -> DevicePublic:
        with self.factory() as s:
            return device_public(self._readable_device(s, caller, asset_id))

    def device_row(self, caller: Principal, asset_id: str) -> Device:
        with self.factory() as s:
            return self._readable_device(s, caller, asset_id)

    def create_device(self, caller: Principal, body: DeviceCreate, source: str | None) -> DevicePublic:
        policy = self.policies.require_active()
        now = self.auth.now()
        bumped: list[str] = []
        with transaction(self.factory) as s:
            if s.scalar(select(Device.id).where(Device.asset_id == body.asset_id)) is not None:
                raise Conflict(f"device {body.asset_id} exists already")
            site = _site_by_name(s, body.site)
            problems = check_device(caller, policy, body, site, now=now)
            problems += _unique_sim(s, caller, body.iccid, body.eid, None)
            problems += _unique_addresses(s, caller, site, body.addresses, None)
            _raise(problems)
            device = Device(asset_id=body.asset_id, site_id=site.id, revision=1, created_at=now, updated_at=now,
                            **{k: v for k, v in body.model_dump().items() if k not in ("asset_id", "site")})
            s.add(device)
            s.flush()
            if baselines.in_baseline(site.id, body.lifecycle, body.device_type, body.addresses):
                bumped = baselines.bump_site(s, site.id)
            _event(s, caller, now, source, "device.create", body.asset_id, site=site.name, device_type=body.device_type,
                   lifecycle=body.lifecycle)
            device.site = site
            out = device_public(device)
        self.on_nodes_changed(bumped)
        return out

    def update_device(self, caller: Principal, asset_id: str, body: DeviceUpdate, source: str | None) -> DevicePublic:
        changes = body.model_dump(exclude_unset=True)
        for key in ("device_type", "site", "addresses", "lifecycle", "imsis", "ports", "description"):
            if key in changes and changes[key] is None:
                raise Invalid(f"{key}: null is not a value here; leave the field out to keep it")
        policy = self.policies.require_active()
        now = self.auth.now()
        with transaction(self.factory) as s:
            device = self._readable_device(s, caller, asset_id, lock=True)
            if not caller.can(device.site.name, *MANAGE_ROLES):
                raise Forbidden(f"managing devices at site {device.site.name} needs site_admin there (or admin)")
            merged = _revalidate(DeviceCreate, {**_device_fields(device), **changes, "asset_id": asset_id})
            site = _site_by_name(s, merged.site)
            problems = check_device(caller, policy, merged, site, now=now)
            problems += _unique_sim(s, caller, merged.iccid if "iccid" in changes else None,
                                   merged.eid if "eid" in changes else None, device.id)
            if {"addresses", "site"} & set(changes):
                problems += _unique_addresses(s, caller, site, merged.addresses, device.id)
            _raise(problems)
            before = _baseline_of(device)
            diff = {}
            for key, value in merged.model_dump().items():
                if key in ("asset_id", "site"):
                    continue
                if getattr(device, key) != value:
                    diff[key] = value
                    setattr(device, key, value)
            if site.id != device.site_id:
                diff["site"] = site.name
                device.site_id, device.site = site.id, site
            bumped = _bump_if_moved(s, before, _baseline_of(device))
            if diff:
                if set(diff) - {"last_seen"}:
                    device.revision += 1
                device.updated_at = now
                shown = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in diff.items()}
                _event(s, caller, now, source, "device.update", asset_id, site=site.name, changes=shown)
            out = device_public(device)
        self.on_nodes_changed(bumped)
        return out

    def bind(self, caller: Principal, asset_id: str, body: DeviceBind, source: str | None) -> tuple[DevicePublic, bool]:
        """Bind the identifiers read off the device at installation and make its passport active: its
        baseline turns on at the site's nodes. Refused (409) for a device bound to other identifiers
        (unless `rebind`), for identifiers bound to another device, and for a quarantined or
        decommissioned device. Returns the passport, and whether identifiers were replaced."""
        now = self.auth.now()
        given = {k: v for k, v in (("iccid", body.iccid), ("eid", body.eid), ("imsis", body.imsis), ("mac", body.mac))
                 if v is not None}
        with transaction(self.factory) as s:
            device = self._readable_device(s, caller, asset_id, lock=True)
            site = device.site
            if not caller.can(site.name, *MANAGE_ROLES):
                raise Forbidden(f"binding devices at site {site.name} needs site_admin there (or admin)")
            if device.lifecycle in (Lifecycle.quarantined.value, Lifecycle.decommissioned.value):
                raise Conflict(f"{asset_id} is {device.lifecycle}: a site admin returns it to service "
                               "(`wicket devices update --lifecycle provisioned`) before it is bound")
            replaced = {k: getattr(device, k) for k, v in given.items() if getattr(device, k) and getattr(device, k) != v}
            if replaced and not body.rebind:
                was = "; ".join(f"{k} {', '.join(v) if isinstance(v, list) else v}" for k, v in replaced.items())
                raise Conflict(f"{asset_id} is bound to other identifiers already ({was}): bind with --rebind "
                               "(`rebind: true`) to replace them")
            taken = _unique_sim(s, caller, body.iccid, body.eid, device.id)
            if taken:
                raise Conflict("; ".join(f"{p.field}: {p.error}" for p in taken))
            if body.addresses is not None:
                merged = _revalidate(DeviceCreate, {**_device_fields(device), "addresses": body.addresses, "asset_id": asset_id})
                _raise(check_device(caller, self.policies.require_active(), merged, site, now=now)
                       + _unique_addresses(s, caller, site, body.addresses, device.id))
                given["addresses"] = body.addresses
            before, was = _baseline_of(device), device.lifecycle
            for k, v in given.items():
                setattr(device, k, v)
            device.lifecycle, device.last_seen = Lifecycle.active.value, now  # the installer has the device in hand
            device.revision += 1
            device.updated_at = now
            bumped = _bump_if_moved(s, before, _baseline_of(device))
            _event(s, caller, now, source, "device.bind", asset_id, site=site.name, device=asset_id, identifiers=given,
                   previous_lifecycle=was, rebind=bool(replaced), replaced=replaced or None, note=body.reason)
            out = device_public(device)
        self.on_nodes_changed(bumped)
        return out, bool(replaced)

    def delete_device(self, caller: Principal, asset_id: str, source: str | None) -> None:
        now = self.auth.now()
        with transaction(self.factory) as s:
            device = self._readable_device(s, caller, asset_id, lock=True)
            if not caller.can(device.site.name, *MANAGE_ROLES):
                raise Forbidden(f"managing devices at site {device.site.name} needs site_admin there (or admin)")
            if device.lifecycle != "decommissioned":
                raise Conflict(f"{asset_id} is {device.lifecycle}: decommission it before deleting its passport")
            s.delete(device)
            _event(s, caller, now, source, "device.delete", asset_id, site=device.site.name)

    # ---- helpers ----

    def _check_site_windows(self, names: list[str]) -> None:
        if not names:
            return
        policy = self.policies.require_active()
        unknown = [n for n in names if n not in policy.document.change_windows]
        if unknown:
            raise Invalid(f"change_windows: the policy has no window {', '.join(unknown)} "
                          f"(it has: {', '.join(sorted(policy.document.change_windows)) or 'none'})")

    def _readable_site(self, s: Session, caller: Principal, name: str, lock: bool = False) -> Site:
        q = select(Site).where(Site.name == name)
        site = s.scalar(q.with_for_update() if lock else q)
        if site is None or not caller.can(name, *READ_ROLES):
            raise NotFound(f"no site {name}")
        return site

    def _managed_site(self, s: Session, caller: Principal, name: str, lock: bool = False) -> Site:
        site = self._readable_site(s, caller, name, lock)
        if not caller.can(name, *MANAGE_ROLES):
            raise Forbidden(f"managing site {name} needs site_admin there (or admin)")
        return site

    def _readable_device(self, s: Session, caller: Principal, asset_id: str, lock: bool = False) -> Device:
        q = select(Device).where(Device.asset_id == asset_id)
        device = s.scalar(q.with_for_update(of=Device) if lock else q)
        if device is None or not caller.can(device.site.name, *READ_ROLES):
            raise NotFound(f"no device {asset_id}")
        return device


class FieldsInvalid(Invalid):
    """Fields refused, each named (devices, and sites changed as a whole)."""

    code = "invalid"

    def __init__(self, problems: list[FieldProblem]):
        super().__init__("; ".join(f"{p.field}: {p.error}" for p in problems))
        self.problems = problems

    def extra(self) -> dict:
        return {"problems": [{"field": p.field, "error": p.error} for p in self.problems]}


def check_device(caller: Principal, policy: Policy, body: DeviceCreate, site: Site | None, *, now) -> list[FieldProblem]:
    """Checks beyond the field formats: the type and protocols are in the policy, the site exists and the
    caller manages it, the addresses lie in the site's networks, last_seen is not in the future."""
    problems = []
    if body.device_type not in policy.document.device_types:
        known = ", ".join(sorted(policy.document.device_types)) or "none"
        problems.append(FieldProblem("device_type", f"{body.device_type!r} is not a device type of the active policy (it has: {known})"))
    if site is None:
        problems.append(FieldProblem("site", f"there is no site {body.site!r}"))
    elif not caller.can(site.name, *MANAGE_ROLES):
        problems.append(FieldProblem("site", f"you do not manage site {site.name} (site_admin there, or admin)"))
    elif site.lan_networks:
        nets = [ipaddress.ip_network(n) for n in site.lan_networks]
        for a in body.addresses:
            if not any(ipaddress.ip_address(a) in n for n in nets):
                problems.append(FieldProblem("addresses", f"{a} is outside site {site.name}'s networks ({', '.join(site.lan_networks)})"))
    for proto in body.ports:
        if proto not in policy.document.protocols:
            problems.append(FieldProblem("ports", f"{proto!r} is not a protocol of the catalogue"))
    if body.last_seen is not None and body.last_seen > now + _SKEW:
        problems.append(FieldProblem("last_seen", "is in the future"))
    return problems


def device_public(d: Device) -> DevicePublic:
    return DevicePublic(asset_id=d.asset_id, device_type=d.device_type, site=d.site.name, addresses=list(d.addresses),
                        mac=d.mac, iccid=d.iccid, eid=d.eid, imsis=list(d.imsis or []), firmware=d.firmware,
                        lifecycle=d.lifecycle, last_seen=d.last_seen, ports=dict(d.ports or {}),
                        description=d.description or "", revision=d.revision, created_at=d.created_at, updated_at=d.updated_at)


def _revalidate(model, values: dict):
    """The stored record with the changes applied, checked as a whole (e.g. port_max below the stored
    port_min): a problem is the caller's, so 422 naming the field."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = [FieldProblem(".".join(str(x) for x in e["loc"]) or "(request)", e["msg"].removeprefix("Value error, "))
                    for e in exc.errors()]
        raise FieldsInvalid(problems) from None


def _raise(problems: list[FieldProblem]) -> None:
    if problems:
        raise FieldsInvalid(problems)


def shown_to(caller: Principal, site: str, asset_ids: list[str]) -> str:
    """Other devices named in an error, as the caller may see them: by asset ID only at sites they can read."""
    return ", ".join(asset_ids) if caller.can(site, *READ_ROLES) else "a device at a site you cannot see"


def _unique_sim(s: Session, caller: Principal, iccid: str | None, eid: str | None, own_id: int | None) -> list[FieldProblem]:
    problems = []
    for field, value in (("iccid", iccid), ("eid", eid)):
        if value:
            other = s.execute(select(Device.asset_id, Site.name).join(Site, Device.site_id == Site.id)
                              .where(getattr(Device, field) == value, Device.id != (own_id or -1))).first()
            if other:
                asset_id, site = other
                problems.append(FieldProblem(field, f"{value} is already bound to {shown_to(caller, site, [asset_id])}"))
    return problems


def _unique_addresses(s: Session, caller: Principal, site: Site | None, addresses: list[str], own_id: int | None) -> list[FieldProblem]:
    """A LAN address belongs to one device per site: the agent reaches and filters devices by it."""
    if site is None or not addresses:
        return []
    wanted, holders = set(addresses), {}
    for asset_id, addrs in s.execute(select(Device.asset_id, Device.addresses)
                                     .where(Device.site_id == site.id, Device.id != (own_id or -1))):
        for address in wanted.intersection(addrs):
            holders.setdefault(address, []).append(asset_id)
    return [FieldProblem("addresses", f"{a} is also the address of {shown_to(caller, site.name, sorted(holders[a]))}")
            for a in addresses if a in holders]


def _baseline_of(d: Device) -> tuple | None:
    return baselines.in_baseline(d.site_id, d.lifecycle, d.device_type, d.addresses)


def _bump_if_moved(s: Session, before: tuple | None, after: tuple | None) -> list[str]:
    """A device's part of its site's baseline changed: new generations for the nodes of the site(s) concerned."""
    if before == after:
        return []
    return baselines.bump_site(s, before and before[0], after and after[0])


def _site_by_name(s: Session, name: str) -> Site | None:
    return s.scalar(select(Site).where(Site.name == name))


def _check_pool(s: Session, pool: str, own_id: int | None) -> None:
    net = ipaddress.ip_network(pool)
    for other in s.scalars(select(Site).where(Site.id != (own_id or -1))):
        if net.overlaps(ipaddress.ip_network(other.tunnel_pool)):
            raise Conflict(f"tunnel pool {pool} overlaps site {other.name}'s pool {other.tunnel_pool}")


def _devices_outside(s: Session, site: Site, networks: list[str]) -> list[str]:
    if not networks:
        return []
    nets = [ipaddress.ip_network(n) for n in networks]
    out = []
    for asset_id, addresses in s.execute(select(Device.asset_id, Device.addresses).where(Device.site_id == site.id)):
        if any(not any(ipaddress.ip_address(a) in n for n in nets) for a in addresses):
            out.append(asset_id)
    return sorted(out)


def _site_fields(site: Site) -> dict:
    return {k: getattr(site, k) for k in ("display_name", "time_zone", "tunnel_pool", "port_min", "port_max",
                                          "public_endpoint", "lan_networks", "change_windows", "unpassported",
                                          "device_networks")}


def _device_fields(d: Device) -> dict:
    out = {k: getattr(d, k) for k in DEVICE_FIELDS if k != "site"}
    out["site"] = d.site.name
    return {k: v for k, v in out.items() if v is not None}


def _site_public(s: Session, site: Site) -> SitePublic:
    agents = s.scalars(select(NodeAgent).where(NodeAgent.site_id == site.id).order_by(NodeAgent.name)).all()
    count = s.scalar(select(func.count()).select_from(Device).where(Device.site_id == site.id))
    return SitePublic(**_site_fields(site), name=site.name, agents=[AgentIO(name=a.name, description=a.description) for a in agents],
                      devices=count, revision=site.revision, created_at=site.created_at, updated_at=site.updated_at)


def _event(s: Session, caller: Principal, now, source, type_: str, subject: str, **body) -> None:
    events.record(s, at=now, category="inventory", type=type_, result="success", actor_id=caller.user_id,
                  actor=caller.username, subject=subject, source=source, **body)
