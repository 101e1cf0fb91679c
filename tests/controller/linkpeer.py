"""Simulated agents for the controller's link tests: loopback only, no lab namespaces.

  h = LinkHarness(tmp_path, db_url)             # a harness whose lanes go over a LinkServer on 127.0.0.1:<free port>
  made = h.new_token("north-1")                 # a join token from the first admin (no TOTP code spent)
  h.enrol(made.token, "rtr-1")                  # `nodeagent.enroll.enroll` into <tmp>/agents/rtr-1
  agent = h.sim("rtr-1")                        # the agent's real LinkClient, with a fake `submit` (SimAgent)
  peer = Peer.connect(h.address, *h.tls("rtr-1"))   # speaks frames itself (Peer): hello, applied, evidence…

The harness's clock moves 30 s with every login and step-up, and the controller issues certificates from that
clock while TLS checks them against the real one: a certificate is valid from five minutes before it was
issued, so enrol before a long set-up moves the clock further ahead than that (`LinkHarness.enrol` says so).
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from controller.agent_link import LinkServer
from controller.app import create_app
from controller.auth import Principal
from controller.db import transaction
from controller.enrolment import NewToken
from controller.models import AgentCertificate, User
from nodeagent.enroll import LinkFiles, enroll, new_tls_key
from nodeagent.link import LinkClient
from nodeagent.wire import (
    PROTOCOL_VERSION,
    AgentStatus,
    DesiredNodeState,
    Enrolled,
    Goodbye,
    Hello,
    LaneEvidence,
    LaneTotals,
    ObservedLane,
    Ping,
    Pong,
    ReconcileReport,
    SignedEvidence,
    decode_frame,
    encode_frame,
    evidence_bytes,
    frame_length,
)

from .conftest import Harness

WAIT_S = 15.0  # the most any wait here takes before it fails the test (never reached by a working controller)


def wait_for(check, what: str, timeout: float = WAIT_S):
    """Poll `check()` until it returns something true; fail naming `what` if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def principal(h: Harness, username: str = "root") -> Principal:
    """A service-level caller for `username`, as a login would make it (no TOTP code spent)."""
    with h.app.state.auth.factory() as s:
        user = s.scalar(select(User).where(User.username == username))
        return Principal(user_id=user.id, username=user.username, kind=user.kind,
                         roles=tuple(sorted((g.role, g.site) for g in user.grants)), token_hash="", token_kind="test",
                         expires_at=datetime.fromtimestamp(h.t, UTC) + timedelta(hours=1))


class LinkHarness(Harness):
    """The test harness, with the agent link in place of the fake nodes: `create_app` builds its LinkServer
    (WICKET_LINK_LISTEN), which is started here on a free loopback port (a bare TestClient runs no lifespan)."""

    def __init__(self, tmp_path: Path, db_url: str, extra_env: dict | None = None):
        env = {"WICKET_LINK_LISTEN": "127.0.0.1:0", "WICKET_LINK_HEARTBEAT_S": "2", "WICKET_ACK_TIMEOUT_S": "5",
               **(extra_env or {})}
        super().__init__(tmp_path, db_url, env)
        self.app.state.engine.dispose()  # the fake nodes' app: replaced by one whose lanes go over the link
        self.nodes = None
        self.app = create_app(self.settings, clock=lambda: self.t)
        from fastapi.testclient import TestClient

        self.client = TestClient(self.app)
        self.link: LinkServer = self.app.state.link_server
        assert isinstance(self.link, LinkServer)
        self.address = self.link.start("127.0.0.1", 0)
        self.tmp = tmp_path
        self.sims: list[SimAgent] = []
        self.peers: list[Peer] = []

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.quiesce()  # its goodbyes wake the agents' link clients, which would otherwise wait for the next frame
        for sim in self.sims:
            sim.stop()
        self.app.state.engine.dispose()

    def quiesce(self) -> None:
        """Stop the link and collect its garbage now, on this thread. Python 3.11.2's `ast` module keeps its
        recursion depth in global state, and both pytest (formatting a failure) and a traceback printed by another
        thread (asyncio's "Task exception was never retrieved", say) parse source: at the same time, that fails with
        "SystemError: AST constructor recursion depth mismatch" and takes the test run down with it."""

        import gc

        self.link.stop()
        gc.collect()

    @property
    def link_url(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def state_dir(self, node: str) -> Path:
        return self.tmp / "agents" / node

    # ---- enrolment ----

    def new_token(self, site: str, ttl: timedelta | None = None, by: str = "root") -> NewToken:
        return self.app.state.agents.create_token(principal(self, by), site, ttl, None)

    def enrol(self, token: str, node: str, state_dir: Path | None = None) -> Enrolled:
        ahead = self.t - time.time()
        assert ahead < 240, (f"the harness clock is {ahead:.0f} s ahead of the real one: a certificate issued now would not "
                             "be valid yet for TLS; enrol earlier in the test's set-up")
        return enroll(str(state_dir or self.state_dir(node)), self.link_url, token, node)

    def enrolled(self, site: str, node: str) -> Enrolled:
        """A node enrolled with a fresh token of its own."""
        return self.enrol(self.new_token(site).token, node)

    def tls(self, node: str) -> tuple[str, str]:
        """(certificate, key) paths of an enrolled node's client certificate."""
        files = LinkFiles.of(self.state_dir(node))
        return files.path("tls.pem"), files.path("tls.key")

    def extra_certificate(self, node: str, ttl: timedelta, where: Path) -> tuple[str, str]:
        """Another client certificate for `node`, issued and recorded as enrolment does it (so the link accepts it
        while it is valid): (certificate, key) paths under `where`."""
        key, csr = new_tls_key()
        issued = self.app.state.agents.ca.issue_agent(csr, node, ttl)
        with transaction(self.app.state.auth.factory) as s:
            s.add(AgentCertificate(serial=issued.serial, node=node, issued_at=datetime.now(UTC), not_after=issued.not_after))
        where.mkdir(parents=True, exist_ok=True)
        (where / "tls.pem").write_text(issued.pem)
        (where / "tls.key").write_bytes(key)
        return str(where / "tls.pem"), str(where / "tls.key")

    # ---- agents ----

    def sim(self, node: str, *, version: int = PROTOCOL_VERSION, start: bool = True) -> SimAgent:
        agent = SimAgent(self.state_dir(node), version=version)
        self.sims.append(agent)
        if start:
            agent.start()
        return agent

    def peer(self, node: str | None, **kw) -> Peer:
        """A frame-level connection, with `node`'s client certificate (None: without one)."""
        cert, key = self.tls(node) if node else (None, None)
        peer = Peer.connect(self.address, cert, key, **kw)
        self.peers.append(peer)
        return peer


class Closed(Exception):
    """The controller ended the connection (or TLS refused it) without a goodbye."""


class Peer:
    """One TLS connection to the link that speaks frames directly, from the test's thread. Pings are answered
    while it reads. Everything received is kept in `received`, in order."""

    def __init__(self, sock: ssl.SSLSocket):
        self.sock = sock
        self.received: list = []
        self._buf = b""
        self._pings = 0

    @classmethod
    def connect(cls, address: tuple[str, int], cert: str | None = None, key: str | None = None, timeout: float = WAIT_S) -> Peer:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the controller is under test here, not the agent's checks of it
        if cert:
            ctx.load_cert_chain(cert, key)
        raw = socket.create_connection(address, timeout=timeout)
        try:
            sock = ctx.wrap_socket(raw)
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise Closed(f"TLS: {exc}") from None
        sock.settimeout(timeout)
        return cls(sock)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, msg, version: int = PROTOCOL_VERSION) -> None:
        self.sock.sendall(encode_frame(msg, version))

    def hello(self, node: str, version: int = PROTOCOL_VERSION, applied: int | None = None):
        """Say hello as `node` speaking `version`; the controller's answer (Welcome or Goodbye)."""
        self.send(Hello(protocol_version=version, node_id=node, agent_version="peer", applied_generation=applied), version)
        return self.recv()

    def recv(self, timeout: float = WAIT_S):
        """The next frame that is not a ping (pings are answered). Closed when the connection ends."""
        self.sock.settimeout(timeout)
        while True:
            try:
                n = frame_length(self._exactly(4))
                msg = decode_frame(self._exactly(n))
            except (ssl.SSLError, ConnectionError, OSError) as exc:
                if isinstance(exc, TimeoutError | socket.timeout):
                    raise AssertionError(f"no frame from the controller within {timeout:g} s") from None
                raise Closed(f"{type(exc).__name__}: {exc}") from None
            self.received.append(msg)
            if isinstance(msg, Ping):
                self.send(Pong(sent=msg.sent))
                continue
            return msg

    def until(self, kind: type, timeout: float = WAIT_S):
        """Read until a frame of `kind` arrives; a goodbye on the way fails the test with its reason."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, Goodbye):
                raise AssertionError(f"the controller said goodbye while a {kind.__name__} was awaited: {msg.reason}")

    def sync(self, timeout: float = WAIT_S) -> Goodbye | None:
        """Ping and wait for the pong: the controller handles a connection's frames in order, so everything sent
        before has been handled. A goodbye (or the end of the connection) instead is returned (None: pong)."""
        self._pings += 1
        marker = 1e6 + self._pings
        try:
            self.send(Ping(sent=marker))
        except OSError:
            return Goodbye(reason="(connection gone)")
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.recv(max(0.01, deadline - time.monotonic()))
            except Closed:
                return Goodbye(reason="(connection gone)")
            if isinstance(msg, Pong) and msg.sent == marker:
                return None
            if isinstance(msg, Goodbye):
                return msg

    def pushes(self) -> list[DesiredNodeState]:
        return [m for m in self.received if isinstance(m, DesiredNodeState)]

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the controller closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


class SimAgent:
    """The agent's real link (`nodeagent.link.LinkClient`) over a fake agent: `submit` answers as the agent's
    loop would. How it takes a pushed state is `mode`:
      "open"    applied; every lane open, with a node key of its own
      "fail"    applied, but no lane opened: each is named in the report's errors with `lane_error`
      "refuse"  not applied at all: refused with `refusal`
      "hold"    the answer waits until `release` is set (`holding` is set while it waits)
    Evidence files put in `evidence_dir` are delivered by the client; receipts delete them (`receipts`)."""

    def __init__(self, state_dir: Path, *, version: int = PROTOCOL_VERSION):
        self.state_dir = Path(state_dir)
        self.files = LinkFiles.of(state_dir)
        self.node = self.files.controller()["node_id"]
        self.evidence_dir = self.state_dir / "evidence"
        self.evidence_dir.mkdir(parents=True, exist_ok=True)
        self.mode = "open"
        self.lane_error = "could not create the WireGuard interface: operation not permitted"
        self.refusal = "generation refused by the simulated agent"
        self.holding, self.release = threading.Event(), threading.Event()
        self.applied: list[DesiredNodeState] = []  # every state taken, in order
        self.offered: list[DesiredNodeState] = []  # every state pushed, taken or not
        self.receipts: list[str] = []
        self.keys: dict[str, str] = {}
        self.current: DesiredNodeState | None = None
        self.lock = threading.Lock()
        self.client = LinkClient(str(self.state_dir), self.submit, str(self.evidence_dir), time.monotonic, time.time,
                                 version=version)

    def start(self) -> SimAgent:
        self.client.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if not self.client.stopping.is_set():
            self.client.stop()

    def wait_connected(self, timeout: float = WAIT_S) -> None:
        wait_for(lambda: self.client.connected, f"agent {self.node} to link up ({self.client.state})", timeout)

    def wait_generation(self, generation: int, timeout: float = WAIT_S) -> DesiredNodeState:
        return wait_for(lambda: next((d for d in list(self.applied) if d.generation >= generation), None),
                        f"agent {self.node} to take generation {generation}", timeout)

    # ---- the fake agent ----

    def submit(self, request: dict) -> dict:
        op = request["op"]
        if op == "applied_generation":
            return {"ok": True, "generation": self.current.generation if self.current else None, "boot_id": "sim-boot"}
        if op == "status":
            return {"ok": True, "status": self.status().model_dump(mode="json")}
        if op == "apply":
            return self._apply(request["desired"])
        if op == "evidence":
            ident = request["ack"]
            self.receipts.append(ident)
            (self.evidence_dir / f"{ident}.json").unlink(missing_ok=True)
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op}"}

    def _apply(self, desired: DesiredNodeState) -> dict:
        self.offered.append(desired)
        if self.mode == "hold":
            self.holding.set()
            self.release.wait(60)
        if self.mode == "refuse":
            return {"ok": False, "error": self.refusal}
        with self.lock:
            if self.current is not None and desired.generation < self.current.generation:
                return {"ok": False, "error": f"generation {desired.generation} is older than {self.current.generation}"}
            errors = []
            if self.mode == "fail":
                errors = [f"lane {lane.session_id}: {self.lane_error}" for lane in desired.lanes]
            else:
                for lane in desired.lanes:
                    self.keys.setdefault(lane.session_id, base64.b64encode(os.urandom(32)).decode())
            self.current = desired
            self.applied.append(desired)
            report = ReconcileReport(generation=desired.generation, errors=errors)
            return {"ok": True, "report": report.model_dump(mode="json"), "status": self.status().model_dump(mode="json")}

    def status(self) -> AgentStatus:
        d = self.current
        now = datetime.now(UTC)
        lanes = [] if d is None or self.mode == "fail" else [
            ObservedLane(session_id=lane.session_id, lane=f"wk{i}", listen_port=lane.listen_port,
                         node_public_key=self.keys.get(lane.session_id), engineer_address=str(lane.engineer_address),
                         device_address=str(lane.device_address), allowed=[f.label() for f in lane.flows],
                         end_time=lane.end_time, seconds_left=max(0.0, (lane.end_time - now).total_seconds()))
            for i, lane in enumerate(d.lanes)]
        return AgentStatus(node_id=self.node, agent_version="sim", backend="userspace",
                           applied_generation=d.generation if d else None, lanes=lanes,
                           pending_evidence=len(list(self.evidence_dir.glob("*.json"))), clock_synchronized=True)

    def write_evidence(self, ident: str, evidence: LaneEvidence) -> None:
        """An evidence record as the agent leaves it; the link client signs and delivers it."""
        tmp = self.evidence_dir / f".{ident}.tmp"
        tmp.write_text(evidence.model_dump_json())
        tmp.rename(self.evidence_dir / f"{ident}.json")


# ---- evidence ----


def lane_evidence(node: str, session_id: str | None, end_reason: str = "expired", **fields) -> LaneEvidence:
    """A plausible evidence record of one lane on `node`."""
    now = datetime.now(UTC)
    body = dict(node_id=node, session_id=session_id, revision=1, device_id="RTU-17", lane="wk0", backend="userspace",
                engineer_public_key=base64.b64encode(b"e" * 32).decode(), node_public_key=base64.b64encode(b"n" * 32).decode(),
                engineer_address="100.64.9.2", device_address="10.20.0.17", service="iec104", allowed=["tcp/2404"],
                listen_port=51000, planned_end=now, opened_at=now - timedelta(minutes=5), closed_at=now,
                end_reason=end_reason, lateness_ms=12, totals=LaneTotals(bytes_out=1000, bytes_in=2000), flows=[], transport=[],
                blocked=[], wireguard=None)
    body.update(fields)
    return LaneEvidence(**body)


def signed(state_dir: Path, ident: str, evidence: LaneEvidence, key=None) -> SignedEvidence:
    """`evidence` signed as the agent signs it: with its enrolment (evidence) key, or with `key`."""
    key = key or LinkFiles.of(state_dir).evidence_key()
    return SignedEvidence(ident=ident, evidence=evidence, signature=base64.b64encode(key.sign(evidence_bytes(ident, evidence))).decode())
