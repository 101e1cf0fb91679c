"""A small synchronous netlink core: messages, attributes, request/ack, dumps.

Used by `rtnl` (links, addresses, routes, rules), `ctnl` (conntrack) and `nftraw` (reading single
nf_tables set elements). pyroute2 does all of this and more, but its per-call overhead (~1 ms) is
twenty times the kernel's (~0.05 ms), and opening a lane takes a dozen calls.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLA_F_NESTED = 0x8000
NLA_F_NET_BYTEORDER = 0x4000
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_EXT_ACK = 11

_HDR = struct.Struct("=IHHII")


class NetlinkError(OSError):
    """The kernel refused a netlink request; `errno` says why."""


def align4(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * (align4(length) - length)


def nest(kind: int, *children: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def attr_be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value))


def parse_attrs(buf: bytes) -> dict[int, bytes]:
    """Attributes of one level, by type (flags stripped); a repeated type keeps the last value."""
    return dict(iter_attrs(buf))


def iter_attrs(buf: bytes) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off + 4 <= len(buf):
        length, kind = struct.unpack_from("=HH", buf, off)
        if length < 4:
            break
        yield kind & NLA_TYPE_MASK, buf[off + 4 : off + length]
        off += align4(length)


def u8(b: bytes) -> int:
    return b[0]


def u32(b: bytes) -> int:
    return struct.unpack("=I", b[:4])[0]


def be16(b: bytes) -> int:
    return struct.unpack(">H", b[:2])[0]


def be32(b: bytes) -> int:
    return struct.unpack(">I", b[:4])[0]


def be64(b: bytes) -> int:
    return struct.unpack(">Q", b[:8])[0]


def cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace")


class NetlinkSocket:
    """One netlink socket in the network namespace of the thread that created it."""

    def __init__(self, protocol: int, groups: int = 0, rcvbuf: int | None = None):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        if rcvbuf:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((0, groups))
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def join_group(self, group: int) -> None:
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def request(self, msg_type: int, flags: int, payload: bytes) -> list[tuple[int, bytes]]:
        """Send one request with an ACK; return the replies that came before the ACK."""
        seq = self._send(msg_type, flags | NLM_F_REQUEST | NLM_F_ACK, payload)
        return list(self._collect(seq, dump=False))

    def dump(self, msg_type: int, payload: bytes, flags: int = 0) -> Iterator[tuple[int, bytes]]:
        seq = self._send(msg_type, flags | NLM_F_REQUEST | NLM_F_DUMP, payload)
        return self._collect(seq, dump=True)

    def recv_messages(self, bufsize: int = 1 << 20) -> list[tuple[int, int, bytes]]:
        """Receive one datagram (events): [(type, flags, payload)]. Raises OSError(ENOBUFS) on overrun."""
        data = self.sock.recv(bufsize)
        return [(t, f, p) for t, f, _seq, p in _split(data)]

    def _send(self, msg_type: int, flags: int, payload: bytes) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        self.sock.send(_HDR.pack(_HDR.size + len(payload), msg_type, flags, self._seq, 0) + payload)
        return self._seq

    def _collect(self, seq: int, dump: bool) -> Iterator[tuple[int, bytes]]:
        while True:
            data = self.sock.recv(1 << 20)
            for msg_type, _flags, msg_seq, payload in _split(data):
                if msg_seq != seq:
                    continue  # a late answer to an earlier request
                if msg_type == NLMSG_ERROR:
                    code = struct.unpack_from("=i", payload)[0]
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return
                if msg_type == NLMSG_DONE:
                    if dump:
                        return
                    continue
                yield msg_type, payload


def _split(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    off = 0
    while off + _HDR.size <= len(data):
        length, msg_type, flags, seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size:
            break
        yield msg_type, flags, seq, data[off + _HDR.size : off + length]
        off += align4(length)
