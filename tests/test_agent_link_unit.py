"""The agent's side of the link, fast and without root: the clock and strict-mode rules on fake kernel objects,
the control socket's link rule, enrolment's checks against fake TLS servers on loopback, and LinkClient against
an in-process LinkServer on loopback."""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyotp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import nodeagent.wire as wire
from controller.agent_ca import AgentCA
from controller.agent_link import LinkServer
from controller.app import create_app
from controller.bootstrap import init
from controller.db import transaction
from controller.inventory_schemas import SiteCreate
from controller.models import AgentCertificate
from controller.settings import load
from nodeagent.control import handler
from nodeagent.enroll import CONTROLLER_URI, EnrolError, LinkFiles, enroll, new_tls_key, parse_controller
from nodeagent.link import LINK, LinkClient
from nodeagent.wire import (
    AgentStatus,
    DesiredNodeState,
    EndReason,
    EnrollBegin,
    EnrollCA,
    EnrollRequest,
    FlowRecord,
    Goodbye,
    LaneEvidence,
    LaneTotals,
    ReconcileReport,
    decode_frame,
    encode_frame,
    frame_length,
)
from tests.fakes import FakeClock
from tests.test_agent_fake import Node, lane

PASSWORD = "correct horse battery staple"
HEARTBEAT_S = 1.0  # the test controller's: short, so a LinkClient notices a stop within a second


class FakeLink:
    """What the agent uses of its LinkClient: how long the controller has been silent, and a description."""

    def __init__(self):
        self.silent = 0.0

    def silent_for(self) -> float:
        return self.silent

    def describe(self) -> str:
        return f"fake link, silent for {self.silent:g} s"


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path)


def wait_until(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


# ---- the clock rule -----------------------------------------------------------------------------------------

UNSYNCED = (False, "kernel reports the clock unsynchronised (maxerror 16000000 µs)")


def test_unsynchronised_clock_refuses_new_lanes_and_keeps_open_ones(node):
    s0, s1 = lane(0, node.clock), lane(1, node.clock)
    node.apply([s0])
    node.clock_state = UNSYNCED
    report = node.apply([s0, s1])
    assert set(node.backend.boxes) == node.names([s0]), "the open lane stays, the new one is not opened"
    assert node.fw.lanes_with_policy() == node.names([s0])
    [error] = report.errors
    assert error.startswith("lane s-1 not opened: this node's clock is not synchronised (kernel reports the clock unsynchronised")
    assert 'clock_sync = "warn"' in error
    assert node.evidence() == [], "nothing was closed"
    st = node.agent.status()
    assert st.clock_synchronized is False
    assert st.clock_detail == f"{UNSYNCED[1]}: new lanes are refused"
    node.clock.advance(node.cfg.resync_interval)
    node.agent.tick()
    assert set(node.backend.boxes) == node.names([s0]), "still refused on the periodic pass"
    node.clock_state = (True, "synchronised (maxerror 1000 µs, esterror 10 µs)")
    node.clock.advance(node.cfg.resync_interval)
    node.agent.tick()
    assert set(node.backend.boxes) == node.names([s0, s1]), "opened once the clock is synchronised"
    assert node.agent.status().clock_detail == "synchronised (maxerror 1000 µs, esterror 10 µs)"


def test_clock_sync_warn_opens_lanes_on_an_unsynchronised_clock(node):
    node.cfg.clock_sync = "warn"
    node.clock_state = UNSYNCED
    specs = [lane(0, node.clock), lane(1, node.clock)]
    report = node.apply(specs)
    assert report.errors == []
    assert set(node.backend.boxes) == node.names(specs)
    st = node.agent.status()
    assert st.clock_synchronized is False and st.clock_detail == UNSYNCED[1]


# ---- strict mode ----------------------------------------------------------------------------------------------


def test_strict_mode_ends_every_lane_once_the_controller_is_silent_for_the_limit(node):
    node.cfg.strict_after_s = 30
    link = node.agent.link = FakeLink()
    specs = [lane(0, node.clock), lane(1, node.clock)]
    node.apply(specs)
    assert node.agent.status().strict_after_s == 30 and node.agent.status().link == link.describe()
    for silent in (0, 10, 29.99):
        link.silent = silent
        node.clock.advance(1)
        node.agent.tick()
        assert set(node.backend.boxes) == node.names(specs), f"silent for {silent} s"
    assert node.evidence() == []
    link.silent = 30
    node.agent.tick()
    assert node.backend.boxes == {} and node.fw.lanes_with_policy() == set()
    ended = node.evidence()
    assert sorted((e.session_id, e.end_reason) for e in ended) == [("s-0", EndReason.control_lost), ("s-1", EndReason.control_lost)]
    # the controller is back and sends the same sessions again: they stay ended
    link.silent = 0
    report = node.apply(specs)
    assert node.backend.boxes == {} and report.changes == []
    node.clock.advance(node.cfg.resync_interval)
    node.agent.tick()
    assert node.backend.boxes == {}
    node.restart().link = link
    node.apply(specs)
    assert node.backend.boxes == {}, "the tombstones survive a restart"
    assert len(node.evidence()) == 2


def test_strict_mode_off_keeps_lanes_however_long_the_silence(node):
    node.cfg.strict_after_s = 0
    link = node.agent.link = FakeLink()
    specs = [lane(0, node.clock, seconds=7200)]
    node.apply(specs)
    link.silent = 10**9
    node.clock.advance(3600)
    node.agent.tick()
    assert set(node.backend.boxes) == node.names(specs)
    assert node.evidence() == [] and node.agent.status().strict_after_s is None


def test_strict_mode_without_a_link_does_nothing(node):
    node.cfg.strict_after_s = 30  # not enrolled: nobody to lose
    specs = [lane(0, node.clock)]
    node.apply(specs)
    node.clock.advance(300)
    node.agent.tick()
    assert set(node.backend.boxes) == node.names(specs)


def test_strict_mode_opens_no_new_lane_while_control_is_lost(node):
    node.cfg.strict_after_s = 30
    link = node.agent.link = FakeLink()
    s0, s1 = lane(0, node.clock), lane(1, node.clock)
    node.backend.fail_create = {node.naming.lane_name("s-1")}
    node.apply([s0, s1])
    assert set(node.backend.boxes) == node.names([s0])
    link.silent = 31
    node.agent.tick()
    assert node.backend.boxes == {}
    node.backend.fail_create.clear()  # what kept s-1 shut is gone, but the controller is still silent
    node.clock.advance(node.cfg.resync_interval)
    node.agent.tick()
    assert node.backend.boxes == {}, "a lane opened while the controller was out of reach past strict_after_s"


# ---- the control socket's link rule ------------------------------------------------------------------------------

ONLY_OVER_THE_LINK = ("this agent is enrolled with a controller: its desired state comes only over the link "
                      "(`wicket-agent status` shows the link)")


def desired(node, generation: int, lanes) -> DesiredNodeState:
    return DesiredNodeState(node_id="n1", generation=generation, settings={"tunnel_networks": ["100.64.0.0/16"]}, lanes=lanes)


@pytest.mark.parametrize("via", ["absent", "LINK", "link", True, {}], ids=str)
def test_enrolled_agent_refuses_apply_that_did_not_come_over_the_link(node, via):
    handle = handler(node.agent)
    node.apply([lane(0, node.clock)], generation=1)
    node.agent.link = FakeLink()
    before = (node.backend.render(), node.fw.render(), node.agent.desired, (Path(node.cfg.state_dir) / "desired.json").read_text())
    for body in (desired(node, 2, [lane(1, node.clock)]).model_dump(mode="json"), desired(node, 2, [])):
        req = {"op": "apply", "desired": body}
        if via != "absent":
            req["via"] = via
        assert handle(req) == {"ok": False, "error": ONLY_OVER_THE_LINK}
    after = (node.backend.render(), node.fw.render(), node.agent.desired, (Path(node.cfg.state_dir) / "desired.json").read_text())
    assert after == before


def test_apply_over_the_link_answers_report_and_status(node):
    handle = handler(node.agent)
    link = node.agent.link = FakeLink()
    out = handle({"op": "apply", "desired": desired(node, 3, [lane(0, node.clock)]), "via": LINK})
    assert out["ok"] is True and set(out) == {"ok", "report", "status"}
    report = ReconcileReport.model_validate(out["report"])
    assert report.generation == 3 and any(c.startswith("opened") for c in report.changes)
    st = AgentStatus.model_validate(out["status"])
    assert st.applied_generation == 3 and [lane_.session_id for lane_ in st.lanes] == ["s-0"] and st.link == link.describe()
    assert set(node.backend.boxes) == {node.naming.lane_name("s-0")}
    # a JSON body over the link is parsed the same way
    out = handle({"op": "apply", "desired": desired(node, 4, []).model_dump(mode="json"), "via": LINK})
    assert out["ok"] is True and node.backend.boxes == {}
    # and what the agent refuses comes back as an error, not an exception
    out = handle({"op": "apply", "desired": desired(node, 2, []), "via": LINK})
    assert out["ok"] is False and "generation 2 is older than the applied 4" in out["error"]
    out = handle({"op": "apply", "desired": {"node_id": "n1", "generation": "x"}, "via": LINK})
    assert out["ok"] is False and out["error"].startswith("invalid desired state: generation:")


def test_an_agent_that_is_not_enrolled_takes_local_apply(node):
    out = handler(node.agent)({"op": "apply", "desired": desired(node, 1, [lane(0, node.clock)]).model_dump(mode="json")})
    assert out["ok"] is True and "status" not in out
    assert set(node.backend.boxes) == {node.naming.lane_name("s-0")}


def test_applied_generation_answers_generation_and_boot_id(node):
    handle = handler(node.agent)
    node.agent.link = FakeLink()
    assert handle({"op": "applied_generation"}) == {"ok": True, "generation": None, "boot_id": "fake-boot"}
    handle({"op": "apply", "desired": desired(node, 6, []), "via": LINK})
    assert handle({"op": "applied_generation"}) == {"ok": True, "generation": 6, "boot_id": "fake-boot"}


# ---- --controller -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("ctl.example", ("ctl.example", 7443)),
        ("ctl.example:8443", ("ctl.example", 8443)),
        ("192.0.2.1:1", ("192.0.2.1", 1)),
        ("tls://192.0.2.1:65535", ("192.0.2.1", 65535)),
        ("wicket://ctl.example:9443/", ("ctl.example", 9443)),
        ("  ctl.example:7443\n", ("ctl.example", 7443)),
        ("[fd00::1]:9443", ("fd00::1", 9443)),
        ("[fd00::1]", ("fd00::1", 7443)),
        ("tls://[2001:db8::7]:7443", ("2001:db8::7", 7443)),
    ],
)
def test_parse_controller_accepts(text, expected):
    assert parse_controller(text) == expected


@pytest.mark.parametrize(
    "text,message",
    [
        ("ctl.example:https", "the port must be a number"),
        ("[fd00::1]:x", "the port must be a number"),
        ("ctl.example:0", "port out of range"),
        ("ctl.example:65536", "port out of range"),
        ("[fd00::1]:70000", "port out of range"),
        ("https://ctl.example:7443", "write HOST:PORT"),
        ("tls://https://ctl.example", "write HOST:PORT"),
        ("", "write HOST:PORT"),
        ("tls://", "write HOST:PORT"),
        ("tls://ctl.example:7443/agent", ""),
    ],
)
def test_parse_controller_refuses_with_a_message_naming_the_input(text, message):
    with pytest.raises(EnrolError) as info:
        parse_controller(text)
    assert str(info.value).startswith(f"--controller {text!r}: ") and message in str(info.value)


@pytest.mark.parametrize("text", ["fd00::1", "tls://ctl.example/agent", "ctl.example/agent", ":7443", "tls://:7443"])
def test_parse_controller_refuses_what_it_would_misread(text):
    with pytest.raises(EnrolError):
        parse_controller(text)


# ---- enroll() against fake controllers ------------------------------------------------------------------------------

SECRET = "s3cret-" + "x" * 30


def token_for(ca: AgentCA) -> str:
    return f"wkj1.abcdefgh2345.{SECRET}.{ca.pin()}"


def leaf(ca: AgentCA, *, uris=(CONTROLLER_URI,), ekus=(ExtendedKeyUsageOID.SERVER_AUTH,), dns=("ctl.example",),
         valid=(timedelta(hours=-1), timedelta(days=1))) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a server certificate signed by `ca`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wicket controller")]))
         .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now + valid[0]).not_valid_after(now + valid[1])
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ekus:
        b = b.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    cert = b.sign(ca.key, hashes.SHA256())
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


def agent_leaf(ca: AgentCA) -> tuple[bytes, bytes]:
    key, csr = new_tls_key()
    return key, ca.issue_agent(csr, "rtr-9", timedelta(hours=1)).pem.encode()


class FakeController:
    """A TLS listener on 127.0.0.1 playing the controller's part of enrolment: it answers enroll_begin with
    `ca_pem` and records every frame (kind and raw bytes) it receives; an `enroll` gets a goodbye."""

    def __init__(self, work: Path, key_pem: bytes, cert_pem: bytes, ca_pem: str):
        work.mkdir(parents=True, exist_ok=True)
        chain = work / "server.pem"
        chain.write_bytes(key_pem + cert_pem)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.load_cert_chain(chain)
        self.ca_pem = ca_pem
        self.kinds: list[str] = []
        self.raw = b""
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(15)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                s.settimeout(15)
                while True:
                    header = self._exactly(s, 4)
                    body = self._exactly(s, frame_length(header))
                    self.raw += header + body
                    msg = decode_frame(body)
                    self.kinds.append(msg.kind)
                    if isinstance(msg, EnrollBegin):
                        s.sendall(encode_frame(EnrollCA(ca_pem=self.ca_pem)))
                    elif isinstance(msg, EnrollRequest):
                        s.sendall(encode_frame(Goodbye(reason="enrolment refused: fake controller", retry=False)))
                        return
        except (OSError, ssl.SSLError, EOFError):
            return
        finally:
            self.sock.close()

    @staticmethod
    def _exactly(s, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def finish(self) -> None:
        self.thread.join(15)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def cas(tmp_path_factory):
    """The controller's CA the token pins, and another with the same name and a different key."""
    root = tmp_path_factory.mktemp("cas")
    return AgentCA.load_or_create(root / "real"), AgentCA.load_or_create(root / "other")


def _run_enroll(tmp_path, cas, server_cert, sent_ca, name):
    real, _other = cas
    server = FakeController(tmp_path / "srv", *server_cert, sent_ca.pem)
    state = tmp_path / "agent"
    try:
        with pytest.raises(EnrolError) as info:
            enroll(str(state), f"127.0.0.1:{server.port}", token_for(real), "rtr-1", timeout=10)
    finally:
        server.finish()
    return server, state, str(info.value)


def test_enroll_sends_the_token_to_a_genuine_controller(tmp_path, cas):
    """The control case: the fake server does see an `enroll` frame when everything checks out."""
    real, _ = cas
    server, state, error = _run_enroll(tmp_path, cas, leaf(real), real, "genuine")
    assert server.kinds == ["enroll_begin", "enroll"] and SECRET.encode() in server.raw
    assert error == "enrolment refused: fake controller"
    assert not LinkFiles.of(state).enrolled


@pytest.mark.parametrize(
    "case,message",
    [
        ("other CA, sends its own CA", "the controller's CA does not match the pin in the join token: refusing to send the token"),
        ("other CA's leaf, sends the pinned CA", "the server's certificate was not issued by the pinned controller CA: refusing to send the token"),
        ("agent certificate as the server's", "the server's certificate is not a wicket controller certificate"),
        ("controller URI, clientAuth only", "the server's certificate is not a wicket controller certificate"),
        ("serverAuth, no controller URI", "the server's certificate is not a wicket controller certificate"),
        ("a wrong URI", "the server's certificate is not a wicket controller certificate"),
        ("no SAN", "the server's certificate is not a wicket controller certificate"),
        ("no EKU", "the server's certificate is not a wicket controller certificate"),
        ("expired", "the controller's certificate is outside its validity"),
        ("not yet valid", "the controller's certificate is outside its validity"),
    ],
)
def test_enroll_refuses_before_sending_the_token(tmp_path, cas, case, message):
    real, other = cas
    server_cert, sent_ca = {
        "other CA, sends its own CA": (leaf(other), other),
        "other CA's leaf, sends the pinned CA": (leaf(other), real),
        "agent certificate as the server's": (agent_leaf(real), real),
        "controller URI, clientAuth only": (leaf(real, ekus=(ExtendedKeyUsageOID.CLIENT_AUTH,)), real),
        "serverAuth, no controller URI": (leaf(real, uris=()), real),
        "a wrong URI": (leaf(real, uris=("urn:wicket:controller:evil",)), real),
        "no SAN": (leaf(real, uris=(), dns=()), real),
        "no EKU": (leaf(real, ekus=()), real),
        "expired": (leaf(real, valid=(timedelta(days=-2), timedelta(days=-1))), real),
        "not yet valid": (leaf(real, valid=(timedelta(days=1), timedelta(days=2))), real),
    }[case]
    server, state, error = _run_enroll(tmp_path, cas, server_cert, sent_ca, case)
    assert server.kinds == ["enroll_begin"], "the token went to a server that is not the pinned controller"
    assert SECRET.encode() not in server.raw
    assert error.startswith(message), error
    assert not (state / "link").exists() or not any((state / "link").iterdir()), "nothing is kept from a refused enrolment"


# ---- LinkClient against an in-process LinkServer ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ctl:
    """An in-process controller: database, CA, one site, join tokens, and its LinkServer on a fixed loopback port."""

    def __init__(self, root: Path):
        self.settings = load({"WICKET_DATA_DIR": str(root / "data"), "WICKET_DATABASE_URL": f"sqlite:///{root}/c.db",
                              "WICKET_SESSION_TICK_MS": "0", "WICKET_LINK_LISTEN": "127.0.0.1:0"})
        boot = init(self.settings, "root", "Root", PASSWORD)
        self.app = create_app(self.settings)
        self.agents = self.app.state.agents
        secret = re.search(r"secret=([A-Z2-7]+)", boot.enrolment.otpauth_uri).group(1)
        self.admin = self.app.state.auth.login("root", PASSWORD, code=pyotp.TOTP(secret).now()).principal
        self.app.state.inventory.create_site(self.admin, SiteCreate(
            name="north-1", display_name="North 1", tunnel_pool="100.64.7.0/24", port_min=51000, port_max=51099,
            public_endpoint="203.0.113.1", lan_networks=["192.0.2.0/24"]), None)
        self.port = free_port()
        self.server = self.app.state.link_server
        self.server.heartbeat_s = HEARTBEAT_S
        self.server.start("127.0.0.1", self.port)

    def start_again(self) -> None:
        """After `server.stop()`, what a controller restart does: a new listener with a new server certificate, same port."""
        old = self.server
        self.server = LinkServer(self.agents, self.agents.ca.server_context(["127.0.0.1"], self.settings.keys_dir),
                                 heartbeat_s=HEARTBEAT_S)
        self.server.on_applied, self.server.on_evidence = old.on_applied, old.on_evidence
        self.server.start("127.0.0.1", self.port)

    def enrol(self, node: str, state: Path) -> LinkFiles:
        token = self.agents.create_token(self.admin, "north-1", None, None).token
        done = enroll(str(state), f"127.0.0.1:{self.port}", token, node, timeout=10)
        assert done.node_id == node and done.site == "north-1"
        return LinkFiles.of(state)

    def past_half_life(self, files: LinkFiles, node: str) -> x509.Certificate:
        """Replace the agent's certificate (same key) with one issued and received 90 minutes ago for 2 hours, recorded as
        enrolment does."""
        key = serialization.load_pem_private_key(Path(files.path("tls.key")).read_bytes(), password=None)
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
        then = datetime.now(UTC) - timedelta(minutes=90)
        issued = self.agents.ca.issue_agent(csr, node, timedelta(hours=2), now=then)
        with transaction(self.agents.factory) as s:
            s.add(AgentCertificate(serial=issued.serial, node=node, issued_at=then, not_after=issued.not_after))
        files.write("tls.pem", issued.pem)
        os.utime(files.path("tls.pem"), (then.timestamp(), then.timestamp()))  # and received then
        return files.certificate()


@pytest.fixture(scope="module")
def ctl(tmp_path_factory):
    c = Ctl(tmp_path_factory.mktemp("ctl"))
    yield c
    c.server.stop()


class AgentSide:
    """The `submit` a LinkClient calls: answers like the agent's control handler, records what it was given."""

    def __init__(self, node: str, evidence_dir: Path):
        self.node, self.evidence_dir = node, evidence_dir
        self.generation: int | None = None
        self.applied: list[int] = []
        self.acked: list[str] = []

    def status(self) -> dict:
        return AgentStatus(node_id=self.node, agent_version="test", backend="userspace", applied_generation=self.generation,
                           lanes=[], pending_evidence=len(list(self.evidence_dir.glob("*.json"))),
                           clock_synchronized=True).model_dump(mode="json")

    def __call__(self, req: dict) -> dict:
        op = req["op"]
        if op == "applied_generation":
            return {"ok": True, "generation": self.generation, "boot_id": "test-boot"}
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == "apply":
            assert req["via"] is LINK
            self.generation = req["desired"].generation
            self.applied.append(self.generation)
            return {"ok": True, "report": ReconcileReport(generation=self.generation).model_dump(mode="json"),
                    "status": self.status()}
        if op == "evidence":
            p = self.evidence_dir / f"{req['ack']}.json"
            existed = p.exists()
            p.unlink(missing_ok=True)
            self.acked.append(req["ack"])
            return {"ok": existed, "acked": req["ack"]}
        return {"ok": False, "error": f"unknown request {op!r}"}


def client_for(state: Path, node: str, mono=time.monotonic, wall=time.time) -> tuple[LinkClient, AgentSide]:
    evidence_dir = state / "evidence"
    evidence_dir.mkdir(exist_ok=True)
    side = AgentSide(node, evidence_dir)
    return LinkClient(str(state), side, str(evidence_dir), mono, wall), side


@contextmanager
def running(client: LinkClient):
    client.start()
    try:
        yield client
    finally:
        client.stop()


def test_link_comes_up_and_takes_the_first_push(ctl, tmp_path):
    ctl.enrol("rtr-up", tmp_path)
    client, side = client_for(tmp_path, "rtr-up")
    with running(client):
        wait_until(lambda: client.connected, 10, "link up")
        wait_until(lambda: side.applied, 5, "the full push on connect")
        assert client.describe() == f"connected to 127.0.0.1:{ctl.port}"
        assert "rtr-up" in ctl.server.connected()
        wait_until(lambda: "rtr-up" in ctl.server.statuses, 5, "a status report")


def test_reconnects_after_the_controller_restarts_on_the_same_port(ctl, tmp_path):
    ctl.enrol("rtr-re", tmp_path)
    client, side = client_for(tmp_path, "rtr-re")
    with running(client):
        wait_until(lambda: client.connected, 10, "link up")
        wait_until(lambda: side.applied, 5, "the full push on connect")
        assert client.connects == 1
        ctl.server.stop()
        wait_until(lambda: not client.connected, 5, "the link down")
        assert client.describe().startswith("disconnected (controller closed the link: controller stopping): "
                                            f"controller 127.0.0.1:{ctl.port} last heard ")
        ctl.start_again()
        wait_until(lambda: client.connects == 2 and client.connected, 15, "the link back after the restart")
        assert "rtr-re" in ctl.server.connected()
        wait_until(lambda: len(side.applied) >= 2, 5, "a full push on the new connection")


def test_last_contact_survives_a_restart_of_the_link_client(ctl, tmp_path):
    files = ctl.enrol("rtr-lc", tmp_path)
    clock = FakeClock(wall=1_900_000_000.0, mono=500.0)
    client, _ = client_for(tmp_path, "rtr-lc", clock.mono, clock.wall)
    assert client.silent_for() == 0, "never linked: counts from now"
    with running(client):
        wait_until(lambda: client.connected, 10, "link up")
        clock.advance(5)  # heard again at the next ping (the fake clock moves only here)
        wait_until(lambda: client.silent_for() == 0, 5, "a ping heard")
    assert float((files.root / "last_contact").read_text()) == pytest.approx(clock.wall())
    # the router reboots (its monotonic clock starts again) 100 s later, and the controller is out of reach
    after = FakeClock(wall=clock.wall() + 100, mono=20.0)
    restarted, _ = client_for(tmp_path, "rtr-lc", after.mono, after.wall)
    assert restarted.silent_for() == pytest.approx(100)
    after.advance(10)
    assert restarted.silent_for() == pytest.approx(110)
    assert restarted.describe().endswith(f"controller 127.0.0.1:{ctl.port} last heard 110 s ago")
    # and strict mode counts those 110 s: a 60-s limit ends the lanes at the first tick
    node = Node(tmp_path / "node")
    node.cfg.strict_after_s = 60
    node.apply([lane(0, node.clock)])  # opened before the link is attached: a silent link opens nothing new
    node.agent.link = restarted
    node.agent.tick()
    assert node.backend.boxes == {} and [e.end_reason for e in node.evidence()] == [EndReason.control_lost]


def _same_key(files: LinkFiles) -> bool:
    key = serialization.load_pem_private_key(Path(files.path("tls.key")).read_bytes(), password=None)
    return files.certificate().public_key().public_numbers() == key.public_key().public_numbers()


def test_renews_a_certificate_past_half_its_life(ctl, tmp_path):
    files = ctl.enrol("rtr-rn", tmp_path)
    old = ctl.past_half_life(files, "rtr-rn")
    client, _ = client_for(tmp_path, "rtr-rn")
    with running(client):
        wait_until(lambda: client.connected, 10, "link up with the old certificate")
        wait_until(lambda: files.certificate().serial_number != old.serial_number, 10, "a renewed certificate")
    new = files.certificate()
    assert _same_key(files), "tls.key and tls.pem are a pair"
    assert new.public_key().public_numbers() != old.public_key().public_numbers(), "a fresh key"
    new.verify_directly_issued_by(ctl.agents.ca.cert)
    assert new.not_valid_after_utc - new.not_valid_before_utc == timedelta(seconds=ctl.settings.agent_cert_ttl_s, minutes=5)
    # the next connection presents the new pair, and the controller takes it
    again, _ = client_for(tmp_path, "rtr-rn")
    with running(again):
        wait_until(lambda: again.connected, 10, "link up with the renewed certificate")
        assert ctl.server.conns["rtr-rn"].serial == format(new.serial_number, "x")
        time.sleep(0.6)
        assert files.certificate().serial_number == new.serial_number, "not renewed again: it is fresh"


def test_a_short_lived_certificate_is_not_renewed_at_once(ctl, tmp_path, monkeypatch):
    """Half the life counts from when the agent received the certificate: its not-before is backdated for clock skew,
    so with the shortest TTL (120 s, backdated 5 min) counting from there would renew on every turn of the link."""
    monkeypatch.setattr(ctl.agents, "cert_ttl", timedelta(seconds=120))
    files = ctl.enrol("rtr-short", tmp_path)
    first = files.certificate()
    assert first.not_valid_before_utc + (first.not_valid_after_utc - first.not_valid_before_utc) / 2 < datetime.now(UTC)
    client, side = client_for(tmp_path, "rtr-short")
    with running(client):
        wait_until(lambda: client.connected, 10, "link up")
        wait_until(lambda: side.applied, 5, "the first push")
        time.sleep(1.0)  # four turns of the link's chores
    assert files.certificate().serial_number == first.serial_number


def test_renewal_is_retried_after_the_link_dropped_during_it(ctl, tmp_path, monkeypatch):
    files = ctl.enrol("rtr-rd", tmp_path)
    old = ctl.past_half_life(files, "rtr-rd")
    real, calls = ctl.agents.renew, []

    def flaky(*args, **kw):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("injected: the link dropped during the renewal")
        return real(*args, **kw)

    monkeypatch.setattr(ctl.agents, "renew", flaky)
    client, _ = client_for(tmp_path, "rtr-rd")
    with running(client):
        wait_until(lambda: client.connects >= 2 and client.connected, 10, "the link back after the drop")
        wait_until(lambda: files.certificate().serial_number != old.serial_number, 2, "a renewal on the new connection")
    assert _same_key(files)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_renewal_interrupted_at_any_file_step_leaves_a_pair_the_agent_connects_with(ctl, tmp_path, monkeypatch, step):
    """The disk fills at the n-th file operation of storing a renewed certificate: the agent still connects with a
    matching key and certificate (the reconnection reads them from disk, as a restarted agent would), and renews again."""
    node = f"rtr-df{step}"
    files = ctl.enrol(node, tmp_path)
    old = ctl.past_half_life(files, node)
    real_write, real_replace, ops, failed = LinkFiles.write, LinkFiles.replace, [], []

    def counted(name: str) -> None:
        if name == "last_contact":
            return
        ops.append(name)
        if len(ops) == step and not failed:
            failed.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")

    def write(self, name, data):
        counted(name)
        return real_write(self, name, data)

    def replace(self, src, dst):
        counted(f"{src}->{dst}")
        return real_replace(self, src, dst)

    monkeypatch.setattr(LinkFiles, "write", write)
    monkeypatch.setattr(LinkFiles, "replace", replace)
    client, _ = client_for(tmp_path, node)
    with running(client):
        wait_until(lambda: failed, 10, f"file operation {step} of the renewal")
        wait_until(lambda: client.connects >= 2 and client.connected, 4, "the link back after the failed write")
        wait_until(lambda: files.certificate().serial_number != old.serial_number, 3, "a renewal after the failed one")
    assert _same_key(files)


def _evidence(node: str, flows: int) -> LaneEvidence:
    now = datetime.now(UTC)
    return LaneEvidence(
        node_id=node, session_id=None, revision=None, lane="wktstzzzzzzzzzz", backend="userspace", engineer_public_key=None,
        node_public_key=None, engineer_address=None, device_address=None, service=None, allowed=[], listen_port=None,
        planned_end=None, opened_at=None, closed_at=now, end_reason=EndReason.removed, lateness_ms=None, totals=LaneTotals(),
        flows=[FlowRecord(proto="tcp", src="100.64.7.2", sport=40000 + i % 20000, dst="192.0.2.10", dport=2404, observed="ended")
               for i in range(flows)],
        transport=[], blocked=[], wireguard=None)


def test_an_oversized_evidence_record_does_not_stop_status_evidence_and_renewal(ctl, tmp_path, monkeypatch):
    files = ctl.enrol("rtr-big", tmp_path)
    old = ctl.past_half_life(files, "rtr-big")
    monkeypatch.setattr(wire, "MAX_FRAME", 64 << 10)  # both ends read the limit from here: a lower one is the same code path
    client, side = client_for(tmp_path, "rtr-big")
    big, small = _evidence("rtr-big", 600), _evidence("rtr-big", 1)
    assert len(big.model_dump_json()) > wire.MAX_FRAME > len(small.model_dump_json())
    (side.evidence_dir / "a-big.json").write_text(big.model_dump_json())
    (side.evidence_dir / "b-small.json").write_text(small.model_dump_json())
    with running(client):
        wait_until(lambda: client.connected, 10, "link up")
        wait_until(lambda: "b-small" in side.acked, 2, "the small record delivered")
        wait_until(lambda: files.certificate().serial_number != old.serial_number, 2, "a renewal")


def test_a_healthy_link_does_not_trip_the_smallest_strict_limit(ctl, tmp_path):
    ctl.enrol("rtr-hb", tmp_path / "a")
    client, _ = client_for(tmp_path / "a", "rtr-hb")
    node = Node(tmp_path / "node")
    node.cfg.strict_after_s = 5.0  # the smallest the agent accepts
    node.agent.link = client
    specs = [lane(0, node.clock)]
    node.apply(specs)
    ctl.server.heartbeat_s = 5.5  # between the agent's minimum and the controller's default of 10 s
    try:
        with running(client):
            wait_until(lambda: client.connected, 10, "link up")
            end = time.monotonic() + 6.5
            while time.monotonic() < end and node.backend.boxes:
                node.agent.tick()
                time.sleep(0.1)
            assert client.connected
            assert set(node.backend.boxes) == node.names(specs), "strict mode ended a lane while the link was up"
    finally:
        ctl.server.heartbeat_s = HEARTBEAT_S
