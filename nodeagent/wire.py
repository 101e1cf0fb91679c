"""Every message between the controller and a node agent, in one place.

The controller imports this module; the agent never imports the controller. Each message says who
sends it. Validation here is the first line of defence: a value that could inject into nft, a shell or
a file name never gets past these types.

PROTOCOL_VERSION history (bump it, and say what changed, whenever a message changes shape):
  1 — desired node state with lanes (controller → agent); lane evidence, agent status (agent → controller);
      signed device passports (controller → agent).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

PROTOCOL_VERSION = 1

MAX_LANES = 4096
MAX_PORTS_PER_LANE = 64

# Identifiers that end up in file names, log lines and nft comments: a conservative alphabet.
SessionId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
NodeId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
AssetId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
ServiceName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]  # strict: no "80" strings, no booleans
ListenPort = Annotated[int, Field(ge=1024, le=65535, strict=True)]


def _wg_key(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64") from exc
    if len(raw) != 32:
        raise ValueError("a WireGuard key is 32 bytes")
    return base64.b64encode(raw).decode()


WireGuardKey = Annotated[str, AfterValidator(_wg_key)]


def _unicast_v4(addr: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    if addr.is_multicast or addr.is_unspecified or addr.is_loopback or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{addr} is not a unicast host address")
    return addr


HostV4 = Annotated[ipaddress.IPv4Address, AfterValidator(_unicast_v4)]


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcTime = Annotated[AwareDatetime, AfterValidator(_utc)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Transport(StrEnum):
    tcp = "tcp"
    udp = "udp"


class FlowSpec(_Msg):
    """One allowed destination on the device: a transport and a port, or a short port range."""

    transport: Transport
    port: Port
    port_end: Port | None = None

    @model_validator(mode="after")
    def _range(self) -> FlowSpec:
        if self.port_end is not None and not (self.port <= self.port_end < self.port + MAX_PORTS_PER_LANE):
            raise ValueError(f"port_end must be ≥ port and span at most {MAX_PORTS_PER_LANE} ports")
        return self

    def ports(self) -> range:
        return range(self.port, (self.port_end or self.port) + 1)

    def label(self) -> str:
        tail = f"-{self.port_end}" if self.port_end else ""
        return f"{self.transport.value}/{self.port}{tail}"


class LaneSpec(_Msg):
    """Controller → agent: one approved session's lane. Its end time is absolute; the agent enforces it
    on its own monotonic clock from the moment it first sees it."""

    session_id: SessionId
    revision: int = Field(default=0, ge=0, description="bumped by the controller when this lane changes")
    device_id: AssetId | None = None
    engineer_public_key: WireGuardKey
    engineer_address: HostV4 = Field(description="the engineer's tunnel address")
    device_address: HostV4
    service: ServiceName = Field(description="protocol label for records, e.g. iec104")
    flows: list[FlowSpec] = Field(min_length=1, max_length=16)
    listen_port: ListenPort
    engineer_sources: list[ipaddress.IPv4Network] = Field(
        default_factory=list, max_length=32, description="allowed source networks of the engineer's UDP; empty: any"
    )
    end_time: UtcTime

    @model_validator(mode="after")
    def _check(self) -> LaneSpec:
        if sum(len(f.ports()) for f in self.flows) > MAX_PORTS_PER_LANE:
            raise ValueError(f"a lane allows at most {MAX_PORTS_PER_LANE} ports in all")
        if self.engineer_address == self.device_address:
            raise ValueError("engineer_address and device_address must differ")
        seen = set()
        for f in self.flows:
            for p in f.ports():
                if (f.transport, p) in seen:
                    raise ValueError(f"flow {f.transport.value}/{p} listed twice")
                seen.add((f.transport, p))
        return self


class NodeSettings(_Msg):
    tunnel_networks: list[ipaddress.IPv4Network] = Field(
        default_factory=list, max_length=64, description="engineer tunnel addresses come from these; the agent keeps them off every other path"
    )
    endpoint_host: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9.:-]{1,253}$", description="host engineers' clients dial (for configs)"
    )


class DesiredNodeState(_Msg):
    """Controller → agent: the complete desired state of one node (level-triggered). A higher generation
    replaces a lower one; an older generation is never applied."""

    kind: Literal["desired_node_state"] = "desired_node_state"
    protocol_version: int = PROTOCOL_VERSION
    node_id: NodeId
    generation: int = Field(ge=0)
    issued_at: UtcTime | None = None
    settings: NodeSettings = NodeSettings()
    lanes: list[LaneSpec] = Field(default_factory=list, max_length=MAX_LANES)

    @model_validator(mode="after")
    def _consistent(self) -> DesiredNodeState:
        if self.protocol_version > PROTOCOL_VERSION:
            raise ValueError(f"protocol_version {self.protocol_version} is newer than this agent's {PROTOCOL_VERSION}")
        _unique(self.lanes, lambda lane: lane.session_id, "session_id")
        _unique(self.lanes, lambda lane: lane.listen_port, "listen_port")
        _unique(self.lanes, lambda lane: lane.engineer_address, "engineer_address")
        nets = self.settings.tunnel_networks
        for lane in self.lanes:
            if nets and not any(lane.engineer_address in n for n in nets):
                raise ValueError(f"lane {lane.session_id}: engineer_address {lane.engineer_address} is outside tunnel_networks")
            if any(lane.device_address in n for n in nets):
                raise ValueError(f"lane {lane.session_id}: device_address {lane.device_address} is inside tunnel_networks")
        return self


def _unique(items, key, what: str) -> None:
    seen = set()
    for item in items:
        k = key(item)
        if k in seen:
            raise ValueError(f"two lanes share {what} {k}")
        seen.add(k)


# ---- agent → controller ------------------------------------------------------------------------


class EndReason(StrEnum):
    expired = "expired"  # the end time passed
    closed = "closed"  # closed early on the node (`wicket-agent close`)
    removed = "removed"  # the controller's desired state no longer holds it (revoke, close, policy)
    replaced = "replaced"  # its spec changed in a way that needs a new lane (new key or port)
    failed = "failed"  # it could not be opened or kept up


class FlowRecord(_Msg):
    """One connection through a lane (or, for `transport`, the engineer's outer UDP flow), from conntrack.
    `out` is engineer → device, `in` is device → engineer; bytes are IP bytes."""

    proto: str
    src: str
    sport: int | None = None
    dst: str
    dport: int | None = None
    packets_out: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    bytes_in: int = 0
    start: UtcTime | None = None
    stop: UtcTime | None = None
    observed: Literal["ended", "cut"] = Field(description="ended during the lane, or cut at teardown")


class BlockedAttempt(_Msg):
    destination: str
    proto: str
    port: int | None
    packets: int


class LaneTotals(_Msg):
    """Kernel-side counters: exact even if the agent restarted during the lane."""

    packets_out: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    bytes_in: int = 0
    packets_refused: int = 0
    bytes_refused: int = 0


class WireGuardStats(_Msg):
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: UtcTime | None = None
    handshakes_observed: int = 0
    endpoint: str | None = None


class LaneEvidence(_Msg):
    """Agent → controller: what one lane did, written once when it ends."""

    kind: Literal["lane_evidence"] = "lane_evidence"
    protocol_version: int = PROTOCOL_VERSION
    node_id: NodeId
    session_id: SessionId | None = Field(description="None only for an orphan lane nobody recorded")
    revision: int | None
    device_id: AssetId | None = None
    lane: str
    backend: Literal["userspace", "kernel"]
    engineer_public_key: str | None
    node_public_key: str | None
    engineer_address: str | None
    device_address: str | None
    service: str | None
    allowed: list[str]
    listen_port: int | None
    planned_end: UtcTime | None
    opened_at: UtcTime | None
    closed_at: UtcTime
    end_reason: EndReason
    lateness_ms: int | None = Field(description="teardown time minus planned end, for expiries")
    totals: LaneTotals
    flows: list[FlowRecord]
    transport: list[FlowRecord]
    blocked: list[BlockedAttempt]
    blocked_truncated: bool = False
    wireguard: WireGuardStats | None
    notes: list[str] = Field(default_factory=list)


class ObservedLane(_Msg):
    session_id: SessionId
    lane: str
    listen_port: int
    node_public_key: str | None
    engineer_address: str
    device_address: str
    allowed: list[str]
    end_time: UtcTime
    seconds_left: float
    wireguard: WireGuardStats | None = None


class ReconcileReport(_Msg):
    generation: int
    changes: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)


class AgentStatus(_Msg):
    """Agent → controller (and the local CLI): what the node is enforcing now."""

    kind: Literal["agent_status"] = "agent_status"
    protocol_version: int = PROTOCOL_VERSION
    node_id: str
    agent_version: str
    backend: Literal["userspace", "kernel"]
    applied_generation: int | None
    lanes: list[ObservedLane]
    pending_evidence: int
    clock_synchronized: bool | None
    last_reconcile: ReconcileReport | None = None


# ---- device passports (controller → agent) -------------------------------------------------------

PASSPORT_SIGNATURE_CONTEXT = b"wicket device passport v1\n"


class PassportDestination(_Msg):
    name: str = Field(max_length=48)
    addresses: list[str] = Field(default_factory=list, max_length=64)
    fqdn: str | None = Field(default=None, max_length=253)


class PassportFlow(_Msg):
    """One baseline flow of the device's own traffic: this protocol to these destinations."""

    protocol: ServiceName
    transport: Literal["tcp", "udp", "tcp+udp"]
    ports: list[Port] = Field(min_length=1, max_length=8)
    to: list[PassportDestination] = Field(min_length=1, max_length=16)


class SimBinding(_Msg):
    iccid: str | None = None
    eid: str | None = None
    imsis: list[str] = Field(default_factory=list, max_length=8)


class DevicePassport(_Msg):
    """A device's identity and the baseline flows bound to it, as the controller vouches for them.
    Posture that changes by the minute (last seen) is not part of it."""

    kind: Literal["device_passport"] = "device_passport"
    protocol_version: int = PROTOCOL_VERSION
    asset_id: AssetId
    device_type: str = Field(max_length=48)
    site: str = Field(max_length=64)
    addresses: list[str] = Field(max_length=8)
    mac: str | None = None
    sim: SimBinding = SimBinding()
    firmware: str | None = None
    lifecycle: Literal["provisioned", "active", "quarantined", "decommissioned"]
    revision: int = Field(ge=1, description="bumped by the controller whenever a field above changes")
    baseline: list[PassportFlow] = Field(default_factory=list, max_length=32)
    policy_version: str

    def canonical_bytes(self) -> bytes:
        """The bytes that are signed: sorted-key compact JSON, after a fixed context line."""
        body = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return PASSPORT_SIGNATURE_CONTEXT + body.encode()


class SignedPassport(_Msg):
    kind: Literal["signed_passport"] = "signed_passport"
    passport: DevicePassport
    key_id: str = Field(description="first 16 hex digits of the SHA-256 of the controller's public signing key")
    signature: str = Field(description="Ed25519 over passport.canonical_bytes(), base64")

    def verify(self, public_key_b64: str) -> DevicePassport:
        """The passport, if this controller key signed it; ValueError otherwise."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        raw = base64.b64decode(public_key_b64)
        if key_id(raw) != self.key_id:
            raise ValueError("the passport was signed by another controller key")
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(base64.b64decode(self.signature), self.passport.canonical_bytes())
        except (InvalidSignature, binascii.Error, ValueError):
            raise ValueError("the passport's signature does not verify") from None
        return self.passport


def key_id(public_key_raw: bytes) -> str:
    return hashlib.sha256(public_key_raw).hexdigest()[:16]
