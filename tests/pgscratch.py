"""Scratch PostgreSQL databases for tests and benchmarks: one per use, named after the process that
made it (`<prefix>_<pid>_<random>`), dropped when done; a process that died before it could drop its
own leaves them behind, and the next use sweeps them (a live process's databases are left alone)."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


@contextmanager
def scratch_database(base: str, prefix: str) -> Iterator[str]:
    """A new empty database on the server of `base` (a SQLAlchemy URL); yields its URL, drops it after."""
    admin_url = base.replace("postgresql+psycopg://", "postgresql://")
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        sweep(conn, prefix)
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            _drop(conn, name)


def sweep(conn: psycopg.Connection, prefix: str) -> list[str]:
    """Drop `prefix` databases whose process is gone, and those from before names carried one."""
    owned = re.compile(rf"^{re.escape(prefix)}_(\d+)_[0-9a-f]+$")
    dropped = []
    like = prefix.replace("_", r"\_") + r"\_%"
    for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (like,)).fetchall():
        match = owned.match(name)
        if match and _alive(int(match.group(1))):
            continue
        _drop(conn, name)
        dropped.append(name)
    return dropped


def _drop(conn: psycopg.Connection, name: str, attempts: int = 100) -> None:
    """DROP … WITH (FORCE) ends our own leftover connections, but may not end an autovacuum worker
    (the server's, not ours) that has just started on the database: wait for it to finish."""
    for attempt in range(attempts):
        try:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.errors.InsufficientPrivilege:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
