"""The scratch-database sweep: a dead run's databases go, a live run's stay."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from ..pgscratch import scratch_database, sweep


def _admin_url() -> str:
    base = os.environ.get("WICKET_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("no PostgreSQL: set WICKET_TEST_POSTGRES_URL (`make test` starts one and sets it)")
    return base.replace("postgresql+psycopg://", "postgresql://")


def _names(conn, prefix: str) -> set[str]:
    return {n for (n,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix.replace("_", r"\_") + r"\_%",))}


def test_a_dead_runs_databases_are_swept_and_a_live_runs_kept():
    admin_url, prefix = _admin_url(), f"wicket_s{os.getpid()}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid, live_pid = int(dead.stdout), os.getppid()
    names = {"dead": f"{prefix}_{dead_pid}_00aa", "live": f"{prefix}_{live_pid}_00bb", "unowned": f"{prefix}_00cc"}
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            assert sorted(sweep(conn, prefix)) == sorted([names["dead"], names["unowned"]])
            assert _names(conn, prefix) == {names["live"]}
        finally:
            for name in names.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    base = os.environ["WICKET_TEST_POSTGRES_URL"]
    with scratch_database(base, prefix) as url:
        made = url.rsplit("/", 1)[1]
        assert made.startswith(f"{prefix}_{os.getpid()}_")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            assert made in _names(conn, prefix)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        assert _names(conn, prefix) == set()
