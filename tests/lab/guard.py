"""Making sure a live lab is cleaned up however its process ends. Used by `topology.Lab` only.

- SIGTERM: while any lab is up, a handler raises `LabTerminated` (a KeyboardInterrupt) in the main thread, so
  `with Lab()` blocks and pytest fixtures unwind as on Ctrl-C. The previous handler is restored afterwards.
- atexit: labs still up at interpreter exit are cleaned up as a last resort.
- fork: a forked child forgets its parent's labs, so its exit can't tear down the parent's site.
- SIGKILL can't be caught: `cleanup.sweep_stale()` handles that later from the registry.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_live: dict[int, Any] = {}  # id(lab) -> Lab
_owner = os.getpid()
_prev_sigterm: Any = None
_sigterm_installed = False


class LabTerminated(KeyboardInterrupt):
    """Raised in the main thread when the process gets SIGTERM while a lab is up."""


def track(lab: Any) -> None:
    global _prev_sigterm, _sigterm_installed
    _live[id(lab)] = lab
    if not _sigterm_installed and _in_main_thread():
        _prev_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True


def untrack(lab: Any) -> None:
    global _sigterm_installed
    _live.pop(id(lab), None)
    if not _live and _sigterm_installed and _in_main_thread():
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            # None means the old handler was not set from Python; the default is the closest we can restore.
            signal.signal(signal.SIGTERM, _prev_sigterm if _prev_sigterm is not None else signal.SIG_DFL)
        _sigterm_installed = False


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while cleaning up, then raise for them: a second Ctrl-C must not leave half a lab."""
    if not _in_main_thread():
        yield
        return
    got: list[int] = []
    old = {sig: signal.signal(sig, lambda s, _f: got.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if signal.SIGTERM in got:
        raise LabTerminated("SIGTERM received during lab cleanup")
    if signal.SIGINT in got:
        raise KeyboardInterrupt


def _on_sigterm(signum: int, frame: Any) -> None:
    raise LabTerminated("SIGTERM: tearing down the network lab")


def _at_exit() -> None:
    if os.getpid() != _owner:
        return
    for lab in list(_live.values()):
        try:
            lab.cleanup()
        except BaseException as e:  # nothing left to propagate to at interpreter exit
            log.error("lab %s: cleanup at exit failed: %r", getattr(lab, "run_id", "?"), e)


def _forget_after_fork() -> None:
    global _owner, _sigterm_installed
    _live.clear()
    _owner = os.getpid()
    _sigterm_installed = False


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_forget_after_fork)
