"""Kernel WireGuard lanes, configured through pyroute2's generic-netlink client.

Chosen automatically where the `wireguard` module is loaded. Kernel WireGuard has no per-process
event listeners, so lanes live directly in the router's namespace: one `wireguard` interface per lane,
named like the lane, routing the engineer's tunnel address to it. CI's kernel has no WireGuard module:
this backend is exercised there against a fake of pyroute2 (tests/test_kernel_backend.py) only.
"""

from __future__ import annotations

import logging

from .. import netns, rtnl
from ..keys import public_of
from ..naming import Naming
from .base import Box, BoxRequest, PeerStats

log = logging.getLogger("wicket.agent.wireguard")


def _pyroute2_wireguard():
    from pyroute2 import WireGuard

    return WireGuard()


class KernelBackend:
    kind = "kernel"

    def __init__(self, naming: Naming, wg=None, links=rtnl, rt=None):
        self.naming = naming
        self.links = links
        self.rt = rt if rt is not None else links.Rtnl()
        self.wg = wg if wg is not None else _pyroute2_wireguard()

    def create(self, req: BoxRequest) -> Box:
        self.links.add_link(self.rt, req.name, "wireguard")
        try:
            _disable_ipv6(req.name)
            self.wg.set(
                req.name,
                private_key=req.private_key,
                listen_port=req.listen_port,
                peer={"public_key": req.peer_public_key, "allowed_ips": [f"{req.engineer_address}/32"]},
            )
            link = self.links.get_link(self.rt, req.name)
            self.links.set_up(self.rt, link.index)
            self.links.add_route(self.rt, f"{req.engineer_address}/32", oif=link.index, replace=True)
        except Exception:
            self.destroy(req.name)
            raise
        log.info("[#] lane %s: kernel wireguard, udp/%d", req.name, req.listen_port)
        return Box.built(req)

    def destroy(self, name: str, wait: bool = False) -> None:
        try:
            link = self.links.get_link(self.rt, name)
            self.links.del_link(self.rt, link.index)
        except OSError:
            pass

    def observe(self) -> dict[str, Box]:
        boxes = {}
        for link in self.links.list_links(self.rt, self.naming.prefix):
            if not self.naming.is_ours(link.name) or link.kind != "wireguard":
                continue
            box = Box(name=link.name, router_link=True, device=True)
            info = self._info(link.name)
            if info:
                box.listen_port = info.get("listen_port")
                if info.get("private_key"):
                    box.node_public_key = public_of(info["private_key"])
                peers = info.get("peers") or []
                if peers:
                    box.peer_public_key = peers[0].get("public_key")
                    ips = peers[0].get("allowed_ips") or []
                    box.engineer_address = ips[0].split("/")[0] if ips else None
            boxes[link.name] = box
        return boxes

    def stats(self, name: str) -> PeerStats | None:
        info = self._info(name)
        if info is None:
            return None
        peers = info.get("peers") or []
        if not peers:
            return PeerStats()
        p = peers[0]
        last = p.get("last_handshake") or None
        return PeerStats(rx_bytes=p.get("rx_bytes", 0), tx_bytes=p.get("tx_bytes", 0), last_handshake=last, endpoint=p.get("endpoint"))

    def reap(self) -> None:
        pass

    def _info(self, name: str) -> dict | None:
        """pyroute2's answer flattened to plain values."""
        try:
            msgs = self.wg.info(name)
        except Exception:
            return None
        out: dict = {"peers": []}
        for msg in msgs:
            out["private_key"] = _decode(msg.get_attr("WGDEVICE_A_PRIVATE_KEY"))
            out["listen_port"] = msg.get_attr("WGDEVICE_A_LISTEN_PORT")
            for peer in msg.get_attr("WGDEVICE_A_PEERS") or []:
                hs = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME") or {}
                sec = hs.get("tv_sec", 0) if isinstance(hs, dict) else 0
                endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
                out["peers"].append(
                    {
                        "public_key": _decode(peer.get_attr("WGPEER_A_PUBLIC_KEY")),
                        "rx_bytes": peer.get_attr("WGPEER_A_RX_BYTES") or 0,
                        "tx_bytes": peer.get_attr("WGPEER_A_TX_BYTES") or 0,
                        "last_handshake": float(sec) if sec else None,
                        "endpoint": _endpoint(endpoint),
                        "allowed_ips": [
                            a.get("addr") if isinstance(a, dict) else str(a) for a in (peer.get_attr("WGPEER_A_ALLOWEDIPS") or [])
                        ],
                    }
                )
        return out


def _endpoint(endpoint) -> str | None:
    """host:port as the UAPI writes it: IPv6 hosts in brackets."""
    if not isinstance(endpoint, dict):
        return None
    addr = endpoint["addr"]
    return f"[{addr}]:{endpoint['port']}" if ":" in addr else f"{addr}:{endpoint['port']}"


def _decode(value) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _disable_ipv6(name: str) -> None:
    netns.disable_ipv6(name)


__all__ = ["KernelBackend"]
