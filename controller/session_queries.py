"""Reading sessions: mine, a site's, the approval queue, and who had access to a device when."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, or_, select

from .auth import Principal
from .errors import Forbidden, NotFound
from .inventory import READ_ROLES
from .models import AccessSession, Device, SessionState, Site
from .session_schemas import AccessRecord, QueueItem, SessionOut
from .sessions import READERS, may_see

S = SessionState
HISTORY_READERS = ("approver", "soc", "admin", "site_admin")


class SessionQueries:
    def __init__(self, auth):
        self.auth, self.factory = auth, auth.factory

    def get(self, caller: Principal, sid: str) -> SessionOut:
        with self.factory() as s:
            row = s.get(AccessSession, sid)
            if row is None or not may_see(caller, row):
                raise NotFound(f"no session {sid}")
            return SessionOut.of(row, self.auth.now())

    def list(self, caller: Principal, *, mine: bool, states: list[str], site: str | None, device: str | None,
             limit: int, unreviewed: bool = False, kind: str | None = None) -> list[SessionOut]:
        """Newest first. `mine`: the caller's own; otherwise every session the caller may see."""
        q = select(AccessSession)
        if kind:
            q = q.where(AccessSession.kind == kind)
        if mine:
            q = q.where(AccessSession.user_id == caller.user_id)
        else:
            sites = caller.sites(*READERS)
            if sites is not None:
                q = q.where(or_(AccessSession.user_id == caller.user_id, AccessSession.site.in_(sorted(sites))))
        if states:
            q = q.where(AccessSession.state.in_(states))
        if site:
            q = q.where(AccessSession.site == site)
        if device:
            q = q.where(AccessSession.asset_id == device)
        if unreviewed:
            q = q.where(AccessSession.break_glass.is_(True), AccessSession.reviewed_at.is_(None),
                        AccessSession.state != S.denied.value)
        q = q.order_by(AccessSession.requested_at.desc(), AccessSession.id).limit(limit)
        now = self.auth.now()
        with self.factory() as s:
            return [SessionOut.of(r, now) for r in s.scalars(q).all()]

    def queue(self, caller: Principal) -> list[QueueItem]:
        """What the caller can approve now: requests and extensions at their approver sites, never their own."""
        sites = caller.sites("approver")
        if sites is not None and not sites:
            return []
        q = select(AccessSession).where(
            AccessSession.user_id != caller.user_id,
            or_(AccessSession.state == S.pending_approval.value,
                (AccessSession.state == S.active.value) & AccessSession.extension_request.is_not(None)))
        if sites is not None:
            q = q.where(AccessSession.site.in_(sorted(sites)))
        now = self.auth.now()
        out = []
        with self.factory() as s:
            for r in s.scalars(q.order_by(AccessSession.requested_at)).all():
                if r.state == S.active.value and not r.extension_request:
                    continue  # JSON null and SQL NULL differ between databases: the row decides
                kind = "request" if r.state == S.pending_approval.value else "extension"
                tag = "request" if kind == "request" else r.extension_request["key"]
                so_far = sum(1 for a in r.approvals if a.kind == tag and a.verdict == "approve")
                if any(a.kind == tag and a.approver_id == caller.user_id for a in r.approvals):
                    continue  # already answered by this approver
                needed = r.approvals_required if kind == "request" else max(1, r.approvals_required)
                out.append(QueueItem(kind=kind, session=SessionOut.of(r, now), approvals_so_far=so_far, approvals_required=needed))
        return out

    def access(self, caller: Principal, asset_id: str, start: datetime, end: datetime) -> list[AccessRecord]:
        """Who had a lane to the device at any moment between `start` and `end`."""
        with self.factory() as s:
            site = s.scalar(select(Site.name).join(Device, Device.site_id == Site.id).where(Device.asset_id == asset_id))
            if site is None:
                # a device since deleted still has a history: find its site from its sessions
                site = s.scalar(select(AccessSession.site).where(AccessSession.asset_id == asset_id).limit(1))
            if site is None or not caller.can(site, *READ_ROLES):
                raise NotFound(f"no device {asset_id}")
            if not caller.can(site, *HISTORY_READERS):
                raise Forbidden(f"who had access to a device is for approvers, soc, site admins and admins at site {site}")
            until = func.coalesce(AccessSession.ended_at, AccessSession.end_at)
            rows = s.scalars(select(AccessSession).where(  # lanes: a grant is the device's own traffic, nobody's access
                AccessSession.asset_id == asset_id, AccessSession.kind == "lane", AccessSession.activated_at.is_not(None),
                AccessSession.activated_at < end, until > start).order_by(AccessSession.activated_at)).all()
            now = self.auth.now()
            return [AccessRecord(session_id=r.id, user=r.username, task=r.task, break_glass=r.break_glass, state=r.state,
                                 start=r.activated_at, end=min(r.ended_at or r.end_at, now) if r.state == "active" else (r.ended_at or r.end_at),
                                 end_reason=r.end_reason,
                                 approved_by=[a.approver for a in r.approvals if a.kind == "request" and a.verdict == "approve"],
                                 tunnel_address=r.tunnel_address, flows=r.flows, policy_version=r.policy_version)
                    for r in rows]
