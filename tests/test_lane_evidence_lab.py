"""Lane evidence in the lab, found while writing the demo (fixed since): a connection that ended on its own is
recorded as ended, not as cut by the teardown that flushed its lingering TIME_WAIT entry."""

from __future__ import annotations

import pytest

from tests.lab.site import AgentProcess, Engineer, lane_for, serve, wait_for

pytestmark = pytest.mark.lab


def test_a_connection_closed_during_the_lane_is_recorded_as_ended(lab):
    agent = AgentProcess(lab).start()
    eng = Engineer(lab, "eng1")
    server = serve(lab, "rtu1", tcp=(2404,))
    try:
        spec = lane_for(eng, lab.addr("rtu1"), "s-ended", 120, device_id="RTU-17")
        agent.apply([spec])
        eng.up(eng.config_for(spec, agent.lane("s-ended")["node_public_key"]))
        assert eng.probe(lab.addr("rtu1"), 2404) == "open"  # connects, then closes: FIN both ways
        closed = wait_for(lambda: "TIME_WAIT" in lab.exec("rtr", ["conntrack", "-L", "-p", "tcp", "--dport", "2404"],
                                                          check=False).stdout, timeout=5)
        assert closed, "the connection did not close"
        agent.close("s-ended")
        ev = agent.evidence_for("s-ended")
        [flow] = [f for f in ev["flows"] if f["dport"] == 2404]
        assert flow["observed"] == "ended" and flow["stop"] is None, flow  # ended before the teardown; when, conntrack no longer says
    finally:
        eng.forget()
        agent.stop()
        server.kill()
        server.wait()
        agent.remove_state()
