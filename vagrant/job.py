"""The engineer VM's job: one IEC-104 general interrogation of RTU-17, through a lane, with the real tools.

As erin, with the `wicket` CLI against the controller VM's API (HTTPS, the lab's CA): log in, request RTU-17
for a task, wait for the approval where the task needs one (alex approves on the controller VM), download
the one-time WireGuard config, bring it up with wg-quick, run the namespace lab's IEC-104 client through the
lane, close the session, take the tunnel down. Each fact is checked; exit 1 when one does not hold.

  python -m vagrant.job [--task NAME] [--wait-approval SECONDS] [--keep | --close SESSION]
  python -m vagrant.job install      (provisioning) unpack the hand-over in /etc/wicket-lab/engineer.json

Run as root (wg-quick). provision/engineer.sh installs it as `wicket-lab-job`; the login it uses is in
/etc/wicket-lab (handed over, sealed, by the controller VM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tests.lab.controller import Person

from . import labplan
from .people import Account, LabCliError, WicketCli, write_private

STATE_DIR = Path("/etc/wicket-lab")
WORK_DIR = Path("/run/wicket-lab")
IFNAME = "wicketlab0"  # wg-quick names the interface after the file
REPO = Path(__file__).resolve().parents[1]
GI_TIMEOUT_S = 5  # for connecting (the tunnel's first handshake included) and for each answer
REASON = "WO-4711 counters stuck on feeder 3 (vagrant lab)"


class JobFailed(Exception):
    pass


class Job:
    def __init__(self, lab: dict, cli: WicketCli, say=print):
        self.lab, self.cli, self.say = lab, cli, say
        site = lab["site"]
        self.device, self.host, self.port = site["device"], site["device_address"], site["iec104_port"]
        self.conf = WORK_DIR / f"{IFNAME}.conf"

    def check(self, ok: bool, text: str) -> None:
        self.say(f"  {'ok  ' if ok else 'FAIL'} {text}")
        if not ok:
            raise JobFailed(text)

    def run(self, task: str, wait_approval: float, keep: bool) -> None:
        self.say(f"1. Before any lane: {self.device} {self.host} tcp/{self.port} from this VM")
        before = probe(self.host, self.port)
        self.check(before != "open", f"not reachable ({before}): this VM has no route to the device network")

        who = self.cli.account.username
        self.say(f"2. {who} logs in at {self.cli.controller}")
        self.say("   " + self.cli.login().splitlines()[0])

        self.say(f"3. {who} asks for {self.device}, task {task}")
        s = self.cli.json("request", "--device", self.device, "--task", task, "--reason", REASON, step_up=True)
        sid = s["id"]
        self.say(f"   session {sid}: {s['state']}")
        if s["state"] == "pending_approval":
            s = self._wait_for_approval(sid, wait_approval)
        if s["state"] == "approved":
            s = self.cli.json("activate", sid, step_up=True)
        self.check(s["state"] == "active", f"{sid} is active on node {s.get('node')}, ends at {s.get('end_at')}")

        closed = False
        try:
            self.say("4. The one-time config, into wg-quick")
            WORK_DIR.mkdir(mode=0o700, exist_ok=True)
            self.down()  # a tunnel left by an earlier --keep
            self.cli.run("config", sid, "-o", str(self.conf))
            allowed = _conf_value(self.conf.read_text(), "AllowedIPs")
            self.check(allowed == f"{self.host}/32", f"AllowedIPs = {allowed}: the one device")
            _wg_quick("up", self.conf)

            self.say(f"5. IEC-104 general interrogation of {self.device} through the lane")
            code, output = self.interrogate()
            for line in output.strip().splitlines()[-15:]:
                self.say(f"   | {line}")
            self.check(code == 0, f"the interrogation answered (exit {code})")
            if keep:
                self.say(f"--keep: the tunnel stays up until the session ends; `wg show {IFNAME}`, "
                         f"`wicket-lab-job --close {sid}` when done")
                return

            self.say(f"6. {who} closes {sid}; the router removes the lane")
            self.cli.run("close", sid)
            closed = True
            after = _until(lambda: (r := probe(self.host, self.port)) != "open" and r, timeout=20)
            self.check(bool(after), f"{self.device} tcp/{self.port} through the same tunnel: {after or 'still open'}")
        finally:
            if not keep:
                if not closed:  # a failed step: end the session now rather than at its end time
                    self.cli.run("close", sid, check=False)
                self.down()

    def interrogate(self) -> tuple[int, str]:
        """The namespace lab's IEC-104 client (c104), as the RTU VM runs its outstation."""
        gi = subprocess.run([sys.executable, "-m", "tests.lab.otpeers", "iec104-gi", "--host", self.host,
                             "--port", str(self.port), "--timeout", str(GI_TIMEOUT_S)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
        return gi.returncode, gi.stdout + gi.stderr

    def close(self, sid: str) -> None:
        self.cli.ensure_login()
        self.cli.run("close", sid)
        self.down()

    def down(self) -> None:
        if self.conf.exists():
            _wg_quick("down", self.conf, check=False)
            self.conf.unlink(missing_ok=True)  # it holds the session's private key
        elif Path(f"/sys/class/net/{IFNAME}").exists():
            subprocess.run(["ip", "link", "delete", IFNAME], capture_output=True, timeout=30)

    def _wait_for_approval(self, sid: str, wait_s: float) -> dict:
        self.say(f"   it waits for an approver: on the host, `vagrant ssh ctl -c 'sudo wicket-lab-approve {sid}'`")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            s = self.cli.json("status", sid)
            if s["state"] != "pending_approval":
                self.say(f"   {sid}: {s['state']}")
                return s
            time.sleep(3)
        raise JobFailed(f"{sid} was not approved within {wait_s:.0f} s (it stays requested; `wicket close {sid}` withdraws it)")


def install(state_dir: Path = STATE_DIR) -> str:
    """Split the controller VM's hand-over: erin's account (its used TOTP steps kept across re-provisioning),
    the lab CA, and the API address. Returns the user name."""
    bundle = json.loads((state_dir / "engineer.json").read_text())
    given = bundle.get("account")
    if given:
        path = state_dir / f"{given['username']}.json"
        old = Account.load(path) if path.exists() else None
        if old is None or old.person.secret != given["secret"] or old.password != given["password"]:
            Account(path, Person(given["username"], given["secret"]), given["password"]).save()
        (state_dir / "api-ca.pem").write_text(bundle["ca_pem"])
        (state_dir / "api-ca.pem").chmod(0o644)
        write_private(state_dir / "engineer.json", json.dumps({"controller": bundle["controller"],
                                                                 "user": given["username"]}, indent=1) + "\n")
        return given["username"]
    return bundle["user"]


def probe(host: str, port: int, timeout: float = 2.0) -> str:
    from tests.lab.traffic import probe_once

    return probe_once(host, port, udp=False, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wicket-lab-job", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", default="run", choices=["run", "install"])
    p.add_argument("--task", help="default: the lab's task without approval; iec104-diagnostics needs alex")
    p.add_argument("--wait-approval", type=float, default=600, metavar="SECONDS")
    p.add_argument("--keep", action="store_true", help="leave the tunnel up after the interrogation")
    p.add_argument("--close", metavar="SESSION", help="close a session left open with --keep, and take the tunnel down")
    args = p.parse_args(argv)
    if args.action == "install":
        print(f"installed the hand-over for {install()} in {STATE_DIR}")
        return 0
    lab = labplan.load()
    bundle = json.loads((STATE_DIR / "engineer.json").read_text())
    cli = WicketCli(Account.load(STATE_DIR / f"{bundle['user']}.json"), bundle["controller"], STATE_DIR / "cli",
                    ca_file=STATE_DIR / "api-ca.pem")
    job = Job(lab, cli)
    try:
        if args.close:
            job.close(args.close)
            print(f"closed {args.close}; tunnel down")
            return 0
        job.run(args.task or lab["site"]["quick_task"], args.wait_approval, args.keep)
    except (JobFailed, LabCliError, subprocess.SubprocessError, OSError) as exc:
        print(f"job failed: {exc}", file=sys.stderr)
        return 1
    print("job done: one general interrogation through one lane, and the lane is gone again")
    return 0


def _wg_quick(action: str, conf: Path, check: bool = True) -> None:
    res = subprocess.run(["wg-quick", action, str(conf)], capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise JobFailed(f"wg-quick {action} failed: {res.stderr.strip()}")


def _conf_value(text: str, key: str) -> str:
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            return value.strip()
    raise JobFailed(f"{key} missing from the downloaded config")


def _until(fn, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
