"""`wicket-agent doctor`: the clock against the clock_sync policy, and the link checks — enrolment, the pinned
CA, the client certificate's time left, the controller's address (a real TLS handshake on loopback) and the
running daemon's link (a control socket answered by a stand-in daemon)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization

from controller.agent_ca import AgentCA
from nodeagent import cli, doctor
from nodeagent import config as config_mod
from nodeagent.config import load
from nodeagent.control import ControlServer
from nodeagent.enroll import LinkFiles, new_tls_key
from nodeagent.wire import AgentStatus

NODE = "rtr-north-1"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(hours=24)


@pytest.fixture(autouse=True)
def no_default_file(tmp_path, monkeypatch):
    """Never read the machine's /etc/wicket/agent.toml."""
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(tmp_path / "absent" / "agent.toml"))


@pytest.fixture
def cfg(tmp_path):
    return load(None, {"state_dir": str(tmp_path / "state"), "node_id": NODE})


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return AgentCA.load_or_create(tmp_path_factory.mktemp("ca") / "keys")


def enrol(cfg, ca: AgentCA, *, host="127.0.0.1", port=7443, issued=NOW - timedelta(hours=1), ttl=TTL, pin=None) -> LinkFiles:
    """The files `wicket-agent enroll` leaves, with a certificate the controller's CA issued at `issued`."""
    files = LinkFiles.of(cfg.state_dir)
    key, csr = new_tls_key()
    cert = ca.issue_agent(csr, NODE, ttl, issued)
    files.write("ca.pem", ca.pem)
    files.write("tls.key", key)
    files.write("tls.pem", cert.pem)
    files.write("evidence.key", b"not read by the doctor")
    files.write("controller.json", json.dumps({"host": host, "port": port, "node_id": NODE, "site": "north-1",
                                               "enrolled_at": issued.isoformat(), "ca_pin": pin or ca.pin()}))
    return files


def by_name(checks) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


NO_DAEMON = doctor.Daemon(None, "not running")


def linked(link: str | None, **kw) -> doctor.Daemon:
    st = AgentStatus(node_id=NODE, agent_version="0.1.0", backend="userspace", applied_generation=7, lanes=[],
                     pending_evidence=kw.pop("pending", 0), clock_synchronized=True, link=link, **kw)
    return doctor.Daemon(st.model_dump(mode="json"))


# ---- the clock ----


@pytest.mark.parametrize(("policy", "synced", "status"), [
    ("require", True, "ok"), ("warn", True, "ok"), ("require", False, "fail"), ("warn", False, "warn"),
])
def test_the_clock_check_follows_the_clock_sync_policy(tmp_path, monkeypatch, policy, synced, status):
    monkeypatch.setattr(doctor, "clock_synchronized",
                        lambda: (synced, "synchronised (maxerror 3000 µs)" if synced else "kernel reports the clock unsynchronised"))
    c = load(None, {"state_dir": str(tmp_path), "clock_sync": policy})
    got, detail = doctor._clock(c)
    assert got == status, detail
    if status == "fail":
        assert "new lanes are refused" in detail and "chrony" in detail and 'clock_sync = "warn"' in detail
    if status == "warn":
        assert "open anyway" in detail


# ---- enrolment, CA, certificate ----


def test_an_unenrolled_agent_gets_one_warning_that_says_how_to_enrol(cfg):
    [c] = doctor.link_checks(cfg, NO_DAEMON, now=NOW)
    assert (c.name, c.status) == ("enrolment", "warn")
    assert "wicket-agent enroll --controller" in c.detail


def test_an_incomplete_enrolment_fails_and_names_what_is_missing(cfg, ca):
    files = enrol(cfg, ca)
    (files.root / "tls.key").unlink()
    [c] = doctor.link_checks(cfg, NO_DAEMON, now=NOW)
    assert (c.name, c.status) == ("enrolment", "fail")
    assert "tls.key missing" in c.detail and "--force" in c.detail


def test_link_files_readable_by_others_fail(cfg, ca):
    files = enrol(cfg, ca)
    (files.root / "evidence.key").chmod(0o644)
    [c] = doctor.link_checks(cfg, NO_DAEMON, now=NOW)
    assert c.status == "fail" and "evidence.key" in c.detail


def test_an_enrolled_agent_names_its_node_site_and_controller(cfg, ca):
    enrol(cfg, ca, port=1)  # nothing listens on port 1
    checks = by_name(doctor.link_checks(cfg, NO_DAEMON, now=NOW, timeout=1))
    assert list(checks) == ["enrolment", "pinned CA", "certificate", "controller", "controller link"]
    assert checks["enrolment"].status == "ok"
    assert f"node {NODE} at site north-1, controller 127.0.0.1:1" in checks["enrolment"].detail
    assert checks["pinned CA"].status == "ok"


def test_a_ca_that_is_not_the_pinned_one_fails(cfg, ca):
    enrol(cfg, ca, pin="0" * 64)
    c = by_name(doctor.link_checks(cfg, NO_DAEMON, now=NOW, timeout=1))["pinned CA"]
    assert c.status == "fail" and "not the CA pinned" in c.detail


@pytest.mark.parametrize(("at", "status", "words"), [
    (NOW - timedelta(hours=1), "ok", "left of"),  # fresh
    (NOW - timedelta(hours=17), "ok", "left of"),  # past half its life: renewal is due, nothing to warn about yet
    (NOW - timedelta(hours=19), "warn", "Is the link up?"),  # under a quarter of its life left
    (NOW - timedelta(hours=25), "fail", "expired at"),
    (NOW + timedelta(hours=1), "fail", "clock right"),  # issued in this router's future
])
def test_the_certificate_check_weighs_the_time_left(cfg, ca, at, status, words):
    enrol(cfg, ca, issued=at)
    c = by_name(doctor.link_checks(cfg, NO_DAEMON, now=NOW, timeout=1))["certificate"]
    assert c.status == status, c.detail
    assert words in c.detail
    if status == "fail" and "expired" in words:
        assert "wicket agents revoke" in c.detail and "enroll --force" in c.detail


def test_a_key_that_does_not_match_the_certificate_fails(cfg, ca):
    files = enrol(cfg, ca)
    files.write("tls.key", new_tls_key()[0])  # e.g. a renewal cut off between writing the key and the certificate
    c = by_name(doctor.link_checks(cfg, NO_DAEMON, now=NOW, timeout=1))["certificate"]
    assert c.status == "fail" and "does not belong" in c.detail


def test_a_certificate_from_another_ca_fails(cfg, ca, tmp_path):
    files = enrol(cfg, ca)
    other = AgentCA.load_or_create(tmp_path / "other-keys")
    files.write("tls.pem", other.issue_agent(_csr_for(files), NODE, TTL, NOW - timedelta(hours=1)).pem)
    c = by_name(doctor.link_checks(cfg, NO_DAEMON, now=NOW, timeout=1))["certificate"]
    assert c.status == "fail" and "not issued by the pinned" in c.detail


def _csr_for(files: LinkFiles) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = serialization.load_pem_private_key((files.root / "tls.key").read_bytes(), password=None)
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


# ---- the controller's address: a TLS handshake on loopback ----


class TlsListener:
    """Accepts TLS connections on loopback with `ctx` and completes each handshake, like the link port."""

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)  # accept() wakes to see `stopping`: closing a socket does not wake it
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(None)
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as s:
                    s.settimeout(2)
                    try:
                        s.recv(1)
                    except (OSError, ssl.SSLError):
                        pass
            except (OSError, ssl.SSLError):
                raw.close()

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def listener():
    made = []

    def make(ctx):
        made.append(TlsListener(ctx))
        return made[-1]

    yield make
    for x in made:
        x.close()


def test_a_reachable_controller_with_a_controller_certificate_passes(cfg, ca, tmp_path, listener):
    srv = listener(ca.server_context(["127.0.0.1"], tmp_path / "work"))
    enrol(cfg, ca, port=srv.port)
    c = by_name(doctor.link_checks(cfg, NO_DAEMON, now=NOW, timeout=5))["controller"]
    assert c.status == "ok", c.detail
    assert f"127.0.0.1:{srv.port} answers with a controller certificate" in c.detail


def test_another_controller_on_the_address_fails(cfg, ca, tmp_path, listener):
    other = AgentCA.load_or_create(tmp_path / "other-keys")
    srv = listener(other.server_context(["127.0.0.1"], tmp_path / "work"))
    enrol(cfg, ca, port=srv.port)
    c = by_name(doctor.link_checks(cfg, NO_DAEMON, now=NOW, timeout=5))["controller"]
    assert c.status == "fail" and "does not verify against the pinned CA" in c.detail


def test_an_unreachable_controller_fails_and_names_the_port_to_open(cfg, ca):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        enrol(cfg, ca, port=port)
        c = by_name(doctor.link_checks(cfg, NO_DAEMON, now=NOW, timeout=5))["controller"]
    assert c.status == "fail"
    assert f"cannot reach 127.0.0.1:{port}" in c.detail and f"outbound TCP {port}" in c.detail


# ---- the daemon's link ----


@pytest.mark.parametrize(("daemon", "status", "words"), [
    (linked("connected to 127.0.0.1:7443", pending=2, strict_after_s=600.0), "ok", "2 evidence record(s) waiting; strict mode"),
    (linked("starting: controller 127.0.0.1:7443 last heard 0 s ago"), "warn", "starting"),
    (linked("disconnected (refused: agent rtr-north-1 was revoked at 2026-12-01T11:00:00Z): controller 127.0.0.1:7443 "
            "last heard 40 s ago"), "fail", "was revoked"),
    (linked(None), "fail", "systemctl restart wicket-agent"),
    (NO_DAEMON, "warn", "systemctl start wicket-agent"),
])
def test_the_link_check_reports_what_the_daemon_says(cfg, ca, daemon, status, words):
    enrol(cfg, ca, port=1)
    c = by_name(doctor.link_checks(cfg, daemon, now=NOW, timeout=1))["controller link"]
    assert c.status == status, c.detail
    assert words in c.detail


def test_doctor_asks_the_running_daemon_over_its_control_socket(cfg, ca, monkeypatch, capsys):
    """The whole command with --json, the host checks left out: the daemon's status reaches the agent and
    link checks through the real control socket."""
    enrol(cfg, ca, port=1, issued=datetime.now(UTC) - timedelta(hours=1))
    import queue

    requests: queue.Queue = queue.Queue()
    server = ControlServer(cfg.control_socket, requests)
    server.start()
    answer = linked("connected to 127.0.0.1:1").status

    def daemon():
        while True:
            req, reply = requests.get()
            if req is None:
                return
            reply({"ok": True, "status": answer} if req.get("op") == "status" else {"ok": False, "error": "no"})

    t = threading.Thread(target=daemon, daemon=True)
    t.start()
    monkeypatch.setattr(doctor, "_host_checks", lambda c: [])
    monkeypatch.setattr(doctor, "clock_synchronized", lambda: (True, "synchronised"))
    monkeypatch.setattr(doctor, "CONNECT_TIMEOUT_S", 1.0)
    try:
        code = cli.main(["doctor", "--json", "--state-dir", cfg.state_dir])
    finally:
        requests.put((None, None))
        server.close()
        t.join(5)
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert set(checks) == {"clock", "state directory", "agent", "enrolment", "pinned CA", "certificate", "controller",
                           "controller link"}
    assert checks["agent"]["status"] == "ok" and "generation 7" in checks["agent"]["detail"]
    assert checks["controller link"] == {"name": "controller link", "status": "ok",
                                         "detail": "connected to 127.0.0.1:1; 0 evidence record(s) waiting"}
    assert checks["certificate"]["status"] == "ok", checks["certificate"]
    assert checks["controller"]["status"] == "fail"  # nothing listens on port 1
    assert code == 1
