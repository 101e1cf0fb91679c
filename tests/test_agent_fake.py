"""The agent's reconcile loop against fake kernel objects: fast, no root, random orders of states."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from nodeagent.agent import Agent
from nodeagent.config import AgentConfig
from nodeagent.errors import InvalidDesiredState
from nodeagent.keys import generate_private, public_of
from nodeagent.naming import Naming
from nodeagent.wire import DesiredNodeState, EndReason, LaneSpec
from tests.fakes import FakeBackend, FakeClock, FakeConntrack, FakeFirewall, FakeFlow

KEYS = [public_of(generate_private()) for _ in range(16)]


def lane(i: int, clock: FakeClock, seconds: float = 600, **kw) -> LaneSpec:
    end = datetime.fromtimestamp(clock.wall() + seconds, UTC)
    base = dict(
        session_id=f"s-{i}",
        engineer_public_key=KEYS[i],
        engineer_address=f"100.64.0.{i + 2}",
        device_address=f"192.0.2.{10 + i % 4}",
        service="iec104",
        flows=[{"transport": "tcp", "port": 2404}],
        listen_port=51820 + i,
        end_time=end,
    )
    base.update(kw)
    return LaneSpec(**base)


class Node:
    """One agent on fake kernel objects; `restart()` keeps the kernel and the state directory."""

    def __init__(self, tmp_path, tag="tst"):
        self.clock = FakeClock()
        self.naming = Naming(tag)
        self.backend = FakeBackend(self.naming)
        self.fw = FakeFirewall(self.naming, self.clock)
        self.ct = FakeConntrack()
        self.cfg = AgentConfig(node_id="n1", tag=tag, state_dir=str(tmp_path / "state")).validate()
        self.generation = 0
        # what the agent's clock check answers: the host's own kernel clock must not decide these tests
        self.clock_state: tuple[bool, str] = (True, "fake clock: synchronised")
        self.agent = self._new_agent()

    def _new_agent(self) -> Agent:
        agent = Agent(self.cfg, clock=self.clock, backend=self.backend, firewall=self.fw, conntrack=self.ct, listen_events=False,
                      names=None)  # never the machine's resolver from a unit test
        agent.clock_check = lambda: self.clock_state
        agent.start()
        return agent

    def restart(self) -> Agent:
        self.agent = self._new_agent()
        return self.agent

    def apply(self, lanes: list[LaneSpec], generation: int | None = None):
        self.generation = generation if generation is not None else self.generation + 1
        desired = DesiredNodeState(node_id="n1", generation=self.generation, settings={"tunnel_networks": ["100.64.0.0/16"]}, lanes=lanes)
        return self.agent.apply(desired)

    def names(self, lanes) -> set[str]:
        return {self.naming.lane_name(s.session_id) for s in lanes}

    def evidence(self):
        return list(self.agent.state.pending_evidence().values())


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path)


def test_open_is_idempotent(node):
    lanes = [lane(0, node.clock), lane(1, node.clock)]
    report = node.apply(lanes)
    assert len([c for c in report.changes if c.startswith("opened")]) == 2
    assert set(node.backend.boxes) == node.names(lanes)
    assert node.fw.lanes_with_policy() == node.names(lanes)
    before = (node.backend.render(), node.fw.render(), node.fw.transactions)
    again = node.agent.reconcile()
    assert again.changes == [] and again.errors == []
    assert (node.backend.render(), node.fw.render(), node.fw.transactions) == before


def test_one_transaction_for_many_lanes(node):
    node.apply([lane(i, node.clock) for i in range(8)])
    assert node.fw.transactions == 1


def test_expiry_removes_everything_and_writes_evidence(node):
    spec = lane(0, node.clock, seconds=30)
    node.apply([spec])
    name = node.naming.lane_name("s-0")
    mark = next(iter(node.fw.view().marks.values()))
    node.ct.flows.append(FakeFlow(id=7, mark=mark))
    node.fw.counters_by_lane[name] = {"lane_tx": (10, 1000), "lane_rx": (8, 800), "lane_refused": (2, 120)}
    node.fw.blocked_rows[name] = [("192.0.2.11", "tcp", 22, 2)]
    node.clock.advance(29.9)
    node.agent.tick()
    assert name in node.backend.boxes
    node.clock.advance(0.2)
    node.agent.tick()
    assert name not in node.backend.boxes
    assert node.fw.render() == ""
    assert node.ct.dump(mark) == []
    [ev] = node.evidence()
    assert ev.end_reason == EndReason.expired
    assert ev.totals.bytes_out == 1000 and ev.totals.packets_refused == 2
    assert [(f.dst, f.dport, f.observed) for f in ev.flows] == [("192.0.2.10", 2404, "cut")]
    assert ev.blocked[0].port == 22 and ev.blocked[0].packets == 2
    assert 0 <= ev.lateness_ms <= 200


def test_wall_clock_step_does_not_move_the_end(node):
    node.apply([lane(0, node.clock, seconds=60)])
    node.clock.step_wall(-600)  # someone sets the date back ten minutes
    node.agent.reconcile()
    node.clock.advance(60.05)
    node.agent.tick()
    assert node.backend.boxes == {}
    node2 = Node.__new__(Node)  # same for a forward step
    node2.__init__(node.cfg and __import__("pathlib").Path(node.cfg.state_dir).parent / "other")
    node2.apply([lane(0, node2.clock, seconds=60)])
    node2.clock.step_wall(+600)
    node2.agent.reconcile()
    assert len(node2.backend.boxes) == 1, "a forward wall-clock step must not end the lane early"


def test_extension_moves_deadline_and_kernel_timeout(node):
    spec = lane(0, node.clock, seconds=30)
    node.apply([spec])
    longer = spec.model_copy(update={"end_time": spec.end_time + timedelta(seconds=60), "revision": 1})
    report = node.apply([longer])
    assert any(c.startswith("extended") for c in report.changes)
    node.clock.advance(40)
    node.agent.tick()
    node.fw.expire()
    assert len(node.backend.boxes) == 1 and node.fw.lanes_with_policy(), "kernel timeout must follow the extension"
    node.clock.advance(51)
    node.agent.tick()
    assert node.backend.boxes == {}


def test_failure_of_one_lane_does_not_stop_others(node):
    node.backend.fail_create.add(node.naming.lane_name("s-1"))
    report = node.apply([lane(i, node.clock) for i in range(3)])
    assert len(report.errors) == 1 and "s-1" in report.errors[0]
    assert set(node.backend.boxes) == node.names([lane(0, node.clock), lane(2, node.clock)])
    node.backend.fail_create.clear()
    retry = node.agent.reconcile()
    assert retry.errors == [] and len(node.backend.boxes) == 3


def test_refused_transaction_is_retried_lane_by_lane(node):
    bad = node.naming.lane_name("s-2")
    node.fw.fail_if = lambda ops: any(bad in str(e) for _op, e in ops)
    report = node.apply([lane(i, node.clock) for i in range(4)])
    assert len(report.errors) == 1 and "s-2" in report.errors[0]
    assert bad not in node.backend.boxes, "a lane whose rules were refused must not keep its box"
    assert node.fw.lanes_with_policy() == set(node.backend.boxes) and len(node.backend.boxes) == 3


def test_older_or_conflicting_generation_is_refused(node):
    node.apply([lane(0, node.clock)], generation=5)
    with pytest.raises(InvalidDesiredState, match="older"):
        node.apply([], generation=4)
    with pytest.raises(InvalidDesiredState, match="other content"):
        node.apply([lane(1, node.clock)], generation=5)
    assert len(node.backend.boxes) == 1


def test_close_early_is_not_undone_by_resending_the_state(node):
    specs = [lane(0, node.clock), lane(1, node.clock)]
    node.apply(specs)
    report = node.agent.close("s-0")
    assert any("closed lane s-0" in c for c in report.changes)
    node.apply(specs)  # the controller re-sends the same lanes
    assert set(node.backend.boxes) == node.names([specs[1]])
    assert [e.end_reason for e in node.evidence()] == [EndReason.closed]


def test_removed_lane_is_closed_with_reason(node):
    node.apply([lane(0, node.clock), lane(1, node.clock)])
    node.apply([lane(1, node.clock)])
    assert [e.end_reason for e in node.evidence()] == [EndReason.removed]


def test_new_key_replaces_the_lane(node):
    spec = lane(0, node.clock)
    node.apply([spec])
    old_key = node.backend.boxes[node.naming.lane_name("s-0")].node_public_key
    report = node.apply([spec.model_copy(update={"engineer_public_key": KEYS[9]})])
    assert any("engineer_public_key changed" in c for c in report.changes)
    box = node.backend.boxes[node.naming.lane_name("s-0")]
    assert box.peer_public_key == KEYS[9] and box.node_public_key != old_key
    assert [e.end_reason for e in node.evidence()] == [EndReason.replaced]


def test_restart_keeps_lanes_and_sweeps_orphans(node):
    node.apply([lane(0, node.clock), lane(1, node.clock)])
    # an orphan: a box with our prefix that no record knows (e.g. from a lost state directory)
    node.backend.boxes["wktstzzzzzzzzzz"] = node.backend.observe()[node.naming.lane_name("s-0")]
    node.backend.boxes["wktstzzzzzzzzzz"].name = "wktstzzzzzzzzzz"
    node.backend.boxes["wktstzzzzzzzzzz"].listen_port = 1
    created = node.backend.created
    node.restart()
    assert set(node.backend.boxes) == node.names([lane(0, node.clock), lane(1, node.clock)])
    assert node.backend.created == created, "a restart must not rebuild healthy lanes"
    orphan = [e for e in node.evidence() if e.lane == "wktstzzzzzzzzzz"]
    assert orphan and orphan[0].session_id is None


def test_lane_that_ended_while_agent_was_down(node):
    node.apply([lane(0, node.clock, seconds=30)])
    node.clock.advance(45)  # the agent is not running through the end...
    node.fw.expire()  # ...but the kernel's element timeouts still stopped the lane's traffic
    assert node.fw.lanes_with_policy() == set()
    node.restart()
    assert node.backend.boxes == {}
    [ev] = node.evidence()
    assert ev.end_reason == EndReason.expired and ev.lateness_ms >= 15000
    assert any("not running" in n for n in ev.notes)


def test_damaged_lane_is_rebuilt(node):
    spec = lane(0, node.clock)
    node.apply([spec])
    node.backend.boxes.clear()  # wireguard-go died
    node.agent.lanes.load()
    report = node.agent.reconcile()
    assert any("damaged" in c for c in report.changes)
    assert set(node.backend.boxes) == node.names([spec])


@pytest.mark.parametrize("seed", range(12))
def test_random_sequences_of_states_converge(tmp_path, seed):
    """Random desired states in random order, with failures, clock jumps and restarts in between.

    A session id is single-use: once its lane ended while listed, it never reopens; a lane the controller
    removed (no longer listed) reopens only at a newer revision, which this sequence never sends."""
    rnd = random.Random(seed)
    node = Node(tmp_path)
    incarnation = dict.fromkeys(range(10), 0)
    end = {i: node.clock.wall() + 600 for i in range(10)}
    dead: set[str] = set()
    opened: dict[str, str] = {}  # session → lane name, for every session listed so far
    closed_so_far = 0
    for step in range(25):
        chosen = rnd.sample(range(10), rnd.randint(0, 6))
        specs = []
        for i in chosen:
            roll = rnd.random()
            if roll < 0.3:
                incarnation[i] += 1
                end[i] = node.clock.wall() + rnd.choice([5, 30, 120, 600])
            elif roll < 0.5:
                end[i] += 60
            sid = f"s-{i}-{incarnation[i]}"
            specs.append(lane(i, node.clock, session_id=sid, end_time=datetime.fromtimestamp(end[i], UTC)))
        node.backend.fail_create = {node.naming.lane_name(s.session_id) for s in specs if rnd.random() < 0.1}
        before = set(node.backend.boxes)
        listed = {s.session_id for s in specs}
        dead |= {sid for sid, name in opened.items() if sid not in listed and name in before}  # removed while open
        node.apply(specs)
        node.backend.fail_create.clear()
        node.agent.reconcile()  # lanes that failed come up on the next pass
        opened.update({s.session_id: node.naming.lane_name(s.session_id) for s in specs})
        wanted = {node.naming.lane_name(s.session_id) for s in specs
                  if s.session_id not in dead and s.end_time.timestamp() > node.clock.wall()}
        assert set(node.backend.boxes) == wanted, f"step {step}: {node.backend.render()}"
        assert node.fw.lanes_with_policy() == wanted
        assert node.agent.reconcile().changes == []  # idempotent
        closed_so_far += len(before - wanted)
        assert len(node.evidence()) >= closed_so_far
        node.clock.advance(rnd.choice([0, 1, 10, 40]))
        node.agent.tick()
        for s in specs:
            if s.end_time.timestamp() <= node.clock.wall():
                dead.add(s.session_id)
        if rnd.random() < 0.2:
            node.restart()
        alive = {node.naming.lane_name(s.session_id) for s in specs if s.end_time.timestamp() > node.clock.wall()}
        assert set(node.backend.boxes) <= alive, "no lane outlives its end"


class Crash(BaseException):
    """Stands in for kill -9 at one exact point."""


def test_crash_after_evidence_is_written_gives_one_record_with_true_totals(node, monkeypatch):
    spec = lane(0, node.clock, seconds=30)
    node.apply([spec])
    name = node.naming.lane_name("s-0")
    node.fw.counters_by_lane[name] = {"lane_tx": (5, 500), "lane_rx": (4, 400), "lane_refused": (0, 0)}
    real_destroy = node.backend.destroy
    monkeypatch.setattr(node.backend, "destroy", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    node.clock.advance(31)
    with pytest.raises(Crash):
        node.agent.tick()
    monkeypatch.setattr(node.backend, "destroy", real_destroy)
    node.restart()
    assert node.backend.boxes == {}
    [ev] = node.evidence()
    assert ev.totals.bytes_out == 500, "the record written before the crash is the only one"


def test_crash_before_evidence_is_written_loses_nothing(node, monkeypatch):
    spec = lane(0, node.clock, seconds=30)
    node.apply([spec])
    name = node.naming.lane_name("s-0")
    node.fw.counters_by_lane[name] = {"lane_tx": (5, 500), "lane_rx": (4, 400), "lane_refused": (0, 0)}
    real_spool = node.agent.state.spool
    monkeypatch.setattr(node.agent.state, "spool", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    node.clock.advance(31)
    with pytest.raises(Crash):
        node.agent.tick()
    monkeypatch.setattr(node.agent.state, "spool", real_spool)
    node.restart()
    [ev] = node.evidence()
    assert ev.totals.bytes_out == 500, "kernel counters were still there to harvest again"


def test_crash_in_the_middle_of_an_open_is_cleaned_and_reopened(node, monkeypatch):
    spec = lane(0, node.clock)
    real_commit = node.fw.commit
    monkeypatch.setattr(node.fw, "commit", lambda *a, **k: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        node.apply([spec])  # box built, rules not yet committed
    assert node.naming.lane_name("s-0") in node.backend.boxes
    monkeypatch.setattr(node.fw, "commit", real_commit)
    node.restart()
    assert set(node.backend.boxes) == node.names([spec]) and node.fw.lanes_with_policy() == node.names([spec])
    assert node.evidence() == [], "a lane that never carried traffic leaves no evidence"


def test_lost_rules_are_restored_without_replacing_the_lane(node):
    """Someone flushes the agent's table: the lanes come back with the same boxes and keys."""
    spec = lane(0, node.clock)
    node.apply([spec])
    name = node.naming.lane_name("s-0")
    key_before = node.backend.boxes[name].node_public_key
    node.fw.sets.clear()  # `nft flush ruleset`, as far as our elements go
    node.agent.lanes.load()
    report = node.agent.reconcile()
    assert any("restored the rules" in c for c in report.changes), report
    assert node.backend.boxes[name].node_public_key == key_before, "same box, same key: the engineer's config still works"
    assert node.fw.lanes_with_policy() == {name}
    assert node.evidence() == []
