"""The cross-platform WireGuard UAPI (the text protocol on /var/run/wireguard/<name>.sock).

userspace wireguard-go serves it; `wg` speaks it too. Keys travel as hex on this socket.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from dataclasses import dataclass, field

SOCKET_DIR = "/var/run/wireguard"


class UapiError(OSError):
    pass


@dataclass
class PeerInfo:
    public_key_hex: str
    endpoint: str | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake_sec: int = 0
    last_handshake_nsec: int = 0
    allowed_ips: list[str] = field(default_factory=list)


@dataclass
class DeviceInfo:
    private_key_hex: str | None
    listen_port: int | None
    peers: list[PeerInfo]


def socket_path(name: str, directory: str = SOCKET_DIR) -> str:
    return os.path.join(directory, f"{name}.sock")


def connect(name: str, timeout: float = 0.0, directory: str = SOCKET_DIR) -> socket.socket:
    """Connect to a device's UAPI socket, retrying for up to `timeout` seconds while it comes up."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(5.0)
        try:
            s.connect(socket_path(name, directory))
            return s
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            s.close()
            if time.monotonic() >= deadline:
                raise UapiError(exc.errno or errno.ENOENT, f"{name}: UAPI socket not available") from exc
            time.sleep(0.0003)


def peer_pid(name: str, directory: str = SOCKET_DIR) -> int:
    """PID of the process serving a device's UAPI socket (SO_PEERCRED)."""
    with connect(name, directory=directory) as s:
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def set_device(name: str, lines: list[str], timeout: float = 0.0, directory: str = SOCKET_DIR) -> None:
    with connect(name, timeout, directory) as s:
        reply = _exchange(s, "set=1\n" + "".join(line + "\n" for line in lines) + "\n")
    code = _errno(reply)
    if code:
        raise UapiError(code, f"{name}: UAPI set refused (errno={code})")


def get_device(name: str, directory: str = SOCKET_DIR) -> DeviceInfo:
    with connect(name, directory=directory) as s:
        reply = _exchange(s, "get=1\n\n")
    code = _errno(reply)
    if code:
        raise UapiError(code, f"{name}: UAPI get refused (errno={code})")
    return parse_get(reply)


def parse_get(text: str) -> DeviceInfo:
    private, port, peers = None, None, []
    peer: PeerInfo | None = None
    for line in text.splitlines():
        if "=" not in line:
            continue
        key, value = line.split("=", 1)
        if key == "public_key":
            peer = PeerInfo(public_key_hex=value)
            peers.append(peer)
        elif peer is None:
            if key == "private_key":
                private = value
            elif key == "listen_port":
                port = int(value)
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
        elif key == "last_handshake_time_sec":
            peer.last_handshake_sec = int(value)
        elif key == "last_handshake_time_nsec":
            peer.last_handshake_nsec = int(value)
        elif key == "allowed_ip":
            peer.allowed_ips.append(value)
    return DeviceInfo(private_key_hex=private, listen_port=port, peers=peers)


def _exchange(s: socket.socket, request: str) -> str:
    s.sendall(request.encode())
    buf = b""
    while not buf.endswith(b"\n\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


def _errno(reply: str) -> int:
    """The reply's errno; a reply without one means the device went away mid-answer (EPROTO, as wg(8))."""
    for line in reply.splitlines():
        if line.startswith("errno="):
            return int(line[6:])
    return errno.EPROTO
