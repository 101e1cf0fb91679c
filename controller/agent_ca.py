"""The controller's own certificate authority for the agent link.

It signs two kinds of certificate and nothing else:
  agent       CN = node name, URI SAN urn:wicket:agent:<node>, EKU clientAuth, short-lived (renewed over the link)
  controller  URI SAN urn:wicket:controller (plus any host names), EKU serverAuth, made at each start
TLS checks the extended key usage by role, so an agent's certificate can never serve as the controller's.
Agents pin this CA (the SHA-256 of its DER, carried in every join token); the system trust store plays no
part. The CA key is ECDSA P-256, in <data_dir>/keys/agent-ca.key (0600), next to the other controller keys
(replicas share that directory).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
import ssl
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .security.keys import write_private

CONTROLLER_URI = "urn:wicket:controller"
AGENT_URI_PREFIX = "urn:wicket:agent:"
CA_YEARS = 10
SERVER_DAYS = 30


class CsrError(ValueError):
    pass


@dataclass(frozen=True)
class Issued:
    pem: str
    serial: str  # hex
    not_after: datetime


class AgentCA:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.key, self.cert = key, cert

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> AgentCA:
        key_path, cert_path = keys_dir / "agent-ca.key", keys_dir / "agent-ca.pem"
        if not key_path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            now = datetime.now(UTC)
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wicket agent CA"),
                              x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wicket")])
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
                    .not_valid_after(now + timedelta(days=365 * CA_YEARS))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                                 data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                                 crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                    .sign(key, hashes.SHA256()))
            try:
                _write_new(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
            except FileExistsError:
                pass  # another replica made it a moment ago: use theirs
            else:
                _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        if key_path.stat().st_mode & 0o077:
            raise PermissionError(f"{key_path} is readable by others: chmod 600 it")
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return cls(key, cert)

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def pin(self) -> str:
        """SHA-256 (hex) of the CA certificate's DER: what agents pin."""
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def issue_agent(self, csr_pem: str, node: str, ttl: timedelta, now: datetime | None = None) -> Issued:
        """A client certificate for `node` over the CSR's key. The CSR's own subject is ignored."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise CsrError(f"the certificate request is not a PEM CSR: {exc}") from None
        if not csr.is_signature_valid:
            raise CsrError("the certificate request's signature does not verify")
        public = csr.public_key()
        if not (isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"):
            raise CsrError("the agent's TLS key must be ECDSA P-256")
        now = now or datetime.now(UTC)
        not_after = (now + ttl).replace(microsecond=0)
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node),
                                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wicket agents")]))
                .issuer_name(self.cert.subject).public_key(public).serial_number(serial)
                .not_valid_before(now - timedelta(minutes=5)).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(AGENT_URI_PREFIX + node)]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), format(serial, "x"), not_after)

    def server_context(self, names: list[str], work_dir: Path) -> ssl.SSLContext:
        """The link listener's TLS context: a fresh controller certificate; client certificates optional at
        the TLS layer (enrolment comes without one) and required by the link for everything else."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cadata=self.pem)
        self.load_server_cert(ctx, names, work_dir)
        return ctx

    def load_server_cert(self, ctx: ssl.SSLContext, names: list[str], work_dir: Path) -> datetime:
        """Put a fresh controller certificate into `ctx` (new handshakes use it); its end."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(CONTROLLER_URI)]
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wicket controller")]))
                .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=SERVER_DAYS))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        # load_cert_chain reads files only: a private temporary pair, removed at once
        work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=work_dir, prefix=".link-", suffix=".pem")
        try:
            os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
            os.close(fd)
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)
        return cert.not_valid_after_utc


def peer_node(der: bytes | None) -> tuple[str, str, datetime] | None:
    """(node, serial hex, not_after) of a verified agent certificate, or None when there is none."""
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(AGENT_URI_PREFIX)]
    if len(uris) != 1:
        return None
    return uris[0][len(AGENT_URI_PREFIX):], format(cert.serial_number, "x"), cert.not_valid_after_utc


def new_token_parts() -> tuple[str, str]:
    """(id, secret) of a join token: 12 lower-case alphanumerics, 32 bytes of URL-safe randomness."""
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    return "".join(secrets.choice(alphabet) for _ in range(12)), secrets.token_urlsafe(32)


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, data)
