"""Grants in the agent, on fake kernel objects: they open, end on the agent's own clock with evidence, are
extended, removed, signed off, survive restarts, and orphans are swept. Breach reports are spooled."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from nodeagent.grants import GRANT_MARK
from nodeagent.wire import DesiredNodeState, DeviceReport, GrantSpec
from tests.fakes import FakeFlow
from tests.test_agent_fake import Node
from tests.test_baseline_rules import state


def grant(clock, sid="g-1", seconds=600.0, **kw) -> GrantSpec:
    return GrantSpec.model_validate({
        "session_id": sid, "device_id": "D-1", "device_address": "192.0.2.11",
        "flows": [{"protocol": "dlms", "transport": "tcp", "ports": [4059], "to": ["scada-a"]}],
        "end_time": datetime.fromtimestamp(clock.wall() + seconds, UTC).isoformat(), **kw})


class GrantNode(Node):
    def apply_grants(self, grants, generation=None):
        self.generation = generation if generation is not None else self.generation + 1
        desired = DesiredNodeState(node_id="n1", generation=self.generation, baseline=state(), grants=grants)
        return self.agent.apply(desired)

    def grant_keys(self):
        self.fw.expire()
        return set(self.fw.sets.get("grant_flow", {}))


@pytest.fixture
def node(tmp_path):
    return GrantNode(tmp_path)


def test_grant_opens_and_ends_on_the_agents_clock_with_evidence(node):
    report = node.apply_grants([grant(node.clock, seconds=30)])
    assert any(c.startswith("opened grant g-1") for c in report.changes), report
    assert node.grant_keys() == {'["192.0.2.11", "198.51.100.10", "tcp", 4059]'}
    mark = node.agent.devices.grants.records["g-1"].mark
    assert mark & 0xFF000000 == GRANT_MARK
    node.ct.flows.append(FakeFlow(id=9, mark=mark, src="192.0.2.11", dst="198.51.100.10", dport=4059))
    node.clock.advance(29.9)
    node.agent.tick()
    assert node.grant_keys(), "not before its end"
    node.clock.advance(0.2)
    node.agent.tick()
    assert node.grant_keys() == set()
    assert node.ct.dump(mark) == [], "its connections were flushed"
    (ev,) = node.evidence()
    assert ev.scope == "grant" and ev.end_reason.value == "expired" and ev.session_id == "g-1"
    assert ev.destinations == {"scada-a": ["198.51.100.10"]}
    assert [(f.dst, f.dport, f.bytes_out) for f in ev.flows] == [("198.51.100.10", 4059, 1000)]
    assert ev.totals.bytes_out == 1000 and ev.totals.bytes_in == 800
    assert 0 <= ev.lateness_ms <= 200
    assert node.agent.status().lanes == [], "gone from the status"
    node.agent.reconcile()
    assert node.grant_keys() == set(), "an ended grant is not reopened by the same desired state"


def test_status_lists_live_grants_for_the_controller(node):
    node.apply_grants([grant(node.clock)])
    (obs,) = node.agent.status().lanes
    assert obs.session_id == "g-1" and obs.device_address == "192.0.2.11" and obs.listen_port == 0
    assert obs.allowed == ["tcp/4059 to scada-a"]


def test_extension_moves_the_deadline_and_the_kernel_timeout(node):
    node.apply_grants([grant(node.clock, seconds=30)])
    node.clock.advance(20)
    report = node.apply_grants([grant(node.clock, seconds=40)])
    assert any(c.startswith("extended grant g-1") for c in report.changes)
    node.clock.advance(30)
    node.agent.tick()
    assert node.grant_keys(), "the old end passed; the new one has not"
    node.clock.advance(11)
    node.agent.tick()
    assert node.grant_keys() == set()


def test_removal_and_sign_off_end_it_early(node):
    node.apply_grants([grant(node.clock, "g-1"), grant(node.clock, "g-2")])
    node.agent.close("g-1")
    report = node.apply_grants([grant(node.clock, "g-2")])
    assert node.grant_keys() == {'["192.0.2.11", "198.51.100.10", "tcp", 4059]'}, "g-2's key remains (same key, its mark)"
    report = node.apply_grants([])
    assert any("closed grant g-2" in c and "removed" in c for c in report.changes)
    reasons = {e.session_id: e.end_reason.value for e in node.evidence()}
    assert reasons == {"g-1": "closed", "g-2": "removed"}
    assert node.apply_grants([grant(node.clock, "g-1")]).changes == [], "a signed-off grant stays closed"


def test_restart_keeps_the_grant_and_its_deadline_and_sweeps_orphans(node):
    node.apply_grants([grant(node.clock, seconds=30)])
    node.fw.commit(add=[node.fw.grant_elements([("192.0.2.12", "198.51.100.10", "tcp", 22)], GRANT_MARK | 99, 600)])
    node.clock.advance(10)
    agent = node.restart()
    assert node.grant_keys() == {'["192.0.2.11", "198.51.100.10", "tcp", 4059]'}, "the orphan was swept"
    assert agent.devices.grants.records["g-1"].deadline == pytest.approx(1000 + 30, abs=0.01)
    node.clock.advance(20.1)
    agent.tick()
    assert node.grant_keys() == set()


def test_a_grant_over_before_it_arrives_never_opens(node):
    report = node.apply_grants([grant(node.clock, seconds=-5)])
    assert node.grant_keys() == set() and not any("opened" in c for c in report.changes)


def test_breaches_are_spooled_as_one_report_with_device_names(node):
    node.apply_grants([])
    node.fw.device_rows = [("192.0.2.11", "198.51.100.10", "tcp", 22, 3), ("192.0.2.200", "198.51.100.10", "udp", 53, 1)]
    node.clock.advance(node.cfg.breach_report_s + 1)
    node.agent.tick()
    (report,) = node.agent.state.pending_reports().values()
    assert isinstance(report, DeviceReport)
    assert [(b.asset_id, b.source, b.port, b.packets) for b in report.breaches] == [
        ("D-1", "192.0.2.11", 22, 3), (None, "192.0.2.200", 53, 1)]
    assert report.devices == 3
    node.clock.advance(node.cfg.breach_report_s + 1)
    node.agent.tick()
    assert len(node.agent.state.pending_reports()) == 1, "nothing new: no empty report"


def test_a_refused_grant_transaction_names_the_grant_so_the_controller_does_not_count_it_open(node):
    node.fw.fail_if = lambda ops: any(isinstance(op, tuple) and op[1].get("name") == "grant_flow" for op in ops)
    report = node.apply_grants([grant(node.clock, "g-9")])
    assert any(e.startswith("grant g-9: ") for e in report.errors), report.errors
    node.fw.fail_if = None
    report = node.agent.reconcile()
    assert node.grant_keys(), "converges on the next pass"
