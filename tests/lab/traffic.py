"""Traffic tools that run inside lab namespaces: `python -m tests.lab.traffic COMMAND …`.

  serve --tcp 2404,502 [--udp 20000] [--sink 9000] [--push 8080]
                                                    echo servers (a TCP sink that counts bytes; a server that
                                                    sends a line every 50 ms and never reads)
  probe HOST PORT [--udp] [--timeout S]             prints open | refused | prohibited | timeout | unreachable
  hold HOST PORT --seconds S                        one TCP connection, a line every 50 ms; prints JSON
                                                    {"last_ok": wall, "broken": wall|null, "error": ...}
  listen HOST PORT --seconds S                      one TCP connection the peer talks on (a `--push` server):
                                                    prints {"last_rx": wall, "broken": wall|null, "error": ...}
  blast HOST PORT --count N --size S                UDP datagrams; prints {"sent": N, "payload_bytes": …}
  send HOST PORT --bytes B                          TCP bulk send to a sink; prints {"sent": B}
Used by the lab tests, the benchmarks and the demo.
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import sys
import threading
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="traffic")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tcp", default="")
    s.add_argument("--udp", default="")
    s.add_argument("--sink", default="")
    s.add_argument("--push", default="")
    s.add_argument("--v6", action="store_true", help="listen on IPv6 too (dual-stack sockets)")
    pr = sub.add_parser("probe")
    pr.add_argument("host")
    pr.add_argument("port", type=int)
    pr.add_argument("--udp", action="store_true")
    pr.add_argument("--timeout", type=float, default=1.0)
    pr.add_argument("--source", default=None, help="send from this local address (a forged one, if it is not ours)")
    h = sub.add_parser("hold")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--seconds", type=float, required=True)
    li = sub.add_parser("listen")
    li.add_argument("host")
    li.add_argument("port", type=int)
    li.add_argument("--seconds", type=float, required=True)
    b = sub.add_parser("blast")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("--count", type=int, required=True)
    b.add_argument("--size", type=int, required=True)
    se = sub.add_parser("send")
    se.add_argument("host")
    se.add_argument("port", type=int)
    se.add_argument("--bytes", type=int, required=True)
    args = p.parse_args(argv)
    return {"serve": serve, "probe": probe, "hold": hold, "listen": listen, "blast": blast, "send": send}[args.cmd](args)


def _ports(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def serve(args) -> int:
    for port in _ports(args.tcp):
        threading.Thread(target=_tcp_server, args=(port, True, args.v6), daemon=True).start()
    for port in _ports(args.sink):
        threading.Thread(target=_tcp_server, args=(port, False, args.v6), daemon=True).start()
    for port in _ports(args.udp):
        threading.Thread(target=_udp_echo, args=(port, args.v6), daemon=True).start()
    for port in _ports(args.push):
        threading.Thread(target=_tcp_push_server, args=(port,), daemon=True).start()
    time.sleep(0.1)
    print("ready", flush=True)
    threading.Event().wait()
    return 0


def _bound(kind: int, port: int, v6: bool) -> socket.socket:
    """A socket on every address of the namespace: IPv4 only, or dual-stack with `v6`."""
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if v6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::" if v6 else "0.0.0.0", port))
    return s


def _tcp_server(port: int, echo: bool, v6: bool = False) -> None:
    srv = _bound(socket.SOCK_STREAM, port, v6)
    srv.listen(64)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_tcp_conn, args=(conn, echo), daemon=True).start()


def _tcp_conn(conn: socket.socket, echo: bool) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                if echo:
                    conn.sendall(data)
        except OSError:
            pass


def _tcp_push_server(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(16)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_push, args=(conn,), daemon=True).start()


def _push(conn: socket.socket) -> None:
    with conn:
        try:
            n = 0
            while True:
                conn.sendall(f"tick {n}\n".encode())
                n += 1
                time.sleep(0.05)
        except OSError:
            pass


def listen(args) -> int:
    """The peer talks; we only read. `last_rx` is when the last bytes arrived."""
    def exchange(s: socket.socket, result: dict) -> None:
        if not s.recv(4096):
            raise ConnectionResetError("closed by peer")
        result["last_rx"] = time.time()

    return _one_connection(args, {"last_rx": None}, exchange)


def _udp_echo(port: int, v6: bool = False) -> None:
    s = _bound(socket.SOCK_DGRAM, port, v6)
    while True:
        data, peer = s.recvfrom(65536)
        s.sendto(data, peer)


def probe(args) -> int:
    print(probe_once(args.host, args.port, args.udp, args.timeout, source=args.source))
    return 0


def probe_once(host: str, port: int, udp: bool, timeout: float, source: str | None = None) -> str:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if udp:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            if source:
                s.bind((source, 0))
            s.connect((host, port))
            s.send(b"probe")
            s.recv(100)
            return "open"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return _classify(exc)
        finally:
            s.close()
    try:
        socket.create_connection((host, port), timeout=timeout, source_address=(source, 0) if source else None).close()
        return "open"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return _classify(exc)


def _classify(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED:
        return "refused"
    if exc.errno in (errno.EHOSTUNREACH, errno.EACCES, errno.EPERM):
        return "prohibited"
    if exc.errno in (errno.ENETUNREACH,):
        return "unreachable"
    return f"error:{errno.errorcode.get(exc.errno, exc.errno)}"


def hold(args) -> int:
    """We send a line every 50 ms and wait for its echo. `last_ok` is when the last echo came back."""
    n = 0

    def exchange(s: socket.socket, result: dict) -> None:
        nonlocal n
        line = f"ping {n}\n".encode()
        s.sendall(line)
        got = b""
        while len(got) < len(line):
            chunk = s.recv(len(line) - len(got))
            if not chunk:
                raise ConnectionResetError("closed by peer")
            got += chunk
        result["last_ok"] = time.time()
        n += 1
        time.sleep(0.05)

    return _one_connection(args, {"last_ok": None}, exchange)


def _one_connection(args, fields: dict, exchange) -> int:
    """One TCP connection to args.host:args.port for args.seconds, `exchange` called until it fails; prints
    JSON {"connected", "broken" (wall time or null), "error", **fields}."""
    result = {"connected": None, **fields, "broken": None, "error": None}
    try:
        s = socket.create_connection((args.host, args.port), timeout=2)
    except OSError as exc:
        result["error"] = f"connect: {exc}"
        print(json.dumps(result), flush=True)
        return 0
    result["connected"] = time.time()
    s.settimeout(0.5)
    end = time.time() + args.seconds
    try:
        while time.time() < end:
            exchange(s, result)
    except OSError as exc:
        result["broken"] = time.time()
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        s.close()
    print(json.dumps(result), flush=True)
    return 0


def blast(args) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"\xa5" * args.size
    for _ in range(args.count):
        s.sendto(payload, (args.host, args.port))
        time.sleep(0.0002)
    print(json.dumps({"sent": args.count, "payload_bytes": args.count * args.size, "ip_bytes": args.count * (args.size + 28)}))
    return 0


def send(args) -> int:
    s = socket.create_connection((args.host, args.port), timeout=5)
    chunk = b"\x5a" * 65536
    left = args.bytes
    while left > 0:
        n = s.send(chunk[: min(left, len(chunk))])
        left -= n
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    print(json.dumps({"sent": args.bytes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
