"""Device baselines at scale, in the lab, side by side in one run; results go to docs/benchmarks.md.

  python -m bench.baselines [--quick] [--sizes 10,1000,5000,10000] [--reps 50] [--rounds 15] [--packets 20000]

With N passported devices on one agent (the agent's own Firewall, Baselines and Grants, in one process in the
lab router's namespace, on the real ruleset), measures:
  1. per-packet cost: UDP datagrams from a device (the lab's rtu1, one of the N; the others are elements
     only) through the router's forward path — from_device, the grant map, the dev_type map and type_chain verdict map, the
     device type's profile chain — to a master (scada); side by side with the same path from a host without
     a passport (no device rules), with wicket's forward chain skipped, and refused datagrams
     (device_refuse). A veth runs the router's forwarding in the sender's softirq, so the sender's CPU time
     per datagram is the whole path's cost. Each round sets every N in turn: sizes are compared seconds apart;
  2. change cost: Baselines.apply for one device added and removed, an FQDN destination's answer changing,
     the same desired state again, a grant opening and closing (Grants.reconcile); and the same changes'
     nft transactions alone;
  3. start-up: the first apply of all N devices (linear by nature), and parsing the baseline message.
Three helpers of this module run in the lab (router, device, master) and answer JSON lines; the lab's
cleanup stops them and removes the namespaces on any exit. Bounded: at most --max-devices devices, at most
20 million datagrams, timeouts on every step. `--quick` (small N, few repetitions, seconds) prints its
numbers and writes nothing unless --out is given. Otherwise writes the "baselines" section of
docs/benchmarks.md (bench.report) and docs/bench/baselines.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_section  # noqa: E402

NODE = "bench-node"
TABLE = "wicket"
DEVICE_ROLE, MASTER_ROLE = "rtu1", "scada"
NO_PASSPORT_SRC = "192.0.2.11"  # a second address on rtu1: a host the baseline does not know
SKIP_SRC = "192.0.2.12"  # a third: a rule at the top of the forward chain accepts it
ALLOWED_PORT, REFUSED_PORT = 9000, 9001
NTP_FQDN, UPDATES_FQDN = "ntp.wicket-bench.test", "updates.wicket-bench.test"
UPDATES_ANSWERS = (["203.0.113.80", "203.0.113.81"], ["203.0.113.82", "203.0.113.83"])
GRANT_DEST, GRANT_PORT = "historian", 22
PROFILES = ("rtu", "meter", "gateway")
VARIANTS = ("skip", "no_passport", "allowed", "refused")
CHANGES = ("add", "remove", "fqdn", "repeat", "grant_open", "grant_close")
KERNEL = ("add", "remove", "fqdn", "grant_add", "grant_delete")
QUICK = {"sizes": "10,1000", "reps": 5, "rounds": 3, "packets": 10000, "startup_reps": 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.baselines")
    p.add_argument("--quick", action="store_true", help="small N, few repetitions (< 60 s); writes nothing without --out")
    p.add_argument("--sizes", default="10,1000,5000,10000", help="device counts; the first is the reference")
    p.add_argument("--reps", type=int, default=50, help="repetitions of each change, at each size")
    p.add_argument("--startup-reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15, help="rounds of every size × the four datagram paths")
    p.add_argument("--packets", type=int, default=20000, help="datagrams per path, size and round")
    p.add_argument("--max-devices", type=int, default=20000)
    p.add_argument("--out", default=None, help="the report (default docs/benchmarks.md; none with --quick)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from docs/bench/baselines.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--sender", help=argparse.SUPPRESS)
    p.add_argument("--sink", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return serve(RouterBench(json.loads(args.worker)))
    if args.sender:
        return serve(Blaster(json.loads(args.sender)))
    if args.sink:
        return sink()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    out = Path(args.out) if args.out else (None if args.quick else REPO / "docs" / "benchmarks.md")
    if args.report_only:
        out = out or REPO / "docs" / "benchmarks.md"
        write_report(json.loads((out.parent / "bench" / "baselines.json").read_text()), out)
        return 0
    return driver(args, out)


# ---- driver: builds the lab, drives the router worker and the sender, writes the report ----


def driver(args, out: Path | None) -> int:
    from tests.lab import Lab

    sizes = [int(x) for x in args.sizes.split(",")]
    if min(sizes) < 1 or max(sizes) + 1 > args.max_devices:
        raise SystemExit(f"refusing: sizes must be 1 … {args.max_devices - 1} devices (one is the lab's rtu1)")
    if min(args.reps, args.startup_reps, args.rounds, args.packets) < 1:
        raise SystemExit("refusing: --reps, --startup-reps, --rounds and --packets must be at least 1")
    if args.rounds * len(sizes) * len(VARIANTS) * args.packets > 20_000_000:
        raise SystemExit("refusing: more than 20 million datagrams")
    started = time.time()
    results: dict = {"params": {"sizes": sizes, "reps": args.reps, "startup_reps": args.startup_reps,
                                "rounds": args.rounds, "packets": args.packets, "quick": args.quick},
                     "load_before": os.getloadavg()[0], "sizes": {}}
    with Lab(devices=(DEVICE_ROLE,), masters=(MASTER_ROLE,), engineers=()) as lab:
        state = tempfile.mkdtemp(prefix=f"wicket-bench-baselines-{lab.run_id}-")
        procs: list[subprocess.Popen] = []
        try:
            for src in (NO_PASSPORT_SRC, SKIP_SRC):
                lab.exec(DEVICE_ROLE, ["ip", "addr", "add", f"{src}/32", "dev", "eth0"])
            procs.append(_start(lab, MASTER_ROLE, "--sink", {}))
            router = _start(lab, "rtr", "--worker", {"tag": lab.agent_tag, "state": state,
                                                     "device": lab.addr(DEVICE_ROLE), "master": lab.addr(MASTER_ROLE)})
            procs.append(router)
            blaster = _start(lab, DEVICE_ROLE, "--sender", {"dst": lab.addr(MASTER_ROLE), "variants": [
                [v, src, REFUSED_PORT if v == "refused" else ALLOWED_PORT]
                for v, src in zip(VARIANTS, (SKIP_SRC, NO_PASSPORT_SRC, lab.addr(DEVICE_ROLE), lab.addr(DEVICE_ROLE)),
                                  strict=True)]})
            procs.append(blaster)
            _call(router, {"op": "prepare", "sizes": sizes}, 300)
            print(f"[bench] datagrams: {args.rounds} rounds over {len(sizes)} sizes × {len(VARIANTS)} paths", flush=True)
            results["packets"] = per_packet(lab, router, blaster, sizes, args.rounds, args.packets)
            print("[bench] start-up at each size", flush=True)
            for n in sizes:
                results["sizes"][str(n)] = {"startup": _call(router, {"op": "size", "n": n, "reps": args.startup_reps}, 300),
                                            "changes": {k: {"ms": [], "nft_ms": []} for k in CHANGES},
                                            "kernel": {k: [] for k in KERNEL}}
            print(f"[bench] changes: {args.reps} of each kind at each size", flush=True)
            # in blocks, the sizes taking turns: a busy spell on this shared machine falls on all of them
            blocks = max(1, min(5, args.reps))
            for b in range(blocks):
                reps = args.reps // blocks + (1 if b < args.reps % blocks else 0)
                for n in sizes[b % len(sizes):] + sizes[:b % len(sizes)]:
                    got = _call(router, {"op": "changes", "n": n, "reps": reps}, 600)
                    for k in CHANGES:
                        for field in ("ms", "nft_ms"):
                            results["sizes"][str(n)]["changes"][k][field] += got[k][field]
                    got = _call(router, {"op": "kernel", "n": n, "reps": reps}, 600)
                    for k in KERNEL:
                        results["sizes"][str(n)]["kernel"][k] += got[k]
            _call(router, {"op": "quit"}, 60)
        finally:
            for proc in procs:  # ours; the lab's cleanup would stop them too
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            shutil.rmtree(state, ignore_errors=True)
    results["load_after"] = os.getloadavg()[0]
    results["machine"] = machine()
    results["duration_s"] = round(time.time() - started, 1)
    results["summary"] = summarise(results)
    print(json.dumps(results["summary"], indent=1))
    if out is not None:
        write_report(results, out)
        print(f"[bench] written to {out}")
    return 0


def per_packet(lab, router, blaster, sizes: list[int], rounds: int, packets: int) -> dict:
    """Each round sets every size in turn on the router and sends a batch down each of the four paths, so
    sizes and paths are compared side by side in time; then checks where the datagrams ended up."""
    out: dict = {str(n): {v: {"wall_ns": [], "cpu_ns": []} for v in VARIANTS} for n in sizes}
    _call(router, {"op": "set", "n": sizes[0]}, 60)
    _call(blaster, {"op": "warm"}, 60)
    _call(router, {"op": "blocked"}, 60)  # start from an empty breach set
    before, sent_before = _udp_counters(lab), _call(blaster, {"op": "sent"}, 10)
    deadline = time.monotonic() + 300
    done = 0
    for r in range(rounds):
        for n in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:
            _call(router, {"op": "set", "n": n}, 60)
            batch = _call(blaster, {"op": "blast", "packets": packets, "offset": r}, 120)
            for v in VARIANTS:
                out[str(n)][v]["wall_ns"].append(batch[v]["wall_ns"])
                out[str(n)][v]["cpu_ns"].append(batch[v]["cpu_ns"])
        done += 1
        if time.monotonic() > deadline:
            break
    sent = {k: v - sent_before[k] for k, v in _call(blaster, {"op": "sent"}, 10).items()}
    after = _udp_counters(lab)
    refused_seen = sum(row[4] for row in _call(router, {"op": "blocked"}, 60)["rows"]
                       if row[0] == lab.addr(DEVICE_ROLE) and row[3] == REFUSED_PORT)
    return {"rounds": done, "by_size": out, "sent": sent, "delivery": {
        "sent_to_master": sent["skip"] + sent["no_passport"] + sent["allowed"],
        # InErrors counts what the sink's full buffer dropped: those arrived too
        "arrived_at_master": (after["InDatagrams"] - before["InDatagrams"]) + (after["InErrors"] - before["InErrors"]),
        "refused_sent": sent["refused"],
        "refused_counted_by_router": refused_seen,
        "no_port_at_master": after["NoPorts"] - before["NoPorts"],
    }}


def _start(lab, role: str, flag: str, params: dict) -> subprocess.Popen:
    """One of this module's helpers, long-running in `role`'s namespace, answering JSON lines."""
    proc = lab.spawn(role, [sys.executable, "-m", "bench.baselines", flag, json.dumps(params)], cwd=str(REPO),
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    hello = json.loads(_readline(proc, 30) or "{}")
    if not hello.get("ready"):
        raise RuntimeError(f"{flag} in {role} did not start: {hello}")
    return proc


def _call(proc: subprocess.Popen, msg: dict, timeout: float) -> dict:
    proc.stdin.write(json.dumps(msg) + "\n")
    proc.stdin.flush()
    line = _readline(proc, timeout)
    if not line:
        raise RuntimeError(f"{proc.args[-2]} gave no answer to {msg['op']} (exit {proc.poll()})")
    reply = json.loads(line)
    if "error" in reply:
        raise RuntimeError(f"{proc.args[-2]} failed on {msg['op']}: {reply['error']}")
    return reply


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no answer within {timeout} s")
    return proc.stdout.readline().strip()


def _udp_counters(lab) -> dict[str, int]:
    """The master namespace's UDP counters (/proc/net/snmp is per namespace)."""
    lines = [line.split() for line in lab.exec(MASTER_ROLE, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Udp:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}


def machine() -> dict:
    def first(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "nft": first(["nft", "--version"]),
            "python": platform.python_version(), "date": datetime.now(UTC).isoformat(timespec="seconds")}


# ---- the baseline the bench enforces ----


def device_address(i: int, device: str) -> str:
    """Device i's address: i = 0 is the lab's real device; the others are only elements (100.64.0.0/10)."""
    if i == 0:
        return device
    return f"100.{64 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


def baseline_doc(n: int, device: str, master: str) -> dict:
    """N devices over three device types, four destinations (two of them FQDNs every profile names)."""
    historian = master.rsplit(".", 1)[0] + ".20"
    flows = {
        "rtu": [("iec104", "tcp", [2404], ["scada"]), ("bench", "udp", [ALLOWED_PORT], ["scada"]),
                ("ntp", "udp", [123], ["ntp"]), ("updates", "tcp", [443], ["updates"]),
                ("syslog", "udp", [514], ["historian"])],
        "meter": [("dlms", "tcp", [4059], ["scada", "historian"]), ("ntp", "udp", [123], ["ntp"]),
                  ("updates", "tcp", [443], ["updates"])],
        "gateway": [("mqtt", "tcp", [8883], ["historian"]), ("modbus", "tcp", [502], ["scada"]),
                    ("ntp", "udp", [123], ["ntp"]), ("updates", "tcp", [443], ["updates"])],
    }
    return {
        "destinations": [{"name": "scada", "addresses": [master]}, {"name": "historian", "addresses": [historian]},
                         {"name": "ntp", "fqdn": NTP_FQDN}, {"name": "updates", "fqdn": UPDATES_FQDN}],
        "profiles": [{"name": p, "flows": [{"protocol": proto, "transport": t, "ports": ports, "to": to}
                                           for proto, t, ports, to in flows[p]]} for p in PROFILES],
        "devices": [{"asset_id": f"BENCH-{i:05d}", "addresses": [device_address(i, device)],
                     "profile": PROFILES[i % len(PROFILES)]} for i in range(n)],
    }


# ---- worker: the agent's device-traffic code, inside the router namespace ----


class RouterBench:
    """The router's side: its commands are the driver's `op`s (see `serve`)."""

    def __init__(self, params: dict):
        from nodeagent.baseline import Baselines
        from nodeagent.clock import Clock
        from nodeagent.ctnl import Conntrack
        from nodeagent.firewall import Firewall
        from nodeagent.grants import Grants
        from nodeagent.naming import Naming
        from nodeagent.state import StateDir

        self.device, self.master = params["device"], params["master"]
        self.fw = Firewall(Naming(params["tag"]), table=TABLE)
        self.fw.ensure()
        self.fw.run([{"insert": {"rule": {"family": "inet", "table": TABLE, "chain": "forward", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": SKIP_SRC}},
            {"accept": None}]}}}])
        self.baselines = Baselines(self.fw)
        self.grants = Grants(self.fw, Conntrack(), StateDir(params["state"]), Clock(), NODE, "kernel")
        self.answers = {NTP_FQDN: ["203.0.113.123"], UPDATES_FQDN: list(UPDATES_ANSWERS[0])}
        self.kernel_ms = 0.0
        for name in ("run", "commit", "delete_tolerant"):  # time every kernel transaction, wherever it comes from
            setattr(self.fw, name, self._timed_kernel(getattr(self.fw, name)))
        self.raw: dict[int, str] = {}  # size → the baseline message, as it comes over the link
        self.states: dict = {}  # size → the parsed baseline (N devices, and N + 1 for adding one)
        self.grant_seq = 0

    def resolve(self, fqdn: str) -> list[str]:
        return list(self.answers.get(fqdn, []))

    def timed(self, fn) -> tuple[float, float, object]:
        """(whole ms, of it in nft transactions ms, result)."""
        self.kernel_ms = 0.0
        t0 = time.perf_counter()
        result = fn()
        return (time.perf_counter() - t0) * 1000, self.kernel_ms, result

    def op_prepare(self, sizes: list[int]) -> dict:
        from nodeagent.wire import BaselineState

        for n in sizes:
            self.raw[n] = json.dumps(baseline_doc(n, self.device, self.master))
            self.states[n] = BaselineState.model_validate_json(self.raw[n])
            self.states[n + 1] = BaselineState.model_validate(baseline_doc(n + 1, self.device, self.master))
        # An agent holds one desired state; these hold every size at once. Out of the collector's sight, so
        # its full collections cost what they would cost the agent, not a multiple of it.
        gc.collect()
        gc.freeze()
        return {"ok": True}

    def op_set(self, n: int) -> dict:
        """N devices in the table (for the datagrams)."""
        self.baselines.apply(self.states[n], self.resolve)
        if len(self.baselines.applied.devices) != n or self.baselines.chain_of(self.device) is None:
            raise RuntimeError(f"{len(self.baselines.applied.devices)} device(s) applied, not {n}")
        return {"ok": True}

    def op_size(self, n: int, reps: int) -> dict:
        """Start-up at N: parse the message, apply it to an empty table; leaves N devices applied."""
        from nodeagent.baseline import read_model
        from nodeagent.wire import BaselineState

        out: dict = {"parse_ms": [], "apply_ms": [], "apply_nft_ms": [], "message_bytes": len(self.raw[n])}
        for _ in range(reps):
            gc.collect()
            t0 = time.perf_counter()
            BaselineState.model_validate_json(self.raw[n])
            out["parse_ms"].append((time.perf_counter() - t0) * 1000)
        for _ in range(reps):
            self.baselines.apply(None, self.resolve)  # an agent starting on an empty table
            gc.collect()
            whole, kernel, _ = self.timed(lambda: self.baselines.apply(self.states[n], self.resolve))
            out["apply_ms"].append(whole)
            out["apply_nft_ms"].append(kernel)
        in_kernel = read_model(self.fw)
        if len(in_kernel.devices) != n or in_kernel.devices.get(self.device) is None:
            raise RuntimeError(f"the table holds {len(in_kernel.devices)} device(s), not {n} with {self.device}")
        out["devices_in_kernel"] = len(in_kernel.devices)
        return out

    def op_changes(self, n: int, reps: int) -> dict:
        """`reps` times each kind of change with N devices, the kinds interleaved."""
        from nodeagent.wire import BaselineFlow, GrantSpec

        state, plus = self.states[n], self.states[n + 1]
        self.op_set(n)
        out: dict = {k: {"ms": [], "nft_ms": []} for k in CHANGES}

        def record(kind, timing, ok):
            if not ok:
                raise RuntimeError(f"{kind}: the change did not happen")
            out[kind]["ms"].append(timing[0])
            out[kind]["nft_ms"].append(timing[1])

        flow = BaselineFlow(protocol="ssh", transport="tcp", ports=[GRANT_PORT], to=[GRANT_DEST])
        gc.collect()
        for _ in range(reps):
            t = self.timed(lambda: self.baselines.apply(plus, self.resolve))
            record("add", t, bool(t[2]))
            t = self.timed(lambda: self.baselines.apply(state, self.resolve))
            record("remove", t, bool(t[2]))
            was = self.answers[UPDATES_FQDN]
            self.answers[UPDATES_FQDN] = list(UPDATES_ANSWERS[1] if was == UPDATES_ANSWERS[0] else UPDATES_ANSWERS[0])
            t = self.timed(lambda: self.baselines.apply(state, self.resolve))
            record("fqdn", t, bool(t[2]))
            t = self.timed(lambda: self.baselines.apply(state, self.resolve))
            record("repeat", t, t[2] == [] and t[1] == 0.0)
            self.grant_seq += 1
            spec = GrantSpec(session_id=f"bench-{n}-{self.grant_seq}", device_id="BENCH-00000", device_address=self.device,
                             flows=[flow], end_time=datetime.now(UTC) + timedelta(hours=1))
            t = self.timed(lambda s=spec: self.grants.reconcile([s], set(), {}, state, self.resolve))
            record("grant_open", t, not t[2][1] and spec.session_id in self.grants.records)
            t = self.timed(lambda s=spec: self.grants.reconcile([], {s.session_id}, {}, state, self.resolve))
            record("grant_close", t, not t[2][1] and not self.grants.records)
        return out

    def op_kernel(self, n: int, reps: int) -> dict:
        """The same changes' nft transactions alone, back to back (built beforehand by the agent's own `diff`):
        what the kernel and libnftables cost without the planning around them."""
        from nodeagent.baseline import build, diff

        self.op_set(n)
        now = build(self.states[n], self.resolve)
        plus = build(self.states[n + 1], self.resolve)
        was = self.answers[UPDATES_FQDN]
        self.answers[UPDATES_FQDN] = list(UPDATES_ANSWERS[1] if was == UPDATES_ANSWERS[0] else UPDATES_ANSWERS[0])
        other = build(self.states[n], self.resolve)
        self.answers[UPDATES_FQDN] = was
        steps = {"add": diff(TABLE, now, plus)[0], "remove": diff(TABLE, plus, now)[0],
                 "fqdn": diff(TABLE, now, other)[0], "fqdn_back": diff(TABLE, other, now)[0]}
        keys = [(self.device, self.master.rsplit(".", 1)[0] + ".20", "tcp", GRANT_PORT)]
        grant_add, grant_delete = self.fw.grant_elements(keys, 0x58000001, 3600), self.fw.grant_keys(keys)
        out: dict = {k: [] for k in KERNEL}

        def run(kind, fn):
            t0 = time.perf_counter()
            fn()
            if kind:
                out[kind].append((time.perf_counter() - t0) * 1000)

        gc.collect()
        for _ in range(reps):
            run("add", lambda: self.fw.run(steps["add"]))
            run("remove", lambda: self.fw.run(steps["remove"]))
            run("fqdn", lambda: self.fw.run(steps["fqdn"]))
            run(None, lambda: self.fw.run(steps["fqdn_back"]))
            run("grant_add", lambda: self.fw.commit(add=[grant_add]))
            run("grant_delete", lambda: self.fw.commit(delete=[grant_delete]))
        return out

    def op_blocked(self) -> dict:
        """The breach set's rows, emptied."""
        rows, keys = self.fw.device_blocked()
        if keys:
            self.fw.delete_tolerant(keys)
        return {"rows": rows}

    def close(self) -> None:
        from nodeagent.wire import EndReason

        self.grants.close_now(EndReason.removed)
        self.fw.remove()

    def _timed_kernel(self, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.kernel_ms += (time.perf_counter() - t0) * 1000

        return timed


def serve(helper) -> int:
    """A helper's loop: {"op": name, ...} on each stdin line → helper.op_<name>(...) → one JSON line back;
    "quit" or the end of stdin ends it, and `helper.close()` undoes what it set up."""
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            msg = json.loads(line)
            op = msg.pop("op")
            if op == "quit":
                print(json.dumps({"ok": True}), flush=True)
                break
            try:
                reply = getattr(helper, f"op_{op}")(**msg)
            except Exception as exc:  # reported to the driver, which stops the run
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
        return 0
    finally:
        helper.close()


# ---- sender (device namespace) and sink (master namespace) ----


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(_IoVec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


BATCH = 256
PAYLOAD = 64


class Blaster:
    """The device's side: connected UDP sockets (one per path) sending fixed-size datagrams with sendmmsg(2).
    The Python loop's cost is spread over a batch, so the time per datagram is the kernel's: the send, and the
    router's forwarding, which a veth runs in the sender's softirq."""

    def __init__(self, params: dict):
        # One CPU for the sender, its softirq and (should it take over) that CPU's ksoftirqd.
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.buf = ctypes.create_string_buffer(PAYLOAD)
        self.iov = _IoVec(ctypes.cast(self.buf, ctypes.c_void_p), PAYLOAD)
        self.vec = (_MMsgHdr * BATCH)()
        for m in self.vec:
            m.hdr.iov = ctypes.pointer(self.iov)
            m.hdr.iovlen = 1
        self.socks: dict[str, socket.socket] = {}
        for name, src, port in params["variants"]:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((src, 0))
            s.connect((params["dst"], port))
            self.socks[name] = s
        self.sent = dict.fromkeys(self.socks, 0)

    def op_warm(self) -> dict:
        for name in self.socks:  # one datagram each first: neighbours resolve without a burst queued on them
            self.send(name, 1)
        time.sleep(0.3)
        for name in self.socks:  # conntrack entries, caches
            self.send(name, 2000)
        return {"ok": True}

    def op_blast(self, packets: int, offset: int) -> dict:
        """`packets` datagrams down each path, paths in turn from `offset`: ns per datagram, wall and CPU."""
        names = list(self.socks)
        out = {}
        for name in names[offset % len(names):] + names[:offset % len(names)]:
            sent, wall, cpu = self.send(name, packets)
            out[name] = {"wall_ns": round(wall / sent, 1), "cpu_ns": round(cpu / sent, 1)}
        return out

    def op_sent(self) -> dict:
        return dict(self.sent)

    def send(self, name: str, count: int) -> tuple[int, int, int]:
        """(datagrams sent, wall ns, this thread's CPU ns)."""
        fd = self.socks[name].fileno()
        sent = 0
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        while sent < count:
            n = self.libc.sendmmsg(fd, self.vec, min(BATCH, count - sent), 0)
            if n < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            sent += n
        wall, cpu = time.perf_counter_ns() - w0, time.thread_time_ns() - c0
        self.sent[name] += sent
        return sent, wall, cpu

    def close(self) -> None:
        for s in self.socks.values():
            s.close()


def sink() -> int:
    """The master's side: a socket on the allowed port that never reads (datagrams past its small buffer are
    dropped and counted), so arriving costs the same few steps at any rate. Holds until stdin closes."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind(("0.0.0.0", ALLOWED_PORT))
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.read()
    return 0


# ---- summary and report ----


def _med(values) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(r: dict) -> dict:
    sizes = list(r["sizes"])
    ref, big = sizes[0], ("5000" if "5000" in sizes else sizes[-1])
    bs = r["packets"]["by_size"]
    s: dict = {"reference": ref, "compared": big, "packets_ns": {}, "changes_ms": {}, "kernel_ms": {}, "startup": {}}
    for n in sizes:
        cpu = {v: bs[n][v]["cpu_ns"] for v in VARIANTS}
        s["packets_ns"][n] = {v: round(_med(cpu[v]), 1) for v in VARIANTS}
        s["packets_ns"][n]["device_rules"] = round(_med(
            [a - b for a, b in zip(cpu["allowed"], cpu["no_passport"], strict=True)]), 1)
        s["packets_ns"][n]["wall_allowed"] = round(_med(bs[n]["allowed"]["wall_ns"]), 1)
        row = r["sizes"][n]
        s["changes_ms"][n] = {k: {"ms": round(_med(v["ms"]), 3), "nft_ms": round(_med(v["nft_ms"]), 3)}
                              for k, v in row["changes"].items()}
        s["kernel_ms"][n] = {k: round(_med(v), 3) for k, v in row["kernel"].items()}
        st = row["startup"]
        s["startup"][n] = {"apply_ms": round(_med(st["apply_ms"]), 1), "apply_nft_ms": round(_med(st["apply_nft_ms"]), 1),
                           "parse_ms": round(_med(st["parse_ms"]), 1)}
    c = s["changes_ms"]
    s["ratios"] = {
        # each round's batch at `big` over the same round's at `ref`, a few seconds apart: median of those
        "packets": {v: round(_med([a / b for a, b in zip(bs[big][v]["cpu_ns"], bs[ref][v]["cpu_ns"], strict=True)]), 2)
                    for v in VARIANTS},
        "changes": {k: _ratio(c[big][k]["ms"], c[ref][k]["ms"]) for k in CHANGES},
        "changes_nft": {k: _ratio(c[big][k]["nft_ms"], c[ref][k]["nft_ms"]) for k in CHANGES if k != "repeat"},
        "kernel": {k: _ratio(s["kernel_ms"][big][k], s["kernel_ms"][ref][k]) for k in KERNEL},
    }
    cpu_share = [bs[n][v]["cpu_ns"][i] / bs[n][v]["wall_ns"][i] for n in sizes for v in VARIANTS
                 for i in range(len(bs[n][v]["cpu_ns"]))]
    s["sender_cpu_over_wall"] = round(_med(cpu_share), 3)
    return s


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def _n(n) -> str:
    return f"{int(n):,}"


KERNEL_LABELS = {"add": "adding a device", "remove": "removing a device", "fqdn": "an FQDN's set rewritten",
                 "grant_add": "a grant's element added", "grant_delete": "a grant's element removed"}
CHANGE_LABELS = {"add": "adding a device", "remove": "removing a device", "fqdn": "an FQDN's answer changing",
                 "grant_open": "a grant opening", "grant_close": "a grant closing", "repeat": "nothing changed"}


def write_report(r: dict, path: Path) -> None:
    s, mach, prm = r["summary"], r["machine"], r["params"]
    sizes = list(r["sizes"])
    ref, big, last = s["reference"], s["compared"], sizes[-1]
    p, c, st = s["packets_ns"], s["changes_ms"], s["startup"]
    rp, rc, rcn = s["ratios"]["packets"], s["ratios"]["changes"], s["ratios"]["changes_nft"]
    pk = r["packets"]
    d = pk["delivery"]

    pk_rows = "\n".join(
        f"| {_n(n)} | {p[n]['skip']:,.0f} | {p[n]['no_passport']:,.0f} | {p[n]['allowed']:,.0f} | {p[n]['refused']:,.0f} | "
        f"{p[n]['device_rules']:,.0f} | {round(1e6 / p[n]['wall_allowed']):,} |" for n in sizes)
    pk_ratio = (f"| **{_n(big)} / {_n(ref)}**, paired by round | {rp['skip']} | {rp['no_passport']} | **{rp['allowed']}** | "
                f"**{rp['refused']}** | | |")
    kinds = ("add", "remove", "fqdn", "grant_open", "grant_close", "repeat")
    ch_rows = "\n".join(f"| {_n(n)} | " + " | ".join(f"{c[n][k]['ms']} ({c[n][k]['nft_ms']})" for k in kinds) + " |"
                        for n in sizes)
    ch_ratio = (f"| **{_n(big)} / {_n(ref)}** | " + " | ".join(
        f"**{rc[k]}** ({rcn[k]})" if k != "repeat" else f"**{rc[k]}**" for k in kinds) + " |")
    st_rows = "\n".join(
        f"| {_n(n)} | {st[n]['apply_ms']} | {st[n]['apply_nft_ms']} | {round(st[n]['apply_ms'] * 1000 / int(n), 1)} | "
        f"{st[n]['parse_ms']} | {round(r['sizes'][n]['startup']['message_bytes'] / 1024)} |" for n in sizes)

    km, rk = s["kernel_ms"], s["ratios"]["kernel"]
    k_rows = "\n".join(f"| {_n(n)} | " + " | ".join(str(km[n][k]) for k in KERNEL) + " |" for n in sizes)
    k_ratio = f"| **{_n(big)} / {_n(ref)}** | " + " | ".join(f"**{rk[k]}**" for k in KERNEL) + " |"
    plan_us = round((c[last]["add"]["ms"] - c[ref]["add"]["ms"]) * 1000 / max(int(last) - int(ref), 1), 2)
    changing = ("add", "remove", "fqdn", "grant_open", "grant_close")
    flat = [k for k in changing if rc[k] is not None and rc[k] <= 1.5]
    grows = [k for k in changing if k not in flat]
    k_flat = [k for k in KERNEL if rk[k] is not None and rk[k] <= 1.5]
    k_grows = [k for k in KERNEL if k not in k_flat]
    packets_flat = all(rp[v] <= 1.1 for v in ("allowed", "refused"))
    all_arrived = d["arrived_at_master"] == d["sent_to_master"]
    refused_ok = d["refused_counted_by_router"] == d["refused_sent"] and d["no_port_at_master"] == 0

    def target(label, value, ok):
        return f"| {label} | {value} | {'yes' if ok else '**no**'} |"

    target_rows = "\n".join([
        target("per-packet cost (≤ 1.1)", f"device, allowed {rp['allowed']} ×; refused {rp['refused']} × "
               f"(paths without device rules: {rp['skip']} ×, {rp['no_passport']} ×)", packets_flat),
        target("change cost (≤ 1.5): a device added / removed", f"{rc['add']} × / {rc['remove']} × "
               f"(nft transaction alone: {rk['add']} × / {rk['remove']} ×)", "add" in flat and "remove" in flat),
        target("change cost: an FQDN's answer changing", f"{rc['fqdn']} × (nft transaction alone: {rk['fqdn']} ×)",
               "fqdn" in flat),
        target("change cost: a grant opening / closing", f"{rc['grant_open']} × / {rc['grant_close']} ×",
               "grant_open" in flat and "grant_close" in flat),
    ])

    text = f"""## Device baselines at scale

Generated by `make bench-baselines` (`python -m bench.baselines`) on {mach['date']}; every number in this section
comes from that one run, side by side (raw numbers and every round: `docs/bench/baselines.json`). Machine:
{mach['cpus']} × {mach['cpu']} (a shared virtual machine: other work ran beside it), Linux {mach['kernel']},
{mach['nft']}, Python {mach['python']}. Whole run: {r['duration_s']} s. Load average {r['load_before']:.1f} at the
start and {r['load_after']:.1f} at the end.

### Target

| target (issue 8): flat at {_n(big)} devices | measured, {_n(big)} / {_n(ref)} devices | met |
|---|---|---|
{target_rows}

**Set-up.** The lab's router namespace runs the agent's own `Firewall` (the real ruleset), `Baselines` and
`Grants` in one process. The baseline holds {_n(ref)} … {_n(last)} passported devices over three device types
(five, three and four flows) and four destinations: two fixed addresses and two FQDNs that every type names.
One device is a real host (`rtu1`, 192.0.2.10); the others are elements of `dev_type` and `dev_addr` only
(addresses in 100.64.0.0/10). The destination `scada` is a real host (198.51.100.10) with a UDP socket that
never reads.

### Per-packet cost, by devices on the agent

UDP datagrams of {PAYLOAD} bytes sent with `sendmmsg` from `rtu1`, pinned to one CPU, to `scada` through the
router. A veth hands each datagram to the router's forwarding in the sender's own softirq, and this kernel
charges softirq time to the running task, so the sender's CPU time per datagram is the whole path: the send,
conntrack, wicket's chains, the delivery (the sender's CPU time was {s['sender_cpu_over_wall']} of its wall time).
Four paths:

- *forward chain skipped*: a rule at the top of wicket's forward chain accepts the source (192.0.2.12);
- *no passport*: a source the baseline does not know (192.0.2.11): the forward chain's lookups, no device rules;
- *device, allowed*: the device, on a flow of its type: `from_device`, the grant map, the `dev_type`
  map and the `type_chain` verdict map, its profile chain (five rules, each a destination-set lookup; this flow is the third), accept;
- *device, refused*: a port its type does not allow: the same, through all five rules, then
  `device_refuse` (the breach set's counter), drop.

Each of {pk['rounds']} rounds sets every size on the router in turn and sends {prm['packets']:,} datagrams down each
path at each size, so sizes and paths are measured seconds apart. Nanoseconds of CPU per datagram, median of
the rounds:

| devices | forward chain skipped | no passport | device, allowed | device, refused | device rules alone (allowed − no passport, per round) | allowed, thousand datagrams/s (wall) |
|---|---|---|---|---|---|---|
{pk_rows}
{pk_ratio}

The ratio row divides each round's batch at {_n(big)} devices by the same round's batch at {_n(ref)}.
{"**Flat**" if packets_flat else "**Not flat**"}: with {_n(big)} devices a device's datagram costs {rp['allowed']} × and a refused one
{rp['refused']} × what it costs with {_n(ref)} (target: flat; ≤ 1.1 read as flat). The two paths that do not enter
the device rules, measured the same way, give {rp['skip']} and {rp['no_passport']}: that spread is this machine's
noise. The device rules are a few hash lookups (the grant map, the verdict map, the profile chain's
destination sets) whatever the number of devices. On this machine the whole path costs about
{p[ref]['allowed'] / 1000:.0f} µs a datagram; the device rules' share, paired round by round, came out between
{min(p[n]['device_rules'] for n in sizes):,.0f} and {max(p[n]['device_rules'] for n in sizes):,.0f} ns over the sizes, with no trend: single rounds
differ by that much.

Checked after the run: {"every one of the " + f"{d['sent_to_master']:,}" + " datagrams sent to the master arrived there" if all_arrived else f"{d['arrived_at_master']:,} of {d['sent_to_master']:,} datagrams sent to the master arrived there"};
{"all " + f"{d['refused_sent']:,}" + " refused datagrams were counted in the router's breach set and none reached the master" if refused_ok else f"of {d['refused_sent']:,} refused datagrams the breach set counted {d['refused_counted_by_router']:,} and {d['no_port_at_master']:,} reached the master"}.

### Change cost, by devices on the agent

One agent-side change, {prm['reps']} times at each size: the kinds interleaved, the sizes taking turns in
five blocks. Milliseconds, median, the whole call (of it, nft transactions). The desired state is parsed
beforehand, as it arrives over the link.

- *add / remove a device*: `Baselines.apply` with N + 1 devices, then with N again;
- *FQDN answer changes*: the resolver's answer for `{UPDATES_FQDN}` changes (two addresses for two others),
  and the same desired state is applied again: one destination set rewritten, named by all three types;
- *grant opens / closes*: `Grants.reconcile` with one grant for the real device (ssh to `historian`: one
  map element with its timeout, its record written), then closed (the element removed, its connections
  read and flushed, its evidence written);
- *nothing changed*: the same desired state applied again, which is what every desired state costs the
  baseline when only lanes or grants change: planning only, no transaction.

| devices | add a device | remove a device | FQDN answer changes | grant opens | grant closes | nothing changed |
|---|---|---|---|---|---|---|
{ch_rows}
{ch_ratio}

- **Flat** ({_n(big)} / {_n(ref)} ≤ 1.5): {", ".join(CHANGE_LABELS[k] for k in flat) or "none"}.
  **Grows with the devices**: {", ".join(CHANGE_LABELS[k] for k in grows) or "none"}.
- *Planning a new desired state is O(N).* A device added or removed arrives as a new, complete desired
  state (level-triggered, as for lanes): `Baselines.apply` builds the model of every device and compares it
  with the one applied, about {plan_us} µs per device here (the "add a device" column's growth), while its
  nft transaction stays flat (below). Parsing that desired state costs more still (start-up table below). The
  same desired state applied again — every lane or grant change, every new DNS answer — skips the devices:
  "nothing changed" and "FQDN answer changes" do not grow.
- Grants do not depend on the devices: their records (fsync'd), evidence and conntrack dominate.

The same changes' nft transactions alone, built beforehand by the agent's own `baseline.diff` (and
`Firewall.grant_elements`) and sent back to back, {prm['reps']} times at each size, in the same blocks;
milliseconds, median:

| devices | add a device | remove a device | FQDN set rewritten | grant element added | grant element removed |
|---|---|---|---|---|---|
{k_rows}
{k_ratio}

{("Flat (≤ 1.5): " + ", ".join(KERNEL_LABELS[k] for k in k_flat) + ". ") if k_flat else ""}{("Grows: " + ", ".join(KERNEL_LABELS[k] for k in k_grows) + ". ") if k_grows else ""}Adding a device puts one
element into the `dev_type` data map (address → type id) and one into `dev_addr`: {km[ref]['add']} ms with {_n(ref)} devices,
{km[big]['add']} ms with {_n(big)}, {km[last]['add']} ms with {_n(last)}. Only the `type_chain` verdict map (one element per device
type) holds jumps: at each commit the kernel validates every jump element of a verdict map, which is why the
devices are not in one (an earlier layout mapped each device straight to a jump, and adding a device then
cost 0.34 → 0.76 → 1.18 ms at 10 → 5,000 → 10,000 devices). Deleting elements and rewriting a
set are not validated that way. Inside a whole apply, the same transaction for removing a device took
{c[ref]['remove']['nft_ms']} → {c[big]['remove']['nft_ms']} ms ({_n(ref)} → {_n(big)} devices); alone, {km[ref]['remove']} → {km[big]['remove']} ms: what
grows there comes with the planning around it, not from the transaction.

### Start-up: the first apply of every device

| devices | first apply, ms | of it nft | µs per device | parsing the baseline message, ms | message, KiB |
|---|---|---|---|---|---|
{st_rows}

Linear in the devices by nature (one map element and one set element each, in one transaction), and paid
when the agent starts or its table is replaced; medians of {prm['startup_reps']} runs.

Re-run: `make bench-baselines` (about {max(1, round(r['duration_s'] / 60))} min; `BENCH_BASELINES_ARGS="--sizes 10,5000"`
and the other options of `python -m bench.baselines --help`). `python -m bench.baselines --quick` is a smoke
run under a minute that prints its numbers and writes nothing; `--report-only` rewrites this section from
the JSON.
"""
    write_section(path, "baselines", text)
    raw = path.parent / "bench" / "baselines.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(_compact(json.dumps(_rounded(r), indent=1)) + "\n")


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def _compact(text: str) -> str:
    """Lists of numbers on one line each (every round's figures), the rest indented."""
    return re.sub(r"\[\s+([-0-9.,e\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


if __name__ == "__main__":
    sys.exit(main())
