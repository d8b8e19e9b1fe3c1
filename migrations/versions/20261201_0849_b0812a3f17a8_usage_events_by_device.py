"""usage events by device: a device's recent requests, newest first, without a sort

Revision ID: b0812a3f17a8
Revises: 72c0743ae68d
Create Date: 2026-12-01 08:49:32.145129
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op


revision: str = 'b0812a3f17a8'
down_revision: str | Sequence[str] | None = '72c0743ae68d'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_usage_events_device_admitted', 'usage_events',
                    ['device_id', 'admitted_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_usage_events_device_admitted', table_name='usage_events')
