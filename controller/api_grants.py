"""Grant API: temporary flows for devices' own traffic, one device or a group (`controller.grants`).

`{ref}` is a grant's session ID ("s-…") or a group's ID ("g-…"): an action on a group acts on each of its
grants that the action fits. Who may do what is as for sessions (docs/sessions.md): requesting is decided
by the policy (the task's roles), approving needs approver at the device's site and never the requester,
activating and signing off are the requester's, revoking is for approvers there, the SOC and admins."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, status

from .deps import AuthDep, CurrentPrincipal, Source, TotpHeader
from .grants import Grants
from .identifiers import ASSET_ID, SITE_NAME
from .policy.durations import parse_duration
from .schemas import ErrorOut
from .session_schemas import AnswerIn, GrantGroupOut, GrantOut, GrantReasonIn, GrantRequestIn, RevokeIn


def get_grants(request: Request) -> Grants:
    return request.app.state.grants


GrantsDep = Annotated[Grants, Depends(get_grants)]
GrantRef = Annotated[str, Path(pattern=r"^[sg]-[a-z2-9]{12}$", description="a grant's ID (s-…) or a group's (g-…)")]
State = Literal["pending_approval", "approved", "rejected", "opening", "active", "closed", "expired", "revoked"]
_ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429, 503)}
router = APIRouter(prefix="/api/v1", responses=_ERRORS, tags=["grants"])


def _group(grants: Grants, rows, error: str | None = None) -> GrantGroupOut:
    now = grants.auth.now()
    groups = {r.grant_group for r in rows}
    return GrantGroupOut(grant_group=groups.pop() if len(groups) == 1 else None, task=rows[0].task,
                         grants=[GrantOut.of(r, now) for r in rows], activation_error=error)


@router.post("/grants", response_model=GrantGroupOut, status_code=status.HTTP_201_CREATED,
             summary="Request a grant for devices (step-up): one per device, all or nothing")
def request_grants(body: GrantRequestIn, caller: CurrentPrincipal, auth: AuthDep, grants: GrantsDep, source: Source,
                   totp_code: TotpHeader = None) -> GrantGroupOut:
    """Each device is decided by the policy; if any is refused, none is created (403 with every refusal).
    Otherwise every grant waits for approval, or, when none is needed, is opened at once (`activate`)."""
    devices = grants.devices_for(caller, devices=body.devices, device_type=body.device_type, site=body.site)
    grants.not_a_lane(body.task)
    auth.step_up(caller, totp_code, "requesting a grant", source)
    opened = grants.request(caller, task=body.task, devices=devices, reason=body.reason, source=source, activate=body.activate,
                            duration=parse_duration(body.duration) if body.duration else None)
    return _group(grants, opened.rows, opened.activation_error)


@router.get("/grants", response_model=list[GrantOut], summary="Grants: yours, or every one you may see")
def list_grants(caller: CurrentPrincipal, grants: GrantsDep,
                scope: Literal["mine", "all"] = Query("mine", description="all: every grant at sites where you are approver, soc, site_admin or admin"),
                state: Annotated[list[State] | None, Query()] = None,
                site: Annotated[str | None, Query(pattern=SITE_NAME.pattern)] = None,
                device: Annotated[str | None, Query(pattern=ASSET_ID.pattern)] = None,
                group: Annotated[str | None, Query(pattern=r"^g-[a-z2-9]{12}$")] = None,
                task: Annotated[str | None, Query(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")] = None,
                limit: int = Query(200, ge=1, le=1000)) -> list[GrantOut]:
    rows = grants.list(caller, mine=scope == "mine", states=list(state or []), site=site, device=device, group=group,
                       task=task, limit=limit)
    now = grants.auth.now()
    return [GrantOut.of(r, now) for r in rows]


@router.get("/grants/{ref}", response_model=GrantGroupOut, summary="A grant, or a group's grants")
def get_grants_of(ref: GrantRef, caller: CurrentPrincipal, grants: GrantsDep) -> GrantGroupOut:
    return _group(grants, grants.rows(caller, ref))


@router.post("/grants/{ref}/approve", response_model=GrantGroupOut,
             summary="Approve a grant or every waiting grant of a group (approver at the sites, step-up)")
def approve(ref: GrantRef, body: AnswerIn, caller: CurrentPrincipal, auth: AuthDep, grants: GrantsDep, source: Source,
            totp_code: TotpHeader = None) -> GrantGroupOut:
    grants.pending(caller, ref)
    auth.step_up(caller, totp_code, "approving a grant", source)
    return _group(grants, grants.answer(caller, ref, approve=True, reason=body.reason, source=source))


@router.post("/grants/{ref}/reject", response_model=GrantGroupOut, summary="Reject a grant or a group's waiting grants (approver)")
def reject(ref: GrantRef, body: AnswerIn, caller: CurrentPrincipal, grants: GrantsDep, source: Source) -> GrantGroupOut:
    return _group(grants, grants.answer(caller, ref, approve=False, reason=body.reason, source=source))


@router.post("/grants/{ref}/activate", response_model=GrantGroupOut,
             summary="Open your approved grant(s) (step-up); active once the node holds them")
def activate(ref: GrantRef, caller: CurrentPrincipal, auth: AuthDep, grants: GrantsDep, source: Source,
             totp_code: TotpHeader = None) -> GrantGroupOut:
    sids = grants.approved(caller, ref)
    auth.step_up(caller, totp_code, "opening a grant", source)
    return _group(grants, grants.activate(caller, sids, source))


@router.post("/grants/{ref}/close", response_model=GrantGroupOut, summary="Sign off: end your grant(s) now, with a reason")
def close(ref: GrantRef, body: GrantReasonIn, caller: CurrentPrincipal, grants: GrantsDep, source: Source) -> GrantGroupOut:
    return _group(grants, grants.close(caller, ref, body.reason, source))


@router.post("/grants/{ref}/revoke", response_model=GrantGroupOut, summary="End someone's grant(s) now (approver at the site, soc, admin)")
def revoke(ref: GrantRef, body: RevokeIn, caller: CurrentPrincipal, grants: GrantsDep, source: Source) -> GrantGroupOut:
    return _group(grants, grants.revoke(caller, ref, body.reason, source))
