"""Controller settings, from the environment (`WICKET_*`), checked at start-up.

Nothing secret has a default: the controller's keys are made by `wicket-controller init` and read from
the data directory; a missing or malformed setting stops the start with a message naming it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

ARGON2_MIN = {"time_cost": 2, "memory_cost": 19 * 1024, "parallelism": 1}  # OWASP's floor for argon2id


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Argon2Params:
    time_cost: int = 2
    memory_cost: int = 19 * 1024  # KiB
    parallelism: int = 1


@dataclass(frozen=True)
class ThrottlePolicy:
    """Failed logins, per account and per source address (see docs/controller.md)."""

    window_s: int = 900  # an account's or address's count is forgotten after this long without a failure
    free_failures: int = 5  # failures allowed before any delay
    max_delay_s: int = 300  # the longest an account or address is ever held off: approvers stay reachable


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    token_idle_s: int = 900  # an API token dies after 15 min unused
    token_max_s: int = 8 * 3600  # and after 8 h whatever happens
    argon2: Argon2Params = field(default_factory=Argon2Params)
    throttle: ThrottlePolicy = field(default_factory=ThrottlePolicy)
    trust_forwarded_for: bool = False  # behind a reverse proxy that sets X-Forwarded-For
    cookie_secure: bool = True
    totp_issuer: str = "wicket"
    request_ttl_s: int = 8 * 3600  # a request nobody answered lapses
    approval_ttl_s: int = 3600  # an approval not used to open the session lapses
    warn_before_s: int = 300  # the engineer is warned this long before the end
    tick_ms: int = 1000  # the session clock's period; 0: no clock thread (tests tick by hand)
    keepalive_s: int = 25  # PersistentKeepalive in engineers' configs (NAT, private APNs)
    agent_sockets: dict[str, str] = field(default_factory=dict)  # LAB ONLY: node → agent control socket
    link_listen: str = ""  # host:port of the agent link (TLS); "" when this process serves no agents
    link_names: tuple[str, ...] = ()  # host names / addresses agents dial, put in the link certificate
    agent_cert_ttl_s: int = 24 * 3600  # agent client certificates; renewed over the link at half their life
    join_token_ttl_s: int = 3600
    link_heartbeat_s: int = 10  # the controller pings this often; a link silent for 3 of these is dropped
    ack_timeout_s: int = 10  # how long an activation waits for the node to acknowledge the lane
    replica_id: str = ""  # names this controller replica in link records; default: the host name
    audit_checkpoint_every: int = 1000  # a signed checkpoint at every multiple of this many records
    audit_checkpoint_s: int = 60  # and at the head this often, when it moved
    audit_sinks_file: str = ""  # TOML file of SIEM sinks (docs/siem-export.md); "" = <data_dir>/sinks.toml if it exists
    evidence_wait_s: int = 600  # a lane's evidence not delivered this long after its end is recorded as missing
    breach_records_per_report: int = 50  # device.breach records per device report; the rest are summarised

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"


def load(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    data_dir = Path(env.get("WICKET_DATA_DIR", "/var/lib/wicket-controller"))
    if not data_dir.is_absolute():
        raise SettingsError(f"WICKET_DATA_DIR={data_dir}: must be an absolute path")
    url = env.get("WICKET_DATABASE_URL") or f"sqlite:///{data_dir / 'controller.db'}"
    if not re.match(r"^(sqlite|postgresql)(\+[a-z0-9]+)?://", url):
        raise SettingsError("WICKET_DATABASE_URL: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
    argon2 = Argon2Params(
        time_cost=_int(env, "WICKET_ARGON2_TIME_COST", 2),
        memory_cost=_int(env, "WICKET_ARGON2_MEMORY_KIB", 19 * 1024),
        parallelism=_int(env, "WICKET_ARGON2_PARALLELISM", 1),
    )
    for name, floor in ARGON2_MIN.items():
        if getattr(argon2, name) < floor:
            raise SettingsError(f"argon2 {name}={getattr(argon2, name)} is below the minimum {floor}")
    settings = Settings(
        data_dir=data_dir,
        database_url=url,
        token_idle_s=_int(env, "WICKET_TOKEN_IDLE_S", 900, low=60, high=86400),
        token_max_s=_int(env, "WICKET_TOKEN_MAX_S", 8 * 3600, low=300, high=7 * 86400),
        argon2=argon2,
        throttle=ThrottlePolicy(
            window_s=_int(env, "WICKET_THROTTLE_WINDOW_S", 900, low=60, high=86400),
            free_failures=_int(env, "WICKET_THROTTLE_FREE_FAILURES", 5, low=1, high=100),
            max_delay_s=_int(env, "WICKET_THROTTLE_MAX_DELAY_S", 300, low=1, high=3600),
        ),
        trust_forwarded_for=_bool(env, "WICKET_TRUST_FORWARDED_FOR", False),
        cookie_secure=_bool(env, "WICKET_COOKIE_SECURE", True),
        request_ttl_s=_int(env, "WICKET_REQUEST_TTL_S", 8 * 3600, low=60, high=7 * 86400),
        approval_ttl_s=_int(env, "WICKET_APPROVAL_TTL_S", 3600, low=60, high=86400),
        warn_before_s=_int(env, "WICKET_WARN_BEFORE_S", 300, low=0, high=3600),
        tick_ms=_int(env, "WICKET_SESSION_TICK_MS", 1000, low=0, high=60000),
        keepalive_s=_int(env, "WICKET_KEEPALIVE_S", 25, low=0, high=3600),
        agent_sockets=_sockets(env),
        link_listen=_listen(env),
        link_names=tuple(n.strip() for n in env.get("WICKET_LINK_NAMES", "").split(",") if n.strip()),
        agent_cert_ttl_s=_int(env, "WICKET_AGENT_CERT_TTL_S", 24 * 3600, low=120, high=30 * 86400),
        join_token_ttl_s=_int(env, "WICKET_JOIN_TOKEN_TTL_S", 3600, low=60, high=7 * 86400),
        link_heartbeat_s=_int(env, "WICKET_LINK_HEARTBEAT_S", 10, low=1, high=120),
        ack_timeout_s=_int(env, "WICKET_ACK_TIMEOUT_S", 10, low=1, high=120),
        replica_id=env.get("WICKET_REPLICA_ID", "")[:64],
        audit_checkpoint_every=_int(env, "WICKET_AUDIT_CHECKPOINT_EVERY", 1000, low=10, high=1_000_000),
        audit_checkpoint_s=_int(env, "WICKET_AUDIT_CHECKPOINT_S", 60, low=1, high=3600),
        audit_sinks_file=env.get("WICKET_AUDIT_SINKS_FILE", ""),
        evidence_wait_s=_int(env, "WICKET_EVIDENCE_WAIT_S", 600, low=10, high=7 * 86400),
        breach_records_per_report=_int(env, "WICKET_BREACH_RECORDS_PER_REPORT", 50, low=1, high=1000),
    )
    if settings.token_idle_s > settings.token_max_s:
        raise SettingsError("WICKET_TOKEN_IDLE_S must not exceed WICKET_TOKEN_MAX_S")
    return settings


def _listen(env) -> str:
    raw = env.get("WICKET_LINK_LISTEN", "0.0.0.0:7443").strip()
    if raw in ("", "off"):
        return ""
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"WICKET_LINK_LISTEN={raw!r}: write HOST:PORT (e.g. 0.0.0.0:7443), or off")
    return raw


def _sockets(env) -> dict[str, str]:
    from .nodelink import parse_sockets

    try:
        return parse_sockets(env.get("WICKET_AGENT_SOCKETS", ""))
    except ValueError as exc:
        raise SettingsError(f"WICKET_AGENT_SOCKETS: {exc}") from None


def _int(env, key, default, low=1, high=1 << 30) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SettingsError(f"{key}={raw!r}: not a whole number") from exc
    if not low <= value <= high:
        raise SettingsError(f"{key}={value}: must be between {low} and {high}")
    return value


def _bool(env, key, default) -> bool:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{key}={raw!r}: use true or false")
