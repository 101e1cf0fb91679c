"""A real rsyslogd (Debian's rsyslog + rsyslog-gnutls) receives wicket's syslog sinks over TCP with
octet counting and over TLS with a client certificate; the test parses what rsyslog wrote
(RSYSLOG_SyslogProtocol23Format, RFC 5424) and matches every field: PRI, timestamp, host, app, procid,
msgid, timeQuality, origin, meta sequenceId, every wicket@32473 param and the payload, in each format.

rsyslogd runs with its own config, pid file and work directory, on 127.0.0.1 ports of its own, and is
stopped by its PID at the end of each test, also when the test fails (`tests/siemlab.py`).
"""

from __future__ import annotations

import json
import socket
import ssl

import pytest

from controller.audit import formats
from controller.audit.sinks import SinkError, open_sink, parse_sinks
from tests import siemlab
from tests.test_siem_formats import SAMPLES, make, sd_expected

pytestmark = pytest.mark.skipif(siemlab.rsyslog_missing() is not None, reason=siemlab.rsyslog_missing() or "")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return siemlab.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def rsyslog(tmp_path, pki):
    rs = siemlab.Rsyslog(tmp_path / "rsyslog", pki)
    rs.start()
    pid = rs.proc.pid
    try:
        yield rs
    finally:
        rs.stop()
        assert not siemlab.process_alive(pid) or _zombie(pid), f"rsyslogd {pid} still runs"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def sinks_for(rs: siemlab.Rsyslog, pki: siemlab.Pki, kind: str, **extra) -> list:
    """One sink per payload format; each names itself in HOSTNAME so the lines can be told apart."""
    port = rs.tcp_port if kind == "syslog-tcp" else rs.tls_port
    tls = (f'ca_file = "{pki.ca}"\ncert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"\n'
           if kind == "syslog-tls" else "")
    more = "".join(f"{k} = {json.dumps(v)}\n" for k, v in extra.items())
    text = "".join(f'[[sink]]\nname = "{kind}-{fmt}"\nkind = "{kind}"\naddress = "127.0.0.1:{port}"\nformat = "{fmt}"\n'
                   f'hostname = "ctl-{fmt}"\ntimeout_s = 5\n{tls}{more}' for fmt in formats.PAYLOAD_FORMATS)
    return parse_sinks(text)


def received(rs: siemlab.Rsyslog, n: int) -> dict[tuple[str, int], dict]:
    """rsyslog's lines, parsed, by (sending host, seq); fails on a line that is not RFC 5424 or a duplicate."""
    lines = rs.wait_for_lines(n)
    out: dict[tuple[str, int], dict] = {}
    for line in lines:
        m = siemlab.parse_rfc5424(line)
        key = (m["hostname"], int(m["sd"][formats.SD_ID]["seq"]))
        assert key not in out, f"received twice: {key}"
        out[key] = m
    assert len(out) == n, f"rsyslog wrote {len(out)} of {n} messages; its log: {rs.internal.read_text() if rs.internal.exists() else ''}"
    return out


def check_fields(m: dict, e: dict, fmt: str) -> None:
    """Every field of one message as rsyslog wrote it, against the canonical event it came from."""
    lv = formats.LEVELS[formats.level(e)]
    facility = 10 if e["category"] in ("authentication", "account") else 20
    assert (m["pri"], m["version"], m["timestamp"], m["app"], m["msgid"]) == (facility * 8 + lv.syslog, 1, e["time"],
                                                                               "wicket", e["type"])
    assert m["procid"].isdigit()
    assert m["sd"]["timeQuality"] == {"tzKnown": "1", "isSynced": "1" if e["clock"] == "synced" else "0"}
    assert m["sd"]["origin"] == {"software": "wicket", "swVersion": formats.__version__}
    assert m["sd"]["meta"] == {"sequenceId": str(formats.sequence_id(e["seq"]))}
    assert m["sd"][formats.SD_ID] == sd_expected(e)
    assert set(m["sd"]) == {"timeQuality", "origin", "meta", formats.SD_ID}
    payload = m["msg"]
    assert payload == formats.payload(e, fmt, host=m["hostname"])
    if fmt == "cef":
        header, ext = siemlab.parse_cef(payload)
        assert (header[4], ext["cs3"], ext["cs4"]) == (e["type"], str(e["seq"]), e["hash"])
    else:
        doc = json.loads(payload)
        if fmt == "json":
            assert doc == e
        elif fmt == "ecs":
            assert (doc["event"]["sequence"], doc["event"]["hash"], doc["wicket"]["body"]) == (e["seq"], e["hash"], e["body"])
        else:
            assert (doc["metadata"]["sequence"], doc["metadata"]["uid"], doc["unmapped"]["wicket"]["body"]) == (
                e["seq"], e["hash"], e["body"])


@pytest.mark.parametrize("kind", ["syslog-tcp", "syslog-tls"])
def test_rsyslog_receives_every_field_in_every_format(rsyslog, pki, kind):
    events = list(SAMPLES.values())
    sinks = [open_sink(c) for c in sinks_for(rsyslog, pki, kind)]
    try:
        for sink in sinks:
            sink.send(events[:4])
            sink.send(events[4:])  # a second batch on the same connection
    finally:
        for sink in sinks:
            sink.close()
    got = received(rsyslog, len(events) * len(sinks))
    for sink in sinks:
        fmt = sink.config.format
        for e in events:
            check_fields(got[(f"ctl-{fmt}", e["seq"])], e, fmt)
    assert any(m["bom"] for m in got.values())  # the non-ASCII payloads went as UTF-8 with a BOM, and back


def test_a_record_longer_than_the_limit_arrives_without_its_body(rsyslog, pki):
    flows = [{"proto": "tcp", "src": "100.64.9.2", "dst": "10.20.0.17", "dport": 2404, "bytes_out": i} for i in range(2000)]
    e = make(77, "lane.evidence", "evidence", actor="agent:edge-north-1", subject="s-big", bytes_out=1, bytes_in=2,
             flows=flows)
    (config,) = [c for c in sinks_for(rsyslog, pki, "syslog-tcp", max_message_bytes=8192) if c.format == "json"]
    sink = open_sink(config)
    sink.send([e])
    sink.close()
    m = received(rsyslog, 1)[("ctl-json", 77)]
    assert m["sd"][formats.SD_ID]["truncated"] == "1" and m["sd"][formats.SD_ID]["hash"] == e["hash"]
    assert json.loads(m["msg"])["body"] == {"truncated": True, "body_bytes": len(json.dumps(
        e["body"], sort_keys=True, separators=(",", ":")).encode())}


def test_a_restarted_receiver_costs_no_record(rsyslog, pki):
    """The connection of the first batch is dead after rsyslog restarts: the next batch notices, connects
    again and arrives; nothing was counted as sent that rsyslog did not take."""
    (config,) = [c for c in sinks_for(rsyslog, pki, "syslog-tcp") if c.format == "cef"]
    sink = open_sink(config)
    events = [make(i, "login", "authentication", actor="erin", subject="erin") for i in range(1, 7)]
    sink.send(events[:3])
    assert len(rsyslog.wait_for_lines(3)) == 3
    rsyslog.stop()
    rsyslog.start()
    sink.send(events[3:])
    sink.close()
    got = received(rsyslog, 6)
    assert sorted(seq for _, seq in got) == [1, 2, 3, 4, 5, 6]


def test_a_receiver_that_is_down_fails_the_batch_clearly(rsyslog, pki):
    (config,) = [c for c in sinks_for(rsyslog, pki, "syslog-tcp") if c.format == "json"]
    rsyslog.stop()
    sink = open_sink(config)
    with pytest.raises(SinkError, match=r"sink syslog-tcp-json: syslog to 127\.0\.0\.1:\d+: Connection refused"):
        sink.send([SAMPLES["login_ok"]])


def test_tls_refuses_a_receiver_its_ca_did_not_sign(rsyslog, pki):
    (config,) = [c for c in sinks_for(rsyslog, pki, "syslog-tls") if c.format == "json"]
    sink = open_sink(type(config)(**{**config.__dict__, "ca_file": pki.other_ca}))
    with pytest.raises(SinkError, match="certificate does not verify"):
        sink.send([SAMPLES["login_ok"]])
    assert rsyslog.lines() == []


def test_rsyslog_requires_our_client_certificate(rsyslog, pki):
    """The listener demands a client certificate (x509/certvalid): without one nothing is accepted, and the
    sink reports the failure instead of counting the batch as sent."""
    (config,) = [c for c in sinks_for(rsyslog, pki, "syslog-tls") if c.format == "json"]
    sink = open_sink(type(config)(**{**config.__dict__, "cert_file": None, "key_file": None}))
    with pytest.raises(SinkError):
        for _ in range(3):  # TLS 1.3 reports the refusal after the handshake: at the latest on the next batch
            sink.send([SAMPLES["login_ok"]])
    assert rsyslog.lines() == []
    # and the same listener takes a raw octet-counted message from a client with the certificate
    with socket.create_connection(("127.0.0.1", rsyslog.tls_port), timeout=5) as raw:
        with rsyslog.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert isinstance(tls, ssl.SSLSocket)
            siemlab.send_octet_counted(tls, [formats.rfc5424(SAMPLES["login_ok"], "json", host="probe")])
    assert len(rsyslog.wait_for_lines(1)) == 1
