"""A reusable network-namespace lab: a fake utility site (edge router, field devices, SCADA masters,
engineers) on one machine, for tests, benchmarks and the demo. Needs root.

    from tests.lab import Lab, sweep_stale

    with Lab() as lab:                    # builds on enter, always cleans up on exit
        assert lab.ping("rtu1", lab.addr("scada"))

All traffic stays inside the lab's namespaces (documentation ranges only); the root namespace is never given
addresses, routes or interfaces. `python -m tests.lab sweep|shell` for debugging.

Modules: topology (Lab), layout (names, addresses), build (creating), cleanup (teardown, sweep_stale),
registry (/run/wicket-lab records), procs, uapi, guard (signals/atexit), nsutil, probe, preflight.
"""

from .cleanup import sweep_stale
from .guard import LabTerminated
from .layout import Host
from .nsutil import LabError
from .preflight import unavailable_reason
from .topology import Lab

__all__ = ["Lab", "Host", "LabError", "LabTerminated", "sweep_stale", "unavailable_reason"]
