"""Sessions: request, approval, activation, one-time config, extension, close, revoke, break-glass, review.

  denied | pending_approval ─approve×N→ approved ─activate→ opening ─node acknowledges→ active ─→ closed | expired | revoked
                            └─reject→ rejected           └─node fails or is silent→ approved

A session is an engineer's lane (kind "lane"), or a grant (kind "grant": a temporary change of a device's
own flows, `controller.grants`), which goes through the same states, approvals, acknowledgement and ends.

Every change to a session happens in one transaction that first locks its row (an UPDATE, which
serialises writers on SQLite and PostgreSQL alike), re-reads it, checks the move is still allowed, and
writes the audit event with the policy decision. An approval is used up by the activation it allows;
an unused one lapses (`expires_at`). The lane itself is handed to the node after the commit
(`session_lanes.Pusher`); the agent enforces the end time on its own clock.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import events, session_evidence, session_lanes
from .auth import Auth, Principal
from .db import scrub, transaction
from .decisions import Decisions
from .errors import AuditUnavailable, Conflict, Forbidden, Gone, Invalid, NodeUnavailable, NotFound
from .inventory import READ_ROLES
from .models import AccessSession, Device, Event, NodeAgent, SessionApproval, SessionState, Site, User
from .nodelink import LinkElsewhere, LinkError
from .policy import DENY, Decision
from .policy.durations import format_duration
from .policy_store import PolicyStore
from .settings import Settings
from .wgconf import EngineerConfig, render

S = SessionState
LANE, GRANT = "lane", "grant"
OPEN = (S.pending_approval.value, S.approved.value, S.opening.value, S.active.value)
LANED = (S.opening.value, S.active.value)  # states whose lane is in the node's desired state
READERS = ("approver", "soc", "admin", "site_admin")  # may see every session at a site
REVOKERS = ("approver", "soc", "admin")
REVIEWERS = ("approver", "soc", "admin")
# On a re-check of a running session these checks do not end it: the clock already bounds it (duration,
# which extensions may take past the task's default), it is one of the sessions counted (concurrency),
# and a device falling silent during the work is not the engineer's doing (device_seen).
RECHECK_IGNORES = frozenset({"duration", "concurrency", "device_seen"})


class _Refusal(Exception):
    """A refused action that is recorded. Raised inside the action's transaction and recorded by
    `_records_refusals` after it has rolled back: on SQLite a second transaction could not write while
    the first holds the lock."""

    def __init__(self, error, caller, row, type_: str, reason: str, source, now, **body):
        super().__init__(error.detail)
        self.error = error
        self.event = dict(at=now, category="session", type=type_, result="failure", actor_id=caller.user_id,
                          actor=caller.username, subject=row.id, source=source, reason=reason, **_context(row), **body)


def _records_refusals(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except _Refusal as refusal:
            with transaction(self.factory) as s:
                events.record(s, **refusal.event)
            raise refusal.error from None

    return wrapper


@dataclass(frozen=True)
class Opened:
    session: AccessSession
    activation_error: str | None = None


class Sessions:
    def __init__(self, auth: Auth, policies: PolicyStore, decisions: Decisions, pusher: session_lanes.Pusher, settings: Settings):
        self.auth, self.factory, self.policies, self.decisions = auth, auth.factory, policies, decisions
        self.pusher, self.settings = pusher, settings
        self._acked = threading.Condition()
        pusher.on_applied = self.acknowledge

    # ---- request ----

    def request(self, caller: Principal, *, asset_id: str, task: str, duration: timedelta | None, reason: str,
                public_key: str | None, source: str | None, activate: bool = True) -> Opened:
        """A request, decided at once: denied, pending approval, or approved (and then activated)."""
        site = self._visible_site(caller, asset_id)
        self.not_a_grant(task)
        decision = self.decisions.decide(user_id=caller.user_id, asset_id=asset_id, task=task, duration=duration, source=source)
        now = self.auth.now()
        if decision.outcome == DENY:
            state, expires = S.denied, None
        elif decision.approvals_required:
            state, expires = S.pending_approval, now + timedelta(seconds=self.settings.request_ttl_s)
        else:
            state, expires = S.approved, now + timedelta(seconds=self.settings.approval_ttl_s)
        with transaction(self.factory) as s:
            row = self._new(s, caller, asset_id, site, task, reason, decision, state, expires, source, now,
                            public_key=public_key, break_glass=False, incident=None)
            events.record(s, at=now, category="session", type="session.request", result="failure" if state == S.denied else "success",
                          actor_id=caller.user_id, actor=caller.username, subject=row.id, source=source,
                          reason=_code(decision.failed[0]) if decision.failed else None, state=state.value,
                          **_context(row), request_reason=reason, **_decision_body(decision))
        if state == S.approved and activate:
            try:
                return Opened(self._activate(caller, row.id, public_key, source, approved_by_policy=True))
            except (Conflict, NodeUnavailable, Forbidden) as exc:
                return Opened(self._get(row.id), activation_error=exc.detail)
        return Opened(self._get(row.id))

    def break_glass(self, caller: Principal, *, asset_id: str, task: str, duration: timedelta | None, reason: str,
                    incident: str, public_key: str | None, source: str | None) -> AccessSession:
        """Emergency access: no approval, a shorter maximum, payload recording, a loud event, a review owed."""
        site = self._visible_site(caller, asset_id)
        self.not_a_grant(task)
        decision = self.decisions.decide(user_id=caller.user_id, asset_id=asset_id, task=task, duration=duration,
                                         source=source, break_glass=True)
        now = self.auth.now()
        state = S.denied if decision.outcome == DENY else S.approved
        with transaction(self.factory) as s:
            row = self._new(s, caller, asset_id, site, task, reason, decision, state, now + timedelta(minutes=5), source, now,
                            public_key=public_key, break_glass=True, incident=incident)
            events.record(s, at=now, category="session", type="break_glass.open", result="failure" if state == S.denied else "success",
                          actor_id=caller.user_id, actor=caller.username, subject=row.id, source=source,
                          reason=_code(decision.failed[0]) if decision.failed else None, severity="high", state=state.value,
                          incident=incident, request_reason=reason, **_context(row), **_decision_body(decision))
        if state == S.denied:
            raise _Denied(decision, row.id)
        return self._activate(caller, row.id, public_key, source, approved_by_policy=True)

    def _new(self, s: Session, caller, asset_id, site, task, reason, decision: Decision, state, expires, source, now, *,
             public_key, break_glass, incident, kind: str = LANE, grant_group: str | None = None) -> AccessSession:
        row = AccessSession(
            id=new_id(), kind=kind, grant_group=grant_group, user_id=caller.user_id, username=caller.username,
            asset_id=asset_id, site=site, task=task,
            reason=reason, incident=incident, break_glass=break_glass, state=state.value, source=source,
            duration_s=int(decision.duration.total_seconds()) if decision.duration else 0,
            approvals_required=decision.approvals_required, policy_version=decision.policy_version,
            decision=decision.as_dict(), recording=decision.recording or "metadata", requested_at=now, expires_at=expires,
            approved_at=now if state == S.approved else None, extensions=[], flows=[], lane_revision=0,
            key_mode="byok" if public_key else None, engineer_public_key=public_key,
        )
        s.add(row)
        s.flush()
        return row

    # ---- approval ----

    @_records_refusals
    def answer(self, caller: Principal, sid: str, *, approve: bool, reason: str, source: str | None) -> AccessSession:
        """An approver's answer to a pending request, or to an extension awaiting re-approval."""
        now = self.auth.now()
        pushed = None
        with transaction(self.factory) as s:
            row = self._lock(s, caller, sid)
            if not caller.can(row.site, "approver"):
                raise Forbidden(f"approving needs the approver role at site {row.site}")
            if row.user_id == caller.user_id:
                raise _Refusal(Forbidden("nobody approves their own request: another approver must"),
                               caller, row, "session.approve", "self_approval", source, now)
            if row.state == S.pending_approval.value:
                kind = "request"
            elif row.state == S.active.value and row.extension_request:
                kind = row.extension_request["key"]
            else:
                raise Conflict(f"session {sid} is {row.state}: there is nothing to approve")
            try:
                with s.begin_nested():
                    s.add(SessionApproval(session_id=sid, kind=kind, approver_id=caller.user_id, approver=caller.username,
                                          verdict="approve" if approve else "reject", reason=reason, at=now))
            except IntegrityError:
                raise Conflict(f"you have already answered this {kind.split(':')[0]}") from None
            s.flush()
            s.refresh(row)
            if kind == "request":
                self._answer_request(s, caller, row, approve, reason, source, now)
            else:
                pushed = self._answer_extension(s, caller, row, kind, approve, reason, source, now)
        if pushed:
            self.pusher.push_quietly([pushed])
        return self._get(sid)

    def _answer_request(self, s, caller, row: AccessSession, approve: bool, reason, source, now) -> None:
        approvals = [a for a in row.approvals if a.kind == "request" and a.verdict == "approve"]
        base = dict(actor_id=caller.user_id, actor=caller.username, subject=row.id, source=source, at=now)
        if not approve:
            _move(row, S.rejected, ended_at=now, end_reason="rejected", ended_by=caller.username, expires_at=None)
            events.record(s, category="session", type="session.reject", result="success", reason="rejected", **base,
                          approver_reason=reason, state=row.state, **_context(row), **_stored_decision(row))
            return
        done = len(approvals) >= row.approvals_required
        if done:
            _move(row, S.approved, approved_at=now, expires_at=now + timedelta(seconds=self.settings.approval_ttl_s))
        events.record(s, category="session", type="session.approve", result="success", **base, approver_reason=reason,
                      approvals=len(approvals), approvals_required=row.approvals_required, state=row.state,
                      **_context(row), **_stored_decision(row))

    def _answer_extension(self, s, caller, row: AccessSession, kind: str, approve: bool, reason, source, now) -> str | None:
        ext = row.extension_request
        base = dict(actor_id=caller.user_id, actor=caller.username, subject=row.id, source=source, at=now)
        if not approve:
            row.extension_request = None
            events.record(s, category="session", type="session.extension_reject", result="success", reason="rejected", **base,
                          approver_reason=reason, extension_reason=ext["reason_code"], **_context(row), **_stored_decision(row))
            return None
        approvals = [a for a in row.approvals if a.kind == kind and a.verdict == "approve"]
        needed = max(1, row.approvals_required)
        if len(approvals) < needed:
            events.record(s, category="session", type="session.extension_approve", result="success", **base,
                          approvals=len(approvals), approvals_required=needed, approver_reason=reason, **_context(row))
            return None
        decision = self._recheck_extension(row, timedelta(seconds=ext["by_s"]), now)
        self._apply_extension(s, row, ext, caller.username, now, decision, approved_by=[a.approver for a in approvals])
        events.record(s, category="session", type="session.extend", result="success", **base, extension_reason=ext["reason_code"],
                      by=format_duration(timedelta(seconds=ext["by_s"])), approved_by=[a.approver for a in approvals],
                      end_at=_iso(row.end_at), **_context(row), **_decision_body(decision))
        return row.node

    # ---- activation and config ----

    def activate(self, caller: Principal, sid: str, public_key: str | None, source: str | None) -> AccessSession:
        return self._activate(caller, sid, public_key, source, approved_by_policy=False)

    @_records_refusals
    def _activate(self, caller: Principal, sid: str, public_key: str | None, source: str | None, *,
                  approved_by_policy: bool) -> AccessSession:
        now = self.auth.now()
        with transaction(self.factory) as s:
            row = self._lock(s, caller, sid)
            self._own(caller, row, "activate")
            _lane_only(row, "activated here: `wicket grant activate` (POST /api/v1/grants/{id}/activate) opens it")
            if row.state != S.approved.value:
                raise Conflict(f"session {sid} is {row.state}: only an approved session can be activated")
            if row.expires_at and row.expires_at <= now:
                raise Conflict(f"session {sid}'s approval lapsed at {_iso(row.expires_at)}; request again")
            key = public_key or row.engineer_public_key
            decision = self._decide_again(row, timedelta(seconds=row.duration_s), now)
            if decision.outcome == DENY:
                raise _Refusal(_Denied(decision, sid), caller, row, "session.activate", _code(decision.failed[0]), source, now,
                               **_decision_body(decision))
            site = s.scalar(select(Site).where(Site.name == row.site))
            node = session_lanes.node_for(s, site)
            address, port = session_lanes.lease(s, sid, site)
            private = None
            if key is None:
                private, key = session_lanes.mint_keypair()
            access = decision.access
            row.node, row.tunnel_address, row.listen_port = node, address, port
            row.device_address = access[0].address
            row.flows = _flows(access)
            row.key_mode = "byok" if private is None else "minted"
            row.engineer_public_key = key
            row.sealed_private_key = self.auth.keys.seal(private, f"wg:{sid}") if private else None
            row.lane_revision += 1
            row.checked_policy = decision.policy_version
            # expires_at stays: should the node fail to open the lane, the approval is unspent until then
            _move(row, S.opening, activated_at=now, end_at=now + decision.duration, warned_at=None)
            session_lanes.bump(s, node)
            row.opened_generation = s.scalar(select(NodeAgent.generation).where(NodeAgent.name == node))
            events.record(s, at=now, category="session", type="session.activate", result="success", actor_id=caller.user_id,
                          actor=caller.username, subject=sid, source=source, state=row.state, node=node,
                          tunnel_address=address, listen_port=port, key_mode=row.key_mode, end_at=_iso(row.end_at),
                          approval="policy" if approved_by_policy else "approvers", **_context(row), **_decision_body(decision))
        # The session is `opening` until the node acknowledges a generation that holds its lane (`acknowledge`).
        error = None
        try:
            self.pusher.push(node)
        except LinkElsewhere:
            pass  # another replica holds the node's link and pushes; the acknowledgement reaches the database
        except LinkError as exc:
            error = str(exc)
        except AuditUnavailable:  # the node opened the lane but its opening could not be recorded: undo it
            self._undo_activation(caller, sid, node, "the lane's opening could not be recorded", source)
            raise
        row = self._await_open(sid) if error is None else None
        if row is not None and row.state == S.active.value:
            return row
        if row is not None and row.state == S.opening.value:
            error = f"node {node} did not acknowledge the lane within {self.settings.ack_timeout_s:g} s"
        if error is None:  # the node answered, without the lane: `acknowledge` put it back already
            error = self._last_activation_error(sid) or f"node {node} did not open the lane"
        else:
            self._undo_activation(caller, sid, node, error, source)
        raise NodeUnavailable(f"the site's agent could not open the lane: {error}. The approval still holds until it lapses; "
                              "try again, or ask the site admin to check the agent")

    def _await_open(self, sid: str) -> AccessSession:
        deadline = time.monotonic() + self.settings.ack_timeout_s
        while True:
            row = self._get(sid)
            if row.state != S.opening.value or time.monotonic() >= deadline:
                return row
            with self._acked:
                self._acked.wait(0.05)

    def _last_activation_error(self, sid: str) -> str | None:
        with self.factory() as s:
            body = s.scalar(select(Event.body).where(Event.subject == sid, Event.type == "session.activate",
                                                     Event.result == "failure").order_by(Event.seq.desc()).limit(1))
        return body.get("error") if body else None

    def acknowledge(self, node: str, generation: int, report, status) -> None:
        """The node applied `generation` and reports `status`: its opening sessions listed there are active now;
        those it could not open go back to approved, with the node's reason."""
        now = self.auth.now()
        observed = {lane.session_id: lane for lane in status.lanes}
        failed = []
        with transaction(self.factory) as s:
            sids = s.scalars(select(AccessSession.id).where(
                AccessSession.node == node, AccessSession.state == S.opening.value,
                AccessSession.opened_generation <= generation)).all()
            for row in (self._lock_any(s, sid) for sid in sids):
                if row.state != S.opening.value:
                    continue
                if row.kind == GRANT:
                    why = _grant_refused(row.id, node, generation, report, status)
                    if why:
                        failed.append((row.id, why))
                        continue
                    _move(row, S.active)
                    events.record(s, at=now, category="session", type="session.open", result="success", actor=events.agent_actor(node),
                                  subject=row.id, node=node, generation=generation, **_context(row))
                    continue
                lane = observed.get(row.id)
                if lane is not None and lane.node_public_key:
                    _move(row, S.active, node_public_key=lane.node_public_key)
                    events.record(s, at=now, category="session", type="session.open", result="success", actor=events.agent_actor(node),
                                  subject=row.id, node=node, generation=generation, listen_port=lane.listen_port,
                                  **_context(row))
                else:
                    why = next((e for e in report.errors if row.id in e), None) or \
                        f"node {node} applied generation {generation} without opening the lane"
                    failed.append((row.id, why))
        for sid, why in failed:
            self._undo_activation(None, sid, node, why, None)
        with self._acked:
            self._acked.notify_all()

    def fail_stale_openings(self, older_than: timedelta) -> list[str]:
        """Openings no node acknowledged in time (the controller restarted mid-activation, say) go back."""
        now = self.auth.now()
        with self.factory() as s:
            rows = s.execute(select(AccessSession.id, AccessSession.node).where(
                AccessSession.state == S.opening.value, AccessSession.activated_at <= now - older_than)).all()
        for sid, node in rows:
            self._undo_activation(None, sid, node, f"node {node} did not acknowledge the lane in time", None)
        return [sid for sid, _ in rows]

    def evidence_arrived(self, node: str, sid: str, end_reason: str) -> None:
        """The node delivered a lane's evidence: end the session if the node ended the lane itself, and
        write the session's evidence record if the session has ended."""
        self.node_ended(node, sid, end_reason)
        session_evidence.record_ready(self.factory, self.auth.now(), self.settings.evidence_wait_s, sid)

    def node_ended(self, node: str, sid: str, end_reason: str) -> None:
        """The node reports (in its evidence) that it ended a lane on its own: strict mode after losing the
        controller, a local close, or a failure. The session ends too, so state converges."""
        if end_reason not in ("control_lost", "closed", "failed"):
            return
        with transaction(self.factory) as s:
            row = self._lock_any(s, sid)
            if row is None or row.node != node or row.state not in LANED:
                return
            node_to_push = self._end(s, row, S.closed, f"node_{end_reason}", None, None)
        self.pusher.push_quietly([node_to_push])

    def _undo_activation(self, caller, sid: str, node: str, error: str, source) -> None:
        """The node could not open the lane: back to approved, the approval unspent, nothing leased."""
        now = self.auth.now()
        with transaction(self.factory) as s:
            row = self._lock_any(s, sid)
            if row is None or row.state != S.opening.value:
                return  # opened, or ended, in the meantime
            session_lanes.release(s, sid)
            _move(row, S.approved, activated_at=None, end_at=None, sealed_private_key=None, tunnel_address=None,
                  listen_port=None, expires_at=max(now + timedelta(minutes=5), row.expires_at or now))
            if row.key_mode == "minted":
                row.engineer_public_key, row.key_mode = None, None
            session_lanes.bump(s, node)
            events.record(s, at=now, category="session", type="session.activate", result="failure",
                          actor_id=caller.user_id if caller else None, actor=caller.username if caller else events.agent_actor(node),
                          subject=sid, source=source, reason="lane_failed", error=error[:300],
                          state=row.state, node=node, **_context(row))
        scrub(self.factory.kw["bind"])
        self.pusher.push_quietly([node])

    def config(self, caller: Principal, sid: str, source: str | None) -> tuple[str, AccessSession]:
        """The engineer's wg-quick config, once. The minted private key leaves the database with it."""
        now = self.auth.now()
        with transaction(self.factory) as s:
            row = self._lock(s, caller, sid)
            self._own(caller, row, "download the config of")
            _lane_only(row, "downloaded: a grant opens flows for the device, there is no tunnel to configure")
            if row.config_downloaded_at is not None:
                gone = True
            else:
                gone = False
                if row.state != S.active.value or (row.end_at and row.end_at <= now):
                    raise Conflict(f"session {sid} is {row.state}: a config exists only while the session is active")
                if not row.node_public_key:
                    raise Conflict(f"session {sid}'s lane is not open on the node yet")
                private = self.auth.keys.open(row.sealed_private_key, f"wg:{sid}") if row.sealed_private_key else None
                site = s.scalar(select(Site).where(Site.name == row.site))
                text = render(EngineerConfig(session_id=sid, device_id=row.asset_id, private_key=private,
                                             address=row.tunnel_address, peer_public_key=row.node_public_key,
                                             endpoint_host=site.public_endpoint, endpoint_port=row.listen_port,
                                             device_address=row.device_address, keepalive=self.settings.keepalive_s,
                                             ends_at=row.end_at))
                row.config_downloaded_at, row.sealed_private_key = now, None
                events.record(s, at=now, category="session", type="session.config", result="success", actor_id=caller.user_id,
                              actor=caller.username, subject=sid, source=source, key_mode=row.key_mode, **_context(row))
        if gone:
            with transaction(self.factory) as s:
                events.record(s, at=now, category="session", type="session.config", result="failure", actor_id=caller.user_id,
                              actor=caller.username, subject=sid, source=source, reason="already_downloaded", **_context(row))
            raise Gone(f"the config of session {sid} was downloaded at {_iso(row.config_downloaded_at)} and is not kept; "
                       "close the session and request a new one if it was lost")
        scrub(self.factory.kw["bind"])
        return text, row

    # ---- extension ----

    def extend(self, caller: Principal, sid: str, *, by: timedelta, reason_code: str, note: str, source: str | None) -> AccessSession:
        now = self.auth.now()
        policy = self.policies.require_active()
        with transaction(self.factory) as s:
            row = self._lock(s, caller, sid)
            self._own(caller, row, "extend")
            _lane_only(row, "extended: when more time is needed, open a new grant")
            if row.state != S.active.value:
                raise Conflict(f"session {sid} is {row.state}: only an active session can be extended")
            if row.end_at <= now:
                raise Conflict(f"session {sid} ended at {_iso(row.end_at)}: only an active session can be extended")
            if row.break_glass:
                raise Conflict("a break-glass session cannot be extended: open a new one if the emergency goes on")
            if row.extension_request:
                raise Conflict("an extension of this session is already waiting for approval")
            task = policy.document.tasks.get(row.task)
            rules = task.extensions if task else None
            if rules is None or rules.max_count == 0:
                raise Forbidden(f"task {row.task!r} allows no extensions")
            if reason_code not in rules.reason_codes:
                raise Invalid(f"reason code {reason_code!r} is not one of task {row.task!r}'s: {', '.join(rules.reason_codes)}")
            used = sum(e["by_s"] for e in row.extensions)
            if len(row.extensions) >= rules.max_count:
                raise Forbidden(f"task {row.task!r} allows {rules.max_count} extension(s); this session has had {len(row.extensions)}")
            room = rules.max_total - timedelta(seconds=used)
            if by > room:
                raise Forbidden(f"task {row.task!r} allows {format_duration(rules.max_total)} of extensions in all; "
                                f"{format_duration(room) if room.total_seconds() > 0 else 'nothing'} is left")
            # Each ask has its own key: approvers of an earlier, rejected ask may answer this one afresh.
            ext = {"key": "extension:" + secrets.token_hex(6), "by_s": int(by.total_seconds()), "reason_code": reason_code,
                   "note": note, "at": _iso(now), "by_user": caller.username}
            decision = self._recheck_extension(row, by, now)
            if rules.reapproval:
                row.extension_request = ext
                events.record(s, at=now, category="session", type="session.extension_request", result="success",
                              actor_id=caller.user_id, actor=caller.username, subject=sid, source=source, extension_reason=reason_code,
                              by=format_duration(by), note=note, **_context(row), **_decision_body(decision))
                node = None
            else:
                self._apply_extension(s, row, ext, caller.username, now, decision, approved_by=[])
                events.record(s, at=now, category="session", type="session.extend", result="success", actor_id=caller.user_id,
                              actor=caller.username, subject=sid, source=source, extension_reason=reason_code, by=format_duration(by),
                              note=note, end_at=_iso(row.end_at), **_context(row), **_decision_body(decision))
                node = row.node
        if node:
            self.pusher.push_quietly([node])
        return self._get(sid)

    def _recheck_extension(self, row: AccessSession, by: timedelta, now: datetime) -> Decision:
        decision = self._decide_again(row, row.end_at + by - now, now)
        failed = [c for c in decision.checks if c.result == "fail" and c.name not in RECHECK_IGNORES]
        if failed:
            raise Forbidden(f"the policy does not allow this extension: {failed[0].reason}")
        with self.factory() as s:
            valid_until = s.scalar(select(User.valid_until).where(User.id == row.user_id))
        if valid_until is not None and row.end_at + by > valid_until:
            raise Forbidden(f"the session would then end after the account's validity ends at {_iso(valid_until)}")
        return decision

    def _apply_extension(self, s, row: AccessSession, ext: dict, actor: str, now, decision: Decision, approved_by: list[str]) -> None:
        row.extensions = [*row.extensions, {**ext, "granted_at": _iso(now), "approved_by": approved_by}]
        row.extension_request = None
        row.end_at = row.end_at + timedelta(seconds=ext["by_s"])
        row.lane_revision += 1
        row.warned_at = None
        row.checked_policy = decision.policy_version
        session_lanes.bump(s, row.node)

    # ---- ending ----

    def close(self, caller: Principal, sid: str, reason: str | None, source: str | None) -> AccessSession:
        """The requester ends their own session (or withdraws a request) early."""
        with transaction(self.factory) as s:
            row = self._lock(s, caller, sid)
            self._own(caller, row, "close")
            if row.state not in OPEN:
                raise Conflict(f"session {sid} has already ended ({row.state})")
            node = self._end(s, row, S.closed, "closed_by_engineer", caller, source, note=reason)
        scrub(self.factory.kw["bind"])
        self.pusher.push_quietly([node])
        return self._get(sid)

    def revoke(self, caller: Principal, sid: str, reason: str, source: str | None) -> AccessSession:
        with transaction(self.factory) as s:
            row = self._lock(s, caller, sid)
            if not caller.can(row.site, *REVOKERS):
                raise Forbidden(f"revoking needs the approver, soc or admin role at site {row.site}")
            if row.state not in OPEN:
                raise Conflict(f"session {sid} has already ended ({row.state})")
            node = self._end(s, row, S.revoked, "revoked", caller, source, note=reason)
        scrub(self.factory.kw["bind"])
        self.pusher.push_quietly([node])
        return self._get(sid)

    def _end(self, s: Session, row: AccessSession, to: SessionState, reason: str, caller: Principal | None, source,
             note: str | None = None, **extra) -> str | None:
        """End an open session in the caller's transaction; the node to push, if it held a lane."""
        now = self.auth.now()
        was = row.state
        node = row.node if was in LANED else None
        ended_at = min(now, row.end_at) if to == S.expired and row.end_at and was in LANED else now
        _move(row, to, ended_at=ended_at, end_reason=reason, ended_by=caller.username if caller else "system",
              sealed_private_key=None, expires_at=None, extension_request=None)
        if node:
            session_lanes.release(s, row.id)
            session_lanes.bump(s, node)
        events.record(s, at=now, category="session", type=f"session.{_verb(to)}", result="success",
                      actor_id=caller.user_id if caller else None, actor=caller.username if caller else "system",
                      subject=row.id, source=source, reason=reason, previous_state=was, state=row.state, note=note,
                      had_lane=node is not None, **_context(row), **_stored_decision(row), **extra)
        return node

    # ---- break-glass review ----

    @_records_refusals
    def review(self, caller: Principal, sid: str, note: str, source: str | None) -> AccessSession:
        now = self.auth.now()
        with transaction(self.factory) as s:
            row = self._lock(s, caller, sid)
            if not row.break_glass:
                raise Conflict(f"session {sid} is not a break-glass session: there is no review to give")
            if not caller.can(row.site, *REVIEWERS):
                raise Forbidden(f"reviewing break-glass needs the approver, soc or admin role at site {row.site}")
            if row.user_id == caller.user_id:
                raise _Refusal(Forbidden("a break-glass session is reviewed by a second person, never by whoever opened it"),
                               caller, row, "break_glass.review", "self_review", source, now)
            if row.reviewed_at is not None:
                raise Conflict(f"session {sid} was already reviewed by {row.reviewed_by} at {_iso(row.reviewed_at)}")
            if row.state == S.denied.value:
                raise Conflict(f"session {sid} was denied: nothing was opened to review")
            row.reviewed_at, row.reviewed_by, row.review_note = now, caller.username, note
            events.record(s, at=now, category="session", type="break_glass.review", result="success", actor_id=caller.user_id,
                          actor=caller.username, subject=sid, source=source, review_note=note, incident=row.incident,
                          state=row.state, **_context(row))
        return self._get(sid)

    # ---- reads the API needs before a step-up ----

    @_records_refusals
    def guard(self, caller: Principal, sid: str, action: str | None = None) -> None:
        """Refuse, before any TOTP code is spent: a session the caller may not see (404), and an `action`
        (approve, activate, extend, review) the caller may not take on it (403). The action re-checks
        all of this under its lock."""
        now = self.auth.now()
        with self.factory() as s:
            row = s.get(AccessSession, sid)
            if row is None or not may_see(caller, row):
                raise NotFound(f"no session {sid}")
            if action in ("activate", "extend"):
                self._own(caller, row, action)
                if action == "activate":
                    _lane_only(row, "activated here: `wicket grant activate` (POST /api/v1/grants/{id}/activate) opens it")
                else:
                    _lane_only(row, "extended: when more time is needed, open a new grant")
            elif action == "approve":
                if not caller.can(row.site, "approver"):
                    raise Forbidden(f"approving needs the approver role at site {row.site}")
                if row.user_id == caller.user_id:
                    raise _Refusal(Forbidden("nobody approves their own request: another approver must"),
                                   caller, row, "session.approve", "self_approval", None, now)
            elif action == "review":
                if not caller.can(row.site, *REVIEWERS):
                    raise Forbidden(f"reviewing break-glass needs the approver, soc or admin role at site {row.site}")
                if row.break_glass and row.user_id == caller.user_id:
                    raise _Refusal(Forbidden("a break-glass session is reviewed by a second person, never by whoever opened it"),
                                   caller, row, "break_glass.review", "self_review", None, now)

    def guard_device(self, caller: Principal, asset_id: str) -> None:
        """404 for a device the caller cannot see, before a request spends a TOTP code."""
        self._visible_site(caller, asset_id)

    def not_a_grant(self, task: str) -> None:
        """Refuse a grant task where a lane is asked for (before the step-up, and again in the action)."""
        policy = self.policies.active()
        found = policy.document.tasks.get(task) if policy else None
        if found is not None and found.is_grant:
            raise Invalid(f"task {task!r} is a grant task: it opens flows for devices, not a lane; "
                          "request it with `wicket grant open` (POST /api/v1/grants)")

    def desired_for(self, caller: Principal, node: str):
        with self.factory() as s:
            site = s.scalar(select(Site.name).join(NodeAgent, NodeAgent.site_id == Site.id).where(NodeAgent.name == node))
            if site is None or not caller.can(site, *READ_ROLES):
                raise NotFound(f"no node {node}")
            if not caller.can(site, "site_admin", "admin"):
                raise Forbidden(f"a node's desired state is for site admins of {site} and admins")
            return session_lanes.desired_state(s, node)

    # ---- helpers ----

    def _decide_again(self, row: AccessSession, duration: timedelta, now: datetime) -> Decision:
        return self.decisions.decide(user_id=row.user_id, asset_id=row.asset_id, task=row.task, duration=duration,
                                     source=row.source, at=now, break_glass=row.break_glass)

    def _visible_site(self, caller: Principal, asset_id: str) -> str:
        with self.factory() as s:
            site = s.scalar(select(Site.name).join(Device, Device.site_id == Site.id).where(Device.asset_id == asset_id))
        if site is None or not caller.can(site, *READ_ROLES):
            raise NotFound(f"no device {asset_id}")
        return site

    def _lock(self, s: Session, caller: Principal, sid: str) -> AccessSession:
        """Lock the session's row for this transaction, then read it fresh. 404 unless the caller may see it."""
        row = self._lock_any(s, sid)
        if row is None or not may_see(caller, row):
            raise NotFound(f"no session {sid}")
        return row

    @staticmethod
    def _lock_any(s: Session, sid: str) -> AccessSession | None:
        # A no-op UPDATE takes the row lock on PostgreSQL and the write lock on SQLite, before the read.
        s.execute(update(AccessSession).where(AccessSession.id == sid).values(state=AccessSession.state)
                  .execution_options(synchronize_session=False))
        return s.get(AccessSession, sid, populate_existing=True)

    @staticmethod
    def _own(caller: Principal, row: AccessSession, verb: str) -> None:
        if row.user_id != caller.user_id:
            raise Forbidden(f"only {row.username}, who requested it, can {verb} session {row.id}")

    def _get(self, sid: str) -> AccessSession:
        with self.factory() as s:
            return s.get(AccessSession, sid)


class _Denied(Forbidden):
    """A request or activation the policy denies: the body carries the decision and its trace."""

    def __init__(self, decision: Decision, sid: str):
        super().__init__(f"denied: {decision.reason}")
        self.decision, self.sid = decision, sid

    def extra(self) -> dict:
        return {"session_id": self.sid, "failed_checks": list(self.decision.failed), "decision": self.decision.as_dict()}


def active_count(factory, user_id: int) -> int:
    """The user's active lanes, for the policy's concurrency limit (grants are nobody's tunnel)."""
    from sqlalchemy import func

    with factory() as s:
        return s.scalar(select(func.count()).select_from(AccessSession).where(
            AccessSession.user_id == user_id, AccessSession.state.in_(LANED), AccessSession.kind == LANE)) or 0


def may_see(caller: Principal, row: AccessSession) -> bool:
    return row.user_id == caller.user_id or caller.can(row.site, *READERS)


def new_id() -> str:
    """"s-" and 12 base32 characters: unguessable (60 bits), short enough to read out on the phone."""
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    return "s-" + "".join(secrets.choice(alphabet) for _ in range(12))


def _move(row: AccessSession, to: SessionState, **values) -> None:
    row.state = to.value
    for k, v in values.items():
        setattr(row, k, v)


def _flows(access) -> list[dict]:
    seen, out = set(), []
    for a in access:
        if (a.transport, a.port) not in seen:
            seen.add((a.transport, a.port))
            out.append({"protocol": a.protocol, "transport": a.transport, "port": a.port})
    return out


def _lane_only(row: AccessSession, what: str) -> None:
    if row.kind == GRANT:
        raise Conflict(f"{row.id} is a grant and cannot be {what}")


def _grant_refused(sid: str, node: str, generation: int, report, status) -> str | None:
    """Why the node did not take up a grant in the generation it applied, or None: it holds it. A grant has
    no interface or key to show, so the rule is: applied by an agent that speaks grants (protocol v4),
    and no error of that reconcile names the grant's session ID."""
    version = getattr(status, "protocol_version", None) or 0
    if version < 4:
        return f"node {node} speaks agent protocol v{version}, which enforces no grants: upgrade the agent"
    return next((e for e in report.errors if sid in e), None)


def _verb(state: SessionState) -> str:
    return {S.closed: "close", S.expired: "expire", S.revoked: "revoke"}[state]


def _code(check: str) -> str:
    return f"policy_{check}"[:64]


def _context(row: AccessSession) -> dict:
    out = {"session_id": row.id, "user": row.username, "device": row.asset_id, "site": row.site, "task": row.task,
           "break_glass": row.break_glass}
    if row.kind == GRANT:  # only then, so that lanes' events keep their shape
        out |= {"kind": GRANT, "grant_group": row.grant_group}
    return out


def _decision_body(decision: Decision) -> dict:
    return {"policy_version": decision.policy_version, "decision": decision.as_dict()}


def _stored_decision(row: AccessSession) -> dict:
    return {"policy_version": row.policy_version, "decision": row.decision}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
