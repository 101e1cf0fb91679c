"""The payload recorder against the real kernel: two namespaces joined by a veth (Ethernet) with a real
wireguard-go tunnel over it (a TUN device, layer 3 — what a lane is). Known traffic goes through; the file
is read back by the real tcpdump and by a small pcap reader here, and compared with the interfaces' own
kernel counters, which count exactly the packets a recorder on that interface sees."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nodeagent import recording
from nodeagent.keys import b64_to_hex, generate_pair
from nodeagent.recording import LINKTYPE_ETHERNET, LINKTYPE_RAW, Recorder, RecordingError
from nodeagent.wg import uapi as wg_uapi
from tests.lab import cleanup, layout, procs, registry
from tests.lab.nsutil import in_netns, ip_batch, write_sysctls

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not shutil.which("wireguard-go") or not shutil.which("tcpdump"),
                       reason="needs wireguard-go and tcpdump"),
]

UNDER_A, UNDER_B = "192.0.2.1", "192.0.2.2"  # the veth: WireGuard's encrypted UDP
TUN_A, TUN_B = "198.51.100.1", "198.51.100.2"  # inside the tunnel: what a lane carries
WG_PORT = 51820
PATTERN = bytes.fromhex("c0ffee42")


class Pair:
    """Namespaces a and b: veth va–vb, and a WireGuard tunnel wr<run>a–wr<run>b (wireguard-go, TUN).

    Registered with the lab's run registry first, so a crashed run is swept by the next test session (and a
    concurrent session's sweep leaves this one alone); torn down by the lab's own teardown."""

    def __init__(self):
        self.run = layout.new_run_id()
        self.a, self.b = layout.netns_name(self.run, "a"), layout.netns_name(self.run, "b")
        self.wg_a, self.wg_b = f"wr{self.run}a", f"wr{self.run}b"
        self.record = registry.RunRecord.for_current_process(self.run)
        self.record.namespaces = [self.a, self.b]
        self.record.uapi_prefixes = [f"wr{self.run}"]
        self.children: dict[int, subprocess.Popen] = {}
        self.wg_procs: dict[str, subprocess.Popen] = {}
        registry.create(self.record)

    def build(self) -> None:
        ip_batch([f"netns add {self.a}", f"netns add {self.b}"])
        for ns in (self.a, self.b):
            write_sysctls(ns, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        ip_batch([
            "link set lo up",
            f"link add va type veth peer name vb netns {self.b}",
            f"addr add {UNDER_A}/24 dev va",
            "link set va up",
        ], netns=self.a)
        ip_batch(["link set lo up", f"addr add {UNDER_B}/24 dev vb", "link set vb up"], netns=self.b)
        (ka, pa), (kb, pb) = generate_pair(), generate_pair()
        self._wireguard(self.a, self.wg_a, ka, pb, UNDER_B, TUN_A, TUN_B)
        self._wireguard(self.b, self.wg_b, kb, pa, UNDER_A, TUN_B, TUN_A)

    def _wireguard(self, ns, ifname, private, peer, endpoint, addr, peer_addr) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LOG_LEVEL": "error",
               "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        argv = ["wireguard-go", "-f", ifname]
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.children[proc.pid] = self.wg_procs[ns] = proc
        self.record.spawned.append({"pid": proc.pid, "start": procs.start_time(proc.pid), "netns": ns, "argv": argv})
        registry.save(self.record)
        wg_uapi.set_device(ifname, [
            f"private_key={b64_to_hex(private)}", f"listen_port={WG_PORT}", "replace_peers=true",
            f"public_key={b64_to_hex(peer)}", f"endpoint={endpoint}:{WG_PORT}", f"allowed_ip={peer_addr}/32",
        ], timeout=5)
        ip_batch([f"addr add {addr}/24 dev {ifname}", f"link set {ifname} up"], netns=ns)

    def teardown(self) -> list[str]:
        return cleanup.teardown(self.record, self.children).errors

    def fd(self, ns: str) -> int:
        return os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)

    def counters(self, ns: str, ifname: str) -> tuple[int, int]:
        """(packets, bytes) through the interface, both directions, as the kernel counts them."""
        out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", ifname],
                             capture_output=True, text=True, check=True).stdout
        st = json.loads(out)[0]["stats64"]
        return st["rx"]["packets"] + st["tx"]["packets"], st["rx"]["bytes"] + st["tx"]["bytes"]


@pytest.fixture
def pair():
    p = Pair()
    try:
        p.build()
        yield p
    finally:
        errors = p.teardown()
    assert not errors, errors


# ---- traffic ----


def ping(ns: str, dst: str, count: int, size: int = 56, expect_reply: bool = True) -> int:
    """ICMP echo with the payload filled with PATTERN (like `ping -p c0ffee42 -s size`); replies received."""
    def run() -> int:
        got = 0
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
            s.settimeout(1.0)
            payload = (PATTERN * (size // len(PATTERN) + 1))[:size]
            for seq in range(1, count + 1):
                pkt = struct.pack("!BBHHH", 8, 0, 0, 0x5157, seq) + payload
                pkt = pkt[:2] + struct.pack("!H", _checksum(pkt)) + pkt[4:]
                s.sendto(pkt, (dst, 0))
                deadline = time.monotonic() + 1.0
                while expect_reply and time.monotonic() < deadline:
                    try:
                        data = s.recv(65536)
                    except TimeoutError:
                        break
                    icmp = data[(data[0] & 0xF) * 4:]
                    if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (0x5157, seq):
                        got += 1
                        break
        return got
    return in_netns(ns, run)


def tcp_transfer(pair: Pair, nbytes: int, port: int = 5001) -> int:
    """Send exactly nbytes from b to a over the tunnel; what the server received."""
    srv = in_netns(pair.a, lambda: socket.create_server((TUN_A, port)))
    received = []

    def serve():
        conn, _ = srv.accept()
        with conn:
            n = 0
            while chunk := conn.recv(1 << 16):
                n += len(chunk)
            received.append(n)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    cli = in_netns(pair.b, lambda: socket.create_connection((TUN_A, port), timeout=10))
    with cli:
        cli.sendall((PATTERN * (nbytes // 4 + 1))[:nbytes])
        cli.shutdown(socket.SHUT_WR)
        cli.recv(1)  # the server's FIN
    t.join(10)
    srv.close()
    return received[0]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# ---- reading the file back ----


def read_pcap(path: Path) -> tuple[dict, list[tuple[int, int, int, bytes]]]:
    """(header, [(ts_ns, caplen, origlen, data)]), strictly: any trailing byte is an error."""
    raw = path.read_bytes()
    magic, major, minor, _z, _s, snaplen, linktype = struct.unpack_from("<IHHiIII", raw)
    assert magic == 0xA1B23C4D and (major, minor) == (2, 4)
    out, i = [], 24
    while i < len(raw):
        sec, nsec, caplen, origlen = struct.unpack_from("<IIII", raw, i)
        assert i + 16 + caplen <= len(raw), f"incomplete record at {i}"
        out.append((sec * 10**9 + nsec, caplen, origlen, raw[i + 16:i + 16 + caplen]))
        i += 16 + caplen
    return {"snaplen": snaplen, "linktype": linktype}, out


def tcpdump(path: Path, *args: str) -> list[str]:
    res = subprocess.run(["tcpdump", "-r", str(path), "-nn", *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "truncated" not in res.stderr, res.stderr  # "pcap_loop: truncated dump file"
    return res.stdout.splitlines()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tcp_payload(records, linktype: int, src: str, dport: int) -> int:
    """TCP payload bytes from src to dport, each sequence range once (a retransmission counts once)."""
    seen: dict[int, int] = {}
    for _ts, caplen, origlen, data in records:
        assert caplen == origlen
        ip = data[14:] if linktype == LINKTYPE_ETHERNET else data
        if ip[0] >> 4 != 4 or ip[9] != 6 or socket.inet_ntoa(ip[12:16]) != src:
            continue
        ihl = (ip[0] & 0xF) * 4
        tcp = ip[ihl:]
        if struct.unpack("!H", tcp[2:4])[0] != dport:
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        seq = struct.unpack("!I", tcp[4:8])[0]
        n = total - ihl - (tcp[12] >> 4) * 4
        if n:
            seen[seq] = max(seen.get(seq, 0), n)
    return sum(seen.values())


def wall_ns(dt) -> int:
    return int(dt.timestamp() * 1e9)


# ---- tests ----


def test_records_a_tunnel_and_its_underlay_exactly(pair, tmp_path):
    """Both link types at once: the lane's TUN (raw IP) and the veth under it (Ethernet, encrypted UDP).
    What the file holds equals the interfaces' kernel counters over the recording, packet for packet."""
    assert ping(pair.b, TUN_A, 1) == 1  # handshake done before recording: the counts below are the traffic
    fa = pair.fd(pair.a)
    try:
        before_tun, before_veth = pair.counters(pair.a, pair.wg_a), pair.counters(pair.a, "va")
        tun = Recorder(pair.wg_a, tmp_path / "rec" / "tun.pcap", cap_bytes=64 << 20, netns_fd=fa)
        veth = Recorder("va", tmp_path / "rec" / "veth.pcap", cap_bytes=64 << 20, netns_fd=fa)
        t0 = time.monotonic()
        tun.start()
        veth.start()
        assert time.monotonic() - t0 < 0.5
        assert ping(pair.b, TUN_A, 5, size=200) == 5
        sent = 3_000_000
        assert tcp_transfer(pair, sent) == sent
        time.sleep(0.3)  # the last ACKs and FINs are on the wire
        t0 = time.monotonic()
        r_tun, r_veth = tun.stop(), veth.stop()
        assert time.monotonic() - t0 < 1.0  # what was queued is written: nothing is queued by now
        after_tun, after_veth = pair.counters(pair.a, pair.wg_a), pair.counters(pair.a, "va")
    finally:
        os.close(fa)

    for r, path, linktype, before, after in (
        (r_tun, tmp_path / "rec" / "tun.pcap", LINKTYPE_RAW, before_tun, after_tun),
        (r_veth, tmp_path / "rec" / "veth.pcap", LINKTYPE_ETHERNET, before_veth, after_veth),
    ):
        assert r.end_reason == "stopped" and not r.truncated and r.kernel_drops == 0, r
        assert r.linktype == linktype
        header, records = read_pcap(path)
        assert header["linktype"] == linktype
        assert r.size == path.stat().st_size and r.sha256 == sha256(path)
        assert r.packets == len(records) and r.bytes == sum(o for _t, _c, o, _d in records)
        # Exact: a packet socket on an interface sees each packet its counters count. The counters are read
        # just before start and just after stop, when the interfaces are quiet (no IPv6; the tunnel's
        # handshake and the neighbours were settled by the first ping).
        assert (r.packets, r.bytes) == (after[0] - before[0], after[1] - before[1])
        assert all(wall_ns(r.started_at) <= ts <= wall_ns(r.stopped_at) for ts, *_ in records)
        assert len(tcpdump(path)) == r.packets
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "rec").stat().st_mode) == 0o700

    _h, records = read_pcap(tmp_path / "rec" / "tun.pcap")
    assert tcp_payload(records, LINKTYPE_RAW, TUN_B, 5001) == sent
    lines = tcpdump(tmp_path / "rec" / "tun.pcap", "icmp")
    assert sum(f"IP {TUN_B} > {TUN_A}: ICMP echo request" in line for line in lines) == 5
    assert sum(f"IP {TUN_A} > {TUN_B}: ICMP echo reply" in line for line in lines) == 5
    echoes = [d for _t, _c, _o, d in records if d[9] == 1 and d[20] == 8]
    assert len(echoes) == 5 and all(d[28:] == (PATTERN * 50)[:200] for d in echoes)  # the payload, byte for byte
    assert f"{TUN_B}" in "".join(tcpdump(tmp_path / "rec" / "tun.pcap", "tcp port 5001"))

    lines = tcpdump(tmp_path / "rec" / "veth.pcap", "-e")
    assert all("ethertype IPv4" in line and f".{WG_PORT}: UDP" in line for line in lines), lines[:5]
    assert all(TUN_A not in line for line in lines)  # encrypted: the inner addresses do not show


def test_the_cap_stops_writing_and_the_file_stays_valid(pair, tmp_path):
    assert ping(pair.b, TUN_A, 1) == 1
    path = tmp_path / "capped.pcap"
    cap = 5000
    fa = pair.fd(pair.a)
    try:
        before = pair.counters(pair.a, pair.wg_a)
        rec = Recorder(pair.wg_a, path, cap_bytes=cap, netns_fd=fa)
        rec.start()
        assert ping(pair.b, TUN_A, 10, size=972) == 10  # 1000-byte IP packets: 1016 bytes a record
        r = rec.stop()
        after = pair.counters(pair.a, pair.wg_a)
    finally:
        os.close(fa)
    assert r.truncated and r.size == path.stat().st_size <= cap
    assert r.packets == 4 and r.size == 24 + 4 * 1016  # the fifth would have crossed the cap
    assert r.dropped_by_cap == 16 and r.bytes_dropped_by_cap == 16 * 1000
    assert r.packets + r.dropped_by_cap == after[0] - before[0]  # seen = written + counted
    assert r.sha256 == sha256(path)
    assert len(tcpdump(path)) == 4
    assert any("cap of 5000 bytes" in n for n in r.notes)


def test_a_failed_disk_write_leaves_a_valid_file(pair, tmp_path):
    """The disk refuses mid-recording (here RLIMIT_FSIZE, as a full disk would): the file is cut back to
    its last whole record and what could not be written is counted."""
    assert ping(pair.b, TUN_A, 1) == 1
    path = tmp_path / "full.pcap"
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    try:
        with pair_ns(pair, pair.a) as fa:
            before = pair.counters(pair.a, pair.wg_a)
            rec = Recorder(pair.wg_a, path, cap_bytes=1 << 20, netns_fd=fa)
            rec.start()
            resource.setrlimit(resource.RLIMIT_FSIZE, (3000, old_limit[1]))
            assert ping(pair.b, TUN_A, 2) == 2  # 4 records of 100 bytes
            time.sleep(0.6)  # written
            assert ping(pair.b, TUN_A, 10, size=972) == 10  # 20 records of 1016 bytes: do not fit
            r = rec.stop()
            after = pair.counters(pair.a, pair.wg_a)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert r.truncated and any("writing the file failed" in n for n in r.notes), r
    # Which records made it depends on how the writer's chunks fell; that the file is whole does not.
    assert 4 <= r.packets < 24 and r.size == path.stat().st_size <= 3000
    assert r.dropped_by_cap > 0 and r.packets + r.dropped_by_cap == after[0] - before[0]
    assert r.sha256 == sha256(path) and len(tcpdump(path)) == r.packets == len(read_pcap(path)[1])


def test_snaplen_keeps_the_original_length(pair, tmp_path):
    assert ping(pair.b, TUN_A, 1) == 1
    path = tmp_path / "snap.pcap"
    with pair_ns(pair, pair.a) as fa:
        rec = Recorder(pair.wg_a, path, cap_bytes=1 << 20, netns_fd=fa, snaplen=64)
        rec.start()
        assert ping(pair.b, TUN_A, 3, size=972) == 3
        r = rec.stop()
    header, records = read_pcap(path)
    assert header["snaplen"] == 64 and r.packets == 6
    assert all(c == 64 and o == 1000 for _t, c, o, _d in records) and r.bytes == 6000
    assert len(tcpdump(path)) == 6


def test_resume_appends_and_rehashes(pair, tmp_path):
    assert ping(pair.b, TUN_A, 1) == 1
    path = tmp_path / "resumed.pcap"
    with pair_ns(pair, pair.a) as fa:
        first = Recorder(pair.wg_a, path, cap_bytes=1 << 20, netns_fd=fa)
        first.start()
        assert ping(pair.b, TUN_A, 3) == 3
        r1 = first.stop()
        assert r1.packets == 6
        # the agent died in the middle of a record: a whole header, part of the data
        with open(path, "ab") as f:
            f.write(struct.pack("<IIII", 1, 2, 84, 84) + b"\x45" * 30)
        second = Recorder(pair.wg_a, path, cap_bytes=1 << 20, netns_fd=fa, resume=True, prior=r1.to_dict())
        second.start()
        assert ping(pair.b, TUN_A, 2) == 2
        r2 = second.stop()
        # a recording that had reached its cap before the restart stays capped
        third = Recorder(pair.wg_a, path, cap_bytes=1 << 20, netns_fd=fa, resume=True,
                         prior={**r2.to_dict(), "truncated": True})
        third.start()
        assert ping(pair.b, TUN_A, 1) == 1
        r3 = third.stop()
    assert (r3.packets, r3.dropped_by_cap, r3.sha256) == (10, 2, r2.sha256)
    assert r2.resumed and r2.packets == 10 and r2.started_at == r1.started_at
    assert r2.sha256 == sha256(path) and r2.size == path.stat().st_size
    assert any("cut 46 bytes" in n for n in r2.notes), r2.notes
    _h, records = read_pcap(path)
    assert len(records) == 10
    assert hashlib.sha256(path.read_bytes()[:r1.size]).hexdigest() == r1.sha256  # appended, not rewritten
    assert sum("echo request" in line for line in tcpdump(path)) == 5


def test_resume_refuses_what_it_must_not_append_to(pair, tmp_path):
    with pair_ns(pair, pair.a) as fa:
        tun_file = tmp_path / "tun.pcap"
        rec = Recorder(pair.wg_a, tun_file, cap_bytes=1 << 20, netns_fd=fa)
        rec.start()
        rec.stop()
        with pytest.raises(RecordingError, match="link type 101"):
            Recorder("va", tun_file, cap_bytes=1 << 20, netns_fd=fa, resume=True).start()
        junk = tmp_path / "junk.pcap"
        junk.write_bytes(b"not a pcap file at all, no")
        with pytest.raises(RecordingError, match="not a pcap"):
            Recorder("va", junk, cap_bytes=1 << 20, netns_fd=fa, resume=True).start()
        assert junk.read_bytes() == b"not a pcap file at all, no"  # left as it was
        # garbage in the middle is damage, not a crash: the recording ends with an error, the file is kept
        with open(tun_file, "ab") as f:
            f.write(struct.pack("<IIII", 1, 2, 999_999, 10) + b"\x01" * 64)
        kept = tun_file.read_bytes()
        damaged = Recorder(pair.wg_a, tun_file, cap_bytes=1 << 20, netns_fd=fa, resume=True)
        damaged.start()
        assert damaged.wait(2)
        r = damaged.stop()
        assert r.end_reason == "error" and any("damaged at byte 24" in n for n in r.notes), r
        assert tun_file.read_bytes() == kept
        with pytest.raises(RecordingError, match="no interface"):
            Recorder("nosuchif0", tmp_path / "x.pcap", cap_bytes=1 << 20, netns_fd=fa).start()


def test_a_vanished_interface_ends_the_recorder(pair, tmp_path):
    assert ping(pair.b, TUN_A, 1) == 1
    with pair_ns(pair, pair.a) as fa:
        tun = Recorder(pair.wg_a, tmp_path / "tun.pcap", cap_bytes=1 << 20, netns_fd=fa)
        veth = Recorder("va", tmp_path / "veth.pcap", cap_bytes=1 << 20, netns_fd=fa)
        tun.start()
        veth.start()
        assert ping(pair.b, TUN_A, 2) == 2
        # down and up again is not the end
        ip_batch(["link set va down", "link set va up"], netns=pair.a)
        time.sleep(0.3)
        assert veth.running and tun.running
        # the lane is torn down: wireguard-go exits and its TUN goes; then the veth is deleted
        proc = pair.wg_procs[pair.a]
        proc.terminate()
        proc.wait(5)
        assert tun.wait(3), "the recorder did not notice its TUN going away"
        ip_batch(["link del va"], netns=pair.a)
        assert veth.wait(3), "the recorder did not notice its veth going away"
        t0 = time.monotonic()
        r_tun, r_veth = tun.stop(), veth.stop()
        assert time.monotonic() - t0 < 0.2
    for r in (r_tun, r_veth):
        assert r.end_reason == "interface gone" and r.sha256 == sha256(Path(r.path)), r
        assert len(tcpdump(Path(r.path))) == r.packets
    assert r_tun.packets >= 4
    assert any("went down" in n for n in r_veth.notes), r_veth.notes


def test_kernel_drops_are_counted_not_hidden(pair, tmp_path):
    """A recorder that falls behind loses copies, never the lane's packets; it reports how many."""
    assert ping(pair.b, TUN_A, 1) == 1
    path = tmp_path / "slow.pcap"
    with pair_ns(pair, pair.a) as fa:
        before = pair.counters(pair.a, pair.wg_a)
        rec = Recorder(pair.wg_a, path, cap_bytes=64 << 20, netns_fd=fa, rcvbuf=64 << 10)
        rec.start()
        with rec._lock:  # stall the capture thread: the socket buffer fills
            assert ping(pair.b, TUN_A, 200, size=972) == 200  # the lane is not slowed down: every echo answered
        r = rec.stop()
        after = pair.counters(pair.a, pair.wg_a)
    assert r.kernel_drops > 0
    assert r.packets + r.kernel_drops == after[0] - before[0]
    assert r.sha256 == sha256(path) and len(tcpdump(path)) == r.packets


def test_stop_is_bounded_when_the_disk_hangs(pair, tmp_path, monkeypatch):
    assert ping(pair.b, TUN_A, 1) == 1
    hang = threading.Event()
    real_write = recording._write_all

    def hanging_write(fd, data, offset):
        hang.wait(10)
        real_write(fd, data, offset)

    path = tmp_path / "hung.pcap"
    with pair_ns(pair, pair.a) as fa:
        rec = Recorder(pair.wg_a, path, cap_bytes=1 << 20, netns_fd=fa)
        rec.start()
        monkeypatch.setattr(recording, "_write_all", hanging_write)  # the header is written: now the disk hangs
        assert ping(pair.b, TUN_A, 3) == 3
        t0 = time.monotonic()
        r = rec.stop(timeout=0.5)
        assert time.monotonic() - t0 < 1.0
        assert r.end_reason == "incomplete" and r.size == 24 and r.packets == 6, r
        hang.set()  # the disk is back: the file is still completed, and stays a valid pcap
        assert rec.wait(5)
    assert len(tcpdump(path)) == 6


class pair_ns:
    """An fd on one of the pair's namespaces, closed afterwards."""

    def __init__(self, pair: Pair, ns: str):
        self.fd = pair.fd(ns)

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
