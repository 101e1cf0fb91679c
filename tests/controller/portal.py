"""One event-loop thread for every in-process API call of a test run.

A bare `TestClient` starts a new event-loop thread for each request (about 5 ms each, thousands of times
a run); entering the client as a context manager would keep one, but also runs the app's lifespan, which
starts the audit checkpointer and the SIEM shipper that these tests drive by hand. So the clients here
share a portal the run starts once, and the app's lifespan never runs.

    client = shared_client(app, raise_server_exceptions=False)
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import anyio
import anyio.from_thread
from fastapi.testclient import TestClient

_lock = threading.Lock()
_portal: anyio.from_thread.BlockingPortal | None = None
_thread: threading.Thread | None = None


def shared_client(app, **kw) -> TestClient:
    client = TestClient(app, **kw)
    client.portal = _shared_portal(client.async_backend)
    return client


def _shared_portal(backend: dict) -> anyio.from_thread.BlockingPortal:
    global _portal, _thread
    with _lock:
        if _portal is None:
            made: Future = Future()

            async def serve() -> None:
                async with anyio.from_thread.BlockingPortal() as portal:
                    made.set_result(portal)
                    await portal.sleep_until_stopped()

            # a daemon thread: a script that never calls close() still exits
            _thread = threading.Thread(target=anyio.run, args=(serve,), kwargs=backend, daemon=True, name="test-api-loop")
            _thread.start()
            _portal = made.result(timeout=30)
        return _portal


def close() -> None:
    """Stop the shared loop (the end of the run)."""
    global _portal, _thread
    with _lock:
        if _portal is not None:
            _portal.call(_portal.stop)
            _thread.join(10)
        _portal = _thread = None
