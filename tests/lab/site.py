"""A wicket site in the lab: the real agent process on the router, engineers with real WireGuard clients,
devices running servers. Used by the lab tests, the benchmarks and the demo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from nodeagent.control import ControlError, call
from nodeagent.keys import generate_private, public_of
from nodeagent.wgquick import render
from nodeagent.wire import DesiredNodeState, LaneSpec

from .topology import Lab

REPO = Path(__file__).resolve().parents[2]
AGENT = [sys.executable, "-m", "nodeagent.cli"]
TUNNEL_NET = "100.64.0.0/16"
NODE_ID = "site-1"


def py(module: str, *args: str) -> list[str]:
    """argv that runs one of our modules with this interpreter, from any namespace."""
    return ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", module, *args]


class AgentProcess:
    """`wicket-agent run` in the router namespace, driven over its control socket."""

    def __init__(self, lab: Lab, state_dir: str | None = None, extra: list[str] | None = None):
        self.lab = lab
        self.state_dir = state_dir or tempfile.mkdtemp(prefix=f"wicket-{lab.run_id}-")
        self.log_path = os.path.join(self.state_dir, "agent.log")
        # This machine's kernel may well report its clock unsynchronised (containers, CI): the lab says so
        # explicitly; the clock refusal has its own tests.
        self.extra = extra if extra is not None else ["--clock-sync", "warn"]
        self.proc: subprocess.Popen | None = None
        self.generation = 0
        lab.register_uapi_prefix("wk" + lab.agent_tag)

    @property
    def socket(self) -> str:
        return os.path.join(self.state_dir, "control.sock")

    def start(self, timeout: float = 15) -> AgentProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = self.lab.spawn(
            "rtr",
            py("nodeagent.cli", "run", "--state-dir", self.state_dir, "--tag", self.lab.agent_tag, "--node-id", NODE_ID, *self.extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.status()
                return self
            except (ControlError, OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError(f"agent did not come up:\n{self.log()}")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text()
        except OSError:
            return ""

    def call(self, request: dict) -> dict:
        return call(self.socket, request)

    def apply(self, lanes: list[LaneSpec], generation: int | None = None, *, baseline=None, grants=()) -> dict:
        self.generation = generation if generation is not None else self.generation + 1
        desired = DesiredNodeState(
            node_id=NODE_ID,
            generation=self.generation,
            settings={"tunnel_networks": [TUNNEL_NET], "endpoint_host": self.lab.router_wan},
            lanes=lanes,
            baseline=baseline,
            grants=list(grants),
        )
        answer = self.call({"op": "apply", "desired": desired.model_dump(mode="json")})
        if not answer.get("ok"):
            raise RuntimeError(answer.get("error"))
        return answer["report"]

    def status(self) -> dict:
        return self.call({"op": "status"})["status"]

    def lane(self, session_id: str) -> dict | None:
        return next((x for x in self.status()["lanes"] if x["session_id"] == session_id), None)

    def close(self, session_id: str) -> dict:
        return self.call({"op": "close", "session_id": session_id})

    def evidence(self) -> list[dict]:
        return list(self.call({"op": "evidence"})["evidence"].values())

    def evidence_for(self, session_id: str, timeout: float = 5) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.evidence() if e["session_id"] == session_id]
            if found or time.monotonic() > deadline:
                if not found:
                    raise AssertionError(f"no evidence for {session_id}")
                return found[-1]
            time.sleep(0.05)

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def remove_state(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def stop(self, reset: bool = True) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if reset:
            try:
                self.call({"op": "reset"})
            except (ControlError, OSError):
                pass
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Engineer:
    """An engineer's laptop: a WireGuard key pair and the standard wg-quick client."""

    def __init__(self, lab: Lab, role: str):
        self.lab, self.role = lab, role
        self.private_key = generate_private()
        self.public_key = public_of(self.private_key)
        self.ifname = lab.engineer_ifname(role)
        self.dir = tempfile.mkdtemp(prefix=f"wicket-{lab.run_id}-{role}-")
        self.conf: str | None = None
        self.up_ = False

    @property
    def address(self) -> str:
        return self.lab.addr(self.role)

    def config_for(self, lane: LaneSpec, node_public_key: str) -> str:
        return render(lane, node_public_key=node_public_key, endpoint_host=self.lab.router_wan, engineer_private_key=self.private_key)

    def up(self, conf_text: str) -> None:
        if self.up_:
            self.down()
        path = os.path.join(self.dir, f"{self.ifname}.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(conf_text)
        self.conf = path
        res = self.lab.exec(self.role, ["wg-quick", "up", path], check=False)
        if res.returncode != 0:
            raise RuntimeError(f"wg-quick up failed: {res.stderr}")
        self.up_ = True

    def down(self) -> None:
        if self.up_ and self.conf:
            self.lab.exec(self.role, ["wg-quick", "down", self.conf], check=False)
        self.up_ = False

    def forget(self) -> None:
        """Down, and the key and config files gone."""
        self.down()
        shutil.rmtree(self.dir, ignore_errors=True)

    def route_everything_into_tunnel(self, peer_public_key: str, destinations: list[str]) -> None:
        """What a curious contractor does: send other destinations into the lane too."""
        self.lab.exec(self.role, ["wg", "set", self.ifname, "peer", peer_public_key, "allowed-ips", "0.0.0.0/0"])
        for dst in destinations:
            self.lab.exec(self.role, ["ip", "route", "replace", f"{dst}/32", "dev", self.ifname])

    def probe(self, host: str, port: int, udp: bool = False, timeout: float = 1.0, source: str | None = None) -> str:
        argv = py("tests.lab.traffic", "probe", host, str(port), "--timeout", str(timeout)) + (["--udp"] if udp else [])
        argv += ["--source", source] if source else []
        return self.lab.exec(self.role, argv, timeout=timeout + 10).stdout.strip()

    def run(self, *args: str, timeout: float = 60) -> dict:
        res = self.lab.exec(self.role, py("tests.lab.traffic", *args), timeout=timeout)
        return json.loads(res.stdout.strip().splitlines()[-1])

    def start(self, *args: str) -> subprocess.Popen:
        return self.lab.spawn(self.role, py("tests.lab.traffic", *args), stdout=subprocess.PIPE, text=True)


def serve(lab: Lab, role: str, tcp=(2404,), udp=(), sink=(), push=(), v6: bool = False) -> subprocess.Popen:
    proc = lab.spawn(
        role,
        py("tests.lab.traffic", "serve", "--tcp", ",".join(map(str, tcp)), "--udp", ",".join(map(str, udp)), "--sink", ",".join(map(str, sink)),
           "--push", ",".join(map(str, push)), *(["--v6"] if v6 else [])),
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"server in {role} did not start: {line!r}")
    return proc


def lane_for(engineer: Engineer, device_addr: str, session_id: str, seconds: float, *, port: int = 2404,
             transport: str = "tcp", listen_port: int = 51820, index: int = 2, device_id: str = "RTU-1",
             service: str = "iec104", sources: list[str] | None = None) -> LaneSpec:
    return LaneSpec(
        session_id=session_id,
        device_id=device_id,
        engineer_public_key=engineer.public_key,
        engineer_address=f"100.64.{index // 250}.{index % 250 + 2}",
        device_address=device_addr,
        service=service,
        flows=[{"transport": transport, "port": port}],
        listen_port=listen_port,
        engineer_sources=sources or [],
        end_time=datetime.now(UTC) + timedelta(seconds=seconds),
    )


def device_meter(lab: Lab, role: str, proto: str, port: int) -> None:
    """Count, inside the device, the IP bytes that reach it on proto/port (independent of the router)."""
    lab.exec(role, ["nft", f"add table inet devmeter; add chain inet devmeter input {{ type filter hook input priority 0; }}; "
                           f"add rule inet devmeter input {proto} dport {port} counter"])


def device_meter_bytes(lab: Lab, role: str) -> int:
    out = json.loads(lab.exec(role, ["nft", "-j", "list", "chain", "inet", "devmeter", "input"]).stdout)
    return next(e["counter"]["bytes"] for r in out["nftables"] if "rule" in r for e in r["rule"]["expr"] if "counter" in e)


def router_leftovers(lab: Lab) -> dict[str, list[str]]:
    """Everything of the agent's lanes still in the kernel: interfaces, elements, marked connections."""
    prefix = "wk" + lab.agent_tag
    links = [line.split()[0].split("@")[0] for line in lab.exec("rtr", ["ip", "-br", "link"]).stdout.splitlines() if line.startswith(prefix)]
    table = lab.exec("rtr", ["nft", "list", "table", "inet", "wicket"], check=False).stdout
    lane_name = re.compile(rf"\b{prefix}[a-z0-9]{{{15 - len(prefix)}}}\b")
    elements = [line.strip() for line in table.splitlines() if lane_name.search(line)]
    ct = lab.exec("rtr", ["conntrack", "-L"], check=False).stdout
    marked = [line for line in ct.splitlines() if _wicket_mark(line)]
    sockets = [p for p in os.listdir("/var/run/wireguard") if p.startswith(prefix)] if os.path.isdir("/var/run/wireguard") else []
    return {"links": links, "elements": elements, "connections": marked, "uapi": sockets}


def _wicket_mark(line: str) -> bool:
    for part in line.split():
        if part.startswith("mark="):
            return (int(part[5:]) >> 24) in (0x56, 0x57)
    return False


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
