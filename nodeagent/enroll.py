"""Enrolment: `wicket-agent enroll --controller HOST:PORT --token wkj1…`, and the files it leaves.

The agent makes its keys on the router and they never leave it: an ECDSA P-256 key for its TLS client
certificate and an Ed25519 key that signs its evidence. Before it sends the token's secret it checks
that the controller's CA matches the pin inside the token and that the server it reached holds a
controller certificate from that CA. Everything is stored under <state_dir>/link/ (0700; files 0600):

  controller.json   where the controller is, this node's name and site, the controller's signing key
  ca.pem            the pinned controller CA
  tls.key, tls.pem  the client key and its current certificate (renewed over the link)
  evidence.key      the Ed25519 evidence-signing key
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import __version__
from .errors import AgentError
from .wire import (
    EnrollBegin,
    EnrollCA,
    Enrolled,
    EnrollRequest,
    Goodbye,
    decode_frame,
    encode_frame,
    frame_length,
    parse_token,
)

CONTROLLER_URI = "urn:wicket:controller"
DEFAULT_PORT = 7443


class EnrolError(AgentError):
    pass


@dataclass(frozen=True)
class LinkFiles:
    root: Path

    @classmethod
    def of(cls, state_dir: str | os.PathLike) -> LinkFiles:
        return cls(Path(state_dir) / "link")

    @property
    def enrolled(self) -> bool:
        return (self.root / "controller.json").exists() and (self.root / "tls.pem").exists()

    def controller(self) -> dict:
        return json.loads((self.root / "controller.json").read_text())

    def path(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, data: bytes | str) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data.encode() if isinstance(data, str) else data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.root / name)

    def replace(self, src: str, dst: str) -> None:
        os.replace(self.root / src, self.root / dst)

    def evidence_key(self) -> Ed25519PrivateKey:
        return serialization.load_pem_private_key((self.root / "evidence.key").read_bytes(), password=None)

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.root / "tls.pem").read_bytes())


def parse_controller(text: str) -> tuple[str, int]:
    """"tls://host:port", "host:port" or "host" → (host, port)."""
    rest = text.strip()
    for scheme in ("tls://", "wicket://"):
        if rest.startswith(scheme):
            rest = rest[len(scheme):]
    rest = rest.rstrip("/")
    if "://" in rest or "/" in rest or not rest:
        raise EnrolError(f"--controller {text!r}: write HOST:PORT (the controller's agent link, default port {DEFAULT_PORT})")
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    elif rest.count(":") > 1:
        raise EnrolError(f"--controller {text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            host, port = rest, ""
    if not host:
        raise EnrolError(f"--controller {text!r}: the host is missing")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise EnrolError(f"--controller {text!r}: the port must be a number") from None
    if not 1 <= number <= 65535:
        raise EnrolError(f"--controller {text!r}: port out of range")
    return host, number


def new_tls_key() -> tuple[bytes, str]:
    """(private key PEM, CSR PEM) for a fresh ECDSA P-256 key."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wicket agent")]))
           .sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def check_controller_cert(der: bytes | None, ca: x509.Certificate) -> None:
    """The server presented a controller certificate issued by `ca`."""
    if not der:
        raise EnrolError("the controller presented no certificate")
    leaf = x509.load_der_x509_certificate(der)
    try:
        leaf.verify_directly_issued_by(ca)
    except Exception:  # noqa: BLE001 - any failure means the same thing here
        raise EnrolError("the server's certificate was not issued by the pinned controller CA: refusing to send the token") from None
    try:
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        ekus = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise EnrolError("the server's certificate is not a wicket controller certificate") from None
    if CONTROLLER_URI not in uris or ExtendedKeyUsageOID.SERVER_AUTH not in ekus:
        raise EnrolError("the server's certificate is not a wicket controller certificate")
    now = datetime.now(UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise EnrolError("the controller's certificate is outside its validity (is this router's clock right?)")


def enroll(state_dir: str, controller: str, token: str, node_id: str, *, force: bool = False, timeout: float = 30) -> Enrolled:
    files = LinkFiles.of(state_dir)
    if files.enrolled and not force:
        info = files.controller()
        raise EnrolError(f"this agent is already enrolled as {info['node_id']} with {info['host']}:{info['port']}; "
                         "use --force to enrol again (a site admin revokes the old enrolment)")
    try:
        _ident, _secret, pin = parse_token(token)
    except ValueError as exc:
        raise EnrolError(f"--token: {exc}") from None
    host, port = parse_controller(controller)
    tls_key, csr = new_tls_key()
    evidence = Ed25519PrivateKey.generate()
    evidence_pub = base64.b64encode(evidence.public_key().public_bytes(serialization.Encoding.Raw,
                                                                       serialization.PublicFormat.Raw)).decode()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nothing is trusted yet: the CA pin below decides, before any secret is sent
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, ctx.wrap_socket(raw) as s:
            _send(s, EnrollBegin())
            got = _recv(s)
            if isinstance(got, Goodbye):
                raise EnrolError(f"the controller refused: {got.reason}")
            if not isinstance(got, EnrollCA):
                raise EnrolError(f"unexpected answer {got.kind} from the controller")
            ca = x509.load_pem_x509_certificate(got.ca_pem.encode())
            if hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest() != pin:
                raise EnrolError("the controller's CA does not match the pin in the join token: refusing to send the token "
                                 "(wrong controller address, or someone in between)")
            check_controller_cert(s.getpeercert(binary_form=True), ca)
            _send(s, EnrollRequest(token=token, node_id=node_id, csr_pem=csr, evidence_public_key=evidence_pub,
                                   agent_version=__version__))
            done = _recv(s)
    except (OSError, ssl.SSLError) as exc:
        raise EnrolError(f"cannot reach the controller's agent link at {host}:{port}: {exc}") from None
    if isinstance(done, Goodbye):
        raise EnrolError(done.reason)
    if not isinstance(done, Enrolled):
        raise EnrolError(f"unexpected answer {done.kind} from the controller")
    files.write("ca.pem", got.ca_pem)
    files.write("tls.key", tls_key)
    files.write("tls.pem", done.certificate_pem)
    files.write("evidence.key", evidence.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    files.write("controller.json", json.dumps({
        "host": host, "port": port, "node_id": done.node_id, "site": done.site,
        "enrolled_at": datetime.now(UTC).isoformat(), "controller_signing_key": done.controller_signing_key,
        "ca_pin": pin}, indent=1))
    return done


def _send(s, msg) -> None:
    s.sendall(encode_frame(msg))


def _recv(s):
    n = frame_length(_exactly(s, 4))
    return decode_frame(_exactly(s, n))


def _exactly(s, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the controller closed the connection")
        buf += chunk
    return buf
