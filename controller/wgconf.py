"""The one-time WireGuard config handed to an engineer, and its QR codes.

The session API calls `render` once when a session is granted and shows the text (or a QR code of it)
exactly once. The file gives the engineer a route to one device and nothing else: AllowedIPs is the
device's /32, there is no DNS line, and nothing wg-quick would run as a command.

With "bring your own key" the controller never sees the engineer's private key: the file carries a
placeholder that `with_private_key` (or the engineer, by hand) replaces.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import qrcode
import qrcode.constants
import qrcode.image.pure
import qrcode.image.svg
import wgconfig

PLACEHOLDER = "<your private key>"
BYOK_NOTE = "# bring your own key: replace the placeholder below with your WireGuard private key"
ONE_TIME_NOTE = "# one-time config: it will not be shown again"

# Level L, as `qrencode` uses for WireGuard configs: a screen does not smudge, and every step up in
# level makes the code larger; a 440-byte config is version 14, 81 characters wide in a terminal.
_QR_ERROR_CORRECTION = qrcode.constants.ERROR_CORRECT_L
_QR_BORDER = 4  # the quiet zone the QR standard asks for
_PNG_BOX_PIXELS = 8

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class EngineerConfig:
    session_id: str
    device_id: str
    # repr=False: a config logged by accident must not carry the private key into the log.
    private_key: str | None = field(repr=False)
    address: str
    peer_public_key: str
    endpoint_host: str
    endpoint_port: int
    device_address: str
    keepalive: int = 25
    ends_at: datetime | None = None

    def __post_init__(self) -> None:
        _check_label("session_id", self.session_id)
        _check_label("device_id", self.device_id)
        if self.private_key is not None:
            _check_key("private_key", self.private_key)
        _check_key("peer_public_key", self.peer_public_key)
        _check_host_address("address", self.address)
        _check_host_address("device_address", self.device_address)
        if self.address == self.device_address:
            raise ValueError("address: the engineer's tunnel address must differ from device_address")
        _endpoint_host(self.endpoint_host)
        _check_int("endpoint_port", self.endpoint_port, 1, 65535)
        _check_int("keepalive", self.keepalive, 0, 65535)
        if self.ends_at is not None and self.ends_at.utcoffset() is None:
            raise ValueError("ends_at: needs a time zone (a naive datetime is ambiguous)")


def render(cfg: EngineerConfig) -> str:
    """The wg-quick file for `cfg`: a comment header, [Interface] and one [Peer]."""
    wc = wgconfig.WGConfig()  # no file: built and written in memory, so the private key never touches disk
    if cfg.private_key is None:
        wc.add_attr(None, "PrivateKey", PLACEHOLDER, leading_comment=BYOK_NOTE)
    else:
        wc.add_attr(None, "PrivateKey", cfg.private_key)
    wc.add_attr(None, "Address", f"{cfg.address}/32")
    peer = cfg.peer_public_key
    wc.add_peer(peer)
    wc.add_attr(peer, "Endpoint", f"{_endpoint_host(cfg.endpoint_host)}:{cfg.endpoint_port}")
    wc.add_attr(peer, "AllowedIPs", f"{cfg.device_address}/32")
    wc.add_attr(peer, "PersistentKeepalive", cfg.keepalive)
    body = io.StringIO()
    wc.write_to_fileobj(body)
    return "\n".join(_header(cfg)) + "\n\n" + body.getvalue()


def with_private_key(conf_text: str, private_key: str) -> str:
    """Fill the bring-your-own-key placeholder of a rendered config with the engineer's private key."""
    _check_key("private_key", private_key)
    wc = wgconfig.WGConfig()
    wc.read_from_fileobj(io.StringIO(conf_text))
    current = wc.get_interface().get("PrivateKey")
    if current is None:
        raise ValueError("the config has no PrivateKey line to fill")
    if current != PLACEHOLDER:
        raise ValueError("the config already has a private key; refusing to replace it")
    key_line = f"PrivateKey = {PLACEHOLDER}"
    lines = conf_text.splitlines()
    if lines.count(key_line) != 1:
        raise ValueError(f"expected exactly one line {key_line!r}")
    filled = [f"PrivateKey = {private_key}" if line == key_line else line for line in lines if line != BYOK_NOTE]
    return "\n".join(filled) + "\n"


def qr_png(text: str) -> bytes:
    """A PNG (1-bit greyscale) of a QR code of `text`."""
    out = io.BytesIO()
    _qr(text, box_size=_PNG_BOX_PIXELS).make_image(image_factory=qrcode.image.pure.PyPNGImage).save(out)
    return out.getvalue()


def qr_svg(text: str) -> bytes:
    """A standalone SVG document (UTF-8) of a QR code of `text`, on a white background."""
    out = io.BytesIO()
    _qr(text).make_image(image_factory=qrcode.image.svg.SvgPathFillImage).save(out)
    return out.getvalue()


def qr_terminal(text: str, *, dark_background: bool = True) -> str:
    """A QR code of `text` in half-block characters, two module rows per line of text.

    A terminal lights the characters it draws, so on the usual dark background the light modules are
    the ones drawn (as `qrencode -t UTF8` does); pass dark_background=False for dark-on-light.
    """
    matrix = _qr(text).get_matrix()  # True is a dark module; the quiet zone is included
    lit = [[dark != dark_background for dark in row] for row in matrix]
    if len(lit) % 2:
        lit.append([dark_background] * len(lit[0]))  # one more row of quiet zone to fill the last line
    glyphs = {(True, True): "█", (True, False): "▀", (False, True): "▄", (False, False): " "}
    return "".join(
        "".join(glyphs[top, bottom] for top, bottom in zip(upper, lower, strict=True)) + "\n"
        for upper, lower in zip(lit[0::2], lit[1::2], strict=True)
    )


def _header(cfg: EngineerConfig) -> list[str]:
    lines = [f"# wicket session: {cfg.session_id}", f"# device: {cfg.device_id}"]
    if cfg.ends_at is not None:
        ends = cfg.ends_at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        lines.append(f"# ends at: {ends}")
    lines.append(ONE_TIME_NOTE)
    return lines


def _qr(text: str, *, box_size: int = 10) -> qrcode.QRCode:
    qr = qrcode.QRCode(error_correction=_QR_ERROR_CORRECTION, box_size=box_size, border=_QR_BORDER)
    qr.add_data(text)
    qr.make(fit=True)
    return qr


def _check_label(name: str, value: str) -> None:
    # These go into comment lines: a line break would let them add config lines of their own.
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ValueError(f"{name}: must be a non-empty single line of printable text, got {value!r}")


def _check_key(name: str, value: str) -> None:
    """A WireGuard key as wg(8) reads it: 32 bytes in canonical base64 (44 characters)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raw = b""
    if len(raw) != 32 or base64.b64encode(raw).decode() != value:
        raise ValueError(f"{name}: not a WireGuard key (32 bytes in base64, 44 characters)")


def _check_host_address(name: str, value: str) -> None:
    try:
        if not isinstance(value, str):
            raise TypeError
        addr = ipaddress.IPv4Address(value)
    except (ipaddress.AddressValueError, TypeError):
        raise ValueError(f"{name}: not an IPv4 address (no prefix length), got {value!r}") from None
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast or addr.is_reserved:
        raise ValueError(f"{name}: {value} is not a host address")


def _endpoint_host(value: str) -> str:
    """The host as it goes before ':port' in Endpoint; IPv6 literals in brackets."""
    if not isinstance(value, str):
        raise ValueError(f"endpoint_host: expected a string, got {value!r}")
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address):
        return f"[{ip}]"
    if ip is not None and bare == value:
        return value
    labels = value.split(".")
    # An all-numeric last label is a mistyped IPv4 address (e.g. 300.1.1.1), not a DNS name.
    if (len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise ValueError(f"endpoint_host: not a host name, IPv4 or IPv6 address, got {value!r}")
    return value


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: must be an integer from {low} to {high}, got {value!r}")
