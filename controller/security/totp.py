"""TOTP (RFC 6238, pyotp): 30-s steps, one step either side accepted, each step usable once per user.

"Once" is enforced by the database (`used_totp` primary key), so two requests racing with the same code
cannot both win. Recovery codes: ten single-use codes, stored as SHA-256 (they are random, 50 bits each).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets

import pyotp
import qrcode
import qrcode.image.svg

STEP_S = 30
WINDOW = 1  # steps accepted either side of now (RFC 6238 §5.2)
RECOVERY_CODES = 10


def new_secret() -> str:
    return pyotp.random_base32()


def provisioning_uri(secret: str, username: str, issuer: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=username, issuer_name=issuer)


def qr_svg(uri: str) -> str:
    buf = io.BytesIO()
    qrcode.make(uri, image_factory=qrcode.image.svg.SvgPathImage).save(buf)
    return buf.getvalue().decode()


def qr_text(uri: str) -> str:
    qr = qrcode.QRCode(border=1)
    qr.add_data(uri)
    out = io.StringIO()
    qr.print_ascii(out=out, invert=True)
    return out.getvalue()


def matching_step(secret: str, code: str, at: float) -> int | None:
    """The time step whose code this is, within the window; None if none matches."""
    if not (code.isdigit() and len(code) == 6):
        return None
    totp = pyotp.TOTP(secret)
    now_step = int(at // STEP_S)
    found = None
    for step in range(now_step - WINDOW, now_step + WINDOW + 1):
        # compare every candidate, in constant time, so timing does not tell which step matched
        if hmac.compare_digest(totp.at(step * STEP_S), code):
            found = step
    return found


def new_recovery_codes() -> list[str]:
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"
    return ["-".join("".join(secrets.choice(alphabet) for _ in range(5)) for _ in range(2)) for _ in range(RECOVERY_CODES)]


def hash_recovery_code(code: str) -> str:
    return hashlib.sha256(code.strip().lower().encode()).hexdigest()
