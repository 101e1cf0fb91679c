"""Device baselines in a node's desired state: which devices of the site have an active passport, the
flows each device type may open (its profile), the destinations those flows name, and the site's
choice for hosts without a passport. `session_lanes.desired_state` calls `baseline_state`; everything
that changes what it returns bumps the nodes' generation in the same transaction (`bump_site`,
`bump_all`): a device's lifecycle, addresses, type or site, a policy apply, the site's settings. The
caller hands the bumped nodes their new state after the commit (`on_nodes_changed`, wired to the pusher).

The agent enforces IPv4 only: a destination's IPv6 addresses are left out, and a destination left with
nothing is dropped from the flows that name it (those flows are then not allowed: default deny).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from nodeagent.wire import BaselineFlow, BaselineState, Destination, DeviceBaseline, DeviceProfile

from .models import Device, Lifecycle, NodeAgent, PolicyVersion, Site
from .policy.model import PolicyDocument


def baseline_state(s: Session, site: Site, compiled: Compiled, grant_destinations: set[str] = frozenset()) -> BaselineState:
    """The site's baselines under the applied policy (`applied`). The profiles are those of the types the
    site's active devices have; the destinations those profiles name, and `grant_destinations` (the ones
    the node's grants name)."""
    # only the columns a baseline needs: a whole Device row joins its site and carries the SIM binding
    rows = s.execute(select(Device.asset_id, Device.device_type, Device.addresses)
                     .where(Device.site_id == site.id, Device.lifecycle == Lifecycle.active.value)
                     .order_by(Device.asset_id)).all()
    devices, types = [], set()
    for asset_id, device_type, addresses in rows:
        v4 = [a for a in addresses or () if _is_v4(a)]
        if v4:
            # Built without validation: the inventory checked every field on the way in, parsing thousands of
            # addresses again was most of this function's time, and the agent validates the state it receives.
            devices.append(DeviceBaseline.model_construct(asset_id=asset_id, addresses=v4, profile=device_type))
            types.add(device_type)
    profiles = [compiled.profiles.get(t) or DeviceProfile(name=t) for t in sorted(types)]
    used = {n for p in profiles for f in p.flows for n in f.to} | {n for n in grant_destinations if n in compiled.destinations}
    return BaselineState(unpassported=site.unpassported or "router", device_networks=list(site.device_networks or ()),
                         destinations=[compiled.destinations[n] for n in sorted(used)], profiles=profiles, devices=devices)


@dataclass(frozen=True)
class Compiled:
    """The applied policy's baselines in wire shape: a profile per device type, the usable destinations."""

    version: str
    profiles: dict[str, DeviceProfile]
    destinations: dict[str, Destination]

    def flows(self, flows: list[dict]) -> list[BaselineFlow]:
        """Stored grant flows ({protocol, transport, ports, to}) as the agent takes them, without the
        destinations this policy no longer has (a flow left with none is dropped)."""
        out = []
        for f in flows:
            to = [n for n in f["to"] if n in self.destinations]
            if to:
                out.append(BaselineFlow(protocol=f["protocol"], transport=f["transport"], ports=f["ports"], to=to))
        return out


def applied(s: Session) -> Compiled | None:
    """The newest applied policy, compiled once per version (a version names its content)."""
    version = s.scalar(select(PolicyVersion.version).order_by(PolicyVersion.id.desc()).limit(1))
    if version is None:
        return None
    with _lock:
        hit = _cache.get(version)
    if hit is not None:
        return hit
    document = s.scalar(select(PolicyVersion.document).where(PolicyVersion.version == version)
                        .order_by(PolicyVersion.id.desc()).limit(1))
    compiled = compile_baselines(version, PolicyDocument.model_validate(document))
    with _lock:
        if len(_cache) >= 8:
            _cache.pop(next(iter(_cache)))
        _cache[version] = compiled
    return compiled


def compile_baselines(version: str, doc: PolicyDocument) -> Compiled:
    destinations = {}
    for name, d in doc.destinations.items():
        v4 = [a for a in d.addresses if _is_v4(a)]
        if v4 or d.fqdn:
            destinations[name] = Destination(name=name, addresses=v4, fqdn=d.fqdn)
    profiles = {}
    for name, dt in doc.device_types.items():
        flows = []
        for flow in dt.baseline:
            proto = doc.protocols[flow.protocol]
            to = [n for n in flow.to if n in destinations]
            if to:
                flows.append(BaselineFlow(protocol=flow.protocol, transport=proto.transport, ports=flow.ports or proto.ports, to=to))
        profiles[name] = DeviceProfile(name=name, flows=flows)
    return Compiled(version, profiles, destinations)


def bump_site(s: Session, *site_ids: int | None) -> list[str]:
    """A new generation for every node of these sites (their baselines changed); the nodes, to push to
    once the transaction has committed."""
    ids = sorted({i for i in site_ids if i is not None})
    if not ids:
        return []
    s.execute(update(NodeAgent).where(NodeAgent.site_id.in_(ids)).values(generation=NodeAgent.generation + 1))
    return list(s.scalars(select(NodeAgent.name).where(NodeAgent.site_id.in_(ids))))


def bump_all(s: Session) -> list[str]:
    s.execute(update(NodeAgent).values(generation=NodeAgent.generation + 1))
    return list(s.scalars(select(NodeAgent.name)))


def in_baseline(site_id: int | None, lifecycle: str | None, device_type: str | None, addresses) -> tuple | None:
    """What of a device its site's baseline shows: compare before and after a change, and bump the
    sites whose part differs. None: the device is in no baseline."""
    v4 = tuple(a for a in addresses or () if _is_v4(a))
    if lifecycle != Lifecycle.active.value or not v4:
        return None
    return (site_id, device_type, v4)


def _is_v4(address: str) -> bool:
    return isinstance(address, str) and address.count(".") == 3 and ":" not in address


_cache: dict[str, Compiled] = {}
_lock = threading.Lock()
