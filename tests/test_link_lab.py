"""The controller ↔ agent link in the lab: the controller as its own process in the `ctl` namespace, the real
agent on the router enrolled with a join token and dialling out to it, real WireGuard lanes to a device.

The link is cut by dropping its packets in the controller's namespace (TCP hangs, as on a dead uplink),
and the controller or the agent is killed with SIGKILL at random points.
"""

from __future__ import annotations

import random
import shutil
import time

import pytest

from tests.lab.controller import LabController, conf_value, ts
from tests.lab.site import NODE_ID, AgentProcess, Engineer, serve, wait_for

pytestmark = pytest.mark.lab
GRACE_S = 2.0


@pytest.fixture
def product(product_lab, tmp_path):
    lab = product_lab
    ctl = LabController(lab, tmp_path / "ctl", engineers=4, default_s=40).setup()
    agent = AgentProcess(lab)
    engineer = Engineer(lab, "eng1")
    server = None
    try:
        ctl.start()
        out = ctl.enrol(agent)
        assert "enrolled as site-1" in out.stdout, out.stdout + out.stderr
        agent.start()
        assert wait_for(lambda: (agent.status().get("link") or "").startswith("connected"), timeout=10), agent.status()
        server = serve(lab, "rtu1", tcp=(2404, 502))
        yield lab, ctl, agent, engineer
    finally:
        engineer.forget()
        agent.stop()
        ctl.close()
        if server is not None:
            server.kill()
            server.wait()
        agent.remove_state()
        shutil.rmtree(tmp_path / "ctl", ignore_errors=True)


def test_an_enrolled_agent_takes_its_lanes_over_the_link(product):
    lab, ctl, agent, engineer = product
    [row] = ctl.agents()
    assert row["connected"] and row["enrolled_at"] and row["protocol_version"] == 2, row
    active = ctl.open_session()
    sid = active["id"]
    assert active["state"] == "active" and active["node"] == NODE_ID, active
    conf = ctl.call("GET", f"/sessions/{sid}/config", "erin").text
    engineer.up(conf)
    assert engineer.probe(lab.addr("rtu1"), 2404) == "open"
    assert engineer.probe(lab.addr("rtu1"), 502) != "open"
    lane = agent.lane(sid)
    assert lane["node_public_key"] == conf_value(conf, "PublicKey")
    # a local apply is refused: an enrolled agent takes desired state only from its controller
    answer = agent.call({"op": "apply", "desired": {"node_id": NODE_ID, "generation": 10**6, "lanes": []}})
    assert not answer["ok"] and "only over the link" in answer["error"], answer
    assert agent.lane(sid) is not None
    ctl.call("POST", f"/sessions/{sid}/revoke", "alex", json={"reason": "done with it"})
    assert wait_for(lambda: agent.lane(sid) is None, timeout=GRACE_S)
    assert wait_for(lambda: any(e["session_id"] == sid for e in ctl.evidence()), timeout=10), "the evidence never arrived"
    [ev] = [e for e in ctl.evidence() if e["session_id"] == sid]
    assert ev["end_reason"] == "removed" and ev["device_id"] == "RTU-17"
    assert wait_for(lambda: agent.status()["pending_evidence"] == 0, timeout=5), "the agent kept evidence the controller stored"
