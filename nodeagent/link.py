"""The agent's side of the link: dial out to the controller, keep the connection, take what it pushes.

Runs an asyncio loop in its own thread. Every change still happens on the agent's loop thread: a pushed
desired state is handed over with `submit` and answered with `applied` (or `refused`) once the agent has
converged on it. Besides that the link sends the agent's status every few seconds, delivers evidence
and device reports (signed with the enrolment key; a record is deleted only after the controller's
receipt; reports only to a controller speaking v4), renews the client certificate at half its life, and
answers pings. It reconnects with backoff (1 s doubling to 30 s, jittered). `last_contact` (monotonic)
is when the controller was last heard: strict mode counts from it, and it is persisted so a restart
while cut off does not reset the count.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from . import __version__
from .enroll import LinkFiles, check_controller_cert, new_tls_key
from .state import ReportSpool
from .wire import (
    PROTOCOL_VERSION,
    RECORDING_CHUNK,
    AgentStatus,
    Applied,
    Certificate,
    DesiredNodeState,
    EvidenceReceipt,
    Goodbye,
    Hello,
    LaneEvidence,
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
    frame_length,
    report_bytes,
)

log = logging.getLogger("wicket.agent.link")
STATUS_EVERY_S = 5.0
PING_S = 2.0
MAX_BACKOFF_S = 30.0
LINK = object()  # marks requests that came over the link (the control socket cannot forge an object)


class LinkClient:
    """`submit(request) -> answer` runs one request on the agent's loop thread (see `control.handler`)."""

    def __init__(self, state_dir: str, submit: Callable[[dict], dict], evidence_dir: str, clock_mono: Callable[[], float],
                 clock_wall: Callable[[], float], version: int = PROTOCOL_VERSION):
        self.files = LinkFiles.of(state_dir)
        self.info = self.files.controller()
        self.node = self.info["node_id"]
        self.submit, self.evidence_dir = submit, Path(evidence_dir)
        self.mono, self.wall = clock_mono, clock_wall
        self.version = version
        self.connected = False
        self.state = "starting"
        self.last_contact = self._restore_contact()
        self.stopping = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._renewing: bytes | None = None
        self._final = False  # the controller said not to retry (it is retried anyway, at the longest pause)
        self.connects = 0
        self.recordings_dir = self.evidence_dir.parent / "recordings"
        self._uploading: set[str] = set()
        self.peer_version = version
        self.reports = ReportSpool(self.evidence_dir.parent / "reports")
        self._reports_held_said = False  # "the controller takes no reports" is logged once

    # ---- life ----

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="link", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.loop is not None and self._writer is not None:
            writer = self._writer

            def close() -> None:
                writer.write(encode_frame(Goodbye(reason="agent stopping"), self.version))
                writer.close()  # ends the read the link thread waits in

            try:
                self.loop.call_soon_threadsafe(close)
            except RuntimeError:
                pass  # the loop has ended already
        if self.thread:
            self.thread.join(5)
        self._persist_contact()

    def describe(self) -> str:
        where = f"{self.info['host']}:{self.info['port']}"
        if self.connected:
            return f"connected to {where}"
        ago = self.mono() - self.last_contact
        return f"{self.state}: controller {where} last heard {ago:.0f} s ago"

    def silent_for(self) -> float:
        return self.mono() - self.last_contact

    # ---- the loop ----

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._forever())
        finally:
            self.loop.close()

    async def _forever(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            was_up = self.connects
            why = await self._session()
            self.connected = False
            self._renewing = None  # a renewal asked on a link that dropped is asked again on the next
            if self.stopping.is_set():
                return
            # a link that was up and dropped is retried soon; only failures in a row back off; a refusal that
            # will not change by itself (revoked, unsupported version) waits the longest
            failures = 1 if self.connects > was_up else failures + 1
            if self._final:
                failures, self._final = 6, False
            pause = min(MAX_BACKOFF_S, 2.0 ** min(failures, 6) / 2) * (0.75 + random.random() / 2)
            self.state = f"disconnected ({why})"
            log.warning("link to the controller down (%s); trying again in %.1f s", why, pause)
            await self._sleep(pause)

    async def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping.is_set() and time.monotonic() < end:
            await asyncio.sleep(min(0.2, end - time.monotonic()))

    async def _session(self) -> str:
        host, port = self.info["host"], self.info["port"]
        expired = self._certificate_expired()
        if expired:
            log.error("%s", expired)
            return expired
        try:
            ctx = self._context()
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), 10)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            return f"connect: {str(exc) or type(exc).__name__}"
        self._writer = writer
        try:
            ca = x509.load_pem_x509_certificate(Path(self.files.path("ca.pem")).read_bytes())
            check_controller_cert(writer.get_extra_info("ssl_object").getpeercert(binary_form=True), ca)
            applied = await self._ask({"op": "applied_generation"})
            await self._send(Hello(protocol_version=self.version, node_id=self.node, agent_version=__version__,
                                   applied_generation=applied.get("generation"), boot_id=applied.get("boot_id")))
            welcome = await asyncio.wait_for(self._read(reader), 15)
            if isinstance(welcome, Goodbye):
                self._final = not welcome.retry
                return f"refused: {welcome.reason}"
            if not isinstance(welcome, Welcome):
                return f"unexpected {welcome.kind}"
            self._heard()
            self.connected, self.state = True, "connected"
            self.connects += 1
            log.info("link up: controller %s:%s, protocol v%s, heartbeat %s s", host, port, welcome.protocol_version,
                     welcome.heartbeat_s)
            self.peer_version = welcome.protocol_version
            self._uploading.clear()
            chores = asyncio.create_task(self._chores(welcome.heartbeat_s))
            try:
                while not self.stopping.is_set():
                    msg = await asyncio.wait_for(self._read(reader), welcome.heartbeat_s * 3)
                    self._heard()
                    if isinstance(msg, Goodbye):
                        self._final = not msg.retry
                        return f"controller closed the link: {msg.reason}"
                    await self._handle(msg)
                return "ok"
            finally:
                chores.cancel()
        except TimeoutError:
            return "the controller went silent"
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError) as exc:
            return f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - never let the link thread die
            log.exception("link failure")
            return f"error: {exc}"
        finally:
            self._writer = None
            writer.close()

    async def _handle(self, msg) -> None:
        if isinstance(msg, DesiredNodeState):
            answer = await self._ask({"op": "apply", "desired": msg, "via": LINK})
            if answer.get("ok"):
                await self._send(Applied(generation=msg.generation, report=ReconcileReport.model_validate(answer["report"]),
                                         status=AgentStatus.model_validate(answer["status"])))
            else:
                await self._send(Refused(generation=msg.generation, error=str(answer.get("error"))[:2000]))
        elif isinstance(msg, EvidenceReceipt):
            await self._ask({"op": "evidence", "ack": msg.ident})
        elif isinstance(msg, ReportReceipt):
            if self.reports.ack(msg.ident):
                log.debug("device report %s recorded by the controller", msg.ident)
        elif isinstance(msg, RecordingReceipt):
            self._uploading.discard(msg.ident)
            if msg.stored:
                (self.recordings_dir / f"{msg.ident}.pcap").unlink(missing_ok=True)
                log.info("recording %s stored by the controller", msg.ident)
            else:
                log.error("recording %s not stored: %s (tried again on the next connection)", msg.ident, msg.error)
        elif isinstance(msg, Certificate):
            if self._renewing is not None:
                # key first under a side name: a crash between the renames leaves a pair `_context` can mend
                self.files.write("tls.key.next", self._renewing)
                self.files.write("tls.pem", msg.certificate_pem)
                self.files.replace("tls.key.next", "tls.key")
                self._renewing = None
                log.info("certificate renewed until %s", msg.not_after.isoformat())
        elif isinstance(msg, Ping):
            await self._send(Pong(sent=msg.sent))

    async def _chores(self, heartbeat: float) -> None:
        """Status, evidence, renewal and the agent's own pings while connected. One failing chore is logged
        and retried; it must not silence the others while the link stays up."""
        next_status = next_ping = 0.0
        sent: set[str] = set()
        while True:
            now = time.monotonic()
            try:
                if now >= next_ping:
                    # the controller answers at once: strict mode then hears it every PING_S, whatever its heartbeat
                    next_ping = now + PING_S
                    await self._send(Ping(sent=time.time()))
                if now >= next_status:
                    next_status = now + min(STATUS_EVERY_S, heartbeat)
                    answer = await self._ask({"op": "status"})
                    if answer.get("ok"):
                        await self._send(AgentStatus.model_validate(answer["status"]))
                await self._deliver_evidence(sent)
                await self._deliver_reports(sent)
                await self._deliver_recordings(sent)
                await self._renew_if_due()
            except (ConnectionError, OSError):
                raise
            except Exception:  # noqa: BLE001 - logged; the next turn tries again
                log.exception("link chore failed")
                await asyncio.sleep(5)
            await asyncio.sleep(0.25)

    async def _deliver_evidence(self, sent: set[str]) -> None:
        key = None
        for p in sorted(self.evidence_dir.glob("*.json")):
            if p.stem in sent:
                continue
            try:
                ev = LaneEvidence.model_validate_json(p.read_text())
            except (OSError, ValueError):
                continue
            key = key or self.files.evidence_key()
            sig = base64.b64encode(key.sign(evidence_bytes(p.stem, ev))).decode()
            sent.add(p.stem)
            try:
                await self._send(SignedEvidence(ident=p.stem, evidence=ev, signature=sig))
            except ValueError as exc:  # larger than a frame: kept on disk for `wicket-agent evidence`, not retried here
                log.error("evidence %s cannot be sent over the link: %s", p.stem, exc)

    async def _deliver_reports(self, sent: set[str]) -> None:
        """Send each spooled device report once per connection, signed like evidence; its receipt deletes it."""
        idents = self.reports.idents()
        if not idents:
            return
        if self.peer_version < 4:
            if not self._reports_held_said:
                self._reports_held_said = True
                log.warning("the controller speaks protocol v%d, which takes no device reports: %d report(s) stay "
                            "spooled until it speaks v4", self.peer_version, len(idents))
            return
        key = None
        for ident in idents:
            if ("report:" + ident) in sent:
                continue
            try:
                report = self.reports.load(ident)
            except (OSError, ValueError):
                continue  # receipted meanwhile, or unreadable: the spool's cap removes it in time
            key = key or self.files.evidence_key()
            sig = base64.b64encode(key.sign(report_bytes(ident, report))).decode()
            sent.add("report:" + ident)
            try:
                await self._send(SignedReport(ident=ident, report=report, signature=sig))
            except ValueError as exc:  # larger than a frame: not retried on this connection
                log.error("device report %s cannot be sent over the link: %s", ident, exc)

    async def _deliver_recordings(self, sent: set[str]) -> None:
        """Upload payload recordings whose evidence the controller has receipted, one at a time, in chunks."""
        if self._uploading or self.peer_version < 3:
            return  # one at a time; a v2 controller takes no recordings
        for p in sorted(self.recordings_dir.glob("*.pcap")):
            ident = p.stem
            if ("pcap:" + ident) in sent or (self.evidence_dir / f"{ident}.json").exists() or not self.evidence_dir.exists():
                continue  # sent on this connection, or its evidence is not receipted yet (or the lane is still live)
            sent.add("pcap:" + ident)
            self._uploading.add(ident)
            digest = hashlib.sha256()
            offset = 0
            with open(p, "rb") as f:
                while True:
                    block = f.read(RECORDING_CHUNK)
                    digest.update(block)
                    last = len(block) < RECORDING_CHUNK
                    await self._send(RecordingChunk(ident=ident, offset=offset, data=base64.b64encode(block).decode(),
                                                    last=last, sha256=digest.hexdigest() if last else None))
                    offset += len(block)
                    if last:
                        break
            return

    async def _renew_if_due(self) -> None:
        if self._renewing is not None:
            return
        cert = self.files.certificate()
        # half of the life left when this agent received it (the certificate's not-before is backdated
        # for clock skew, so it cannot be the start)
        got = datetime.fromtimestamp(Path(self.files.path("tls.pem")).stat().st_mtime, UTC)
        start, end = max(cert.not_valid_before_utc, min(got, cert.not_valid_after_utc)), cert.not_valid_after_utc
        if datetime.now(UTC) < start + (end - start) / 2:
            return
        key, csr = new_tls_key()
        self._renewing = key
        await self._send(Renew(csr_pem=csr))

    # ---- plumbing ----

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # Pinned to the controller's own CA; the controller's identity is checked on its certificate
        # (URI SAN and serverAuth) rather than a host name, which may be an address behind NAT.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=self.files.path("ca.pem"))
        try:
            ctx.load_cert_chain(self.files.path("tls.pem"), self.files.path("tls.key"))
        except ssl.SSLError:
            if not (self.files.root / "tls.key.next").exists():
                raise
            self.files.replace("tls.key.next", "tls.key")  # a renewal interrupted between its two renames
            ctx.load_cert_chain(self.files.path("tls.pem"), self.files.path("tls.key"))
        return ctx

    def _certificate_expired(self) -> str | None:
        try:
            end = self.files.certificate().not_valid_after_utc
        except (OSError, ValueError) as exc:
            return f"cannot read this agent's certificate: {exc}"
        if end <= datetime.now(UTC):
            return (f"this agent's certificate expired at {end.isoformat()}: the controller refuses it; a site admin makes "
                    "a new join token and the agent enrols again (`wicket-agent enroll --force`)")
        return None

    async def _ask(self, request: dict) -> dict:
        return await asyncio.to_thread(self.submit, request)

    async def _send(self, msg) -> None:
        if self._writer is None:
            raise ConnectionError("not connected")
        self._writer.write(encode_frame(msg, self.version))
        await self._writer.drain()

    async def _read(self, reader: asyncio.StreamReader):
        n = frame_length(await reader.readexactly(4))
        return decode_frame(await reader.readexactly(n))

    def _heard(self) -> None:
        first = self.mono() - self.last_contact > 1
        self.last_contact = self.mono()
        if first:
            self._persist_contact()

    def _restore_contact(self) -> float:
        try:
            wall = float((self.files.root / "last_contact").read_text())
        except (OSError, ValueError):
            return self.mono()  # never linked yet: count from now
        return self.mono() - max(0.0, self.wall() - wall)

    def _persist_contact(self) -> None:
        try:
            self.files.write("last_contact", f"{self.wall() - (self.mono() - self.last_contact):.3f}")
        except OSError:
            pass
