"""Facts from the database → the policy engine. The engine stays pure; this module gathers what it
needs (the user and their grants, the device's passport and posture, its site) for one request."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select

from .auth import Auth, Principal
from .errors import Forbidden, NotFound
from .models import Device, Site, User
from .policy import AccessRequest, Decision, DeviceFacts, SiteFacts, UserFacts, evaluate
from .policy_store import PolicyStore

EXPLAIN_FOR_OTHERS = ("admin", "soc", "approver")


class Decisions:
    def __init__(self, auth: Auth, policies: PolicyStore, active_sessions: Callable[[int], int] = lambda _user_id: 0):
        self.auth, self.factory, self.policies = auth, auth.factory, policies
        self.active_sessions = active_sessions  # sessions arrive with the sessions issue; until then none are open

    def decide(self, *, user_id: int, asset_id: str, task: str, duration: timedelta | None, source: str | None,
               at: datetime | None = None) -> Decision:
        policy = self.policies.require_active()
        with self.factory() as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"no user {user_id}")
            device = s.scalar(select(Device).where(Device.asset_id == asset_id))
            if device is None:
                raise NotFound(f"no device {asset_id}")
            request = AccessRequest(
                user=user_facts(user, self.active_sessions(user.id)), device=device_facts(device), site=site_facts(device.site),
                task=task, duration=duration, at=at or self.auth.now(), source=source,
            )
        return evaluate(policy, request)

    def explain(self, caller: Principal, *, username: str | None, asset_id: str, task: str, duration: timedelta | None,
                source: str | None, at: datetime | None) -> Decision:
        """A dry run: what would the policy decide? Nothing is recorded and nothing opens."""
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


def user_facts(user: User, active_sessions: int) -> UserFacts:
    return UserFacts(username=user.username, kind=user.kind, disabled=user.disabled, deleted=user.deleted_at is not None,
                     valid_from=user.valid_from, valid_until=user.valid_until,
                     roles=tuple((g.role, g.site) for g in user.grants), active_sessions=active_sessions)


def device_facts(device: Device) -> DeviceFacts:
    return DeviceFacts(asset_id=device.asset_id, device_type=device.device_type, site=device.site.name,
                       addresses=tuple(device.addresses), lifecycle=device.lifecycle, last_seen=device.last_seen,
                       ports=tuple(sorted((device.ports or {}).items())))


def site_facts(site: Site) -> SiteFacts:
    return SiteFacts(name=site.name, timezone=site.time_zone, change_windows=tuple(site.change_windows),
                     lan_networks=tuple(site.lan_networks))
