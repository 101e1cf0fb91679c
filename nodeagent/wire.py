"""Every message between the controller and a node agent, in one place.

The controller imports this module; the agent never imports the controller. Each message says who
sends it. Validation here is the first line of defence: a value that could inject into nft, a shell or
a file name never gets past these types.

PROTOCOL_VERSION history (bump it, and say what changed, whenever a message changes shape):
  1 — desired node state with lanes (controller → agent); lane evidence, agent status (agent → controller);
      signed device passports (controller → agent).
  2 — the agent link: enrolment frames, hello/welcome, applied/refused acknowledgements, signed evidence,
      certificate renewal, pings (see "the agent link" below); EndReason `control_lost` (strict mode);
      AgentStatus gains `clock_detail`, `link` and `strict_after_s`.
  3 — payload recording: LaneSpec gains `recording` and `recording_cap_bytes`; LaneEvidence gains
      `recording` (the pcap's SHA-256, size, counts); frames `recording_chunk` (agent → controller) and
      `recording_receipt`. A v2 agent is sent lanes without the recording fields (`encode_frame`).
  4 — device baselines and grants: DesiredNodeState gains `baseline` (destinations, profiles, devices)
      and `grants`; LaneEvidence gains `scope` and `destinations` (what FQDNs resolved to); frame
      `device_report` (agent → controller: breaches of baselines, DNS health). A v3 agent is sent
      neither baseline nor grants (`encode_frame`): the controller refuses grants at its site.
A controller of version N serves agents from `OLDEST_SERVED` up to N: it stamps what it sends
with the version the agent said in its hello, so an older agent's own version check accepts it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
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

PROTOCOL_VERSION = 4
OLDEST_SERVED = 2  # v2 and v3 agents are still served (each without what came later)

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
    recording: Literal["metadata", "payload"] = Field(
        default="metadata", description="payload: the agent also captures the lane's packets (pcap) (v3)")
    recording_cap_bytes: int | None = Field(default=None, ge=65536, le=4 << 30, description="the pcap stops growing here (v3)")

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


DestName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
ProfileName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
MAX_DEVICES = 20000


def _fqdn(value: str) -> str:
    v = value.rstrip(".").lower()
    labels = v.split(".")
    if len(v) > 253 or len(labels) < 2 or not all(re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", x) for x in labels):
        raise ValueError(f"{value!r} is not a fully qualified domain name")
    return v


Fqdn = Annotated[str, AfterValidator(_fqdn)]


class Destination(_Msg):
    """A named endpoint of devices' own traffic (v4): fixed IPv4 addresses, or an FQDN the agent resolves."""

    name: DestName
    addresses: list[HostV4] = Field(default_factory=list, max_length=64)
    fqdn: Fqdn | None = None

    @model_validator(mode="after")
    def _one(self) -> Destination:
        if bool(self.addresses) == bool(self.fqdn):
            raise ValueError(f"destination {self.name}: give either addresses or fqdn")
        return self


class BaselineFlow(_Msg):
    """Connections the device may open (v4): this transport and port(s), to these destinations. Replies
    are allowed; connections others open to the device are not this flow's business."""

    protocol: ServiceName
    transport: Literal["tcp", "udp", "tcp+udp"]
    ports: list[Port] = Field(min_length=1, max_length=8)
    to: list[DestName] = Field(min_length=1, max_length=16)

    def keys(self) -> list[tuple[str, int]]:
        transports = ("tcp", "udp") if self.transport == "tcp+udp" else (self.transport,)
        return [(t, p) for t in transports for p in self.ports]


class DeviceProfile(_Msg):
    """A device type's baseline (v4): every device of the profile may open these flows and nothing else."""

    name: ProfileName
    flows: list[BaselineFlow] = Field(default_factory=list, max_length=32)


class DeviceBaseline(_Msg):
    """One device with an active passport (v4): its LAN addresses and its type's profile."""

    asset_id: AssetId
    addresses: list[HostV4] = Field(min_length=1, max_length=8)
    profile: ProfileName


class BaselineState(_Msg):
    """Controller → agent (v4): the site's device baselines. `unpassported` says what happens to the own
    traffic of other hosts in `device_networks`: `router` leaves it to the router's firewall, `deny`
    drops it."""

    unpassported: Literal["router", "deny"] = "router"
    device_networks: list[ipaddress.IPv4Network] = Field(default_factory=list, max_length=64)
    destinations: list[Destination] = Field(default_factory=list, max_length=256)
    profiles: list[DeviceProfile] = Field(default_factory=list, max_length=256)
    devices: list[DeviceBaseline] = Field(default_factory=list, max_length=MAX_DEVICES)

    @model_validator(mode="after")
    def _consistent(self) -> BaselineState:
        dests = {d.name for d in self.destinations}
        if len(dests) != len(self.destinations):
            raise ValueError("two destinations share a name")
        profiles = {p.name for p in self.profiles}
        if len(profiles) != len(self.profiles):
            raise ValueError("two profiles share a name")
        for p in self.profiles:
            for f in p.flows:
                if missing := sorted(set(f.to) - dests):
                    raise ValueError(f"profile {p.name}: unknown destination(s) {', '.join(missing)}")
        owner: dict = {}
        for d in self.devices:
            if d.profile not in profiles:
                raise ValueError(f"device {d.asset_id}: unknown profile {d.profile}")
            for a in d.addresses:
                if owner.setdefault(a, d.asset_id) != d.asset_id:
                    raise ValueError(f"devices {owner[a]} and {d.asset_id} share address {a}")
        if self.unpassported == "deny" and not self.device_networks:
            raise ValueError("unpassported = deny needs device_networks")
        return self

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)


class GrantSpec(_Msg):
    """Controller → agent (v4): a temporary flow change for one device's own traffic, with an end time
    the agent enforces on its own clock, like a lane's."""

    session_id: SessionId
    revision: int = Field(default=0, ge=0)
    device_id: AssetId
    device_address: HostV4
    flows: list[BaselineFlow] = Field(min_length=1, max_length=16)
    end_time: UtcTime


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
    baseline: BaselineState | None = Field(default=None, description="v4: None leaves devices' own traffic alone")
    grants: list[GrantSpec] = Field(default_factory=list, max_length=MAX_LANES, description="v4")

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
        seen = {lane.session_id for lane in self.lanes}
        dests = {d.name for d in self.baseline.destinations} if self.baseline else set()
        for g in self.grants:
            if g.session_id in seen:
                raise ValueError(f"grant {g.session_id}: the id is used twice")
            seen.add(g.session_id)
            if missing := sorted({n for f in g.flows for n in f.to} - dests):
                raise ValueError(f"grant {g.session_id}: unknown destination(s) {', '.join(missing)}")
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
    control_lost = "control_lost"  # strict mode: the controller was out of reach for too long (v2)


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


class RecordingInfo(_Msg):
    """A lane's payload recording as the agent closed it (v3). The file follows over the link."""

    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    size: int = 0
    packets: int = 0
    bytes: int = 0
    dropped_by_cap: int = Field(default=0, description="packets not written because the file reached its cap")
    kernel_drops: int = 0
    truncated: bool = False
    linktype: int | None = None
    started_at: UtcTime | None = None
    stopped_at: UtcTime | None = None
    error: str | None = Field(default=None, max_length=500, description="why there is no (complete) recording")


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
    recording: RecordingInfo | None = None  # v3; left out of the signed bytes when None (so v2 signatures hold)
    scope: Literal["lane", "grant"] | None = None  # v4: None (left out) means a lane
    destinations: dict[str, list[str]] | None = None  # v4, grants: what each destination resolved to


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


class NameStatus(_Msg):
    """What one destination FQDN resolves to on the agent, and how fresh that is."""

    fqdn: str
    addresses: list[str] = Field(default_factory=list)
    state: Literal["pending", "ok", "stale", "failed"] = Field(
        description="pending: never resolved; stale: the resolver fails, the last good set is kept; failed: "
                    "no good set (never, or kept past its limit), so the destination is empty")
    ttl_s: int | None = None
    resolved_at: UtcTime | None = None
    stale_until: UtcTime | None = None
    error: str | None = Field(default=None, max_length=500)


class BaselineSummary(_Msg):
    """What the agent enforces for devices' own traffic (v4)."""

    devices: int = Field(ge=0, description="device addresses with a baseline")
    profiles: int = Field(ge=0)
    unpassported: Literal["router", "deny"] = "router"
    grants: int = Field(default=0, ge=0)
    names: list[NameStatus] = Field(default_factory=list, max_length=256)


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
    clock_detail: str | None = None  # v2: why the clock is (not) considered synchronised
    link: str | None = None  # v2: "connected to …", "disconnected since …", or None when not enrolled
    strict_after_s: float | None = None  # v2: strict mode's limit, None when lanes live to their end time
    baseline: BaselineSummary | None = None  # v4: None when the desired state carries no baseline


class Breach(_Msg):
    """Connections a device tried outside its baseline and grants, aggregated over a report's window."""

    asset_id: AssetId | None = Field(description="None: a host without a passport (unpassported = deny)")
    source: str
    destination: str
    proto: str
    port: int | None
    packets: int = Field(ge=0)


MAX_BREACHES = 1000


class DeviceReport(_Msg):
    """Agent → controller (v4): breaches of device baselines over one window, and DNS health. Spooled and
    signed like evidence (`SignedReport`), so a breach is reported once the controller is back."""

    kind: Literal["device_report"] = "device_report"
    protocol_version: int = PROTOCOL_VERSION
    node_id: NodeId
    window_start: UtcTime
    window_end: UtcTime
    devices: int = Field(ge=0, description="devices whose baseline the agent enforced")
    breaches: list[Breach] = Field(default_factory=list, max_length=MAX_BREACHES)
    breaches_left_out: int = Field(default=0, ge=0, description="further (device, destination) rows beyond the list")
    names: list[NameStatus] = Field(default_factory=list, max_length=256)
    name_changes: list[str] = Field(default_factory=list, max_length=256, description="FQDNs whose state or set changed")


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


# ---- the agent link (v2) -------------------------------------------------------------------------
#
# One TLS connection, dialled by the agent, carrying length-prefixed JSON frames (4-byte big-endian
# length, then one JSON object with a "kind"). Enrolment uses the same port before the agent has a
# certificate: `enroll_begin` → `enroll_ca` (the agent checks the CA against the pin in its join token
# and the server's certificate against that CA) → `enroll` (the token's secret, the CSR) → `enrolled`.
# A certified agent opens with `hello`; the controller answers `welcome`, then pushes `desired_node_state`
# whenever the node's generation moves; the agent answers each with `applied` or `refused`, sends
# `agent_status` and `evidence` on its own, and renews its certificate with `renew` before it runs out.

MAX_FRAME = 16 << 20
RECORDING_CHUNK = 1 << 20  # raw bytes per recording_chunk frame
TOKEN_PREFIX = "wkj1"


class EnrollBegin(_Msg):
    kind: Literal["enroll_begin"] = "enroll_begin"
    protocol_version: int = PROTOCOL_VERSION


class EnrollCA(_Msg):
    """Controller → agent: the CA the controller's link certificate chains to (PEM)."""

    kind: Literal["enroll_ca"] = "enroll_ca"
    ca_pem: str = Field(max_length=16384)


class EnrollRequest(_Msg):
    kind: Literal["enroll"] = "enroll"
    protocol_version: int = PROTOCOL_VERSION
    token: str = Field(max_length=256)
    node_id: NodeId
    csr_pem: str = Field(max_length=16384)
    evidence_public_key: str = Field(description="Ed25519, raw 32 bytes in base64: signs this agent's evidence")
    agent_version: str = Field(max_length=32)


class Enrolled(_Msg):
    kind: Literal["enrolled"] = "enrolled"
    node_id: NodeId
    site: str
    certificate_pem: str
    not_after: UtcTime
    controller_signing_key: str = Field(description="Ed25519 public key (base64) that signs passports")


class Hello(_Msg):
    """Agent → controller, first frame on a certified connection."""

    kind: Literal["hello"] = "hello"
    protocol_version: int
    node_id: NodeId
    agent_version: str = Field(max_length=32)
    applied_generation: int | None = None
    boot_id: str | None = Field(default=None, max_length=64)


class Welcome(_Msg):
    kind: Literal["welcome"] = "welcome"
    protocol_version: int = Field(description="the version both sides speak on this connection")
    controller_version: str
    heartbeat_s: float = Field(gt=0, le=300)
    server_time: UtcTime


class Applied(_Msg):
    """Agent → controller: the generation is applied (also when some lanes failed: `report.errors`)."""

    kind: Literal["applied"] = "applied"
    generation: int = Field(ge=0)
    report: ReconcileReport
    status: AgentStatus


class Refused(_Msg):
    """Agent → controller: the desired state was not applied at all (older generation, bad content)."""

    kind: Literal["refused"] = "refused"
    generation: int
    error: str = Field(max_length=2000)


class SignedEvidence(_Msg):
    """Agent → controller: one lane's evidence, signed with the agent's enrolment (evidence) key."""

    kind: Literal["evidence"] = "evidence"
    ident: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    evidence: LaneEvidence
    signature: str = Field(description="Ed25519 over evidence_bytes(ident, evidence), base64")


REPORT_SIGNATURE_CONTEXT = b"wicket device report v1\n"


class SignedReport(_Msg):
    """Agent → controller (v4): one device report, signed with the agent's evidence key."""

    kind: Literal["report"] = "report"
    ident: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    report: DeviceReport
    signature: str = Field(description="Ed25519 over report_bytes(ident, report), base64")


def report_bytes(ident: str, report: DeviceReport) -> bytes:
    body = json.dumps(report.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return REPORT_SIGNATURE_CONTEXT + ident.encode() + b"\n" + body.encode()


class ReportReceipt(_Msg):
    """Controller → agent (v4): the report is recorded; the agent may delete its copy."""

    kind: Literal["report_receipt"] = "report_receipt"
    ident: str


class EvidenceReceipt(_Msg):
    """Controller → agent: the evidence is stored; the agent may delete its copy."""

    kind: Literal["evidence_receipt"] = "evidence_receipt"
    ident: str


class RecordingChunk(_Msg):
    """Agent → controller (v3): part of a lane's pcap, after its evidence was receipted. Chunks come in
    order from offset 0; the last carries the whole file's SHA-256, which must match the signed evidence."""

    kind: Literal["recording_chunk"] = "recording_chunk"
    ident: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", description="the evidence record's ident")
    offset: int = Field(ge=0)
    data: str = Field(max_length=(RECORDING_CHUNK // 3 + 1) * 4, description="base64")
    last: bool = False
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class RecordingReceipt(_Msg):
    """Controller → agent: the recording is stored (the agent deletes its copy), or why not."""

    kind: Literal["recording_receipt"] = "recording_receipt"
    ident: str
    stored: bool
    error: str | None = Field(default=None, max_length=500)


class Renew(_Msg):
    kind: Literal["renew"] = "renew"
    csr_pem: str = Field(max_length=16384)


class Certificate(_Msg):
    kind: Literal["certificate"] = "certificate"
    certificate_pem: str
    not_after: UtcTime


class Ping(_Msg):
    kind: Literal["ping"] = "ping"
    sent: float


class Pong(_Msg):
    kind: Literal["pong"] = "pong"
    sent: float


class Goodbye(_Msg):
    """Either side, before it closes the connection on purpose."""

    kind: Literal["goodbye"] = "goodbye"
    reason: str = Field(max_length=2000)
    retry: bool = True


LinkFrame = Annotated[
    EnrollBegin | EnrollCA | EnrollRequest | Enrolled | Hello | Welcome | DesiredNodeState | Applied | Refused
    | AgentStatus | SignedEvidence | EvidenceReceipt | RecordingChunk | RecordingReceipt | SignedReport | ReportReceipt
    | Renew | Certificate | Ping | Pong | Goodbye,
    Field(discriminator="kind"),
]

EVIDENCE_SIGNATURE_CONTEXT = b"wicket lane evidence v1\n"


def evidence_payload(evidence: LaneEvidence) -> dict:
    """The evidence as signed and stored: fields added after v2 are left out while they are empty, so the
    bytes a v2 agent signed are the bytes a v3 controller checks."""
    data = evidence.model_dump(mode="json")
    for key in ("recording", "scope", "destinations"):
        if data.get(key) is None:
            data.pop(key, None)
    return data


def evidence_bytes(ident: str, evidence: LaneEvidence) -> bytes:
    body = json.dumps(evidence_payload(evidence), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return EVIDENCE_SIGNATURE_CONTEXT + ident.encode() + b"\n" + body.encode()


def encode_frame(msg: BaseModel, version: int = PROTOCOL_VERSION) -> bytes:
    """One frame. Messages that carry a protocol version are stamped with the peer's `version`."""
    data = msg.model_dump(mode="json")
    if "protocol_version" in data:
        data["protocol_version"] = version
    if version < 3 and data.get("kind") == "desired_node_state":
        for lane in data["lanes"]:  # a v2 agent knows no recording: it records metadata only
            lane.pop("recording", None)
            lane.pop("recording_cap_bytes", None)
    if version < 4 and data.get("kind") == "desired_node_state":
        data.pop("baseline", None)  # a v3 agent enforces no baselines; the controller opens no grants there
        data.pop("grants", None)
    body = json.dumps(data, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"a {data.get('kind')} frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return len(body).to_bytes(4, "big") + body


class FrameError(ValueError):
    pass


def decode_frame(body: bytes):
    """A frame's body (without its length) → its message. FrameError names what is wrong."""
    from pydantic import TypeAdapter, ValidationError

    global _FRAMES
    if _FRAMES is None:
        _FRAMES = TypeAdapter(LinkFrame)
    try:
        return _FRAMES.validate_json(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top)"
        raise FrameError(f"invalid frame: {where}: {err['msg']}") from None


_FRAMES = None


def frame_length(header: bytes) -> int:
    n = int.from_bytes(header, "big")
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    return n


def parse_token(token: str) -> tuple[str, str, str]:
    """A join token "wkj1.<id>.<secret>.<ca pin>" → (id, secret, pin: SHA-256 hex of the CA's DER)."""
    parts = token.strip().split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
        raise ValueError("not a wicket join token (expected wkj1.<id>.<secret>.<pin>)")
    _, ident, secret, pin = parts
    if not (re.fullmatch(r"[a-z0-9]{12}", ident) and re.fullmatch(r"[A-Za-z0-9_-]{20,64}", secret)
            and re.fullmatch(r"[0-9a-fA-F]{64}", pin)):
        raise ValueError("malformed join token")
    return ident, secret, pin.lower()
