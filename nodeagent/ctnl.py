"""conntrack through ctnetlink: dump and flush a lane's connections by mark, and hear them end.

A lane's connections carry its ct mark (set by the nft ruleset on their first packet). At teardown
the agent dumps them (final counters) and flushes them: that, not removing a rule, is what ends an
established connection. While a lane lives, DESTROY events report connections that ended on their own.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .netlink import (
    NETLINK_NETFILTER,
    NetlinkSocket,
    attr_be32,
    be16,
    be32,
    be64,
    parse_attrs,
    u8,
)

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
NFNLGRP_CONNTRACK_DESTROY = 3

CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_MARK, CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_ID = 8, 9, 10, 12
CTA_TIMESTAMP, CTA_MARK_MASK = 20, 21
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_COUNTERS_PACKETS, CTA_COUNTERS_BYTES = 1, 2
CTA_TIMESTAMP_START, CTA_TIMESTAMP_STOP = 1, 2
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
TCP_FINISHED = {7, 8}  # TIME_WAIT, CLOSE: the connection ended; only its conntrack entry lingers

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}


@dataclass
class Flow:
    id: int
    mark: int
    proto: int
    src: str
    dst: str
    sport: int | None
    dport: int | None
    packets_orig: int
    bytes_orig: int
    packets_reply: int
    bytes_reply: int
    start_ns: int | None
    stop_ns: int | None
    tcp_state: int | None = None  # conntrack's TCP state, when the kernel reports it

    @property
    def finished(self) -> bool:
        """A TCP connection that had already ended (FIN/RST seen) when its entry was read."""
        return self.tcp_state in TCP_FINISHED

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES.get(self.proto, str(self.proto))


class Conntrack:
    """A ctnetlink socket in the caller's network namespace."""

    def __init__(self) -> None:
        self.nl = NetlinkSocket(NETLINK_NETFILTER)

    def close(self) -> None:
        self.nl.close()

    def dump(self, mark: int, mask: int = 0xFFFFFFFF) -> list[Flow]:
        """Connections whose mark matches (filtered in the kernel)."""
        body = _nfgen(socket.AF_INET) + attr_be32(CTA_MARK, mark) + attr_be32(CTA_MARK_MASK, mask)
        flows = []
        for _t, payload in self.nl.dump(_msg(IPCTNL_MSG_CT_GET), body):
            flow = parse_flow(payload)
            if flow is not None:
                flows.append(flow)
        return flows

    def flush(self, mark: int, mask: int = 0xFFFFFFFF) -> None:
        """Delete every connection whose mark matches; its DESTROY event carries the final counters."""
        body = _nfgen(socket.AF_INET) + attr_be32(CTA_MARK, mark) + attr_be32(CTA_MARK_MASK, mask)
        try:
            self.nl.request(_msg(IPCTNL_MSG_CT_DELETE), 0, body)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


class DestroyListener:
    """Hears conntrack DESTROY events in a thread and hands ours (by mark class) to `on_flow`.

    `on_overrun` is called when the kernel dropped events because we fell behind: evidence then notes
    that per-connection detail may be incomplete (lane totals stay exact: they are nft counters)."""

    def __init__(self, want: Callable[[int], bool], on_flow: Callable[[Flow], None], on_overrun: Callable[[], None]):
        self.want, self.on_flow, self.on_overrun = want, on_flow, on_overrun
        self.nl = NetlinkSocket(NETLINK_NETFILTER, rcvbuf=8 << 20)
        self.nl.join_group(NFNLGRP_CONNTRACK_DESTROY)
        self._stop = False
        self._waiting = False
        self.thread = threading.Thread(target=self._run, name="conntrack-destroy", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every event queued so far has been handled (the thread is back in recv, queue empty)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._waiting and not self._pending():
                return True
            time.sleep(0.001)
        return False

    def _pending(self) -> bool:
        try:
            return bool(self.nl.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False
        except OSError:
            return False

    def stop(self) -> None:
        self._stop = True
        try:
            self.nl.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.nl.close()

    def _run(self) -> None:
        while not self._stop:
            try:
                self._waiting = True
                messages = self.nl.recv_messages()
                self._waiting = False
            except OSError as exc:
                if self._stop:
                    return
                if exc.errno == errno.ENOBUFS:
                    self.on_overrun()
                    continue
                raise
            for msg_type, _flags, payload in messages:
                if msg_type & 0xFF != IPCTNL_MSG_CT_DELETE:
                    continue
                flow = parse_flow(payload)
                if flow is not None and self.want(flow.mark):
                    self.on_flow(flow)


def parse_flow(payload: bytes) -> Flow | None:
    attrs = parse_attrs(payload[4:])
    if CTA_TUPLE_ORIG not in attrs:
        return None
    src, dst, proto, sport, dport = _tuple(attrs[CTA_TUPLE_ORIG])
    po, bo = _counters(attrs.get(CTA_COUNTERS_ORIG))
    pr, br = _counters(attrs.get(CTA_COUNTERS_REPLY))
    start = stop = None
    if CTA_TIMESTAMP in attrs:
        ts = parse_attrs(attrs[CTA_TIMESTAMP])
        start = be64(ts[CTA_TIMESTAMP_START]) if CTA_TIMESTAMP_START in ts else None
        stop = be64(ts[CTA_TIMESTAMP_STOP]) if CTA_TIMESTAMP_STOP in ts else None
    return Flow(
        id=be32(attrs[CTA_ID]) if CTA_ID in attrs else 0,
        mark=be32(attrs[CTA_MARK]) if CTA_MARK in attrs else 0,
        proto=proto,
        src=src,
        dst=dst,
        sport=sport,
        dport=dport,
        packets_orig=po,
        bytes_orig=bo,
        packets_reply=pr,
        bytes_reply=br,
        start_ns=start or None,
        stop_ns=stop or None,
        tcp_state=_tcp_state(attrs.get(CTA_PROTOINFO)),
    )


def _tcp_state(buf: bytes | None) -> int | None:
    if not buf:
        return None
    tcp = parse_attrs(buf).get(CTA_PROTOINFO_TCP)
    if not tcp:
        return None
    state = parse_attrs(tcp).get(CTA_PROTOINFO_TCP_STATE)
    return u8(state) if state else None


def _tuple(buf: bytes) -> tuple[str, str, int, int | None, int | None]:
    t = parse_attrs(buf)
    ip = parse_attrs(t.get(CTA_TUPLE_IP, b""))
    if CTA_IP_V4_SRC in ip:
        src, dst = str(ipaddress.IPv4Address(ip[CTA_IP_V4_SRC])), str(ipaddress.IPv4Address(ip[CTA_IP_V4_DST]))
    else:
        src = str(ipaddress.IPv6Address(ip.get(CTA_IP_V6_SRC, bytes(16))))
        dst = str(ipaddress.IPv6Address(ip.get(CTA_IP_V6_DST, bytes(16))))
    proto = parse_attrs(t.get(CTA_TUPLE_PROTO, b""))
    num = u8(proto[CTA_PROTO_NUM]) if CTA_PROTO_NUM in proto else 0
    sport = be16(proto[CTA_PROTO_SRC_PORT]) if CTA_PROTO_SRC_PORT in proto else None
    dport = be16(proto[CTA_PROTO_DST_PORT]) if CTA_PROTO_DST_PORT in proto else None
    return src, dst, num, sport, dport


def _counters(buf: bytes | None) -> tuple[int, int]:
    if not buf:
        return 0, 0
    c = parse_attrs(buf)
    return be64(c.get(CTA_COUNTERS_PACKETS, bytes(8))), be64(c.get(CTA_COUNTERS_BYTES, bytes(8)))


def _msg(kind: int) -> int:
    return (NFNL_SUBSYS_CTNETLINK << 8) | kind


def _nfgen(family: int) -> bytes:
    return struct.pack("=BBH", family, 0, 0)
