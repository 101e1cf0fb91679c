"""Tearing a run down, from a live `Lab` or from a crashed run's registry record.

`teardown()` is called by `Lab.cleanup()` (with the Popen objects of its children) and by `sweep_stale()`
(with only the record). Every step is attempted even when an earlier one failed; problems are collected and
returned, never raised.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass, field

from . import procs, registry, uapi
from .layout import NETNS_RE
from .nsutil import ip_batch, list_netns, netns_id

log = logging.getLogger(__name__)

SPAWN_GRACE = 3.0  # seconds between SIGTERM and SIGKILL for processes the run spawned
NETNS_GRACE = 1.0  # ... and for anything else found inside its namespaces


@dataclass
class Report:
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def extend(self, result: tuple[list[str], list[str]]) -> None:
        self.actions += result[0]
        self.errors += result[1]


def teardown(
    record: registry.RunRecord,
    children: dict[int, subprocess.Popen] | None = None,
    protect: frozenset[tuple[int, int]] = frozenset(),
) -> Report:
    """Stop the run's processes and daemons, delete its namespaces, then its registry file.

    The registry file is kept if anything failed, so that a later sweep (once this process is gone) retries.
    """
    rep = Report()
    _step(rep, "stop spawned processes", lambda: _stop_spawned(record, children))
    _step(rep, "stop processes inside the namespaces", lambda: kill_netns_processes(record.namespaces))
    for prefix in record.uapi_prefixes:
        _step(rep, f"stop wireguard-go for {prefix}*", lambda p=prefix: uapi.stop_prefix(p, protect))
    _step(rep, "delete namespaces", lambda: delete_netns(record.namespaces))
    if rep.errors:
        rep.errors.append(f"kept {registry.path_for(record.run_id)} so that sweep_stale() can retry")
    elif registry.remove(record.run_id):
        rep.actions.append(f"removed registry file {registry.path_for(record.run_id)}")
    for err in rep.errors:
        log.warning("lab %s cleanup: %s", record.run_id, err)
    return rep


def sweep_stale() -> list[str]:
    """Clean up after crashed runs; return what was removed, human-readable.

    A run is stale when its owner process is gone (or its PID now belongs to a younger process). Namespaces
    named wkt-<run_id>-* without any registry file are orphans of a run that died while its registry was being
    removed, or was deleted by hand; they go too. Live runs are never touched.
    """
    removed: list[str] = []
    with registry.sweep_lock():
        # Namespaces first: a run registers before creating namespaces, so any namespace seen here whose run
        # has no registry file in the listing below is truly orphaned.
        namespaces = list_netns()
        records = registry.load_all()
        run_ids = {path.stem for path, _ in records}
        live = [r for _, r in records if r is not None and r.owner_alive()]
        protect = frozenset(i for r in live for i in map(netns_id, r.namespaces) if i is not None)
        for path, record in records:
            if record is None:
                log.warning("unreadable lab registry file %s: left alone", path)
            elif not record.owner_alive():
                rep = teardown(record, protect=protect)
                removed += [f"run {record.run_id}: {a}" for a in rep.actions]
                removed += [f"run {record.run_id}: FAILED: {e}" for e in rep.errors]
        orphans = [ns for ns in namespaces if (m := NETNS_RE.match(ns)) and m.group(1) not in run_ids]
        if orphans:
            rep = Report()
            _step(rep, "stop processes in orphan namespaces", lambda: kill_netns_processes(orphans))
            _step(rep, "delete orphan namespaces", lambda: delete_netns(orphans))
            removed += [f"orphan: {a}" for a in rep.actions] + [f"orphan: FAILED: {e}" for e in rep.errors]
        for tmp in registry.stale_tmp_files():
            tmp.unlink(missing_ok=True)
            removed.append(f"removed stale temporary file {tmp}")
    return removed


def kill_netns_processes(namespaces: list[str]) -> tuple[list[str], list[str]]:
    """SIGTERM, then SIGKILL, every process inside these namespaces (several rounds, in case they fork)."""
    ids = {i: ns for ns in namespaces if (i := netns_id(ns)) is not None}
    actions: list[str] = []
    errors: list[str] = []
    for _ in range(3):
        found = procs.pids_in_netns(set(ids))
        if not found:
            return actions, errors
        targets = [
            procs.Target(pid, procs.start_time(pid), f"{procs.comm(pid)} in {ids[ns]}")
            for pid, ns in found.items()
        ]
        done, failed = procs.terminate(targets, grace=NETNS_GRACE)
        actions += done
        errors += failed
    if procs.pids_in_netns(set(ids)):
        errors.append("processes keep appearing inside the lab namespaces")
    return actions, errors


def delete_netns(namespaces: list[str]) -> tuple[list[str], list[str]]:
    present = [ns for ns in namespaces if ns in set(list_netns())]
    if not present:
        return [], []
    try:
        ip_batch((f"netns del {ns}" for ns in present), force=True)
    except Exception as e:
        left = set(present) & set(list_netns())
        return [f"deleted namespace {ns}" for ns in present if ns not in left], [
            f"{e} (left: {sorted(left)})"
        ]
    return [f"deleted namespace {ns}" for ns in present], []


def _stop_spawned(record: registry.RunRecord, children) -> tuple[list[str], list[str]]:
    # No start time means the process was gone when recorded: without one its PID can't be trusted.
    targets = [
        procs.Target(s["pid"], s["start"], " ".join(s["argv"])[:60])
        for s in record.spawned
        if s["start"] is not None
    ]
    return procs.terminate(targets, grace=SPAWN_GRACE, children=children)


def _step(rep: Report, what: str, fn) -> None:
    try:
        rep.extend(fn())
    except Exception as e:
        rep.errors.append(f"{what}: {e!r}")
