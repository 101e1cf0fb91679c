"""The controller's HTTP API, version 1. Every route states who may call it; actions that grant access
or change accounts also need a fresh TOTP code (step-up, header X-Wicket-TOTP)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status
from sqlalchemy import select

from .deps import COOKIE, AdminPrincipal, AuditReader, AuthDep, CurrentPrincipal, Source, TotpHeader, UsersDep
from .models import Event
from .schemas import (
    DB_INT_MAX,
    PRINTABLE,
    EnrolmentOut,
    ErrorOut,
    EventPublic,
    LoginIn,
    LoginOut,
    OwnPasswordIn,
    PasswordIn,
    RecoveryCodesOut,
    RoleGrantIO,
    RolesIn,
    UserCreate,
    UserPublic,
    UtcTime,
    WhoAmI,
)

UserId = Annotated[int, Path(ge=1, le=DB_INT_MAX)]
_ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429)}
router = APIRouter(prefix="/api/v1", responses=_ERRORS)


# ---- authentication ----


@router.post("/auth/login", response_model=LoginOut, tags=["auth"], summary="Log in with password and TOTP (or a recovery code)")
def login(body: LoginIn, response: Response, auth: AuthDep, source: Source) -> LoginOut:
    result = auth.login(body.username, body.password, code=body.totp_code, recovery_code=body.recovery_code,
                        source=source, kind="cookie" if body.mode == "cookie" else "api")
    if body.mode == "cookie":
        max_age = int((result.expires_at - auth.now()).total_seconds())
        response.set_cookie(COOKIE, result.token, max_age=max_age, httponly=True, samesite="strict",
                            secure=auth.settings.cookie_secure, path="/")
    return LoginOut(
        token=result.token if body.mode == "token" else None,
        expires_at=result.expires_at,
        idle_expires_at=result.idle_expires_at,
        username=result.principal.username,
        roles=[f"{r}@{s or '*'}" for r, s in result.principal.roles],
    )


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT, tags=["auth"], summary="End this login")
def logout(principal: CurrentPrincipal, auth: AuthDep, source: Source, response: Response) -> Response:
    auth.logout(principal, source)
    response.delete_cookie(COOKIE, path="/")
    response.status_code = status.HTTP_204_NO_CONTENT
    return response


@router.get("/auth/whoami", response_model=WhoAmI, tags=["auth"], summary="The caller's identity and roles")
def whoami(principal: CurrentPrincipal) -> WhoAmI:
    return WhoAmI(
        username=principal.username,
        kind=principal.kind,
        roles=[RoleGrantIO(role=r, site=s) for r, s in principal.roles],
        token_kind=principal.token_kind,
        expires_at=principal.expires_at,
    )


@router.post("/auth/password", status_code=status.HTTP_204_NO_CONTENT, tags=["auth"], summary="Change your own password (step-up)")
def change_own_password(body: OwnPasswordIn, principal: CurrentPrincipal, auth: AuthDep, users: UsersDep,
                        source: Source, totp_code: TotpHeader = None) -> Response:
    auth.step_up(principal, totp_code, "changing your password", source)
    auth.verify_own_password(principal, body.current_password, source)
    users.set_password(principal, principal.user_id, body.new_password, source)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/auth/recovery-codes", response_model=RecoveryCodesOut, tags=["auth"], summary="New recovery codes for yourself (step-up)")
def recovery_codes(principal: CurrentPrincipal, auth: AuthDep, users: UsersDep, source: Source,
                   totp_code: TotpHeader = None) -> RecoveryCodesOut:
    auth.step_up(principal, totp_code, "issuing recovery codes", source)
    return RecoveryCodesOut(codes=users.new_recovery_codes(principal, source))


# ---- accounts (administrators) ----


@router.get("/users", response_model=list[UserPublic], tags=["users"], summary="All accounts (admin)")
def list_users(_admin: AdminPrincipal, users: UsersDep) -> list[UserPublic]:
    return users.list()


@router.post("/users", response_model=UserPublic, status_code=status.HTTP_201_CREATED, tags=["users"], summary="Create an account (admin, step-up)")
def create_user(body: UserCreate, admin: AdminPrincipal, auth: AuthDep, users: UsersDep, source: Source,
                totp_code: TotpHeader = None) -> UserPublic:
    auth.step_up(admin, totp_code, "creating an account", source)
    user = users.create(admin, username=body.username, display_name=body.display_name, password=body.password,
                        kind=body.kind, email=body.email, sponsor=body.sponsor, valid_from=body.valid_from,
                        valid_until=body.valid_until, roles=[(g.role, g.site) for g in body.roles], source=source)
    return users.get(user.id)


@router.get("/users/{user_id}", response_model=UserPublic, tags=["users"], summary="One account (admin)")
def get_user(user_id: UserId, _admin: AdminPrincipal, users: UsersDep) -> UserPublic:
    return users.get(user_id)


@router.put("/users/{user_id}/roles", response_model=UserPublic, tags=["users"], summary="Replace an account's roles (admin, step-up)")
def set_roles(user_id: UserId, body: RolesIn, admin: AdminPrincipal, auth: AuthDep, users: UsersDep, source: Source,
              totp_code: TotpHeader = None) -> UserPublic:
    users.get(user_id)
    auth.step_up(admin, totp_code, "changing roles", source)
    users.set_roles(admin, user_id, [(g.role, g.site) for g in body.roles], source)
    return users.get(user_id)


@router.post("/users/{user_id}/disable", response_model=UserPublic, tags=["users"], summary="Disable an account; its logins end (admin, step-up)")
def disable_user(user_id: UserId, admin: AdminPrincipal, auth: AuthDep, users: UsersDep, source: Source,
                 totp_code: TotpHeader = None) -> UserPublic:
    users.get(user_id)
    auth.step_up(admin, totp_code, "disabling an account", source)
    users.set_disabled(admin, user_id, True, source)
    return users.get(user_id)


@router.post("/users/{user_id}/enable", response_model=UserPublic, tags=["users"], summary="Enable an account again (admin, step-up)")
def enable_user(user_id: UserId, admin: AdminPrincipal, auth: AuthDep, users: UsersDep, source: Source,
                totp_code: TotpHeader = None) -> UserPublic:
    users.get(user_id)
    auth.step_up(admin, totp_code, "enabling an account", source)
    users.set_disabled(admin, user_id, False, source)
    return users.get(user_id)


@router.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["users"], summary="Delete an account (admin, step-up)")
def delete_user(user_id: UserId, admin: AdminPrincipal, auth: AuthDep, users: UsersDep, source: Source,
                totp_code: TotpHeader = None) -> Response:
    users.get(user_id)
    auth.step_up(admin, totp_code, "deleting an account", source)
    users.delete(admin, user_id, source)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/users/{user_id}/totp", response_model=EnrolmentOut, tags=["users"], summary="Enrol a new TOTP secret, shown once (admin, step-up)")
def enrol_totp(user_id: UserId, admin: AdminPrincipal, auth: AuthDep, users: UsersDep, source: Source,
               totp_code: TotpHeader = None) -> EnrolmentOut:
    users.get(user_id)
    auth.step_up(admin, totp_code, "enrolling TOTP", source)
    e = users.enrol_totp(admin, user_id, source)
    return EnrolmentOut(username=e.username, otpauth_uri=e.otpauth_uri, qr_svg=e.qr_svg)


@router.put("/users/{user_id}/password", status_code=status.HTTP_204_NO_CONTENT, tags=["users"], summary="Set an account's password (admin, step-up)")
def set_password(user_id: UserId, body: PasswordIn, admin: AdminPrincipal, auth: AuthDep, users: UsersDep, source: Source,
                 totp_code: TotpHeader = None) -> Response:
    users.get(user_id)
    auth.step_up(admin, totp_code, "setting a password", source)
    users.set_password(admin, user_id, body.password, source)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---- events ----


@router.get("/events", response_model=list[EventPublic], tags=["events", "audit"],
            summary="Audit records, in chain order (admin, soc)")
def list_events(_reader: AuditReader, auth: AuthDep, after: int = Query(0, ge=0, le=DB_INT_MAX), limit: int = Query(100, ge=1, le=1000),
                subject: str | None = Query(None, max_length=64, pattern=PRINTABLE), since: UtcTime | None = None,
                until: UtcTime | None = None, type: str | None = Query(None, max_length=48, pattern=PRINTABLE),  # noqa: A002
                session: str | None = Query(None, max_length=64, pattern=PRINTABLE),
                device: str | None = Query(None, max_length=64, pattern=PRINTABLE)) -> list[EventPublic]:
    with auth.factory() as s:
        q = select(Event).where(Event.seq > after).order_by(Event.seq).limit(limit)
        for column, value in ((Event.subject, subject), (Event.type, type), (Event.session_ref, session),
                              (Event.device_ref, device)):
            if value:
                q = q.where(column == value)
        if since:
            q = q.where(Event.at >= since)
        if until:
            q = q.where(Event.at <= until)
        return [
            EventPublic(seq=e.seq, at=e.at, clock=e.clock, category=e.category, type=e.type, result=e.result, actor=e.actor,
                        subject=e.subject, source=e.source, reason=e.reason, session=e.session_ref, device=e.device_ref,
                        body=e.body or {}, hash=e.hash, prev_hash=e.prev_hash, line=e.line)
            for e in s.scalars(q)
        ]
