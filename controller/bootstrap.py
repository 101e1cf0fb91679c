"""`wicket-controller init`: database, keys and the first administrator, once."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from .auth import Auth, Principal
from .db import make_engine, migrate, session_factory
from .models import AccountKind, User, now
from .security import keys as controller_keys
from .security.passwords import check_strength
from .settings import Settings, SettingsError
from .users import USERNAME_RE, Enrolment, Users

INIT_ACTOR = Principal(user_id=0, username="wicket-controller init", kind="internal", roles=(("admin", None),),
                       token_hash="", token_kind="init", expires_at=now())


@dataclass(frozen=True)
class InitResult:
    admin: str
    password: str | None  # only when generated
    enrolment: Enrolment
    public_signing_key: str


def init(settings: Settings, admin: str, display_name: str, password: str | None = None) -> InitResult:
    # Check what could fail before anything is written: a half-done init would block the next one.
    if not USERNAME_RE.match(admin):
        raise SettingsError(f"--admin {admin!r}: lower-case letters, digits, '.', '_' or '-', starting with a letter")
    if password is not None:
        try:
            check_strength(password)
        except ValueError as exc:
            raise SettingsError(f"admin password: {exc}") from None
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    migrate(engine)
    _private_database_file(settings.database_url)
    factory = session_factory(engine)
    with factory() as s:
        if s.scalar(select(func.count()).select_from(User)):
            raise SettingsError("this controller already has users: init runs once (use `wicket` to add more)")
    keys = controller_keys.create(settings.keys_dir)
    auth = Auth(settings, keys, factory)
    users = Users(auth)
    generated = None
    if password is None:
        generated = password = secrets.token_urlsafe(18)
    user = users.create(INIT_ACTOR, username=admin, display_name=display_name, password=password,
                        kind=AccountKind.internal.value, roles=[("admin", None)], source="local")
    enrolment = users.enrol_totp(None, user.id, source="local")
    return InitResult(admin=admin, password=generated, enrolment=enrolment, public_signing_key=keys.public_signing_key())


def _private_database_file(url: str) -> None:
    """An SQLite database holds password hashes and sealed TOTP secrets: owner only."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if p.exists():
                os.chmod(p, 0o600)


def migrate_only(settings: Settings) -> None:
    migrate(make_engine(settings.database_url))
