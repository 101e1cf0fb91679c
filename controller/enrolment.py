"""Join tokens, enrolment and agent certificates.

A site admin makes a one-time join token for a site (`create_token`); the secret is shown once and only
its SHA-256 is stored. The router's agent redeems it over the link port (`redeem`): the first redemption
wins by a conditional UPDATE, so twenty agents racing on one token enrol exactly one. Redeeming
registers (or binds a pre-registered) agent at the token's site, records its evidence-signing key and
issues a short-lived client certificate from the controller's CA, which the agent renews over its link
(`renew`). Revoking an agent revokes every certificate it holds and cuts its live link.
Audit records name the token by its ID only; the secret never reaches a log or the audit store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from nodeagent.wire import TOKEN_PREFIX, parse_token

from . import events
from .agent_ca import AgentCA, CsrError, Issued, new_token_parts
from .auth import Auth, Principal
from .db import transaction
from .errors import Conflict, Forbidden, Invalid, NotFound
from .models import AccessSession, AgentCertificate, JoinToken, NodeAgent, Site

MANAGE_ROLES = ("site_admin", "admin")
READ_ROLES = ("site_admin", "admin", "soc")  # may list agents and their links
SITE_READERS = ("engineer", "contractor", "approver", "site_admin", "soc", "admin", "break_glass")
MAX_TOKEN_TTL = timedelta(days=7)


class EnrolmentRefused(Exception):
    """Told to the enrolling agent as it is; never carries the token's secret."""


@dataclass(frozen=True)
class NewToken:
    id: str
    token: str  # shown once
    site: str
    expires_at: datetime


@dataclass(frozen=True)
class Enrolment:
    node: str
    site: str
    issued: Issued


class Agents:
    def __init__(self, auth: Auth, ca: AgentCA, cert_ttl: timedelta, token_ttl: timedelta, on_revoke=None):
        self.auth, self.factory, self.ca = auth, auth.factory, ca
        self.cert_ttl, self.token_ttl = cert_ttl, token_ttl
        self.on_revoke = on_revoke or (lambda node: None)  # the link server cuts the agent's connection

    # ---- join tokens ----

    def create_token(self, caller: Principal, site_name: str, ttl: timedelta | None, source: str | None) -> NewToken:
        ttl = ttl or self.token_ttl
        if not timedelta(minutes=1) <= ttl <= MAX_TOKEN_TTL:
            raise Invalid("a join token lives between 1 minute and 7 days")
        now = self.auth.now()
        ident, secret = new_token_parts()
        with transaction(self.factory) as s:
            site = self._managed_site(s, caller, site_name)
            s.add(JoinToken(id=ident, site_id=site.id, secret_hash=_hash(secret), created_by=caller.username,
                            created_at=now, expires_at=now + ttl))
            events.record(s, at=now, category="agent", type="join_token.create", result="success", actor_id=caller.user_id,
                          actor=caller.username, subject=ident, source=source, site=site_name, expires_at=_iso(now + ttl))
        return NewToken(ident, f"{TOKEN_PREFIX}.{ident}.{secret}.{self.ca.pin()}", site_name, now + ttl)

    def list_tokens(self, caller: Principal, site_name: str) -> list[dict]:
        now = self.auth.now()
        with self.factory() as s:
            site = self._managed_site(s, caller, site_name)
            rows = s.scalars(select(JoinToken).where(JoinToken.site_id == site.id).order_by(JoinToken.created_at.desc())).all()
            return [{"id": t.id, "site": site_name, "created_by": t.created_by, "created_at": t.created_at,
                     "expires_at": t.expires_at, "used_at": t.used_at, "used_by": t.used_by, "revoked_at": t.revoked_at,
                     "state": _token_state(t, now)} for t in rows]

    def revoke_token(self, caller: Principal, ident: str, source: str | None) -> None:
        now = self.auth.now()
        with transaction(self.factory) as s:
            row = s.get(JoinToken, ident)
            site = s.get(Site, row.site_id) if row else None
            if row is None or not caller.can(site.name, *MANAGE_ROLES):
                raise NotFound(f"no join token {ident}")
            if row.used_at is not None:
                raise Conflict(f"join token {ident} was already used by {row.used_by}: revoke the agent instead")
            if row.revoked_at is None:
                row.revoked_at, row.revoked_by = now, caller.username
            events.record(s, at=now, category="agent", type="join_token.revoke", result="success", actor_id=caller.user_id,
                          actor=caller.username, subject=ident, source=source, site=site.name)

    # ---- enrolment (called by the link server; the caller is the token) ----

    def redeem(self, token: str, node: str, csr_pem: str, evidence_key: str, agent_version: str, source: str | None) -> Enrolment:
        now = self.auth.now()
        try:
            ident, secret, pin = parse_token(token)
        except ValueError as exc:
            self._refusal(None, node, source, str(exc))
            raise EnrolmentRefused(str(exc)) from None
        if not hmac.compare_digest(pin, self.ca.pin()):
            self._refusal(ident, node, source, "the token was made by another controller")
            raise EnrolmentRefused("this join token was made by another controller (its CA pin does not match)")
        try:
            raw = base64.b64decode(evidence_key, validate=True)
            if len(raw) != 32:
                raise ValueError
        except (binascii.Error, ValueError):
            raise EnrolmentRefused("the evidence key must be an Ed25519 public key (32 bytes, base64)") from None
        try:
            return self._redeem(ident, secret, node, csr_pem, evidence_key, agent_version, source, now)
        except _Refuse as exc:
            self._refusal(ident, node, source, str(exc))
            raise

    def _redeem(self, ident, secret, node, csr_pem, evidence_key, agent_version, source, now) -> Enrolment:
        with transaction(self.factory) as s:
            row = s.get(JoinToken, ident)
            if row is None or not hmac.compare_digest(row.secret_hash, _hash(secret)):
                why = "unknown join token"
            elif row.revoked_at is not None:
                why = "the join token was revoked"
            elif row.used_at is not None:
                why = "the join token was already used"
            elif row.expires_at <= now:
                why = f"the join token expired at {_iso(row.expires_at)}"
            else:
                why = None
            if why is None:
                # the one winner: a conditional update, counted (SQLite and PostgreSQL serialise it)
                won = s.execute(update(JoinToken).where(JoinToken.id == ident, JoinToken.used_at.is_(None),
                                                        JoinToken.revoked_at.is_(None), JoinToken.expires_at > now)
                                .values(used_at=now, used_by=node)).rowcount
                if won != 1:
                    why = "the join token was already used"
            if why is not None:
                raise _Refuse(why)
            site = s.get(Site, row.site_id)
            agent = s.scalar(select(NodeAgent).where(NodeAgent.name == node))
            if agent is not None and agent.site_id != site.id:
                raise _Refuse(f"an agent named {node} belongs to another site")
            if agent is not None and agent.enrolled_at is not None and agent.revoked_at is None:
                raise _Refuse(f"agent {node} is enrolled already: a site admin revokes it first (`wicket agents revoke {node}`)")
            if agent is None:
                agent = NodeAgent(name=node, site_id=site.id, description="enrolled with a join token", created_at=now)
                s.add(agent)
            agent.enrolled_at, agent.revoked_at, agent.evidence_public_key = now, None, evidence_key
            agent.agent_version, agent.last_error = agent_version[:32], None
            s.execute(update(AgentCertificate).where(AgentCertificate.node == node, AgentCertificate.revoked_at.is_(None))
                      .values(revoked_at=now))
            try:
                issued = self.ca.issue_agent(csr_pem, node, self.cert_ttl, now)
            except CsrError as exc:
                raise _Refuse(str(exc)) from None
            s.add(AgentCertificate(serial=issued.serial, node=node, issued_at=now, not_after=issued.not_after))
            events.record(s, at=now, category="agent", type="agent.enrol", result="success", actor=events.agent_actor(node), subject=node,
                          source=source, site=site.name, join_token_id=ident, certificate=issued.serial,
                          not_after=_iso(issued.not_after), agent_version=agent_version[:32],
                          evidence_public_key=evidence_key)  # ties the node's evidence signatures to this enrolment
            return Enrolment(node, site.name, issued)

    def renew(self, node: str, serial: str, csr_pem: str, source: str | None) -> Issued:
        """A new certificate for a linked agent whose current one is still valid and not revoked."""
        now = self.auth.now()
        with transaction(self.factory) as s:
            self.check_certificate(s, node, serial, now)
            try:
                issued = self.ca.issue_agent(csr_pem, node, self.cert_ttl, now)
            except CsrError as exc:
                raise EnrolmentRefused(str(exc)) from None
            s.add(AgentCertificate(serial=issued.serial, node=node, issued_at=now, not_after=issued.not_after))
            events.record(s, at=now, category="agent", type="agent.certificate_renew", result="success", actor=events.agent_actor(node),
                          subject=node, source=source, certificate=issued.serial, previous=serial, not_after=_iso(issued.not_after))
            return issued

    def check_certificate(self, s: Session, node: str, serial: str, now: datetime) -> NodeAgent:
        """The agent behind a presented certificate, if that certificate may still speak for it."""
        cert = s.get(AgentCertificate, serial)
        if cert is None or cert.node != node:
            raise EnrolmentRefused("this certificate was not issued by this controller for this node")
        if cert.revoked_at is not None:
            raise EnrolmentRefused(f"certificate {serial} was revoked")
        if cert.not_after <= now:
            raise EnrolmentRefused(f"certificate {serial} expired at {_iso(cert.not_after)}")
        agent = s.scalar(select(NodeAgent).where(NodeAgent.name == node))
        if agent is None or agent.enrolled_at is None:
            raise EnrolmentRefused(f"node {node} is not registered (it was removed)")
        if agent.revoked_at is not None:
            raise EnrolmentRefused(f"agent {node} was revoked at {_iso(agent.revoked_at)}")
        return agent

    # ---- agents ----

    def list_agents(self, caller: Principal, site_name: str | None = None) -> list[dict]:
        scope = caller.sites(*READ_ROLES)
        with self.factory() as s:
            q = select(NodeAgent, Site.name).join(Site, Site.id == NodeAgent.site_id).order_by(NodeAgent.name)
            if scope is not None:
                q = q.where(Site.name.in_(scope))
            if site_name:
                q = q.where(Site.name == site_name)
            out = []
            for agent, site in s.execute(q).all():
                cert = s.scalar(select(AgentCertificate).where(AgentCertificate.node == agent.name, AgentCertificate.revoked_at.is_(None))
                                .order_by(AgentCertificate.not_after.desc()).limit(1))
                lanes = s.scalar(select(_count()).select_from(AccessSession).where(
                    AccessSession.node == agent.name, AccessSession.state.in_(("opening", "active"))))
                out.append({
                    "name": agent.name, "site": site, "enrolled_at": agent.enrolled_at, "revoked_at": agent.revoked_at,
                    "connected": bool(agent.connected), "connected_at": agent.connected_at, "last_seen": agent.last_seen,
                    "generation": agent.generation, "applied_generation": agent.applied_generation,
                    "agent_version": agent.agent_version, "protocol_version": agent.protocol_version,
                    "clock_synchronized": agent.clock_synchronized, "certificate_not_after": cert.not_after if cert else None,
                    "lanes": lanes, "last_error": agent.last_error,
                })
            return out

    def check_may_revoke(self, caller: Principal, node: str) -> None:
        with self.factory() as s:
            self._revocable(s, caller, node)

    def _revocable(self, s: Session, caller: Principal, node: str) -> tuple[NodeAgent, Site]:
        agent = s.scalar(select(NodeAgent).where(NodeAgent.name == node))
        site = s.get(Site, agent.site_id) if agent else None
        if agent is None or not caller.can(site.name, *MANAGE_ROLES):
            if agent is not None and caller.can(site.name, *SITE_READERS):  # they see it in the site's record
                raise Forbidden(f"only a site admin of {site.name} or an admin revokes its agents")
            raise NotFound(f"no agent {node}")
        return agent, site

    def revoke_agent(self, caller: Principal, node: str, reason: str, source: str | None) -> None:
        now = self.auth.now()
        with transaction(self.factory) as s:
            agent, site = self._revocable(s, caller, node)
            if agent.revoked_at is None:
                agent.revoked_at = now
            revoked = s.execute(update(AgentCertificate).where(AgentCertificate.node == node, AgentCertificate.revoked_at.is_(None))
                                .values(revoked_at=now)).rowcount
            events.record(s, at=now, category="agent", type="agent.revoke", result="success", actor_id=caller.user_id,
                          actor=caller.username, subject=node, source=source, site=site.name, note=reason[:300],
                          certificates_revoked=revoked)
        self.on_revoke(node)

    # ---- helpers ----

    def _managed_site(self, s: Session, caller: Principal, name: str) -> Site:
        site = s.scalar(select(Site).where(Site.name == name))
        if site is None or not caller.can(name, *READ_ROLES, "engineer", "approver", "contractor", "break_glass"):
            raise NotFound(f"no site {name}")
        if not caller.can(name, *MANAGE_ROLES):
            raise Forbidden(f"only a site admin of {name} or an admin manages its agents and join tokens")
        return site

    def _refusal(self, ident: str | None, node: str, source: str | None, why: str) -> None:
        with transaction(self.factory) as s:
            events.record(s, at=self.auth.now(), category="agent", type="agent.enrol", result="failure", actor=events.agent_actor(node),
                          subject=node, source=source, join_token_id=ident, reason="refused", detail=why[:300])


class _Refuse(EnrolmentRefused):
    pass


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _token_state(t: JoinToken, now: datetime) -> str:
    if t.revoked_at is not None:
        return "revoked"
    if t.used_at is not None:
        return "used"
    return "expired" if t.expires_at <= now else "unused"


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _count():
    from sqlalchemy import func

    return func.count()
