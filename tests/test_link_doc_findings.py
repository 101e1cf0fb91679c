"""Bugs found while writing docs/agent-link.md and docs/site-admin-runbook.md, all fixed since: their regression
tests. A renewal is due at half the life the agent received (not-before is backdated for skew); a link that
was up and dropped is retried at once, not after the longest pause; an agent newer than the controller is
told to upgrade the controller."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.agent_ca import AgentCA
from controller.agent_link import LinkServer
from nodeagent import link as link_mod
from nodeagent.enroll import LinkFiles, new_tls_key
from nodeagent.link import LinkClient
from nodeagent.wire import PROTOCOL_VERSION, Hello, Renew, decode_frame, frame_length

NODE = "rtr-north-1"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return AgentCA.load_or_create(tmp_path_factory.mktemp("ca") / "keys")


def enrolled_client(tmp_path, ca: AgentCA, ttl: timedelta) -> LinkClient:
    files = LinkFiles.of(tmp_path)
    key, csr = new_tls_key()
    files.write("ca.pem", ca.pem)
    files.write("tls.key", key)
    files.write("tls.pem", ca.issue_agent(csr, NODE, ttl).pem)
    files.write("controller.json", json.dumps({"host": "127.0.0.1", "port": 1, "node_id": NODE, "site": "north-1"}))
    return LinkClient(str(tmp_path), lambda request: {"ok": True}, str(tmp_path / "evidence"), lambda: 0.0, lambda: 0.0)


def test_a_fresh_certificate_with_the_shortest_allowed_lifetime_is_not_renewed_at_once(tmp_path, ca):
    client = enrolled_client(tmp_path, ca, timedelta(seconds=120))  # low end of WICKET_AGENT_CERT_TTL_S
    sent = []

    async def send(msg):
        sent.append(msg)

    client._send = send
    asyncio.run(client._renew_if_due())
    assert not [m for m in sent if isinstance(m, Renew)], "a certificate issued a moment ago was renewed"


def test_the_reconnect_pause_starts_again_after_a_connection_that_was_up(tmp_path, ca, monkeypatch):
    client = enrolled_client(tmp_path, ca, timedelta(hours=24))
    pauses = []
    monkeypatch.setattr(link_mod.random, "random", lambda: 0.5)  # no jitter

    async def session():
        client.connected, client.connects = True, client.connects + 1  # the link was up …
        return "the controller went silent"  # … and then dropped

    async def sleep(seconds):
        pauses.append(seconds)
        if len(pauses) == 8:
            client.stopping.set()

    client._session, client._sleep = session, sleep
    asyncio.run(client._forever())
    assert max(pauses) <= 1.0, pauses  # each drop after a working connection: the first, short pause


class _Writer:
    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def frames(self):
        out, buf = [], self.data
        while buf:
            n = frame_length(buf[:4])
            out.append(decode_frame(buf[4:4 + n]))
            buf = buf[4 + n:]
        return out


def test_an_agent_newer_than_the_controller_is_told_to_upgrade_the_controller(ca):
    _, csr = new_tls_key()
    der = x509.load_pem_x509_certificate(ca.issue_agent(csr, NODE, timedelta(hours=1)).pem.encode()).public_bytes(
        serialization.Encoding.DER)
    server = LinkServer.__new__(LinkServer)  # the version check comes before any database work
    writer = _Writer()
    hello = Hello(protocol_version=PROTOCOL_VERSION + 1, node_id=NODE, agent_version="9.9.9")
    assert asyncio.run(server._hello(hello, writer, "192.0.2.7:40000", der)) is None
    [goodbye] = writer.frames()
    assert goodbye.kind == "goodbye" and not goodbye.retry
    assert "upgrade the controller" in goodbye.reason and "upgrade the agent" not in goodbye.reason, goodbye.reason


def test_the_version_refusal_for_an_older_agent_says_to_upgrade_the_agent(ca):
    """The other half of the rule above, which holds today: an agent older than the controller serves is told so."""
    _, csr = new_tls_key()
    der = x509.load_pem_x509_certificate(ca.issue_agent(csr, NODE, timedelta(hours=1)).pem.encode()).public_bytes(
        serialization.Encoding.DER)
    server = LinkServer.__new__(LinkServer)
    writer = _Writer()
    hello = Hello(protocol_version=0, node_id=NODE, agent_version="0.0.1")
    assert asyncio.run(server._hello(hello, writer, "192.0.2.7:40000", der)) is None
    [goodbye] = writer.frames()
    assert "upgrade the agent" in goodbye.reason, goodbye.reason

