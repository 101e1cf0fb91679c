"""Shared pytest fixtures and hooks, grouped by the part of the test suite that owns them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# `tests.lab` must import the same way under `python -m pytest` and plain `pytest`.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


# ---------------------------------------------------------------------------------------------------------------
# Network-namespace lab (tests/lab): sweep crashed runs at session start; `lab` builds a default site per test.
# ---------------------------------------------------------------------------------------------------------------


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() != 0:
        return
    from tests.lab import sweep_stale

    try:
        removed = ["swept leftovers of crashed lab runs:", *sweep_stale()]
    except Exception as e:  # a broken sweep must not stop unrelated tests from running
        removed = [f"WARNING: sweeping stale lab runs failed: {e!r}", ""]
    if len(removed) > 1:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for line in removed:
            reporter.write_line(line) if reporter else print(line)


@pytest.fixture
def lab():
    """A built default `tests.lab.Lab` (rtr; rtu1, rtu2; scada; eng1, eng2), torn down after the test.

    Skips when not root or when ip/wireguard-go/nft are missing; fails the test at teardown if cleanup left
    anything behind."""
    yield from _built_lab()


@pytest.fixture
def product_lab():
    """The default lab plus `ctl`, the controller's own host on the operations segment."""
    yield from _built_lab(masters=("scada", "ctl"))


def _built_lab(**kw):
    from tests.lab import Lab, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Lab(**kw) as built:
        yield built
    if built.cleanup_errors:
        pytest.fail(
            f"lab {built.run_id} cleanup incomplete: {'; '.join(built.cleanup_errors)}", pytrace=False
        )


# ---------------------------------------------------------------------------------------------------------------
# Kernel tests: throwaway named namespaces ("wkt-k<rand>-<role>", swept like lab runs if a run crashes).
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ns():
    from tests.kernelns import Namespaces

    spaces = Namespaces()
    try:
        yield spaces
    finally:
        spaces.cleanup()


@pytest.fixture
def inside(ns):
    """Run the test body with this thread inside a fresh namespace."""
    from nodeagent import netns

    name = ns.add("a")
    fd = ns.fd(name)
    try:
        with netns.entered(fd):
            yield name
    finally:
        os.close(fd)
