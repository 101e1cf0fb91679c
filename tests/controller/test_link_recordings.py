"""Payload recordings over the link: kept only when the file's SHA-256 is the one the agent signed in its
evidence, after that evidence; chunks in order; a receipt either way; an audit record of what was kept."""

from __future__ import annotations

import base64
import hashlib

import pytest
from sqlalchemy import select

from controller.models import Event, SessionRecording
from nodeagent.wire import EvidenceReceipt, RecordingChunk, RecordingInfo, RecordingReceipt, Welcome

from .linkpeer import LinkHarness, lane_evidence, signed

NODE = "rtr-1"
SITE = "north-1"
SID = "s-abcdefghijkm"
PCAP = bytes.fromhex("4d3cb2a1020004000000000000000000ffff000065000000") + b"\x01" * 3000  # header + filler


@pytest.fixture
def lctl(tmp_path):
    h = LinkHarness(tmp_path / "h", f"sqlite:///{tmp_path}/controller.db", {})
    h.add_site(SITE, tunnel_pool="100.64.9.0/24")
    yield h
    h.close()


def _peer_with_evidence(lctl, ident: str, data: bytes):
    lctl.enrolled(SITE, NODE)
    peer = lctl.peer(NODE)
    assert isinstance(peer.hello(NODE), Welcome)
    ev = lane_evidence(NODE, SID, recording=RecordingInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data), packets=1))
    peer.send(signed(lctl.state_dir(NODE), ident, ev))
    assert peer.until(EvidenceReceipt).ident == ident
    return peer


def _chunks(ident: str, data: bytes, size: int = 1000, sha: str | None = None):
    parts = [data[i:i + size] for i in range(0, len(data), size)]
    for n, part in enumerate(parts):
        last = n == len(parts) - 1
        yield RecordingChunk(ident=ident, offset=n * size, data=base64.b64encode(part).decode(), last=last,
                             sha256=(sha or hashlib.sha256(data).hexdigest()) if last else None)


def _audit(lctl, type_: str) -> list[Event]:
    with lctl.app.state.auth.factory() as s:
        return list(s.scalars(select(Event).where(Event.type == type_).order_by(Event.seq)))


def test_a_recording_whose_hash_matches_the_signed_evidence_is_kept(lctl):
    peer = _peer_with_evidence(lctl, "ev-1", PCAP)
    for chunk in _chunks("ev-1", PCAP):
        peer.send(chunk)
    receipt = peer.until(RecordingReceipt)
    assert receipt.stored and receipt.error is None
    (row,) = lctl.app.state.recordings.find(SID)
    path = lctl.app.state.recordings.file(row)
    assert path.read_bytes() == PCAP and row.sha256 == hashlib.sha256(PCAP).hexdigest() and row.size == len(PCAP)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    (ev,) = _audit(lctl, "session.recording")
    assert ev.result == "success" and ev.body["sha256"] == row.sha256 and ev.session_ref == SID
    # sent again (the receipt was lost): stored once, receipted again
    for chunk in _chunks("ev-1", PCAP):
        peer.send(chunk)
        if chunk.offset == 0:
            break
    assert peer.until(RecordingReceipt).stored
    with lctl.app.state.auth.factory() as s:
        assert len(s.scalars(select(SessionRecording)).all()) == 1


def test_a_recording_that_is_not_the_signed_one_is_refused(lctl):
    peer = _peer_with_evidence(lctl, "ev-2", PCAP)
    tampered = PCAP[:-1] + b"\x02"
    for chunk in _chunks("ev-2", tampered):
        peer.send(chunk)
    receipt = peer.until(RecordingReceipt)
    assert not receipt.stored and "SHA-256" in receipt.error
    assert lctl.app.state.recordings.find(SID) == []
    (ev,) = _audit(lctl, "session.recording")
    assert ev.result == "failure" and ev.reason == "hash_mismatch"
    assert not list((lctl.app.state.recordings.partial).glob("*")), "the refused file is not kept"


def test_chunks_out_of_order_or_before_the_evidence_are_refused(lctl):
    peer = _peer_with_evidence(lctl, "ev-3", PCAP)
    chunks = list(_chunks("ev-3", PCAP))
    peer.send(chunks[0])
    peer.send(chunks[2])  # skipped one
    receipt = peer.until(RecordingReceipt)
    assert not receipt.stored and "offset" in receipt.error
    for chunk in _chunks("ev-unknown", PCAP):
        peer.send(chunk)
    receipt = peer.until(RecordingReceipt)
    assert not receipt.stored and "evidence goes first" in receipt.error
    assert lctl.app.state.recordings.find(SID) == []
