"""The network-namespace lab itself (tests/lab): topology, isolation, and cleanup however a run ends."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.lab import Lab, LabError, layout, procs, registry, sweep_stale, uapi, unavailable_reason
from tests.lab.nsutil import netns_id

REPO = Path(__file__).resolve().parent.parent
needs_lab = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def wait_for(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_run_gone(run_id: str, namespaces: list[str]) -> None:
    assert not set(namespaces) & netns_names()
    assert not any(ns.startswith(f"wkt-{run_id}-") for ns in netns_names())
    assert not registry.path_for(run_id).exists()


# -- plan (no root needed) --------------------------------------------------------------------------------------


def test_plan_names_and_addresses():
    lab = Lab(devices=("rtu1", "rtu2", "a-very-long-device"), run_id="abc123")
    assert layout.RUN_ID_RE.match(Lab().run_id)
    assert (
        len(lab.agent_tag) == 3
        and lab.agent_tag.isalnum()
        and lab.agent_tag == Lab(run_id="abc123").agent_tag
    )
    assert set(lab.hosts) == {"rtr", "rtu1", "rtu2", "a-very-long-device", "scada", "eng1", "eng2"}
    assert lab.ns("rtr") == "wkt-abc123-rtr"
    assert (lab.addr("rtr"), lab.router_lan, lab.router_ops) == ("203.0.113.1", "192.0.2.1", "198.51.100.1")
    assert [lab.addr(r) for r in ("rtu1", "rtu2", "a-very-long-device")] == [
        "192.0.2.10",
        "192.0.2.11",
        "192.0.2.12",
    ]
    assert lab.addr("scada") == "198.51.100.10" and lab.hosts["scada"].network == "198.51.100.0/24"
    assert lab.addr("eng2") == "203.0.113.11" and lab.hosts["eng2"].gateway is None
    assert lab.hosts["rtu1"].gateway == "192.0.2.1" and lab.hosts["rtu1"].address6 is None
    ports = [h.port for h in lab.hosts.values() if h.port]
    assert len(set(ports)) == len(ports) and all(len(p) <= 15 for p in ports)
    assert lab.engineer_ifname("eng1") == "weabc1230" and lab.engineer_ifname("eng2") == "weabc1231"
    with pytest.raises(LabError):
        lab.engineer_ifname("rtu1")
    v6 = Lab(run_id="abc123", ipv6=True)
    assert v6.hosts["rtu2"].address6 == "2001:db8:0:2::11" and v6.hosts["rtr"].address6 == "2001:db8:0:1::1"
    for bad in (
        {"devices": ("rtu1", "rtu1")},
        {"masters": ("rtr",)},
        {"engineers": ("Eng 1",)},
        {"run_id": "x"},
    ):
        with pytest.raises(ValueError):
            Lab(**bad)


def test_uapi_prefixes_match_only_their_own_sockets(tmp_path, monkeypatch):
    monkeypatch.setattr(uapi, "WG_RUN_DIR", tmp_path)
    for name in (
        "weabc1230.sock",
        "weabc1231.sock",
        "weabc12.sock",
        "xq1.sock",
        "wkq7xlane.sock",
        "weabc1230",
    ):
        (tmp_path / name).touch()
    assert [p.name for p in uapi.sockets_for("weabc123")] == ["weabc1230.sock", "weabc1231.sock"]
    for bad in ("", "we", "../x", "we*", "a/b", "we abc"):
        with pytest.raises(ValueError):
            uapi.sockets_for(bad)
    with pytest.raises(ValueError):
        Lab(run_id="abc123").register_uapi_prefix("w*")


# -- topology ---------------------------------------------------------------------------------------------------


@pytest.mark.lab
def test_devices_and_masters_route_through_router(lab):
    assert lab.ping("rtu1", lab.router_lan)
    assert lab.ping("rtu2", lab.router_lan)
    assert lab.ping("scada", lab.router_ops)
    assert lab.ping("rtu1", lab.addr("scada"))
    assert lab.ping("scada", lab.addr("rtu2"))
    route = lab.exec("rtu1", ["ip", "route", "get", lab.addr("scada")]).stdout
    assert f"via {lab.router_lan}" in route
    assert lab.exec("rtr", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    # IPv6 is off by default, everywhere.
    for role in lab.hosts:
        assert lab.exec(role, ["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"]).stdout.strip() == "1"
    assert "inet6" not in lab.exec("rtu1", ["ip", "addr", "show", "dev", "eth0"]).stdout


@pytest.mark.lab
def test_engineer_reaches_router_but_no_device(lab):
    assert lab.ping("eng1", lab.addr("rtr"))
    assert lab.ping("eng1", lab.addr("eng2"))
    for target in ("rtu1", "rtu2", "scada"):
        assert not lab.ping("eng1", lab.addr(target), timeout=0.3)
        no_route = lab.exec("eng1", ["ip", "route", "get", lab.addr(target)], check=False)
        assert no_route.returncode != 0 and "unreachable" in no_route.stderr
    assert "default" not in lab.exec("eng1", ["ip", "route"]).stdout


@pytest.mark.lab
@needs_lab
def test_ipv6_lab():
    with Lab(devices=("rtu1",), engineers=("eng1",), ipv6=True) as lab:
        assert lab.ping("rtu1", lab.router_lan6)
        assert lab.ping("rtu1", lab.addr6("scada"))
        assert lab.ping("eng1", lab.router_wan6)
        assert not lab.ping("eng1", lab.addr6("rtu1"), timeout=0.3)
        assert lab.ping("rtu1", lab.addr("scada"))  # IPv4 still works alongside
    assert_run_gone(lab.run_id, lab.namespaces)


# -- lifecycle --------------------------------------------------------------------------------------------------


@pytest.mark.lab
@needs_lab
def test_namespaces_and_registry_exist_only_while_up():
    with Lab() as lab:
        assert set(lab.namespaces) <= netns_names()
        assert len(lab.namespaces) == 6
        path = registry.path_for(lab.run_id)
        assert stat.S_IMODE(os.stat(registry.REGISTRY_DIR).st_mode) == 0o700
        record = json.loads(path.read_text())
        assert record["owner_pid"] == os.getpid()
        assert record["owner_start"] == procs.start_time(os.getpid())
        assert sorted(record["namespaces"]) == sorted(lab.namespaces)
        sleeper = lab.spawn("rtu2", ["sleep", "300"])
        assert json.loads(path.read_text())["spawned"][0]["pid"] == sleeper.pid
    assert sleeper.returncode is not None  # stopped and reaped
    assert_run_gone(lab.run_id, lab.namespaces)
    assert lab.cleanup_errors == []
    lab.cleanup()  # idempotent


@pytest.mark.lab
@needs_lab
def test_cleanup_when_body_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(devices=("rtu1",), masters=(), engineers=()) as lab:
            sleeper = lab.spawn("rtu1", ["sleep", "300"])
            raise RuntimeError("boom")
    assert sleeper.returncode is not None
    assert_run_gone(lab.run_id, lab.namespaces)


@pytest.mark.lab
def test_same_run_id_is_refused_and_harms_nothing(lab):
    with pytest.raises(LabError):
        Lab(run_id=lab.run_id).build()
    registry.remove(lab.run_id)  # even unregistered, its namespaces must not be built over or deleted
    with pytest.raises(LabError, match="already exist"):
        Lab(run_id=lab.run_id).build()
    registry.save(lab._record)
    assert set(lab.namespaces) <= netns_names()
    assert registry.path_for(lab.run_id).exists()
    assert lab.ping("rtu1", lab.addr("scada"))


# -- crashes and signals: a child process holds the lab ---------------------------------------------------------

CHILD = """
import json, signal, subprocess, sys, time
from tests.lab import Lab, procs
# Background jobs of a non-interactive shell start with SIGINT ignored; a terminal's Ctrl-C would not be.
signal.signal(signal.SIGINT, signal.default_int_handler)
mode = sys.argv[1]
lab = Lab(devices=("rtu1",), masters=(), engineers=("eng1",))
lab.build()
sleeper = lab.spawn("rtu1", ["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"run_id": lab.run_id, "namespaces": lab.namespaces,
                  "sleeper": [sleeper.pid, procs.start_time(sleeper.pid)]}), flush=True)
if mode == "exit":
    sys.exit(0)  # no cleanup call: atexit must do it
try:
    time.sleep(300)
finally:
    lab.cleanup()
"""


@contextmanager
def lab_child(mode: str) -> Iterator[tuple[subprocess.Popen, dict]]:
    """A child process holding a lab; yields (process, what it printed). Killed and swept if still running."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            raise AssertionError(f"lab child did not start: {proc.communicate()[1]}")
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            sweep_stale()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.lab
def test_sweep_after_crash_leaves_live_runs_alone(lab):
    with lab_child("crash") as (proc, info):
        assert set(info["namespaces"]) <= netns_names()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    sleeper_pid, sleeper_start = info["sleeper"]

    removed = sweep_stale()

    # (A concurrent test session may have swept it first; then only the end state below tells.)
    mine = [line for line in removed if info["run_id"] in line]
    assert not mine or any(f"pid {sleeper_pid}" in line for line in mine), removed
    assert not procs.is_alive(sleeper_pid, sleeper_start)
    assert_run_gone(info["run_id"], info["namespaces"])
    # The live lab of this test process is untouched.
    assert set(lab.namespaces) <= netns_names()
    assert registry.path_for(lab.run_id).exists()
    assert lab.ping("rtu1", lab.addr("scada"))


@pytest.mark.lab
@needs_lab
def test_sweep_removes_orphan_namespaces():
    orphan = f"wkt-{layout.new_run_id()}-rtu1"  # a run id with no registry file
    subprocess.run(["ip", "netns", "add", orphan], check=True)
    try:
        sleeper = subprocess.Popen(["ip", "netns", "exec", orphan, "sleep", "300"])
        wait_for(lambda: procs.comm(sleeper.pid) == "sleep", what="sleep to start")
        removed = sweep_stale()
        assert any(orphan in line for line in removed), removed
        assert orphan not in netns_names()
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
    finally:
        subprocess.run(["ip", "netns", "del", orphan], capture_output=True)


@pytest.mark.lab
@needs_lab
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c", "exit"])
def test_process_ending_cleans_up(how):
    with lab_child("exit" if how == "exit" else "wait") as (proc, info):
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        err = proc.stderr.read()
    if how == "sigterm":
        assert "LabTerminated" in err
    assert "cleanup incomplete" not in err
    assert not procs.is_alive(*info["sleeper"])
    assert_run_gone(info["run_id"], info["namespaces"])


# -- wireguard-go -----------------------------------------------------------------------------------------------


def wg_socket(name: str) -> Path:
    return uapi.WG_RUN_DIR / f"{name}.sock"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def wireguard_go_in(lab: Lab, role: str) -> list[int]:
    return [p for p in procs.pids_in_netns({netns_id(lab.ns(role))}) if procs.comm(p) == "wireguard-go"]


@pytest.mark.lab
def test_wireguard_go_stopped_and_sockets_removed(lab):
    client = lab.engineer_ifname("eng1")  # prefix "we"+run_id is registered by the lab itself
    foreground = lab.spawn(
        "eng1", ["wireguard-go", "-f", client], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Like one of the agent's lane boxes: a daemonised wireguard-go in an anonymous namespace of its own,
    # neither our child nor inside a lab namespace. Only its UAPI prefix ties it to this run.
    lane = f"wk{lab.agent_tag}lane"
    lab.register_uapi_prefix(f"wk{lab.agent_tag}")
    lab.exec("rtr", ["unshare", "--net", "--", "wireguard-go", lane])
    wait_for(lambda: wg_socket(client).exists() and wg_socket(lane).exists(), what="UAPI sockets")
    (daemon,) = [p for p in procs.all_pids() if procs.comm(p) == "wireguard-go" and lane in _cmdline(p)]
    lab_netns = {netns_id(ns) for ns in lab.namespaces}
    assert procs.netns_of(daemon) not in lab_netns
    starts = {pid: procs.start_time(pid) for pid in (foreground.pid, daemon)}
    assert f"wk{lab.agent_tag}" in json.loads(registry.path_for(lab.run_id).read_text())["uapi_prefixes"]

    lab.cleanup()

    assert lab.cleanup_errors == []
    assert foreground.returncode is not None
    assert not any(procs.is_alive(pid, start) for pid, start in starts.items())
    assert any(f"pid {daemon} (wireguard-go {lane}.sock)" in line for line in lab.cleanup_report)
    assert not wg_socket(client).exists() and not wg_socket(lane).exists()
    assert_run_gone(lab.run_id, lab.namespaces)


@pytest.mark.lab
def test_uapi_step_finds_daemonised_wireguard_go_and_unlinks_stale_sockets(lab):
    prefix = f"wk{lab.agent_tag}"
    lab.register_uapi_prefix(prefix)
    name = f"{prefix}uapi"
    lab.exec("rtr", ["wireguard-go", name])
    wait_for(lambda: wg_socket(name).exists(), what="UAPI socket")
    (daemon,) = wireguard_go_in(lab, "rtr")
    # The daemon's parent called listen() and exited, so SO_PEERCRED names a dead process (wireguard-go
    # 0.0.20220316): this exercises the search for the process that really holds the socket.
    stale = wg_socket(f"{prefix}stale")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # bound but never listening, then closed: refuses connections
    start = procs.start_time(daemon)

    actions, errors = uapi.stop_prefix(prefix)

    assert errors == []
    assert not procs.is_alive(daemon, start)
    assert not wg_socket(name).exists() and not stale.exists()
    assert any(f"pid {daemon}" in a for a in actions) and any("stale" in a for a in actions)
