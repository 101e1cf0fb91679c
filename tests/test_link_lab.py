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

from nodeagent.wire import PROTOCOL_VERSION
from tests.lab.controller import LabController, conf_value, ts
from tests.lab.site import NODE_ID, AgentProcess, Engineer, router_leftovers, serve, wait_for

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
    assert row["connected"] and row["enrolled_at"] and row["protocol_version"] == PROTOCOL_VERSION, row
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


def _watch_lanes(agent: AgentProcess, sids: set[str], until: float) -> dict[str, float]:
    """Poll the agent until `until` (wall clock): when each lane was last seen present."""
    last_seen: dict[str, float] = {}
    while time.time() < until:
        present = {lane["session_id"] for lane in agent.status()["lanes"]}
        now = time.time()
        for sid in present & sids:
            last_seen[sid] = now
        if not present & sids and len(last_seen) == len(sids):
            break
        time.sleep(0.1)
    return last_seen


def test_cut_link_lanes_end_on_time_nothing_new_opens_and_evidence_arrives_after_heal(product):
    lab, ctl, agent, engineer = product
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    people = ["erin", "erin1", "erin2", "erin3"]
    opened = [ctl.open_session(people[i % 4], quick=True, duration=f"{12 + 3 * i}s") for i in range(6)]
    ends = {s["id"]: ts(s["end_at"]) for s in opened}
    assert all(s["state"] == "active" for s in opened), opened
    assert {lane["session_id"] for lane in agent.status()["lanes"]} == set(ends)

    # cut somewhere inside the sessions' lives: some end while cut, some after the cut started mid-way
    cut_at = time.time() + rng.uniform(0.5, 6.0)
    time.sleep(max(0.0, cut_at - time.time()))
    ctl.cut()
    assert wait_for(lambda: not (agent.status().get("link") or "").startswith("connected"), timeout=8), \
        f"the agent did not notice the cut (seed {seed})"

    # nothing new opens while the controller cannot reach the node
    res = ctl.call("POST", "/sessions", "erin", step_up=True, expect=None,
                   json={"device": "RTU-17", "task": "iec104-quick", "reason": "while cut"})
    assert res.status_code == 201 and res.json()["state"] == "approved", res.text  # allowed, but not opened
    assert "could not open the lane" in res.json()["activation_error"], res.text

    last_seen = _watch_lanes(agent, set(ends), until=max(ends.values()) + 5)
    for sid, end in ends.items():
        assert last_seen.get(sid, 0) - end <= GRACE_S, f"lane {sid} outlived its end by {last_seen[sid] - end:.2f} s (seed {seed})"
    spooled = agent.evidence()
    assert {e["session_id"] for e in spooled} >= set(ends), "evidence was not written while cut"
    assert all(e["end_reason"] == "expired" and e["lateness_ms"] < GRACE_S * 1000 for e in spooled if e["session_id"] in ends)
    assert ctl.sessions_in("opening") == [], "an opening session outlived the cut"
    assert {lane["session_id"] for lane in agent.status()["lanes"]} == set(), "a lane opened while cut"

    ctl.heal()
    assert wait_for(lambda: (agent.status().get("link") or "").startswith("connected"), timeout=40), agent.status()
    assert wait_for(lambda: {e["session_id"] for e in ctl.evidence()} >= set(ends), timeout=15), \
        f"evidence collected during the cut did not all arrive (seed {seed})"
    got = [e for e in ctl.evidence() if e["session_id"] in ends]
    assert len(got) == len(ends), f"duplicate evidence records: {[e['ident'] for e in got]}"
    assert wait_for(lambda: agent.status()["pending_evidence"] == 0, timeout=5)
    assert wait_for(lambda: not ctl.sessions_in("active", "opening"), timeout=5), ctl.sessions_in("active", "opening")
    [row] = ctl.agents()
    assert wait_for(lambda: ctl.agents()[0]["applied_generation"] == ctl.agents()[0]["generation"], timeout=5), row


def test_strict_mode_ends_lanes_after_control_is_lost(product_lab, tmp_path):
    lab = product_lab
    ctl = LabController(lab, tmp_path / "ctl", engineers=1, default_s=60).setup()
    agent = AgentProcess(lab, extra=["--clock-sync", "warn", "--strict-after", "6"])
    try:
        ctl.start()
        ctl.enrol(agent)
        agent.start()
        assert wait_for(lambda: (agent.status().get("link") or "").startswith("connected"), timeout=10)
        assert agent.status()["strict_after_s"] == 6
        sid = ctl.open_session("erin", quick=True)["id"]
        time.sleep(1.5)
        cut = time.time()
        ctl.cut()
        gone = wait_for(lambda: agent.lane(sid) is None, timeout=15)
        ended = time.time()
        assert gone, "strict mode did not end the lane"
        # the agent heard the controller at most one heartbeat (1 s) before the cut
        assert 6 - 1.5 <= ended - cut <= 6 + GRACE_S, f"the lane ended {ended - cut:.2f} s after the cut (strict after 6 s)"
        ctl.heal()
        assert wait_for(lambda: any(e["session_id"] == sid for e in ctl.evidence()), timeout=40), "no evidence after healing"
        [ev] = [e for e in ctl.evidence() if e["session_id"] == sid]
        assert ev["end_reason"] == "control_lost", ev
        assert wait_for(lambda: ctl.session(sid)["state"] == "closed", timeout=5), ctl.session(sid)
        assert ctl.session(sid)["end_reason"] == "node_control_lost"
        time.sleep(1.5)
        assert agent.lane(sid) is None, "the lane came back after the link healed"
    finally:
        agent.stop()
        ctl.close()
        agent.remove_state()


def test_an_unsynchronised_clock_refuses_new_lanes_and_says_why(product_lab, tmp_path):
    from nodeagent.clock import clock_synchronized

    synced, why = clock_synchronized()
    if synced:
        pytest.skip(f"this machine's clock is synchronised ({why}); tests/test_agent_link_unit.py covers the refusal")
    lab = product_lab
    ctl = LabController(lab, tmp_path / "ctl", engineers=1).setup()
    agent = AgentProcess(lab, extra=["--clock-sync", "require"])
    try:
        ctl.start()
        ctl.enrol(agent)
        agent.start()
        assert wait_for(lambda: (agent.status().get("link") or "").startswith("connected"), timeout=10)
        assert "new lanes are refused" in agent.status()["clock_detail"]
        res = ctl.call("POST", "/sessions", "erin", step_up=True, expect=201,
                       json={"device": "RTU-17", "task": "iec104-quick", "reason": "clock check"}).json()
        assert res["state"] == "approved" and "clock is not synchronised" in res["activation_error"], res
        assert agent.status()["lanes"] == []
        assert ctl.sessions_in("active", "opening") == []
    except Exception:
        print(ctl.log()[-6000:])
        raise
    finally:
        agent.stop()
        ctl.close()
        agent.remove_state()


def test_kill9_of_controller_or_agent_leaves_no_orphan_duplicate_or_unacknowledged_lane(product):
    lab, ctl, agent, engineer = product
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    people = ["erin", "erin1", "erin2", "erin3"]
    import threading

    for cycle in range(6):
        who = people[cycle % 4]
        victim = rng.choice(["controller", "agent"])
        delay = rng.uniform(0.0, 1.2)
        t = threading.Thread(target=_open_quietly, args=(ctl, who, f"cycle {cycle}"))
        t.start()
        time.sleep(delay)
        if victim == "controller":
            ctl.kill9()
            t.join(60)
            ctl.start()
        else:
            agent.kill9()
            t.join(60)
            agent.start()
        _converged(lab, ctl, agent, f"cycle {cycle}, killed the {victim} after {delay:.2f} s (seed {seed})")
    for row in ctl.sessions_in("active"):
        ctl.call("POST", f"/sessions/{row['id']}/close", _owner(ctl, row["id"]), json={"reason": "test over"})
    _converged(lab, ctl, agent, f"after closing (seed {seed})")
    assert agent.status()["lanes"] == []


def _open_quietly(ctl: LabController, who: str, reason: str) -> None:
    try:
        ctl.call("POST", "/sessions", who, step_up=True, expect=None,
                 json={"device": "RTU-17", "task": "iec104-quick", "reason": reason})
    except Exception:  # noqa: BLE001, S110 - the controller may die under it; the checks look at the outcome
        pass


def _owner(ctl: LabController, sid: str) -> str:
    return ctl.session(sid)["user"]


def _converged(lab, ctl: LabController, agent: AgentProcess, where: str) -> None:
    """Within the ack timeout and a few ticks: the agent's lanes are exactly the controller's active sessions,
    one interface each, and no session is left opening."""
    def state():
        active = {r["id"] for r in ctl.sessions_in("active")}
        opening = {r["id"] for r in ctl.sessions_in("opening")}
        lanes = [lane["session_id"] for lane in agent.status()["lanes"]]
        return active, opening, lanes

    def ok():
        active, opening, lanes = state()
        return not opening and sorted(lanes) == sorted(active) and len(lanes) == len(set(lanes))

    assert wait_for(ok, timeout=25, interval=0.25), f"{where}: not converged: active/opening/lanes = {state()}"
    lanes = state()[2]
    leftovers = wait_for(lambda: (lambda x: x if len(x["links"]) == len(lanes) else None)(router_leftovers(lab)), timeout=5)
    assert leftovers, f"{where}: interfaces {router_leftovers(lab)['links']} for lanes {lanes}"
    if not lanes:
        assert wait_for(lambda: not any(router_leftovers(lab).values()), timeout=5), f"{where}: {router_leftovers(lab)}"


def test_a_restored_older_state_does_not_bring_back_a_revoked_lane(product):
    """The controller's database restored from a backup taken while a session was active: the controller pushes
    that session's lane again (with a newer generation, past what the node applied) — the node keeps it closed."""
    import sqlite3

    lab, ctl, agent, engineer = product
    rtu1 = lab.addr("rtu1")
    sid = ctl.open_session("erin", quick=True, duration="90s")["id"]
    engineer.up(ctl.call("GET", f"/sessions/{sid}/config", "erin").text)
    assert engineer.probe(rtu1, 2404) == "open"
    db = ctl.dir / "controller.db"
    backup = ctl.dir / "backup.db"
    with sqlite3.connect(db) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    ctl.call("POST", f"/sessions/{sid}/revoke", "alex", json={"reason": "wrong device"})
    assert wait_for(lambda: agent.lane(sid) is None, timeout=GRACE_S)

    ctl.stop()
    ctl.app.state.engine.dispose()
    for suffix in ("-wal", "-shm"):
        (ctl.dir / f"controller.db{suffix}").unlink(missing_ok=True)
    backup.replace(db)
    ctl.start()
    assert ctl.session(sid)["state"] == "active", "the restored database should hold the session as active"
    assert wait_for(lambda: (lambda a: a["connected"] and a["applied_generation"] == a["generation"])(ctl.agents()[0]),
                    timeout=20), ctl.agents()
    assert "was removed from this node before" in (ctl.agents()[0]["last_error"] or ""), __import__("json").dumps([ctl.agents()[0], agent.status()], default=str)
    time.sleep(1.0)
    assert agent.lane(sid) is None, "the restored state brought the revoked lane back"
    assert engineer.probe(rtu1, 2404) != "open"
