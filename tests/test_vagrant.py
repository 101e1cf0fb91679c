"""The Vagrant lab (vagrant/) as far as this machine can check it without a hypervisor.

Nothing here starts a VM. What is checked: lab.json is what tests/lab/layout.py gives; the Vagrantfile parses
and, evaluated against a stand-in for Vagrant's configuration object, defines exactly those machines,
networks and provisioners; every provisioning script parses (and passes shellcheck where installed); every
command, module, flag, unit file and lab.json value the scripts use exists; the sealed hand-over opens only
with its secret; and the controller VM's seeding and scripted CLI use work against a real controller on
loopback. docs/vagrant-lab.md says what this leaves unproven.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from vagrant import handoff, labplan

REPO = Path(__file__).resolve().parent.parent
VAGRANT = REPO / "vagrant"
PROVISION = VAGRANT / "provision"
LAB = labplan.load()
SCRIPTS = sorted(PROVISION.glob("*.sh"))

# A stand-in for Vagrant.configure: records every call made on the config object (and on the objects
# its blocks receive), then prints them as JSON. Enough to see what the Vagrantfile asks Vagrant for.
RUBY_RECORDER = r"""
require "json"
LOG = []
class Rec
  def initialize(path)
    @path = path
  end

  def method_missing(name, *args, **kw, &blk)
    LOG << { "path" => "#{@path}.#{name}", "args" => args, "kw" => kw }
    child = Rec.new(name == :define ? "#{@path}.define[#{args.first}]" : "#{@path}.#{name}")
    blk&.call(child)
    child
  end

  def respond_to_missing?(*)
    true
  end
end
module Vagrant
  def self.configure(_version)
    yield Rec.new("config")
  end
end
load ARGV.fetch(0)
puts JSON.generate(LOG)
"""


def _ruby() -> str:
    ruby = shutil.which("ruby")
    if not ruby:
        pytest.fail("ruby is not installed (Debian package `ruby`, in the Makefile's APT_PACKAGES): `make setup` first")
    return ruby


# ---- lab.json and layout.py ----


def test_lab_json_is_what_layout_gives():
    assert labplan.main(["check"]) == 0, "vagrant/lab.json is stale: python -m vagrant.labplan write"
    assert (VAGRANT / "lab.json").read_text() == labplan.render()


def test_addresses_are_the_namespace_labs():
    """Same host numbers as the namespace lab's product site (the demo's and product_lab's ctl)."""
    from tests.lab.layout import SEGMENTS, plan

    demo = plan("abcdef", ("rtu1", "rtu2"), ("scada", "ctl"), ("eng1",), ipv6=False)
    machines = LAB["machines"]
    for name in ("rtu1", "scada", "ctl", "eng1"):
        assert machines[name]["address"] == demo[name].address, name
    router = {nic["segment"]: nic["address"] for nic in machines["rtr"]["interfaces"]}
    assert router == {seg.bridge: seg.addr(1) for seg in SEGMENTS.values()}
    every = [nic["address"] for m in machines.values() for nic in m["interfaces"]]
    assert len(every) == len(set(every)), "an address is used twice"
    for m in machines.values():
        for nic in m["interfaces"]:
            seg = LAB["segments"][nic["segment"]]
            assert ipaddress.ip_address(nic["address"]) in ipaddress.ip_network(seg["network"])
            assert str(ipaddress.ip_network(seg["network"]).netmask) == nic["netmask"]


def test_routes_give_the_engineer_the_controller_and_nothing_of_the_site():
    eng, ctl = LAB["machines"]["eng1"], LAB["machines"]["ctl"]
    wan, lan, ops = (LAB["segments"][s] for s in ("wan0", "lan0", "ops0"))
    assert eng["routes"][0] == f"{ctl['address']}/32 via {wan['router']}"
    assert sorted(eng["routes"][1:]) == sorted([f"unreachable {lan['network']}", f"unreachable {ops['network']}"])
    # devices and masters reach the other lab networks and the site's tunnel pool through the router only
    for name in ("rtu1", "scada", "ctl"):
        m = LAB["machines"][name]
        own = LAB["segments"][m["interfaces"][0]["segment"]]
        want = {n["network"] for n in LAB["segments"].values()} - {own["network"]} | {LAB["site"]["tunnel_pool"]}
        assert {r.split()[0] for r in m["routes"]} == want, name
        assert all(r.endswith(f" via {own['router']}") for r in m["routes"]), name
    assert LAB["machines"]["rtr"]["routes"] == [] and LAB["machines"]["rtr"]["forwarding"] is True


def test_labplan_cli_answers_the_scripts_questions(capsys):
    assert labplan.main(["get", "machines.rtu1.address"]) == 0
    assert capsys.readouterr().out.strip() == LAB["machines"]["rtu1"]["address"]
    assert labplan.main(["routes", "eng1"]) == 0
    assert capsys.readouterr().out.splitlines() == LAB["machines"]["eng1"]["routes"]
    assert labplan.main(["get", "machines.nosuch.address"]) == 2


# ---- the Vagrantfile ----


def test_vagrantfile_parses():
    res = subprocess.run([_ruby(), "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "Syntax OK" in res.stdout, res.stderr


@pytest.fixture(scope="module")
def vagrant_calls(tmp_path_factory) -> list[dict]:
    """What the Vagrantfile asks of Vagrant, evaluated in a copy (so its secret file lands there)."""
    ruby = _ruby()
    where = tmp_path_factory.mktemp("vagrantfile")
    for name in ("Vagrantfile", "lab.json"):
        shutil.copy(VAGRANT / name, where / name)
    (where / "recorder.rb").write_text(RUBY_RECORDER)
    res = subprocess.run([ruby, str(where / "recorder.rb"), str(where / "Vagrantfile")], capture_output=True,
                         text=True, timeout=60, cwd=where)
    assert res.returncode == 0, res.stderr
    secret = where / ".lab-secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and re.fullmatch(r"[0-9a-f]{64}\n", secret.read_text())
    return json.loads(res.stdout)


def test_vagrantfile_defines_the_machines_of_lab_json(vagrant_calls):
    defines = [c for c in vagrant_calls if c["path"] == "config.vm.define"]
    assert [c["args"][0] for c in defines] == list(LAB["machines"]), "machines, in lab.json's order"
    for c in defines:
        assert c["kw"]["autostart"] is (not LAB["machines"][c["args"][0]]["optional"])
    for name, machine in LAB["machines"].items():
        nets = [c for c in vagrant_calls if c["path"] == f"config.vm.define[{name}].vm.network"]
        assert [(c["args"][0], c["kw"]["ip"], c["kw"]["netmask"]) for c in nets] == \
            [("private_network", nic["address"], nic["netmask"]) for nic in machine["interfaces"]], name
        for c, nic in zip(nets, machine["interfaces"], strict=True):
            # one isolated segment per lab network, named the same for both providers
            assert c["kw"]["virtualbox__intnet"] == c["kw"]["libvirt__network_name"] == f"wicket-{nic['segment']}"
            assert c["kw"]["libvirt__forward_mode"] == "veryisolated" and c["kw"]["libvirt__dhcp_enabled"] is False


def test_vagrantfile_provisions_with_existing_scripts(vagrant_calls):
    for name, machine in LAB["machines"].items():
        provs = [c for c in vagrant_calls if c["path"] == f"config.vm.define[{name}].vm.provision"]
        assert [c["args"][0] for c in provs] == ["common", machine["provision"]], name
        for c in provs:
            script = VAGRANT / c["kw"]["path"]
            assert c["kw"]["type"] == "shell" and script.is_file(), script
            assert c["kw"]["args"] == [name]
            assert re.fullmatch(r"[0-9a-f]{64}", c["kw"]["env"]["WICKET_LAB_SECRET"])


def test_vagrantfile_syncs_the_repository_without_secrets_or_venvs(vagrant_calls):
    synced = [c for c in vagrant_calls if c["path"] == "config.vm.synced_folder"]
    default = next(c for c in synced if c["args"] == [".", "/vagrant"])
    assert default["kw"]["disabled"] is True
    repo = next(c for c in synced if c["args"] == ["..", "/wicket"])
    assert repo["kw"]["type"] == "rsync"
    assert {".lab-secret", ".venv/", ".git/", ".vagrant/"} <= set(repo["kw"]["rsync__exclude"])
    assert (VAGRANT / ".gitignore").read_text().split().count(".lab-secret") == 1


# ---- the provisioning scripts ----


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_provision_script_parses(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_provision_script_passes_shellcheck(script):
    if not shutil.which("shellcheck"):
        pytest.fail("shellcheck is not installed (Debian package `shellcheck`, in the Makefile's APT_PACKAGES): `make setup` first")
    res = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout


def test_every_machine_has_its_script():
    assert {p.stem for p in SCRIPTS} == {"common"} | {m["provision"] for m in LAB["machines"].values()}


def test_scripts_use_existing_entry_points():
    text = "\n".join(p.read_text() for p in SCRIPTS)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for cmd in ("wicket", "wicket-agent", "wicket-controller"):
        assert cmd in scripts and cmd in text, cmd
    modules = set(re.findall(r"-m ([a-z_]+(?:\.[a-z_]+)+)", text))
    assert {"vagrant.labplan", "vagrant.seed", "vagrant.ctl", "vagrant.handoff", "vagrant.job",
            "tests.lab.otpeers"} <= modules
    for module in modules:
        res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60,
                             cwd=REPO)
        assert res.returncode == 0, f"{module}: {res.stderr}"
    # the shipped unit files the scripts install run the venv common.sh links to /opt/wicket/venv
    for unit in ("nodeagent/systemd/wicket-agent.service", "controller/systemd/wicket-controller.service"):
        assert unit in text
        assert "ExecStart=/opt/wicket/venv/bin/" in (REPO / unit).read_text()
    assert "ln -sfn \"$repo/.venv\" /opt/wicket/venv" in (PROVISION / "common.sh").read_text()


def test_otpeers_commands_take_the_flags_the_scripts_give():
    for script in SCRIPTS:
        for cmd, flags in re.findall(r"-m tests\.lab\.otpeers ([a-z0-9-]+)((?: --[a-z-]+ \S+)*)", script.read_text()):
            res = subprocess.run([sys.executable, "-m", "tests.lab.otpeers", cmd, "--help"], capture_output=True,
                                 text=True, timeout=60, cwd=REPO)
            assert res.returncode == 0, f"{script.name}: otpeers {cmd}: {res.stderr}"
            for flag in re.findall(r"--[a-z-]+", flags):
                assert flag in res.stdout, f"{script.name}: otpeers {cmd} has no {flag}"


def test_lab_json_paths_the_scripts_ask_for_exist():
    uses = {m["provision"]: name for name, m in LAB["machines"].items()}
    for script in SCRIPTS:
        for path in re.findall(r"lab get \"?([a-z0-9_.$]+)\"?", script.read_text()):
            machines = [uses[script.stem]] if script.stem in uses else list(LAB["machines"])
            for machine in machines:
                assert labplan.get(LAB, path.replace("$machine", machine)) not in (None, ""), f"{script.name}: {path}"


# ---- the sealed hand-over ----

SECRET = "0123456789abcdef" * 4


def test_sealed_files_open_only_with_their_secret(tmp_path):
    path = handoff.write_sealed(SECRET, "join-token", b"wkj1.x.y.z\n", tmp_path)
    sealed = path.read_bytes()
    assert b"wkj1" not in sealed and path.stat().st_mode & 0o777 == 0o644
    assert handoff.unseal(SECRET, sealed) == b"wkj1.x.y.z\n"
    with pytest.raises(handoff.HandoffError, match="does not open"):
        handoff.unseal("f" * 64, sealed)
    flipped = bytearray(sealed)
    flipped[40] ^= 1
    with pytest.raises(handoff.HandoffError):
        handoff.unseal(SECRET, bytes(flipped))
    with pytest.raises(handoff.HandoffError, match="name"):
        handoff.write_sealed(SECRET, "../etc/passwd", b"", tmp_path)


def test_lab_secret_comes_from_the_environment_or_the_file(tmp_path):
    with pytest.raises(handoff.HandoffError, match="WICKET_LAB_SECRET"):
        handoff.lab_secret({}, tmp_path / "absent")
    with pytest.raises(handoff.HandoffError):
        handoff.lab_secret({handoff.SECRET_ENV: "short"}, tmp_path / "absent")
    (tmp_path / "secret").write_text(SECRET + "\n")
    assert handoff.lab_secret({}, tmp_path / "secret") == SECRET
    assert handoff.lab_secret({handoff.SECRET_ENV: "e" * 40}, tmp_path / "secret") == "e" * 40


def test_fetch_waits_for_the_sealed_file_over_http(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/engineer.sealed"
    try:
        with pytest.raises(handoff.HandoffError, match="did not answer"):
            handoff.fetch(SECRET, url, wait_s=0.3, interval_s=0.1)
        later = threading.Timer(0.5, handoff.write_sealed, (SECRET, "engineer", b'{"a": 1}', served))
        later.start()
        t0 = time.monotonic()
        assert handoff.fetch(SECRET, url, wait_s=10, interval_s=0.1) == b'{"a": 1}'
        assert time.monotonic() - t0 >= 0.4, "it answered before the file was there"
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---- the engineer's hand-over unpacked ----


def test_engineer_install_keeps_used_totp_steps(tmp_path):
    from vagrant import job
    from vagrant.people import Account

    bundle = {"controller": "https://198.51.100.11", "ca_pem": "PEM\n",
              "account": {"username": "erin", "password": "pw", "secret": "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"}}
    (tmp_path / "engineer.json").write_text(json.dumps(bundle))
    assert job.install(tmp_path) == "erin"
    erin = Account.load(tmp_path / "erin.json")
    erin.code()
    used = set(erin.person.used_steps)
    assert used and (tmp_path / "erin.json").stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "engineer.json").read_text()) == {"controller": bundle["controller"], "user": "erin"}
    assert (tmp_path / "api-ca.pem").read_text() == "PEM\n"
    (tmp_path / "engineer.json").write_text(json.dumps(bundle))  # provisioned again: same account
    job.install(tmp_path)
    assert Account.load(tmp_path / "erin.json").person.used_steps == used


# ---- the controller VM's seeding and the people's CLI, against a real controller on loopback ----


@pytest.fixture
def seeded_controller(tmp_path):
    from vagrant import seed

    people = tmp_path / "people"
    env_file = tmp_path / "controller.env"
    assert seed.seed(LAB, tmp_path / "ctl", people, env_file) is True
    assert seed.seed(LAB, tmp_path / "ctl", people, env_file) is False, "a second run must change nothing"
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert env["WICKET_LINK_LISTEN"] == LAB["controller"]["link"] and env["WICKET_TRUST_FORWARDED_FOR"] == "true"
    assert {p.name for p in people.iterdir()} == {"root.json", "alex.json", "erin.json"}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in [env_file, *people.iterdir()])
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "controller.server_cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, **env, "WICKET_LINK_LISTEN": "off"}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}", people
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_seeded_controller_serves_the_labs_people(seeded_controller, tmp_path):
    from vagrant import ctl
    from vagrant.people import Account

    api, people = seeded_controller
    sealed = ctl.make_token(LAB, SECRET, root=ctl.cli("root", people, api), directory=tmp_path / "handoff")
    assert handoff.unseal(SECRET, sealed.read_bytes()).decode().startswith("wkj1.")

    erin = ctl.cli("erin", people, api)
    assert "as erin" in erin.login()
    asked = erin.json("request", "--device", LAB["site"]["device"], "--task", LAB["site"]["task"],
                      "--reason", "vagrant lab test", "--no-activate", step_up=True)
    assert asked["state"] == "pending_approval"
    assert ctl.approve(None, alex=ctl.cli("alex", people, api)) == [asked["id"]]
    assert erin.json("status", asked["id"])["state"] == "approved"
    spent = len(Account.load(people / "alex.json").person.used_steps)
    assert ctl.approve(None, alex=ctl.cli("alex", people, api)) == []
    assert len(Account.load(people / "alex.json").person.used_steps) == spent, "the remembered login is reused"

    (tmp_path / "ca.pem").write_text("PEM\n")
    bundle = ctl.engineer_bundle(LAB, SECRET, people_dir=people, ca=tmp_path / "ca.pem", directory=tmp_path / "handoff")
    opened = json.loads(handoff.unseal(SECRET, bundle.read_bytes()))
    assert opened["controller"] == LAB["controller"]["api"] and opened["account"]["username"] == "erin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"controller exited {proc.returncode}: {proc.stdout.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the controller did not listen within 30 s")
