"""The controller application: `create_app(settings)` wires storage, keys, authentication and routes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fastapi import FastAPI

from . import __version__, errors
from .api import router
from .auth import Auth
from .db import make_engine, session_factory
from .security import keys as controller_keys
from .settings import Settings
from .users import Users

log = logging.getLogger("wicket.controller")


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time, engine=None) -> FastAPI:
    keys = controller_keys.load(settings.keys_dir)
    engine = engine or make_engine(settings.database_url)
    factory = session_factory(engine)
    auth = Auth(settings, keys, factory, clock)
    app = FastAPI(
        title="wicket controller",
        version=__version__,
        description="Just-in-time access to field devices: identities, MFA and roles (more to come).",
    )
    app.state.settings, app.state.engine, app.state.auth, app.state.users = settings, engine, auth, Users(auth)
    errors.install(app)
    app.include_router(router)

    @app.get("/healthz", tags=["health"], summary="Liveness")
    def healthz() -> dict:
        return {"status": "ok", "version": __version__}

    return app
