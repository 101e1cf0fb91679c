"""device baselines and grants: sites' handling of devices without a passport; grant sessions

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sites") as batch:
        batch.add_column(sa.Column("unpassported", sa.String(8), nullable=False, server_default="router"))
        batch.add_column(sa.Column("device_networks", sa.JSON(), nullable=True))
    op.execute(sa.text("UPDATE sites SET device_networks = '[]'"))
    with op.batch_alter_table("sites") as batch:
        batch.alter_column("device_networks", existing_type=sa.JSON(), nullable=False)
    with op.batch_alter_table("access_sessions") as batch:
        batch.add_column(sa.Column("kind", sa.String(8), nullable=False, server_default="lane"))
        batch.add_column(sa.Column("grant_group", sa.String(32), nullable=True))
        batch.create_index("ix_access_sessions_grant_group", ["grant_group"])


def downgrade() -> None:
    with op.batch_alter_table("access_sessions") as batch:
        batch.drop_index("ix_access_sessions_grant_group")
        batch.drop_column("grant_group")
        batch.drop_column("kind")
    with op.batch_alter_table("sites") as batch:
        batch.drop_column("device_networks")
        batch.drop_column("unpassported")
