"""Stored rows (SQLAlchemy 2). Never sent over the wire as they are: `controller.schemas` has the
input and output shapes. Times are UTC, stored without time zone (SQLite has none) and read as UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UtcDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out, on every database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    pass


class Role(StrEnum):
    engineer = "engineer"
    contractor = "contractor"
    approver = "approver"
    site_admin = "site_admin"
    soc = "soc"
    admin = "admin"
    break_glass = "break_glass"  # may open break-glass sessions at the grant's site


class AccountKind(StrEnum):
    internal = "internal"
    contractor = "contractor"


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128))
    email: Mapped[str | None] = mapped_column(String(254))
    kind: Mapped[str] = mapped_column(String(16), default=AccountKind.internal.value)
    sponsor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    valid_from: Mapped[datetime | None] = mapped_column(UtcDateTime)
    valid_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    password_hash: Mapped[str | None] = mapped_column(String(256))
    totp_secret: Mapped[str | None] = mapped_column(String(256))  # encrypted with the controller's key
    totp_confirmed: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)

    grants: Mapped[list[RoleGrant]] = relationship(
        back_populates="user", cascade="all, delete-orphan", lazy="selectin", foreign_keys="RoleGrant.user_id"
    )
    sponsor: Mapped[User | None] = relationship(remote_side="User.id", lazy="select")  # no join: rows are locked FOR UPDATE


class RoleGrant(Base):
    """A role, for all sites (site None) or for one site."""

    __tablename__ = "role_grants"
    __table_args__ = (UniqueConstraint("user_id", "role", "site", name="uq_role_grant"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    site: Mapped[str | None] = mapped_column(String(64))
    granted_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    granted_at: Mapped[datetime] = mapped_column(UtcDateTime)

    user: Mapped[User] = relationship(back_populates="grants", foreign_keys=[user_id])


class RecoveryCode(Base):
    __tablename__ = "recovery_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64))
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class UsedTotp(Base):
    """A TOTP time step that has been accepted for a user: the primary key makes a second use fail,
    in the database, also when two requests race."""

    __tablename__ = "used_totp"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    used_at: Mapped[datetime] = mapped_column(UtcDateTime)


class ApiToken(Base):
    """A login: the token itself is never stored, only its SHA-256."""

    __tablename__ = "api_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # api | cookie
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime] = mapped_column(UtcDateTime)
    idle_expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    source: Mapped[str | None] = mapped_column(String(64))


class Throttle(Base):
    """Failed-login bookkeeping for one account ("user:NAME") or source ("ip:ADDR")."""

    __tablename__ = "throttle"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    first_failure_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_failure_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    blocked_until: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Event(Base):
    """One record of the audit chain, in order (`controller.audit.chain`). `line` is the exact text that
    was hashed; the other columns repeat its fields for queries. Rows are only ever inserted."""

    __tablename__ = "events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    category: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(48))
    result: Mapped[str] = mapped_column(String(16))  # success | failure
    actor_id: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str | None] = mapped_column(String(64))
    subject: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[dict] = mapped_column(JSON, default=dict)
    clock: Mapped[str] = mapped_column(String(8), default="unknown")  # synced | unsynced | unknown
    session_ref: Mapped[str | None] = mapped_column(String(64), index=True)
    device_ref: Mapped[str | None] = mapped_column(String(64), index=True)
    line: Mapped[str] = mapped_column(Text)
    leaf: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's head (one row, id 1): its last sequence number and hash. Sealing a transaction's
    records takes this row's lock, so appends are serialised across replicas."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    """A signed statement of the chain's size and head hash. `statement` is the exact signed text."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tree_size: Mapped[int] = mapped_column(Integer, unique=True)
    head_hash: Mapped[str] = mapped_column(String(64))
    statement: Mapped[str] = mapped_column(Text)
    signature: Mapped[str] = mapped_column(String(128))
    key_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class AuditKey(Base):
    """A public key the controller has signed checkpoints and bundles with (raw Ed25519, base64)."""

    __tablename__ = "audit_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class AuditSinkCursor(Base):
    """How far one SIEM sink has been delivered (at least once), and who ships it now (a lease)."""

    __tablename__ = "audit_sink_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    delivered: Mapped[int] = mapped_column(Integer, default=0)
    last_ok_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_error: Mapped[str | None] = mapped_column(String(500))
    lease_holder: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)


class SessionRecording(Base):
    """A lane's payload recording (pcap) as the agent delivered it; its SHA-256 is in the signed evidence."""

    __tablename__ = "session_recordings"
    __table_args__ = (UniqueConstraint("node", "ident"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(64))
    ident: Mapped[str] = mapped_column(String(128))
    session_id: Mapped[str | None] = mapped_column(String(64), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(500))
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Lifecycle(StrEnum):
    provisioned = "provisioned"
    active = "active"
    quarantined = "quarantined"
    decommissioned = "decommissioned"


class Site(Base):
    """A site with its edge router(s): where lanes open, from which pools, and in which time zone."""

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(128))
    time_zone: Mapped[str] = mapped_column(String(64))
    tunnel_pool: Mapped[str] = mapped_column(String(64))  # IPv4 CIDR engineers' tunnel addresses come from
    port_min: Mapped[int] = mapped_column(Integer)
    port_max: Mapped[int] = mapped_column(Integer)
    public_endpoint: Mapped[str] = mapped_column(String(253))  # host engineers' clients dial
    lan_networks: Mapped[list] = mapped_column(JSON, default=list)  # device addresses lie inside these
    change_windows: Mapped[list] = mapped_column(JSON, default=list)  # names of policy change windows
    # Device baselines: what the agent does with the own traffic of hosts in `device_networks` that have
    # no active passport: "router" leaves it to the router's firewall, "deny" drops it.
    unpassported: Mapped[str] = mapped_column(String(8), default="router", server_default="router")
    device_networks: Mapped[list] = mapped_column(JSON, default=list)  # IPv4 CIDRs
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class NodeAgent(Base):
    """An agent (edge router) of a site: registered, enrolled with a join token, linked."""

    __tablename__ = "node_agents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"), index=True)
    description: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # Bumped in the same transaction as any change to the node's lanes; the agent never applies an older one.
    generation: Mapped[int] = mapped_column(Integer, default=0)
    # enrolment (a join token redeemed) and the live link, as this controller saw it last
    enrolled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    evidence_public_key: Mapped[str | None] = mapped_column(String(64))  # Ed25519, base64: signs its evidence
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    connected: Mapped[bool] = mapped_column(Boolean, default=False)
    link_replica: Mapped[str | None] = mapped_column(String(64))  # which controller replica holds its link
    connected_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime)
    applied_generation: Mapped[int | None] = mapped_column(Integer)
    agent_version: Mapped[str | None] = mapped_column(String(32))
    protocol_version: Mapped[int | None] = mapped_column(Integer)
    clock_synchronized: Mapped[bool | None] = mapped_column(Boolean)
    last_error: Mapped[str | None] = mapped_column(String(500))


class JoinToken(Base):
    """A one-time token a site admin hands to a router to enrol its agent. Only a hash of the secret is kept."""

    __tablename__ = "join_tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    used_by: Mapped[str | None] = mapped_column(String(64))  # the node it enrolled
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_by: Mapped[str | None] = mapped_column(String(64))


class AgentCertificate(Base):
    """Every client certificate issued to an agent; the link refuses any not listed here or revoked."""

    __tablename__ = "agent_certificates"

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)
    node: Mapped[str] = mapped_column(String(64), index=True)
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime)
    not_after: Mapped[datetime] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class LaneEvidenceRecord(Base):
    """Evidence an agent delivered over the link, as signed by the agent. Unique per (node, ident): a
    record sent twice (a receipt lost in a cut) is stored once."""

    __tablename__ = "lane_evidence"
    __table_args__ = (UniqueConstraint("node", "ident"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(64), index=True)
    ident: Mapped[str] = mapped_column(String(128))
    session_id: Mapped[str | None] = mapped_column(String(64), index=True)
    end_reason: Mapped[str] = mapped_column(String(32))
    body: Mapped[dict] = mapped_column(JSON)
    signature: Mapped[str] = mapped_column(String(128))
    verified_with: Mapped[str] = mapped_column(String(64))  # the agent's evidence key then: it may re-enrol with another
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Device(Base):
    """A device's passport: identity, place, addresses, SIM binding, lifecycle and posture."""

    __tablename__ = "devices"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    asset_id: Mapped[str] = mapped_column(String(64), unique=True)
    device_type: Mapped[str] = mapped_column(String(48), index=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"), index=True)
    addresses: Mapped[list] = mapped_column(JSON, default=list)
    mac: Mapped[str | None] = mapped_column(String(17))
    iccid: Mapped[str | None] = mapped_column(String(22), unique=True)
    eid: Mapped[str | None] = mapped_column(String(32), unique=True)
    imsis: Mapped[list] = mapped_column(JSON, default=list)
    firmware: Mapped[str | None] = mapped_column(String(64))
    lifecycle: Mapped[str] = mapped_column(String(16), default=Lifecycle.provisioned.value)
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime)
    ports: Mapped[dict] = mapped_column(JSON, default=dict)  # protocol → port, where the device differs
    description: Mapped[str] = mapped_column(String(256), default="")
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)

    site: Mapped[Site] = relationship(lazy="joined")


class PolicyVersion(Base):
    """An applied policy: its files as written (for review and diff) and the canonical content."""

    __tablename__ = "policy_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(71), index=True)
    files: Mapped[dict] = mapped_column(JSON)
    document: Mapped[dict] = mapped_column(JSON)
    comment: Mapped[str] = mapped_column(String(500), default="")
    applied_at: Mapped[datetime] = mapped_column(UtcDateTime)
    applied_by: Mapped[str] = mapped_column(String(64))


class SessionState(StrEnum):
    denied = "denied"
    pending_approval = "pending_approval"
    approved = "approved"
    rejected = "rejected"
    opening = "opening"  # activated; the node has not yet acknowledged the lane
    active = "active"
    closed = "closed"
    expired = "expired"
    revoked = "revoked"


class AccessSession(Base):
    """One request for one task on one device by one person, from request to its end. A session is
    only ever changed by a compare-and-set on `state` (controller.sessions), so two replicas, or an API
    call racing the clock, cannot both move it."""

    __tablename__ = "access_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # "lane": an engineer's tunnel to the device; "grant": a temporary change of the device's own flows
    kind: Mapped[str] = mapped_column(String(8), default="lane", server_default="lane")
    grant_group: Mapped[str | None] = mapped_column(String(32), index=True)  # the grants requested together
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    username: Mapped[str] = mapped_column(String(64))
    asset_id: Mapped[str] = mapped_column(String(64), index=True)
    site: Mapped[str] = mapped_column(String(64), index=True)
    node: Mapped[str | None] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(48))
    reason: Mapped[str] = mapped_column(String(500))
    incident: Mapped[str | None] = mapped_column(String(64))
    break_glass: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), index=True)
    source: Mapped[str | None] = mapped_column(String(64))
    duration_s: Mapped[int] = mapped_column(Integer)
    approvals_required: Mapped[int] = mapped_column(Integer, default=0)
    policy_version: Mapped[str] = mapped_column(String(71))
    decision: Mapped[dict] = mapped_column(JSON)  # the decision at request time, with its trace
    recording: Mapped[str] = mapped_column(String(16), default="metadata")
    requested_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # a pending request or an unused approval lapses
    approved_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    activated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    end_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)  # planned end while active
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    end_reason: Mapped[str | None] = mapped_column(String(64))
    ended_by: Mapped[str | None] = mapped_column(String(64))
    checked_policy: Mapped[str | None] = mapped_column(String(71))  # the policy version an active session was last held against
    warned_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    extensions: Mapped[list] = mapped_column(JSON, default=list)  # granted: [{by_s, reason_code, at, actor}]
    extension_request: Mapped[dict | None] = mapped_column(JSON)  # one awaiting re-approval
    key_mode: Mapped[str | None] = mapped_column(String(8))  # minted | byok
    engineer_public_key: Mapped[str | None] = mapped_column(String(64))
    sealed_private_key: Mapped[str | None] = mapped_column(String(256))  # minted key, sealed; erased at download or end
    node_public_key: Mapped[str | None] = mapped_column(String(64))
    tunnel_address: Mapped[str | None] = mapped_column(String(45))
    device_address: Mapped[str | None] = mapped_column(String(45))
    listen_port: Mapped[int | None] = mapped_column(Integer)
    flows: Mapped[list] = mapped_column(JSON, default=list)  # lanes: [{protocol, transport, port}]; grants: [{protocol, transport, ports, to}]
    lane_revision: Mapped[int] = mapped_column(Integer, default=0)
    opened_generation: Mapped[int | None] = mapped_column(Integer)  # the node generation that first lists the lane
    config_downloaded_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    reviewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    reviewed_by: Mapped[str | None] = mapped_column(String(64))
    review_note: Mapped[str | None] = mapped_column(String(1000))
    review_reminded_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    evidence_recorded_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # its session.evidence record

    approvals: Mapped[list[SessionApproval]] = relationship(back_populates="session", lazy="selectin",
                                                           order_by="SessionApproval.id", cascade="all, delete-orphan")


class SessionApproval(Base):
    """One approver's answer to a request (kind "request") or to an extension (kind "extension:N")."""

    __tablename__ = "session_approvals"
    __table_args__ = (UniqueConstraint("session_id", "kind", "approver_id", name="uq_session_approval"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("access_sessions.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(24))
    approver_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    approver: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(8))  # approve | reject
    reason: Mapped[str] = mapped_column(String(500))
    at: Mapped[datetime] = mapped_column(UtcDateTime)

    session: Mapped[AccessSession] = relationship(back_populates="approvals")


class LaneLease(Base):
    """A tunnel address and a listen port held by one active session. The unique constraints make two
    sessions at a site unable to hold the same one, whichever replica allocates."""

    __tablename__ = "lane_leases"
    __table_args__ = (UniqueConstraint("site_id", "address", name="uq_lease_address"),
                      UniqueConstraint("site_id", "port", name="uq_lease_port"))

    session_id: Mapped[str] = mapped_column(ForeignKey("access_sessions.id", ondelete="CASCADE"), primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"))
    address: Mapped[str] = mapped_column(String(45))
    port: Mapped[int] = mapped_column(Integer)


def now() -> datetime:
    return datetime.now(UTC)
