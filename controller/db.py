"""Database engines and sessions. SQLite (one controller) by default, PostgreSQL by URL (several
controller replicas). Schema changes only through Alembic migrations (`controller/migrations`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        # No pre-ping: a SQLite connection is a file handle, it cannot have gone away like a server's.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=FULL")
            # Erased secrets (a session's sealed key after its download) are zeroed in the file, not left in free pages.
            cur.execute("PRAGMA secure_delete=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def scrub(engine: Engine) -> None:
    """After erasing a secret: on SQLite, fold the write-ahead log into the database and truncate it, so
    the log's older copies of the page go too. PostgreSQL keeps dead row versions until VACUUM reuses
    their space; what they hold was sealed with the controller's key, which lives outside the database."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: committed when the block ends, rolled back if it raises. A commit that fails
    after its audit records were sealed is an audit write failure (`controller.audit.chain`)."""
    from .audit import chain

    with factory() as session:
        try:
            with session.begin():
                yield session
        except Exception as exc:
            audit_error = chain.commit_failed(session, exc)
            if audit_error is not None:
                raise audit_error from exc
            raise


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
