"""The engineer's one-time config (controller/wgconf.py): what the file says, read back by wgconfig, by a
strict parser of our own and by wg-quick itself; bring-your-own-key; refused inputs; the QR codes, decoded
with zbarimg where it is installed."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta, timezone

import png
import pytest
import qrcode
import wgconfig
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import wgconf
from controller.wgconf import EngineerConfig, qr_png, qr_svg, qr_terminal, render, with_private_key


def keypair() -> tuple[str, str]:
    key = X25519PrivateKey.generate()
    priv = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(priv).decode(), base64.b64encode(pub).decode()


ENGINEER_PRIV, _ = keypair()
_, NODE_PUB = keypair()
KEY_RE = re.compile(r"[A-Za-z0-9+/]{43}=")
ENDS = datetime(2030, 1, 1, 12, 30, tzinfo=UTC)


def config(**kw) -> EngineerConfig:
    fields = dict(
        session_id="4f1c2b9e-7d2a-4c55-9a51-0c1f3e2d9b10", device_id="RTU-0042", private_key=ENGINEER_PRIV,
        address="100.64.3.7", peer_public_key=NODE_PUB, endpoint_host="node-1.example.net", endpoint_port=51820,
        device_address="192.0.2.10", keepalive=25, ends_at=ENDS,
    )
    fields.update(kw)
    return EngineerConfig(**fields)


def parse(text: str) -> list[tuple[str, dict[str, str]]]:
    """A strict reading of the wg-quick format: [Section] lines, `Key = Value` lines (each key once per
    section), whole-line # comments, blank lines; anything else fails the test."""
    sections: list[tuple[str, dict[str, str]]] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        header = re.fullmatch(r"\[(Interface|Peer)\]", raw)
        if header:
            sections.append((header.group(1), {}))
            continue
        line = re.fullmatch(r"([A-Za-z]+) = ([^#\s][^#]*)", raw)
        assert line, f"not a `Key = Value` line: {raw!r}"
        assert sections, f"attribute before any section: {raw!r}"
        key, value = line.groups()
        assert key not in sections[-1][1], f"{key} twice in a section"
        sections[-1][1][key] = value
    return sections


def read_with_wgconfig(text: str) -> wgconfig.WGConfig:
    wc = wgconfig.WGConfig()
    wc.read_from_fileobj(io.StringIO(text))
    return wc


# -- the file ---------------------------------------------------------------------------------------------

def test_fields_read_back_with_our_parser():
    assert parse(render(config())) == [
        ("Interface", {"PrivateKey": ENGINEER_PRIV, "Address": "100.64.3.7/32"}),
        ("Peer", {
            "PublicKey": NODE_PUB, "Endpoint": "node-1.example.net:51820", "AllowedIPs": "192.0.2.10/32",
            "PersistentKeepalive": "25",
        }),
    ]


def test_fields_read_back_with_wgconfig():
    wc = read_with_wgconfig(render(config(keepalive=15, endpoint_port=40000)))
    assert wc.get_interface() == {"PrivateKey": ENGINEER_PRIV, "Address": "100.64.3.7/32"}
    assert wc.get_peers() == [NODE_PUB]
    assert wc.get_peer(NODE_PUB) == {
        "PublicKey": NODE_PUB, "Endpoint": "node-1.example.net:40000", "AllowedIPs": "192.0.2.10/32",
        "PersistentKeepalive": 15,
    }


@pytest.mark.parametrize("address,device", [("100.64.3.7", "192.0.2.10"), ("10.255.255.254", "172.16.0.1"),
                                            ("100.64.0.1", "192.0.2.255")])
def test_allowed_ips_is_the_one_device(address, device):
    text = render(config(address=address, device_address=device))
    peer = read_with_wgconfig(text).get_peer(NODE_PUB)
    assert peer["AllowedIPs"] == f"{device}/32"  # a string: wgconfig would give a list for two entries
    assert parse(text)[1][1]["AllowedIPs"] == f"{device}/32"
    assert parse(text)[0][1]["Address"] == f"{address}/32"
    assert "0.0.0.0/0" not in text and "::/0" not in text


def test_no_dns_no_mtu_nothing_that_runs_commands():
    text = render(config())
    keys = {key.lower() for _, section in parse(text) for key in section}
    assert keys == {"privatekey", "address", "publickey", "endpoint", "allowedips", "persistentkeepalive"}
    assert re.search(r"^\s*(DNS|MTU)\s*=", text, re.MULTILINE | re.IGNORECASE) is None


def test_comment_header():
    text = render(config(ends_at=datetime(2030, 1, 1, 14, 30, 15, 999, tzinfo=timezone(timedelta(hours=2)))))
    assert text.splitlines()[:4] == [
        "# wicket session: 4f1c2b9e-7d2a-4c55-9a51-0c1f3e2d9b10",
        "# device: RTU-0042",
        "# ends at: 2030-01-01T12:30:15Z",
        "# one-time config: it will not be shown again",
    ]
    untimed = render(config(ends_at=None))
    assert "ends at" not in untimed
    assert wgconf.ONE_TIME_NOTE in untimed.splitlines()


@settings(max_examples=200, deadline=None)
@given(session_id=st.text(min_size=1).filter(str.isprintable), device_id=st.text(min_size=1).filter(str.isprintable))
def test_names_in_the_header_cannot_add_config_lines(session_id, device_id):
    text = render(config(session_id=session_id, device_id=device_id))
    assert [name for name, _ in parse(text)] == ["Interface", "Peer"]
    assert read_with_wgconfig(text).get_peer(NODE_PUB)["AllowedIPs"] == "192.0.2.10/32"


def test_the_private_key_stays_off_the_disk_and_out_of_repr(monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("render touched the file system")

    monkeypatch.setattr(wgconfig.os, "open", no_disk)
    monkeypatch.setattr(wgconf.wgconfig.WGConfig, "read_file", no_disk)
    monkeypatch.setattr("tempfile.mkstemp", no_disk)
    monkeypatch.setattr("tempfile.mkdtemp", no_disk)
    cfg = config()
    assert ENGINEER_PRIV in render(cfg)
    assert ENGINEER_PRIV not in repr(cfg)


# -- endpoints --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host,endpoint", [
    ("2001:db8::1", "[2001:db8::1]:51820"),
    ("[2001:db8::1]", "[2001:db8::1]:51820"),
    ("2001:0db8:0000::0001", "[2001:db8::1]:51820"),
    ("::1", "[::1]:51820"),
    ("198.51.100.1", "198.51.100.1:51820"),
    ("node-1.example.net", "node-1.example.net:51820"),
    ("localhost", "localhost:51820"),
])
def test_endpoint(host, endpoint):
    text = render(config(endpoint_host=host))
    assert parse(text)[1][1]["Endpoint"] == endpoint
    assert read_with_wgconfig(text).get_peer(NODE_PUB)["Endpoint"] == endpoint


# -- refused inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("session_id", ""),
    ("session_id", "s-1\n[Peer]"),
    ("device_id", "rtu\rAllowedIPs = 0.0.0.0/0"),
    ("device_id", "rtu\u2028x"),
    ("private_key", ""),
    ("private_key", "not a key"),
    ("private_key", base64.b64encode(bytes(31)).decode()),
    ("private_key", base64.b64encode(bytes(33)).decode()),
    ("private_key", ENGINEER_PRIV[:-1]),  # padding missing
    ("private_key", ENGINEER_PRIV[:42] + "F="),  # not canonical: wg(8) refuses it too
    ("private_key", " " + ENGINEER_PRIV),
    ("peer_public_key", ENGINEER_PRIV + "\n"),
    ("peer_public_key", "A" * 44),
    ("address", "100.64.3.7/32"),
    ("address", "100.64.3"),
    ("address", "2001:db8::7"),
    ("address", "0.0.0.0"),
    ("address", "127.0.0.1"),
    ("address", "224.0.0.1"),
    ("address", "255.255.255.255"),
    ("address", 1681916679),
    ("address", "192.0.2.10"),  # the device's own address
    ("device_address", "192.0.2.0/24"),
    ("device_address", "0.0.0.0"),
    ("device_address", "192.0.2.10 "),
    ("device_address", "rtu.example.net"),
    ("endpoint_host", ""),
    ("endpoint_host", "300.1.1.1"),
    ("endpoint_host", "010.1.1.1"),
    ("endpoint_host", "[198.51.100.1]"),
    ("endpoint_host", "[node.example.net]"),
    ("endpoint_host", "node.example.net:51820"),
    ("endpoint_host", "-node.example.net"),
    ("endpoint_host", "node..example.net"),
    ("endpoint_host", "node.example.net\n"),
    ("endpoint_host", "a" * 64 + ".example.net"),
    ("endpoint_host", None),
    ("endpoint_port", 0),
    ("endpoint_port", 65536),
    ("endpoint_port", "51820"),
    ("endpoint_port", True),
    ("keepalive", -1),
    ("keepalive", 65536),
    ("keepalive", 2.5),
    ("ends_at", datetime(2030, 1, 1)),
])
def test_bad_input_is_refused(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        config(**{field: value})


def test_key_check_agrees_with_wg():
    if shutil.which("wg") is None:
        pytest.skip("wg is not installed")
    candidates = [ENGINEER_PRIV, NODE_PUB, ENGINEER_PRIV[:42] + "F=", ENGINEER_PRIV[:43], ENGINEER_PRIV + "A",
                  ENGINEER_PRIV[:42] + "!=", base64.b64encode(bytes(31)).decode() + "A"]
    for key in candidates:
        wg_accepts = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True).returncode == 0
        try:
            config(private_key=key)
            we_accept = True
        except ValueError:
            we_accept = False
        assert we_accept == wg_accepts, key


@pytest.mark.parametrize("byok", [False, True])
def test_wg_quick_reads_it(tmp_path, byok):
    if not os.path.exists("/usr/bin/wg-quick"):
        pytest.skip("wg-quick is not installed")
    if os.geteuid() != 0:
        pytest.skip("wg-quick strip re-runs itself under sudo when not root")
    folder = tmp_path / "conf"
    folder.mkdir(mode=0o700)
    conf = folder / "wk0.conf"
    conf.write_text(render(config(private_key=None if byok else ENGINEER_PRIV)))
    conf.chmod(0o600)
    done = subprocess.run(["/usr/bin/wg-quick", "strip", str(conf)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not even the world-accessible warning
    # what wg-quick hands to wg(8): Address is wg-quick's own and gone, the rest stays as written
    stripped = parse(done.stdout)
    key = wgconf.PLACEHOLDER if byok else ENGINEER_PRIV
    assert stripped == [
        ("Interface", {"PrivateKey": key}),
        ("Peer", {"PublicKey": NODE_PUB, "Endpoint": "node-1.example.net:51820", "AllowedIPs": "192.0.2.10/32",
                  "PersistentKeepalive": "25"}),
    ]


# -- bring your own key -----------------------------------------------------------------------------------

def test_byok_file_has_a_placeholder_and_no_private_key():
    text = render(config(private_key=None))
    lines = text.splitlines()
    at = lines.index(f"PrivateKey = {wgconf.PLACEHOLDER}")
    assert lines[at - 1] == wgconf.BYOK_NOTE
    assert KEY_RE.findall(text) == [NODE_PUB]
    assert read_with_wgconfig(text).get_interface()["PrivateKey"] == wgconf.PLACEHOLDER


def test_with_private_key_fills_the_placeholder():
    own_key, _ = keypair()
    text = render(config(private_key=None))
    filled = with_private_key(text, own_key)
    assert filled == render(config(private_key=own_key))
    assert read_with_wgconfig(filled).get_interface() == {"PrivateKey": own_key, "Address": "100.64.3.7/32"}


def test_with_private_key_refuses_a_config_that_has_a_key():
    own_key, _ = keypair()
    with pytest.raises(ValueError, match="already has a private key"):
        with_private_key(render(config()), own_key)
    filled = with_private_key(render(config(private_key=None)), own_key)
    with pytest.raises(ValueError, match="already has a private key"):
        with_private_key(filled, own_key)


def test_with_private_key_refuses_bad_keys_and_configs():
    text = render(config(private_key=None))
    for bad in ["", "x" * 44, ENGINEER_PRIV[:42] + "F=", ENGINEER_PRIV + "\nDNS = 1.1.1.1"]:
        with pytest.raises(ValueError, match="^private_key: "):
            with_private_key(text, bad)
    without_key_line = "\n".join(line for line in text.splitlines() if not line.startswith("PrivateKey"))
    with pytest.raises(ValueError, match="no PrivateKey line"):
        with_private_key(without_key_line, ENGINEER_PRIV)


# -- QR codes ---------------------------------------------------------------------------------------------

def reference_matrix(text: str) -> list[list[bool]]:
    """The modules (True is dark, quiet zone included) of the code the module is meant to draw."""
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L, border=4)
    qr.add_data(text)
    qr.make(fit=True)
    return qr.get_matrix()


def zbar_decode(png_bytes: bytes, tmp_path) -> str | None:
    """The text zbarimg reads from a PNG, or None when zbarimg is not installed."""
    if shutil.which("zbarimg") is None:
        return None
    image = tmp_path / "qr.png"
    image.write_bytes(png_bytes)
    # -Sbinary: the bytes as encoded, without zbar's guess at a character set
    done = subprocess.run(["zbarimg", "--raw", "-q", "-Sbinary", str(image)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode("utf-8")


def png_of(matrix: list[list[bool]], scale: int = 4) -> bytes:
    """A PNG of a module matrix (True dark), drawn here rather than by the code under test."""
    rows = [[0 if dark else 1 for dark in row for _ in range(scale)] for row in matrix for _ in range(scale)]
    out = io.BytesIO()
    png.Writer(len(rows[0]), len(rows), greyscale=True, bitdepth=1).write(out, rows)
    return out.getvalue()


@pytest.fixture(params=["key", "byok"])
def conf_text(request) -> str:
    return render(config(private_key=ENGINEER_PRIV if request.param == "key" else None))


def test_png_draws_the_code_and_decodes(conf_text, tmp_path):
    data = qr_png(conf_text)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height, rows, _ = png.Reader(bytes=data).read()
    matrix = reference_matrix(conf_text)
    box = wgconf._PNG_BOX_PIXELS
    assert width == height == len(matrix) * box
    pixels = [list(row) for row in rows]
    assert pixels == [[0 if matrix[y // box][x // box] else 1 for x in range(width)] for y in range(height)]
    decoded = zbar_decode(data, tmp_path)
    if decoded is not None:
        assert decoded == conf_text


def test_svg_is_well_formed_and_square(conf_text):
    root = ET.fromstring(qr_svg(conf_text))
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    assert root.get("width") == root.get("height")
    side = len(reference_matrix(conf_text))
    assert root.get("viewBox") == f"0 0 {side} {side}"
    paths = root.findall(f"{ns}path")
    assert len(paths) == 1 and len(paths[0].get("d")) > 1000


@pytest.mark.parametrize("dark_background", [True, False])
def test_terminal_code_is_square_and_decodes(conf_text, tmp_path, dark_background):
    out = qr_terminal(conf_text, dark_background=dark_background)
    lines = out.splitlines()
    matrix = reference_matrix(conf_text)
    side = len(matrix)
    # a character cell is about twice as tall as wide: half-blocks make the picture square
    assert len(lines) == (side + 1) // 2
    assert {len(line) for line in lines} == {side}
    assert set(out) <= set("█▀▄ \n") and len(set(out)) == 5
    # back to modules: a drawn half is lit, and lit is light on a dark background
    halves = {"█": (True, True), "▀": (True, False), "▄": (False, True), " ": (False, False)}
    lit = [[halves[ch][half] for ch in line] for line in lines for half in (0, 1)]
    seen = [[on != dark_background for on in row] for row in lit]
    assert seen[:side] == matrix
    assert all(not dark for row in seen[side:] for dark in row)  # padding row, if any, is quiet zone
    decoded = zbar_decode(png_of(seen), tmp_path)
    if decoded is not None:
        assert decoded == conf_text


def test_qr_of_any_text():
    text = "hello, wicket"
    assert qr_terminal(text) != qr_terminal(text + "!")
    assert qr_png(text) != qr_png(text + "!")
    ET.fromstring(qr_svg(text))
