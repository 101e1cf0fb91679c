"""The engineer's wg-quick file: one peer, the one device, nothing else."""

from __future__ import annotations

import base64
import io
import re
from datetime import UTC, datetime

import pytest
import wgconfig

from nodeagent.wgquick import KEEPALIVE_S, render
from nodeagent.wire import LaneSpec

ENGINEER_PUB = base64.b64encode(bytes([7] * 32)).decode()
ENGINEER_PRIV = base64.b64encode(bytes([9] * 32)).decode()
NODE_PUB = base64.b64encode(bytes([1] * 32)).decode()
KEY_RE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")


def spec(**kw) -> LaneSpec:
    d = dict(
        session_id="s-1", engineer_public_key=ENGINEER_PUB, engineer_address="100.64.0.2", device_address="192.0.2.10",
        service="iec104", flows=[{"transport": "tcp", "port": 2404}, {"transport": "udp", "port": 2404}],
        listen_port=51820, end_time=datetime(2030, 1, 1, tzinfo=UTC), device_id="rtu-1",
    )
    d.update(kw)
    return LaneSpec(**d)


def parse(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """A strict reading of the wg-quick format: [Section] headers, `Key = Value` lines, # comments."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            sections.append((m.group(1), []))
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key = value line: {raw!r}"
        assert sections, f"attribute before any section: {raw!r}"
        sections[-1][1].append((key.strip(), value.strip()))
    return sections


def one(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert len(values) == 1, (key, values)
    return values[0]


def read_with_wgconfig(text: str) -> wgconfig.WGConfig:
    wc = wgconfig.WGConfig()
    wc.read_from_fileobj(io.StringIO(text))
    return wc


def test_structure_and_values():
    text = render(spec(), node_public_key=NODE_PUB, endpoint_host="rtr.example.net")
    sections = parse(text)
    assert [name for name, _ in sections] == ["Interface", "Peer"]
    iface, peer = sections[0][1], sections[1][1]
    assert sorted(k for k, _ in iface) == ["Address", "PrivateKey"]
    assert one(iface, "Address") == "100.64.0.2/32"
    assert sorted(k for k, _ in peer) == ["AllowedIPs", "Endpoint", "PersistentKeepalive", "PublicKey"]
    assert one(peer, "PublicKey") == NODE_PUB
    assert one(peer, "AllowedIPs") == "192.0.2.10/32"
    assert one(peer, "Endpoint") == "rtr.example.net:51820"
    assert one(peer, "PersistentKeepalive") == "25" == str(KEEPALIVE_S)


def test_wgconfig_reads_it_back():
    text = render(spec(), node_public_key=NODE_PUB, endpoint_host="198.51.100.1", engineer_private_key=ENGINEER_PRIV)
    wc = read_with_wgconfig(text)
    assert wc.get_peers(keys_only=True) == [NODE_PUB]
    peer = wc.get_peer(NODE_PUB, include_details=False)
    assert peer == {
        "PublicKey": NODE_PUB, "AllowedIPs": "192.0.2.10/32", "Endpoint": "198.51.100.1:51820", "PersistentKeepalive": 25,
    }
    assert wc.get_interface(include_details=False) == {"PrivateKey": ENGINEER_PRIV, "Address": "100.64.0.2/32"}


@pytest.mark.parametrize(
    "host,endpoint",
    [
        ("2001:db8::1", "[2001:db8::1]:40000"),
        ("[2001:db8::1]", "[2001:db8::1]:40000"),
        ("::1", "[::1]:40000"),
        ("198.51.100.1", "198.51.100.1:40000"),
        ("rtr.example.net", "rtr.example.net:40000"),
    ],
)
def test_endpoint_host_and_listen_port(host, endpoint):
    text = render(spec(listen_port=40000), node_public_key=NODE_PUB, endpoint_host=host)
    assert one(parse(text)[1][1], "Endpoint") == endpoint


@pytest.mark.parametrize(
    "eng,dev", [("100.64.0.2", "192.0.2.10"), ("10.255.255.254", "172.16.0.1"), ("100.64.3.77", "192.0.2.255")]
)
def test_allowed_ips_is_exactly_the_device(eng, dev):
    text = render(spec(engineer_address=eng, device_address=dev), node_public_key=NODE_PUB, endpoint_host="h")
    wc = read_with_wgconfig(text)
    assert wc.get_peer(NODE_PUB)["AllowedIPs"] == f"{dev}/32"
    assert wc.get_interface()["Address"] == f"{eng}/32"
    assert "0.0.0.0/0" not in text and "::/0" not in text


def test_no_dns_and_nothing_that_runs_commands():
    text = render(spec(), node_public_key=NODE_PUB, endpoint_host="h", mtu=1380)
    keys = {k.lower() for _, section in parse(text) for k, _ in section}
    assert "dns" not in keys
    assert not keys & {"preup", "postup", "predown", "postdown", "table", "saveconfig", "fwmark"}
    assert re.search(r"^\s*DNS\s*=", text, re.MULTILINE | re.IGNORECASE) is None


def test_mtu_optional():
    assert one(parse(render(spec(), node_public_key=NODE_PUB, endpoint_host="h", mtu=1380))[0][1], "MTU") == "1380"
    assert "MTU" not in render(spec(), node_public_key=NODE_PUB, endpoint_host="h")


def test_placeholder_without_private_key_and_no_key_leaks():
    text = render(spec(), node_public_key=NODE_PUB, endpoint_host="h")
    iface = parse(text)[0][1]
    assert one(iface, "PrivateKey") == "<your private key>"
    # the only key-shaped string in the file is the node's public key
    assert KEY_RE.findall(text) == [NODE_PUB]
    assert ENGINEER_PUB not in text


def test_given_private_key_is_written():
    text = render(spec(), node_public_key=NODE_PUB, endpoint_host="h", engineer_private_key=ENGINEER_PRIV)
    assert one(parse(text)[0][1], "PrivateKey") == ENGINEER_PRIV
    assert "<your private key>" not in text
    assert sorted(KEY_RE.findall(text)) == sorted([NODE_PUB, ENGINEER_PRIV])


def test_comments_name_the_session_and_device():
    text = render(spec(), node_public_key=NODE_PUB, endpoint_host="h")
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments == [
        "# wicket lane for session s-1: iec104 to rtu-1",
        "# node of rtu-1, closes 2030-01-01T00:00:00+00:00",
    ]
    text = render(spec(device_id=None), node_public_key=NODE_PUB, endpoint_host="h")
    assert "# wicket lane for session s-1: iec104 to 192.0.2.10" in text


def test_render_leaves_no_temporary_files(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    render(spec(), node_public_key=NODE_PUB, endpoint_host="h")
    assert list(tmp_path.iterdir()) == []
