"""The controller application: `create_app(settings)` wires storage, keys, authentication and routes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fastapi import FastAPI

from . import __version__, errors
from .api import router
from .api_inventory import router as inventory_router
from .api_policy import router as policy_router
from .auth import Auth
from .db import make_engine, session_factory
from .decisions import Decisions
from .inventory import Inventory
from .policy_store import PolicyStore
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
        description="Just-in-time access to field devices: identities, MFA and roles; inventory and passports; policy.",
    )
    app.state.settings, app.state.engine, app.state.auth, app.state.users = settings, engine, auth, Users(auth)
    app.state.policies = PolicyStore(auth)
    app.state.inventory = Inventory(auth, app.state.policies)
    app.state.decisions = Decisions(auth, app.state.policies, engine)
    errors.install(app)
    app.include_router(router)
    app.include_router(inventory_router)
    app.include_router(policy_router)

    @app.get("/healthz", tags=["health"], summary="Liveness")
    def healthz() -> dict:
        return {"status": "ok", "version": __version__}

    return app
