"""`wicket-agent doctor`: can this router enforce lanes, and how?

Each check says ok, warn (works, but an operator should know) or fail (the agent will refuse to run or
cannot keep a promise), with the detail that lets a site admin fix it.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass

from . import netns, prereq
from .clock import clock_synchronized
from .config import AgentConfig
from .naming import DATA_MARK, MARK_ID, Naming
from .wg.base import kernel_module_present


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def run_checks(cfg: AgentConfig) -> list[Check]:
    checks = [
        _check("privileges", _root),
        _check("kernel", lambda: ("ok", f"Linux {platform.release()}")),
        _check("wireguard backend", lambda: _backend(cfg)),
        _check("tun device", _tun),
        _check("unshare", lambda: ("ok", shutil.which("unshare")) if shutil.which("unshare") else ("fail", "util-linux `unshare` missing (userspace lanes need it)")),
        _check("nftables", lambda: _nftables(cfg)),
        _check("conntrack accounting", _conntrack),
        _check("ctnetlink", _ctnetlink),
        _check("inotify instances", lambda: _inotify(cfg)),
        _check("clock", _clock),
        _check("state directory", lambda: _state_dir(cfg)),
        _check("agent", lambda: _agent(cfg)),
    ]
    return checks


def _check(name, fn) -> Check:
    try:
        status, detail = fn()
    except Exception as exc:  # a check must report, not crash the doctor
        status, detail = "fail", f"{type(exc).__name__}: {exc}"
    return Check(name, status, detail)


def _root():
    return ("ok", "running as root") if os.geteuid() == 0 else ("fail", "run as root")


def _backend(cfg: AgentConfig):
    try:
        kind, why = prereq.choose_backend(cfg.backend, cfg.wireguard_go)
    except Exception as exc:
        return "fail", str(exc)
    if kind == "userspace":
        version = _wireguard_go_version(cfg.wireguard_go)
        return "ok", f"userspace: {version} ({why}); one lane box (network namespace) per lane"
    return "ok", f"kernel WireGuard module ({why})"


def _wireguard_go_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5).stdout
        return out.splitlines()[0].strip() if out else path
    except (OSError, subprocess.TimeoutExpired):
        return path


def _tun():
    if kernel_module_present():
        return "ok", "not needed (kernel WireGuard)"
    if os.path.exists("/dev/net/tun") and stat.S_ISCHR(os.stat("/dev/net/tun").st_mode):
        return "ok", "/dev/net/tun present"
    return "fail", "/dev/net/tun missing: userspace WireGuard cannot create lanes"


def _nftables(cfg: AgentConfig):
    try:
        import nftables
    except ImportError:
        return "fail", "python3-nftables (libnftables) not importable: install it and run the agent from a venv made with --system-site-packages"
    from .firewall import Firewall

    fw = Firewall(Naming(cfg.tag), cfg.table, cfg.blocked_size, nft=nftables.Nftables())
    fw.check()
    present = fw._table_comment()
    where = f"table inet {cfg.table} loaded" if present is not None else f"table inet {cfg.table} not loaded yet"
    return "ok", f"libnftables works; template {fw.version} validates; {where}"


def _conntrack():
    values = {}
    for key in prereq.CONNTRACK_SYSCTLS:
        try:
            values[key] = netns.read_sysctl(key)
        except OSError:
            return "fail", f"{key} missing: is nf_conntrack available?"
    off = [k for k, v in values.items() if v != "1"]
    if off:
        return "warn", f"{', '.join(off)} off now; the agent switches them on at start (refuses to run if it cannot)"
    return "ok", "accounting and timestamps on"


def _ctnetlink():
    from .ctnl import Conntrack

    ct = Conntrack()
    try:
        ct.flush(DATA_MARK | MARK_ID, 0xFFFFFFFF)  # a mark no lane uses: proves delete-by-mark works
    finally:
        ct.close()
    return "ok", "conntrack flush by mark works"


def _inotify(cfg: AgentConfig):
    current = int(netns.read_sysctl(prereq.INOTIFY_KEY))
    if kernel_module_present():
        return "ok", f"{current}"
    want = max(1024, cfg.max_lanes * 4)
    if current < want:
        return "warn", f"{prereq.INOTIFY_KEY}={current}; the agent raises it to {want} at start (wireguard-go needs it per lane)"
    return "ok", f"{prereq.INOTIFY_KEY}={current}"


def _clock():
    synced, why = clock_synchronized()
    return ("ok" if synced else "warn"), why + ("" if synced else "; records carry this state, and the agent link (later) refuses new lanes")


def _state_dir(cfg: AgentConfig):
    if not os.path.isdir(cfg.state_dir):
        return "ok", f"{cfg.state_dir} will be created (0700)"
    mode = stat.S_IMODE(os.stat(cfg.state_dir).st_mode)
    if mode & 0o077:
        return "fail", f"{cfg.state_dir} is {oct(mode)}: must not be readable by others (0700)"
    return "ok", f"{cfg.state_dir} ({oct(mode)})"


def _agent(cfg: AgentConfig):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(cfg.control_socket)
        return "ok", f"running (control socket {cfg.control_socket})"
    except OSError:
        return "warn", "not running"
    finally:
        s.close()
