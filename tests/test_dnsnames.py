"""NameWatcher against a real resolver: a dnsmasq on 127.0.0.1 that answers only from a hosts file we write.

dnsmasq runs with --no-resolv --local=/test/ and no upstream server, so it never forwards anything; it
answers names under .test from the hosts file (NXDOMAIN otherwise) and REFUSED for any other domain.
Most tests step an injected clock (the queries are still real); the outage test at the end runs in real time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import dns.message
import dns.query
import pytest

from nodeagent.dnsnames import NameWatcher
from nodeagent.errors import PermanentError

DNSMASQ = shutil.which("dnsmasq") or next((p for p in ("/usr/sbin/dnsmasq",) if os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq is not installed (Debian package dnsmasq-base; "
                                                        "`make setup` installs it)")

A = "a.wicket.test"
B = "b.wicket.test"
WALL0 = 1_700_000_000.0


class Dnsmasq:
    """One dnsmasq answering from `hosts`; the test controls it by its PID only."""

    def __init__(self, workdir: Path, ttl: int):
        self.workdir, self.ttl = workdir, ttl
        self.hosts_file = workdir / "hosts"
        self.log = workdir / "dnsmasq.log"
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    def hosts(self, entries: dict[str, list[str]]) -> None:
        lines = [f"{addr} {name}" for name, addrs in entries.items() for addr in addrs]
        self.hosts_file.write_text("".join(line + "\n" for line in lines))
        self.hosts_file.chmod(0o644)

    def start(self) -> None:
        cmd = [DNSMASQ, "--conf-file=/dev/null", "--no-resolv", "--no-hosts", f"--addn-hosts={self.hosts_file}",
               f"--local-ttl={self.ttl}", f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
               "--no-daemon", "--local=/test/", f"--pid-file={self.workdir / 'dnsmasq.pid'}", "--log-facility=-"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 5
        query = dns.message.make_query("ready.wicket.test.", "A")
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.2)
                return
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dnsmasq did not answer in 5 s: {self.log.read_text()}") from None
                time.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, sig)

    def reload(self, entries: dict[str, list[str]]) -> None:
        """New hosts file, then SIGHUP (re-reads it and clears the cache); waits until it answers from it."""
        self.hosts(entries)
        self.signal(signal.SIGHUP)
        want = sorted(entries.get(A, []))
        deadline = time.monotonic() + 5
        while _ask(self.port, A) != want:
            assert time.monotonic() < deadline, "dnsmasq did not take the new hosts file"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM until continued
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def dnsmasq(tmp_path, request):
    tmp_path.chmod(0o755)
    server = Dnsmasq(tmp_path, ttl=getattr(request, "param", 30))
    server.hosts({A: ["192.0.2.11", "192.0.2.10"], B: ["198.51.100.7"]})
    try:
        server.start()
        yield server
    finally:
        server.stop()


class FakeTime:
    def __init__(self):
        self.t = 1000.0

    def mono(self) -> float:
        return self.t

    def wall(self) -> float:
        return WALL0 + self.t - 1000.0


def _watcher(server: Dnsmasq, t: FakeTime | None = None, **kw) -> NameWatcher:
    args = dict(min_ttl_s=1, stale_s=3, retry_s=1, timeout_s=0.3)
    args.update(kw)
    if t is not None:
        args.update(clock=t.mono, wall=t.wall)
    return NameWatcher([("127.0.0.1", server.port)], **args)


def test_resolves_the_answer_and_reports_it(dnsmasq):
    t = FakeTime()
    w = _watcher(dnsmasq, t)
    w.want({A, "B.Wicket.Test."})
    assert w.due() == t.t
    assert [(s.fqdn, s.state, s.addresses) for s in w.status()] == [(A, "pending", []), (B, "pending", [])]
    assert w.addresses(A) == []

    assert w.refresh() == [A, B]
    assert w.addresses(A) == ["192.0.2.10", "192.0.2.11"]
    assert w.addresses("b.wicket.test.") == ["198.51.100.7"]
    a = w.status()[0]
    assert (a.fqdn, a.state, a.addresses, a.ttl_s, a.error) == (A, "ok", ["192.0.2.10", "192.0.2.11"], 30, None)
    assert a.resolved_at == datetime.fromtimestamp(WALL0, UTC)
    assert a.stale_until == datetime.fromtimestamp(WALL0 + 30 + 3, UTC)
    assert w.due() == t.t + 30

    w.want({B})
    assert [s.fqdn for s in w.status()] == [B]
    assert w.addresses(A) == []
    w.want(set())
    assert w.due() is None and w.refresh() == []


def test_ttl_is_honoured_then_the_changed_answer_is_taken(dnsmasq):
    t = FakeTime()
    w = _watcher(dnsmasq, t)
    w.want({A})
    assert w.refresh() == [A]
    dnsmasq.reload({A: ["203.0.113.5"], B: ["198.51.100.7"]})

    t.t += 29.9  # the answer still holds: no query, the old set stays
    assert w.refresh() == []
    assert w.addresses(A) == ["192.0.2.10", "192.0.2.11"]

    t.t += 0.1
    assert w.refresh() == [A]
    assert w.addresses(A) == ["203.0.113.5"]
    assert w.due() == t.t + 30

    t.t += 30  # the same answer again is no change
    assert w.refresh() == []
    assert w.addresses(A) == ["203.0.113.5"]


@pytest.mark.parametrize("dnsmasq", [1], indirect=True)
def test_ttl_is_raised_to_the_minimum(dnsmasq):
    t = FakeTime()
    w = _watcher(dnsmasq, t, min_ttl_s=5)
    w.want({A})
    w.refresh()
    assert w.status()[0].ttl_s == 5 and w.due() == t.t + 5


def test_ttl_is_cut_to_the_maximum(dnsmasq):
    t = FakeTime()
    w = _watcher(dnsmasq, t, max_ttl_s=10)
    w.want({A})
    w.refresh()
    assert w.status()[0].ttl_s == 10 and w.due() == t.t + 10


def test_outage_keeps_the_last_set_until_the_stale_limit_then_fails_and_recovers(dnsmasq):
    t = FakeTime()
    w = _watcher(dnsmasq, t)
    w.want({A})
    assert w.refresh() == [A]
    port = dnsmasq.port
    dnsmasq.stop()

    t.t += 30  # expiry: the refresh fails, the set is kept
    assert w.refresh() == [A]
    s = w.status()[0]
    assert (s.state, s.addresses, s.error) == ("stale", ["192.0.2.10", "192.0.2.11"],
                                               f"timeout after 0.3 s asking 127.0.0.1:{port}")
    assert s.resolved_at == datetime.fromtimestamp(WALL0, UTC)
    assert w.due() == t.t + 1

    t.t += 1  # still within stale_until = expiry + 3: no change
    assert w.refresh() == []
    assert w.addresses(A) == ["192.0.2.10", "192.0.2.11"]
    t.t += 1
    assert w.refresh() == []
    t.t += 0.5
    assert w.due() == 1000.0 + 33  # the stale limit itself is due, ahead of the next retry
    assert w.refresh() == []
    t.t = 1000.0 + 33
    assert w.refresh() == [A]
    s = w.status()[0]
    assert (s.state, s.addresses, w.addresses(A)) == ("failed", [], [])
    assert s.stale_until == datetime.fromtimestamp(WALL0 + 33, UTC)
    assert w.due() == t.t + 1

    dnsmasq.start()  # same port, same hosts file
    t.t += 1
    assert w.refresh() == [A]
    s = w.status()[0]
    assert (s.state, s.addresses, s.error) == ("ok", ["192.0.2.10", "192.0.2.11"], None)
    assert s.resolved_at == datetime.fromtimestamp(WALL0 + 34, UTC)


def test_nxdomain_after_a_good_answer_is_stale_not_empty(dnsmasq):
    t = FakeTime()
    w = _watcher(dnsmasq, t)
    w.want({A})
    w.refresh()
    dnsmasq.reload({B: ["198.51.100.7"]})
    t.t += 30
    assert w.refresh() == [A]
    s = w.status()[0]
    assert (s.state, s.addresses, s.error) == ("stale", ["192.0.2.10", "192.0.2.11"], "NXDOMAIN")


def test_never_resolved_names_fail(dnsmasq):
    t = FakeTime()
    dnsmasq.reload({A: ["192.0.2.10"], "sink.wicket.test": ["0.0.0.0"]})
    w = _watcher(dnsmasq, t)
    w.want({"nope.wicket.test", "other.example.org", "sink.wicket.test"})
    assert w.refresh() == ["nope.wicket.test", "other.example.org", "sink.wicket.test"]
    got = {s.fqdn: (s.state, s.addresses, s.ttl_s, s.resolved_at, s.stale_until, s.error) for s in w.status()}
    assert got == {
        "nope.wicket.test": ("failed", [], None, None, None, "NXDOMAIN"),
        "other.example.org": ("failed", [], None, None, None, f"REFUSED from 127.0.0.1:{dnsmasq.port}"),
        "sink.wicket.test": ("failed", [], None, None, None, "no usable A records (0.0.0.0)"),
    }
    assert w.due() == t.t + 1
    t.t += 1
    assert w.refresh() == []  # failed again: no change


def test_at_most_64_addresses_sorted_numerically(dnsmasq):
    addrs = [f"198.51.100.{i}" for i in range(100, 30, -1)]  # 70 addresses
    dnsmasq.reload({A: addrs})
    w = _watcher(dnsmasq, FakeTime())
    w.want({A})
    w.refresh()
    assert w.addresses(A) == [f"198.51.100.{i}" for i in range(31, 95)]
    assert w.status()[0].error == "70 A records: enforcing the lowest 64"


def test_due_names_are_asked_concurrently(dnsmasq):
    names = {f"n{i}.wicket.test" for i in range(32)}
    dnsmasq.signal(signal.SIGSTOP)
    w = _watcher(dnsmasq, timeout_s=0.3)
    w.want(names)
    start = time.monotonic()
    assert w.refresh() == sorted(names)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"32 names took {elapsed:.1f} s (one after the other: 9.6 s)"
    assert {s.error for s in w.status()} == {f"timeout after 0.3 s asking 127.0.0.1:{dnsmasq.port}"}


@pytest.mark.parametrize("dnsmasq", [1], indirect=True)
def test_real_outage_and_recovery_in_real_time(dnsmasq):
    """No fake clock: TTL 1 s, stale_s 2 s, the daemon frozen with SIGSTOP (queries time out)."""
    w = _watcher(dnsmasq, stale_s=2, retry_s=0.4, timeout_s=0.3)
    w.want({A})
    assert w.refresh() == [A]
    good_at = time.monotonic()
    dnsmasq.signal(signal.SIGSTOP)

    seen = []  # (seconds since the good answer, state, addresses) at each change
    while time.monotonic() - good_at < 6:
        time.sleep(max(0.0, w.due() - time.monotonic()))
        if w.refresh():
            seen.append((time.monotonic() - good_at, w.status()[0].state, w.addresses(A)))
            if seen[-1][1] == "failed":
                break
    assert [(state, addrs) for _, state, addrs in seen] == [
        ("stale", ["192.0.2.10", "192.0.2.11"]), ("failed", [])]
    assert 1.0 <= seen[0][0] < 1.0 + 0.3 + 1.5
    assert 3.0 <= seen[1][0] < 3.0 + 0.3 + 1.5  # expiry (1 s) + stale_s (2 s), plus one query's timeout
    assert w.status()[0].error == f"timeout after 0.3 s asking 127.0.0.1:{dnsmasq.port}"

    dnsmasq.signal(signal.SIGCONT)
    deadline = time.monotonic() + 3
    while w.status()[0].state != "ok":
        assert time.monotonic() < deadline, "did not recover"
        time.sleep(max(0.0, w.due() - time.monotonic()))
        w.refresh()
    assert w.addresses(A) == ["192.0.2.10", "192.0.2.11"]


def test_nameservers_from_resolv_conf(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.org\nnameserver 127.0.0.1\nnameserver ::1\n")
    assert NameWatcher(None, resolv_conf=str(conf)).nameservers == [("127.0.0.1", 53), ("::1", 53)]
    conf.write_text("search example.org\n")
    with pytest.raises(PermanentError, match="no nameservers"):
        NameWatcher(None, resolv_conf=str(conf))


def test_bad_arguments():
    with pytest.raises(ValueError):
        NameWatcher([])
    with pytest.raises(ValueError):
        NameWatcher([("not-an-ip", 53)])
    with pytest.raises(ValueError):
        NameWatcher([("127.0.0.1", 0)])
    with pytest.raises(ValueError):
        NameWatcher([("127.0.0.1", 53)], min_ttl_s=10, max_ttl_s=5)


def _ask(port: int, name: str) -> list[str]:
    try:
        r, _tcp = dns.query.udp_with_fallback(dns.message.make_query(name + ".", "A"), "127.0.0.1", port=port,
                                              timeout=0.5)
    except (dns.exception.Timeout, OSError):
        return []
    return sorted(rr.address for rrset in r.answer for rr in rrset)


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port on 127.0.0.1")
