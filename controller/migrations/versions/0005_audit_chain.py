"""audit chain: events become hash-chained records; checkpoints, keys, sink cursors, recordings

Existing events are sealed into the chain in their order, renumbered from 1 without gaps, with clock
state "unknown" (it was not recorded then).

Revision ID: 0005
Revises: 0004
"""

from datetime import UTC

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from controller.audit.chain import GENESIS, chain_hash, leaf_hash, record_line

    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("clock", sa.String(8), nullable=False, server_default="unknown"))
        batch.add_column(sa.Column("session_ref", sa.String(64), nullable=True))
        batch.add_column(sa.Column("device_ref", sa.String(64), nullable=True))
        batch.add_column(sa.Column("line", sa.Text(), nullable=True))
        batch.add_column(sa.Column("leaf", sa.String(64), nullable=True))
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(64), nullable=True))
        batch.create_index("ix_events_session_ref", ["session_ref"])
        batch.create_index("ix_events_device_ref", ["device_ref"])

    bind = op.get_bind()
    events = sa.table("events", sa.column("seq", sa.Integer), sa.column("at", sa.DateTime), sa.column("category", sa.String),
                      sa.column("type", sa.String), sa.column("result", sa.String), sa.column("actor_id", sa.Integer),
                      sa.column("actor", sa.String), sa.column("subject", sa.String), sa.column("source", sa.String),
                      sa.column("reason", sa.String), sa.column("body", sa.JSON), sa.column("session_ref", sa.String),
                      sa.column("device_ref", sa.String), sa.column("line", sa.Text), sa.column("leaf", sa.String),
                      sa.column("prev_hash", sa.String), sa.column("hash", sa.String))
    prev, n = GENESIS, 0
    for row in bind.execute(sa.select(events).order_by(events.c.seq)).mappings().all():
        n += 1
        body = row["body"] or {}
        session_ref = body.get("session_id") or (row["subject"] if row["category"] in ("session", "evidence") else None)
        device_ref = body.get("device") or body.get("device_id")
        line = record_line(seq=n, at=row["at"].replace(tzinfo=UTC), clock="unknown", category=row["category"],
                           type=row["type"], result=row["result"], actor=row["actor"], actor_id=row["actor_id"],
                           subject=row["subject"], source=row["source"], reason=row["reason"],
                           session=str(session_ref)[:64] if session_ref else None,
                           device=str(device_ref)[:64] if device_ref else None, body=body)
        leaf = leaf_hash(line)
        new = chain_hash(prev, leaf)
        # Renumbering in ascending order never collides: n ≤ the old number.
        bind.execute(events.update().where(events.c.seq == row["seq"]).values(
            seq=n, line=line, leaf=leaf, prev_hash=prev, hash=new, session_ref=session_ref and str(session_ref)[:64],
            device_ref=device_ref and str(device_ref)[:64]))
        prev = new

    with op.batch_alter_table("events") as batch:
        batch.alter_column("line", existing_type=sa.Text(), nullable=False)
        batch.alter_column("leaf", existing_type=sa.String(64), nullable=False)
        batch.alter_column("prev_hash", existing_type=sa.String(64), nullable=False)
        batch.alter_column("hash", existing_type=sa.String(64), nullable=False)

    with op.batch_alter_table("access_sessions") as batch:
        batch.add_column(sa.Column("evidence_recorded_at", sa.DateTime(), nullable=True))
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": n, "hash": prev}])
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("tree_size", sa.Integer(), nullable=False, unique=True),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("statement", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "audit_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("retired_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "audit_sink_cursors",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("delivered", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_ok_at", sa.DateTime(), nullable=True),
        sa.Column("last_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.Column("lease_holder", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "session_recordings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("ident", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=True, index=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(500), nullable=False),
        sa.Column("truncated", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("node", "ident"),
    )


def downgrade() -> None:
    # The records stay; their chain (hashes, checkpoints) and the cursors go.
    for table in ("session_recordings", "audit_sink_cursors", "audit_keys", "audit_checkpoints", "audit_head"):
        op.drop_table(table)
    with op.batch_alter_table("access_sessions") as batch:
        batch.drop_column("evidence_recorded_at")
    with op.batch_alter_table("events") as batch:
        batch.drop_index("ix_events_session_ref")
        batch.drop_index("ix_events_device_ref")
        for column in ("clock", "session_ref", "device_ref", "line", "leaf", "prev_hash", "hash"):
            batch.drop_column(column)
