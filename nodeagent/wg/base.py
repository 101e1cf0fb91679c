"""What a WireGuard backend does for a lane, whichever implementation runs it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class BoxRequest:
    name: str
    private_key: str  # base64; made on this node, never sent anywhere
    listen_port: int
    peer_public_key: str  # base64
    engineer_address: str
    slot: int
    engineer_sources: tuple[str, ...] = ()
    node_public_key: str | None = None  # of private_key, when the caller already has it


@dataclass
class Box:
    """A lane's WireGuard side as observed: the interface the router sees, and who serves it."""

    name: str
    listen_port: int | None = None
    node_public_key: str | None = None
    peer_public_key: str | None = None
    engineer_address: str | None = None
    slot: int | None = None
    transport_address: str | None = None  # userspace: where the lane's UDP is forwarded
    pid: int | None = None
    router_link: bool = False  # the router-side interface exists
    device: bool = False  # a WireGuard device answers for it

    @classmethod
    def built(cls, req: BoxRequest, **extra) -> Box:
        """The box a backend has just built for `req`."""
        from ..keys import public_of

        return cls(
            name=req.name,
            listen_port=req.listen_port,
            node_public_key=req.node_public_key or public_of(req.private_key),
            peer_public_key=req.peer_public_key,
            engineer_address=req.engineer_address,
            router_link=True,
            device=True,
            **extra,
        )


@dataclass
class PeerStats:
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float | None = None  # wall-clock seconds
    endpoint: str | None = None
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    kind: str

    def create(self, req: BoxRequest) -> Box: ...

    def destroy(self, name: str, wait: bool = False) -> None: ...

    def observe(self) -> dict[str, Box]: ...

    def stats(self, name: str) -> PeerStats | None: ...

    def reap(self) -> None: ...


def kernel_module_present() -> bool:
    return os.path.isdir("/sys/module/wireguard")
