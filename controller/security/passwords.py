"""Passwords: argon2id, never weaker than m=19 MiB, t=2, p=1; rehashed at login when parameters rise.

Unknown users are checked against a dummy hash so a login takes as long whether or not the name exists.
"""

from __future__ import annotations

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from ..settings import Argon2Params

MIN_LENGTH = 12
MAX_LENGTH = 1024


class Passwords:
    def __init__(self, params: Argon2Params):
        self.hasher = PasswordHasher(
            time_cost=params.time_cost, memory_cost=params.memory_cost, parallelism=params.parallelism, type=Type.ID
        )
        self._dummy = self.hasher.hash("wicket dummy password for unknown users")

    def hash(self, password: str) -> str:
        check_strength(password)
        return self.hasher.hash(password)

    def verify(self, stored: str | None, password: str) -> bool:
        """Constant-effort check; a missing hash (unknown user, no password) costs the same and fails."""
        try:
            ok = self.hasher.verify(stored or self._dummy, password[:MAX_LENGTH])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return ok and stored is not None

    def needs_rehash(self, stored: str) -> bool:
        return self.hasher.check_needs_rehash(stored)


def check_strength(password: str) -> None:
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise ValueError(f"a password has {MIN_LENGTH} to {MAX_LENGTH} characters")
    if len(set(password)) < 5:
        raise ValueError("a password needs more than a few different characters")
