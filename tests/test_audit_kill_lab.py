"""`kill -9` of the controller while people request, approve, open and revoke: every call the controller
answered with success has its audit record after the restart, and the chain is whole (numbered without
gaps, every hash right). The controller runs as its own process in the lab, with the real agent."""

from __future__ import annotations

import random
import shutil
import threading
import time

import pytest
from sqlalchemy import select

from controller.audit.chain import GENESIS, chain_hash, leaf_hash
from tests.lab.controller import QUICK_TASK, TASK, LabController
from tests.lab.site import AgentProcess, wait_for

pytestmark = pytest.mark.lab
ENGINEERS = 6


@pytest.fixture
def running(product_lab, tmp_path):
    lab = product_lab
    ctl = LabController(lab, tmp_path / "ctl", engineers=ENGINEERS, default_s=300).setup()
    agent = AgentProcess(lab)
    try:
        ctl.start()
        ctl.enrol(agent)
        agent.start()
        assert wait_for(lambda: (agent.status().get("link") or "").startswith("connected"), timeout=10), agent.status()
        yield ctl
    except Exception:
        print(ctl.log()[-4000:])
        raise
    finally:
        agent.stop()
        ctl.close()
        agent.remove_state()
        shutil.rmtree(tmp_path / "ctl", ignore_errors=True)


class Acknowledged:
    """Calls the controller answered with success, and the record each one must have left."""

    def __init__(self):
        self.lock = threading.Lock()
        self.expected: list[tuple[str, str, str]] = []  # (type, session, actor)

    def add(self, type_: str, sid: str, actor: str) -> None:
        with self.lock:
            self.expected.append((type_, sid, actor))


def _code_free(ctl: LabController, who: str) -> bool:
    """A step-up code is free for `who` now (the controller takes each step once: three per 30 s)."""
    now = time.time()
    step, left = int(now // 30), 30 - now % 30
    return any(c not in ctl.people[who].used_steps for c in ([step - 1] if left > 3 else []) + [step, step + 1])


def _engineer(ctl: LabController, who: str, acked: Acknowledged, stop: threading.Event) -> None:
    """Open (request → activate → the node opens it) and have alex revoke, as fast as step-ups allow."""
    while not stop.is_set():
        if not _code_free(ctl, who):
            time.sleep(0.2)
            continue
        try:
            res = ctl.call("POST", "/sessions", who, step_up=True, expect=None,
                           json={"device": "RTU-17", "task": QUICK_TASK, "reason": "kill test"})
            if res.status_code != 201:
                continue
            sid = res.json()["id"]
            acked.add("session.request", sid, who)
            if res.json()["state"] == "active":
                acked.add("session.activate", sid, who)
                acked.add("session.open", sid, "(agent)")
                r = ctl.call("POST", f"/sessions/{sid}/revoke", "alex", expect=None, json={"reason": "kill test"})
                if r.status_code == 200:
                    acked.add("session.revoke", sid, "alex")
        except Exception:  # noqa: BLE001 - the controller dies under the calls; only answered calls count
            time.sleep(0.1)


def _approvals(ctl: LabController, who: str, acked: Acknowledged, stop: threading.Event) -> None:
    """Requests that need an approval, and alex approving them."""
    while not stop.is_set():
        if not (_code_free(ctl, who) and _code_free(ctl, "alex")):
            time.sleep(0.2)
            continue
        try:
            res = ctl.call("POST", "/sessions", who, step_up=True, expect=None,
                           json={"device": "RTU-17", "task": TASK, "reason": "kill test, approval"})
            if res.status_code != 201:
                continue
            sid = res.json()["id"]
            acked.add("session.request", sid, who)
            r = ctl.call("POST", f"/sessions/{sid}/approve", "alex", step_up=True, expect=None, json={"reason": "kill test"})
            if r.status_code == 200:
                acked.add("session.approve", sid, "alex")
        except Exception:  # noqa: BLE001 - as above
            time.sleep(0.1)


def test_every_acknowledged_record_survives_kill9(running):
    ctl = running
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    acked = Acknowledged()
    people = ["erin"] + [f"erin{i}" for i in range(1, ENGINEERS)]
    for _ in range(3):
        stop = threading.Event()
        threads = [threading.Thread(target=_engineer, args=(ctl, who, acked, stop)) for who in people[1:]]
        threads.append(threading.Thread(target=_approvals, args=(ctl, people[0], acked, stop)))
        for t in threads:
            t.start()
        time.sleep(rng.uniform(3.0, 8.0))
        ctl.kill9()
        stop.set()
        for t in threads:
            t.join(60)
        ctl.start()
    assert len(acked.expected) >= 10, f"too few calls were answered to test anything (seed {seed})"
    records = _records(ctl)
    _check_chain(records, seed)
    have = {(r.type, r.session_ref, r.actor) for r in records}
    agent_actor = next((r.actor for r in records if r.type == "session.open"), None)
    missing = [e for e in acked.expected
               if (e[0], e[1], agent_actor if e[0] == "session.open" else e[2]) not in have]
    assert missing == [], f"answered calls without their audit record (seed {seed}): {missing[:10]}"


def _records(ctl: LabController) -> list:
    from controller.models import Event

    with ctl.app.state.auth.factory() as s:
        return list(s.scalars(select(Event).order_by(Event.seq)))


def _check_chain(records: list, seed: int) -> None:
    prev = GENESIS
    for n, row in enumerate(records, start=1):
        assert row.seq == n, f"gap before record {row.seq} (seed {seed})"
        assert row.leaf == leaf_hash(row.line) and row.prev_hash == prev, f"record {n} does not chain (seed {seed})"
        prev = chain_hash(prev, row.leaf)
        assert row.hash == prev, f"record {n}: wrong hash (seed {seed})"
