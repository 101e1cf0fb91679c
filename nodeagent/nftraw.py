"""Reading nf_tables set elements straight from the kernel.

libnftables answers `get element` only after loading the whole set into its cache, so reading one
lane's counters would cost O(lanes). The kernel itself looks one element up by key: this module asks it
directly. Writes still go through libnftables (`firewall`), as one transaction each.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .netlink import (
    NETLINK_NETFILTER,
    NetlinkSocket,
    attr,
    attr_str,
    be64,
    cstr,
    iter_attrs,
    nest,
    parse_attrs,
)

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM = 12, 13
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_EXPRESSIONS = 1, 7, 11
NFTA_DATA_VALUE = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS = 1, 2
IFNAMSIZ = 16


@dataclass(frozen=True)
class Counted:
    key: bytes
    packets: int
    bytes: int


def key_ifname(name: str) -> bytes:
    return name.encode().ljust(IFNAMSIZ, b"\0")


def decode_blocked_key(key: bytes) -> tuple[str, str, int, int]:
    """ifname . ipv4_addr . inet_proto . inet_service, each field padded to 4 bytes."""
    name = cstr(key[:16])
    addr = str(ipaddress.IPv4Address(key[16:20]))
    proto = key[20]
    port = struct.unpack(">H", key[24:26])[0]
    return name, addr, proto, port


def decode_device_key(key: bytes) -> tuple[str, str, int, int]:
    """ipv4_addr . ipv4_addr . inet_proto . inet_service, each field padded to 4 bytes."""
    src = str(ipaddress.IPv4Address(key[0:4]))
    dst = str(ipaddress.IPv4Address(key[4:8]))
    return src, dst, key[8], struct.unpack(">H", key[12:14])[0]


class NftSets:
    def __init__(self, table: str, family: int = NFPROTO_INET):
        self.table, self.family = table, family
        self.nl = NetlinkSocket(NETLINK_NETFILTER)

    def close(self) -> None:
        self.nl.close()

    def counter(self, set_name: str, key: bytes) -> Counted | None:
        """The counter of one element, or None when the element does not exist."""
        elem = nest(NFTA_LIST_ELEM, nest(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, key)))
        body = self._head(set_name) + nest(NFTA_SET_ELEM_LIST_ELEMENTS, elem)
        try:
            replies = self.nl.request(_msg(NFT_MSG_GETSETELEM), 0, body)
        except OSError as exc:
            if exc.errno in (2, 19):  # ENOENT, ENODEV
                return None
            raise
        for _t, payload in replies:
            for counted in _elements(payload):
                return counted
        return None

    def dump(self, set_name: str) -> list[Counted]:
        out: list[Counted] = []
        for _t, payload in self.nl.dump(_msg(NFT_MSG_GETSETELEM), self._head(set_name)):
            out.extend(_elements(payload))
        return out

    def _head(self, set_name: str) -> bytes:
        return (
            struct.pack("=BBH", self.family, 0, 0)
            + attr_str(NFTA_SET_ELEM_LIST_TABLE, self.table)
            + attr_str(NFTA_SET_ELEM_LIST_SET, set_name)
        )


def _elements(payload: bytes) -> list[Counted]:
    attrs = parse_attrs(payload[4:])
    out = []
    for kind, elem in iter_attrs(attrs.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
        if kind != NFTA_LIST_ELEM:
            continue
        e = parse_attrs(elem)
        key = parse_attrs(e.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE, b"")
        packets = nbytes = 0
        exprs = []
        if NFTA_SET_ELEM_EXPR in e:
            exprs.append(e[NFTA_SET_ELEM_EXPR])
        for k, x in iter_attrs(e.get(NFTA_SET_ELEM_EXPRESSIONS, b"")):
            if k == NFTA_LIST_ELEM:
                exprs.append(x)
        for x in exprs:
            ex = parse_attrs(x)
            if cstr(ex.get(NFTA_EXPR_NAME, b"")) == "counter":
                data = parse_attrs(ex.get(NFTA_EXPR_DATA, b""))
                packets = be64(data.get(NFTA_COUNTER_PACKETS, bytes(8)))
                nbytes = be64(data.get(NFTA_COUNTER_BYTES, bytes(8)))
        out.append(Counted(key=key, packets=packets, bytes=nbytes))
    return out


def _msg(kind: int) -> int:
    return (NFNL_SUBSYS_NFTABLES << 8) | kind


__all__ = ["Counted", "NftSets", "decode_blocked_key", "key_ifname"]
