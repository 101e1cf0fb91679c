"""Facts from the database → the policy engine. The engine stays pure; this module gathers what it
needs (the user and their grants, the device's passport and posture, its site) for one request."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, bindparam, func, select

from .auth import Auth, Principal
from .errors import Forbidden, NotFound
from .inventory import READ_ROLES
from .models import Device, RoleGrant, Site, User
from .policy import AccessRequest, Decision, DeviceFacts, SiteFacts, UserFacts, evaluate
from .policy_store import PolicyStore

EXPLAIN_FOR_OTHERS = ("admin", "soc", "approver")
# One statement and one row, built once: constructing a statement costs more than SQLite takes to run it.
# The user's grants come as one text, "role@site,role@*" (role and site names hold neither "@" nor ",");
# the device and site columns are None when there is no such device.
_GRANTS = (select(func.aggregate_strings(RoleGrant.role + "@" + func.coalesce(RoleGrant.site, "*"), ","))
           .where(RoleGrant.user_id == User.id).scalar_subquery())
_FACTS = (select(User.username, User.kind, User.disabled, User.deleted_at, User.valid_from, User.valid_until,
                 _GRANTS.label("grants"),
                 Device.asset_id, Device.device_type, Device.addresses, Device.lifecycle, Device.last_seen, Device.ports,
                 Site.name, Site.time_zone, Site.change_windows, Site.lan_networks)
          .select_from(User)
          .outerjoin(Device, Device.asset_id == bindparam("asset_id"))
          .outerjoin(Site, Site.id == Device.site_id)
          .where(User.id == bindparam("user_id")))


class Decisions:
    def __init__(self, auth: Auth, policies: PolicyStore, engine: Engine,
                 active_sessions: Callable[[int], int] = lambda _user_id: 0):
        self.auth, self.factory, self.policies = auth, auth.factory, policies
        self.active_sessions = active_sessions  # the user's active sessions, for the concurrency check
        # The facts are one statement, its own consistent snapshot: on a server, autocommit saves the BEGIN
        # and ROLLBACK round trips (twice the decisions/s on PostgreSQL); on SQLite, switching modes costs more.
        self._reads = engine if engine.dialect.name == "sqlite" else engine.execution_options(isolation_level="AUTOCOMMIT")

    def decide(self, *, user_id: int, asset_id: str, task: str, duration: timedelta | None, source: str | None,
               at: datetime | None = None, break_glass: bool = False) -> Decision:
        policy = self.policies.require_active()
        # One column query and no ORM objects: loading whole rows was most of a decision's time
        # (docs/benchmarks.md, "Policy decisions").
        with self._reads.connect() as conn:
            found = conn.execute(_FACTS, {"user_id": user_id, "asset_id": asset_id}).first()
        if found is None:
            raise NotFound(f"no user {user_id}")
        if found.asset_id is None:
            raise NotFound(f"no device {asset_id}")
        roles = [(role, None if site == "*" else site) for role, _, site in
                 (grant.partition("@") for grant in (found.grants or "").split(",") if grant)]
        user = user_facts(found, roles, self.active_sessions(user_id))
        device, site = device_facts(found, found.name), site_facts(found)
        request = AccessRequest(user=user, device=device, site=site, task=task, duration=duration,
                                at=at or self.auth.now(), source=source, break_glass=break_glass)
        return evaluate(policy, request)

    def explain(self, caller: Principal, *, username: str | None, asset_id: str, task: str, duration: timedelta | None,
                source: str | None, at: datetime | None) -> Decision:
        """A dry run: what would the policy decide? Nothing is recorded and nothing opens. The caller
        must be able to read the device (a role at its site), as for GET /devices/{id}: the trace
        shows the device's address and posture."""
        with self.factory() as s:
            site = s.scalar(select(Site.name).join(Device, Device.site_id == Site.id).where(Device.asset_id == asset_id))
        if site is None or not caller.can(site, *READ_ROLES):
            raise NotFound(f"no device {asset_id}")
        if username and username != caller.username:
            if not caller.has_any(*EXPLAIN_FOR_OTHERS):
                raise Forbidden("explaining decisions for someone else needs admin, soc or approver")
            with self.factory() as s:
                user_id = s.scalar(select(User.id).where(User.username == username, User.deleted_at.is_(None)))
            if user_id is None:
                raise NotFound(f"no user {username}")
        else:
            user_id = caller.user_id
        return self.decide(user_id=user_id, asset_id=asset_id, task=task, duration=duration, source=source, at=at)


def user_facts(user, roles, active_sessions: int) -> UserFacts:
    """`user`: a User or a row with its columns; `roles`: (role, site) pairs."""
    return UserFacts(username=user.username, kind=user.kind, disabled=user.disabled, deleted=user.deleted_at is not None,
                     valid_from=user.valid_from, valid_until=user.valid_until, roles=tuple(roles),
                     active_sessions=active_sessions)


def device_facts(device, site: str) -> DeviceFacts:
    """`device`: a Device or a row with its columns."""
    return DeviceFacts(asset_id=device.asset_id, device_type=device.device_type, site=site,
                       addresses=tuple(device.addresses), lifecycle=device.lifecycle, last_seen=device.last_seen,
                       ports=tuple(sorted((device.ports or {}).items())))


def site_facts(site) -> SiteFacts:
    """`site`: a Site or a row with its columns."""
    return SiteFacts(name=site.name, timezone=site.time_zone, change_windows=tuple(site.change_windows),
                     lan_networks=tuple(site.lan_networks))
