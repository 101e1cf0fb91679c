"""Domain errors, and the one place that maps them to HTTP (`install`). Bodies are plain and never
repeat secrets: {"error": <code>, "detail": <sentence>}."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class DomainError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}

    def extra(self) -> dict:
        """More fields for the body, next to error and detail (e.g. every problem of a rejected import)."""
        return {}


class Invalid(DomainError):
    status, code = 422, "invalid"


class NotAuthenticated(DomainError):
    """No valid login: missing, wrong, expired or revoked credentials."""

    status, code = 401, "not_authenticated"

    def __init__(self, detail: str, *, reason: str = "invalid_credentials"):
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="wicket"'})
        self.code = reason


class StepUpRequired(DomainError):
    """A valid login, but this action needs a fresh TOTP code (X-Wicket-TOTP)."""

    status, code = 401, "step_up_required"


class Forbidden(DomainError):
    status, code = 403, "forbidden"


class AccountUnusable(DomainError):
    """Right credentials, but the account may not log in now (disabled, expired, not yet valid)."""

    status = 403

    def __init__(self, detail: str, *, reason: str):
        super().__init__(detail)
        self.code = reason


class NotFound(DomainError):
    status, code = 404, "not_found"


class Conflict(DomainError):
    status, code = 409, "conflict"


class Gone(DomainError):
    status, code = 410, "gone"


class NodeUnavailable(DomainError):
    status, code = 503, "node_unavailable"


class AuditUnavailable(DomainError):
    """The audit record of an action could not be written, so the action was not done (IEC 62443 SR 2.10:
    wicket refuses rather than acting unrecorded)."""

    status, code = 503, "audit_unavailable"


class Throttled(DomainError):
    status, code = 429, "throttled"

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed attempts: try again in {retry_after} s", headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


def body(code: str, detail: str) -> dict:
    return {"error": code, "detail": detail}


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _domain(_request: Request, exc: DomainError):
        return JSONResponse({**body(exc.code, exc.detail), **exc.extra()}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        if exc.status_code == 400:  # a body that does not parse (e.g. not UTF-8): an invalid request
            return JSONResponse(body("invalid", f"the request body could not be read: {exc.detail}"), status_code=422)
        return JSONResponse(body(codes.get(exc.status_code, "http_error"), str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:10]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "(request)"
            parts.append(f"{where}: {str(err.get('msg')).removeprefix('Value error, ')}")
        return JSONResponse(body("invalid", "; ".join(parts)), status_code=422)
