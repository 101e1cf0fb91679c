"""Seed the controller VM with the namespace lab's site, once, before the service first starts.

It is the lab's own set-up, `tests.lab.controller.LabController.setup()` (the code behind `wicket-controller
init` and the API): the first administrator root, the lab policy, site north-1 with the router's public
address, RTU-17 at the RTU VM's address, the approver alex and the engineer erin, each with TOTP. The
addresses come from vagrant/lab.json instead of a namespace lab. It then writes the service's settings
(WICKET_* lines for /etc/wicket/controller.env) and one file per person (password, TOTP secret; 0600) for
the lab's scripted CLI use (vagrant/people.py).

  python -m vagrant.seed --data-dir /var/lib/wicket-controller --people-dir DIR --env-file FILE [--session-s 300]

Exit 0 when seeded now or already (the database exists: nothing is changed), 1 on failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import labplan
from .people import Account, write_private

LAB_SESSION_S = 300  # the lab tasks' default session length: long enough for a person at a VM's shell


class LabSite:
    """What LabController asks of a namespace lab, answered from lab.json."""

    def __init__(self, lab: dict):
        self.lab = lab

    def addr(self, role: str) -> str:
        return self.lab["machines"][role]["address"]

    @property
    def router_wan(self) -> str:
        return self.lab["site"]["endpoint"]


def seed(lab: dict, data_dir: Path, people_dir: Path, env_file: Path, session_s: int = LAB_SESSION_S) -> bool:
    """True when seeded now, False when the database was there already."""
    from tests.lab.controller import PASSWORD, LabController

    if (Path(data_dir) / "controller.db").exists():
        if not (Path(people_dir) / "root.json").exists():
            raise SystemExit(f"{data_dir}/controller.db exists but {people_dir}/root.json does not: a seeding run "
                             f"broke off. Remove {data_dir} and provision the controller VM again")
        return False
    # The settings' defaults for the link and the session clock, as `make demo` runs them.
    ctl = LabController(LabSite(lab), data_dir, engineers=1, default_s=session_s, heartbeat_s=10, ack_timeout_s=10,
                        tick_ms=1000, role=lab["controller"]["machine"])
    try:
        ctl.setup()
        for name, person in ctl.people.items():
            Account(Path(people_dir) / f"{name}.json", person, PASSWORD).save()
        write_private(env_file, "".join(f"{k}={v}\n" for k, v in service_env(ctl.env).items()))
    finally:
        if ctl.app is not None:
            ctl.app.state.engine.dispose()
    return True


def service_env(lab_env: dict[str, str]) -> dict[str, str]:
    """The namespace lab's controller settings, for the service behind nginx (TLS, one proxy)."""
    env = {k: v for k, v in lab_env.items() if k != "WICKET_COOKIE_SECURE"}
    env["WICKET_TRUST_FORWARDED_FOR"] = "true"
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vagrant.seed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--people-dir", type=Path, required=True)
    p.add_argument("--env-file", type=Path, required=True)
    p.add_argument("--session-s", type=int, default=LAB_SESSION_S)
    args = p.parse_args(argv)
    if seed(labplan.load(), args.data_dir, args.people_dir, args.env_file, args.session_s):
        print(f"seeded the controller in {args.data_dir}; people in {args.people_dir}; settings in {args.env_file}")
    else:
        print(f"{args.data_dir}/controller.db exists: already seeded, nothing changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
