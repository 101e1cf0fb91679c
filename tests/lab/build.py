"""Turning a `layout.plan()` into namespaces, bridges and veth pairs. Called by `topology.Lab.build` only.

Four steps, each batched to keep a default site well under a second: one `ip -batch` creates every namespace,
sysctls are written in-process, one batch inside the router creates bridges and every veth pair (the host end
lands directly in the host's namespace, so nothing is ever created in the root namespace), then one batch per
host, run concurrently, configures the host end.
"""

from __future__ import annotations

from .layout import ROUTER, SEGMENTS, Host
from .nsutil import ip_batch, ip_batch_parallel, list_netns, write_sysctls


def build_site(hosts: dict[str, Host], ipv6: bool) -> None:
    """Create the whole site. The caller has checked `clashes()` and registered every namespace beforehand."""
    ip_batch(f"netns add {h.netns}" for h in hosts.values())
    for h in hosts.values():
        # IPv6 must be off before any interface appears, so that none ever gets an address or sends a packet.
        write_sysctls(h.netns, sysctls(h, ipv6))
    router = hosts[ROUTER]
    ip_batch(router_script(hosts, ipv6), netns=router.netns)
    ip_batch_parallel({h.netns: host_script(h, ipv6) for h in hosts.values() if h.role != ROUTER})


def clashes(hosts: dict[str, Host]) -> list[str]:
    """Namespaces of this plan that exist already (they belong to someone else: never build over them)."""
    return sorted(set(list_netns()) & {h.netns for h in hosts.values()})


def sysctls(host: Host, ipv6: bool) -> dict[str, int]:
    values: dict[str, int] = {}
    if not ipv6:
        values["net.ipv6.conf.all.disable_ipv6"] = 1
        values["net.ipv6.conf.default.disable_ipv6"] = 1
    else:
        # Duplicate address detection keeps link-local addresses tentative for ~2 s, stalling neighbour
        # discovery; addresses in a lab are unique by construction.
        values["net.ipv6.conf.all.accept_dad"] = 0
        values["net.ipv6.conf.default.accept_dad"] = 0
    # IPv4 settings of a new namespace are inherited from the root namespace: set forwarding explicitly.
    values["net.ipv4.ip_forward"] = 1 if host.role == ROUTER else 0
    if ipv6 and host.role == ROUTER:
        values["net.ipv6.conf.all.forwarding"] = 1
    return values


def router_script(hosts: dict[str, Host], ipv6: bool) -> list[str]:
    lines = ["link set lo up"]
    for seg in SEGMENTS.values():
        lines += [
            f"link add {seg.bridge} type bridge",
            f"addr add {seg.addr(1)}/{seg.prefixlen} dev {seg.bridge}",
        ]
        if ipv6:
            lines.append(f"addr add {seg.addr6(1)}/64 dev {seg.bridge} nodad")
        lines.append(f"link set {seg.bridge} up")
    for h in hosts.values():
        if h.role != ROUTER:
            lines += [
                f"link add {h.port} type veth peer name eth0 netns {h.netns}",
                f"link set {h.port} master {h.bridge} up",
            ]
    return lines


def host_script(host: Host, ipv6: bool) -> list[str]:
    prefix = host.network.split("/")[1]
    lines = ["link set lo up", f"addr add {host.address}/{prefix} dev eth0"]
    if ipv6 and host.address6:
        lines.append(f"addr add {host.address6}/64 dev eth0 nodad")
    lines.append("link set eth0 up")
    if host.gateway:
        lines.append(f"route add default via {host.gateway}")
    if ipv6 and host.gateway6:
        lines.append(f"route add ::/0 via {host.gateway6}")
    return lines
