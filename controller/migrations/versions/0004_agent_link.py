"""agent enrolment and link: join tokens, agent certificates, link tracking, delivered evidence; opening sessions

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node_agents") as batch:
        batch.add_column(sa.Column("enrolled_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("evidence_public_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("connected", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("link_replica", sa.String(64), nullable=True))
        batch.add_column(sa.Column("connected_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("last_seen", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("applied_generation", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("agent_version", sa.String(32), nullable=True))
        batch.add_column(sa.Column("protocol_version", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("clock_synchronized", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("last_error", sa.String(500), nullable=True))
    with op.batch_alter_table("access_sessions") as batch:
        batch.add_column(sa.Column("opened_generation", sa.Integer(), nullable=True))
    op.create_table(
        "join_tokens",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("sites.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.Column("used_by", sa.String(64), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("revoked_by", sa.String(64), nullable=True),
    )
    op.create_table(
        "agent_certificates",
        sa.Column("serial", sa.String(40), primary_key=True),
        sa.Column("node", sa.String(64), nullable=False, index=True),
        sa.Column("issued_at", sa.DateTime(), nullable=False),
        sa.Column("not_after", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "lane_evidence",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("node", sa.String(64), nullable=False, index=True),
        sa.Column("ident", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=True, index=True),
        sa.Column("end_reason", sa.String(32), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("verified_with", sa.String(64), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("node", "ident"),
    )


def downgrade() -> None:
    op.drop_table("lane_evidence")
    op.drop_table("agent_certificates")
    op.drop_table("join_tokens")
    with op.batch_alter_table("access_sessions") as batch:
        batch.drop_column("opened_generation")
    with op.batch_alter_table("node_agents") as batch:
        for col in ("last_error", "clock_synchronized", "protocol_version", "agent_version", "applied_generation", "last_seen",
                    "connected_at", "link_replica", "connected", "revoked_at", "evidence_public_key", "enrolled_at"):
            batch.drop_column(col)
