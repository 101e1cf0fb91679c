"""Alembic environment: migrations run on the connection the controller hands over (`db.migrate`),
or on WICKET_DATABASE_URL when run from the alembic command line."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from controller.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = create_engine(os.environ["WICKET_DATABASE_URL"])
    with engine.begin() as conn:
        _configure(conn)


def _configure(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
