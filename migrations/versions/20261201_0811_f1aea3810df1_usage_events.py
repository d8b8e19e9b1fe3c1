"""usage events: the usage ledger the usage writer fills from the Redis usage streams

No foreign key on device_id or product_id and no cascade from tenants: usage outlives what it
refers to (inference/models.py).

Revision ID: f1aea3810df1
Revises: 4c3be1d5acbc
Create Date: 2026-12-01 08:11:44.132861
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.db


revision: str = 'f1aea3810df1'
down_revision: str | Sequence[str] | None = '4c3be1d5acbc'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('usage_events',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('device_id', sa.Uuid(), nullable=False),
    sa.Column('product_id', sa.Uuid(), nullable=True),
    sa.Column('request_id', sa.String(length=64), nullable=False),
    sa.Column('admitted_at', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('settled_at', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('stream_id', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('conversation_id', sa.String(length=64), nullable=True),
    sa.Column('provider', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('input_tokens', sa.BigInteger(), nullable=False),
    sa.Column('output_tokens', sa.BigInteger(), nullable=False),
    sa.Column('audio_in_ms', sa.BigInteger(), nullable=False),
    sa.Column('audio_out_ms', sa.BigInteger(), nullable=False),
    sa.Column('images', sa.BigInteger(), nullable=False),
    sa.Column('tool_calls', sa.BigInteger(), nullable=False),
    sa.Column('credits', sa.BigInteger(), nullable=False),
    sa.Column('credit_split', sa.JSON(), nullable=False),
    sa.Column('rate_card_version', sa.String(length=64), nullable=True),
    sa.Column('ttft_ms', sa.Float(), nullable=True),
    sa.Column('first_delta_ms', sa.Float(), nullable=True),
    sa.Column('duration_ms', sa.Float(), nullable=False),
    sa.Column('finish', sa.String(length=32), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('broker', sa.String(length=128), nullable=False),
    sa.Column('settled_by', sa.String(length=16), nullable=False),
    sa.Column('written_at', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_usage_events_tenant_id_tenants'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_events')),
    sa.UniqueConstraint('device_id', 'request_id', 'admitted_at', name='uq_usage_events_device_request_admitted')
    )
    op.create_index('ix_usage_events_tenant_admitted', 'usage_events', ['tenant_id', 'admitted_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_usage_events_tenant_admitted', table_name='usage_events')
    op.drop_table('usage_events')
