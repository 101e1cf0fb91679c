"""Grants: temporary changes of devices' own flows (a grant task of the policy), for one device or a group.

  wicket grant open dlms-firmware-window --type meter-concentrator --site north-1 --for 2h --reason "FW 7.2"

A grant is an `AccessSession` of kind "grant" and goes the way of every session (`controller.sessions`):
the same policy engine (its `protocol` check looks at the grant's flows), the same approvals, states and
audit events (their bodies add `kind: grant` and `grant_group`), the same ends by close, revoke and the
clock. What differs: no key, tunnel address or port; the node's desired state lists a `GrantSpec`
(`session_lanes.desired_state`); and the grant is active once the node applied a generation that holds
it with no error naming it (`sessions._grant_refused`). The requester activates an approved grant.

Grants asked for together share a `grant_group` ("g-…") and are decided all or nothing: if the policy
refuses one device, none is created and the refusal is recorded (`session.request`, failure, subject the
group). A group is approved, activated, closed and revoked as one; each grant keeps its own record.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select

from nodeagent.wire import MAX_LANES

from . import events, session_lanes
from .auth import Principal
from .db import scrub, transaction
from .errors import AuditUnavailable, Conflict, Forbidden, Invalid, NodeUnavailable, NotFound
from .inventory import READ_ROLES
from .models import AccessSession, Device, Lifecycle, NodeAgent, SessionState, Site
from .nodelink import LinkElsewhere, LinkError
from .policy import DENY
from .session_schemas import MAX_GROUP, CommissioningOut, GrantOut
from .sessions import (
    GRANT,
    LANED,
    OPEN,
    READERS,
    REVOKERS,
    Sessions,
    _code,
    _context,
    _decision_body,
    _Denied,
    _iso,
    _move,
    _records_refusals,
    _Refusal,
    may_see,
)

S = SessionState


@dataclass(frozen=True)
class Refusal:
    device: str
    reason: str
    failed_checks: list[str]


class GrantRefused(Forbidden):
    """A group the policy refuses for some device: nothing was created."""

    def __init__(self, group: str, refusals: list[Refusal]):
        first = refusals[0]
        super().__init__(f"denied for {len(refusals)} device(s), so no grant was created; {first.device}: {first.reason}")
        self.group, self.refusals = group, refusals

    def extra(self) -> dict:
        return {"grant_group": self.group,
                "refusals": [{"device": r.device, "reason": r.reason, "failed_checks": r.failed_checks} for r in self.refusals]}


class GrantsNotOpened(NodeUnavailable):
    def __init__(self, failed: dict[str, str]):
        sid, why = next(iter(sorted(failed.items())))
        super().__init__(f"the site's agent did not open {len(failed)} grant(s), e.g. {sid}: {why}. Their approvals hold "
                         "until they lapse; try again, or ask the site admin to check the agent")
        self.failed = failed

    def extra(self) -> dict:
        return {"failed": self.failed}


@dataclass(frozen=True)
class Opened:
    group: str
    rows: list[AccessSession]
    activation_error: str | None = None


class Grants:
    def __init__(self, sessions: Sessions):
        self.sessions, self.auth, self.factory = sessions, sessions.auth, sessions.factory

    # ---- request ----

    def devices_for(self, caller: Principal, *, devices: list[str] | None, device_type: str | None,
                    site: str | None) -> dict[str, str]:
        """asset ID → site of the devices asked for, before any TOTP code is spent: a device or site the caller
        cannot see is 404; a type and site name every active device of the type there."""
        with self.factory() as s:
            if devices:
                found = dict(s.execute(select(Device.asset_id, Site.name).join(Site, Device.site_id == Site.id)
                                       .where(Device.asset_id.in_(devices))).all())
                missing = [a for a in devices if a not in found or not caller.can(found[a], *READ_ROLES)]
                if missing:
                    raise NotFound(f"no device {', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}")
                return {a: found[a] for a in devices}
            if s.scalar(select(Site.id).where(Site.name == site)) is None or not caller.can(site, *READ_ROLES):
                raise NotFound(f"no site {site}")
            assets = s.scalars(select(Device.asset_id).join(Site, Device.site_id == Site.id).where(
                Site.name == site, Device.device_type == device_type, Device.lifecycle == Lifecycle.active.value)
                .order_by(Device.asset_id).limit(MAX_GROUP + 1)).all()
        if not assets:
            raise Conflict(f"site {site} has no active {device_type}: nothing to grant")
        if len(assets) > MAX_GROUP:
            raise Invalid(f"site {site} has more than {MAX_GROUP} active {device_type}s; a grant request takes at most "
                          f"{MAX_GROUP} devices: name them in groups (`devices`)")
        return {a: site for a in assets}

    def not_a_lane(self, task: str):
        """The active policy, once it is clear `task` is not a lane task (an unknown one is the policy's to refuse)."""
        policy = self.sessions.policies.require_active()
        found = policy.document.tasks.get(task)
        if found is not None and not found.is_grant:
            raise Invalid(f"task {task!r} opens engineers' lanes, not grants: request it with `wicket request`")
        return policy

    def request(self, caller: Principal, *, task: str, devices: dict[str, str], duration: timedelta | None, reason: str,
                source: str | None, activate: bool = True) -> Opened:
        """One grant per device (`devices`: asset ID → site, from `devices_for`), all or nothing; opened at once
        when no approval is needed and `activate`."""
        policy = self.not_a_lane(task)
        decided = [(asset, self.sessions.decisions.decide(user_id=caller.user_id, asset_id=asset, task=task, duration=duration,
                                                          source=source)) for asset in devices]
        group, now = new_group_id(), self.auth.now()
        refusals = [Refusal(asset, d.reason, list(d.failed)) for asset, d in decided if d.outcome == DENY]
        if refusals:
            with transaction(self.factory) as s:
                events.record(s, at=now, category="session", type="session.request", result="failure", actor_id=caller.user_id,
                              actor=caller.username, subject=group, source=source, reason=_code(refusals[0].failed_checks[0]),
                              state=S.denied.value, kind=GRANT, grant_group=group, task=task, request_reason=reason,
                              devices=list(devices)[:100], device_count=len(devices), policy_version=policy.version,
                              refusals=[{"device": r.device, "reason": r.reason, "failed_checks": r.failed_checks}
                                        for r in refusals[:100]], refused_count=len(refusals))
            raise GrantRefused(group, refusals)
        settings = self.sessions.settings
        ids = []
        with transaction(self.factory) as s:
            for asset, decision in decided:
                if decision.approvals_required:
                    state, expires = S.pending_approval, now + timedelta(seconds=settings.request_ttl_s)
                else:
                    state, expires = S.approved, now + timedelta(seconds=settings.approval_ttl_s)
                row = self.sessions._new(s, caller, asset, devices[asset], task, reason, decision, state, expires, source, now,
                                         public_key=None, break_glass=False, incident=None, kind=GRANT, grant_group=group)
                events.record(s, at=now, category="session", type="session.request", result="success", actor_id=caller.user_id,
                              actor=caller.username, subject=row.id, source=source, state=state.value, **_context(row),
                              request_reason=reason, **_decision_body(decision))
                ids.append(row.id)
        error = None
        if activate and all(d.approvals_required == 0 for _, d in decided):
            try:
                self.activate(caller, ids, source, approved_by_policy=True)
            except (Conflict, NodeUnavailable, Forbidden) as exc:
                error = exc.detail
        return Opened(group, self._rows(ids), error)

    def commission(self, caller: Principal, asset_id: str, site: str, device_type: str, reason: str | None,
                   source: str | None) -> CommissioningOut | None:
        """The grant a device type's `commissioning` names, for the installer who bound the device: decided like
        any grant request (refused, waiting for approval, or open at once); None if the type names none."""
        policy = self.sessions.policies.require_active()
        dt = policy.document.device_types.get(device_type)
        if dt is None or dt.commissioning is None:
            return None
        try:
            opened = self.request(caller, task=dt.commissioning, devices={asset_id: site}, duration=None, source=source,
                                  reason=reason or f"commissioning of {asset_id}, bound at installation")
        except GrantRefused as refused:
            return CommissioningOut(task=dt.commissioning, grant=None, refused=refused.refusals[0].reason)
        return CommissioningOut(task=dt.commissioning, grant=GrantOut.of(opened.rows[0], self.auth.now()),
                                activation_error=opened.activation_error)

    # ---- activation ----

    def activate(self, caller: Principal, sids: list[str], source: str | None, *, approved_by_policy: bool = False) -> list[AccessSession]:
        """Open approved grants (the caller's own), all or none: each decided again, handed to its node, and
        active once the node holds it. GrantsNotOpened names those the node did not open (back to approved)."""
        opened = self._open(caller, sids, source, approved_by_policy)
        failed = self._hand_over(caller, opened, source)
        if failed:
            raise GrantsNotOpened(failed)
        return self._rows(sids)

    @_records_refusals
    def _open(self, caller: Principal, sids: list[str], source: str | None, approved_by_policy: bool) -> dict[str, str]:
        now = self.auth.now()
        opened, decisions, nodes = {}, {}, {}
        with transaction(self.factory) as s:
            rows = [self.sessions._lock(s, caller, sid) for sid in sorted(sids)]
            for row in rows:
                self.sessions._own(caller, row, "activate")
                if row.kind != GRANT:
                    raise Conflict(f"{row.id} is a lane, not a grant: `wicket activate` opens it")
                if row.state != S.approved.value:
                    raise Conflict(f"grant {row.id} is {row.state}: only an approved grant can be activated")
                if row.expires_at and row.expires_at <= now:
                    raise Conflict(f"grant {row.id}'s approval lapsed at {_iso(row.expires_at)}; request again")
                decision = self.sessions._decide_again(row, timedelta(seconds=row.duration_s), now)
                if decision.outcome == DENY:
                    raise _Refusal(_Denied(decision, row.id), caller, row, "session.activate", _code(decision.failed[0]), source,
                                   now, **_decision_body(decision))
                if row.site not in nodes:
                    nodes[row.site] = _grant_node(s, row.site)
                row.node, row.device_address = nodes[row.site], decision.grant_address
                row.flows = [f.as_dict() for f in decision.grant]
                row.lane_revision += 1
                row.checked_policy = decision.policy_version
                _move(row, S.opening, activated_at=now, end_at=now + decision.duration, warned_at=None)
                opened[row.id], decisions[row.id] = row.node, decision
            s.flush()
            generations = {}
            for node in sorted(set(opened.values())):
                _room_for_grants(s, node)
                session_lanes.bump(s, node)
                generations[node] = s.scalar(select(NodeAgent.generation).where(NodeAgent.name == node))
            for row in rows:
                row.opened_generation = generations[row.node]
                events.record(s, at=now, category="session", type="session.activate", result="success", actor_id=caller.user_id,
                              actor=caller.username, subject=row.id, source=source, state=row.state, node=row.node,
                              device_address=row.device_address, flows=row.flows, end_at=_iso(row.end_at),
                              approval="policy" if approved_by_policy else "approvers", **_context(row),
                              **_decision_body(decisions[row.id]))
        return opened

    def _hand_over(self, caller: Principal, opened: dict[str, str], source: str | None) -> dict[str, str]:
        """Push each node its new generation and wait until it holds the grants; those it did not open go back
        to approved. Returns session ID → why, for those."""
        failed: dict[str, str] = {}
        for node in sorted(set(opened.values())):
            mine = [sid for sid, n in opened.items() if n == node]
            try:
                self.sessions.pusher.push(node)
            except LinkElsewhere:
                pass  # another replica holds the node's link and pushes; the acknowledgement reaches the database
            except LinkError as exc:
                failed |= dict.fromkeys(mine, str(exc))
            except AuditUnavailable:
                for sid in mine:
                    self.sessions._undo_activation(caller, sid, node, "the grant's opening could not be recorded", source)
                raise
        timeout = self.sessions.settings.ack_timeout_s
        waiting, deadline = [sid for sid in opened if sid not in failed], time.monotonic() + timeout
        while waiting:
            with self.factory() as s:
                states = dict(s.execute(select(AccessSession.id, AccessSession.state).where(AccessSession.id.in_(waiting))).all())
            for sid in list(waiting):
                if states.get(sid) != S.opening.value:
                    waiting.remove(sid)
                    if states.get(sid) != S.active.value:  # `acknowledge` put it back, with the node's reason
                        failed[sid] = self.sessions._last_activation_error(sid) or f"node {opened[sid]} did not open the grant"
            if not waiting or time.monotonic() >= deadline:
                break
            with self.sessions._acked:
                self.sessions._acked.wait(0.05)
        failed |= {sid: f"node {opened[sid]} did not acknowledge the grant within {timeout:g} s" for sid in waiting}
        for sid, why in failed.items():
            self.sessions._undo_activation(caller, sid, opened[sid], why, source)  # a no-op for those already back
        return failed

    # ---- approval and ends ----

    def answer(self, caller: Principal, ref: str, *, approve: bool, reason: str, source: str | None) -> list[AccessSession]:
        """An approver's answer to every pending request of a group (or to one grant)."""
        sids = self.pending(caller, ref)
        for sid in sids:
            self.sessions.answer(caller, sid, approve=approve, reason=reason, source=source)
        return self._rows(self.resolve(caller, ref))

    def pending(self, caller: Principal, ref: str) -> list[str]:
        """The grants of `ref` that wait for approval, each one the caller may answer (checked before a TOTP
        code is spent, and again under each grant's lock)."""
        sids = [sid for sid, state in self._states(caller, ref) if state == S.pending_approval.value]
        if not sids:
            raise Conflict(f"{ref}: no grant waits for approval")
        for sid in sids:
            self.sessions.guard(caller, sid, "approve")
        return sids

    def approved(self, caller: Principal, ref: str) -> list[str]:
        """The caller's grants of `ref` that wait to be activated."""
        states = self._states(caller, ref)
        with self.factory() as s:
            owners = set(s.scalars(select(AccessSession.user_id).where(AccessSession.id.in_([sid for sid, _ in states]))))
        if owners != {caller.user_id}:
            raise Forbidden(f"only whoever requested {ref} can activate it")
        sids = [sid for sid, state in states if state == S.approved.value]
        if not sids:
            raise Conflict(f"{ref}: no grant is approved and waiting to be opened ({_summary(states)})")
        return sids

    def close(self, caller: Principal, ref: str, reason: str, source: str | None) -> list[AccessSession]:
        """Sign-off: the requester ends the grants early (or withdraws the request); each is `closed`,
        recorded as `session.close` with reason `signed_off` and the caller's words as its note."""
        return self._end_all(caller, ref, S.closed, "signed_off", reason, source, owner_only=True)

    def revoke(self, caller: Principal, ref: str, reason: str, source: str | None) -> list[AccessSession]:
        return self._end_all(caller, ref, S.revoked, "revoked", reason, source, owner_only=False)

    def _end_all(self, caller, ref: str, to: SessionState, code: str, note: str, source, *, owner_only: bool) -> list[AccessSession]:
        sids = self.resolve(caller, ref)
        nodes = set()
        with transaction(self.factory) as s:
            rows = [self.sessions._lock(s, caller, sid) for sid in sids]
            for row in rows:
                if owner_only:
                    self.sessions._own(caller, row, "sign off")
                elif not caller.can(row.site, *REVOKERS):
                    raise Forbidden(f"revoking needs the approver, soc or admin role at site {row.site}")
            live = [row for row in rows if row.state in OPEN]
            if not live:
                raise Conflict(f"{ref} has already ended ({_summary([(r.id, r.state) for r in rows])})")
            for row in live:
                nodes.add(self.sessions._end(s, row, to, code, caller, source, note=note))
        scrub(self.factory.kw["bind"])
        self.sessions.pusher.push_quietly(nodes)
        return self._rows(sids)

    # ---- reading ----

    def list(self, caller: Principal, *, mine: bool, states: list[str], site: str | None, device: str | None,
             group: str | None, task: str | None, limit: int) -> list[AccessSession]:
        """Newest first. `mine`: the caller's own; otherwise every grant the caller may see."""
        q = select(AccessSession).where(AccessSession.kind == GRANT)
        if mine:
            q = q.where(AccessSession.user_id == caller.user_id)
        else:
            sites = caller.sites(*READERS)
            if sites is not None:
                q = q.where(or_(AccessSession.user_id == caller.user_id, AccessSession.site.in_(sorted(sites))))
        for column, value in ((AccessSession.site, site), (AccessSession.asset_id, device),
                              (AccessSession.grant_group, group), (AccessSession.task, task)):
            if value:
                q = q.where(column == value)
        if states:
            q = q.where(AccessSession.state.in_(states))
        with self.factory() as s:
            return list(s.scalars(q.order_by(AccessSession.requested_at.desc(), AccessSession.id).limit(limit)))

    def resolve(self, caller: Principal, ref: str) -> list[str]:
        """The grants `ref` names (a grant's session ID, or a group's ID) that the caller may see; 404 for none."""
        return [sid for sid, _ in self._states(caller, ref)]

    def rows(self, caller: Principal, ref: str) -> list[AccessSession]:
        return self._rows(self.resolve(caller, ref))

    def _states(self, caller: Principal, ref: str) -> list[tuple[str, str]]:
        column = AccessSession.grant_group if ref.startswith("g-") else AccessSession.id
        with self.factory() as s:
            rows = s.scalars(select(AccessSession).where(column == ref, AccessSession.kind == GRANT)
                             .order_by(AccessSession.asset_id)).all()
            out = [(r.id, r.state) for r in rows if may_see(caller, r)]
        if not out:
            raise NotFound(f"no grant {ref}")
        return out

    def _rows(self, sids: list[str]) -> list[AccessSession]:
        with self.factory() as s:
            rows = s.scalars(select(AccessSession).where(AccessSession.id.in_(sids))).all()
        return sorted(rows, key=lambda r: r.asset_id)


def new_group_id() -> str:
    """"g-" and 12 base32 characters, like a session ID."""
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    return "g-" + "".join(secrets.choice(alphabet) for _ in range(12))


def _grant_node(s, site_name: str) -> str:
    """The site's node for grants: the node that carries its lanes, if its agent enforces grants (v4)."""
    site = s.scalar(select(Site).where(Site.name == site_name))
    node = session_lanes.node_for(s, site, GRANT)
    version = s.scalar(select(NodeAgent.protocol_version).where(NodeAgent.name == node))
    if version is not None and version < 4:
        raise Conflict(f"node {node} at site {site_name} runs agent protocol v{version}, which enforces no grants: "
                       "upgrade the agent first")
    return node


def _room_for_grants(s, node: str) -> None:
    held = s.scalar(select(func.count()).select_from(AccessSession).where(
        AccessSession.node == node, AccessSession.state.in_(LANED), AccessSession.kind == GRANT))
    if held > MAX_LANES:
        raise Conflict(f"node {node} would carry {held} grants, more than the {MAX_LANES} one node takes: open fewer at once")


def _summary(states: list[tuple[str, str]]) -> str:
    counts: dict[str, int] = {}
    for _, state in states:
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
