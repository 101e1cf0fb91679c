"""Audit append throughput: records a second the controller seals into the chain, on its embedded SQLite
(WAL, synchronous=FULL, as the controller opens it) and, when WICKET_TEST_POSTGRES_URL is set, on
PostgreSQL. Results go to docs/bench/audit_append.json and the audit-append section of docs/benchmarks.md.

  python -m bench.audit_append [--seconds 5] [--runs 3] [--no-write]

Each run appends for --seconds through `controller.events.record`, the path every action takes, with a
body the size of a typical session record (about 600 bytes). Shapes, side by side in one run:
  - one record per transaction, one writer (an API action at a time);
  - one record per transaction, four writers (concurrent actions: the head row serialises them);
  - ten records per transaction, one writer (an action that writes several, or a burst);
  - the same one-per-transaction load into a plain table with no chain (what the chain costs).
Medians of --runs; the ratio chain / plain is taken from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import text  # noqa: E402

from bench.report import write_section  # noqa: E402
from controller import events  # noqa: E402
from controller.db import make_engine, migrate, session_factory, transaction  # noqa: E402

TARGET_PER_S = 2000
BODY = {"session_id": "s-abcdefghijkm", "user": "erin", "device": "RTU-17", "site": "north-1", "task": "iec104-diagnostics",
        "break_glass": False, "policy_version": "sha256:" + "ab" * 32, "state": "active", "node": "edge-north-1",
        "tunnel_address": "100.64.9.2", "listen_port": 51000, "key_mode": "minted", "end_at": "2026-11-26T12:30:00Z",
        "decision": {"outcome": "allow", "rule": "tasks.iec104-diagnostics", "trace": ["role engineer at north-1",
                     "device type substation-rtu", "protocol iec104 on tcp/2404", "within the task's window",
                     "no approval needed", "duration 30m ≤ 1h"]}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.audit_append")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    results = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine(), "seconds": args.seconds,
               "runs": args.runs, "target_per_s": TARGET_PER_S, "databases": {}}
    urls = {"sqlite": None}
    if os.environ.get("WICKET_TEST_POSTGRES_URL"):
        urls["postgresql"] = os.environ["WICKET_TEST_POSTGRES_URL"]
    for name, base in urls.items():
        results["databases"][name] = _database(name, base, args.seconds, args.runs)
        print(json.dumps({name: results["databases"][name]}, indent=1))
    if not args.no_write:
        out = Path(args.out)
        raw = out.parent / "bench" / "audit_append.json"
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(results, indent=1) + "\n")
        write_section(out, "audit-append", report(results))
    return 0


def _database(name: str, base: str | None, seconds: float, runs: int) -> dict:
    shapes = {"one_per_tx": (1, 1), "one_per_tx_4_writers": (4, 1), "ten_per_tx": (1, 10)}
    rates: dict[str, list[float]] = {k: [] for k in [*shapes, "plain_one_per_tx", "ratio_chain_to_plain"]}
    for _ in range(runs):
        with _scratch(name, base) as url:
            engine = make_engine(url)
            migrate(engine)
            factory = session_factory(engine)
            key = "INTEGER PRIMARY KEY" if name == "sqlite" else "SERIAL PRIMARY KEY"
            with engine.begin() as conn:
                conn.execute(text(f"CREATE TABLE plain_events (id {key}, at TEXT, body TEXT)"))
            for shape, (writers, per_tx) in shapes.items():
                rates[shape].append(_append(factory, writers, per_tx, seconds))
            plain = _plain(engine, seconds)
            rates["plain_one_per_tx"].append(plain)
            rates["ratio_chain_to_plain"].append(rates["one_per_tx"][-1] / plain)
            _check(factory)
            engine.dispose()
    return {k: round(statistics.median(v), 3 if k.startswith("ratio") else 0) for k, v in rates.items()} | \
        {"all": {k: [round(x, 3) for x in v] for k, v in rates.items()}}


def _append(factory, writers: int, per_tx: int, seconds: float) -> float:
    counts = [0] * writers
    deadline = time.monotonic() + seconds

    def work(i: int) -> None:
        while time.monotonic() < deadline:
            with transaction(factory) as s:
                for _ in range(per_tx):
                    events.record(s, category="session", type="session.activate", result="success", actor="erin",
                                  subject="s-abcdefghijkm", source="198.51.100.7", **BODY)
            counts[i] += per_tx

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def _plain(engine, seconds: float) -> float:
    body = json.dumps(BODY)
    n, deadline, started = 0, time.monotonic() + seconds, time.monotonic()
    while time.monotonic() < deadline:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO plain_events (at, body) VALUES (:at, :body)"),
                         {"at": datetime.now(UTC).isoformat(), "body": body})
        n += 1
    return n / (time.monotonic() - started)


def _check(factory) -> None:
    """The chain the benchmark wrote must verify: a fast append that breaks the chain is no result."""
    from sqlalchemy import select

    from controller.audit import verify
    from controller.audit.chain import head
    from controller.models import Event

    with factory() as s:
        rows = s.execute(select(Event.seq, Event.hash, Event.line, Event.leaf, Event.prev_hash).order_by(Event.seq))
        report = verify.verify_records(rows, expected_head=head(factory))
    if not report.ok:
        raise SystemExit(f"the benchmark's chain does not verify: {report.problems[0]}")


class _scratch:
    def __init__(self, name: str, base: str | None):
        self.name, self.base = name, base

    def __enter__(self) -> str:
        if self.name == "sqlite":
            self.dir = tempfile.TemporaryDirectory(prefix="wicket-bench-audit-")
            return f"sqlite:///{self.dir.name}/controller.db"
        from tests.pgscratch import scratch_database

        self.cm = scratch_database(self.base, "wicket_b")
        return self.cm.__enter__()

    def __exit__(self, *exc) -> None:
        if self.name == "sqlite":
            self.dir.cleanup()
        else:
            self.cm.__exit__(*exc)


def report(r: dict) -> str:
    lines = ["## Audit append throughput", "",
             f"`make bench-audit` (bench/audit_append.py), {r['when']}, {r['machine']}. Records appended through "
             f"`controller.events.record` for {r['seconds']:g} s per shape, median of {r['runs']} runs; "
             f"target ≥ {r['target_per_s']} records/s on SQLite.", "",
             "| database | 1 per transaction | 1 per transaction, 4 writers | 10 per transaction | plain insert, no chain | chain ÷ plain |",
             "|---|---|---|---|---|---|"]
    for name, d in r["databases"].items():
        lines.append(f"| {name} | {d['one_per_tx']:,.0f}/s | {d['one_per_tx_4_writers']:,.0f}/s | {d['ten_per_tx']:,.0f}/s | "
                     f"{d['plain_one_per_tx']:,.0f}/s | {d['ratio_chain_to_plain']:.2f} |")
    sqlite = r["databases"]["sqlite"]
    met = sqlite["one_per_tx"] >= r["target_per_s"]
    batched = sqlite["ten_per_tx"] >= r["target_per_s"]
    lines += ["", f"Target {'met' if met else 'not met'} with one record per transaction on SQLite "
              f"({sqlite['one_per_tx']:,.0f}/s); {'met' if batched else 'not met'} with ten per transaction "
              f"({sqlite['ten_per_tx']:,.0f}/s). Every transaction is flushed to disk (synchronous=FULL), so a record "
              "the API acknowledged survives a power cut: one-at-a-time appends are bound by the disk's flush "
              f"latency — a bare one-row insert, no ORM and no chain, manages {sqlite['plain_one_per_tx']:,.0f}/s here — "
              "and records that share a transaction share its flush. More writers do not help: SQLite takes one "
              "writer at a time, and on PostgreSQL the chain's head row does the same. Each run's chain is "
              "verified afterwards."]
    return "\n".join(lines)


def _machine() -> str:
    return f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform(terse=True)}"


if __name__ == "__main__":
    sys.exit(main())
