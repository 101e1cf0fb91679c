"""Session API: request, approve, activate, one-time config, extend, close, revoke, break-glass, review,
and the queries (mine, a site's, the approval queue, who had access to a device when)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status

from .deps import AuthDep, CurrentPrincipal, Source, TotpHeader
from .errors import Invalid
from .identifiers import ASSET_ID, SITE_NAME
from .policy.durations import parse_duration
from .schemas import ErrorOut, UtcTime
from .session_queries import SessionQueries
from .session_schemas import (
    AccessRecord,
    ActivateIn,
    AnswerIn,
    BreakGlassIn,
    CloseIn,
    ExtendIn,
    QueueItem,
    ReviewIn,
    RevokeIn,
    SessionOut,
    SessionRequestIn,
)
from .sessions import Sessions
from .wgconf import qr_png, qr_svg


def get_sessions(request: Request) -> Sessions:
    return request.app.state.sessions


def get_queries(request: Request) -> SessionQueries:
    return request.app.state.session_queries


SessionsDep = Annotated[Sessions, Depends(get_sessions)]
QueriesDep = Annotated[SessionQueries, Depends(get_queries)]
SessionId = Annotated[str, Path(pattern=r"^s-[a-z2-9]{12}$")]
State = Literal["denied", "pending_approval", "approved", "rejected", "active", "closed", "expired", "revoked"]
_ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 410, 422, 429, 503)}
router = APIRouter(prefix="/api/v1", responses=_ERRORS, tags=["sessions"])
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _out(sessions: Sessions, row, activation_error: str | None = None) -> SessionOut:
    return SessionOut.of(row, sessions.auth.now(), activation_error)


@router.post("/sessions", response_model=SessionOut, status_code=status.HTTP_201_CREATED,
             summary="Request access to one device for one task (step-up)")
def request_session(body: SessionRequestIn, caller: CurrentPrincipal, auth: AuthDep, sessions: SessionsDep, source: Source,
                    totp_code: TotpHeader = None) -> SessionOut:
    """Decided at once. `state` says what happened: `denied` (the decision's trace says which check failed),
    `pending_approval`, `approved`, or `active` when no approval is needed and the lane opened."""
    sessions.guard_device(caller, body.device)
    sessions.not_a_grant(body.task)
    auth.step_up(caller, totp_code, "requesting access", source)
    opened = sessions.request(caller, asset_id=body.device, task=body.task, reason=body.reason, public_key=body.public_key,
                              duration=parse_duration(body.duration) if body.duration else None, source=source,
                              activate=body.activate)
    return _out(sessions, opened.session, opened.activation_error)


@router.post("/break-glass", response_model=SessionOut, status_code=status.HTTP_201_CREATED,
             summary="Emergency access without approval (break-glass grant, step-up); always reviewed afterwards")
def break_glass(body: BreakGlassIn, caller: CurrentPrincipal, auth: AuthDep, sessions: SessionsDep, source: Source,
                totp_code: TotpHeader = None) -> SessionOut:
    sessions.guard_device(caller, body.device)
    sessions.not_a_grant(body.task)
    auth.step_up(caller, totp_code, "break-glass access", source)
    row = sessions.break_glass(caller, asset_id=body.device, task=body.task, reason=body.reason, incident=body.incident,
                               public_key=body.public_key, source=source,
                               duration=parse_duration(body.duration) if body.duration else None)
    return _out(sessions, row)


@router.get("/sessions", response_model=list[SessionOut], summary="Sessions: yours, or every one you may see")
def list_sessions(caller: CurrentPrincipal, queries: QueriesDep,
                  scope: Literal["mine", "all"] = Query("mine", description="all: every session at sites where you are approver, soc, site_admin or admin"),
                  state: Annotated[list[State] | None, Query()] = None,
                  site: Annotated[str | None, Query(pattern=SITE_NAME.pattern)] = None,
                  device: Annotated[str | None, Query(pattern=ASSET_ID.pattern)] = None,
                  unreviewed: bool = Query(False, description="only break-glass sessions that still owe their review"),
                  kind: Literal["lane", "grant"] | None = Query(None, description="lanes or grants only; both if left out"),
                  limit: int = Query(200, ge=1, le=1000)) -> list[SessionOut]:
    return queries.list(caller, mine=scope == "mine", states=list(state or []), site=site, device=device,
                        unreviewed=unreviewed, limit=limit, kind=kind)


@router.get("/sessions/{sid}", response_model=SessionOut, summary="One session")
def get_session(sid: SessionId, caller: CurrentPrincipal, queries: QueriesDep) -> SessionOut:
    return queries.get(caller, sid)


@router.get("/approvals", response_model=list[QueueItem], summary="Requests and extensions waiting for you to approve")
def approval_queue(caller: CurrentPrincipal, queries: QueriesDep) -> list[QueueItem]:
    return queries.queue(caller)


@router.post("/sessions/{sid}/approve", response_model=SessionOut, summary="Approve a request or an extension (approver at the site, step-up)")
def approve(sid: SessionId, body: AnswerIn, caller: CurrentPrincipal, auth: AuthDep, sessions: SessionsDep, source: Source,
            totp_code: TotpHeader = None) -> SessionOut:
    sessions.guard(caller, sid, "approve")
    auth.step_up(caller, totp_code, "approving access", source)
    return _out(sessions, sessions.answer(caller, sid, approve=True, reason=body.reason, source=source))


@router.post("/sessions/{sid}/reject", response_model=SessionOut, summary="Reject a request or an extension (approver at the site)")
def reject(sid: SessionId, body: AnswerIn, caller: CurrentPrincipal, sessions: SessionsDep, source: Source) -> SessionOut:
    return _out(sessions, sessions.answer(caller, sid, approve=False, reason=body.reason, source=source))


@router.post("/sessions/{sid}/activate", response_model=SessionOut, summary="Open the lane of your approved session (step-up)")
def activate(sid: SessionId, body: ActivateIn, caller: CurrentPrincipal, auth: AuthDep, sessions: SessionsDep, source: Source,
             totp_code: TotpHeader = None) -> SessionOut:
    sessions.guard(caller, sid, "activate")
    auth.step_up(caller, totp_code, "opening a session", source)
    return _out(sessions, sessions.activate(caller, sid, body.public_key, source))


@router.get("/sessions/{sid}/config", summary="Your session's WireGuard config, once (wg-quick text, or a QR code as PNG or SVG)",
            responses={200: {"content": {"text/plain": {}, "image/png": {}, "image/svg+xml": {}}}})
def config(sid: SessionId, caller: CurrentPrincipal, sessions: SessionsDep, source: Source,
           format: Literal["conf", "png", "svg"] = Query("conf")) -> Response:
    """The first download is the only one: a second is refused (410) and recorded. The private key the
    controller minted is erased from the controller as this answer is made."""
    text, _row = sessions.config(caller, sid, source)
    if format == "png":
        return Response(qr_png(text), media_type="image/png", headers=NO_STORE)
    if format == "svg":
        return Response(qr_svg(text), media_type="image/svg+xml", headers=NO_STORE)
    return Response(text, media_type="text/plain; charset=utf-8", headers={
        # the session ID (14 characters) is a valid wg-quick interface name (at most 15)
        **NO_STORE, "Content-Disposition": f'attachment; filename="{sid}.conf"'})


@router.post("/sessions/{sid}/extend", response_model=SessionOut, summary="Extend your active session (reason code, step-up)")
def extend(sid: SessionId, body: ExtendIn, caller: CurrentPrincipal, auth: AuthDep, sessions: SessionsDep, source: Source,
           totp_code: TotpHeader = None) -> SessionOut:
    sessions.guard(caller, sid, "extend")
    auth.step_up(caller, totp_code, "extending a session", source)
    return _out(sessions, sessions.extend(caller, sid, by=parse_duration(body.by), reason_code=body.reason_code,
                                          note=body.note, source=source))


@router.post("/sessions/{sid}/close", response_model=SessionOut, summary="End your session now (or withdraw your request)")
def close(sid: SessionId, caller: CurrentPrincipal, sessions: SessionsDep, source: Source, body: CloseIn | None = None) -> SessionOut:
    return _out(sessions, sessions.close(caller, sid, body.reason if body else None, source))


@router.post("/sessions/{sid}/revoke", response_model=SessionOut, summary="End someone's session now (approver at the site, soc, admin)")
def revoke(sid: SessionId, body: RevokeIn, caller: CurrentPrincipal, sessions: SessionsDep, source: Source) -> SessionOut:
    return _out(sessions, sessions.revoke(caller, sid, body.reason, source))


@router.post("/sessions/{sid}/review", response_model=SessionOut, summary="Review a break-glass session (a second person: approver, soc, admin; step-up)")
def review(sid: SessionId, body: ReviewIn, caller: CurrentPrincipal, auth: AuthDep, sessions: SessionsDep, source: Source,
           totp_code: TotpHeader = None) -> SessionOut:
    sessions.guard(caller, sid, "review")
    auth.step_up(caller, totp_code, "reviewing break-glass", source)
    return _out(sessions, sessions.review(caller, sid, body.note, source))


@router.get("/devices/{asset_id}/access", response_model=list[AccessRecord],
            summary="Who had access to a device between two times (approver, soc, site_admin, admin at its site)")
def device_access(asset_id: Annotated[str, Path(pattern=ASSET_ID.pattern)], caller: CurrentPrincipal, queries: QueriesDep,
                  start: Annotated[UtcTime, Query(alias="from")], end: Annotated[UtcTime, Query(alias="to")]) -> list[AccessRecord]:
    if end <= start:
        raise Invalid("`to` must be after `from`")
    return queries.access(caller, asset_id, start, end)


@router.get("/nodes/{node}/desired", tags=["nodes"], summary="A node's desired state now (site_admin at its site, admin)")
def desired(node: Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")], caller: CurrentPrincipal,
            sessions: SessionsDep) -> dict:
    return sessions.desired_for(caller, node).model_dump(mode="json")

