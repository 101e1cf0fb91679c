"""The engineer's side of a lane: a one-peer wg-quick configuration.

AllowedIPs is the one device, nothing else; no DNS; a keepalive so NAT on the engineer's side does not
drop the lane. Written with `wgconfig` so the file is exactly what wg-quick and the WireGuard apps read.
"""

from __future__ import annotations

import os
import tempfile

import wgconfig

from .wire import LaneSpec

KEEPALIVE_S = 25


def render(lane: LaneSpec, *, node_public_key: str, endpoint_host: str, engineer_private_key: str | None = None,
           mtu: int | None = None) -> str:
    """wg-quick text. Without `engineer_private_key` the PrivateKey line is left for the engineer to fill
    in (bring-your-own-key: the private key never leaves the laptop)."""
    if ":" in endpoint_host and not endpoint_host.startswith("["):
        endpoint_host = f"[{endpoint_host}]"
    fd, path = tempfile.mkstemp(suffix=".conf")
    os.close(fd)
    try:
        wc = wgconfig.WGConfig(path)
        wc.initialize_file(f"# wicket lane for session {lane.session_id}: {lane.service} to {lane.device_id or lane.device_address}")
        wc.add_attr(None, "PrivateKey", engineer_private_key or "<your private key>")
        wc.add_attr(None, "Address", f"{lane.engineer_address}/32")
        if mtu:
            wc.add_attr(None, "MTU", mtu)
        wc.add_peer(node_public_key, f"# node of {lane.device_id or lane.device_address}, closes {lane.end_time.isoformat()}")
        wc.add_attr(node_public_key, "AllowedIPs", f"{lane.device_address}/32")
        wc.add_attr(node_public_key, "Endpoint", f"{endpoint_host}:{lane.listen_port}")
        wc.add_attr(node_public_key, "PersistentKeepalive", KEEPALIVE_S)
        wc.write_file()
        with open(path) as f:
            return f.read()
    finally:
        os.unlink(path)
