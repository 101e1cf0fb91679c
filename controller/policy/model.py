"""The policy document: protocol catalogue, destinations, device types with baseline flows, tasks,
change windows, location constraints and limits. Every section is keyed by name; every list is a set,
so the order entries are written in changes neither the decision nor the version.

Validated strictly (unknown keys, bad addresses, impossible durations, dangling references are errors);
`controller.policy.loader` turns validation errors into messages that name file and line.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime, time, timedelta
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from nodeagent.wire import Fqdn  # one FQDN rule: what the policy accepts is what the agent accepts

from .durations import format_duration, parse_duration

FORMAT = 1
MAX_SESSION = timedelta(hours=24)
MAX_REVIEW_WITHIN = timedelta(days=30)
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
ProtocolName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
Text = Annotated[str, StringConstraints(max_length=500, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$")]
Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)]
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]
Role = Literal["engineer", "contractor", "approver", "site_admin", "soc", "admin", "break_glass"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone (e.g. Europe/Berlin)") from None
    return value


def _clock(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d|24:00", value):
        raise ValueError(f"{value!r} is not a time of day: write HH:MM, 00:00 to 24:00, in quotes")
    return value


def _network(value: object) -> str:
    try:
        return str(ipaddress.ip_network(str(value), strict=True))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a network in CIDR form: {exc}") from None


def _address(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


TimeZone = Annotated[str, AfterValidator(_timezone)]
Clock = Annotated[str, BeforeValidator(_clock)]
Network = Annotated[str, BeforeValidator(_network)]
Address = Annotated[str, BeforeValidator(_address)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Optional(_Entry):
    """An entry with keys added after policies were first applied: left out of its content while unset, so
    that every policy written before them keeps its version (and an applied one still loads)."""

    _OMIT_UNSET: tuple[str, ...] = ()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        for key in self._OMIT_UNSET:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ProtocolDef(_Entry):
    """A protocol of the catalogue: how it travels and on which port(s) by default."""

    title: Text
    transport: Literal["tcp", "udp", "tcp+udp"]
    ports: list[Port] = Field(min_length=1, max_length=8)
    secure: bool = False
    notes: Text = ""

    def transports(self) -> tuple[str, ...]:
        return ("tcp", "udp") if self.transport == "tcp+udp" else (self.transport,)


class Destination(_Entry):
    """A named endpoint of devices' own traffic: fixed addresses, or an FQDN the agent resolves."""

    description: Text = ""
    addresses: list[Address] = Field(default_factory=list, max_length=64)
    fqdn: Fqdn | None = None

    @model_validator(mode="after")
    def _one(self) -> Destination:
        if bool(self.addresses) == bool(self.fqdn):
            raise ValueError("give either addresses or fqdn, not both and not neither")
        return self


class Flow(_Entry):
    """One baseline flow: the device may talk this protocol to these destinations (return traffic allowed)."""

    protocol: ProtocolName
    to: list[Name] = Field(min_length=1, max_length=16)
    ports: list[Port] | None = Field(default=None, max_length=8, description="instead of the protocol's default ports")


class DeviceType(_Optional):
    _OMIT_UNSET = ("commissioning",)

    title: Text
    description: Text = ""
    access: list[ProtocolName] = Field(min_length=1, max_length=16, description="protocols engineers' tasks may use to reach the device")
    baseline: list[Flow] = Field(default_factory=list, max_length=32)
    max_silence: Duration | None = Field(default=None, description="overrides limits.max_silence for this type")
    commissioning: Name | None = Field(default=None, description="the grant task `wicket devices bind` opens for a device of this type")


class Grant(_Entry):
    """What a grant task gives the device for its time: flows like a baseline's, on top of the baseline."""

    flows: list[Flow] = Field(min_length=1, max_length=16)


class Approval(_Entry):
    required: bool = False
    approvers: int = Field(default=1, ge=1, le=5)


class Extensions(_Entry):
    reason_codes: list[Name] = Field(default_factory=list, max_length=32)
    max_count: int = Field(default=0, ge=0, le=20)
    max_total: Duration | None = None
    reapproval: bool = False

    @model_validator(mode="after")
    def _sane(self) -> Extensions:
        if self.max_count and not self.reason_codes:
            raise ValueError("extensions need reason_codes when max_count is above 0")
        if self.max_count and self.max_total is None:
            raise ValueError("extensions need max_total when max_count is above 0")
        if self.max_total is not None and self.max_total > MAX_SESSION:
            raise ValueError(f"max_total must be at most {format_duration(MAX_SESSION)}")
        return self


class DurationLimits(_Entry):
    default: Duration
    max: Duration

    @model_validator(mode="after")
    def _sane(self) -> DurationLimits:
        if self.max > MAX_SESSION:
            raise ValueError(f"max is {format_duration(self.max)}; a session lasts at most {format_duration(MAX_SESSION)}")
        if self.default > self.max:
            raise ValueError(f"default {format_duration(self.default)} is longer than max {format_duration(self.max)}")
        return self


class Task(_Optional):
    """A job template: what engineers may do on which devices for how long (a lane), or, with `grant`, a
    temporary change of the devices' own flows (a grant)."""

    _OMIT_UNSET = ("grant",)

    title: Text
    description: Text = ""
    protocols: list[ProtocolName] = Field(default_factory=list, max_length=4,
                                          description="engineers' protocols to the device; a grant task has none")
    grant: Grant | None = Field(default=None, description="a grant task: the flows it lets the device open")
    device_types: list[Name] = Field(min_length=1, max_length=64)
    roles: list[Role] = Field(min_length=1)
    duration: DurationLimits = DurationLimits(default=timedelta(minutes=15), max=timedelta(minutes=60))
    approval: Approval = Approval()
    recording: Literal["metadata", "payload"] = "metadata"
    change_window: bool = Field(default=False, description="the session must lie inside one of the site's change windows")
    extensions: Extensions = Extensions()
    break_glass: bool = Field(default=False, description="may be opened under break-glass: no approval, payload recorded")

    @field_validator("roles")
    @classmethod
    def _no_break_glass_role(cls, roles: list[str]) -> list[str]:
        # Listed here, the break-glass grant would also open the task the ordinary way, with approvals and windows.
        if "break_glass" in roles:
            raise ValueError("break_glass is not a role that requests tasks: set `break_glass: true` on the task instead")
        return roles

    @model_validator(mode="after")
    def _lane_or_grant(self) -> Task:
        if self.grant is None:
            if not self.protocols:
                raise ValueError("a task needs protocols (engineers' access to the device), or `grant` (flows the device "
                                 "may open for a while)")
            return self
        # A grant changes the device's own traffic; nobody tunnels in, so what describes a lane has no meaning here.
        lane_only = [k for k, unset in (("protocols", not self.protocols), ("break_glass", not self.break_glass),
                                        ("recording: payload", self.recording == "metadata"),
                                        ("extensions", self.extensions.max_count == 0)) if not unset]
        if lane_only:
            raise ValueError(f"a grant task opens flows for the device, not a lane for an engineer: leave out "
                             f"{', '.join(lane_only)}")
        return self

    @property
    def is_grant(self) -> bool:
        return self.grant is not None


class WeeklyRule(_Entry):
    """Every listed day from `start` to `end` (local time). An end at or before the start runs past
    midnight into the next day; 00:00–24:00 is the whole day."""

    days: list[Day] = Field(min_length=1, max_length=7)
    start: Clock
    end: Clock

    @model_validator(mode="after")
    def _sane(self) -> WeeklyRule:
        if self.start == "24:00":
            raise ValueError("start must be before 24:00")
        if self.start == self.end:
            raise ValueError("start and end are the same: the window would be empty (use 00:00 to 24:00 for a whole day)")
        return self

    def bounds(self) -> tuple[time, time | None]:
        """(start, end) as times; end None means midnight at the end of the day."""
        def t(s: str) -> time:
            h, m = map(int, s.split(":"))
            return time(h, m)
        return t(self.start), (None if self.end == "24:00" else t(self.end))


class OnceRule(_Entry):
    """One dated window, e.g. a planned outage. Times without a zone are in the window's zone."""

    start: datetime
    end: datetime

    @model_validator(mode="after")
    def _sane(self) -> OnceRule:
        if (self.start.tzinfo is None) != (self.end.tzinfo is None):
            raise ValueError("give a zone on both start and end, or on neither")
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class ChangeWindow(_Entry):
    description: Text = ""
    timezone: TimeZone | None = Field(default=None, description="default: the site's time zone")
    weekly: list[WeeklyRule] = Field(default_factory=list, max_length=32)
    once: list[OnceRule] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _some(self) -> ChangeWindow:
        if not self.weekly and not self.once:
            raise ValueError("a change window needs at least one weekly or once rule")
        return self


class Location(_Entry):
    """Requests this rule applies to must come from one of its networks. A rule applies when every
    selector it gives matches (roles: the requester holds one at the device's site; users; tasks);
    a rule with no selector applies to everyone. Every applicable rule must allow the source."""

    description: Text = ""
    roles: list[Role] = Field(default_factory=list)
    users: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=256)
    tasks: list[Name] = Field(default_factory=list, max_length=256)
    networks: list[Network] = Field(min_length=1, max_length=256)


class Limits(_Entry):
    concurrent_sessions_per_user: int = Field(default=2, ge=1, le=100)
    max_silence: Duration | None = Field(default=timedelta(hours=24), description="a device not seen for longer is refused; null: not checked")
    break_glass_max_duration: Duration = Field(default=timedelta(minutes=30), description="the longest break-glass session")
    break_glass_review_within: Duration = Field(default=timedelta(hours=24), description="deadline for the second-person review")

    @field_validator("break_glass_max_duration", "break_glass_review_within")
    @classmethod
    def _bounded(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        most = MAX_SESSION if info.field_name == "break_glass_max_duration" else MAX_REVIEW_WITHIN
        if value <= timedelta(0):
            raise ValueError("must be positive")
        if value > most:
            raise ValueError(f"{format_duration(value)} is too long; at most {format_duration(most)}")
        return value


class PolicyDocument(_Entry):
    """The whole policy, after the files are merged."""

    protocols: dict[ProtocolName, ProtocolDef] = Field(default_factory=dict)
    destinations: dict[Name, Destination] = Field(default_factory=dict)
    device_types: dict[Name, DeviceType] = Field(default_factory=dict)
    tasks: dict[Name, Task] = Field(default_factory=dict)
    change_windows: dict[Name, ChangeWindow] = Field(default_factory=dict)
    locations: dict[Name, Location] = Field(default_factory=dict)
    limits: Limits = Limits()


SECTIONS = ("protocols", "destinations", "device_types", "tasks", "change_windows", "locations")
