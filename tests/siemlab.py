"""Real collectors for the SIEM export tests, and parsers for what they write.

  pki = make_pki(tmp_path / "pki")                  # a CA, a server certificate for 127.0.0.1, a client one
  with Rsyslog(tmp_path / "rs", pki) as rs:         # rsyslogd -n, own config, pid file and work directory
      ... send to ("127.0.0.1", rs.tcp_port) or rs.tls_port (TLS, client certificate required)
      lines = rs.wait_for_lines(10)                 # what rsyslog wrote, RFC 5424 (RSYSLOG_SyslogProtocol23Format)
      rs.stop(); rs.start()                         # down and up again on the same ports
  with HecCollector(token="t0k") as hec:            # http.server on 127.0.0.1: POST /services/collector/event
      hec.down(); hec.up()                          # refuse connections for a while (same port)

  parse_rfc5424(line) → dict (pri, timestamp, hostname, app, procid, msgid, sd {id: {param: value}}, msg)
  parse_cef(text) → (header list of 7, extension dict)

Every process started here is stopped by its PID; nothing binds outside 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

RSYSLOGD = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None)


def rsyslog_missing() -> str | None:
    """Why the rsyslog tests cannot run here, or None."""
    if RSYSLOGD is None:
        return "rsyslogd is not installed (Debian packages rsyslog and rsyslog-gnutls; `make setup` installs them)"
    if not any(Path(d).glob("lmnsd_gtls.so") for d in ("/usr/lib/x86_64-linux-gnu/rsyslog", "/usr/lib/aarch64-linux-gnu/rsyslog",
                                                        "/usr/lib/rsyslog")):
        return "rsyslog's TLS driver is not installed (Debian package rsyslog-gnutls)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a test PKI ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: a client trusting it must refuse the server


def make_pki(directory: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path):
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(ca_key, ca_cert, cn, usage, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                                content_commitment=False, key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("wicket test SIEM CA")
    _, other = ca("some other CA")
    s_key, s_cert = leaf(ca_key, ca_cert, "siem.test", ExtendedKeyUsageOID.SERVER_AUTH,
                         [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    c_key, c_cert = leaf(ca_key, ca_cert, "wicket-controller", ExtendedKeyUsageOID.CLIENT_AUTH,
                         [x509.DNSName("wicket-controller")])
    pem = serialization.Encoding.PEM
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key", directory / "client.pem",
              directory / "client.key", directory / "other-ca.pem")
    pki.ca.write_bytes(ca_cert.public_bytes(pem))
    pki.other_ca.write_bytes(other.public_bytes(pem))
    pki.server_cert.write_bytes(s_cert.public_bytes(pem))
    pki.client_cert.write_bytes(c_cert.public_bytes(pem))
    write_key(s_key, pki.server_key)
    write_key(c_key, pki.client_key)
    return pki


# ---- rsyslogd -------------------------------------------------------------------------------------------

_CONF = """\
global(
  workDirectory="{work}"
  maxMessageSize="256k"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
module(load="imptcp")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")
input(type="imptcp" address="127.0.0.1" port="{tcp_port}" ruleset="wicket" supportOctetCountedFraming="on")
input(type="imtcp" address="127.0.0.1" port="{tls_port}" ruleset="wicket")
ruleset(name="wicket") {{
  action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format" flushOnTXEnd="on")
}}
*.* action(type="omfile" file="{internal}")
"""


class Rsyslog:
    """A real rsyslogd on 127.0.0.1: plain TCP (imptcp, octet counting) and TLS (imtcp + gtls, client
    certificate required), writing every message it receives to `out` in RFC 5424 form."""

    def __init__(self, directory: Path, pki: Pki):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "work").mkdir(exist_ok=True)
        self.pki = pki
        self.tcp_port, self.tls_port = free_port(), free_port()
        self.out = self.dir / "received.log"
        self.internal = self.dir / "rsyslogd-internal.log"
        self.conf = self.dir / "rsyslog.conf"
        self.pidfile = self.dir / "rsyslogd.pid"
        self.conf.write_text(_CONF.format(work=self.dir / "work", ca=pki.ca, cert=pki.server_cert, key=pki.server_key,
                                          tcp_port=self.tcp_port, tls_port=self.tls_port, out=self.out,
                                          internal=self.internal))
        self.proc: subprocess.Popen | None = None
        self.stderr = self.dir / "rsyslogd.stderr"

    def __enter__(self) -> Rsyslog:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 15) -> None:
        assert self.proc is None, "already running"
        check = subprocess.run([RSYSLOGD, "-N1", "-f", str(self.conf)], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"rsyslogd refuses the test config:\n{check.stdout}{check.stderr}")
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                         stdout=err, stderr=err, start_new_session=True)
        deadline = time.monotonic() + timeout
        pending = {self.tcp_port, self.tls_port}
        while pending:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"rsyslogd exited with {code}: {self.stderr.read_text()[-2000:]}")
            for port in list(pending):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    pending.discard(port)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"rsyslogd did not listen on {sorted(pending)} within {timeout} s")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Stop rsyslogd by its PID (SIGTERM lets it write what it has queued); SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def lines(self) -> list[str]:
        if not self.out.exists():
            return []
        text = self.out.read_text(encoding="utf-8", errors="surrogateescape")
        return [line for line in text.split("\n") if line]

    def wait_for_lines(self, n: int, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if len(lines) >= n or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        return ctx


# ---- an HTTP event collector ----------------------------------------------------------------------------


class HecCollector:
    """A Splunk-HEC-shaped collector: POST /services/collector/event with `Authorization: Splunk <token>`,
    a body of concatenated JSON envelopes. Keeps every envelope it accepted, in arrival order."""

    def __init__(self, token: str, *, tls: tuple[Path, Path] | None = None, fail_status: int | None = None):
        self.token = token
        self.tls = tls
        self.port = free_port()
        self.received: list[dict] = []
        self.posts = 0
        self.refused = 0
        self.fail_status = fail_status  # answer every POST with this status (a collector that is up but failing)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> HecCollector:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        if self._server is not None:
            return
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()
                with collector._lock:
                    collector._conns.add(self.connection)

            def finish(self):
                with collector._lock:
                    collector._conns.discard(self.connection)
                super().finish()

            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path != "/services/collector/event":
                    return self._answer(404, {"text": "Not found", "code": 404})
                if self.headers.get("Authorization") != f"Splunk {collector.token}":
                    with collector._lock:
                        collector.refused += 1
                    return self._answer(403, {"text": "Invalid token", "code": 4})
                if collector.fail_status:
                    return self._answer(collector.fail_status, {"text": "Server is busy", "code": 9})
                try:
                    envelopes = _concatenated_json(body.decode())
                except ValueError:
                    return self._answer(400, {"text": "Invalid data format", "code": 6})
                with collector._lock:
                    collector.posts += 1
                    collector.received.extend(envelopes)
                self._answer(200, {"text": "Success", "code": 0})

            def _answer(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                        name="hec-collector")
        self._thread.start()

    def down(self) -> None:
        """Stop listening and cut the open (keep-alive) connections: every POST fails until `up`."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.received)


def _concatenated_json(text: str) -> list[dict]:
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        if not isinstance(obj, dict):
            raise ValueError("not an object")
        out.append(obj)


# ---- parsers --------------------------------------------------------------------------------------------

# RFC 5424 §6 ABNF, one named group per header field. PRINTUSASCII is %d33-126.
_PRINT = r"[\x21-\x7e]"
_SD_NAME = r"[\x21\x23-\x3c\x3e-\x5c\x5e-\x7e]{1,32}"  # PRINTUSASCII except '=', SP, ']', '"'
_PARAM_VALUE = r'(?:[^"\\\]]|\\["\\\]])*'
_SD_PARAM = rf'{_SD_NAME}="{_PARAM_VALUE}"'
_SD_ELEMENT = rf"\[{_SD_NAME}(?: {_SD_PARAM})*\]"
RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) "
    r"(?P<timestamp>-|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})) "
    rf"(?P<hostname>-|{_PRINT}{{1,255}}) (?P<app>-|{_PRINT}{{1,48}}) (?P<procid>-|{_PRINT}{{1,128}}) "
    rf"(?P<msgid>-|{_PRINT}{{1,32}}) (?P<sd>-|(?:{_SD_ELEMENT})+)(?: (?P<msg>.*))?$",
    re.DOTALL,
)
_ELEMENT = re.compile(rf"\[(?P<id>{_SD_NAME})(?P<params>(?: {_SD_PARAM})*)\]")
_PARAM = re.compile(rf'(?P<name>{_SD_NAME})="(?P<value>{_PARAM_VALUE})"')


def parse_rfc5424(line: str) -> dict:
    """A syslog message per RFC 5424's grammar; raises ValueError if it does not match. SD values are
    unescaped; a UTF-8 MSG's BOM is removed (and noted as `bom`)."""
    m = RFC5424.match(line)
    if not m:
        raise ValueError(f"not RFC 5424: {line[:200]!r}")
    pri = int(m["pri"])
    if pri > 191:
        raise ValueError(f"PRI {pri} > 191")
    sd: dict[str, dict[str, str]] = {}
    if m["sd"] != "-":
        pos = 0
        for el in _ELEMENT.finditer(m["sd"]):
            if el.start() != pos:
                raise ValueError(f"bad structured data at {pos}: {m['sd'][pos:pos + 50]!r}")
            pos = el.end()
            if el["id"] in sd:
                raise ValueError(f"SD-ID {el['id']} twice")
            sd[el["id"]] = {p["name"]: re.sub(r'\\(["\\\]])', r"\1", p["value"]) for p in _PARAM.finditer(el["params"])}
        if pos != len(m["sd"]):
            raise ValueError("trailing structured data")
    msg = m["msg"]
    bom = msg is not None and msg.startswith("\ufeff")
    return {"pri": pri, "facility": pri // 8, "severity": pri % 8, "version": int(m["version"]),
            "timestamp": m["timestamp"], "hostname": m["hostname"], "app": m["app"], "procid": m["procid"],
            "msgid": m["msgid"], "sd": sd, "msg": msg[1:] if bom else msg, "bom": bom}


def parse_cef(text: str) -> tuple[list[str], dict[str, str]]:
    """A CEF:0 record: the 7 header fields (unescaped) and the extension as key → unescaped value.
    Raises ValueError for a malformed record (wrong header field count, an unknown escape, a stray `=`)."""
    header, i, cur = [], 0, []
    while len(header) < 7:
        if i >= len(text):
            raise ValueError(f"CEF header has {len(header)} fields, not 7")
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in "\\|":
            cur.append(text[i + 1])
            i += 2
            continue
        if c == "|":
            header.append("".join(cur))
            cur = []
        elif c in "\r\n":
            raise ValueError("newline in a CEF header")
        else:
            cur.append(c)
        i += 1
    if not header[0].startswith("CEF:"):
        raise ValueError("does not start with CEF:")
    ext = text[i:]
    # An unescaped '=' ends a key; the key is the word before it.
    eqs, j = [], 0
    while j < len(ext):
        if ext[j] == "\\":
            j += 2
            continue
        if ext[j] == "=":
            eqs.append(j)
        j += 1
    fields: dict[str, str] = {}
    keys = []
    for pos in eqs:
        start = ext.rfind(" ", 0, pos) + 1
        key = ext[start:pos]
        if not re.fullmatch(r"[A-Za-z0-9_.\[\]]+", key):
            raise ValueError(f"bad CEF key {key!r}")
        keys.append((start, pos, key))
    for n, (_start, pos, key) in enumerate(keys):
        end = keys[n + 1][0] - 1 if n + 1 < len(keys) else len(ext)
        raw = ext[pos + 1:end]
        if key in fields:
            raise ValueError(f"CEF key {key} twice")
        fields[key] = _cef_unescape(raw)
    if keys and keys[0][0] != 0:
        raise ValueError(f"text before the first CEF key: {ext[:keys[0][0]]!r}")
    return header, fields


def _cef_unescape(raw: str) -> str:
    out, i = [], 0
    while i < len(raw):
        c = raw[i]
        if c == "\\":
            if i + 1 >= len(raw):
                raise ValueError("dangling backslash in a CEF value")
            nxt = raw[i + 1]
            mapped = {"\\": "\\", "=": "=", "n": "\n", "r": "\r"}.get(nxt)
            if mapped is None:
                raise ValueError(f"unknown CEF escape \\{nxt}")
            out.append(mapped)
            i += 2
            continue
        if c in "\r\n":
            raise ValueError("raw newline in a CEF value")
        out.append(c)
        i += 1
    return "".join(out)


def send_octet_counted(sock: socket.socket, messages: list[str]) -> None:
    """Frame and send raw syslog messages (for probing a receiver without wicket's code)."""
    sock.sendall(b"".join(str(len(m.encode())).encode() + b" " + m.encode() for m in messages))


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
