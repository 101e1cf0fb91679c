"""Policy API: check, diff and apply policy files (apply: admins, step-up), read the active policy and
its history, browse the catalogue and tasks, and explain a decision (a dry run of the engine)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request

from .decisions import Decisions
from .deps import AdminPrincipal, AuthDep, CurrentPrincipal, Source, TotpHeader
from .errors import NotFound
from .policy.durations import parse_duration
from .policy_schemas import (
    DecisionOut,
    EvaluateIn,
    PolicyAppliedOut,
    PolicyApplyIn,
    PolicyCheckOut,
    PolicyDiffOut,
    PolicyFilesIn,
    PolicyFull,
    PolicyVersionOut,
)
from .policy_store import PolicyStore
from .schemas import DB_INT_MAX, ErrorOut


def get_policies(request: Request) -> PolicyStore:
    return request.app.state.policies


def get_decisions(request: Request) -> Decisions:
    return request.app.state.decisions


PoliciesDep = Annotated[PolicyStore, Depends(get_policies)]
DecisionsDep = Annotated[Decisions, Depends(get_decisions)]
Name = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
_ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429)}
router = APIRouter(prefix="/api/v1", responses=_ERRORS)


@router.post("/policy/check", response_model=PolicyCheckOut, tags=["policy"], summary="Validate policy files (nothing changes)")
def check_policy(body: PolicyFilesIn, _caller: CurrentPrincipal, policies: PoliciesDep) -> PolicyCheckOut:
    policy = policies.check(body.files)
    d = policy.document
    return PolicyCheckOut(version=policy.version, protocols=len(d.protocols), destinations=len(d.destinations),
                          device_types=len(d.device_types), tasks=len(d.tasks), change_windows=len(d.change_windows),
                          locations=len(d.locations))


@router.post("/policy/diff", response_model=PolicyDiffOut, tags=["policy"], summary="What applying these files would change")
def diff_policy(body: PolicyFilesIn, _caller: CurrentPrincipal, policies: PoliciesDep) -> PolicyDiffOut:
    candidate, active_version, changes = policies.diff(body.files)
    return PolicyDiffOut(version=candidate.version, active_version=active_version, changes=changes)


@router.post("/policy/apply", response_model=PolicyAppliedOut, tags=["policy"], summary="Apply policy files as the new version (admin, step-up)")
def apply_policy(body: PolicyApplyIn, admin: AdminPrincipal, auth: AuthDep, policies: PoliciesDep, source: Source,
                 totp_code: TotpHeader = None) -> PolicyAppliedOut:
    policies.check(body.files)
    auth.step_up(admin, totp_code, "applying a policy", source)
    row, changes = policies.apply(admin, body.files, body.comment, source)
    return PolicyAppliedOut(**_summary(row).model_dump(), changes=changes)


@router.get("/policy", response_model=PolicyFull, tags=["policy"], summary="The active policy, with its files")
def active_policy(_caller: CurrentPrincipal, policies: PoliciesDep) -> PolicyFull:
    history = policies.history()
    if not history:
        raise NotFound("no policy has been applied yet")
    return _full(history[0])


@router.get("/policy/history", response_model=list[PolicyVersionOut], tags=["policy"], summary="Every applied policy, newest first")
def policy_history(_caller: CurrentPrincipal, policies: PoliciesDep) -> list[PolicyVersionOut]:
    return [_summary(r) for r in policies.history()]


@router.get("/policy/versions/{policy_id}", response_model=PolicyFull, tags=["policy"], summary="One applied policy, with its files")
def policy_version(policy_id: Annotated[int, Path(ge=1, le=DB_INT_MAX)], _caller: CurrentPrincipal, policies: PoliciesDep) -> PolicyFull:
    return _full(policies.get(policy_id))


@router.get("/protocols", tags=["policy"], summary="The protocol catalogue of the active policy")
def protocols(_caller: CurrentPrincipal, policies: PoliciesDep) -> dict[str, Any]:
    return policies.require_active().canonical["protocols"]


@router.get("/device-types", tags=["policy"], summary="Device types and their baseline flows")
def device_types(_caller: CurrentPrincipal, policies: PoliciesDep) -> dict[str, Any]:
    return policies.require_active().canonical["device_types"]


@router.get("/tasks", tags=["policy"], summary="Tasks (job templates)")
def tasks(_caller: CurrentPrincipal, policies: PoliciesDep) -> dict[str, Any]:
    return policies.require_active().canonical["tasks"]


@router.get("/tasks/{name}", tags=["policy"], summary="One task")
def task(name: Name, _caller: CurrentPrincipal, policies: PoliciesDep) -> dict[str, Any]:
    found = policies.require_active().canonical["tasks"].get(name)
    if found is None:
        raise NotFound(f"no task {name}")
    return found


@router.post("/policy/evaluate", response_model=DecisionOut, tags=["policy"],
             summary="What would the policy decide? A dry run with the full trace; nothing opens or is recorded")
def evaluate(body: EvaluateIn, caller: CurrentPrincipal, decisions: DecisionsDep, source: Source) -> dict:
    duration = parse_duration(body.duration) if body.duration else None
    decision = decisions.explain(caller, username=body.user, asset_id=body.device, task=body.task, duration=duration,
                                 source=body.source or source, at=body.at)
    return decision.as_dict()


def _summary(row) -> PolicyVersionOut:
    return PolicyVersionOut(id=row.id, version=row.version, applied_at=row.applied_at, applied_by=row.applied_by,
                            comment=row.comment, files=sorted(row.files))


def _full(row) -> PolicyFull:
    return PolicyFull(**_summary(row).model_dump(), document=row.document, sources=dict(row.files))
