"""What the inventory API takes and returns: sites, node agents, device passports."""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints, field_validator, model_validator

from . import identifiers as ids
from .policy.model import _timezone
from .schemas import PRINTABLE, UtcTime, _In
from .session_schemas import CommissioningOut

SiteName = Annotated[str, StringConstraints(pattern=ids.SITE_NAME.pattern)]
AssetIdStr = Annotated[str, StringConstraints(pattern=ids.ASSET_ID.pattern)]
TypeName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
WindowName = TypeName
ProtocolName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
Lifecycle = Literal["provisioned", "active", "quarantined", "decommissioned"]
Unpassported = Literal["router", "deny"]
Label = Annotated[str, StringConstraints(max_length=256, pattern=PRINTABLE)]


def _v4net(value: str) -> str:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a network in CIDR form: {exc}") from None
    if net.version != 4:
        raise ValueError(f"{value!r}: IPv4 networks only, for now")
    return str(net)


V4Network = Annotated[str, AfterValidator(_v4net)]
Endpoint = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.:-]{1,253}$")]
TimeZone = Annotated[str, AfterValidator(_timezone)]


def _pool(value: str) -> str:
    net = ipaddress.ip_network(value)
    if net.prefixlen > 30:
        raise ValueError("the tunnel pool must hold at least 4 addresses (/30 or larger)")
    return value


class _SiteFields(_In):
    display_name: str = Field(min_length=1, max_length=128, pattern=PRINTABLE)
    time_zone: TimeZone = "UTC"
    tunnel_pool: Annotated[V4Network, AfterValidator(_pool)] = Field(description="engineers' tunnel addresses, e.g. 100.64.0.0/22")
    port_min: int = Field(ge=1024, le=65535, description="lane listen ports, lowest")
    port_max: int = Field(ge=1024, le=65535, description="lane listen ports, highest")
    public_endpoint: Endpoint = Field(description="host or address engineers' clients dial")
    lan_networks: list[V4Network] = Field(default_factory=list, max_length=64, description="device addresses must lie inside these")
    change_windows: list[WindowName] = Field(default_factory=list, max_length=32, description="names of policy change windows")
    unpassported: Unpassported = Field(default="router", description="the own traffic of hosts in device_networks without an "
                                       "active passport: router = left to the router's firewall, deny = dropped")
    device_networks: list[V4Network] = Field(default_factory=list, max_length=64,
                                             description="where the site's devices live; needed for unpassported = deny")

    @model_validator(mode="after")
    def _ports(self):
        if self.port_max < self.port_min:
            raise ValueError("port_max must be at least port_min")
        if self.unpassported == "deny" and not self.device_networks:
            raise ValueError("unpassported = deny needs device_networks: the networks whose hosts without a passport are dropped")
        return self


class SiteCreate(_SiteFields):
    name: SiteName


class SiteUpdate(_In):
    display_name: str | None = Field(default=None, min_length=1, max_length=128, pattern=PRINTABLE)
    time_zone: TimeZone | None = None
    tunnel_pool: Annotated[V4Network, AfterValidator(_pool)] | None = None
    port_min: int | None = Field(default=None, ge=1024, le=65535)
    port_max: int | None = Field(default=None, ge=1024, le=65535)
    public_endpoint: Endpoint | None = None
    lan_networks: list[V4Network] | None = Field(default=None, max_length=64)
    change_windows: list[WindowName] | None = Field(default=None, max_length=32)
    unpassported: Unpassported | None = None
    device_networks: list[V4Network] | None = Field(default=None, max_length=64)


class AgentIO(BaseModel):
    name: str
    description: str = ""


class AgentCreate(_In):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    description: Label = ""


class SitePublic(BaseModel):
    name: str
    display_name: str
    time_zone: str
    tunnel_pool: str
    port_min: int
    port_max: int
    public_endpoint: str
    lan_networks: list[str]
    change_windows: list[str]
    unpassported: str
    device_networks: list[str]
    agents: list[AgentIO]
    devices: int
    revision: int
    created_at: datetime
    updated_at: datetime


def _addr(value: str) -> str:
    return ids.device_address(value)


def _mac(value: str) -> str:
    return ids.mac(value)


def _iccid(value: str) -> str:
    return ids.iccid(value)


def _eid(value: str) -> str:
    return ids.eid(value)


def _imsi(value: str) -> str:
    return ids.imsi(value)


DeviceAddress = Annotated[str, AfterValidator(_addr)]
Mac = Annotated[str, AfterValidator(_mac)]
Iccid = Annotated[str, AfterValidator(_iccid)]
Eid = Annotated[str, AfterValidator(_eid)]
Imsi = Annotated[str, AfterValidator(_imsi)]
Firmware = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=PRINTABLE)]
PortNumber = Annotated[int, Field(ge=1, le=65535)]


class DeviceFields(_In):
    """Everything on a passport that people set (the controller sets revision and times)."""

    device_type: TypeName
    site: SiteName
    addresses: list[DeviceAddress] = Field(min_length=1, max_length=8)
    mac: Mac | None = None
    iccid: Iccid | None = None
    eid: Eid | None = None
    imsis: list[Imsi] = Field(default_factory=list, max_length=8)
    firmware: Firmware | None = None
    lifecycle: Lifecycle = "provisioned"
    last_seen: UtcTime | None = None
    ports: dict[ProtocolName, PortNumber] = Field(default_factory=dict, max_length=16, description="protocol → port, where the device differs from the catalogue")
    description: Label = ""

    @field_validator("addresses", "imsis")
    @classmethod
    def _unique(cls, values: list[str]) -> list[str]:
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice")
        return values


class DeviceCreate(DeviceFields):
    asset_id: AssetIdStr


class DeviceUpdate(_In):
    """Only the fields given change."""

    device_type: TypeName | None = None
    site: SiteName | None = None
    addresses: list[DeviceAddress] | None = Field(default=None, min_length=1, max_length=8)
    mac: Mac | None = None
    iccid: Iccid | None = None
    eid: Eid | None = None
    imsis: list[Imsi] | None = Field(default=None, max_length=8)
    firmware: Firmware | None = None
    lifecycle: Lifecycle | None = None
    last_seen: UtcTime | None = None
    ports: dict[ProtocolName, PortNumber] | None = Field(default=None, max_length=16)
    description: Label | None = None


class DevicePublic(BaseModel):
    asset_id: str
    device_type: str
    site: str
    addresses: list[str]
    mac: str | None
    iccid: str | None
    eid: str | None
    imsis: list[str]
    firmware: str | None
    lifecycle: str
    last_seen: datetime | None
    ports: dict[str, int]
    description: str
    revision: int
    created_at: datetime
    updated_at: datetime


class DevicePage(BaseModel):
    devices: list[DevicePublic]
    next_after: str | None = Field(description="pass as `after` for the next page; null on the last page")


class ImportRowError(BaseModel):
    line: int
    asset_id: str | None
    field: str
    error: str


class ImportResult(BaseModel):
    created: int
    updated: int
    unchanged: int
    dry_run: bool


class DeviceBind(_In):
    """Identifiers read off a device at installation (`wicket devices bind`): its SIM (ICCID, IMSIs), eUICC
    (EID), MAC, and, if it differs now, its LAN address."""

    iccid: Iccid | None = None
    imsis: list[Imsi] | None = Field(default=None, max_length=8)
    eid: Eid | None = None
    mac: Mac | None = None
    addresses: list[DeviceAddress] | None = Field(default=None, min_length=1, max_length=8)
    rebind: bool = Field(default=False, description="replace identifiers the device is bound to already")
    reason: Annotated[str, StringConstraints(min_length=3, max_length=500, pattern=PRINTABLE)] | None = Field(
        default=None, description="why (a work order): recorded, and the reason of the commissioning grant")

    @model_validator(mode="after")
    def _some(self):
        if not (self.iccid or self.eid or self.mac):
            raise ValueError("give the identifiers read off the device: an ICCID, an EID or a MAC, at least")
        for name in ("imsis", "addresses"):
            values = getattr(self, name) or []
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"{name}: {', '.join(twice)} listed twice")
        return self


class BindOut(BaseModel):
    device: DevicePublic
    rebound: bool = Field(description="identifiers the device was bound to were replaced (`rebind`)")
    commissioning: CommissioningOut | None = Field(description="the device type's commissioning grant, asked for the caller")
