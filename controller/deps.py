"""Request dependencies, as `Annotated` aliases: the caller's identity, roles, step-up."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from .auth import Auth, Principal
from .errors import Forbidden, NotAuthenticated
from .security.tokens import looks_like_token
from .users import Users

COOKIE = "wicket_session"


def get_auth(request: Request) -> Auth:
    return request.app.state.auth


def get_users(request: Request) -> Users:
    return request.app.state.users


def source_of(request: Request) -> str | None:
    """The caller's address. Behind one reverse proxy (WICKET_TRUST_FORWARDED_FOR), the last
    X-Forwarded-For entry: the one our proxy appended. Earlier entries are whatever the client sent."""
    if request.app.state.settings.trust_forwarded_for:
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded:
            return forwarded.split(",")[-1].strip()[:64]
    return request.client.host if request.client else None


def current_principal(request: Request, auth: Annotated[Auth, Depends(get_auth)]) -> Principal:
    token = None
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        token = header[7:].strip()
    elif request.cookies.get(COOKIE):
        token = request.cookies[COOKIE]
        # Cookie logins are for the web pages: state changes must also carry this header (no CSRF).
        if request.method not in ("GET", "HEAD", "OPTIONS") and request.headers.get("x-wicket-csrf") != "1":
            raise Forbidden("a cookie login must send X-Wicket-CSRF: 1 with changes")
    if not token:
        raise NotAuthenticated("log in first (Authorization: Bearer <token>)", reason="not_authenticated")
    if not looks_like_token(token):
        raise NotAuthenticated("not a valid login token", reason="invalid_token")
    return auth.authenticate(token, source_of(request))


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
AuthDep = Annotated[Auth, Depends(get_auth)]
UsersDep = Annotated[Users, Depends(get_users)]
Source = Annotated[str | None, Depends(source_of)]
TotpHeader = Annotated[str | None, Header(alias="X-Wicket-TOTP", description="a fresh TOTP code, for step-up")]


def require(*roles: str):
    def check(principal: CurrentPrincipal) -> Principal:
        if not principal.has_any(*roles):
            raise Forbidden(f"this needs the role {' or '.join(roles)}")
        return principal

    return check


AdminPrincipal = Annotated[Principal, Depends(require("admin"))]
AuditReader = Annotated[Principal, Depends(require("admin", "soc"))]
