"""The WireGuard UAPI text protocol: parsing `get` replies, and talking to a tiny fake server on a Unix socket."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import threading

import pytest

from nodeagent.wg import uapi
from nodeagent.wg.uapi import (
    DeviceInfo,
    PeerInfo,
    UapiError,
    get_device,
    parse_get,
    peer_pid,
    set_device,
    socket_path,
)

PRIV = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a"
PUB = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33"
PUB2 = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376"

GET_REPLY = (
    f"private_key={PRIV}\n"
    "listen_port=51820\n"
    "fwmark=0\n"
    f"public_key={PUB}\n"
    "preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n"
    "protocol_version=1\n"
    "endpoint=203.0.113.7:40123\n"
    "last_handshake_time_sec=1800000123\n"
    "last_handshake_time_nsec=456000000\n"
    "tx_bytes=1480\n"
    "rx_bytes=2960\n"
    "persistent_keepalive_interval=0\n"
    "allowed_ip=100.64.0.2/32\n"
    "allowed_ip=100.64.0.3/32\n"
    "errno=0\n"
    "\n"
)


def test_parse_get_realistic_reply():
    info = parse_get(GET_REPLY)
    assert info == DeviceInfo(
        private_key_hex=PRIV,
        listen_port=51820,
        peers=[
            PeerInfo(
                public_key_hex=PUB, endpoint="203.0.113.7:40123", rx_bytes=2960, tx_bytes=1480,
                last_handshake_sec=1800000123, last_handshake_nsec=456000000,
                allowed_ips=["100.64.0.2/32", "100.64.0.3/32"],
            )
        ],
    )


def test_parse_get_device_without_peers():
    info = parse_get(f"private_key={PRIV}\nlisten_port=40000\nerrno=0\n\n")
    assert info == DeviceInfo(private_key_hex=PRIV, listen_port=40000, peers=[])


def test_parse_get_device_without_key_or_port():
    assert parse_get("errno=0\n\n") == DeviceInfo(private_key_hex=None, listen_port=None, peers=[])


def test_parse_get_two_peers_keep_their_own_values():
    text = (
        f"private_key={PRIV}\nlisten_port=1\n"
        f"public_key={PUB}\nrx_bytes=1\nallowed_ip=10.0.0.1/32\n"
        f"public_key={PUB2}\ntx_bytes=2\nendpoint=[2001:db8::1]:51820\nallowed_ip=10.0.0.2/32\n"
        "errno=0\n\n"
    )
    info = parse_get(text)
    assert [p.public_key_hex for p in info.peers] == [PUB, PUB2]
    assert (info.peers[0].rx_bytes, info.peers[0].tx_bytes, info.peers[0].allowed_ips, info.peers[0].endpoint) == (
        1, 0, ["10.0.0.1/32"], None,
    )
    assert (info.peers[1].rx_bytes, info.peers[1].tx_bytes, info.peers[1].allowed_ips, info.peers[1].endpoint) == (
        0, 2, ["10.0.0.2/32"], "[2001:db8::1]:51820",
    )


def test_parse_get_peer_never_overrides_device_fields():
    # a peer line after public_key= must not be read as the device's listen_port/private_key
    info = parse_get(f"listen_port=1000\npublic_key={PUB}\nlisten_port=2000\nprivate_key={PRIV}\n\n")
    assert info.listen_port == 1000 and info.private_key_hex is None


# ---- a fake UAPI server ----------------------------------------------------------------------------------


class FakeUapi:
    """Serves one device's UAPI socket from a thread: records each request, answers with `reply`."""

    def __init__(self, directory: str, name: str, reply: str = "errno=0\n\n", close_without_reply: bool = False):
        self.path = socket_path(name, directory)
        self.reply = reply
        self.close_without_reply = close_without_reply
        self.requests: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.sock.settimeout(5)
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                buf = b""
                while not buf.endswith(b"\n\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
                if self._stop:
                    return
                if not buf:  # a connection that only asked for SO_PEERCRED
                    continue
                self.requests.append(buf.decode())
                if not self.close_without_reply:
                    try:
                        conn.sendall(self.reply.encode())
                    except OSError:
                        pass

    def close(self) -> None:
        self._stop = True
        try:
            # wake accept()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(self.path)
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="wk-uapi-", dir="/tmp")  # short: AF_UNIX paths are limited to 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve(sockdir):
    servers: list[FakeUapi] = []

    def _serve(name: str, **kw) -> FakeUapi:
        srv = FakeUapi(sockdir, name, **kw)
        servers.append(srv)
        return srv

    yield _serve
    for srv in servers:
        srv.close()


def test_socket_path():
    assert socket_path("wkab1abcdefghij") == "/var/run/wireguard/wkab1abcdefghij.sock"
    assert socket_path("wg0", "/tmp/x") == "/tmp/x/wg0.sock"


def test_set_device_sends_exact_request(serve, sockdir):
    srv = serve("wkab1lane000001")
    lines = [
        f"private_key={PRIV}",
        "listen_port=51820",
        "replace_peers=true",
        f"public_key={PUB}",
        "replace_allowed_ips=true",
        "allowed_ip=100.64.0.2/32",
    ]
    set_device("wkab1lane000001", lines, directory=sockdir)
    assert srv.requests == [
        "set=1\n"
        f"private_key={PRIV}\n"
        "listen_port=51820\n"
        "replace_peers=true\n"
        f"public_key={PUB}\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=100.64.0.2/32\n"
        "\n"
    ]


def test_set_device_errno_raises(serve, sockdir):
    serve("wkab1lane000002", reply="errno=22\n\n")
    with pytest.raises(UapiError) as exc:
        set_device("wkab1lane000002", ["listen_port=1"], directory=sockdir)
    assert exc.value.errno == 22
    assert "wkab1lane000002: UAPI set refused (errno=22)" in str(exc.value)
    assert isinstance(exc.value, OSError)


def test_get_device_sends_get_and_parses(serve, sockdir):
    srv = serve("wkab1lane000003", reply=GET_REPLY)
    info = get_device("wkab1lane000003", directory=sockdir)
    assert srv.requests == ["get=1\n\n"]
    assert info == parse_get(GET_REPLY)
    assert info.listen_port == 51820 and info.peers[0].allowed_ips == ["100.64.0.2/32", "100.64.0.3/32"]


def test_get_device_errno_raises(serve, sockdir):
    serve("wkab1lane000004", reply="errno=1\n\n")
    with pytest.raises(UapiError) as exc:
        get_device("wkab1lane000004", directory=sockdir)
    assert exc.value.errno == 1
    assert "UAPI get refused (errno=1)" in str(exc.value)


def test_missing_socket_raises_enoent(sockdir):
    with pytest.raises(UapiError) as exc:
        get_device("wkab1nosuchlane", directory=sockdir)
    assert exc.value.errno == errno.ENOENT
    assert "wkab1nosuchlane: UAPI socket not available" in str(exc.value)


def test_refused_socket_raises_econnrefused(sockdir):
    # a stale socket file whose server is gone (wireguard-go was killed)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(socket_path("wkab1stalesock0", sockdir))
    s.close()
    with pytest.raises(UapiError) as exc:
        set_device("wkab1stalesock0", ["listen_port=1"], directory=sockdir)
    assert exc.value.errno == errno.ECONNREFUSED


def test_connect_retries_until_the_socket_appears(sockdir):
    name = "wkab1latecomer0"
    servers: list[FakeUapi] = []
    timer = threading.Timer(0.05, lambda: servers.append(FakeUapi(sockdir, name)))
    timer.start()
    try:
        set_device(name, ["listen_port=2000"], timeout=3.0, directory=sockdir)
    finally:
        timer.join()
        for srv in servers:
            srv.close()
    assert servers[0].requests == ["set=1\nlisten_port=2000\n\n"]


def test_peer_pid_is_the_serving_process(serve, sockdir):
    srv = serve("wkab1lane000005")
    assert peer_pid("wkab1lane000005", directory=sockdir) == os.getpid()
    assert srv.requests == []  # asking for the peer's credentials sends nothing


def test_uapi_error_is_os_error():
    e = UapiError(errno.EPROTO, "x")
    assert isinstance(e, OSError) and e.errno == errno.EPROTO
    assert uapi._errno("a=b\nerrno=-5\n\n") == -5
    assert uapi._errno("errno=0\n\n") == 0


def test_set_device_without_errno_reply_raises(serve, sockdir):
    serve("wkab1lane000006", close_without_reply=True)
    with pytest.raises(UapiError) as exc:
        set_device("wkab1lane000006", ["listen_port=1"], directory=sockdir)
    assert exc.value.errno == errno.EPROTO


def test_get_device_without_errno_reply_raises(serve, sockdir):
    serve("wkab1lane000007", close_without_reply=True)
    with pytest.raises(UapiError):
        get_device("wkab1lane000007", directory=sockdir)
