"""inference settings, provider configs and product limits

``provider_configs``: one partial unique index keeps a tenant to one default config; a config
per product at most. ``products`` gets three nullable per-device limits with CHECK (> 0), added
as column constraints so SQLite takes them with a plain ADD COLUMN (a table rebuild of
``products`` would have to drop a table that devices reference).

Revision ID: 72c0743ae68d
Revises: f1aea3810df1
Create Date: 2026-12-01 08:20:21.686924
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.db


revision: str = '72c0743ae68d'
down_revision: str | Sequence[str] | None = 'f1aea3810df1'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('inference_settings',
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('memory_ttl_hours', sa.Integer(), nullable=False),
    sa.Column('memory_max_turns', sa.Integer(), nullable=False),
    sa.Column('memory_max_tokens', sa.Integer(), nullable=False),
    sa.Column('transcript_retention_hours', sa.Integer(), nullable=False),
    sa.Column('updated_at', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_inference_settings_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_inference_settings'))
    )
    op.create_table('provider_configs',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.Enum('local', 'openai', name='provider_kind', native_enum=False, length=16), nullable=False),
    sa.Column('base_url', sa.String(length=500), nullable=True),
    sa.Column('model', sa.String(length=128), nullable=False),
    sa.Column('transcription_model', sa.String(length=128), nullable=True),
    sa.Column('speech_model', sa.String(length=128), nullable=True),
    sa.Column('voice', sa.String(length=64), nullable=True),
    sa.Column('api_key_encrypted', sa.String(length=2000), nullable=True),
    sa.Column('api_key_hint', sa.String(length=4), nullable=True),
    sa.Column('product_id', sa.Uuid(), nullable=True),
    sa.Column('is_default', sa.Boolean(), nullable=False),
    sa.Column('secondary_id', sa.Uuid(), nullable=True),
    sa.Column('first_token_timeout_s', sa.Float(), nullable=False),
    sa.Column('total_timeout_s', sa.Float(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('updated_at', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('created_at', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.CheckConstraint('secondary_id IS NULL OR secondary_id <> id', name=op.f('ck_provider_configs_not_own_secondary')),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_provider_configs_product_id_products'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['secondary_id'], ['provider_configs.id'], name=op.f('fk_provider_configs_secondary_id_provider_configs'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_provider_configs_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_provider_configs')),
    sa.UniqueConstraint('product_id', name='uq_provider_configs_product_id'),
    sa.UniqueConstraint('tenant_id', 'name', name='uq_provider_configs_tenant_name')
    )
    op.create_index(op.f('ix_provider_configs_tenant_id'), 'provider_configs', ['tenant_id'], unique=False)
    op.create_index('uq_provider_configs_tenant_default', 'provider_configs', ['tenant_id'], unique=True, postgresql_where=sa.text('is_default'), sqlite_where=sa.text('is_default'))
    op.add_column('products', sa.Column('requests_per_minute', sa.Integer(), sa.CheckConstraint(
        'requests_per_minute > 0', name=op.f('ck_products_requests_per_minute_positive')), nullable=True))
    op.add_column('products', sa.Column('concurrent_streams', sa.Integer(), sa.CheckConstraint(
        'concurrent_streams > 0', name=op.f('ck_products_concurrent_streams_positive')), nullable=True))
    op.add_column('products', sa.Column('daily_request_cap', sa.Integer(), sa.CheckConstraint(
        'daily_request_cap > 0', name=op.f('ck_products_daily_request_cap_positive')), nullable=True))


def downgrade() -> None:
    op.drop_column('products', 'daily_request_cap')
    op.drop_column('products', 'concurrent_streams')
    op.drop_column('products', 'requests_per_minute')
    op.drop_index('uq_provider_configs_tenant_default', table_name='provider_configs', postgresql_where=sa.text('is_default'), sqlite_where=sa.text('is_default'))
    op.drop_index(op.f('ix_provider_configs_tenant_id'), table_name='provider_configs')
    op.drop_table('provider_configs')
    op.drop_table('inference_settings')
