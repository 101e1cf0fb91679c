"""The lab's people using the real `wicket` CLI without a keyboard.

Their passwords and TOTP secrets are the ones the controller VM was seeded with (vagrant/seed.py); a person
would type them, the lab feeds them on standard input. The CLI reads hidden prompts from the terminal, so it
runs in a session of its own with no terminal, where it reads them from standard input instead. TOTP codes
come from the namespace lab's `Person.code()`: each step once per person, the used steps kept in the
person's file so that the next command (another process) does not reuse one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.lab.controller import Person

WICKET = Path(sys.executable).with_name("wicket")  # the console script next to this interpreter (the venv's)
KEEP_STEPS = 10  # used steps older than this many 30 s steps can never be valid again


class LabCliError(Exception):
    pass


@dataclass
class Account:
    path: Path
    person: Person
    password: str

    @property
    def username(self) -> str:
        return self.person.username

    @classmethod
    def load(cls, path: Path) -> Account:
        data = json.loads(Path(path).read_text())
        person = Person(data["username"], data["secret"], used_steps=set(data.get("used_steps", [])))
        return cls(Path(path), person, data["password"])

    def save(self) -> None:
        oldest = int(time.time() // 30) - KEEP_STEPS
        data = {"username": self.username, "password": self.password, "secret": self.person.secret,
                "used_steps": sorted(s for s in self.person.used_steps if s >= oldest)}
        write_private(self.path, json.dumps(data, indent=1) + "\n")

    def code(self) -> str:
        """A TOTP code this account has not used yet; waits for the next step when the window is spent."""
        value = self.person.code()
        self.save()
        return value


class WicketCli:
    """`wicket …` as one person, against one controller, with its own login state directory."""

    def __init__(self, account: Account, controller: str, config_dir: Path, ca_file: Path | None = None,
                 timeout: float = 120):
        self.account, self.controller = account, controller
        self.config_dir, self.ca_file, self.timeout = Path(config_dir), ca_file, timeout

    def env(self) -> dict[str, str]:
        env = {**os.environ, "WICKET_CONFIG_DIR": str(self.config_dir), "WICKET_CONTROLLER": self.controller}
        if self.ca_file:
            env["SSL_CERT_FILE"] = str(self.ca_file)  # the lab's CA for the controller's HTTPS (docs/controller.md)
        return env

    def run(self, *args: str, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess:
        self.config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        res = subprocess.run([str(WICKET), *args], input=stdin, text=True, capture_output=True, env=self.env(),
                             timeout=self.timeout, start_new_session=True)
        if check and res.returncode != 0:
            raise LabCliError(f"wicket {' '.join(_shown(args))} (as {self.account.username}) exited {res.returncode}: "
                              f"{(res.stderr or res.stdout).strip()}")
        return res

    def login(self) -> str:
        res = self.run("login", "--user", self.account.username, stdin=f"{self.account.password}\n{self.account.code()}\n")
        # Without a terminal the prompts land on stdout, in front of the answer.
        out = res.stdout
        return out[out.find("Logged in"):].strip() if "Logged in" in out else out.strip()

    def ensure_login(self) -> None:
        """Log in unless the remembered login still works: a login spends a TOTP code, whoami does not."""
        if self.run("whoami", check=False).returncode != 0:
            self.login()

    def change(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A command that needs a fresh TOTP code (step-up)."""
        return self.run(*args, "--totp", self.account.code(), check=check)

    def json(self, *args: str, step_up: bool = False):
        res = self.change(*args, "--json") if step_up else self.run(*args, "--json")
        return json.loads(res.stdout)


def write_private(path: Path, text: str) -> None:
    """Write whole or not at all, 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def _shown(args) -> list[str]:
    out, hide = [], False
    for a in args:
        out.append("******" if hide else a)
        hide = a == "--totp"
    return out
