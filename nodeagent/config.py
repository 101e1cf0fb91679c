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
