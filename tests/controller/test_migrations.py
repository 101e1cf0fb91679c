"""The migrations build exactly the schema the models describe, on both databases: a column added to a
model without a migration (or the reverse) fails here, not in production."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from controller.db import make_engine, migrate
from controller.models import Base


def _differences(url: str) -> list:
    engine = make_engine(url)
    try:
        migrate(engine)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": False})
            diffs = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    # alembic's own bookkeeping table is not a model
    return [d for d in diffs if not (d[0] == "remove_table" and d[1].name == "alembic_version")]


def test_migrations_match_the_models(db_url):
    assert _differences(db_url) == []
