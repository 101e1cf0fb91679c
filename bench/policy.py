"""Inventory import and policy evaluation, side by side in one run; results go to docs/bench/policy.json
and the policy section of docs/benchmarks.md (the other sections are kept: bench.report).

  python -m bench.policy [--reps 5] [--devices 10000] [--tasks 100] [--budget 170] [--no-postgres]

With the real controller code, in-process, on an initialised controller (as tests/controller makes one):
  1. CSV import of --devices passports (controller.devicecsv.import_devices): a file with ~20 bad rows
     (refused, and nothing written), a clean import, and an update-mode re-import of the same file (all
     unchanged); one clean import through the HTTP endpoint. On SQLite, and on PostgreSQL when
     WICKET_TEST_POSTGRES_URL is set (in a database of its own, wicket_b_…, dropped afterwards).
  2. decisions per second with a generated policy of --tasks tasks over the example's device types:
     the pure engine (controller.policy.evaluate) on prebuilt facts, and the controller's path
     (controller.decisions.Decisions.decide: database reads + engine); 1 000 vs --devices devices and
     10 vs --tasks tasks side by side, and where the path's time goes.
Bounded: once --budget seconds have passed, every measure stops after --min-reps repetitions.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import pstats
import random
import sqlite3
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.policy_report import TARGET_DPS, TARGET_IMPORT_S, report  # noqa: E402
from bench.policy_world import (  # noqa: E402
    Controller,
    bad_rows,
    device_rows,
    make_requests,
    pg_database,
    policy_files,
    to_csv,
)
from bench.report import write_section  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.policy")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--small-devices", type=int, default=1_000)
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--small-tasks", type=int, default=10)
    p.add_argument("--engine-decisions", type=int, default=2_000, help="per repetition")
    p.add_argument("--path-decisions", type=int, default=600, help="per repetition")
    p.add_argument("--budget", type=float, default=170.0, help="seconds")
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    p.add_argument("--report-only", action="store_true", help="rewrite the section from docs/bench/policy.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    raw = out.parent / "bench" / "policy.json"
    if args.report_only:
        write_section(out, "policy", report(json.loads(raw.read_text())))
        return 0
    results = run(args)
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1) + "\n")
    write_section(out, "policy", report(results))
    print(json.dumps(results["summary"], indent=1))
    print(f"[bench] written to {out} and {raw}")
    return 0


def run(args) -> dict:
    started = time.monotonic()
    budget = Budget(started + args.budget, args.reps, args.min_reps)
    if args.small_tasks < 5 or args.tasks <= args.small_tasks or args.small_devices >= args.devices:
        raise SystemExit("need 5 ≤ --small-tasks < --tasks and --small-devices < --devices")
    rows = device_rows(args.devices)
    text, small_text, bad_text = to_csv(rows), to_csv(rows[: args.small_devices]), to_csv(bad_rows(rows))
    files_big, files_small = policy_files(args.tasks), policy_files(args.small_tasks)
    results: dict = {"params": {k: v for k, v in vars(args).items() if k not in ("out", "report_only")},
                     "csv_bytes": len(text.encode()), "import": {}, "load_before": os.getloadavg()[0]}
    work = Workloads(rows, files_big, files_small, args)
    phases = results["phases_s"] = {}
    # Two controllers, so that the same requests can take turns on 1 000 and on 10 000 devices.
    with Controller() as small, Controller() as ctl:
        with _phase(phases, "sqlite_setup", started):
            small.populate(files_big)
            small.import_csv(small_text)
            ctl.populate(files_big)
        with _phase(phases, "sqlite_import", started):
            results["import"]["sqlite"] = bench_import(ctl, text, bad_text, args.devices, budget)
        work.bind(ctl.user_ids())
        with _phase(phases, "sqlite_decisions", started):
            results["decisions"] = {
                "path": work.path(budget, ctl, small), "engine": work.engine(budget, ctl), "breakdown": work.breakdown(ctl),
                "outcomes": work.outcomes(ctl), "agree": work.agreement(ctl), "queries_per_decision": work.queries_per_decision(ctl),
            }
            if results["decisions"]["path"]["headline"]["median_per_s"] < TARGET_DPS:
                results["decisions"]["profile"] = work.profile(ctl)
    with _phase(phases, "postgresql", started):
        results["import"]["postgresql"] = postgres(args, text, bad_text, work, budget)
    results["machine"] = machine(results["import"]["postgresql"].get("server"))
    results["load_after"] = os.getloadavg()[0]
    results["cpu_share"] = budget.cpu_share()
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["summary"] = summary(results)
    return results


# ---- what is measured ----


def bench_import(ctl: Controller, text: str, bad_text: str, n: int, budget: Budget) -> dict:
    """Refused file on an empty inventory, clean imports, update-mode re-imports, one HTTP import."""
    from controller.devicecsv import ImportRejected

    ctl.clear_devices()
    before = (ctl.device_count(), ctl.import_events())
    problems: list[int] = []

    def refused():
        try:
            ctl.import_csv(bad_text)
        except ImportRejected as exc:
            problems.append(len(exc.rows))
            return
        raise SystemExit("[bench] the file with bad rows was accepted")

    out = {"rejected": timings(budget.repeat(refused))}
    out["rejected"] |= {"problems": problems[-1], "nothing_written": (ctl.device_count(), ctl.import_events()) == before}
    created: list = []
    out["clean"] = timings(budget.repeat(lambda: created.append(ctl.import_csv(text)), before=ctl.clear_devices))
    updated: list = []
    out["update_unchanged"] = timings(budget.repeat(lambda: updated.append(ctl.import_csv(text, update=True))))
    out["clean"]["created"] = created[-1].created
    out["update_unchanged"] |= {"unchanged": updated[-1].unchanged, "updated": updated[-1].updated}
    if created[-1].created != n or ctl.device_count() != n:
        raise SystemExit(f"[bench] a clean import created {created[-1].created} devices, not {n}")
    ctl.clear_devices()
    seconds, body = ctl.http_import(text)
    out["http_clean_s"] = round(seconds, 3)
    if body.get("created") != n:
        raise SystemExit(f"[bench] the HTTP import answered {body}")
    out["rows_per_s"] = round(n / out["clean"]["median_s"])
    return out


class Workloads:
    """The request sets, and how each is decided: by the engine alone, or by a controller's path."""

    def __init__(self, rows: list[list[str]], files_big: dict, files_small: dict, args):
        from controller.policy import load_files

        self.rows, self.args = rows, args
        self.files_big, self.files_small = files_big, files_small
        self.policy_big, self.policy_small = load_files(files_big), load_files(files_small)

    def bind(self, users: dict[str, int]) -> None:
        """Draw the requests, for these user IDs (the same in every controller: made in the same order)."""
        rng, a, self.users = random.Random(20261125), self.args, users
        devices = [(r[0], r[1], r[2]) for r in self.rows]
        big, small = self.policy_big.document.tasks, self.policy_small.document.tasks
        self.requests = {
            # any device of the full inventory, any of the tasks
            "headline": make_requests(rng, users, devices, big, a.engine_decisions),
            # the same kind, on the first --small-devices devices only: valid in both controllers
            "small_devices": make_requests(rng, users, devices[: a.small_devices], big, a.engine_decisions),
            # tasks the small policy has too, so that the same requests can be decided under either policy
            "common_tasks": make_requests(rng, users, devices, small, a.engine_decisions),
        }

    def path(self, budget: Budget, ctl: Controller, small: Controller) -> dict:
        """The controller's path; the workloads take turns within each repetition. The task-count pair
        switches ctl's active policy before it runs (not timed)."""
        def run(c: Controller, name: str) -> Callable[[], object]:
            reqs, decide = self.requests[name][: self.args.path_decisions], c.decisions.decide
            return lambda: [decide(**r.call()) for r in reqs]

        def switch(files: dict) -> Callable[[], object]:
            def apply():
                ctl.apply(files, "bench: switch policy")
                ctl.policies.require_active()  # load the new version outside the timing
            return apply

        times = budget.rounds({
            "headline": run(ctl, "headline"),
            "devices_small": run(small, "small_devices"),
            "devices_full": run(ctl, "small_devices"),
            "tasks_small": (switch(self.files_small), run(ctl, "common_tasks")),
            "tasks_big": (switch(self.files_big), run(ctl, "common_tasks")),
        })
        return {k: rate(v, self.args.path_decisions) for k, v in times.items()}

    def engine(self, budget: Budget, ctl: Controller) -> dict:
        """Prebuilt facts, so only evaluate() is timed; the workloads take turns within each repetition."""
        from controller.policy import evaluate

        facts = {name: ctl.facts(reqs) for name, reqs in self.requests.items()}
        runs = {
            "headline": (self.policy_big, facts["headline"]),
            "devices_small": (self.policy_big, facts["small_devices"]),
            "tasks_big": (self.policy_big, facts["common_tasks"]),
            "tasks_small": (self.policy_small, facts["common_tasks"]),
        }
        times = budget.rounds({k: (lambda p=p, f=f: [evaluate(p, r) for r in f]) for k, (p, f) in runs.items()})
        return {k: rate(v, len(runs[k][1])) for k, v in times.items()}

    def breakdown(self, ctl: Controller) -> dict:
        """Where one decision's time goes on the controller's path: the active-policy check, the
        database reads (user, grants, device and site), the engine. Timed by wrapping the first and the
        last in place; the reads are what remains."""
        import controller.decisions as mod

        d, reqs = ctl.decisions, self.requests["headline"][: self.args.path_decisions]
        spent = {"active_policy": 0.0, "engine": 0.0}
        wrapped_store, wrapped_eval = d.policies.require_active, mod.evaluate

        def timed(key, fn):
            def inner(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    spent[key] += time.perf_counter() - t0
            return inner

        d.policies.require_active, mod.evaluate = timed("active_policy", wrapped_store), timed("engine", wrapped_eval)
        try:
            gc.collect()
            t0 = time.perf_counter()
            for r in reqs:
                d.decide(**r.call())
            total = time.perf_counter() - t0
        finally:
            del d.policies.require_active
            mod.evaluate = wrapped_eval
        us = {k: v * 1e6 / len(reqs) for k, v in spent.items()}
        us["database_reads"] = total * 1e6 / len(reqs) - us["active_policy"] - us["engine"]
        us["total"] = total * 1e6 / len(reqs)
        return {f"{k}_us": round(v, 1) for k, v in us.items()}

    def queries_per_decision(self, ctl: Controller) -> float:
        from sqlalchemy import event

        engine, count = ctl.app.state.engine, [0]

        def seen(*_a):
            count[0] += 1

        event.listen(engine, "before_cursor_execute", seen)
        try:
            reqs = self.requests["headline"][:200]
            for r in reqs:
                ctl.decisions.decide(**r.call())
        finally:
            event.remove(engine, "before_cursor_execute", seen)
        return round(count[0] / len(reqs), 2)

    def outcomes(self, ctl: Controller) -> dict:
        from controller.policy import evaluate

        decided = [evaluate(self.policy_big, r) for r in ctl.facts(self.requests["headline"])]
        first_failure = Counter(d.failed[0] for d in decided if d.failed)
        return {"outcome": dict(Counter(d.outcome for d in decided).most_common()),
                "first_failed_check": dict(first_failure.most_common()), "requests": len(decided)}

    def agreement(self, ctl: Controller) -> dict:
        """The path and the engine decide the same requests the same way (the path measured real work)."""
        from controller.policy import evaluate

        reqs = self.requests["headline"][:300]
        same = sum(ctl.decisions.decide(**r.call()).as_dict() == evaluate(self.policy_big, f).as_dict()
                   for r, f in zip(reqs, ctl.facts(reqs), strict=True))
        return {"requests": len(reqs), "identical": same}

    def profile(self, ctl: Controller) -> dict:
        """The path under cProfile: the functions that take the most time of their own."""
        reqs = self.requests["headline"][:500]
        prof = cProfile.Profile()
        prof.enable()
        for r in reqs:
            ctl.decisions.decide(**r.call())
        prof.disable()
        stats = pstats.Stats(prof).stats
        total = sum(v[2] for v in stats.values())
        buckets: Counter = Counter()
        for (filename, _line, _fn), v in stats.items():
            buckets[_bucket(filename)] += v[2]
        top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
        return {
            "decisions": len(reqs),
            "share_by_area": {k: round(v / total, 3) for k, v in buckets.most_common()},
            "top_own_time": [{"function": f"{_short(fn)}:{line}({name})", "calls_per_decision": round(v[1] / len(reqs), 1),
                              "own_share": round(v[2] / total, 3)} for (fn, line, name), v in top],
        }


def postgres(args, text: str, bad_text: str, work: Workloads, budget: Budget) -> dict:
    base = os.environ.get("WICKET_TEST_POSTGRES_URL")
    if args.no_postgres or not base:
        why = "--no-postgres" if args.no_postgres else "WICKET_TEST_POSTGRES_URL is not set"
        print(f"[bench] PostgreSQL skipped: {why}", flush=True)
        return {"skipped": why}
    budget.phase = "postgresql"
    with pg_database(base) as url, Controller(url) as ctl:
        ctl.populate(work.files_big)
        out = bench_import(ctl, text, bad_text, args.devices, budget)
        if ctl.user_ids() != work.users:
            raise SystemExit("[bench] PostgreSQL gave the users other IDs than SQLite")
        # The imports above deleted and rewrote the inventory several times: let the clean-up autovacuum
        # would start within a minute run now, not in the middle of the timed decisions.
        from sqlalchemy import text as sql

        with ctl.app.state.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sql("VACUUM ANALYZE"))
        reqs, decide = work.requests["headline"][: args.path_decisions], ctl.decisions.decide
        out["path_headline"] = rate(budget.repeat(lambda: [decide(**r.call()) for r in reqs]), len(reqs))
        out["server"] = ctl.server_version()
        return out


# ---- timing ----


class Budget:
    """Repetitions, stopped early (after `min_reps`) once the deadline has passed. Also sums, per phase,
    this process's CPU time over the wall time of what it timed: near 1.0 on SQLite when the bench had a
    core to itself, lower when other work on the machine took turns with it."""

    def __init__(self, deadline: float, reps: int, min_reps: int):
        self.deadline, self.reps, self.min_reps = deadline, reps, min(min_reps, reps)
        self.phase, self.spent = "sqlite", {}

    def cpu_share(self) -> dict[str, float]:
        return {phase: round(cpu / wall, 2) for phase, (cpu, wall) in self.spent.items()}

    def _timed(self, fn: Callable[[], object]) -> float:
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        before = self.spent.get(self.phase, (0.0, 0.0))
        self.spent[self.phase] = (before[0] + cpu, before[1] + wall)
        return wall

    def _go_on(self, done: int) -> bool:
        return done < self.reps and (done < self.min_reps or time.monotonic() < self.deadline)

    def repeat(self, fn: Callable[[], object], before: Callable[[], object] | None = None) -> list[float]:
        times: list[float] = []
        while self._go_on(len(times)):
            if before:
                before()
            times.append(self._timed(fn))
        return times

    def rounds(self, fns: dict[str, Callable | tuple[Callable, Callable]]) -> dict[str, list[float]]:
        """Each repetition runs every workload once, in turn, so drift hits them alike. A workload given
        as (before, fn) has `before` run untimed first."""
        times: dict[str, list[float]] = {k: [] for k in fns}
        done = 0
        while self._go_on(done):
            for k, fn in fns.items():
                if isinstance(fn, tuple):
                    fn[0]()
                    fn = fn[1]
                times[k].append(self._timed(fn))
            done += 1
        return times


def timings(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}


def rate(times: list[float], count: int) -> dict:
    per_s = [count / t for t in times]
    return {"median_per_s": round(statistics.median(per_s)), "runs_per_s": [round(x) for x in per_s],
            "decisions_per_run": count, "median_us": round(1e6 / statistics.median(per_s), 1)}


def machine(pg_server: str | None) -> dict:
    import pydantic
    import sqlalchemy

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "postgresql": pg_server, "sqlalchemy": sqlalchemy.__version__,
            "pydantic": pydantic.VERSION, "date": datetime.now(UTC).isoformat(timespec="seconds")}


def summary(r: dict) -> dict:
    d, imp = r["decisions"], r["import"]
    path, engine = d["path"], d["engine"]
    sqlite_clean = imp["sqlite"]["clean"]["median_s"]
    pg = imp["postgresql"]
    return {
        "engine_per_s": engine["headline"]["median_per_s"],
        "engine_vs_target": round(engine["headline"]["median_per_s"] / TARGET_DPS, 2),
        "path_per_s": path["headline"]["median_per_s"],
        "path_vs_target": round(path["headline"]["median_per_s"] / TARGET_DPS, 2),
        "path_devices_full_vs_small": round(path["devices_full"]["median_us"] / path["devices_small"]["median_us"], 2),
        "path_tasks_big_vs_small": round(path["tasks_big"]["median_us"] / path["tasks_small"]["median_us"], 2),
        "engine_tasks_big_vs_small": round(engine["tasks_big"]["median_us"] / engine["tasks_small"]["median_us"], 2),
        "import_clean_s": {"sqlite": sqlite_clean, "postgresql": pg.get("clean", {}).get("median_s")},
        "import_rejected_s": {"sqlite": imp["sqlite"]["rejected"]["median_s"], "postgresql": pg.get("rejected", {}).get("median_s")},
        "import_update_s": {"sqlite": imp["sqlite"]["update_unchanged"]["median_s"],
                            "postgresql": pg.get("update_unchanged", {}).get("median_s")},
        "nothing_written_on_rejection": all(x["rejected"]["nothing_written"] for x in (imp["sqlite"], pg) if "rejected" in x),
        "targets_met": {"import": all(x["clean"]["median_s"] <= TARGET_IMPORT_S for x in (imp["sqlite"], pg) if "clean" in x),
                        "engine": engine["headline"]["median_per_s"] >= TARGET_DPS,
                        "path": path["headline"]["median_per_s"] >= TARGET_DPS},
    }


# ---- helpers ----


@contextmanager
def _phase(phases: dict, name: str, started: float):
    print(f"[bench] {time.monotonic() - started:5.1f} s  {name.replace('_', ' ')}", flush=True)
    t0 = time.monotonic()
    yield
    phases[name] = round(time.monotonic() - t0, 1)


def _bucket(filename: str) -> str:
    if "/controller/policy/" in filename:
        return "policy engine"
    if "/controller/" in filename:
        return "controller (decisions, policy store, models)"
    for name in ("sqlalchemy", "pydantic", "psycopg", "sqlite3", "zoneinfo", "ipaddress"):
        if f"/{name}/" in filename or filename.endswith(f"/{name}.py"):
            return name
    if filename == "~":
        return "built-ins (sqlite3 C calls, str, dict)"
    return "other Python"


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("controller", "sqlalchemy", "pydantic", "psycopg"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor):])
    return Path(filename).name


if __name__ == "__main__":
    sys.exit(main())
