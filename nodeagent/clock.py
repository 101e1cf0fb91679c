"""Time for the agent: a monotonic clock for deadlines, the wall clock only for records.

Deadlines live on CLOCK_BOOTTIME: it never steps when someone sets the date, and it keeps counting
through suspend. `boot_id` tells a persisted deadline from a previous boot, where it means nothing.
"""

from __future__ import annotations

import ctypes
import time
from datetime import datetime

STA_UNSYNC = 0x0040
TIME_ERROR = 5


class Clock:
    def mono(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def wall(self) -> float:
        return time.time()

    def boot_id(self) -> str:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()

    def deadline_for(self, end: datetime) -> float:
        """The monotonic instant of a wall-clock end time, as seen from now."""
        return self.mono() + (end.timestamp() - self.wall())


class _Timex(ctypes.Structure):
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


def clock_synchronized() -> tuple[bool, str]:
    """Whether the kernel considers the clock disciplined (NTP/chrony/PTP), as adjtimex(2) reports."""
    tx = _Timex()
    state = ctypes.CDLL(None, use_errno=True).adjtimex(ctypes.byref(tx))
    if state == -1:
        return False, "adjtimex failed"
    if state == TIME_ERROR or tx.status & STA_UNSYNC:
        return False, f"kernel reports the clock unsynchronised (maxerror {tx.maxerror} µs)"
    return True, f"synchronised (maxerror {tx.maxerror} µs, esterror {tx.esterror} µs)"
