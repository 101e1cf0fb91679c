"""Agent settings: a TOML file (default /etc/wicket/agent.toml) plus command-line overrides.

Unknown or removed keys are errors that name the key, so a typo never silently falls back to a
default on a router.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from .naming import TAG_RE

DEFAULT_PATH = "/etc/wicket/agent.toml"
_REMOVED: dict[str, str] = {}  # old key -> hint, when keys are renamed


class ConfigError(ValueError):
    pass


@dataclass
class AgentConfig:
    node_id: str = ""
    tag: str = "000"
    state_dir: str = "/var/lib/wicket-agent"
    table: str = "wicket"
    backend: str = "auto"  # auto | userspace | kernel
    link_net: str = "169.254.0.0/16"
    wireguard_go: str = "wireguard-go"
    blocked_size: int = 65535
    resync_interval: float = 30.0
    stats_interval: float = 10.0
    max_lanes: int = 1024
    log_level: str = "INFO"
    # strict mode: end every lane this many seconds after the controller was last heard (0: off, lanes
    # live to their end time while the controller is away)
    strict_after_s: float = 0.0
    # require: refuse new lanes while the kernel says the clock is not synchronised; warn: open them anyway
    clock_sync: str = "require"
    # a lane's payload recording (tasks with `recording: payload`, and break-glass) stops growing here
    recording_cap_bytes: int = 64 * 1024 * 1024
    # destinations named by FQDN: resolvers as "ip[:port]", comma-separated ("" = /etc/resolv.conf's)
    dns_servers: str = ""
    dns_min_ttl_s: float = 5.0  # answers are refreshed at their TTL, clamped to [min, max]
    dns_max_ttl_s: float = 3600.0
    dns_stale_s: float = 3600.0  # a failing resolver: the last good answer is kept this long past its expiry
    # refused attempts by devices are read, aggregated and reported to the controller this often
    breach_report_s: float = 60.0

    def dns_server_list(self) -> list[tuple[str, int]] | None:
        """`dns_servers` as (address, port) pairs; None: use /etc/resolv.conf's. ConfigError names a bad one."""
        out = []
        for server in filter(None, (x.strip() for x in self.dns_servers.split(","))):
            host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "53")
            try:
                ipaddress.ip_address(host)
                if not 1 <= int(port) <= 65535:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"dns_servers: {server!r} is not ip[:port]") from None
            out.append((host, int(port)))
        return out or None

    @property
    def control_socket(self) -> str:
        return str(Path(self.state_dir) / "control.sock")

    def validate(self) -> AgentConfig:
        for f in fields(self):
            value = getattr(self, f.name)
            want = {"str": str, "int": int, "float": (int, float)}[f.type]
            if isinstance(value, bool) or not isinstance(value, want):
                raise ConfigError(f"{f.name} = {value!r}: expected {f.type}")
        if self.clock_sync not in ("require", "warn"):
            raise ConfigError(f"clock_sync {self.clock_sync!r}: require (refuse new lanes on an unsynchronised clock) or warn")
        if self.strict_after_s < 0 or 0 < self.strict_after_s < 5 or self.strict_after_s > 7 * 86400:
            raise ConfigError("strict_after_s: 0 (off) or seconds between 5 and 604800")
        if not 65536 <= self.recording_cap_bytes <= 4 << 30:
            raise ConfigError("recording_cap_bytes: between 65536 and 4294967296")
        self.dns_server_list()
        if not 1 <= self.dns_min_ttl_s <= self.dns_max_ttl_s <= 86400:
            raise ConfigError("dns_min_ttl_s and dns_max_ttl_s: 1 ≤ min ≤ max ≤ 86400 seconds")
        if not 0 <= self.dns_stale_s <= 7 * 86400:
            raise ConfigError("dns_stale_s: between 0 and 604800 seconds")
        if not 1 <= self.breach_report_s <= 3600:
            raise ConfigError("breach_report_s: between 1 and 3600 seconds")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level {self.log_level!r}: one of DEBUG, INFO, WARNING, ERROR")
        if not self.node_id:
            self.node_id = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "node"
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", self.node_id):
            raise ConfigError(f"node_id {self.node_id!r}: use letters, digits, '.', '_' or '-' (max 64)")
        if not TAG_RE.match(self.tag):
            raise ConfigError(f"tag {self.tag!r}: exactly 3 characters of [a-z0-9]; lane interfaces are named wk<tag>…")
        if not re.match(r"^[a-z][a-z0-9_]{0,31}$", self.table):
            raise ConfigError(f"table {self.table!r}: lower-case letters, digits and '_'")
        if self.backend not in ("auto", "userspace", "kernel"):
            raise ConfigError(f"backend {self.backend!r}: one of auto, userspace, kernel")
        try:
            net = ipaddress.IPv4Network(self.link_net)
        except ValueError as exc:
            raise ConfigError(f"link_net {self.link_net!r}: {exc}") from exc
        if net.prefixlen > 24:
            raise ConfigError("link_net must be /24 or larger")
        if not 1024 <= self.blocked_size <= 1 << 20:
            raise ConfigError("blocked_size must be between 1024 and 1048576")
        if self.resync_interval < 1 or self.stats_interval < 1:
            raise ConfigError("resync_interval and stats_interval are seconds, at least 1")
        if not 1 <= self.max_lanes <= 4096:
            raise ConfigError("max_lanes must be between 1 and 4096")
        if not Path(self.state_dir).is_absolute():
            raise ConfigError(f"state_dir {self.state_dir!r} must be an absolute path")
        return self


def load(path: str | None, overrides: dict) -> AgentConfig:
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    elif Path(DEFAULT_PATH).exists():
        try:
            data = tomllib.loads(Path(DEFAULT_PATH).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{DEFAULT_PATH}: {exc}") from exc
    known = {f.name for f in fields(AgentConfig)}
    for key in data:
        if key in _REMOVED:
            raise ConfigError(f"setting {key!r} was removed: {_REMOVED[key]}")
        if key not in known:
            raise ConfigError(f"unknown setting {key!r} (known: {', '.join(sorted(known))})")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = AgentConfig(**data)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
    return cfg.validate()
