"""What the session API takes and returns."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from nodeagent.wire import WireGuardKey

from .identifiers import ASSET_ID, SITE_NAME
from .models import AccessSession
from .policy.durations import format_duration, parse_duration
from .schemas import PRINTABLE

TaskName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
Reason = Annotated[str, Field(min_length=3, max_length=500, pattern=PRINTABLE)]
DurationText = Annotated[str, Field(max_length=32), AfterValidator(lambda v: format_duration(parse_duration(v)))]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SessionRequestIn(_In):
    device: str = Field(pattern=ASSET_ID.pattern, description="asset ID")
    task: TaskName
    duration: DurationText | None = Field(default=None, description='e.g. "30m"; the task default if left out')
    reason: Reason = Field(description="why: a work order, a ticket, a fault")
    public_key: WireGuardKey | None = Field(default=None, description="bring your own key: your WireGuard public key; "
                                            "the private key then never leaves your machine")
    activate: bool = Field(default=True, description="open the lane at once when no approval is needed")


class BreakGlassIn(_In):
    device: str = Field(pattern=ASSET_ID.pattern)
    task: TaskName
    duration: DurationText | None = None
    reason: Reason
    incident: str = Field(min_length=2, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/#-]*$",
                          description="the incident or ticket this emergency belongs to")
    public_key: WireGuardKey | None = None


class ActivateIn(_In):
    public_key: WireGuardKey | None = None


class AnswerIn(_In):
    reason: Reason


class ExtendIn(_In):
    by: DurationText = Field(description='how much longer, e.g. "15m"')
    reason_code: TaskName = Field(description="one of the task's extension reason codes")
    note: str = Field(default="", max_length=500, pattern=PRINTABLE)


class CloseIn(_In):
    reason: str | None = Field(default=None, max_length=500, pattern=PRINTABLE)


class RevokeIn(_In):
    reason: Reason


class ReviewIn(_In):
    note: Reason = Field(description="what the reviewer checked and concluded")


class ApprovalOut(BaseModel):
    kind: str
    approver: str
    verdict: str
    reason: str
    at: datetime


class SessionOut(BaseModel):
    id: str
    kind: Literal["lane", "grant"] = Field(description="lane: an engineer's tunnel; grant: a temporary change of the device's own flows")
    grant_group: str | None = Field(description="grants requested together share it")
    state: str
    user: str
    device: str
    site: str
    task: str
    reason: str
    break_glass: bool
    incident: str | None
    requested_at: datetime
    duration: str
    approvals_required: int
    approvals: list[ApprovalOut]
    expires_at: datetime | None = Field(description="a pending request or an unused approval lapses then")
    activated_at: datetime | None
    end_at: datetime | None
    seconds_left: int | None
    ended_at: datetime | None
    end_reason: str | None
    ended_by: str | None
    recording: str
    policy_version: str
    decision: dict
    node: str | None
    tunnel_address: str | None
    device_address: str | None
    listen_port: int | None
    flows: list[dict]
    key_mode: str | None
    config_available: bool
    config_downloaded_at: datetime | None
    extensions: list[dict]
    extension_request: dict | None
    reviewed_at: datetime | None
    reviewed_by: str | None
    review_note: str | None
    activation_error: str | None = None

    @classmethod
    def of(cls, r: AccessSession, now: datetime, activation_error: str | None = None) -> SessionOut:
        live = r.state == "active" and r.end_at is not None and r.end_at > now
        return cls(
            id=r.id, kind=r.kind or "lane", grant_group=r.grant_group, state=r.state, user=r.username, device=r.asset_id, site=r.site, task=r.task, reason=r.reason,
            break_glass=r.break_glass, incident=r.incident, requested_at=r.requested_at,
            duration=format_duration(timedelta(seconds=r.duration_s)), approvals_required=r.approvals_required,
            approvals=[ApprovalOut(kind=a.kind, approver=a.approver, verdict=a.verdict, reason=a.reason, at=a.at) for a in r.approvals],
            expires_at=r.expires_at if r.state in ("pending_approval", "approved") else None, activated_at=r.activated_at, end_at=r.end_at,
            seconds_left=max(0, int((r.end_at - now).total_seconds())) if live else None,
            ended_at=r.ended_at, end_reason=r.end_reason, ended_by=r.ended_by, recording=r.recording,
            policy_version=r.policy_version, decision=r.decision, node=r.node, tunnel_address=r.tunnel_address,
            device_address=r.device_address, listen_port=r.listen_port, flows=r.flows, key_mode=r.key_mode,
            config_available=live and r.config_downloaded_at is None and bool(r.node_public_key),
            config_downloaded_at=r.config_downloaded_at, extensions=r.extensions, extension_request=r.extension_request,
            reviewed_at=r.reviewed_at, reviewed_by=r.reviewed_by, review_note=r.review_note, activation_error=activation_error,
        )


class QueueItem(BaseModel):
    kind: Literal["request", "extension"]
    session: SessionOut
    approvals_so_far: int
    approvals_required: int


class AccessRecord(BaseModel):
    """One person's access to a device: from activation to the end (or now, if still open)."""

    session_id: str
    user: str
    task: str
    break_glass: bool
    state: str
    start: datetime
    end: datetime
    end_reason: str | None
    approved_by: list[str]
    tunnel_address: str | None
    flows: list[dict]
    policy_version: str



# ---- grants ----

MAX_GROUP = 1000  # devices in one grant request: a bigger campaign is several groups
TypeName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
SiteNameStr = Annotated[str, Field(pattern=SITE_NAME.pattern)]
AssetIdStr = Annotated[str, Field(pattern=ASSET_ID.pattern)]


class GrantRequestIn(_In):
    task: TaskName = Field(description="a grant task of the policy")
    devices: list[AssetIdStr] | None = Field(default=None, min_length=1, max_length=MAX_GROUP, description="asset IDs")
    device_type: TypeName | None = Field(default=None, description="instead of `devices`: every active device of this type …")
    site: SiteNameStr | None = Field(default=None, description="… at this site")
    duration: DurationText | None = Field(default=None, description='e.g. "2h"; the task default if left out')
    reason: Reason = Field(description="why: a work order, a campaign, a commissioning job")
    activate: bool = Field(default=True, description="open the grants at once when no approval is needed")

    @model_validator(mode="after")
    def _which(self) -> GrantRequestIn:
        by_type = self.device_type is not None or self.site is not None
        if bool(self.devices) == by_type:
            raise ValueError("name the devices (`devices`), or a type and a site (`device_type` and `site`), not both")
        if by_type and (self.device_type is None or self.site is None):
            raise ValueError("`device_type` and `site` go together")
        if self.devices and len(set(self.devices)) != len(self.devices):
            raise ValueError("a device is listed twice")
        return self


class GrantOut(BaseModel):
    """One grant: a device's temporary flows, where it stands, and until when."""

    id: str
    grant_group: str | None
    state: str
    user: str
    device: str
    site: str
    task: str
    reason: str
    requested_at: datetime
    duration: str
    approvals_required: int
    approvals: int = Field(description="approvals of the request so far")
    expires_at: datetime | None = Field(description="a pending request or an unused approval lapses then")
    activated_at: datetime | None
    end_at: datetime | None
    seconds_left: int | None
    ended_at: datetime | None
    end_reason: str | None
    ended_by: str | None
    node: str | None
    device_address: str | None
    flows: list[dict] = Field(description="[{protocol, transport, ports, to}], once activated")
    decision_reason: str

    @classmethod
    def of(cls, r: AccessSession, now: datetime) -> GrantOut:
        s = SessionOut.of(r, now)
        return cls(id=r.id, grant_group=r.grant_group, state=r.state, user=r.username, device=r.asset_id, site=r.site,
                   task=r.task, reason=r.reason, requested_at=r.requested_at, duration=s.duration,
                   approvals_required=r.approvals_required,
                   approvals=sum(1 for a in r.approvals if a.kind == "request" and a.verdict == "approve"),
                   expires_at=s.expires_at, activated_at=r.activated_at, end_at=r.end_at, seconds_left=s.seconds_left,
                   ended_at=r.ended_at, end_reason=r.end_reason, ended_by=r.ended_by, node=r.node,
                   device_address=r.device_address if r.activated_at else None, flows=r.flows,
                   decision_reason=(r.decision or {}).get("reason", ""))


class GrantGroupOut(BaseModel):
    grant_group: str | None
    task: str
    grants: list[GrantOut]
    activation_error: str | None = Field(default=None, description="why some grants did not open, when asked to open at once")


class GrantReasonIn(_In):
    reason: Reason


class CommissioningOut(BaseModel):
    """The commissioning grant `wicket devices bind` asked for (the device type's `commissioning` task)."""

    task: str
    grant: GrantOut | None = Field(description="the grant, or null when the policy refused it")
    refused: str | None = Field(default=None, description="why the policy refused it")
    activation_error: str | None = Field(default=None, description="why it did not open at once, when no approval was needed")
