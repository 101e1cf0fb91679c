"""Real peers for lab hosts: a DNS resolver (dnsmasq), an MQTT broker (mosquitto), port scans (nmap).

Each runs in one lab namespace, is started through `Lab.spawn` (so the lab's cleanup kills it by PID
even when a test fails), and listens only on that namespace's own address.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from .topology import Lab


class Dnsmasq:
    """An authoritative-only resolver for a few names, answering from a hosts file with a short TTL. It
    never forwards: `--no-resolv`, no upstream servers."""

    def __init__(self, lab: Lab, role: str, names: dict[str, list[str]], ttl: int = 2):
        self.lab, self.role, self.ttl = lab, role, ttl
        self.dir = Path(tempfile.mkdtemp(prefix=f"wicket-{lab.run_id}-dns-"))
        self.hosts = self.dir / "hosts"
        self.set(names)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Dnsmasq:
        addr = self.lab.addr(self.role)
        self.proc = self.lab.spawn(self.role, [
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", f"--addn-hosts={self.hosts}",
            f"--local-ttl={self.ttl}", f"--listen-address={addr}", "--bind-interfaces", "--port=53",
            "--pid-file=", "--user=root", "--conf-file=/dev/null", "--log-facility=-"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited with {self.proc.returncode}")
            if "53" in self.lab.exec(self.role, ["ss", "-lun", "sport = :53"], check=False).stdout:
                return self
            time.sleep(0.05)
        raise RuntimeError("dnsmasq did not listen")

    def set(self, names: dict[str, list[str]]) -> None:
        """Replace the answers (takes effect at `reload`, or at start)."""
        self.hosts.write_text("".join(f"{a} {n}\n" for n, addrs in names.items() for a in addrs))

    def reload(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def pause(self) -> None:
        """An outage: the process stops answering (queries time out)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


def mosquitto(lab: Lab, role: str, port: int = 1883) -> subprocess.Popen:
    """A real mosquitto broker on the host's own address, anonymous clients allowed (lab only)."""
    conf = Path(tempfile.mkdtemp(prefix=f"wicket-{lab.run_id}-mqtt-")) / "mosquitto.conf"
    conf.write_text(f"listener {port} {lab.addr(role)}\nallow_anonymous true\npersistence false\nlog_dest stderr\n")
    proc = lab.spawn(role, ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {proc.stderr.read()}")
        if lab.exec(role, ["ss", "-ltn", f"sport = :{port}"], check=False).stdout.count("LISTEN"):
            return proc
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not listen")


def answering_ports(lab: Lab, role: str, targets: list[str], *, udp: bool = False, ports: str = "1-65535",
                    retries: int | None = None, rate: int | None = None, connect: bool = False,
                    timeout: float = 240) -> dict[tuple[str, int], str]:
    """A full nmap scan from `role`: every (address, port) that answered, with nmap's state. TCP (a SYN scan, or
    with `connect` a full connect scan): the open ports — a reset ("closed") is how the router refuses. UDP: "open" (a reply came back) and also
    "closed" (an ICMP port-unreachable came back), since either means a packet reached a host; silence
    ("open|filtered") is the only answer a refused port may give. IPv6 targets are scanned with -6.

    Through a lane every TCP probe comes back as a reset, so the wireguard-go on either side carries two
    packets per probe: TCP goes at 15 000 probes/s (faster, they overflow its queues and the retries cost
    more than they save), UDP at 40 000 (refused probes are dropped, nothing comes back). A probe is still
    lost now and then: each is sent once more when it got no answer."""
    retries = 1 if retries is None else retries
    rate = (40000 if udp else 15000) if rate is None else rate
    six = ["-6"] if any(":" in t for t in targets) else []
    kind = ["-sU", "--max-rtt-timeout", "300ms"] if udp else ["-sT" if connect else "-sS"]
    argv = ["nmap", "-n", "-Pn", *six, *kind, "-T5", "--max-retries", str(retries), "--min-rate", str(rate), "-p", ports,
            "-oX", "-", *targets]
    out = lab.exec(role, argv, timeout=timeout).stdout
    found = {}
    for host in ET.fromstring(out).iter("host"):
        addr = host.find("address").get("addr")
        for p in host.iter("port"):
            state = p.find("state").get("state")
            if state == "open" or (udp and state == "closed"):
                found[(addr, int(p.get("portid")))] = state
    return found


def open_tcp_ports(lab: Lab, role: str, targets: list[str], ports: str = "1-65535", timeout: float = 240) -> set[tuple[str, int]]:
    """A TCP connect scan (nmap) from `role` of every target: the (address, port) pairs that answered open."""
    return set(answering_ports(lab, role, targets, ports=ports, connect=True, rate=20000, timeout=timeout))
