"""Inventory API: sites and their agents, device passports, CSV import/export, signed passports.
Reading is scoped to the caller's sites; changes need site_admin at the site (or admin) and step-up."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status

from nodeagent.wire import SignedPassport

from . import devicecsv, passports
from .deps import AuthDep, CurrentPrincipal, Source, TotpHeader
from .errors import Forbidden, NotFound
from .identifiers import ASSET_ID, SITE_NAME
from .inventory import MANAGE_ROLES, Inventory
from .inventory_schemas import (
    AgentCreate,
    BindOut,
    DeviceBind,
    DeviceCreate,
    DevicePage,
    DevicePublic,
    DeviceUpdate,
    ImportResult,
    SiteCreate,
    SitePublic,
    SiteUpdate,
)
from .policy_schemas import CsvImportIn, SigningKeyOut
from .schemas import ErrorOut


def get_inventory(request: Request) -> Inventory:
    return request.app.state.inventory


InventoryDep = Annotated[Inventory, Depends(get_inventory)]
SiteName = Annotated[str, Path(pattern=SITE_NAME.pattern)]
AssetId = Annotated[str, Path(pattern=ASSET_ID.pattern)]
AgentName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
_ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 422, 429)}
router = APIRouter(prefix="/api/v1", responses=_ERRORS)


# ---- sites ----


@router.get("/sites", response_model=list[SitePublic], tags=["sites"], summary="Sites where you hold a role")
def list_sites(caller: CurrentPrincipal, inv: InventoryDep) -> list[SitePublic]:
    return inv.list_sites(caller)


@router.post("/sites", response_model=SitePublic, status_code=status.HTTP_201_CREATED, tags=["sites"], summary="Create a site (admin, step-up)")
def create_site(body: SiteCreate, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep, source: Source,
                totp_code: TotpHeader = None) -> SitePublic:
    if not caller.has_any("admin"):
        raise Forbidden("only an admin creates sites")
    auth.step_up(caller, totp_code, "creating a site", source)
    return inv.create_site(caller, body, source)


@router.get("/sites/{name}", response_model=SitePublic, tags=["sites"], summary="One site")
def get_site(name: SiteName, caller: CurrentPrincipal, inv: InventoryDep) -> SitePublic:
    return inv.get_site(caller, name)


@router.patch("/sites/{name}", response_model=SitePublic, tags=["sites"], summary="Change a site (its site_admin or admin, step-up)")
def update_site(name: SiteName, body: SiteUpdate, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep, source: Source,
                totp_code: TotpHeader = None) -> SitePublic:
    _may_manage(inv, caller, name)
    auth.step_up(caller, totp_code, "changing a site", source)
    return inv.update_site(caller, name, body, source)


@router.delete("/sites/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["sites"], summary="Delete an empty site (admin, step-up)")
def delete_site(name: SiteName, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep, source: Source,
                totp_code: TotpHeader = None) -> Response:
    inv.get_site(caller, name)
    if not caller.has_any("admin"):
        raise Forbidden("only an admin deletes sites")
    auth.step_up(caller, totp_code, "deleting a site", source)
    inv.delete_site(caller, name, source)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/sites/{name}/agents", response_model=SitePublic, status_code=status.HTTP_201_CREATED, tags=["sites"],
             summary="Register a node agent for a site (its site_admin or admin, step-up)")
def add_agent(name: SiteName, body: AgentCreate, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep, source: Source,
              totp_code: TotpHeader = None) -> SitePublic:
    _may_manage(inv, caller, name)
    auth.step_up(caller, totp_code, "registering an agent", source)
    return inv.add_agent(caller, name, body.name, body.description, source)


@router.delete("/sites/{name}/agents/{agent}", status_code=status.HTTP_204_NO_CONTENT, tags=["sites"],
               summary="Remove a node agent (its site_admin or admin, step-up)")
def remove_agent(name: SiteName, agent: AgentName, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep,
                 source: Source, totp_code: TotpHeader = None) -> Response:
    site = _may_manage(inv, caller, name)
    if agent not in {a.name for a in site.agents}:
        raise NotFound(f"site {name} has no agent {agent}")  # before the step-up, so no code is spent on it
    auth.step_up(caller, totp_code, "removing an agent", source)
    inv.remove_agent(caller, name, agent, source)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---- devices ----


@router.get("/devices", response_model=DevicePage, tags=["devices"], summary="Device passports at your sites, by asset ID, a page at a time")
def list_devices(caller: CurrentPrincipal, inv: InventoryDep,
                 site: str | None = Query(None, pattern=SITE_NAME.pattern),
                 device_type: str | None = Query(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$"),
                 lifecycle: str | None = Query(None, pattern=r"^(provisioned|active|quarantined|decommissioned)$"),
                 prefix: str | None = Query(None, pattern=r"^[A-Za-z0-9._:-]{1,64}$", description="asset IDs starting with"),
                 after: str | None = Query(None, pattern=ASSET_ID.pattern, description="the last asset ID of the previous page"),
                 limit: int = Query(100, ge=1, le=1000)) -> DevicePage:
    return inv.list_devices(caller, site=site, device_type=device_type, lifecycle=lifecycle, prefix=prefix, after=after, limit=limit)


@router.post("/devices", response_model=DevicePublic, status_code=status.HTTP_201_CREATED, tags=["devices"],
             summary="Create a device passport (site_admin of its site or admin, step-up)")
def create_device(body: DeviceCreate, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep, source: Source,
                  totp_code: TotpHeader = None) -> DevicePublic:
    if not caller.can(body.site, *MANAGE_ROLES):
        raise Forbidden(f"creating devices at site {body.site} needs site_admin there (or admin)")
    auth.step_up(caller, totp_code, "creating a device", source)
    return inv.create_device(caller, body, source)


@router.post("/devices/import", response_model=ImportResult, tags=["devices"],
             summary="Import passports from CSV, all or nothing (site_admin or admin, step-up)")
def import_devices(body: CsvImportIn, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep, source: Source,
                   totp_code: TotpHeader = None) -> ImportResult:
    if not caller.has_any(*MANAGE_ROLES):
        raise Forbidden("importing devices needs site_admin or admin")
    auth.step_up(caller, totp_code, "importing devices", source)
    return devicecsv.import_devices(inv, caller, body.csv, update_existing=body.update, dry_run=body.dry_run, source=source)


@router.get("/devices/export", tags=["devices"], summary="Passports at your sites as CSV (site_admin, soc, admin)",
            responses={200: {"content": {"text/csv": {}}}})
def export_devices(caller: CurrentPrincipal, inv: InventoryDep, site: str | None = Query(None, pattern=SITE_NAME.pattern)) -> Response:
    if not caller.has_any("site_admin", "soc", "admin"):
        raise Forbidden("exporting devices needs site_admin, soc or admin")
    return Response(devicecsv.export_devices(inv, caller, site), media_type="text/csv")


@router.get("/devices/{asset_id}", response_model=DevicePublic, tags=["devices"], summary="One device passport")
def get_device(asset_id: AssetId, caller: CurrentPrincipal, inv: InventoryDep) -> DevicePublic:
    return inv.get_device(caller, asset_id)


@router.patch("/devices/{asset_id}", response_model=DevicePublic, tags=["devices"],
              summary="Change a passport: lifecycle, addresses, SIM binding… (site_admin or admin, step-up)")
def update_device(asset_id: AssetId, body: DeviceUpdate, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep,
                  source: Source, totp_code: TotpHeader = None) -> DevicePublic:
    device = inv.get_device(caller, asset_id)
    if not caller.can(device.site, *MANAGE_ROLES) or (body.site and not caller.can(body.site, *MANAGE_ROLES)):
        raise Forbidden("changing this device needs site_admin at its site(s), or admin")
    auth.step_up(caller, totp_code, "changing a device", source)
    return inv.update_device(caller, asset_id, body, source)


@router.delete("/devices/{asset_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["devices"],
               summary="Delete a decommissioned device's passport (site_admin or admin, step-up)")
def delete_device(asset_id: AssetId, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep, source: Source,
                  totp_code: TotpHeader = None) -> Response:
    device = inv.get_device(caller, asset_id)
    if not caller.can(device.site, *MANAGE_ROLES):
        raise Forbidden(f"deleting devices at site {device.site} needs site_admin there (or admin)")
    auth.step_up(caller, totp_code, "deleting a device", source)
    inv.delete_device(caller, asset_id, source)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/devices/{asset_id}/bind", response_model=BindOut, tags=["devices"],
             summary="Bind a device's identifiers at installation and activate its passport (site_admin or admin, step-up)")
def bind_device(asset_id: AssetId, body: DeviceBind, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep,
                request: Request, source: Source, totp_code: TotpHeader = None) -> BindOut:
    """The passport turns active (its baseline is enforced from the site's next generation), and the device
    type's commissioning grant, if it names one, is requested for the caller in the same call."""
    device = inv.get_device(caller, asset_id)
    if not caller.can(device.site, *MANAGE_ROLES):
        raise Forbidden(f"binding devices at site {device.site} needs site_admin there (or admin)")
    auth.step_up(caller, totp_code, "binding a device", source)
    bound, rebound = inv.bind(caller, asset_id, body, source)
    commissioning = request.app.state.grants.commission(caller, asset_id, bound.site, bound.device_type, body.reason, source)
    return BindOut(device=bound, rebound=rebound, commissioning=commissioning)


@router.get("/devices/{asset_id}/passport", response_model=SignedPassport, tags=["devices"],
            summary="The device's passport and baseline flows, signed by the controller")
def signed_passport(asset_id: AssetId, caller: CurrentPrincipal, auth: AuthDep, inv: InventoryDep) -> SignedPassport:
    device = inv.device_row(caller, asset_id)
    policy = inv.policies.require_active()
    return passports.sign(passports.passport(device, policy), auth.keys)


@router.get("/controller/signing-key", response_model=SigningKeyOut, tags=["devices"],
            summary="The controller's public signing key, to verify passports")
def signing_key(_caller: CurrentPrincipal, auth: AuthDep) -> SigningKeyOut:
    import base64

    from nodeagent.wire import key_id

    raw = base64.b64decode(auth.keys.public_signing_key())
    return SigningKeyOut(key_id=key_id(raw), public_key=auth.keys.public_signing_key())


def _may_manage(inv: Inventory, caller, name: str) -> SitePublic:
    site = inv.get_site(caller, name)  # 404 first for sites the caller cannot see
    if not caller.can(name, *MANAGE_ROLES):
        raise Forbidden(f"managing site {name} needs site_admin there (or admin)")
    return site
