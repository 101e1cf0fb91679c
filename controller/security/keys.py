"""The controller's own keys, made once by `wicket-controller init` (files 0600 in <data_dir>/keys):

  signing.key   Ed25519: signs what the controller vouches for (passports, audit checkpoints — later)
  secrets.key   32 bytes, AES-256-GCM: encrypts TOTP secrets at rest in the database
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from ..settings import SettingsError


@dataclass(frozen=True)
class ControllerKeys:
    signing: Ed25519PrivateKey
    secrets_key: bytes

    def public_signing_key(self) -> str:
        raw = self.signing.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def seal(self, plaintext: str, context: str) -> str:
        """Encrypt a secret for the database; `context` (e.g. "totp:42") binds it to its row."""
        nonce = os.urandom(12)
        sealed = AESGCM(self.secrets_key).encrypt(nonce, plaintext.encode(), context.encode())
        return "v1:" + base64.b64encode(nonce + sealed).decode()

    def open(self, sealed: str, context: str) -> str:
        if not sealed.startswith("v1:"):
            raise ValueError("unknown sealed-secret format")
        raw = base64.b64decode(sealed[3:])
        return AESGCM(self.secrets_key).decrypt(raw[:12], raw[12:], context.encode()).decode()


def create(keys_dir: Path) -> ControllerKeys:
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    signing_path, secrets_path = keys_dir / "signing.key", keys_dir / "secrets.key"
    if signing_path.exists() or secrets_path.exists():
        raise SettingsError(f"keys already exist in {keys_dir}: refusing to overwrite them")
    signing = Ed25519PrivateKey.generate()
    write_private(signing_path, signing.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    write_private(secrets_path, base64.b64encode(os.urandom(32)) + b"\n")
    return load(keys_dir)


def load(keys_dir: Path) -> ControllerKeys:
    signing_path, secrets_path = keys_dir / "signing.key", keys_dir / "secrets.key"
    for p in (signing_path, secrets_path):
        if not p.exists():
            raise SettingsError(f"{p} is missing: run `wicket-controller init` first")
        if p.stat().st_mode & 0o077:
            raise SettingsError(f"{p} is readable by others: chmod 600 it")
    signing = load_pem_private_key(signing_path.read_bytes(), password=None)
    if not isinstance(signing, Ed25519PrivateKey):
        raise SettingsError(f"{signing_path} is not an Ed25519 key")
    secret = base64.b64decode(secrets_path.read_bytes().strip())
    if len(secret) != 32:
        raise SettingsError(f"{secrets_path} must hold 32 bytes (base64)")
    return ControllerKeys(signing=signing, secrets_key=secret)


def write_private(path: Path, data: bytes) -> None:
    """Create a new key file, owner-only and synced; refuses to overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
