"""Sealed hand-over of the lab's secrets between VMs: the controller VM seals, the others fetch and open.

The Vagrantfile makes one random lab secret on the host (vagrant/.lab-secret, never synced into the VMs)
and gives it to every VM's provisioning as WICKET_LAB_SECRET. The controller VM seals what another VM needs
(the router's join token, the engineer's login) and its nginx serves the sealed files over plain HTTP on
the operations segment. Fernet (AES-128-CBC with HMAC-SHA256) keeps them secret and shows any change, so
the transport needs no trust of its own. A person would carry these by hand; this is lab plumbing only.

  python -m vagrant.handoff seal NAME [--dir D] < PLAIN      write D/NAME.sealed (the controller VM)
  python -m vagrant.handoff fetch URL [-o FILE] [--wait S]   fetch, open, write FILE (0600) or stdout
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

HANDOFF_DIR = Path("/var/lib/wicket-lab/handoff")
SECRET_ENV = "WICKET_LAB_SECRET"
SECRET_FILE = Path("/etc/wicket-lab/secret")  # provision/common.sh keeps the secret here (0600) for later runs
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{0,63}$")
MIN_SECRET_CHARS = 32


class HandoffError(Exception):
    pass


def seal(secret: str, plain: bytes) -> bytes:
    return _fernet(secret).encrypt(plain)


def unseal(secret: str, sealed: bytes) -> bytes:
    try:
        return _fernet(secret).decrypt(sealed.strip())
    except InvalidToken:
        raise HandoffError("it does not open with this lab's secret: was the controller VM provisioned from "
                           "another vagrant/.lab-secret (then `vagrant provision ctl`), or was it changed?") from None


def write_sealed(secret: str, name: str, plain: bytes, directory: Path = HANDOFF_DIR) -> Path:
    if not NAME_RE.match(name):
        raise HandoffError(f"{name!r}: a hand-over name is [a-z0-9.-], up to 64 characters")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.sealed"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(seal(secret, plain))
    tmp.chmod(0o644)  # sealed: the web server may read it
    tmp.replace(path)
    return path


def fetch(secret: str, url: str, wait_s: float, interval_s: float = 5.0, say=None) -> bytes:
    """The opened content of URL, retried until it is there (the controller VM may still be provisioning)."""
    deadline = time.monotonic() + wait_s
    last_said = None
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as res:  # noqa: S310 - the lab's own http URL
                return unseal(secret, res.read())
        except (urllib.error.URLError, OSError) as exc:
            why = f"{getattr(exc, 'code', '') or ''} {getattr(exc, 'reason', exc)}".strip()
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandoffError(f"{url} did not answer within {wait_s:.0f} s (last: {why}); is the controller VM up "
                               "and provisioned (`vagrant status`, `vagrant provision ctl`)?")
        if say and (last_said is None or last_said - left >= 60):
            say(f"waiting for {url} ({why}); {left:.0f} s left")
            last_said = left
        time.sleep(min(interval_s, max(left, 0.1)))


def lab_secret(env=None, secret_file: Path = SECRET_FILE) -> str:
    """$WICKET_LAB_SECRET (set by the Vagrantfile for provisioning), else the copy in SECRET_FILE."""
    value = (os.environ if env is None else env).get(SECRET_ENV, "").strip()
    if not value and secret_file.exists():
        value = secret_file.read_text().strip()
    if len(value) < MIN_SECRET_CHARS:
        raise HandoffError(f"{SECRET_ENV} is missing or shorter than {MIN_SECRET_CHARS} characters, and so is "
                           f"{secret_file} (the Vagrantfile passes it from vagrant/.lab-secret)")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vagrant.handoff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("seal", help="seal stdin as NAME")
    s.add_argument("name")
    s.add_argument("--dir", type=Path, default=HANDOFF_DIR)
    f = sub.add_parser("fetch", help="fetch and open a sealed URL")
    f.add_argument("url")
    f.add_argument("-o", "--output", type=Path, help="write here (0600) instead of stdout")
    f.add_argument("--wait", type=float, default=1800, metavar="SECONDS", help="keep trying this long (default 1800)")
    args = p.parse_args(argv)
    try:
        secret = lab_secret()
        if args.cmd == "seal":
            path = write_sealed(secret, args.name, sys.stdin.buffer.read(), args.dir)
            print(f"sealed {path}")
            return 0
        plain = fetch(secret, args.url, args.wait, say=lambda line: print(f"handoff: {line}", file=sys.stderr, flush=True))
    except HandoffError as exc:
        print(f"handoff: {exc}", file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.buffer.write(plain)
        return 0
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(plain)
    os.chmod(args.output, 0o600)
    return 0


def _fernet(secret: str) -> Fernet:
    # One key per lab secret, bound to this use so the same secret could key something else safely.
    digest = hashlib.sha256(b"wicket-lab-handoff\0" + secret.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


if __name__ == "__main__":
    sys.exit(main())
