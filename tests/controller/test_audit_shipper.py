"""The SIEM shipper on the real audit chain (SQLite and PostgreSQL): at-least-once delivery from a
durable per-sink cursor, leases between replicas, sink health, and the sinks file.

The collectors are real: an HTTP event collector in the Splunk HEC style on 127.0.0.1 (tests/siemlab.py)
that goes down for a while under load and comes back, and a real rsyslogd stopped and started again.
Every record must arrive, with contiguous sequence numbers; a duplicate must carry the same seq and hash.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from controller import events
from controller.audit import formats
from controller.audit.shipper import Shipper, sink_health
from controller.audit.sinks import SinkConfigError, load_sinks, parse_sinks
from controller.db import session_factory, transaction
from controller.models import AuditSinkCursor, Event
from tests import siemlab

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # what it tests does not depend on the database

TOKEN = "hec-test-token-7f3a"


@pytest.fixture
def factory(ctl):
    return session_factory(ctl.app.state.engine)


@pytest.fixture
def hec(tmp_path):
    with siemlab.HecCollector(TOKEN) as collector:
        yield collector


def hec_sinks(tmp_path: Path, hec: siemlab.HecCollector, *, name="siem", batch=25, fmt="ecs") -> list:
    token = tmp_path / "hec-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    return parse_sinks(f'[[sink]]\nname = "{name}"\nkind = "hec"\nurl = "{hec.url}"\ntoken_file = "{token}"\n'
                       f'format = "{fmt}"\nbatch = {batch}\ntimeout_s = 3\n')


def append(factory, n: int, pace_s: float = 0.0, tag: str = "load") -> None:
    """n records through the real chain, one transaction each."""
    for i in range(n):
        with transaction(factory) as s:
            events.record(s, category="audit", type=f"test.{tag}", result="success", actor="load-generator", n=i)
        if pace_s:
            time.sleep(pace_s)


class Load:
    """Appends records through the real chain from another thread until stopped, so a collector's
    outage always happens under load."""

    def __init__(self, factory, pace_s: float = 0.001):
        self.factory, self.pace_s = factory, pace_s
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="audit-load")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the load generator hangs"

    def wait_for(self, n: int) -> None:
        wait_until(lambda: self.written >= n, what=f"{n} more records")

    def _run(self) -> None:
        while not self._stop.is_set():
            append(self.factory, 1)
            self.written += 1
            self._stop.wait(self.pace_s)


def chain_hashes(factory) -> dict[int, str]:
    with factory() as s:
        return dict(s.execute(select(Event.seq, Event.hash).order_by(Event.seq)).all())


def wait_until(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def hec_seqs(collector: siemlab.HecCollector) -> list[tuple[int, str]]:
    return [(int(env["fields"]["seq"]), env["fields"]["hash"]) for env in collector.snapshot()]


def assert_every_record_arrived(got: list[tuple[int, str]], chain: dict[int, str]) -> int:
    """All of the chain, contiguous from 1; duplicates identical (same seq, same hash). Returns the duplicates."""
    seen: dict[int, str] = {}
    dups = 0
    for seq, h in got:
        assert chain.get(seq) == h, f"seq {seq} arrived with hash {h}, the chain has {chain.get(seq)}"
        if seq in seen:
            dups += 1
        seen[seq] = h
    assert sorted(seen) == list(range(1, max(chain) + 1)), (
        f"missing: {sorted(set(range(1, max(chain) + 1)) - set(seen))[:20]}")
    return dups


def health_of(factory, sinks, name: str) -> dict:
    return next(h for h in sink_health(factory, sinks) if h["name"] == name)


# ---- the collector is down for a while under load ------------------------------------------------------


def test_hec_down_under_load_then_back_loses_nothing(ctl, factory, hec, tmp_path):
    sinks = hec_sinks(tmp_path, hec, batch=20)
    shipper = Shipper(factory, sinks, "replica-a", poll_s=0.05, backoff_s=(0.05, 0.3))
    shipper.start()
    try:
        with Load(factory) as load:
            wait_until(lambda: len(hec.snapshot()) >= 20, what="the first deliveries")
            hec.down()
            wait_until(lambda: health_of(factory, sinks, "siem")["status"] == "failing", what="the sink failing")
            before = load.written
            load.wait_for(before + 200)  # records keep coming while it is down
            health = health_of(factory, sinks, "siem")
            assert health["status"] == "failing" and "Connection refused" in health["last_error"], health
            assert health["lag_records"] >= 200 and health["lag_seconds"] > 0, health
            assert health["head"] == health["cursor"] + health["lag_records"]
            assert health["last_attempt_at"] > health["last_ok_at"] and health["lease_holder"] == "replica-a"
            hec.up()
            load.wait_for(load.written + 50)  # and after it is back
        wait_until(lambda: health_of(factory, sinks, "siem")["lag_records"] == 0, what="catching up")
    finally:
        shipper.stop()
    chain = chain_hashes(factory)
    assert assert_every_record_arrived(hec_seqs(hec), chain) == 0  # HEC acknowledges each POST: no duplicate here
    types = {env["fields"]["type"] for env in hec.snapshot()}
    assert {"audit.sink_failed", "audit.sink_recovered", "test.load"} <= types  # the outage is in the chain too
    h = health_of(factory, sinks, "siem")
    assert (h["status"], h["last_error"], h["lag_records"], h["delivered"]) == ("ok", None, 0, max(chain))
    assert h["lease_holder"] is None  # stop() gave the lease up
    for env in hec.snapshot()[:5]:  # the envelope carries the ECS document of that very record
        assert env["event"]["event"]["sequence"] == int(env["fields"]["seq"])
        assert env["event"]["event"]["hash"] == env["fields"]["hash"]


@SQLITE
def test_a_collector_that_answers_errors_is_retried_with_the_same_batch(ctl, factory, hec, tmp_path):
    sinks = hec_sinks(tmp_path, hec, batch=10)
    shipper = Shipper(factory, sinks, "replica-a", backoff_s=(0.01, 0.01))
    hec.fail_status = 503
    assert shipper.run_once() == {"siem": 0}
    h = health_of(factory, sinks, "siem")
    assert h["status"] == "failing" and "answered 503" in h["last_error"] and h["cursor"] == 0
    hec.fail_status = None
    delivered = shipper.run_once()["siem"]
    assert delivered == h["head"] + 1  # the records up to audit.sink_failed, then audit.sink_recovered
    assert assert_every_record_arrived(hec_seqs(hec), chain_hashes(factory)) == 0
    hec.token = "rotated"  # a refused token is a failure like any other, with the collector's words
    append(factory, 1)
    shipper.run_once()
    assert "answered 403" in health_of(factory, sinks, "siem")["last_error"]
    (tmp_path / "hec-token").write_text("rotated\n")  # the operator rotates the token file: no restart
    shipper.run_once()
    assert health_of(factory, sinks, "siem")["lag_records"] == 0
    assert_every_record_arrived(hec_seqs(hec), chain_hashes(factory))  # it asserts; its count of duplicates does not matter here


@SQLITE
def test_a_lost_cursor_update_resends_and_duplicates_are_identical(ctl, factory, hec, tmp_path):
    """A crash between a send and its cursor update (simulated by putting the cursor back) sends those
    records again: same seq, same hash, so the SOC can drop them."""
    sinks = hec_sinks(tmp_path, hec, batch=7)
    append(factory, 20)
    shipper = Shipper(factory, sinks, "replica-a")
    shipper.run_once()
    first = len(hec.snapshot())
    with transaction(factory) as s:
        s.execute(update(AuditSinkCursor).where(AuditSinkCursor.name == "siem").values(seq=AuditSinkCursor.seq - 9))
    shipper.run_once()
    got = hec_seqs(hec)
    assert len(got) == first + 9
    assert assert_every_record_arrived(got, chain_hashes(factory)) == 9
    shipper.stop()


# ---- the cursor is durable; replicas share it ------------------------------------------------------------


@SQLITE
def test_the_cursor_survives_a_restart(ctl, factory, hec, tmp_path):
    sinks = hec_sinks(tmp_path, hec)
    a = Shipper(factory, sinks, "replica-a")
    a.run_once()
    a.stop()
    shipped = len(hec.snapshot())
    head_before = max(chain_hashes(factory))
    assert shipped == head_before
    append(factory, 30)
    b = Shipper(factory, hec_sinks(tmp_path, hec), "replica-a")  # a new process, same replica
    assert b.run_once() == {"siem": 30}
    b.stop()
    got = hec_seqs(hec)
    assert [seq for seq, _ in got[shipped:]] == list(range(head_before + 1, head_before + 31))
    assert assert_every_record_arrived(got, chain_hashes(factory)) == 0
    assert health_of(factory, sinks, "siem")["delivered"] == head_before + 30


def test_one_replica_ships_a_sink_and_another_takes_over_when_its_lease_lapses(ctl, factory, hec, tmp_path):
    sinks = hec_sinks(tmp_path, hec)
    t0 = datetime.now(UTC)
    a = Shipper(factory, sinks, "replica-a", lease_s=30)
    b = Shipper(factory, sinks, "replica-b", lease_s=30)
    assert a.run_once(t0)["siem"] > 0
    append(factory, 10)
    assert b.run_once(t0 + timedelta(seconds=5)) == {"siem": 0}  # a holds the lease
    assert health_of(factory, sinks, "siem")["lease_holder"] == "replica-a"
    # a dies without giving the lease up; once it lapses, b ships from the cursor
    assert b.run_once(t0 + timedelta(seconds=31)) == {"siem": 10}
    assert health_of(factory, sinks, "siem")["lease_holder"] == "replica-b"
    append(factory, 5)
    assert a.run_once(t0 + timedelta(seconds=35)) == {"siem": 0}  # a is back, but b holds it now
    b.stop()  # b gives the lease up: a takes over at once
    assert a.run_once(t0 + timedelta(seconds=36)) == {"siem": 5}
    a.stop()
    assert assert_every_record_arrived(hec_seqs(hec), chain_hashes(factory)) == 0


def test_two_running_replicas_do_not_double_ship(ctl, factory, hec, tmp_path):
    sinks = hec_sinks(tmp_path, hec, batch=5)
    a = Shipper(factory, sinks, "replica-a", poll_s=0.02)
    b = Shipper(factory, sinks, "replica-b", poll_s=0.02)
    a.start()
    b.start()
    try:
        append(factory, 120, pace_s=0.002)
        head = max(chain_hashes(factory))
        wait_until(lambda: health_of(factory, sinks, "siem")["cursor"] == head, what="delivery")
    finally:
        a.stop()
        b.stop()
    assert assert_every_record_arrived(hec_seqs(hec), chain_hashes(factory)) == 0


# ---- health ------------------------------------------------------------------------------------------------


@SQLITE
def test_health_before_and_after_delivery_and_for_a_renamed_sink(ctl, factory, hec, tmp_path):
    sinks = hec_sinks(tmp_path, hec)
    head = max(chain_hashes(factory))
    (h,) = sink_health(factory, sinks)
    assert (h["name"], h["kind"], h["format"], h["target"]) == ("siem", "hec", "ecs", hec.url)
    assert (h["status"], h["cursor"], h["head"], h["lag_records"], h["delivered"]) == ("lagging", 0, head, head, 0)
    assert h["lag_seconds"] >= 0 and h["last_ok_at"] is None and h["last_error"] is None
    Shipper(factory, sinks, "replica-a").run_once()
    (h,) = sink_health(factory, sinks)
    assert (h["status"], h["cursor"], h["lag_records"], h["lag_seconds"]) == ("ok", head, 0, 0.0)
    assert datetime.fromisoformat(h["last_ok_at"]) <= datetime.now(UTC)
    renamed = hec_sinks(tmp_path, hec, name="siem-2")
    rows = {r["name"]: r for r in sink_health(factory, renamed)}
    assert rows["siem"]["status"] == "unconfigured" and rows["siem-2"]["cursor"] == 0
    assert [r["name"] for r in sink_health(factory)] == ["siem"]  # without a config: the cursors in the database


# ---- other transports through the shipper -----------------------------------------------------------------


@SQLITE
def test_file_sink_appends_json_lines(ctl, factory, tmp_path):
    out = tmp_path / "audit.jsonl"
    out.write_text("")
    sinks = parse_sinks(f'[[sink]]\nname = "local"\nkind = "file"\npath = "{out}"\nformat = "json"\nbatch = 4\n')
    shipper = Shipper(factory, sinks, "replica-a")
    shipper.run_once()
    append(factory, 9)
    shipper.run_once()
    shipper.stop()
    lines = out.read_text().splitlines()
    chain = chain_hashes(factory)
    assert len(lines) == len(chain)
    docs = [json.loads(line) for line in lines]
    assert [(d["seq"], d["hash"]) for d in docs] == sorted(chain.items())
    with factory() as s:  # the native format is the record itself, plus its hash
        line = s.scalar(select(Event.line).where(Event.seq == 1))
    assert {k: v for k, v in docs[0].items() if k != "hash"} == json.loads(line)


@SQLITE
def test_a_rotated_file_gets_the_next_batch_at_its_path(ctl, factory, tmp_path):
    """logrotate renames the file: what follows goes to a new file at the path, nothing is lost between."""
    out = tmp_path / "audit.jsonl"
    sinks = parse_sinks(f'[[sink]]\nname = "local"\nkind = "file"\npath = "{out}"\nformat = "json"\n')
    shipper = Shipper(factory, sinks, "replica-a")
    shipper.run_once()
    out.rename(tmp_path / "audit.jsonl.1")
    append(factory, 3)
    shipper.run_once()
    shipper.stop()
    old = [json.loads(x)["seq"] for x in (tmp_path / "audit.jsonl.1").read_text().splitlines()]
    new = [json.loads(x)["seq"] for x in out.read_text().splitlines()]
    assert old + new == sorted(chain_hashes(factory)) and len(new) >= 3


@pytest.mark.skipif(siemlab.rsyslog_missing() is not None, reason=siemlab.rsyslog_missing() or "")
def test_rsyslog_down_under_load_then_back_loses_nothing(ctl, factory, tmp_path):
    pki = siemlab.make_pki(tmp_path / "pki")
    rs = siemlab.Rsyslog(tmp_path / "rsyslog", pki)
    rs.start()
    try:
        sinks = parse_sinks(f'[[sink]]\nname = "rsyslog"\nkind = "syslog-tls"\naddress = "127.0.0.1:{rs.tls_port}"\n'
                            f'format = "cef"\nca_file = "{pki.ca}"\ncert_file = "{pki.client_cert}"\n'
                            f'key_file = "{pki.client_key}"\nbatch = 20\ntimeout_s = 3\n')
        shipper = Shipper(factory, sinks, "replica-a", poll_s=0.05, backoff_s=(0.05, 0.3))
        shipper.start()
        try:
            with Load(factory) as load:
                wait_until(lambda: len(rs.lines()) >= 20, what="the first deliveries")
                rs.stop()
                wait_until(lambda: health_of(factory, sinks, "rsyslog")["status"] == "failing", what="the sink failing")
                load.wait_for(load.written + 50)
                assert health_of(factory, sinks, "rsyslog")["lag_records"] >= 50
                rs.start()
                load.wait_for(load.written + 50)
            wait_until(lambda: health_of(factory, sinks, "rsyslog")["lag_records"] == 0, what="catching up")
        finally:
            shipper.stop()
        chain = chain_hashes(factory)
        got = []
        for line in rs.lines():
            m = siemlab.parse_rfc5424(line)
            sd = m["sd"][formats.SD_ID]
            _, ext = siemlab.parse_cef(m["msg"])
            assert (ext["cs3"], ext["cs4"]) == (sd["seq"], sd["hash"])
            got.append((int(sd["seq"]), sd["hash"]))
        assert_every_record_arrived(got, chain)
    finally:
        rs.stop()


# ---- the sinks file ------------------------------------------------------------------------------------------


def test_a_full_sinks_file_loads(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "tok").write_text("t")
    path = tmp_path / "sinks.toml"
    path.write_text(f"""
[[sink]]
name = "soc"
kind = "syslog-tls"
address = "siem.example.net:6514"
format = "cef"
ca_file = "ca.pem"
facility = "local5"
confirm_ms = 250

[[sink]]
name = "splunk"
kind = "hec"
url = "https://splunk.example.net:8088"
token_file = "{tmp_path}/tok"
format = "ocsf"
index = "ot"

[[sink]]
name = "local"
kind = "file"
path = "audit.jsonl"
""")
    soc, splunk, local = load_sinks(path)
    assert (soc.kind, soc.host_port, soc.ca_file, soc.facility, soc.confirm_ms, soc.batch) == (
        "syslog-tls", ("siem.example.net", 6514), tmp_path / "ca.pem", "local5", 250, 500)
    assert (splunk.format, splunk.index, splunk.token_file, splunk.target) == (
        "ocsf", "ot", tmp_path / "tok", "https://splunk.example.net:8088")
    assert (local.format, local.path, local.batch, splunk.batch) == ("json", tmp_path / "audit.jsonl", 100, 100)


@pytest.mark.parametrize(("text", "error"), [
    ('[[sink]]\nname = "a"\nkind = "kafka"\n', r"sink 'a': kind: 'kafka' is not one of"),
    ('[[sink]]\nname = "a"\nkind = "syslog-tcp"\n', r"sink 'a': address: missing"),
    ('[[sink]]\nname = "a"\nkind = "syslog-tcp"\naddress = "siem:99999"\n', r"sink 'a': address: port 99999"),
    ('[[sink]]\nname = "a"\nkind = "syslog-tcp"\naddress = "siem"\n', r"sink 'a': address: 'siem' must be host:port"),
    ('[[sink]]\nname = "a"\nkind = "syslog-tcp"\naddress = "s:514"\nformat = "leef"\n', r"sink 'a': format: 'leef'"),
    ('[[sink]]\nname = "a"\nkind = "syslog-tcp"\naddress = "s:514"\nurl = "x"\n', r"sink 'a': url: not a setting of a syslog-tcp sink"),
    ('[[sink]]\nname = "a"\nkind = "syslog-tcp"\naddress = "s:514"\nbatch = 0\n', r"sink 'a': batch: must be between 1 and 10000"),
    ('[[sink]]\nname = "a"\nkind = "syslog-tcp"\naddress = "s:514"\nfacility = "mars"\n', r"sink 'a': facility: 'mars'"),
    ('[[sink]]\nname = "a"\nkind = "syslog-tls"\naddress = "s:6514"\nca_file = "/nonexistent/ca.pem"\n',
     r"sink 'a': ca_file: /nonexistent/ca.pem is not a readable file"),
    ('[[sink]]\nname = "a"\nkind = "hec"\nurl = "https://s"\ntoken = "abc"\n', r"sink 'a': token: a token is never written"),
    ('[[sink]]\nname = "a"\nkind = "hec"\nurl = "https://s"\n', r"sink 'a': token_file: missing"),
    ('[[sink]]\nname = "a"\nkind = "hec"\nurl = "http://splunk.example.net:8088"\ntoken_file = "TOK"\n',
     r"sink 'a': url: plain http would send the HEC token in clear"),
    ('[[sink]]\nname = "a"\nkind = "hec"\nurl = "https://u:p@s"\ntoken_file = "TOK"\n', r"sink 'a': url: credentials"),
    ('[[sink]]\nname = "a"\nkind = "file"\npath = "/nonexistent/dir/x.jsonl"\n', r"sink 'a': path: the directory"),
    ('[[sink]]\nname = "a b"\nkind = "file"\npath = "x"\n', r"sink #1: name: 'a b' must be"),
    ('[[sink]]\nkind = "file"\npath = "x"\n', r"sink #1: name: missing"),
    ('[[sink]]\nname = "a"\nkind = "file"\npath = "x"\n[[sink]]\nname = "a"\nkind = "file"\npath = "y"\n',
     r"sink 'a': the name is used twice"),
    ('[sink]\nname = "a"\n', r"`sink` must be an array of tables"),
    ('[[sinks]]\nname = "a"\n', r"unknown top-level key\(s\) sinks"),
    ('[[sink]\nname = "a"\n', r"not valid TOML"),
])
def test_a_bad_sinks_file_names_the_sink_and_the_field(tmp_path, text, error):
    (tmp_path / "TOK").write_text("t")
    path = tmp_path / "sinks.toml"
    path.write_text(text.replace('"TOK"', f'"{tmp_path}/TOK"'))
    with pytest.raises(SinkConfigError, match=error):
        load_sinks(path)


def test_a_client_certificate_needs_its_key(tmp_path):
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(SinkConfigError, match=r"sink 'a': key_file: a client certificate needs both"):
        parse_sinks(f'[[sink]]\nname = "a"\nkind = "syslog-tls"\naddress = "s:6514"\ncert_file = "{tmp_path}/c.pem"\n')
    with pytest.raises(SinkConfigError, match=r"cannot read the sinks file"):
        load_sinks(tmp_path / "missing.toml")
