"""Where audit records go: syslog over TCP (RFC 6587 octet counting) or TLS (RFC 5425), an HTTP event
collector in the Splunk HEC style, or JSON lines in a file. The shipper (`controller.audit.shipper`)
opens one sink per configured entry and hands it batches of canonical events; each sink renders them
(`controller.audit.formats`) and delivers the batch or raises `SinkError`.

Configuration is a TOML file (`load_sinks`), one `[[sink]]` table per destination:

    [[sink]]
    name = "soc"                  # [A-Za-z0-9._-]{1,64}; names the durable cursor: renaming restarts from seq 1
    kind = "syslog-tls"           # syslog-tcp | syslog-tls | hec | file
    address = "siem.example.net:6514"
    format = "cef"                # the payload: cef | ecs | ocsf | json
    ca_file = "/etc/wicket/siem-ca.pem"     # TLS: trust these CAs only (default: the system's)
    cert_file = "/etc/wicket/client.pem"    # TLS: optional client certificate, with key_file
    key_file = "/etc/wicket/client.key"
    server_name = "siem.example.net"        # TLS: the name to verify, when it is not the address's host
    facility = "auto"             # syslog: auto (authpriv for authentication/account, local4 else) or a name
    max_message_bytes = 65536     # syslog: longer records go without their body (the receiver's limit)
    confirm_ms = 100              # syslog: the connection must stay open this long after a batch is acknowledged
    batch = 500                   # records per send (default: 500 for syslog, 100 for hec and file)
    timeout_s = 10                # connect, send and answer, each

    [[sink]]
    name = "splunk"
    kind = "hec"
    url = "https://splunk.example.net:8088"  # POSTs to /services/collector/event unless the URL has a path
    token_file = "/etc/wicket/hec-token"     # the token is never written in this file
    format = "ecs"                # the event object: ecs | ocsf | json | cef (a string)
    index = "ot_audit"            # optional; also source, sourcetype

    [[sink]]
    name = "local-jsonl"
    kind = "file"
    path = "/var/log/wicket/audit.jsonl"     # appended, fsync'd per batch; rotate with copytruncate
    format = "json"               # json | ecs | ocsf | cef, one record per line

A token inline (`token = …`) is refused: config files get copied, printed and committed; a token file
can be 0600 and rotated on its own. Plain http is refused for a host other than loopback, since it
would send the token in clear. Every error names the sink and the field; a bad file changes nothing.

Delivery guarantees: HEC acknowledges each POST (HTTP 200, code 0). Syslog over TCP has no application
acknowledgement: a batch counts as sent when the receiver's TCP stack has acknowledged every byte and
the connection then stays open for `confirm_ms`, so a receiver that shuts down with our data unread (it
resets the connection) makes the batch go again. One that crashes after reading a batch but before
writing it can still lose it; RELP would close that gap. The wait bounds one syslog sink to about
batch / confirm_ms records a second (5 000/s with the defaults).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import os
import re
import select
import socket
import ssl
import struct
import termios
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from . import formats

KINDS = ("syslog-tcp", "syslog-tls", "hec", "file")
DEFAULT_FORMAT = {"syslog-tcp": "cef", "syslog-tls": "cef", "hec": "ecs", "file": "json"}
HEC_PATH = "/services/collector/event"
NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class SinkConfigError(ValueError):
    """The sinks file is wrong; the message names the sink and the field."""


class SinkError(RuntimeError):
    """A batch was not delivered; it is retried (the shipper backs off)."""


@dataclass(frozen=True)
class SinkConfig:
    name: str
    kind: str
    format: str
    address: str | None = None  # syslog: host:port
    url: str | None = None  # hec
    path: Path | None = None  # file
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None
    token_file: Path | None = None
    facility: str = "auto"
    max_message_bytes: int = 65536
    confirm_ms: int = 100  # syslog: how long the connection must stay open after a batch is acknowledged
    batch: int = 100
    timeout_s: float = 10.0
    source: str = "wicket"
    sourcetype: str | None = None
    index: str | None = None
    hostname: str | None = None  # as the records name this controller; default: the host name

    @property
    def target(self) -> str:
        """Where it delivers, for health reports and logs."""
        return self.address or self.url or str(self.path)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = (self.address or "").rpartition(":")
        return host.strip("[]"), int(port)


class Sink(Protocol):
    config: SinkConfig

    def send(self, events: list[dict]) -> None:
        """Deliver these canonical events, in order, or raise SinkError."""

    def close(self) -> None: ...


def load_sinks(path: str | os.PathLike) -> list[SinkConfig]:
    """Read and check a sinks file. Raises SinkConfigError; has no side effects."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SinkConfigError(f"{p}: cannot read the sinks file: {exc.strerror or exc}") from None
    return parse_sinks(text, origin=str(p), base=p.parent)


def parse_sinks(text: str, *, origin: str = "sinks", base: Path | None = None) -> list[SinkConfig]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SinkConfigError(f"{origin}: not valid TOML: {exc}") from None
    extra = set(doc) - {"sink"}
    if extra:
        raise SinkConfigError(f"{origin}: unknown top-level key(s) {', '.join(sorted(extra))}: sinks are [[sink]] tables")
    tables = doc.get("sink", [])
    if not isinstance(tables, list):
        raise SinkConfigError(f"{origin}: `sink` must be an array of tables: write [[sink]]")
    out: list[SinkConfig] = []
    for i, table in enumerate(tables, 1):
        out.append(_parse_one(table, f"{origin}: sink #{i}", base or Path.cwd()))
    seen: set[str] = set()
    for c in out:
        if c.name in seen:
            raise SinkConfigError(f"{origin}: sink {c.name!r}: the name is used twice (it names the delivery cursor)")
        seen.add(c.name)
    return out


def open_sink(config: SinkConfig) -> Sink:
    """A sink for this configuration; it connects on its first send."""
    if config.kind in ("syslog-tcp", "syslog-tls"):
        return SyslogSink(config)
    if config.kind == "hec":
        return HecSink(config)
    if config.kind == "file":
        return FileSink(config)
    raise SinkConfigError(f"sink {config.name!r}: unknown kind {config.kind!r}")


# ---- syslog over TCP and TLS -----------------------------------------------------------------------


class SyslogSink:
    """RFC 5424 messages, octet-counted (RFC 6587 §3.4.1: `LEN SP MSG`), over TCP or TLS (RFC 5425)."""

    def __init__(self, config: SinkConfig):
        self.config = config
        self._sock: socket.socket | None = None

    def send(self, events: list[dict]) -> None:
        c = self.config
        frames = b"".join(_frame(formats.rfc5424(e, c.format, host=c.hostname, facility=c.facility,
                                                 max_bytes=c.max_message_bytes)) for e in events)
        if self._sock is not None and _peer_gone(self._sock):
            self.close()  # the receiver went away since the last batch: start again
        try:
            if self._sock is None:
                self._sock = self._connect()
            self._sock.sendall(frames)
            self._wait_acknowledged(self._sock)
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise SinkError(f"sink {c.name}: syslog to {c.address}: {_describe(exc)}") from None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _connect(self) -> socket.socket:
        host, port = self.config.host_port
        sock = socket.create_connection((host, port), timeout=self.config.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.config.kind != "syslog-tls":
            return sock
        try:
            return _tls_context(self.config).wrap_socket(sock, server_hostname=self.config.server_name or host)
        except BaseException:
            sock.close()
            raise

    def _wait_acknowledged(self, sock: socket.socket) -> None:
        """Until the peer's TCP stack has acknowledged every byte sent (Linux TIOCOUTQ), within the timeout;
        then the connection must stay open for `confirm_ms`. A receiver that shuts down closes the
        connection with our last bytes unread (the kernel answers with a reset); without this wait a batch
        written just before that would count as delivered. (tests/controller/test_audit_shipper.py stops
        rsyslogd under load: without the wait about one run in ten lost a record; with 100 ms, none of 30.)"""
        c = self.config
        deadline = time.monotonic() + c.timeout_s
        fd = sock.fileno()
        while True:
            unacked = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
            if unacked == 0:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{unacked} bytes not acknowledged by the receiver after {c.timeout_s:g} s")
            time.sleep(0.001)
        settled = time.monotonic() + c.confirm_ms / 1000
        while True:
            if _peer_gone(sock):
                raise ConnectionResetError(errno.ECONNRESET, "the receiver closed the connection")
            left = settled - time.monotonic()
            if left <= 0:
                return
            select.select([sock], [], [], left)


def _frame(message: str) -> bytes:
    raw = message.encode()
    return str(len(raw)).encode() + b" " + raw


def _peer_gone(sock: socket.socket) -> bool:
    """Whether the receiver closed or reset the connection (it never sends us data)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
        return False
    try:
        if isinstance(sock, ssl.SSLSocket):
            timeout = sock.gettimeout()
            sock.setblocking(False)
            try:
                data = sock.recv(1)
            finally:
                sock.settimeout(timeout)
        else:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return False  # a TLS record that held no data (a session ticket)
    except (OSError, ssl.SSLError):
        return True
    return data == b""


# ---- HTTP event collector ----------------------------------------------------------------------------


class HecSink:
    """Splunk-style HEC: several JSON envelopes per POST, `Authorization: Splunk <token>`."""

    def __init__(self, config: SinkConfig):
        self.config = config
        self._client: httpx.Client | None = None
        parts = urlsplit(config.url or "")
        self._endpoint = config.url if parts.path not in ("", "/") else (config.url or "").rstrip("/") + HEC_PATH

    def send(self, events: list[dict]) -> None:
        c = self.config
        body = "\n".join(json.dumps(formats.hec(e, c.format, host=c.hostname, source=c.source, sourcetype=c.sourcetype,
                                                index=c.index), separators=(",", ":"), ensure_ascii=False)
                         for e in events)
        try:
            if self._client is None:
                self._client = self._open()
            res = self._client.post(self._endpoint, content=body.encode(),
                                    headers={"Content-Type": "application/json"})
        except (httpx.HTTPError, OSError, ssl.SSLError) as exc:
            self.close()
            raise SinkError(f"sink {c.name}: HEC {self._endpoint}: {_describe(exc)}") from None
        except SinkError:
            self.close()
            raise
        if res.status_code != 200:
            self.close()  # the next try opens afresh and reads token_file again (a rotated token)
            raise SinkError(f"sink {c.name}: HEC {self._endpoint} answered {res.status_code}: {res.text[:200]}")
        try:
            code = res.json().get("code", 0)
        except ValueError:
            code = 0
        if code != 0:
            raise SinkError(f"sink {c.name}: HEC {self._endpoint} answered code {code}: {res.text[:200]}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _open(self) -> httpx.Client:
        c = self.config
        try:
            token = c.token_file.read_text().strip() if c.token_file else ""
        except OSError as exc:
            raise SinkError(f"sink {c.name}: cannot read token_file {c.token_file}: {exc.strerror or exc}") from None
        if not token:
            raise SinkError(f"sink {c.name}: token_file {c.token_file} is empty")
        verify: ssl.SSLContext | bool = _tls_context(c) if (c.url or "").startswith("https:") else True
        return httpx.Client(headers={"Authorization": f"Splunk {token}"}, verify=verify,
                            timeout=httpx.Timeout(c.timeout_s), follow_redirects=False)


# ---- JSON lines (or CEF lines) to a file -----------------------------------------------------------------


def _rotated(path, fd: int) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return True
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)


class FileSink:
    """One record per line, appended; each batch is flushed and fsync'd before it counts as delivered."""

    def __init__(self, config: SinkConfig):
        self.config = config
        self._fd: int | None = None

    def send(self, events: list[dict]) -> None:
        c = self.config
        data = "".join(formats.payload(e, c.format, host=c.hostname) + "\n" for e in events).encode()
        try:
            if self._fd is not None and _rotated(c.path, self._fd):
                self.close()  # logrotate moved the file away: write to a new one at the path
            if self._fd is None:
                self._fd = os.open(c.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as exc:
            self.close()
            raise SinkError(f"sink {c.name}: file {c.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


# ---- configuration ------------------------------------------------------------------------------------

_COMMON = {"name", "kind", "format", "batch", "timeout_s", "hostname"}
_ALLOWED = {
    "syslog-tcp": _COMMON | {"address", "facility", "max_message_bytes", "confirm_ms"},
    "syslog-tls": _COMMON | {"address", "facility", "max_message_bytes", "confirm_ms", "ca_file", "cert_file", "key_file",
                             "server_name"},
    "hec": _COMMON | {"url", "token_file", "ca_file", "cert_file", "key_file", "source", "sourcetype", "index"},
    "file": _COMMON | {"path"},
}


@dataclass
class _Reader:
    table: dict
    where: str
    base: Path
    used: set = field(default_factory=set)

    def fail(self, key: str, why: str):
        raise SinkConfigError(f"{self.where}: {key}: {why}")

    def str(self, key: str, *, required: bool = False, default: str | None = None) -> str | None:
        self.used.add(key)
        value = self.table.get(key)
        if value is None:
            if required:
                self.fail(key, "missing")
            return default
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"must be a non-empty string, not {value!r}")
        return value.strip()

    def number(self, key: str, default, lo, hi, kind=int):
        self.used.add(key)
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
            self.fail(key, f"must be {'an integer' if kind is int else 'a number'}, not {value!r}")
        if not lo <= value <= hi:
            self.fail(key, f"must be between {lo} and {hi}, not {value}")
        return kind(value)

    def file(self, key: str, *, required: bool = False) -> Path | None:
        raw = self.str(key, required=required)
        if raw is None:
            return None
        p = Path(raw)
        p = p if p.is_absolute() else self.base / p
        if not p.is_file():
            self.fail(key, f"{p} is not a readable file")
        try:
            with p.open("rb"):
                pass
        except OSError as exc:
            self.fail(key, f"{p}: {exc.strerror or exc}")
        return p


def _parse_one(table, where: str, base: Path) -> SinkConfig:
    if not isinstance(table, dict):
        raise SinkConfigError(f"{where}: must be a table")
    r = _Reader(table, where, base)
    name = r.str("name", required=True)
    if not NAME.match(name):
        r.fail("name", f"{name!r} must be 1-64 letters, digits, dots, dashes or underscores")
    r.where = where = f"{where.rsplit(': sink #', 1)[0]}: sink {name!r}"
    if "token" in table:
        r.fail("token", "a token is never written in the sinks file: put it in a file (mode 0600) named by token_file")
    kind = r.str("kind", required=True)
    if kind not in KINDS:
        r.fail("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    unknown = set(table) - _ALLOWED[kind]
    if unknown:
        r.fail(sorted(unknown)[0], f"not a setting of a {kind} sink (settings: {', '.join(sorted(_ALLOWED[kind]))})")
    fmt = r.str("format", default=DEFAULT_FORMAT[kind])
    if fmt not in formats.PAYLOAD_FORMATS:
        r.fail("format", f"{fmt!r} is not one of {', '.join(formats.PAYLOAD_FORMATS)}")
    kw: dict = {"name": name, "kind": kind, "format": fmt,
                "batch": r.number("batch", 500 if kind.startswith("syslog") else 100, 1, 10000),
                "timeout_s": r.number("timeout_s", 10.0, 0.1, 300, float),
                "hostname": r.str("hostname")}
    if kind.startswith("syslog"):
        kw["address"] = _address(r)
        facility = r.str("facility", default="auto")
        if facility != "auto" and facility not in formats.FACILITIES:
            r.fail("facility", f"{facility!r} is not auto or one of {', '.join(formats.FACILITIES)}")
        kw["facility"] = facility
        kw["max_message_bytes"] = r.number("max_message_bytes", 65536, 480, 16 * 1024 * 1024)
        kw["confirm_ms"] = r.number("confirm_ms", 100, 0, 10000)
    if kind == "syslog-tls" or kind == "hec":
        kw["ca_file"] = r.file("ca_file")
        kw["cert_file"], kw["key_file"] = r.file("cert_file"), r.file("key_file")
        if (kw["cert_file"] is None) != (kw["key_file"] is None):
            r.fail("cert_file" if kw["cert_file"] is None else "key_file", "a client certificate needs both cert_file and key_file")
    if kind == "syslog-tls":
        kw["server_name"] = r.str("server_name")
    if kind == "hec":
        kw["url"] = _url(r)
        kw["token_file"] = r.file("token_file", required=True)
        kw["source"] = r.str("source", default="wicket")
        kw["sourcetype"], kw["index"] = r.str("sourcetype"), r.str("index")
        if not kw["url"].startswith("https:") and (kw["ca_file"] or kw["cert_file"]):
            r.fail("url", "ca_file and cert_file need an https URL")
    if kind == "file":
        raw = r.str("path", required=True)
        p = Path(raw) if Path(raw).is_absolute() else base / raw
        if not p.parent.is_dir():
            r.fail("path", f"the directory {p.parent} does not exist")
        if p.exists() and not p.is_file():
            r.fail("path", f"{p} exists and is not a file")
        kw["path"] = p
    return SinkConfig(**kw)


def _address(r: _Reader) -> str:
    raw = r.str("address", required=True)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", raw)
    if not m:
        r.fail("address", f"{raw!r} must be host:port (IPv6: [addr]:port)")
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        r.fail("address", f"port {port} is out of range")
    return raw


def _url(r: _Reader) -> str:
    raw = r.str("url", required=True)
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        r.fail("url", f"{raw!r} must be an http(s) URL")
    if parts.username or parts.password:
        r.fail("url", "credentials do not go in the URL: use token_file")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        r.fail("url", "plain http would send the HEC token in clear: use https (http only to a loopback address)")
    return raw


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_context(c: SinkConfig) -> ssl.SSLContext:
    """Verify the receiver (against ca_file, or the system's CAs) and its name; TLS 1.2 at least."""
    ctx = ssl.create_default_context(cafile=str(c.ca_file) if c.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if c.cert_file and c.key_file:
        ctx.load_cert_chain(str(c.cert_file), str(c.key_file))
    return ctx


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the receiver's certificate does not verify: {exc.verify_message or exc}"
    if isinstance(exc, TimeoutError | socket.timeout | httpx.TimeoutException):
        return f"timed out ({exc})" if str(exc) else "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
