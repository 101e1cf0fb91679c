"""Account administration: create, roles, disable / enable / delete, TOTP enrolment, passwords,
recovery codes. Every change is an account event in the same transaction as the change."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import events
from .auth import Auth, Principal
from .db import transaction
from .errors import Conflict, Invalid, NotFound
from .models import AccountKind, ApiToken, RecoveryCode, Role, RoleGrant, Site, User
from .schemas import UserPublic, user_public
from .security import totp
from .security.passwords import check_strength

USERNAME_RE = re.compile(r"^[a-z][a-z0-9._-]{1,63}$")
SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_CONTRACTOR_DAYS = 366


@dataclass(frozen=True)
class Enrolment:
    username: str
    otpauth_uri: str
    qr_svg: str
    qr_text: str


class Users:
    def __init__(self, auth: Auth):
        self.auth = auth
        self.factory = auth.factory

    # ---- reading ----

    def list(self) -> list[UserPublic]:
        with self.factory() as s:
            return [user_public(u) for u in s.scalars(select(User).order_by(User.username))]

    def get(self, user_id: int) -> UserPublic:
        with self.factory() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"no user {user_id}")
            return user_public(user)


    # ---- changes ----

    def create(self, actor: Principal, *, username: str, display_name: str, password: str, kind: str = "internal",
               email: str | None = None, sponsor: str | None = None, valid_from: datetime | None = None,
               valid_until: datetime | None = None, roles: list[tuple[str, str | None]] | None = None,
               source: str | None = None) -> User:
        if not USERNAME_RE.match(username):
            raise Invalid("username: lower-case letters, digits, '.', '_' or '-', starting with a letter, 2–64 characters")
        if kind not in (k.value for k in AccountKind):
            raise Invalid("kind: internal or contractor")
        _strong(password)
        now = self.auth.now()
        with transaction(self.factory) as s:
            sponsor_user = None
            if kind == AccountKind.contractor.value:
                if not sponsor or valid_until is None:
                    raise Invalid("a contractor needs a sponsor (an internal user) and valid_until")
                sponsor_user = s.scalar(select(User).where(User.username == sponsor, User.deleted_at.is_(None)))
                if sponsor_user is None or sponsor_user.kind != AccountKind.internal.value or sponsor_user.disabled:
                    raise Invalid(f"sponsor {sponsor!r} is not an active internal user")
                start = valid_from or now
                if valid_until <= now:
                    raise Invalid("valid_until must be in the future")
                if valid_until <= start:
                    raise Invalid("valid_until must be after valid_from")
                if valid_until - start > timedelta(days=MAX_CONTRACTOR_DAYS):
                    raise Invalid(f"a contractor account lasts at most {MAX_CONTRACTOR_DAYS} days")
            elif sponsor or valid_until or valid_from:
                raise Invalid("only contractor accounts have a sponsor and a validity window")
            user = User(username=username, display_name=display_name[:128], email=email, kind=kind,
                        sponsor_id=sponsor_user.id if sponsor_user else None, valid_from=valid_from,
                        valid_until=valid_until, password_hash=self.auth.passwords.hash(password),
                        created_at=now, updated_at=now)
            s.add(user)
            try:
                s.flush()
            except IntegrityError:
                raise Conflict(f"user {username} exists (user names are never reused)") from None
            self._set_roles(s, actor, user, roles or [], now)
            events.record(s, at=now, category="account", type="user_created", result="success", actor_id=actor.user_id,
                          actor=actor.username, subject=username, source=source, kind=kind,
                          sponsor=sponsor, valid_until=valid_until.isoformat() if valid_until else None,
                          roles=[f"{r}@{site or '*'}" for r, site in (roles or [])])
            return user

    def set_roles(self, actor: Principal, user_id: int, roles: list[tuple[str, str | None]], source: str | None = None) -> User:
        now = self.auth.now()
        with transaction(self.factory) as s:
            user = self._live(s, user_id)
            before = sorted(f"{g.role}@{g.site or '*'}" for g in user.grants)
            self._set_roles(s, actor, user, roles, now)
            after = sorted(f"{r}@{site or '*'}" for r, site in roles)
            events.record(s, at=now, category="account", type="roles_changed", result="success", actor_id=actor.user_id,
                          actor=actor.username, subject=user.username, source=source, before=before, after=after)
            return user

    def set_disabled(self, actor: Principal, user_id: int, disabled: bool, source: str | None = None) -> User:
        now = self.auth.now()
        with transaction(self.factory) as s:
            user = self._live(s, user_id)
            if disabled and user.id == actor.user_id:
                raise Conflict("you cannot disable your own account")
            if disabled and any(g.role == Role.admin.value for g in user.grants):
                self._keep_an_admin(s, user)
            user.disabled, user.updated_at = disabled, now
            if disabled:
                self._revoke_tokens(s, user.id, now)
            events.record(s, at=now, category="account", type="user_disabled" if disabled else "user_enabled", result="success",
                          actor_id=actor.user_id, actor=actor.username, subject=user.username, source=source)
            return user

    def delete(self, actor: Principal, user_id: int, source: str | None = None) -> None:
        """The person's secrets go; the row stays (events name it) and the user name is never reused."""
        now = self.auth.now()
        with transaction(self.factory) as s:
            user = self._live(s, user_id)
            if user.id == actor.user_id:
                raise Conflict("you cannot delete your own account")
            if any(g.role == Role.admin.value for g in user.grants):
                self._keep_an_admin(s, user)
            user.deleted_at, user.disabled, user.updated_at = now, True, now
            user.password_hash, user.totp_secret, user.totp_confirmed, user.email = None, None, False, None
            user.grants.clear()
            s.execute(update(RecoveryCode).where(RecoveryCode.user_id == user.id, RecoveryCode.used_at.is_(None)).values(used_at=now))
            self._revoke_tokens(s, user.id, now)
            events.record(s, at=now, category="account", type="user_deleted", result="success", actor_id=actor.user_id,
                          actor=actor.username, subject=user.username, source=source)

    def enrol_totp(self, actor: Principal | None, user_id: int, source: str | None = None) -> Enrolment:
        """A new TOTP secret, shown once; the first login with a code from it confirms it."""
        now = self.auth.now()
        with transaction(self.factory) as s:
            user = self._live(s, user_id)
            secret = totp.new_secret()
            user.totp_secret = self.auth.keys.seal(secret, f"totp:{user.id}")
            user.totp_confirmed, user.updated_at = False, now
            events.record(s, at=now, category="account", type="totp_enrolled", result="success",
                          actor_id=actor.user_id if actor else None, actor=actor.username if actor else "wicket-controller init",
                          subject=user.username, source=source)
            uri = totp.provisioning_uri(secret, user.username, self.auth.settings.totp_issuer)
            return Enrolment(username=user.username, otpauth_uri=uri, qr_svg=totp.qr_svg(uri), qr_text=totp.qr_text(uri))

    def set_password(self, actor: Principal, user_id: int, password: str, source: str | None = None) -> None:
        _strong(password)
        now = self.auth.now()
        with transaction(self.factory) as s:
            user = self._live(s, user_id)
            user.password_hash, user.updated_at = self.auth.passwords.hash(password), now
            # A new password ends the account's other logins (the caller's own one stays, if it is theirs).
            q = update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
            if user.id == actor.user_id:
                q = q.where(ApiToken.token_hash != actor.token_hash)
            s.execute(q.values(revoked_at=now))
            events.record(s, at=now, category="account", type="password_changed", result="success", actor_id=actor.user_id,
                          actor=actor.username, subject=user.username, source=source)

    def new_recovery_codes(self, actor: Principal, source: str | None = None) -> list[str]:
        """Ten fresh single-use codes for the caller; the old ones stop working. Shown once."""
        now = self.auth.now()
        codes = totp.new_recovery_codes()
        with transaction(self.factory) as s:
            user = self._live(s, actor.user_id)
            s.execute(update(RecoveryCode).where(RecoveryCode.user_id == user.id, RecoveryCode.used_at.is_(None)).values(used_at=now))
            for code in codes:
                s.add(RecoveryCode(user_id=user.id, code_hash=totp.hash_recovery_code(code)))
            events.record(s, at=now, category="account", type="recovery_codes_issued", result="success", actor_id=actor.user_id,
                          actor=actor.username, subject=user.username, source=source, count=len(codes))
        return codes

    # ---- helpers ----

    def _live(self, s: Session, user_id: int) -> User:
        user = s.get(User, user_id, with_for_update=True)
        if user is None or user.deleted_at is not None:
            raise NotFound(f"no user {user_id}")
        return user

    def _keep_an_admin(self, s: Session, losing: User) -> None:
        """Refuse a change that would leave no active administrator."""
        others = s.scalar(
            select(func.count()).select_from(RoleGrant).join(User, RoleGrant.user_id == User.id).where(
                RoleGrant.role == Role.admin.value, User.id != losing.id, User.disabled.is_(False), User.deleted_at.is_(None)
            )
        )
        if not others:
            raise Conflict("this would leave no active administrator")

    def _set_roles(self, s: Session, actor: Principal, user: User, roles, now) -> None:
        seen = set()
        for role, site in roles:
            if role not in (r.value for r in Role):
                raise Invalid(f"unknown role {role!r}: one of {', '.join(r.value for r in Role)}")
            if site is not None and not SITE_RE.match(site):
                raise Invalid(f"site {site!r}: letters, digits, '.', '_' or '-'")
            if site is not None and s.scalar(select(Site.id).where(Site.name == site)) is None:
                raise Invalid(f"there is no site {site!r}: create it first (wicket sites add)")
            if (role == Role.contractor.value) != (user.kind == AccountKind.contractor.value):
                raise Invalid("contractor accounts hold exactly the contractor role, and only they do")
            if role in (Role.admin.value, Role.soc.value) and site is not None:
                raise Invalid(f"{role} is not scoped to a site")
            if (role, site) in seen:
                raise Invalid(f"{role}@{site or '*'} listed twice")
            seen.add((role, site))
        if any(g.role == Role.admin.value for g in user.grants) and (Role.admin.value, None) not in seen:
            self._keep_an_admin(s, user)
        user.grants.clear()
        s.flush()
        for role, site in sorted(seen, key=lambda x: (x[0], x[1] or "")):
            user.grants.append(RoleGrant(role=role, site=site, granted_by=actor.user_id if actor.user_id else None, granted_at=now))
        user.updated_at = now

    def _revoke_tokens(self, s: Session, user_id: int, now: datetime) -> None:
        s.execute(update(ApiToken).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None)).values(revoked_at=now))


def _strong(password: str) -> None:
    try:
        check_strength(password)
    except ValueError as exc:
        raise Invalid(f"password: {exc}") from None
