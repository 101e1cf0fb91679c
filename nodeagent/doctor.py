"""`wicket-agent doctor`: can this router enforce lanes, and is it linked to its controller?

Each check says ok, warn (works, but an operator should know) or fail (the agent will refuse to run or
cannot keep a promise), with the detail that lets a site admin fix it. The host checks look at the
kernel and the tools; the link checks read the enrolment under <state_dir>/link/, open a TLS connection
to the controller (a handshake only: it says nothing, so the daemon's own link is not disturbed), and ask
the running daemon over its control socket whether its link is up.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import socket
import ssl
import stat
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from . import netns, prereq
from .clock import clock_synchronized
from .config import AgentConfig
from .naming import DATA_MARK, MARK_ID, Naming
from .wg.base import kernel_module_present

LINK_FILES = ("controller.json", "ca.pem", "tls.key", "tls.pem", "evidence.key")
CERT_WARN_LEFT = 0.25  # warn when less than this share of the certificate's life is left (renewal is at half)
CONNECT_TIMEOUT_S = 5.0


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


@dataclass
class Daemon:
    """What the running agent said over its control socket: its status, or why there is none."""

    status: dict | None
    error: str | None = None


def run_checks(cfg: AgentConfig, *, now: datetime | None = None) -> list[Check]:
    daemon = ask_daemon(cfg.control_socket)
    return [
        *_host_checks(cfg),
        _check("clock", lambda: _clock(cfg)),
        _check("state directory", lambda: _state_dir(cfg)),
        _check("agent", lambda: _agent(cfg, daemon)),
        *link_checks(cfg, daemon, now=now),
    ]


def link_checks(cfg: AgentConfig, daemon: Daemon, *, now: datetime | None = None,
                timeout: float = CONNECT_TIMEOUT_S) -> list[Check]:
    """Enrolment, the pinned CA, the client certificate, the controller's address, the daemon's link."""
    from .enroll import LinkFiles

    files = LinkFiles.of(cfg.state_dir)
    present = [name for name in LINK_FILES if (files.root / name).exists()]
    if not present:
        return [Check("enrolment", "warn", "not enrolled: no controller link, desired state only through the local socket. "
                                           "Enrol: wicket-agent enroll --controller HOST:7443 --node-id NAME (join token on stdin)")]
    first = _check("enrolment", lambda: _enrolment(cfg, files, present))
    if first.status == "fail":
        return [first]
    return [
        first,
        _check("pinned CA", lambda: _pinned_ca(files)),
        _check("certificate", lambda: _certificate(files, now or datetime.now(UTC))),
        _check("controller", lambda: _controller(files, timeout)),
        _check("controller link", lambda: _link(daemon)),
    ]


def ask_daemon(control_socket: str) -> Daemon:
    from .control import ControlError, call

    try:
        answer = call(control_socket, {"op": "status"}, timeout=10)
    except ControlError:
        return Daemon(None, "not running")
    except (OSError, ValueError) as exc:
        return Daemon(None, f"its control socket did not answer: {exc}")
    if not answer.get("ok"):
        return Daemon(None, f"it refused the status request: {answer.get('error')}")
    return Daemon(answer["status"])


def _host_checks(cfg: AgentConfig) -> list[Check]:
    return [
        _check("privileges", _root),
        _check("kernel", lambda: ("ok", f"Linux {platform.release()}")),
        _check("wireguard backend", lambda: _backend(cfg)),
        _check("tun device", _tun),
        _check("unshare", lambda: ("ok", shutil.which("unshare")) if shutil.which("unshare") else ("fail", "util-linux `unshare` missing (userspace lanes need it)")),
        _check("nftables", lambda: _nftables(cfg)),
        _check("conntrack accounting", _conntrack),
        _check("ctnetlink", _ctnetlink),
        _check("inotify instances", lambda: _inotify(cfg)),
    ]


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


def _clock(cfg: AgentConfig):
    synced, why = clock_synchronized()
    if synced:
        return "ok", why
    if cfg.clock_sync == "warn":
        return "warn", f'{why}; clock_sync = "warn": new lanes open anyway, and their end times are only as good as this clock'
    return "fail", (f'{why}; clock_sync = "require": new lanes are refused. Run systemd-timesyncd or chrony (with rtcsync) '
                    'and wait until it has synchronised, or set clock_sync = "warn"')


def _state_dir(cfg: AgentConfig):
    if not os.path.isdir(cfg.state_dir):
        return "ok", f"{cfg.state_dir} will be created (0700)"
    mode = stat.S_IMODE(os.stat(cfg.state_dir).st_mode)
    if mode & 0o077:
        return "fail", f"{cfg.state_dir} is {oct(mode)}: must not be readable by others (0700)"
    return "ok", f"{cfg.state_dir} ({oct(mode)})"


def _agent(cfg: AgentConfig, daemon: Daemon):
    st = daemon.status
    if st is None:
        return "warn", daemon.error
    return "ok", (f"running (control socket {cfg.control_socket}): wicket-agent {st['agent_version']}, {st['backend']} backend, "
                  f"generation {st['applied_generation']}, {len(st['lanes'])} lane(s)")


# ---- the link ----


def _enrolment(cfg: AgentConfig, files, present: list[str]):
    missing = [name for name in LINK_FILES if name not in present]
    if missing:
        return "fail", (f"incomplete enrolment in {files.root}: {', '.join(missing)} missing. Enrol again: "
                        "wicket-agent enroll --force --controller HOST:PORT --node-id NAME")
    loose = [name for name in ("", *LINK_FILES) if os.stat(files.root / name).st_mode & 0o077]
    if loose:
        names = ", ".join(name or "the directory" for name in loose)
        return "fail", f"{names} in {files.root} readable by others: chmod 700 {files.root}; chmod 600 its files"
    info = files.controller()
    detail = (f"node {info['node_id']} at site {info['site']}, controller {info['host']}:{info['port']}, "
              f"since {info.get('enrolled_at', '?')}")
    if cfg.node_id != info["node_id"]:
        detail += f" (node_id {cfg.node_id} in the settings is not used: the enrolled name is)"
    return "ok", detail


def _pinned_ca(files):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate((files.root / "ca.pem").read_bytes())
    digest = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    pin = files.controller().get("ca_pin")
    if pin is None:
        return "warn", f"ca.pem present (sha256 {digest[:16]}…); controller.json holds no pin to compare it with"
    if digest != pin:
        return "fail", (f"ca.pem (sha256 {digest[:16]}…) is not the CA pinned by the join token ({pin[:16]}…): "
                        "enrol again with a new token")
    return "ok", f"ca.pem is the controller CA pinned by the join token (sha256 {digest[:16]}…)"


def _certificate(files, now: datetime):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = files.certificate()
    ca = x509.load_pem_x509_certificate((files.root / "ca.pem").read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - any failure means the same thing here
        return "fail", "tls.pem was not issued by the pinned controller CA: enrol again"
    key = serialization.load_pem_private_key((files.root / "tls.key").read_bytes(), password=None)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        return "fail", "tls.key does not belong to tls.pem: the agent cannot connect. Enrol again (wicket-agent enroll --force)"
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    life, left = end - start, end - now
    if now < start:
        return "fail", f"not valid before {_iso(start)}: is this router's clock right?"
    if left <= timedelta(0):
        return "fail", (f"expired at {_iso(end)}: the controller refuses this agent. A site admin revokes it "
                        "(wicket agents revoke NAME) and makes a join token; then wicket-agent enroll --force")
    span = f"valid until {_iso(end)}, {_span(left)} left of {_span(life)}"
    if left < life * CERT_WARN_LEFT:
        return "warn", f"{span}: it is renewed over the link at half its life, and that has not happened. Is the link up?"
    return "ok", f"{span}; renewed over the link at half its life"


def _controller(files, timeout: float):
    """A TLS handshake with the controller's link, as the agent makes it; nothing is sent."""
    from cryptography import x509

    from .enroll import EnrolError, check_controller_cert

    info = files.controller()
    host, port = info["host"], int(info["port"])
    ca = x509.load_pem_x509_certificate((files.root / "ca.pem").read_bytes())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # as the link: the controller is known by its certificate, not by a host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=files.path("ca.pem"))
    ctx.load_cert_chain(files.path("tls.pem"), files.path("tls.key"))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, ctx.wrap_socket(raw) as s:
            der = s.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        return "fail", (f"{host}:{port} answers, but its certificate does not verify against the pinned CA "
                        f"({exc.verify_message}): another service on that port, another controller, or an expired link certificate")
    except ssl.SSLError as exc:
        return "fail", f"{host}:{port}: TLS failed: {exc}"
    except OSError as exc:
        return "fail", f"cannot reach {host}:{port}: {exc}. The router needs outbound TCP {port} to the controller"
    try:
        check_controller_cert(der, ca)
    except EnrolError as exc:
        return "fail", f"{host}:{port}: {exc}"
    leaf = x509.load_der_x509_certificate(der)
    return "ok", f"{host}:{port} answers with a controller certificate from the pinned CA (valid until {_iso(leaf.not_valid_after_utc)})"


def _link(daemon: Daemon):
    st = daemon.status
    if st is None:
        if daemon.error == "not running":
            return "warn", "the agent is not running, so there is no link: systemctl start wicket-agent"
        return "warn", f"link state unknown: {daemon.error}"
    link = st.get("link")
    if link is None:
        return "fail", "the running agent was started before this enrolment and has no link: systemctl restart wicket-agent"
    detail = f"{link}; {st['pending_evidence']} evidence record(s) waiting"
    if st.get("strict_after_s"):
        detail += f"; strict mode: lanes end {st['strict_after_s']:g} s after the controller was last heard"
    if link.startswith("connected"):
        return "ok", detail
    if link.startswith("starting"):
        return "warn", detail
    return "fail", detail


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _span(d: timedelta) -> str:
    s = d.total_seconds()
    if s >= 2 * 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.0f} min"
