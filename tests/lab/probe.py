"""ICMP echo from inside a lab namespace, without needing a `ping` binary. Called by `Lab.ping()`.

The raw socket is opened on a thread that has entered the namespace (see `nsutil.in_netns`), so the probe
costs no process start and works for IPv4 and IPv6 alike.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time

from .nsutil import in_netns


def ping(netns: str, dst: str, count: int = 1, timeout: float = 1.0) -> bool:
    """True if any of `count` echo requests to dst gets a reply within `timeout` seconds each.

    False also when the namespace has no route to dst (the send fails with ENETUNREACH).
    """
    return in_netns(netns, _ping_here, dst, count, timeout)


def _ping_here(dst: str, count: int, timeout: float) -> bool:
    v6 = ipaddress.ip_address(dst).version == 6
    family, proto, request = (
        (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP, 8)
    )
    ident = int.from_bytes(os.urandom(2), "big")
    with socket.socket(family, socket.SOCK_RAW, proto) as s:
        for seq in range(1, count + 1):
            payload = os.urandom(16)
            packet = struct.pack("!BBHHH", request, 0, 0, ident, seq) + payload
            if not v6:  # the kernel fills in the ICMPv6 checksum itself, but not the ICMPv4 one
                packet = packet[:2] + struct.pack("!H", _checksum(packet)) + packet[4:]
            try:
                s.sendto(packet, (dst, 0))
            except OSError:
                return False
            if _await_reply(s, v6, dst, ident, seq, payload, timeout):
                return True
    return False


def _await_reply(
    s: socket.socket, v6: bool, dst: str, ident: int, seq: int, payload: bytes, timeout: float
) -> bool:
    reply = 129 if v6 else 0
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            data, addr = s.recvfrom(4096)
        except TimeoutError:
            return False
        if not v6:
            data = data[(data[0] & 0x0F) * 4 :]  # IPv4 raw sockets deliver the IP header too
        if len(data) < 8 or ipaddress.ip_address(addr[0].split("%")[0]) != ipaddress.ip_address(dst):
            continue
        typ, _code, _sum, rid, rseq = struct.unpack("!BBHHH", data[:8])
        if typ == reply and rid == ident and rseq == seq and data[8:] == payload:
            return True
    return False


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
