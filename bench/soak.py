"""`make soak HOURS=1`: the whole product, for hours, opening and closing lanes every few seconds with
traffic, and a sample of everything that could leak every half minute. Not part of CI.

The lab is the product lab (tests.lab.controller): the controller as its own process on SQLite in `ctl`,
the real agent on the router enrolled over the link, engineers using wg-quick. Each cycle one engineer (in
turn) asks for a session of the no-approval IEC-104 task, imports its config, sends data to the RTU, and
then either closes the session at once (every other one) or leaves the lane to end on the agent's clock.

Each sample records, over time: the agent's, the controller's and wireguard-go's memory and open file
descriptors; the router's interfaces; the agent table's nft elements; the router's conntrack entries; every
controller table's rows and the database file; the agent's state directory. docs/soak.md says which of them
stayed flat and which grow by design (history: sessions and audit rows), with the plot docs/soak.png; the
raw samples go to docs/bench/soak.csv.

  python -m bench.soak --hours 1 [--period 5] [--sample 30]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.lanes import machine
from bench.soak_report import write_report

DOCS = Path(__file__).resolve().parent.parent / "docs"
ENGINEERS = 6  # two step-up codes per session: six engineers in turn stay within each one's TOTP budget
LANE_S = 12  # how long a lane left to expire lives
BYTES = 200_000  # sent through each lane


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--hours", type=float, default=1.0)
    p.add_argument("--period", type=float, default=5.0, help="seconds between session starts")
    p.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--out", default=str(DOCS), help="directory for soak.md and soak.png (raw CSV under bench/)")
    args = p.parse_args(argv)
    if not 0 < args.hours <= 72 or not 1 <= args.period <= 600 or not 1 <= args.sample <= 3600:
        p.error("--hours must be in (0, 72], --period in [1, 600] s and --sample in [1, 3600] s")
    out = Path(args.out)
    samples, totals = run(args.hours * 3600, args.period, args.sample)
    csv_path = out / "bench" / "soak.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(samples[0]))
        w.writeheader()
        w.writerows(samples)
    verdict = write_report(samples, totals, machine(), out)
    print(json.dumps(verdict, indent=1))
    print(f"[soak] written to {out / 'soak.md'}, {out / 'soak.png'} and {csv_path}")
    return 0 if not verdict["grew"] else 1


def run(seconds: float, period: float, sample_every: float) -> tuple[list[dict], dict]:
    from tests.lab import Lab, unavailable_reason
    from tests.lab.controller import QUICK_TASK, LabController, policy
    from tests.lab.site import AgentProcess, Engineer, router_leftovers, serve, wait_for

    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"[soak] the lab is unavailable: {reason}")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="wicket-soak-"))
    totals = {"sessions": 0, "closed_early": 0, "left_to_expire": 0, "errors": 0, "last_errors": [], "bytes": 0}
    samples: list[dict] = []
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        roles = tuple(f"eng{i + 1}" for i in range(ENGINEERS))
        lab = stack.enter_context(Lab(devices=("rtu1",), masters=("scada", "ctl"), engineers=roles))
        # The lab policy refuses a device not seen for an hour (limits.max_silence), and nothing refreshes the
        # RTU's passport during a soak: the check is switched off here, or every request after the first hour
        # would be denied (the first soak found that).
        files = {name: text.replace("max_silence: 1h", "max_silence: null") for name, text in policy(LANE_S).items()}
        ctl = LabController(lab, work / "ctl", engineers=ENGINEERS, default_s=LANE_S, heartbeat_s=10, ack_timeout_s=10,
                            tick_ms=1000, policy_files=files)  # the settings' production defaults for the link and the clock
        stack.callback(ctl.close)
        ctl.setup()
        agent = AgentProcess(lab)
        stack.callback(agent.remove_state)
        stack.callback(agent.stop)
        ctl.start()
        if "enrolled as" not in ctl.enrol(agent).stdout:
            raise SystemExit("[soak] the agent did not enrol")
        agent.start()
        if not wait_for(lambda: (agent.status().get("link") or "").startswith("connected"), timeout=15):
            raise SystemExit(f"[soak] the agent did not link: {agent.status()}")
        server = serve(lab, "rtu1", tcp=(2404,))
        stack.callback(server.kill)
        engineers = [Engineer(lab, role) for role in roles]
        for e in engineers:
            stack.callback(e.forget)
        users = ["erin"] + [f"erin{i}" for i in range(1, ENGINEERS)]
        device = lab.addr("rtu1")
        probe = Probe(lab, ctl, agent, work / "ctl" / "controller.db")
        _say(started, f"lab {lab.run_id} up; soaking for {seconds / 3600:.2f} h, a session every {period:g} s")

        deadline = started + seconds
        next_sample = time.monotonic()
        cycle = 0
        while time.monotonic() < deadline:
            t_cycle = time.monotonic()
            if t_cycle >= next_sample:
                samples.append(probe.sample(t_cycle - started, totals))
                next_sample += sample_every
                if len(samples) % 20 == 1:
                    _say(started, f"{totals['sessions']} sessions, {totals['errors']} errors; {_brief(samples[-1])}")
            slot = cycle % ENGINEERS
            try:
                sent = one_session(ctl, engineers[slot], users[slot], device, close_early=cycle % 2 == 0, task=QUICK_TASK)
                totals["sessions"] += 1
                totals["bytes"] += sent
                totals["closed_early" if cycle % 2 == 0 else "left_to_expire"] += 1
            except Exception as exc:  # counted and shown; a soak goes on through a single failure
                totals["errors"] += 1
                totals["last_errors"] = (totals["last_errors"] + [f"{type(exc).__name__}: {exc}"[:300]])[-5:]
                _say(started, f"cycle {cycle} failed: {exc!r}"[:300])
                if totals["errors"] > 20 and totals["errors"] > totals["sessions"] // 10:
                    raise SystemExit(f"[soak] too many failures: {totals['last_errors']}") from exc
            cycle += 1
            time.sleep(max(0.0, t_cycle + period - time.monotonic()))
        # the last lanes end on their own clock; then nothing of them may be left in the kernel
        time.sleep(LANE_S + 3)
        totals["drained"] = probe.sample(time.monotonic() - started, totals)
        left = router_leftovers(lab)
        totals["leftovers_after_last_lane"] = {k: len(v) for k, v in left.items()}
    totals["wall_s"] = round(time.monotonic() - started)
    return samples, totals


def one_session(ctl, engineer, user: str, device: str, *, close_early: bool, task: str) -> int:
    """One whole session: request → activate → config → traffic → (close). The bytes sent."""
    active = ctl.open_session(user, task=task, duration=f"{LANE_S}s")
    sid = active["id"]
    conf = ctl.call("GET", f"/sessions/{sid}/config", user).text
    engineer.up(conf)
    result = engineer.run("send", device, "2404", "--bytes", str(BYTES), timeout=30)
    if result.get("sent") != BYTES:
        raise RuntimeError(f"traffic through {sid}: {result}")
    if close_early:
        ctl.call("POST", f"/sessions/{sid}/close", user, json={"reason": "soak: done"})
        engineer.down()
    return BYTES


class Probe:
    """Everything the soak watches, read from /proc, the router's namespace and the controller's database."""

    def __init__(self, lab, ctl, agent, db_path: Path):
        self.lab, self.ctl, self.agent, self.db_path = lab, ctl, agent, db_path
        self.prefix = "wk" + lab.agent_tag

    def sample(self, t: float, totals: dict) -> dict:
        row: dict = {"t_s": round(t, 1), "sessions": totals["sessions"], "errors": totals["errors"]}
        row |= _proc("agent", self.agent.proc.pid)
        row |= _proc("controller", self.ctl.proc.pid)
        wg = [pid for pid in _pids() if _is_lane_wireguard(pid, self.prefix)]
        row["wg_procs"] = len(wg)
        row["wg_rss_kb"] = sum(_proc("x", pid)["x_rss_kb"] for pid in wg)
        links = self.lab.exec("rtr", ["ip", "-br", "link"]).stdout.splitlines()
        row["router_links"] = len(links)
        row["lane_links"] = sum(1 for line in links if line.startswith(self.prefix))
        row["nft_elements"] = _nft_elements(self.lab)
        row["conntrack"] = int(self.lab.exec("rtr", ["conntrack", "-C"]).stdout.strip() or 0)
        state = Path(self.agent.state_dir)
        row["agent_state_files"], row["agent_state_kb"] = _tree(state)
        for sub in ("lanes", "evidence", "flows", "reports", "closed", "removed"):
            row[f"state_{sub}"] = _tree(state / sub)[0]
        row["db_kb"] = sum(_size(Path(f"{self.db_path}{suffix}")) for suffix in ("", "-wal", "-shm")) // 1024
        row |= _db_rows(self.db_path)
        return row


def _proc(name: str, pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {f"{name}_rss_kb": int(fields["VmRSS"].split()[0]), f"{name}_fds": len(os.listdir(f"/proc/{pid}/fd")),
            f"{name}_threads": int(fields["Threads"])}


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _is_lane_wireguard(pid: int, prefix: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"wireguard-go") and any(a.startswith(prefix.encode()) for a in argv[1:])


def _nft_elements(lab) -> int:
    res = lab.exec("rtr", ["nft", "-j", "list", "table", "inet", "wicket"], check=False)
    if res.returncode != 0:
        return 0
    total = 0
    for item in json.loads(res.stdout)["nftables"]:
        body = item.get("set") or item.get("map")
        if body:
            total += len(body.get("elem", []))
    return total


def _tree(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(_size(p) for p in files) // 1024


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _db_rows(path: Path) -> dict:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
                                            "AND name != 'alembic_version' ORDER BY name")]
        return {f"rows_{t}": con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        con.close()


def _brief(row: dict) -> str:
    return (f"agent {row['agent_rss_kb'] // 1024} MB / {row['agent_fds']} fds, controller {row['controller_rss_kb'] // 1024} MB / "
            f"{row['controller_fds']} fds, {row['lane_links']} lanes, {row['nft_elements']} elements, {row['conntrack']} conntrack")


def _say(started: float, text: str) -> None:
    print(f"[soak {time.monotonic() - started:7.0f} s] {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
