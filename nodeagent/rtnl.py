"""rtnetlink: the link, address, route and policy-rule operations a lane needs.

Every function takes an open `Rtnl` (a NETLINK_ROUTE socket) so that the caller chooses the network
namespace: a socket opened inside a lane's namespace keeps operating there.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from .netlink import (
    NETLINK_ROUTE,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NetlinkSocket,
    attr,
    attr_str,
    attr_u32,
    cstr,
    nest,
    parse_attrs,
)

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWRULE, RTM_DELRULE = 32, 33

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 1, 3, 4, 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
IFF_UP = 0x1

IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
FRA_DST, FRA_SRC, FRA_IIFNAME, FRA_PRIORITY, FRA_TABLE = 1, 2, 3, 6, 15

RT_TABLE_MAIN, RT_TABLE_LOCAL = 254, 255
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RTN_UNICAST = 1
FR_ACT_TO_TBL, FR_ACT_BLACKHOLE = 1, 6
# Routes the agent adds carry this protocol number, so `ip route show proto 87` lists them.
RTPROT_WICKET = 87

_IFINFO = struct.Struct("=BxHiII")
_IFADDR = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_FIBRULE = struct.Struct("=BBBBBBBBI")


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    up: bool
    kind: str | None


class Rtnl(NetlinkSocket):
    def __init__(self) -> None:
        super().__init__(NETLINK_ROUTE)


def get_link(rt: Rtnl, name: str) -> Link:
    """One link by name (a kernel lookup, not a dump). Raises NetlinkError(ENODEV) if absent."""
    replies = rt.request(RTM_GETLINK, 0, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, name))
    return _link(replies[0][1])


def list_links(rt: Rtnl, prefix: str = "") -> list[Link]:
    links = [_link(p) for t, p in rt.dump(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)) if t == RTM_NEWLINK]
    return [link for link in links if link.name.startswith(prefix)]


def add_veth(rt: Rtnl, name: str, peer: str, peer_netns_fd: int | None = None) -> None:
    peer_attrs = attr_str(IFLA_IFNAME, peer)
    if peer_netns_fd is not None:
        peer_attrs += attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
    info = nest(
        IFLA_LINKINFO,
        attr_str(IFLA_INFO_KIND, "veth"),
        nest(IFLA_INFO_DATA, nest(VETH_INFO_PEER, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + peer_attrs)),
    )
    rt.request(
        RTM_NEWLINK,
        NLM_F_CREATE | NLM_F_EXCL,
        _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, name) + info,
    )


def add_link(rt: Rtnl, name: str, kind: str) -> None:
    info = nest(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, kind))
    rt.request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr_str(IFLA_IFNAME, name) + info)


def set_up(rt: Rtnl, index: int, up: bool = True) -> None:
    rt.request(RTM_NEWLINK, 0, _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP))


def del_link(rt: Rtnl, index: int) -> None:
    rt.request(RTM_DELLINK, 0, _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0))


def add_addr(rt: Rtnl, index: int, address: str, prefixlen: int) -> None:
    raw = ipaddress.IPv4Address(address).packed
    rt.request(
        RTM_NEWADDR,
        NLM_F_CREATE | NLM_F_EXCL,
        _IFADDR.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index) + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw),
    )


def list_addrs(rt: Rtnl) -> list[tuple[int, str, int]]:
    """IPv4 addresses as (link index, address, prefix length)."""
    out = []
    for t, p in rt.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0)):
        if t != RTM_NEWADDR:
            continue
        family, plen, _f, _s, index = _IFADDR.unpack_from(p)
        attrs = parse_attrs(p[_IFADDR.size :])
        raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
        if family == socket.AF_INET and raw:
            out.append((index, str(ipaddress.IPv4Address(raw)), plen))
    return out


def add_route(
    rt: Rtnl,
    dst: str,
    *,
    gateway: str | None = None,
    oif: int | None = None,
    table: int = RT_TABLE_MAIN,
    replace: bool = False,
) -> None:
    net = ipaddress.IPv4Network(dst)
    scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
    body = _RTMSG.pack(socket.AF_INET, net.prefixlen, 0, 0, table if table < 256 else 0, RTPROT_WICKET, scope, RTN_UNICAST, 0)
    attrs = attr_u32(RTA_TABLE, table)
    if net.prefixlen:
        attrs += attr(RTA_DST, net.network_address.packed)
    if gateway:
        attrs += attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
    if oif is not None:
        attrs += attr_u32(RTA_OIF, oif)
    rt.request(RTM_NEWROUTE, NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL), body + attrs)


def add_rule(
    rt: Rtnl,
    priority: int,
    *,
    table: int | None = None,
    blackhole: bool = False,
    iif: str | None = None,
    src: str | None = None,
    dst: str | None = None,
) -> None:
    _rule(rt, RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, priority, table, blackhole, iif, src, dst)


def del_rule(rt: Rtnl, priority: int, *, table: int | None = None) -> None:
    _rule(rt, RTM_DELRULE, 0, priority, table, False, None, None, None)


def _rule(rt, msg, flags, priority, table, blackhole, iif, src, dst) -> None:
    src_net = ipaddress.IPv4Network(src) if src else None
    dst_net = ipaddress.IPv4Network(dst) if dst else None
    action = FR_ACT_BLACKHOLE if blackhole else FR_ACT_TO_TBL
    body = _FIBRULE.pack(
        socket.AF_INET,
        dst_net.prefixlen if dst_net else 0,
        src_net.prefixlen if src_net else 0,
        0,
        table if table is not None and table < 256 else 0,
        0,
        0,
        action,
        0,
    )
    attrs = attr_u32(FRA_PRIORITY, priority)
    if table is not None:
        attrs += attr_u32(FRA_TABLE, table)
    if iif:
        attrs += attr_str(FRA_IIFNAME, iif)
    if src_net:
        attrs += attr(FRA_SRC, src_net.network_address.packed)
    if dst_net:
        attrs += attr(FRA_DST, dst_net.network_address.packed)
    rt.request(msg, flags, body + attrs)


def _link(payload: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFO.unpack_from(payload)
    attrs = parse_attrs(payload[_IFINFO.size :])
    kind = None
    if IFLA_LINKINFO in attrs:
        info = parse_attrs(attrs[IFLA_LINKINFO])
        if IFLA_INFO_KIND in info:
            kind = cstr(info[IFLA_INFO_KIND])
    return Link(index=index, name=cstr(attrs.get(IFLA_IFNAME, b"")), up=bool(flags & IFF_UP), kind=kind)


__all__ = [
    "Link",
    "Rtnl",
    "RT_TABLE_LOCAL",
    "RT_TABLE_MAIN",
    "add_addr",
    "add_link",
    "add_route",
    "add_rule",
    "add_veth",
    "del_link",
    "del_rule",
    "get_link",
    "list_addrs",
    "list_links",
    "set_up",
]
