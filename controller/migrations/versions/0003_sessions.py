"""sessions, their approvals and lane leases; node generations

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("node_agents") as batch:
        batch.add_column(sa.Column("generation", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "access_sessions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="RESTRICT"), nullable=False, index=True),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("asset_id", sa.String(64), nullable=False, index=True),
        sa.Column("site", sa.String(64), nullable=False, index=True),
        sa.Column("node", sa.String(64), nullable=True),
        sa.Column("task", sa.String(48), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("incident", sa.String(64), nullable=True),
        sa.Column("break_glass", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("source", sa.String(64), nullable=True),
        sa.Column("duration_s", sa.Integer(), nullable=False),
        sa.Column("approvals_required", sa.Integer(), nullable=False),
        sa.Column("policy_version", sa.String(71), nullable=False),
        sa.Column("decision", sa.JSON(), nullable=False),
        sa.Column("recording", sa.String(16), nullable=False),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("approved_at", sa.DateTime(), nullable=True),
        sa.Column("activated_at", sa.DateTime(), nullable=True),
        sa.Column("end_at", sa.DateTime(), nullable=True, index=True),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("end_reason", sa.String(64), nullable=True),
        sa.Column("ended_by", sa.String(64), nullable=True),
        sa.Column("checked_policy", sa.String(71), nullable=True),
        sa.Column("warned_at", sa.DateTime(), nullable=True),
        sa.Column("extensions", sa.JSON(), nullable=False),
        sa.Column("extension_request", sa.JSON(), nullable=True),
        sa.Column("key_mode", sa.String(8), nullable=True),
        sa.Column("engineer_public_key", sa.String(64), nullable=True),
        sa.Column("sealed_private_key", sa.String(256), nullable=True),
        sa.Column("node_public_key", sa.String(64), nullable=True),
        sa.Column("tunnel_address", sa.String(45), nullable=True),
        sa.Column("device_address", sa.String(45), nullable=True),
        sa.Column("listen_port", sa.Integer(), nullable=True),
        sa.Column("flows", sa.JSON(), nullable=False),
        sa.Column("lane_revision", sa.Integer(), nullable=False),
        sa.Column("config_downloaded_at", sa.DateTime(), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(), nullable=True),
        sa.Column("reviewed_by", sa.String(64), nullable=True),
        sa.Column("review_note", sa.String(1000), nullable=True),
        sa.Column("review_reminded_at", sa.DateTime(), nullable=True),
    )
    op.create_table(
        "session_approvals",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("session_id", sa.String(32), sa.ForeignKey("access_sessions.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("approver_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("approver", sa.String(64), nullable=False),
        sa.Column("verdict", sa.String(8), nullable=False),
        sa.Column("reason", sa.String(500), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("session_id", "kind", "approver_id", name="uq_session_approval"),
    )
    op.create_table(
        "lane_leases",
        sa.Column("session_id", sa.String(32), sa.ForeignKey("access_sessions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("sites.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("address", sa.String(45), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.UniqueConstraint("site_id", "address", name="uq_lease_address"),
        sa.UniqueConstraint("site_id", "port", name="uq_lease_port"),
    )


def downgrade() -> None:
    op.drop_table("lane_leases")
    op.drop_table("session_approvals")
    op.drop_table("access_sessions")
    with op.batch_alter_table("node_agents") as batch:
        batch.drop_column("generation")
