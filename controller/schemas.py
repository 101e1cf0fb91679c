"""What the API takes and returns. Stored rows (`models`) never go on the wire directly."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

DB_INT_MAX = 2**31 - 1  # ids and sequence numbers: the largest a 32-bit INTEGER column holds (PostgreSQL)
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC)


def _in_range(value: datetime) -> datetime:
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        raise ValueError("has no UTC equivalent") from None
    if not EARLIEST <= utc < LATEST:
        raise ValueError("must be between 1970 and 9999")
    return utc


UtcTime = Annotated[AwareDatetime, AfterValidator(_in_range)]
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"  # no NUL or other control characters, in any text we take


def _no_control(value):
    """Walk an input value: text that carries control characters (NUL above all) is refused."""
    if isinstance(value, str):
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("text must not contain control characters")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_control(k)
            _no_control(v)
    elif isinstance(value, list | tuple):
        for v in value:
            _no_control(v)
    return value


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _printable(cls, data):
        return _no_control(data)


class LoginIn(_In):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)
    totp_code: str | None = Field(default=None, pattern=r"^[0-9]{6}$")
    recovery_code: str | None = Field(default=None, min_length=8, max_length=32)
    mode: Literal["token", "cookie"] = "token"


class LoginOut(BaseModel):
    token: str | None = Field(description="present in token mode; in cookie mode the cookie carries it")
    expires_at: datetime
    idle_expires_at: datetime
    username: str
    roles: list[str]


class RoleGrantIO(_In):
    role: Literal["engineer", "contractor", "approver", "site_admin", "soc", "admin", "break_glass"]
    site: str | None = Field(default=None, max_length=64, description="None: every site")


class WhoAmI(BaseModel):
    username: str
    kind: str
    roles: list[RoleGrantIO]
    token_kind: str
    expires_at: datetime


class UserCreate(_In):
    username: str = Field(min_length=2, max_length=64)
    display_name: str = Field(min_length=1, max_length=128)
    email: str | None = Field(default=None, max_length=254)
    password: str = Field(min_length=12, max_length=1024)
    kind: Literal["internal", "contractor"] = "internal"
    sponsor: str | None = Field(default=None, max_length=64)
    valid_from: UtcTime | None = None
    valid_until: UtcTime | None = None
    roles: list[RoleGrantIO] = Field(default_factory=list, max_length=32)


class UserPublic(BaseModel):
    id: int
    username: str
    display_name: str
    email: str | None
    kind: str
    sponsor: str | None
    valid_from: datetime | None
    valid_until: datetime | None
    disabled: bool
    deleted: bool
    totp: Literal["none", "pending", "active"]
    roles: list[RoleGrantIO]
    created_at: datetime


class RolesIn(_In):
    roles: list[RoleGrantIO] = Field(max_length=32)


class PasswordIn(_In):
    password: str = Field(min_length=12, max_length=1024)


class OwnPasswordIn(_In):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=12, max_length=1024)


class EnrolmentOut(BaseModel):
    username: str
    otpauth_uri: str = Field(description="shown once: give it to the person, e.g. as the QR code")
    qr_svg: str


class RecoveryCodesOut(BaseModel):
    codes: list[str] = Field(description="shown once; each works once")


class EventPublic(BaseModel):
    """One audit record. `line` is the exact text that was hashed: verify from it, not from these fields."""

    seq: int
    at: datetime
    clock: str
    category: str
    type: str
    result: str
    actor: str | None
    subject: str | None
    source: str | None
    reason: str | None
    session: str | None
    device: str | None
    body: dict
    hash: str
    prev_hash: str
    line: str


class ErrorOut(BaseModel):
    error: str
    detail: str


def user_public(user) -> UserPublic:
    return UserPublic(
        id=user.id,
        username=user.username,
        display_name=user.display_name,
        email=user.email,
        kind=user.kind,
        sponsor=user.sponsor.username if user.sponsor else None,
        valid_from=user.valid_from,
        valid_until=user.valid_until,
        disabled=user.disabled,
        deleted=user.deleted_at is not None,
        totp="none" if not user.totp_secret else ("active" if user.totp_confirmed else "pending"),
        roles=[RoleGrantIO(role=g.role, site=g.site) for g in sorted(user.grants, key=lambda g: (g.role, g.site or ""))],
        created_at=user.created_at,
    )
