"""Who is calling: login (password + TOTP or a recovery code), token checks, logout, step-up.

Order of a login, chosen so that nothing leaks: throttle check; password and second factor both checked
(an unknown user costs the same: dummy hash, dummy secret); only when both are right does the caller
learn why an account may not log in (disabled, expired). The accepted TOTP step is recorded in the same
transaction as the new token: if two requests race with one code, the database lets exactly one commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from . import events
from .db import transaction
from .errors import AccountUnusable, NotAuthenticated, StepUpRequired, Throttled
from .models import AccountKind, ApiToken, RecoveryCode, UsedTotp, User
from .security import throttle, totp
from .security.keys import ControllerKeys
from .security.passwords import Passwords
from .security.tokens import new_token, token_hash
from .settings import Settings

_DUMMY_SECRET = totp.new_secret()


@dataclass(frozen=True)
class Principal:
    user_id: int
    username: str
    kind: str
    roles: tuple[tuple[str, str | None], ...]  # (role, site or None for every site)
    token_hash: str
    token_kind: str
    expires_at: datetime

    def has_any(self, *roles: str) -> bool:
        return any(r in roles for r, _s in self.roles)

    def can(self, site: str, *roles: str) -> bool:
        """Holds one of `roles` for `site` (a grant for every site counts)."""
        return any(r in roles and (s is None or s == site) for r, s in self.roles)

    def sites(self, *roles: str) -> set[str] | None:
        """The sites where the caller holds one of `roles`; None means every site."""
        out: set[str] = set()
        for r, s in self.roles:
            if r in roles:
                if s is None:
                    return None
                out.add(s)
        return out


@dataclass(frozen=True)
class LoginResult:
    token: str
    expires_at: datetime
    idle_expires_at: datetime
    principal: Principal


class _BadCredentials(Exception):
    def __init__(self, reason: str, user: User | None):
        self.reason, self.user = reason, user


class Auth:
    def __init__(self, settings: Settings, keys: ControllerKeys, factory: sessionmaker[Session],
                 clock: Callable[[], float] = time.time):
        self.settings, self.keys, self.factory, self.clock = settings, keys, factory, clock
        self.passwords = Passwords(settings.argon2)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    # ---- login ----

    def login(self, username: str, password: str, *, code: str | None = None, recovery_code: str | None = None,
              source: str | None = None, kind: str = "api") -> LoginResult:
        now = self.now()
        keys = throttle.keys_for(username, source)
        with transaction(self.factory) as s:
            wait = throttle.retry_after(s, keys, now)
            if wait:
                events.record(s, at=now, category="authentication", type="login", result="failure", subject=username[:64],
                              source=source, reason="throttled", retry_after_s=wait)
        if wait:
            raise Throttled(wait)
        try:
            with transaction(self.factory) as s:
                result = self._login(s, username, password, code, recovery_code, source, kind, now)
            return result
        except _BadCredentials as exc:
            self._failed_login(username, source, exc.reason, keys, now)
            raise NotAuthenticated("wrong user name, password or code", reason="invalid_credentials") from None
        except IntegrityError:
            self._failed_login(username, source, "code_reused", keys, now)
            raise NotAuthenticated("this code was already used: wait for the next one", reason="code_reused") from None
        except AccountUnusable as exc:
            with transaction(self.factory) as s:
                events.record(s, at=now, category="authentication", type="login", result="failure", subject=username[:64],
                              source=source, reason=exc.code)
            raise

    def _login(self, s: Session, username, password, code, recovery_code, source, kind, now) -> LoginResult:
        user = s.scalar(select(User).where(User.username == username, User.deleted_at.is_(None)))
        password_ok = self.passwords.verify(user.password_hash if user else None, password)
        step, recovery = self._second_factor(s, user, code, recovery_code, now)
        if not password_ok or (step is None and recovery is None):
            raise _BadCredentials("invalid_credentials", user)
        _check_usable(user, now)
        if step is not None:
            s.add(UsedTotp(user_id=user.id, step=step, used_at=now))
            s.flush()  # raises IntegrityError when this step was already used: the replay guard
            user.totp_confirmed = True  # the first good code confirms an enrolment
            _trim(s, user.id, step, now)
        else:
            recovery.used_at = now
        if self.passwords.needs_rehash(user.password_hash):
            user.password_hash = self.passwords.hasher.hash(password)
            events.record(s, at=now, category="account", type="password_rehashed", result="success", actor_id=user.id,
                          actor=user.username, subject=user.username)
        token = new_token()
        expires = now + timedelta(seconds=self.settings.token_max_s)
        idle = min(now + timedelta(seconds=self.settings.token_idle_s), expires)
        s.add(ApiToken(token_hash=token_hash(token), user_id=user.id, kind=kind, created_at=now, last_used_at=now,
                       idle_expires_at=idle, expires_at=expires, source=source))
        throttle.record_success(s, username)
        events.record(s, at=now, category="authentication", type="login", result="success", actor_id=user.id,
                      actor=user.username, subject=user.username, source=source,
                      factor="totp" if step is not None else "recovery_code", token_kind=kind)
        return LoginResult(token=token, expires_at=expires, idle_expires_at=idle,
                           principal=_principal(user, token_hash(token), kind, expires))

    def _second_factor(self, s: Session, user: User | None, code, recovery_code, now) -> tuple[int | None, RecoveryCode | None]:
        if recovery_code:
            if user is None:
                return None, None
            digest = totp.hash_recovery_code(recovery_code)
            row = s.scalar(select(RecoveryCode).where(RecoveryCode.user_id == user.id, RecoveryCode.code_hash == digest,
                                                      RecoveryCode.used_at.is_(None)).with_for_update())
            return None, row
        secret = _DUMMY_SECRET
        if user is not None and user.totp_secret:
            secret = self.keys.open(user.totp_secret, f"totp:{user.id}")
        step = totp.matching_step(secret, code or "", now.timestamp())
        return (step if user is not None and user.totp_secret else None), None

    def _not_held_off(self, username: str, source: str | None, now: datetime) -> list[tuple[str, int]]:
        """The throttle keys for an attempt; raises Throttled while the account or source is held off."""
        keys = throttle.keys_for(username, source)
        with transaction(self.factory) as s:
            wait = throttle.retry_after(s, keys, now)
        if wait:
            raise Throttled(wait)
        return keys

    def _failed_login(self, username: str, source: str | None, reason: str, keys, now) -> None:
        with transaction(self.factory) as s:
            throttle.record_failure(s, keys, now, self.settings.throttle)
            events.record(s, at=now, category="authentication", type="login", result="failure", subject=username[:64],
                          source=source, reason=reason)

    # ---- every request ----

    def authenticate(self, token: str, source: str | None = None) -> Principal:
        now = self.now()
        digest = token_hash(token)
        failure = None
        with transaction(self.factory) as s:
            row = s.get(ApiToken, digest)
            user = s.get(User, row.user_id) if row else None
            unusable = None
            if row is not None and user is not None:
                try:
                    _check_usable(user, now)
                except AccountUnusable as exc:
                    unusable = exc
            # The account's state first: a disabled user learns that, not merely that the login ended.
            if row is None or user is None:
                failure = ("invalid_token", "not a valid login token", None)
            elif unusable is not None:
                if row.revoked_at is None:
                    row.revoked_at = now
                failure = (unusable.code, unusable.detail, user)
            elif row.revoked_at is not None:
                failure = ("token_revoked", "this login has ended (logged out or revoked): log in again", user)
            elif now >= row.expires_at or now >= row.idle_expires_at:
                failure = ("token_expired", "this login has expired: log in again", user)
            if failure is None:
                row.last_used_at = now
                row.idle_expires_at = min(now + timedelta(seconds=self.settings.token_idle_s), row.expires_at)
                return _principal(user, digest, row.kind, row.expires_at)
            reason, detail, who = failure
            events.record(s, at=now, category="authentication", type="token_refused", result="failure",
                          actor_id=who.id if who else None, actor=who.username if who else None,
                          subject=who.username if who else None, source=source, reason=reason)
        raise NotAuthenticated(detail, reason=reason)

    def logout(self, principal: Principal, source: str | None = None) -> None:
        now = self.now()
        with transaction(self.factory) as s:
            s.execute(update(ApiToken).where(ApiToken.token_hash == principal.token_hash).values(revoked_at=now))
            events.record(s, at=now, category="authentication", type="logout", result="success", actor_id=principal.user_id,
                          actor=principal.username, subject=principal.username, source=source)

    def verify_own_password(self, principal: Principal, password: str, source: str | None = None) -> None:
        """Re-check the caller's password (e.g. before changing it): throttled and recorded like a login."""
        now = self.now()
        keys = self._not_held_off(principal.username, source, now)
        with self.factory() as s:
            user = s.get(User, principal.user_id)
            ok = self.passwords.verify(user.password_hash if user else None, password)
        if not ok:
            with transaction(self.factory) as s:
                throttle.record_failure(s, keys, now, self.settings.throttle)
                events.record(s, at=now, category="authentication", type="password_check", result="failure",
                              actor_id=principal.user_id, actor=principal.username, subject=principal.username,
                              source=source, reason="invalid_credentials")
            raise NotAuthenticated("the current password is wrong", reason="invalid_credentials")

    def step_up(self, principal: Principal, code: str | None, action: str, source: str | None = None) -> None:
        """A fresh TOTP code for an action that grants access, even inside a valid login; single use."""
        if not code:
            raise StepUpRequired(f"{action} needs a fresh TOTP code in the X-Wicket-TOTP header")
        now = self.now()
        keys = self._not_held_off(principal.username, source, now)
        try:
            with transaction(self.factory) as s:
                user = s.get(User, principal.user_id)
                secret = self.keys.open(user.totp_secret, f"totp:{user.id}") if user and user.totp_secret else _DUMMY_SECRET
                step = totp.matching_step(secret, code, now.timestamp())
                if step is None or user is None or not user.totp_secret:
                    raise _BadCredentials("invalid_code", user)
                s.add(UsedTotp(user_id=user.id, step=step, used_at=now))
                s.flush()
                _trim(s, user.id, step, now)
                events.record(s, at=now, category="authentication", type="step_up", result="success", actor_id=user.id,
                              actor=user.username, subject=user.username, source=source, action=action)
        except (_BadCredentials, IntegrityError) as exc:
            reason = exc.reason if isinstance(exc, _BadCredentials) else "code_reused"
            with transaction(self.factory) as s:
                throttle.record_failure(s, keys, now, self.settings.throttle)
                events.record(s, at=now, category="authentication", type="step_up", result="failure", actor_id=principal.user_id,
                              actor=principal.username, subject=principal.username, source=source, reason=reason, action=action)
            raise StepUpRequired("that TOTP code is wrong or already used: use the next one") from None


def _trim(s: Session, user_id: int, step: int, now: datetime) -> None:
    """Keep per-user rows bounded: steps older than the window can never match again, and tokens a day
    past their end can never be used again."""
    s.execute(delete(UsedTotp).where(UsedTotp.user_id == user_id, UsedTotp.step < step - 2 * totp.WINDOW - 1))
    s.execute(delete(ApiToken).where(ApiToken.user_id == user_id, ApiToken.expires_at < now - timedelta(days=1)))


def _check_usable(user: User, now: datetime) -> None:
    if user.disabled:
        raise AccountUnusable("this account is disabled: ask an administrator", reason="account_disabled")
    if user.deleted_at is not None:
        raise AccountUnusable("this account was deleted", reason="account_deleted")
    if user.valid_from is not None and now < user.valid_from:
        raise AccountUnusable(f"this account is valid from {user.valid_from.isoformat()}", reason="account_not_yet_valid")
    if user.valid_until is not None and now >= user.valid_until:
        raise AccountUnusable(f"this account expired at {user.valid_until.isoformat()}", reason="account_expired")
    if user.kind == AccountKind.contractor.value:
        if user.valid_until is None:
            raise AccountUnusable("a contractor account needs a validity window", reason="account_expired")
        sponsor = user.sponsor
        if sponsor is None or sponsor.disabled or sponsor.deleted_at is not None:
            raise AccountUnusable("this contractor's sponsor is no longer active", reason="sponsor_inactive")


def _principal(user: User, digest: str, kind: str, expires: datetime) -> Principal:
    return Principal(
        user_id=user.id,
        username=user.username,
        kind=user.kind,
        roles=tuple(sorted((g.role, g.site) for g in user.grants)),
        token_hash=digest,
        token_kind=kind,
        expires_at=expires,
    )
