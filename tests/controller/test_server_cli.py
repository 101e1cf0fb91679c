"""`wicket-controller` as an operator runs it: init once, keys private, migrate, serve."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import httpx

CMD = [sys.executable, "-m", "controller.server_cli"]


def run(args, env, stdin=None):
    return subprocess.run(CMD + args, env={**os.environ, **env}, input=stdin, capture_output=True, text=True, timeout=60)


def test_init_then_serve(tmp_path):
    env = {"WICKET_DATA_DIR": str(tmp_path / "data")}
    first = run(["init", "--admin", "root", "--password-stdin"], env, stdin="correct horse battery staple\n")
    assert first.returncode == 0, first.stderr
    assert "otpauth://totp/wicket:root?secret=" in first.stdout and "correct horse" not in first.stdout
    for name in ("signing.key", "secrets.key"):
        mode = stat.S_IMODE((tmp_path / "data" / "keys" / name).stat().st_mode)
        assert mode == 0o600, oct(mode)
    again = run(["init", "--admin", "other"], env)
    assert again.returncode == 2 and "init runs once" in again.stderr
    assert run(["migrate"], env).returncode == 0
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(CMD + ["serve", "--port", str(port)], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                res = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "timeout"
                time.sleep(0.1)
        assert res.status_code == 200 and res.json()["status"] == "ok"
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/auth/whoami").status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_without_init_says_what_to_do(tmp_path):
    res = run(["serve"], {"WICKET_DATA_DIR": str(tmp_path / "nothing")})
    assert res.returncode == 2 and "wicket-controller init" in res.stderr
