"""Debugging helpers, run as root from the repository root:

python -m tests.lab sweep    # clean up after crashed lab runs, print what was removed
python -m tests.lab shell    # build a lab, print its namespaces and addresses, clean up on Enter/Ctrl-C
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import Lab, sweep_stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("sweep", help="remove leftovers of crashed lab runs")
    shell = sub.add_parser("shell", help="build a lab and keep it up until Enter or Ctrl-C")
    shell.add_argument("--devices", default="rtu1,rtu2", help="comma-separated device roles")
    shell.add_argument("--masters", default="scada", help="comma-separated master roles")
    shell.add_argument("--engineers", default="eng1,eng2", help="comma-separated engineer roles")
    shell.add_argument("--run-id", default=None)
    shell.add_argument("--ipv6", action="store_true")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("the lab needs root")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "sweep":
        removed = sweep_stale()
        print("\n".join(removed) if removed else "nothing to sweep")
        return 0
    roles = {
        k: tuple(r for r in getattr(args, k).split(",") if r) for k in ("devices", "masters", "engineers")
    }
    with Lab(**roles, run_id=args.run_id, ipv6=args.ipv6) as lab:
        _describe(lab)
        try:
            input("\nlab is up; press Enter (or Ctrl-C) to tear it down ")
        except (KeyboardInterrupt, EOFError):
            print()
    print(
        f"cleaned up in {lab.cleanup_seconds:.3f} s"
        + (f"; PROBLEMS: {lab.cleanup_errors}" if lab.cleanup_errors else "")
    )
    return 1 if lab.cleanup_errors else 0


def _describe(lab: Lab) -> None:
    print(f"lab {lab.run_id} (agent tag {lab.agent_tag}) built in {lab.build_seconds:.3f} s")
    for h in lab.hosts.values():
        v6 = f"  {h.address6}" if h.address6 else ""
        via = f"  via {h.gateway}" if h.gateway else ""
        print(f"  {h.role:<10} {h.netns:<24} {h.address:<15}{v6}{via}")
    print(f"  router: wan0 {lab.router_wan}  lan0 {lab.router_lan}  ops0 {lab.router_ops}")
    print(f"enter one with: ip netns exec {lab.ns('rtr')} bash")


if __name__ == "__main__":
    sys.exit(main())
