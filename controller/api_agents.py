"""Agent enrolment and tracking API: join tokens (site admins), the agents' link state, revoking an agent.

The join token's secret is in the answer to its creation and nowhere else: not in listings, logs or the
audit store (they name the token by its ID)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from .deps import AuthDep, CurrentPrincipal, Source, TotpHeader
from .enrolment import Agents
from .errors import Invalid
from .identifiers import SITE_NAME
from .policy.durations import parse_duration
from .schemas import ErrorOut

router = APIRouter(prefix="/api/v1", responses={code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429)})
SiteName = Annotated[str, Path(pattern=SITE_NAME.pattern)]
AgentName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
TokenId = Annotated[str, Path(pattern=r"^[a-z0-9]{12}$")]


def get_agents(request: Request) -> Agents:
    return request.app.state.agents


AgentsDep = Annotated[Agents, Depends(get_agents)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JoinTokenIn(_In):
    ttl: str | None = Field(default=None, description="how long the token may be used, e.g. 30m, 1h (default 1h, at most 7d)")


class JoinTokenCreated(BaseModel):
    id: str
    site: str
    expires_at: datetime
    token: str = Field(description="shown once: give it to the router's `wicket-agent enroll --token`")
    link_pin: str = Field(description="SHA-256 of the controller CA the token pins")


class JoinTokenOut(BaseModel):
    id: str
    site: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by: str | None
    revoked_at: datetime | None
    state: str


class AgentOut(BaseModel):
    name: str
    site: str
    enrolled_at: datetime | None
    revoked_at: datetime | None
    connected: bool
    connected_at: datetime | None
    last_seen: datetime | None
    generation: int
    applied_generation: int | None
    agent_version: str | None
    protocol_version: int | None
    clock_synchronized: bool | None
    certificate_not_after: datetime | None
    lanes: int
    last_error: str | None


class RevokeAgentIn(_In):
    reason: str = Field(min_length=3, max_length=300)


@router.post("/sites/{name}/join-tokens", response_model=JoinTokenCreated, status_code=status.HTTP_201_CREATED, tags=["agents"],
             summary="Make a one-time join token for a router at this site (its site_admin or admin, step-up)")
def create_join_token(name: SiteName, body: JoinTokenIn, caller: CurrentPrincipal, auth: AuthDep, agents: AgentsDep, source: Source,
                      totp_code: TotpHeader = None) -> JoinTokenCreated:
    ttl = _ttl(body.ttl)
    agents.list_tokens(caller, name)  # 404 / 403 before a TOTP code is spent
    auth.step_up(caller, totp_code, "making a join token", source)
    made = agents.create_token(caller, name, ttl, source)
    return JoinTokenCreated(id=made.id, site=made.site, expires_at=made.expires_at, token=made.token, link_pin=agents.ca.pin())


@router.get("/sites/{name}/join-tokens", response_model=list[JoinTokenOut], tags=["agents"],
            summary="A site's join tokens, without their secrets (its site_admin or admin)")
def list_join_tokens(name: SiteName, caller: CurrentPrincipal, agents: AgentsDep) -> list[JoinTokenOut]:
    return [JoinTokenOut(**t) for t in agents.list_tokens(caller, name)]


@router.delete("/join-tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["agents"],
               summary="Revoke an unused join token (the site's site_admin or admin)")
def revoke_join_token(token_id: TokenId, caller: CurrentPrincipal, agents: AgentsDep, source: Source) -> Response:
    agents.revoke_token(caller, token_id, source)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/agents", response_model=list[AgentOut], tags=["agents"],
            summary="Node agents: enrolment, link, applied generation, version, clock (site_admin, soc, admin)")
def list_agents(caller: CurrentPrincipal, agents: AgentsDep,
                site: Annotated[str | None, Query(pattern=SITE_NAME.pattern)] = None) -> list[AgentOut]:
    return [AgentOut(**a) for a in agents.list_agents(caller, site)]


@router.post("/agents/{agent}/revoke", status_code=status.HTTP_204_NO_CONTENT, tags=["agents"],
             summary="Revoke an agent: its certificates stop working and its link is cut (site_admin or admin, step-up)")
def revoke_agent(agent: AgentName, body: RevokeAgentIn, caller: CurrentPrincipal, auth: AuthDep, agents: AgentsDep, source: Source,
                 totp_code: TotpHeader = None) -> Response:
    agents.check_may_revoke(caller, agent)  # 403 / 404 before a TOTP code is spent
    auth.step_up(caller, totp_code, "revoking an agent", source)
    agents.revoke_agent(caller, agent, body.reason, source)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _ttl(text: str | None) -> timedelta | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise Invalid(f"ttl {text!r}: {exc}") from None
