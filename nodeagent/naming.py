"""Names and numbers the agent owns: lane interface names, conntrack marks, lane link addresses.

Everything a lane puts in the kernel carries a name derived from the agent's prefix and the session id,
so the agent can tell its own objects from the router's and sweep the ones nobody wants any more.
UAPI sockets of userspace WireGuard live in one machine-wide directory, so names must be unique
machine-wide: the prefix includes a per-agent tag.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re

TAG_RE = re.compile(r"^[a-z0-9]{3}$")
IFNAMSIZ = 15

DATA_MARK = 0x56000000  # ct mark class of a lane's own connections (engineer ↔ device)
TRANSPORT_MARK = 0x57000000  # ct mark class of a lane's outer UDP flow (engineer's client ↔ node)
MARK_CLASS = 0xFF000000
MARK_ID = 0x00FFFFFF
# The two classes differ in one bit, so one masked flush ends all of a lane's connections.
LANE_MASK = 0xFEFFFFFF

DEFAULT_LINK_NET = ipaddress.IPv4Network("169.254.0.0/16")


class Naming:
    def __init__(self, tag: str, link_net: ipaddress.IPv4Network = DEFAULT_LINK_NET):
        if not TAG_RE.match(tag):
            raise ValueError(f"agent tag {tag!r} must be exactly 3 characters of [a-z0-9]")
        if link_net.prefixlen > 24:
            raise ValueError("the lane link network must be /24 or larger")
        self.tag = tag
        self.prefix = "wk" + tag
        self._names: dict[str, str] = {}
        self.link_net = link_net

    def lane_name(self, session_id: str) -> str:
        name = self._names.get(session_id)
        if name is None:
            digest = hashlib.blake2b(session_id.encode(), digest_size=8).digest()
            name = self.prefix + base64.b32encode(digest).decode().lower()[: IFNAMSIZ - len(self.prefix)]
            if len(self._names) > 65536:
                self._names.clear()
            self._names[session_id] = name
        return name

    def is_ours(self, name: str) -> bool:
        return name.startswith(self.prefix) and len(name) == IFNAMSIZ

    # Each lane gets a /31 from the link network: the router's side is even, the lane's side odd.
    def max_slots(self) -> int:
        return self.link_net.num_addresses // 2 - 1

    def link_pair(self, slot: int) -> tuple[str, str]:
        if not 1 <= slot <= self.max_slots():
            raise ValueError(f"slot {slot} out of range")
        base = int(self.link_net.network_address) + 2 * slot
        return str(ipaddress.IPv4Address(base)), str(ipaddress.IPv4Address(base + 1))

    def slot_of(self, router_addr: str) -> int | None:
        addr = ipaddress.IPv4Address(router_addr)
        if addr not in self.link_net:
            return None
        offset = int(addr) - int(self.link_net.network_address)
        return offset // 2 if offset % 2 == 0 and offset else None


def mark_id(session_id: str, taken: set[int]) -> int:
    """A 24-bit lane id from the session id, probing past ids already in use."""
    start = int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=4).digest(), "big") & MARK_ID
    for i in range(MARK_ID):
        candidate = ((start + i) % MARK_ID) or 1
        if candidate not in taken:
            return candidate
    raise RuntimeError("no free lane id")


def data_mark(lane_id: int) -> int:
    return DATA_MARK | lane_id


def transport_mark(lane_id: int) -> int:
    return TRANSPORT_MARK | lane_id
