"""The controller application: `create_app(settings)` wires storage, keys, authentication and routes."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI

from . import __version__, errors
from .agent_ca import AgentCA
from .agent_link import LinkServer
from .api import router
from .api_agents import router as agents_router
from .api_audit import router as audit_router
from .api_grants import router as grants_router
from .api_inventory import router as inventory_router
from .api_policy import router as policy_router
from .api_sessions import router as sessions_router
from .audit import chain as audit_chain
from .audit.chain import AuditSigner, Checkpointer, register_key
from .audit.shipper import Shipper
from .audit.sinks import SinkConfigError, load_sinks
from .auth import Auth
from .db import make_engine, session_factory
from .decisions import Decisions
from .enrolment import Agents
from .grants import Grants
from .inventory import Inventory
from .nodelink import LocalSocketLink, NoLink
from .policy_store import PolicyStore
from .recordings import RecordingStore
from .security import keys as controller_keys
from .session_clock import SessionClock
from .session_lanes import Pusher
from .session_queries import SessionQueries
from .sessions import Sessions, active_count
from .settings import Settings, SettingsError
from .users import Users

log = logging.getLogger("wicket.controller")


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """The session clock runs while the service serves (not under a bare TestClient: tests tick by hand)."""
    settings = app.state.settings
    link = app.state.link_server
    if link is not None and link.loop is None and settings.link_listen:
        host, _, port = settings.link_listen.rpartition(":")
        link.start(host.strip("[]"), int(port))
    if settings.tick_ms:
        app.state.session_clock.start(settings.tick_ms / 1000)
    app.state.checkpointer.start()
    if app.state.shipper is not None:
        app.state.shipper.start()
    try:
        yield
    finally:
        if app.state.shipper is not None:
            app.state.shipper.stop()
        app.state.checkpointer.stop()
        app.state.session_clock.stop()
        if link is not None:
            link.stop()


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time, engine=None, link=None) -> FastAPI:
    """`link`: how lanes reach nodes. Default: the agent link (`WICKET_LINK_LISTEN`, started with the service);
    the lab's local agent sockets instead when `WICKET_AGENT_SOCKETS` is set; else none."""
    keys = controller_keys.load(settings.keys_dir)
    engine = engine or make_engine(settings.database_url)
    factory = session_factory(engine)
    auth = Auth(settings, keys, factory, clock)
    signer = AuditSigner(keys.signing)
    register_key(factory, signer)
    app = FastAPI(
        lifespan=_lifespan,
        title="wicket controller",
        version=__version__,
        description="Just-in-time access to field devices: identities, MFA and roles; inventory and passports; policy.",
    )
    app.state.settings, app.state.engine, app.state.auth, app.state.users = settings, engine, auth, Users(auth)
    app.state.policies = PolicyStore(auth)
    app.state.inventory = Inventory(auth, app.state.policies)
    app.state.decisions = Decisions(auth, app.state.policies, engine, active_sessions=lambda uid: active_count(factory, uid))
    ca = AgentCA.load_or_create(settings.keys_dir)
    app.state.agents = Agents(auth, ca, timedelta(seconds=settings.agent_cert_ttl_s), timedelta(seconds=settings.join_token_ttl_s))
    app.state.link_server = None
    if link is None:
        if settings.agent_sockets:
            link = LocalSocketLink(settings.agent_sockets)
            log.warning("lanes reach agents through local control sockets (%s): a lab transport, not for production",
                        ", ".join(sorted(settings.agent_sockets)))
        elif settings.link_listen:
            link = LinkServer(app.state.agents, ca.server_context(list(settings.link_names), settings.keys_dir),
                              heartbeat_s=settings.link_heartbeat_s, ack_timeout_s=settings.ack_timeout_s,
                              replica=settings.replica_id or None,
                              breach_records_per_report=settings.breach_records_per_report,
                              renew_server_cert=lambda ctx: ca.load_server_cert(ctx, list(settings.link_names), settings.keys_dir))
        else:
            link = NoLink()
    pusher = Pusher(factory, link, auth.now)
    app.state.policies.on_nodes_changed = app.state.inventory.on_nodes_changed = pusher.push_quietly
    app.state.recordings = RecordingStore(factory, settings.data_dir / "recordings")
    app.state.sessions = Sessions(auth, app.state.policies, app.state.decisions, pusher, settings)
    app.state.grants = Grants(app.state.sessions)
    if isinstance(link, LinkServer):
        app.state.link_server = link
        link.on_applied = app.state.sessions.acknowledge
        link.on_evidence = app.state.sessions.evidence_arrived
        link.recordings = app.state.recordings
    app.state.audit_signer = signer
    app.state.checkpointer = Checkpointer(factory, signer, every=settings.audit_checkpoint_every,
                                          interval_s=settings.audit_checkpoint_s)
    app.state.shipper = _shipper(settings, factory)
    app.state.session_queries = SessionQueries(auth)
    app.state.session_clock = SessionClock(app.state.sessions, warn_before_s=settings.warn_before_s)
    errors.install(app)
    app.include_router(router)
    app.include_router(inventory_router)
    app.include_router(policy_router)
    app.include_router(sessions_router)
    app.include_router(grants_router)
    app.include_router(agents_router)
    app.include_router(audit_router)

    @app.get("/healthz", tags=["health"], summary="Liveness, and whether audit records are being written")
    def healthz() -> dict:
        h = audit_chain.health
        audit = {"failing": h.failing, "write_failures": h.failures, "last_write_error": h.last_error,
                 "last_failure_at": h.last_failure_at, "last_write_at": h.last_ok_at}
        # Still alive (200), but an operator's monitor must see that actions are being refused.
        return {"status": "audit_failing" if h.failing else "ok", "version": __version__, "audit": audit}

    return app


def _shipper(settings: Settings, factory) -> Shipper | None:
    """The SIEM shipper, when sinks are configured (WICKET_AUDIT_SINKS_FILE, or <data_dir>/sinks.toml)."""
    path = settings.audit_sinks_file or str(settings.data_dir / "sinks.toml")
    if not settings.audit_sinks_file and not os.path.exists(path):
        return None
    try:
        sinks = load_sinks(path)
    except (SinkConfigError, OSError) as exc:
        raise SettingsError(str(exc) if isinstance(exc, SinkConfigError) else f"audit sinks {path}: {exc}") from None
    if not sinks:
        return None
    # A lease must outlast the slowest send (syslog: connect, write, confirm): else another replica
    # would take the sink over mid-send and send the batch again.
    lease_s = max(30.0, 4 * max(c.timeout_s for c in sinks))
    return Shipper(factory, sinks, settings.replica_id or socket.gethostname()[:64], lease_s=lease_s)
