"""Names and addresses of a lab site. Pure functions, no side effects.

`topology.Lab` calls `plan()` to decide what to build; `cleanup.sweep_stale()` uses `NETNS_RE` to recognise
lab namespaces left behind by crashed runs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from dataclasses import dataclass

RUN_ID_RE = re.compile(r"^[a-z0-9]{6}$")
ROLE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
NETNS_RE = re.compile(r"^wkt-([a-z0-9]{6})-(.+)$")
ROUTER = "rtr"
IFNAMSIZ = 15
_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class Host:
    """One namespace of the lab. The router's `address` is its public (wan0) address."""

    role: str
    netns: str
    address: str
    network: str
    address6: str | None = None
    network6: str | None = None
    gateway: str | None = None  # None: no default route (router, engineers)
    gateway6: str | None = None
    kind: str = ""  # "router", "device", "master" or "engineer"
    bridge: str = ""  # the router bridge this host hangs off ("" for the router)
    port: str = ""  # router end of this host's veth pair ("" for the router)


@dataclass(frozen=True)
class Segment:
    """One router bridge and its subnets. The router is host 1; hosts count up from FIRST_HOST."""

    bridge: str
    network: str
    network6: str

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.network).prefixlen

    def addr(self, n: int) -> str:
        return str(ipaddress.ip_network(self.network)[n])

    def addr6(self, n: int) -> str:
        # ::10, ::11, ... mirror the IPv4 last octet textually (192.0.2.10 pairs with 2001:db8:0:2::10).
        net = ipaddress.ip_network(self.network6)
        return str(ipaddress.IPv6Address(str(net.network_address).rstrip(":") + f"::{n}"))


# The engineers' side is the router's "internet"; devices and masters sit behind it.
SEGMENTS = {
    "engineer": Segment("wan0", "203.0.113.0/24", "2001:db8:0:1::/64"),
    "device": Segment("lan0", "192.0.2.0/24", "2001:db8:0:2::/64"),
    "master": Segment("ops0", "198.51.100.0/24", "2001:db8:0:3::/64"),
}
FIRST_HOST = 10


def new_run_id() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(6))


def agent_tag(run_id: str) -> str:
    """3 chars [a-z0-9], stable for a run id, so the agent's interface prefix "wk"+tag is run-specific."""
    n = int.from_bytes(hashlib.blake2b(run_id.encode(), digest_size=8, person=b"wicket-lab").digest(), "big")
    return "".join(_ALNUM[(n // 36**i) % 36] for i in range(3))


def netns_name(run_id: str, role: str) -> str:
    return f"wkt-{run_id}-{role}"


def engineer_ifname(run_id: str, index: int) -> str:
    name = f"we{run_id}{index}"
    if len(name) > IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
    return name


def plan(run_id: str, devices, masters, engineers, ipv6: bool) -> dict[str, Host]:
    """Every host of the site keyed by role, router first. Raises ValueError on bad or duplicate roles."""
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"run id {run_id!r} must be exactly 6 characters of [a-z0-9]")
    wan = SEGMENTS["engineer"]
    hosts = {
        ROUTER: Host(
            role=ROUTER,
            netns=netns_name(run_id, ROUTER),
            address=wan.addr(1),
            network=wan.network,
            address6=wan.addr6(1) if ipv6 else None,
            network6=wan.network6 if ipv6 else None,
            kind="router",
        )
    }
    n = 0
    for kind, roles in (("device", devices), ("master", masters), ("engineer", engineers)):
        seg = SEGMENTS[kind]
        for i, role in enumerate(roles):
            if not isinstance(role, str) or not ROLE_RE.match(role):
                raise ValueError(f"role {role!r} must match {ROLE_RE.pattern}")
            if role in hosts:
                raise ValueError(f"role {role!r} is used twice (or is the reserved router role)")
            if FIRST_HOST + i > 254:
                raise ValueError(f"too many {kind}s: at most {255 - FIRST_HOST}")
            n += 1
            # "v<n>" can never clash with "v-<role>", so long roles still get a unique port name.
            port = f"v-{role}" if len(role) + 2 <= IFNAMSIZ else f"v{n}"
            routed = kind != "engineer"
            hosts[role] = Host(
                role=role,
                netns=netns_name(run_id, role),
                address=seg.addr(FIRST_HOST + i),
                network=seg.network,
                address6=seg.addr6(FIRST_HOST + i) if ipv6 else None,
                network6=seg.network6 if ipv6 else None,
                gateway=seg.addr(1) if routed else None,
                gateway6=seg.addr6(1) if ipv6 and routed else None,
                kind=kind,
                bridge=seg.bridge,
                port=port,
            )
    return hosts
