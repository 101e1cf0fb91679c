"""Evidence in the lab, end to end: a real lane carrying an iperf3 transfer, payload recording on, then the
session's evidence record in the audit chain. The bytes it reports match the device's own count of what
reached it (within 1 %) and iperf3's, the node's signature inside checks, and the pcap the agent uploaded has the SHA-256 the agent
signed and opens in tcpdump."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from tests.lab.controller import RECORDED_TASK, LabController
from tests.lab.site import AgentProcess, Engineer, device_meter, device_meter_bytes, wait_for

pytestmark = pytest.mark.lab
TCP_HEADERS = 20 + 32  # IPv4 + TCP with the timestamp option: what each counted packet adds to its payload


@pytest.fixture
def recorded(product_lab, tmp_path):
    lab = product_lab
    ctl = LabController(lab, tmp_path / "ctl", engineers=1, default_s=120).setup()
    agent = AgentProcess(lab)
    engineer = Engineer(lab, "eng1")
    server = None
    try:
        ctl.start()
        out = ctl.enrol(agent)
        assert "enrolled as" in out.stdout, out.stdout + out.stderr
        agent.start()
        assert wait_for(lambda: (agent.status().get("link") or "").startswith("connected"), timeout=10), agent.status()
        server = lab.spawn("rtu1", ["iperf3", "-s", "-p", "2404"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield lab, ctl, agent, engineer
    except Exception:
        print(ctl.log()[-4000:])
        raise
    finally:
        engineer.forget()
        agent.stop()
        ctl.close()
        if server is not None:
            server.kill()
            server.wait()
        agent.remove_state()
        shutil.rmtree(tmp_path / "ctl", ignore_errors=True)


def _chain_records(ctl: LabController, sid: str, type_: str) -> list:
    from controller.models import Event

    with ctl.app.state.auth.factory() as s:
        return list(s.scalars(select(Event).where(Event.session_ref == sid, Event.type == type_).order_by(Event.seq)))


def test_evidence_bytes_match_the_generator_and_the_recording_matches_its_signed_hash(recorded):
    lab, ctl, agent, engineer = recorded
    active = ctl.open_session(task=RECORDED_TASK)
    sid = active["id"]
    assert active["state"] == "active" and active["recording"] == "payload", active
    engineer.up(ctl.call("GET", f"/sessions/{sid}/config", "erin").text)
    device_meter(lab, "rtu1", "tcp", 2404)
    runs: list[tuple[int, int] | None] = []  # until the tunnel is up and iperf3 answers; the lane counts these too

    def probe() -> bool:
        runs.append(_iperf(lab, "64K"))
        return runs[-1] is not None

    assert wait_for(probe, timeout=15, interval=0.5), "iperf3 never answered through the lane"
    runs.append(_iperf(lab, "6M"))
    assert runs[-1] is not None, "iperf3 through the lane failed"
    written = sum(r[0] for r in runs if r)
    received = sum(r[1] for r in runs if r)
    ctl.call("POST", f"/sessions/{sid}/close", "erin", json={"reason": "done"})
    assert wait_for(lambda: _chain_records(ctl, sid, "session.evidence"), timeout=20), "no session.evidence record"
    (record,) = _chain_records(ctl, sid, "session.evidence")
    body = record.body
    assert record.result == "success" and body["node_evidence"] == "delivered" and body["device"] == "RTU-17"
    (lane,) = body["lanes"]
    ev = lane["evidence"]

    # Bytes. The lane counts IP bytes engineer → device at the router; the device counts, with its own nft
    # counter, the IP bytes that reach it on 2404. They must agree within 1 %.
    at_device = device_meter_bytes(lab, "rtu1")
    counted = body["totals"]["bytes_out"]
    assert abs(counted - at_device) <= 0.01 * at_device, (counted, at_device, body["totals"])
    # And against iperf3's own counts: its payload lies between what its server read and what its client wrote
    # (at the end of a -n run, data still in a socket buffer is written but never sent). Every run is in the
    # lane's totals; iperf3's control messages add a few hundred bytes.
    payload = counted - TCP_HEADERS * body["totals"]["packets_out"]
    assert 0.99 * received <= payload <= 1.01 * written, (payload, received, written, body["totals"])
    flows = ev["flows"]
    assert sum(f["bytes_out"] for f in flows) == body["totals"]["bytes_out"], "per-connection bytes add up to the totals"

    # The node's signature, checked from the record alone.
    signed = (lane["signature_context"] + "\n" + lane["ident"] + "\n").encode() + \
        json.dumps(ev, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    Ed25519PublicKey.from_public_bytes(base64.b64decode(lane["signed_with"])).verify(base64.b64decode(lane["signature"]), signed)

    # The recording: uploaded after the evidence, its hash the signed one, readable by tcpdump.
    rec = ev["recording"]
    assert rec["sha256"] and rec["packets"] > 0 and not rec["error"], rec
    assert wait_for(lambda: ctl.app.state.recordings.find(sid), timeout=30), "the recording never arrived"
    (stored,) = ctl.app.state.recordings.find(sid)
    pcap = ctl.app.state.recordings.file(stored)
    data = pcap.read_bytes()
    assert hashlib.sha256(data).hexdigest() == rec["sha256"] == stored.sha256 and len(data) == rec["size"]
    shown = subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == rec["packets"] and any(f"{lab.addr('rtu1')}.2404" in line for line in lines), lines[:5]
    assert _chain_records(ctl, sid, "session.recording")[0].body["sha256"] == rec["sha256"]
    assert wait_for(lambda: not list(Path(agent.state_dir, "recordings").glob("*.pcap")), timeout=10), \
        "the agent kept a recording the controller stored"


def _iperf(lab, amount: str) -> tuple[int, int] | None:
    """Send `amount` engineer → RTU with iperf3 over the lane: (bytes written, bytes received), None if it failed."""
    res = lab.exec("eng1", ["iperf3", "-c", lab.addr("rtu1"), "-p", "2404", "-n", amount, "-J"], check=False, timeout=60)
    if res.returncode != 0:
        return None
    end = json.loads(res.stdout)["end"]
    return end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
