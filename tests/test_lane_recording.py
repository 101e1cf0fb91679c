"""The agent's per-lane recorders (`nodeagent.lane_recording`) on a real interface: a lane that asks for
payload is recorded, one that does not is not; a recording that cannot start says why in the evidence;
an agent restart resumes the same file with its counts; the file is named after its evidence."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

from nodeagent.lane_recording import Recorders
from nodeagent.wire import LaneSpec
from tests import test_recording
from tests.lab.nsutil import in_netns
from tests.test_recording import UNDER_B, ping

pair = test_recording.pair  # its namespaces, veth and wireguard-go tunnel
pytestmark = test_recording.pytestmark


def _spec(recording: str) -> LaneSpec:
    return LaneSpec(session_id="s-abcdefghijkm", engineer_public_key="A" * 43 + "=", engineer_address="100.64.0.2",
                    device_address="192.0.2.10", service="iec104", flows=[{"transport": "tcp", "port": 2404}],
                    listen_port=51820, end_time=datetime.now(UTC) + timedelta(minutes=5), recording=recording)


def _ensure(ns: str, recs: Recorders, spec: LaneSpec, **kw):
    return in_netns(ns, lambda: recs.ensure("va", spec, **kw))  # the packet socket is made in the namespace


def test_payload_lanes_are_recorded_resumed_and_filed_under_their_evidence(pair, tmp_path):
    recs = Recorders(tmp_path, 1 << 20)
    assert _ensure(pair.a, recs, _spec("metadata")) is None and not (tmp_path / "live").exists()
    assert recs.stop("va", _spec("metadata")) is None
    assert _ensure(pair.a, recs, _spec("payload")) is None
    assert ping(pair.a, UNDER_B, 5) == 5
    recs.stop_all()  # the agent stops; the lane lives on
    counts = json.loads((tmp_path / "live" / "va.counts.json").read_text())
    assert counts["packets"] >= 10  # five echoes, five replies
    recs = Recorders(tmp_path, 1 << 20)  # the agent starts again
    assert _ensure(pair.a, recs, _spec("payload"), resume=True) is None
    assert ping(pair.a, UNDER_B, 3) == 3
    info = recs.stop("va", _spec("payload"))
    assert info.error is None and info.packets >= counts["packets"] + 6
    assert info.started_at == datetime.fromisoformat(counts["started_at"]), "the recording began before the restart"
    recs.file_as("va", "s-abcdefghijkm-1-wk0")
    data = (tmp_path / "s-abcdefghijkm-1-wk0.pcap").read_bytes()
    assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.size
    assert not list((tmp_path / "live").iterdir())


def test_a_recording_that_cannot_start_is_in_the_evidence(tmp_path):
    recs = Recorders(tmp_path, 1 << 20)
    note = recs.ensure("wknosuchif0", _spec("payload"))
    assert note and "could not start" in note
    info = recs.stop("wknosuchif0", _spec("payload"))
    assert info.sha256 is None and "could not start" in info.error
