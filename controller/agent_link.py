"""The agent link, controller side: a TLS listener agents dial out to, and `LiveLink`, the `NodeLink` over it.

Why its own port and a framed protocol rather than a WebSocket route on the API: the API sits behind a
TLS-terminating proxy, and the link must terminate TLS in the controller itself to see (and check) the
agent's client certificate. One long-lived connection per agent carries length-prefixed JSON frames both
ways (`nodeagent.wire`), so the controller pushes a new generation the moment it exists — no poll interval —
and the agent acknowledges it on the same connection. See docs/agent-link.md.

Threads: the listener runs an asyncio loop in its own thread; database work goes to worker threads.
A push from an API request (`LiveLink.push`) is handed to the loop and waits for the agent's `applied`.
Each connection pushes its node's state when woken: at once by a change made in this process, and by one
query every `WATCH_S` over all linked nodes for changes made by another replica.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from nodeagent.wire import (
    OLDEST_SERVED,
    PROTOCOL_VERSION,
    AgentStatus,
    Applied,
    Certificate,
    DesiredNodeState,
    EnrollBegin,
    EnrollCA,
    Enrolled,
    EnrollRequest,
    EvidenceReceipt,
    FrameError,
    Goodbye,
    Hello,
    Ping,
    Pong,
    ReconcileReport,
    RecordingChunk,
    RecordingReceipt,
    Refused,
    Renew,
    ReportReceipt,
    SignedEvidence,
    SignedReport,
    Welcome,
    decode_frame,
    encode_frame,
    evidence_bytes,
    evidence_payload,
    frame_length,
    report_bytes,
)

from . import __version__, device_reports, events
from .agent_ca import peer_node
from .db import transaction
from .enrolment import Agents, EnrolmentRefused
from .models import LaneEvidenceRecord, NodeAgent, Site
from .nodelink import LinkElsewhere, LinkError
from .recordings import RecordingRefused, RecordingStore
from .session_lanes import desired_state

log = logging.getLogger("wicket.controller.link")
WATCH_S = 0.5  # how often the links look for a generation another replica made
SERVER_CERT_RENEW_S = 24 * 3600
FIRST_FRAME_S = 10.0


@dataclass
class _Conn:
    node: str
    serial: str
    not_after: datetime
    version: int
    writer: asyncio.StreamWriter
    peer: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = -1  # the newest generation sent on this connection
    applied: int | None = None
    waiters: list = field(default_factory=list)  # (generation, future)
    last_rx: float = field(default_factory=time.monotonic)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False
    force: bool = True  # the next wake sends the full state even at a generation already sent
    replaced: bool = False


class LinkServer:
    """Serves enrolment and agent links on one TLS port. What agents report reaches `on_applied(node,
    generation, report, status)` and `on_evidence(node, session_id, end_reason)`; device reports go into
    the audit chain (`controller.device_reports`), at most `breach_records_per_report` breach records each."""

    self_pushing = True  # each connection pushes its node's state itself (see session_lanes.Pusher)

    def __init__(self, agents: Agents, ssl_context: ssl.SSLContext, *, heartbeat_s: float = 10.0,
                 ack_timeout_s: float = 10.0, replica: str | None = None, renew_server_cert=None,
                 breach_records_per_report: int = device_reports.BREACH_RECORDS_PER_REPORT):
        self.agents, self.factory, self.ctx = agents, agents.factory, ssl_context
        self.heartbeat_s, self.ack_timeout_s = heartbeat_s, ack_timeout_s
        self.breach_records_per_report = breach_records_per_report
        # (ctx) -> None: loads a fresh controller certificate; the link's own lasts 30 days, renewed daily
        self.renew_server_cert = renew_server_cert
        # Stable across restarts of this controller, so a restart after a crash marks its links down.
        self.replica = replica or socket.gethostname()[:64]
        self.on_applied = lambda node, generation, report, status: None
        self.on_evidence = lambda node, session_id, end_reason: None
        self.recordings: RecordingStore | None = None  # where payload recordings go (set by the app)
        self.conns: dict[str, _Conn] = {}
        self.statuses: dict[str, AgentStatus] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: asyncio.base_events.Server | None = None
        self.thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None
        agents.on_revoke = self.cut

    # ---- life ----

    def start(self, host: str = "0.0.0.0", port: int = 7443, sock: socket.socket | None = None) -> tuple[str, int]:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            try:
                kw = {"sock": sock} if sock is not None else {"host": host, "port": port, "reuse_address": True}
                self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, ssl=self.ctx, backlog=512, **kw))
                self.address = self.server.sockets[0].getsockname()[:2]
                self._poller = self.loop.create_task(self._poll_generations())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()
            self.loop.close()

        self._mark_all_down()
        self.thread = threading.Thread(target=run, name="agent-link", daemon=True)
        self.thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        log.info("agent link listening on %s:%s (replica %s)", *self.address, self.replica)
        return self.address

    def stop(self) -> None:
        if self.loop is None:
            return

        async def shutdown():
            self._poller.cancel()
            self.server.close()
            for conn in list(self.conns.values()):
                await self._close(conn, "controller stopping")
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        except Exception:  # noqa: BLE001 - stopping anyway
            log.exception("link shutdown")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop = None
        self._mark_all_down()

    # ---- NodeLink ----

    def push(self, desired: DesiredNodeState) -> ReconcileReport:
        """Send the node its state now and wait for it to be applied."""
        conn = self.conns.get(desired.node_id)
        if conn is None or self.loop is None:
            self._not_here(desired.node_id)
        fut = asyncio.run_coroutine_threadsafe(self._push_and_wait(conn, desired), self.loop)
        try:
            return fut.result(self.ack_timeout_s + 1)
        except TimeoutError:
            fut.cancel()
            raise LinkError(f"node {desired.node_id} did not acknowledge generation {desired.generation} "
                            f"within {self.ack_timeout_s:g} s") from None

    def status(self, node: str) -> AgentStatus:
        st = self.statuses.get(node)
        if st is None:
            raise LinkError(f"node {node} has not reported its state to this controller")
        return st

    def wake(self, node: str) -> None:
        conn = self.conns.get(node)
        if conn is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(conn.wake.set)

    def cut(self, node: str) -> None:
        """Close the node's link at once (its agent was revoked)."""
        conn = self.conns.get(node)
        if conn is not None and self.loop is not None:
            asyncio.run_coroutine_threadsafe(self._close(conn, "this agent was revoked", retry=False), self.loop)

    def connected(self) -> set[str]:
        return set(self.conns)

    # ---- one connection ----

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        sslobj = writer.get_extra_info("ssl_object")
        conn = None
        try:
            first = await asyncio.wait_for(_read(reader), FIRST_FRAME_S)
            if isinstance(first, EnrollBegin):
                await self._enrol(reader, writer, peer)
                return
            if not isinstance(first, Hello):
                await _send(writer, Goodbye(reason=f"expected hello or enroll_begin, got {first.kind}", retry=False))
                return
            conn = await self._hello(first, writer, peer, sslobj.getpeercert(binary_form=True))
            if conn is None:
                return
            watcher = asyncio.create_task(self._watch(conn))
            try:
                while True:
                    msg = await asyncio.wait_for(_read(reader), self.heartbeat_s * 3)
                    conn.last_rx = time.monotonic()
                    await self._handle(conn, msg)
            finally:
                watcher.cancel()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError) as exc:
            if conn is not None:
                log.info("link to %s dropped: %s", conn.node, type(exc).__name__)
        except FrameError as exc:
            log.warning("link from %s: %s", peer, exc)
            await _send_quietly(writer, Goodbye(reason=str(exc), retry=True))
        except EnrolmentRefused as exc:  # the certificate was revoked or ran out while the link was up
            log.warning("link to %s closed: %s", conn.node if conn else peer, exc)
            await _send_quietly(writer, Goodbye(reason=str(exc), retry=False))
        finally:
            if conn is not None:
                await self._gone(conn)
            writer.close()

    async def _enrol(self, reader, writer, peer: str) -> None:
        await _send(writer, EnrollCA(ca_pem=self.agents.ca.pem))
        req = await asyncio.wait_for(_read(reader), 60)
        if not isinstance(req, EnrollRequest):
            await _send(writer, Goodbye(reason="expected enroll", retry=False))
            return
        try:
            done = await asyncio.to_thread(self.agents.redeem, req.token, req.node_id, req.csr_pem, req.evidence_public_key,
                                           req.agent_version, peer)
        except EnrolmentRefused as exc:
            await _send(writer, Goodbye(reason=f"enrolment refused: {exc}", retry=False))
            return
        await _send(writer, Enrolled(node_id=done.node, site=done.site, certificate_pem=done.issued.pem,
                                     not_after=done.issued.not_after,
                                     controller_signing_key=self.agents.auth.keys.public_signing_key()))
        log.info("agent %s enrolled at site %s from %s", done.node, done.site, peer)

    async def _hello(self, hello: Hello, writer, peer: str, der: bytes | None) -> _Conn | None:
        who = peer_node(der)
        if who is None:
            await _send(writer, Goodbye(reason="a client certificate from this controller is required: enrol first", retry=False))
            return None
        node, serial, not_after = who
        if node != hello.node_id:
            await _send(writer, Goodbye(reason=f"the certificate is for {node}, not {hello.node_id}", retry=False))
            return None
        if not OLDEST_SERVED <= hello.protocol_version <= PROTOCOL_VERSION:
            fix = "upgrade the agent" if hello.protocol_version < OLDEST_SERVED else "upgrade the controller first"
            await _send(writer, Goodbye(reason=f"agent protocol v{hello.protocol_version}: this controller serves "
                                               f"v{OLDEST_SERVED} to v{PROTOCOL_VERSION}; {fix}", retry=False))
            return None
        try:
            await asyncio.to_thread(self._link_up, hello, serial, peer)
        except EnrolmentRefused as exc:
            await _send(writer, Goodbye(reason=str(exc), retry=False))
            return None
        old = self.conns.get(node)
        conn = _Conn(node=node, serial=serial, not_after=not_after, version=hello.protocol_version, writer=writer, peer=peer,
                     applied=hello.applied_generation)
        self.conns[node] = conn
        if old is not None:
            old.replaced = True
            await self._close(old, "replaced by a newer connection from the same agent")
        await _send(writer, Welcome(protocol_version=conn.version, controller_version=__version__, heartbeat_s=self.heartbeat_s,
                                    server_time=datetime.now(UTC)), conn.version)
        conn.wake.set()  # a full push on every (re)connection: level-triggered, and it acknowledges what the node holds
        return conn

    async def _handle(self, conn: _Conn, msg) -> None:
        if datetime.now(UTC) >= conn.not_after:
            await self._close(conn, "the agent's certificate expired", retry=False)
            raise ConnectionError("certificate expired")
        if isinstance(msg, Applied):
            accepted = await asyncio.to_thread(self._applied, conn, msg)
            if accepted:
                conn.applied = max(conn.applied or 0, msg.generation)
                self._resolve(conn, msg.generation, msg.report)
        elif isinstance(msg, Refused):
            log.warning("node %s refused generation %s: %s", conn.node, msg.generation, msg.error)
            await asyncio.to_thread(self._note_error, conn.node, f"refused generation {msg.generation}: {msg.error}")
            self._resolve(conn, msg.generation, LinkError(f"node {conn.node} refused: {msg.error}"))
        elif isinstance(msg, AgentStatus):
            await asyncio.to_thread(self._status, conn, msg)
        elif isinstance(msg, SignedEvidence):
            if await asyncio.to_thread(self._evidence, conn, msg):
                await self._send(conn, EvidenceReceipt(ident=msg.ident))
        elif isinstance(msg, SignedReport):
            if await asyncio.to_thread(self._report, conn, msg):
                await self._send(conn, ReportReceipt(ident=msg.ident))
        elif isinstance(msg, RecordingChunk):
            await self._recording(conn, msg)
        elif isinstance(msg, Renew):
            try:
                issued = await asyncio.to_thread(self.agents.renew, conn.node, conn.serial, msg.csr_pem, conn.peer)
            except EnrolmentRefused as exc:
                await self._close(conn, f"renewal refused: {exc}", retry=False)
                raise ConnectionError("renewal refused") from None
            await self._send(conn, Certificate(certificate_pem=issued.pem, not_after=issued.not_after))
        elif isinstance(msg, Ping):
            await self._send(conn, Pong(sent=msg.sent))
        elif isinstance(msg, Goodbye):
            raise ConnectionError(f"agent said goodbye: {msg.reason}")
        elif not isinstance(msg, Pong):
            raise FrameError(f"unexpected {msg.kind} frame from an agent")

    async def _recording(self, conn: _Conn, msg: RecordingChunk) -> None:
        if self.recordings is None:
            await self._send(conn, RecordingReceipt(ident=msg.ident, stored=False, error="this controller keeps no recordings"))
            return
        try:
            done = await asyncio.to_thread(self.recordings.receive, conn.node, msg)
        except RecordingRefused as exc:
            log.warning("recording %s from %s refused: %s", msg.ident, conn.node, exc)
            await self._send(conn, RecordingReceipt(ident=msg.ident, stored=False, error=str(exc)[:500]))
            return
        if done:
            await self._send(conn, RecordingReceipt(ident=msg.ident, stored=True))

    async def _watch(self, conn: _Conn) -> None:
        next_ping = time.monotonic() + self.heartbeat_s
        while not conn.closed:
            try:
                await asyncio.wait_for(conn.wake.wait(), max(0.0, next_ping - time.monotonic()))
            except TimeoutError:
                pass
            woken = conn.wake.is_set()
            conn.wake.clear()
            try:
                if woken:
                    desired = await asyncio.to_thread(self._desired, conn.node, -1 if conn.force else conn.sent)
                    conn.force = False
                    if desired is not None:
                        await self._push(conn, desired)
                if time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + self.heartbeat_s
                    await self._send(conn, Ping(sent=time.time()))
                    still = await asyncio.to_thread(self._still_valid, conn)
                    if still is not None:
                        await self._close(conn, still, retry=False)
                        return
            except (ConnectionError, OSError):
                return
            except Exception:  # noqa: BLE001 - one bad build must not kill the link; the next turn retries
                log.exception("link to %s: building or sending the desired state failed", conn.node)

    async def _push(self, conn: _Conn, desired: DesiredNodeState) -> None:
        async with conn.send_lock:
            if desired.generation < conn.sent:
                return
            conn.sent = desired.generation
            await self._send(conn, desired)

    async def _push_and_wait(self, conn: _Conn, desired: DesiredNodeState) -> ReconcileReport:
        fut = asyncio.get_running_loop().create_future()
        conn.waiters.append((desired.generation, fut))
        if conn.applied is not None and conn.applied >= desired.generation and desired.generation <= conn.sent:
            # already applied on this connection; the agent acknowledged it
            fut.set_result(ReconcileReport(generation=conn.applied))
        else:
            await self._push(conn, desired)
        return await asyncio.wait_for(fut, self.ack_timeout_s)

    def _resolve(self, conn: _Conn, generation: int, outcome) -> None:
        keep = []
        for gen, fut in conn.waiters:
            if gen <= generation and not fut.done():
                if isinstance(outcome, Exception):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome)
            elif not fut.done():
                keep.append((gen, fut))
        conn.waiters = keep

    async def _send(self, conn: _Conn, msg) -> None:
        if conn.closed:
            raise ConnectionError("closed")
        conn.writer.write(encode_frame(msg, conn.version))
        await conn.writer.drain()

    async def _close(self, conn: _Conn, reason: str, retry: bool = True) -> None:
        if conn.closed:
            return
        conn.closed = True
        await _send_quietly(conn.writer, Goodbye(reason=reason, retry=retry))
        conn.writer.close()
        for _gen, fut in conn.waiters:
            if not fut.done():
                fut.set_exception(LinkError(f"the link to node {conn.node} closed: {reason}"))
        if self.conns.get(conn.node) is conn:
            del self.conns[conn.node]
        log.info("link to %s closed: %s", conn.node, reason)

    async def _gone(self, conn: _Conn) -> None:
        await self._close(conn, "connection ended")
        if not conn.replaced:  # a newer connection of the same agent holds the row now
            if self.conns.get(conn.node) is None:
                self.statuses.pop(conn.node, None)
            await asyncio.to_thread(self._link_down, conn)

    async def _poll_generations(self) -> None:
        """Generations made elsewhere (another replica, `wicket-controller` tools): one query for all links.
        Also renews the listener's own certificate once a day."""
        next_renewal = time.monotonic() + SERVER_CERT_RENEW_S
        while True:
            await asyncio.sleep(WATCH_S)
            if self.renew_server_cert is not None and time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + SERVER_CERT_RENEW_S
                try:
                    await asyncio.to_thread(self.renew_server_cert, self.ctx)
                    log.info("agent link: controller certificate renewed")
                except Exception:  # noqa: BLE001 - the current one still has weeks left
                    log.exception("agent link: renewing the controller certificate failed")
            conns = dict(self.conns)
            if not conns:
                continue
            try:
                gens = await asyncio.to_thread(self._generations, list(conns))
            except Exception:  # noqa: BLE001 - the database may be briefly away; the next turn retries
                log.exception("reading node generations")
                continue
            for node, gen in gens.items():
                conn = conns.get(node)
                if conn is not None and gen > conn.sent:
                    conn.wake.set()

    def _generations(self, nodes: list[str]) -> dict[str, int]:
        with self.factory() as s:
            return dict(s.execute(select(NodeAgent.name, NodeAgent.generation).where(NodeAgent.name.in_(nodes))).all())

    # ---- database (worker threads) ----

    def _link_up(self, hello: Hello, serial: str, peer: str) -> None:
        now = datetime.now(UTC)
        with transaction(self.factory) as s:
            agent = self.agents.check_certificate(s, hello.node_id, serial, now)
            agent.connected, agent.link_replica, agent.connected_at, agent.last_seen = True, self.replica, now, now
            agent.agent_version, agent.protocol_version = hello.agent_version[:32], hello.protocol_version
            agent.applied_generation = hello.applied_generation
            if hello.applied_generation is not None and hello.applied_generation >= agent.generation:
                # the node holds a generation this database never made (restored from a backup, say): move past it,
                # so the next push is newer than anything the node took
                agent.generation = hello.applied_generation + 1
            events.record(s, at=now, category="agent", type="agent.link_up", result="success", actor=events.agent_actor(hello.node_id),
                          subject=hello.node_id, source=peer, replica=self.replica, agent_version=hello.agent_version[:32],
                          protocol_version=hello.protocol_version, applied_generation=hello.applied_generation)

    def _link_down(self, conn: _Conn) -> None:
        now = datetime.now(UTC)
        with transaction(self.factory) as s:
            s.execute(update(NodeAgent).where(NodeAgent.name == conn.node, NodeAgent.link_replica == self.replica)
                      .values(connected=False))
            events.record(s, at=now, category="agent", type="agent.link_down", result="success", actor=events.agent_actor(conn.node),
                          subject=conn.node, source=conn.peer, replica=self.replica)

    def _mark_all_down(self) -> None:
        try:
            with transaction(self.factory) as s:
                s.execute(update(NodeAgent).where(NodeAgent.link_replica == self.replica).values(connected=False))
        except Exception:  # noqa: BLE001 - a fresh database without the table yet
            log.debug("could not reset link states", exc_info=True)

    def _desired(self, node: str, have: int) -> DesiredNodeState | None:
        with self.factory() as s:
            gen = s.scalar(select(NodeAgent.generation).where(NodeAgent.name == node))
            if gen is None or gen <= have:
                return None
            return desired_state(s, node)

    def _still_valid(self, conn: _Conn) -> str | None:
        now = datetime.now(UTC)
        try:
            with transaction(self.factory) as s:
                agent = self.agents.check_certificate(s, conn.node, conn.serial, now)
                agent.last_seen = datetime.fromtimestamp(max(conn.last_rx - time.monotonic() + time.time(), 0), UTC)
        except EnrolmentRefused as exc:
            return str(exc)
        return None

    def _applied(self, conn: _Conn, msg: Applied) -> bool:
        now = datetime.now(UTC)
        try:
            with transaction(self.factory) as s:
                agent = self.agents.check_certificate(s, conn.node, conn.serial, now)  # a revoked agent acknowledges nothing
                agent.applied_generation = max(agent.applied_generation or 0, msg.generation)
                agent.last_seen, agent.clock_synchronized = now, msg.status.clock_synchronized
                agent.last_error = "; ".join(msg.report.errors)[:500] or None
        except EnrolmentRefused as exc:
            log.warning("acknowledgement from %s ignored: %s", conn.node, exc)
            return False
        self.statuses[conn.node] = msg.status
        self.on_applied(conn.node, msg.generation, msg.report, msg.status)
        return True

    def _status(self, conn: _Conn, msg: AgentStatus) -> None:
        if msg.node_id != conn.node:
            return
        self.statuses[conn.node] = msg
        with transaction(self.factory) as s:
            s.execute(update(NodeAgent).where(NodeAgent.name == conn.node).values(
                last_seen=datetime.now(UTC), clock_synchronized=msg.clock_synchronized))

    def _note_error(self, node: str, error: str) -> None:
        with transaction(self.factory) as s:
            s.execute(update(NodeAgent).where(NodeAgent.name == node).values(last_error=error[:500]))

    def _evidence(self, conn: _Conn, msg: SignedEvidence) -> bool:
        """Store a signed evidence record once; True when it is stored (now or before)."""
        now = datetime.now(UTC)
        ev = msg.evidence
        with transaction(self.factory) as s:
            agent = self.agents.check_certificate(s, conn.node, conn.serial, now)
            if ev.node_id != conn.node:
                log.warning("evidence %s from %s names node %s: refused", msg.ident, conn.node, ev.node_id)
                return False
            if not _signed_by(agent.evidence_public_key, msg.signature, evidence_bytes(msg.ident, ev)):
                log.warning("evidence %s from %s: the signature does not verify; refused", msg.ident, conn.node)
                events.record(s, at=now, category="evidence", type="lane.evidence", result="failure", actor=events.agent_actor(conn.node),
                              subject=ev.session_id, reason="bad_signature", ident=msg.ident)
                return False
            if s.scalar(select(LaneEvidenceRecord.id).where(LaneEvidenceRecord.node == conn.node,
                                                            LaneEvidenceRecord.ident == msg.ident)) is not None:
                return True  # delivered before; the receipt was lost
            try:
                with s.begin_nested():
                    s.add(LaneEvidenceRecord(node=conn.node, ident=msg.ident, session_id=ev.session_id, end_reason=ev.end_reason.value,
                                             body=evidence_payload(ev), signature=msg.signature,
                                             verified_with=agent.evidence_public_key, received_at=now))
            except IntegrityError:
                return True  # another replica stored it in the same moment
            events.record(s, at=now, category="evidence", type="lane.evidence", result="success", actor=events.agent_actor(conn.node),
                          subject=ev.session_id, ident=msg.ident, end_reason=ev.end_reason.value,
                          closed_at=ev.closed_at.isoformat(), lateness_ms=ev.lateness_ms,
                          bytes_out=ev.totals.bytes_out, bytes_in=ev.totals.bytes_in, flows=len(ev.flows),
                          blocked=len(ev.blocked))
        if ev.session_id:
            self.on_evidence(conn.node, ev.session_id, ev.end_reason.value)
        return True

    def _report(self, conn: _Conn, msg: SignedReport) -> bool:
        """Record a signed device report once (`controller.device_reports`); True when the agent may delete it."""
        now = datetime.now(UTC)
        with transaction(self.factory) as s:
            agent = self.agents.check_certificate(s, conn.node, conn.serial, now)
            if msg.report.node_id != conn.node:
                log.warning("device report %s from %s names node %s: refused", msg.ident, conn.node, msg.report.node_id)
                return False
            if not _signed_by(agent.evidence_public_key, msg.signature, report_bytes(msg.ident, msg.report)):
                log.warning("device report %s from %s: the signature does not verify; refused", msg.ident, conn.node)
                return False
            site = s.scalar(select(Site.name).where(Site.id == agent.site_id))
            try:
                device_reports.record(s, node=conn.node, site=site, ident=msg.ident, report=msg.report,
                                      signature=msg.signature, signed_with=agent.evidence_public_key, now=now,
                                      limit=self.breach_records_per_report)
            except device_reports.ReportRefused as exc:
                log.error("device report %s from %s refused: %s", msg.ident, conn.node, exc)
                return False
        return True

    def _not_here(self, node: str):
        with self.factory() as s:
            row = s.execute(select(NodeAgent.connected, NodeAgent.link_replica, NodeAgent.enrolled_at, NodeAgent.last_seen)
                            .where(NodeAgent.name == node)).first()
        if row is None:
            raise LinkError(f"node {node} is not registered")
        if row.enrolled_at is None:
            raise LinkError(f"node {node} has not enrolled: a site admin makes a join token and runs "
                            "`wicket-agent enroll` on the router")
        fresh = row.last_seen is not None and row.last_seen > datetime.now(UTC) - timedelta(seconds=3 * self.heartbeat_s)
        if row.connected and row.link_replica != self.replica and fresh:
            raise LinkElsewhere(f"node {node} is linked to replica {row.link_replica}")
        seen = row.last_seen.isoformat() if row.last_seen else "never"
        raise LinkError(f"node {node} is not connected to the controller (last seen {seen})")


def _signed_by(public_key: str | None, signature: str, data: bytes) -> bool:
    """Whether `signature` (base64) is the node's evidence key's Ed25519 signature of `data`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key or "")).verify(base64.b64decode(signature), data)
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True


async def _read(reader: asyncio.StreamReader):
    n = frame_length(await reader.readexactly(4))
    return decode_frame(await reader.readexactly(n))


async def _send(writer: asyncio.StreamWriter, msg, version: int = PROTOCOL_VERSION) -> None:
    writer.write(encode_frame(msg, version))
    await writer.drain()


async def _send_quietly(writer: asyncio.StreamWriter, msg) -> None:
    try:
        await asyncio.wait_for(_send(writer, msg), 2)
    except Exception:  # noqa: BLE001 - the peer may be gone already
        pass


def _peer(writer) -> str:
    addr = writer.get_extra_info("peername")
    if not addr:
        return "?"
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
