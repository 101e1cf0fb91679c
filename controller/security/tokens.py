"""Login tokens: 256 random bits, handed out once; the database keeps only their SHA-256."""

from __future__ import annotations

import hashlib
import secrets

PREFIX = "wkt_"


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(value: str) -> bool:
    return value.startswith(PREFIX) and 20 < len(value) < 100
