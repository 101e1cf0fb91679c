"""sites, node agents, device passports, policy versions

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sites",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("display_name", sa.String(128), nullable=False),
        sa.Column("time_zone", sa.String(64), nullable=False),
        sa.Column("tunnel_pool", sa.String(64), nullable=False),
        sa.Column("port_min", sa.Integer(), nullable=False),
        sa.Column("port_max", sa.Integer(), nullable=False),
        sa.Column("public_endpoint", sa.String(253), nullable=False),
        sa.Column("lan_networks", sa.JSON(), nullable=False),
        sa.Column("change_windows", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "node_agents",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("sites.id", ondelete="RESTRICT"), nullable=False, index=True),
        sa.Column("description", sa.String(256), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("asset_id", sa.String(64), nullable=False, unique=True),
        sa.Column("device_type", sa.String(48), nullable=False, index=True),
        sa.Column("site_id", sa.Integer(), sa.ForeignKey("sites.id", ondelete="RESTRICT"), nullable=False, index=True),
        sa.Column("addresses", sa.JSON(), nullable=False),
        sa.Column("mac", sa.String(17), nullable=True),
        sa.Column("iccid", sa.String(22), nullable=True, unique=True),
        sa.Column("eid", sa.String(32), nullable=True, unique=True),
        sa.Column("imsis", sa.JSON(), nullable=False),
        sa.Column("firmware", sa.String(64), nullable=True),
        sa.Column("lifecycle", sa.String(16), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=True),
        sa.Column("ports", sa.JSON(), nullable=False),
        sa.Column("description", sa.String(256), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "policy_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version", sa.String(71), nullable=False, index=True),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("comment", sa.String(500), nullable=False),
        sa.Column("applied_at", sa.DateTime(), nullable=False),
        sa.Column("applied_by", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for table in ("policy_versions", "devices", "node_agents", "sites"):
        op.drop_table(table)
