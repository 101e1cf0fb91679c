"""The run registry: one JSON file per live lab in /run/wicket-lab/, so a crashed run can be swept later.

`topology.Lab` writes its record before creating the first namespace and rewrites it as it spawns processes
or registers UAPI prefixes; `cleanup.teardown` deletes it last; `cleanup.sweep_stale` reads all of them and
tears down the runs whose owner process is gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import procs

REGISTRY_DIR = Path("/run/wicket-lab")


@dataclass
class RunRecord:
    run_id: str
    owner_pid: int
    owner_start: int
    namespaces: list[str] = field(default_factory=list)
    spawned: list[dict] = field(default_factory=list)  # {"pid", "start", "netns", "argv"}
    uapi_prefixes: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    @classmethod
    def for_current_process(cls, run_id: str) -> RunRecord:
        pid = os.getpid()
        start = procs.start_time(pid)
        assert start is not None
        return cls(run_id=run_id, owner_pid=pid, owner_start=start)

    def owner_alive(self) -> bool:
        return procs.is_alive(self.owner_pid, self.owner_start)


def path_for(run_id: str) -> Path:
    return REGISTRY_DIR / f"{run_id}.json"


def ensure_dir() -> Path:
    REGISTRY_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(REGISTRY_DIR, 0o700)
    return REGISTRY_DIR


def create(record: RunRecord) -> None:
    """Write a new record; FileExistsError if that run id is already registered (it is someone else's)."""
    tmp = _write_tmp(record)
    try:
        os.link(tmp, path_for(record.run_id))  # atomic and exclusive, unlike open(O_EXCL) + write
    finally:
        os.unlink(tmp)


def save(record: RunRecord) -> None:
    os.replace(_write_tmp(record), path_for(record.run_id))


def remove(run_id: str) -> bool:
    try:
        path_for(run_id).unlink()
        return True
    except FileNotFoundError:
        return False


def load(path: Path) -> RunRecord:
    with open(path) as f:
        return RunRecord(**json.load(f))


def registered_run_ids() -> set[str]:
    try:
        return {p.stem for p in REGISTRY_DIR.glob("*.json")}
    except OSError:
        return set()


def load_all() -> list[tuple[Path, RunRecord | None]]:
    """Every registry file with its record, or None where it can't be parsed."""
    out: list[tuple[Path, RunRecord | None]] = []
    for path in sorted(REGISTRY_DIR.glob("*.json")):
        try:
            out.append((path, load(path)))
        except (OSError, ValueError, TypeError):
            out.append((path, None))
    return out


def stale_tmp_files() -> list[Path]:
    """Temporary files of writers that died mid-write (named .<run_id>.<pid>.tmp)."""
    stale = []
    for path in REGISTRY_DIR.glob(".*.tmp"):
        parts = path.name.split(".")
        if len(parts) == 4 and parts[2].isdigit() and not procs.is_alive(int(parts[2])):
            stale.append(path)
    return stale


@contextmanager
def sweep_lock() -> Iterator[None]:
    """Serialise sweepers (e.g. two pytest sessions starting at once) so they don't race on the same run."""
    ensure_dir()
    fd = os.open(REGISTRY_DIR / ".sweep.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_tmp(record: RunRecord) -> Path:
    ensure_dir()
    tmp = REGISTRY_DIR / f".{record.run_id}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(record), f, indent=1)
        f.write("\n")
    return tmp
