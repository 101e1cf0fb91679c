"""On the controller VM: the lab's people at the real `wicket` CLI, over the API on loopback.

  python -m vagrant.ctl token              root makes a join token for the router (`wicket sites join-token`)
                                           and seals it for the router VM
  python -m vagrant.ctl engineer-bundle    seal erin's login, the API address and its CA for the engineer VM
  python -m vagrant.ctl approve [SESSION]  alex approves the waiting requests (all, or one)
  python -m vagrant.ctl as [--step-up] NAME ARGS…   any `wicket` command as root, alex or erin; --step-up
                                           adds --totp with a fresh code, for commands that change things

provision/controller.sh installs these as wicket-lab-token, wicket-lab-approve and wicket-lab-as.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import handoff, labplan
from .people import Account, LabCliError, WicketCli

PEOPLE_DIR = Path("/var/lib/wicket-lab/people")  # and each person's `wicket` login state in ../cli/NAME
LOCAL_API = "http://127.0.0.1:8443"  # the service's own address (its unit file); plain http only on loopback
API_CA = Path("/etc/wicket-lab/tls/ca.pem")  # provision/controller.sh makes it for nginx
JOIN_TOKEN_TTL = "1d"


def cli(name: str, people_dir: Path | None = None, api: str | None = None) -> WicketCli:
    people_dir = people_dir or PEOPLE_DIR
    return WicketCli(Account.load(people_dir / f"{name}.json"), api or LOCAL_API, people_dir.parent / "cli" / name)


def make_token(lab: dict, secret: str, root: WicketCli | None = None, directory: Path | None = None) -> Path:
    root = root or cli("root")
    root.ensure_login()
    out = root.change("sites", "join-token", lab["site"]["name"], "--link", lab["controller"]["link"],
                      "--ttl", JOIN_TOKEN_TTL).stdout
    token = out.strip().splitlines()[-1].strip()
    if not token.startswith("wkj"):
        raise LabCliError(f"no join token in the answer of `wicket sites join-token`:\n{out}")
    return handoff.write_sealed(secret, "join-token", (token + "\n").encode(), directory or handoff.HANDOFF_DIR)


def engineer_bundle(lab: dict, secret: str, people_dir: Path | None = None, ca: Path | None = None,
                    directory: Path | None = None) -> Path:
    erin = Account.load((people_dir or PEOPLE_DIR) / "erin.json")
    bundle = {"controller": lab["controller"]["api"], "ca_pem": (ca or API_CA).read_text(),
              "account": {"username": erin.username, "password": erin.password, "secret": erin.person.secret}}
    return handoff.write_sealed(secret, "engineer", json.dumps(bundle).encode(), directory or handoff.HANDOFF_DIR)


def approve(session: str | None, alex: WicketCli | None = None) -> list[str]:
    alex = alex or cli("alex")
    alex.ensure_login()
    waiting = [q["session"]["id"] for q in alex.json("approvals")]
    chosen = [sid for sid in waiting if session in (None, sid)]
    if session and not chosen:
        raise LabCliError(f"{session} is not waiting for alex's approval (waiting: {', '.join(waiting) or 'none'})")
    for sid in chosen:
        alex.change("approve", sid, "--reason", "lab: approved on the controller VM")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vagrant.ctl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("token")
    sub.add_parser("engineer-bundle")
    a = sub.add_parser("approve")
    a.add_argument("session", nargs="?")
    s = sub.add_parser("as")
    s.add_argument("name", choices=["root", "alex", "erin"])
    s.add_argument("--step-up", action="store_true", help="add --totp with a fresh code (commands that change things)")
    s.add_argument("args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    lab = labplan.load()
    try:
        if args.cmd == "token":
            print(f"join token for {lab['site']['node_id']} sealed in {make_token(lab, handoff.lab_secret())}")
        elif args.cmd == "engineer-bundle":
            print(f"engineer's login sealed in {engineer_bundle(lab, handoff.lab_secret())}")
        elif args.cmd == "approve":
            done = approve(args.session)
            print(f"approved: {', '.join(done)}" if done else "nothing is waiting for approval")
        else:
            person = cli(args.name)
            person.ensure_login()
            rest = args.args[1:] if args.args[:1] == ["--"] else args.args
            res = person.change(*rest, check=False) if args.step_up else person.run(*rest, check=False)
            sys.stdout.write(res.stdout)
            sys.stderr.write(res.stderr)
            return res.returncode
    except (LabCliError, handoff.HandoffError, OSError) as exc:
        print(f"wicket-lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
