"""The agent's local control socket: how `wicket-agent apply|status|close|evidence|reset` reach the daemon.

A Unix stream socket in the state directory (0600, root only), one JSON request and one JSON answer per
connection. Requests are queued for the agent's loop thread, which makes every change.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable

from pydantic import ValidationError

from .errors import AgentError
from .link import LINK
from .wire import DesiredNodeState

MAX_REQUEST = 16 << 20


class ControlError(Exception):
    pass


def handler(agent) -> Callable[[dict], dict]:
    def handle(req: dict) -> dict:
        op = req.get("op")
        try:
            if op == "apply":
                via_link = req.get("via") is LINK
                if agent.link is not None and not via_link:
                    return {"ok": False, "error": "this agent is enrolled with a controller: its desired state comes only "
                                                  "over the link (`wicket-agent status` shows the link)"}
                if isinstance(req.get("desired"), DesiredNodeState):
                    desired = req["desired"]
                    raw = desired.model_dump_json()
                else:
                    raw = json.dumps(req.get("desired"))
                    desired = DesiredNodeState.model_validate_json(raw)
                out = {"ok": True, "report": agent.apply(desired, raw).model_dump(mode="json")}
                if via_link:
                    out["status"] = agent.status().model_dump(mode="json")
                return out
            if op == "applied_generation":
                return {"ok": True, "generation": agent.desired.generation if agent.desired else None,
                        "boot_id": agent.clock.boot_id()}
            if op == "status":
                return {"ok": True, "status": agent.status().model_dump(mode="json")}
            if op == "close":
                return {"ok": True, "report": agent.close(str(req.get("session_id"))).model_dump(mode="json")}
            if op == "evidence":
                pending = agent.state.pending_evidence()
                if req.get("ack"):
                    return {"ok": agent.state.ack_evidence(str(req["ack"])), "acked": req["ack"]}
                return {"ok": True, "evidence": {k: v.model_dump(mode="json") for k, v in pending.items()}}
            if op == "reset":
                return {"ok": True, "report": agent.reset().model_dump(mode="json")}
            if op == "stop":
                agent.stopping.set()
                return {"ok": True}
            return {"ok": False, "error": f"unknown request {op!r}"}
        except ValidationError as exc:
            return {"ok": False, "error": "invalid desired state: " + _validation_text(exc)}
        except AgentError as exc:
            return {"ok": False, "error": str(exc)}

    return handle


class ControlServer:
    def __init__(self, path: str, requests):
        self.path, self.requests = path, requests
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._accept, name="control", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if os.path.exists(self.path):
                os.unlink(self.path)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                req = json.loads(_read_all(conn))
                if not isinstance(req, dict):
                    raise ValueError("request must be an object")
            except ValueError as exc:
                conn.sendall(json.dumps({"ok": False, "error": f"bad request: {exc}"}).encode())
                return
            done = threading.Event()
            answer: dict = {}

            def reply(result: dict) -> None:
                answer.update(result)
                done.set()

            self.requests.put((req, reply))
            if not done.wait(300):
                answer = {"ok": False, "error": "agent busy"}
            conn.sendall(json.dumps(answer).encode())


def call(path: str, request: dict, timeout: float = 120) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(f"the agent is not running (no control socket at {path}); start it with `wicket-agent run`") from exc
    with s:
        s.sendall(json.dumps(request).encode())
        s.shutdown(socket.SHUT_WR)
        return json.loads(_read_all(s))


def _read_all(conn: socket.socket) -> bytes:
    chunks, size = [], 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_REQUEST:
            raise ValueError("request too large")
        chunks.append(chunk)
        if chunk.endswith(b"}") and _complete(b"".join(chunks)):
            break
    return b"".join(chunks)


def _complete(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


def _validation_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(x) for x in err["loc"]) or "(top)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)

