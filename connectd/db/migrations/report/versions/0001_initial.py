"""report DB: initial schema.

Revision ID: report_0001
Revises: (none)

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = 'report_0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('consumer_positions',
    sa.Column('spool_id', sa.String(length=64), nullable=False),
    sa.Column('stream', sa.String(length=128), nullable=False),
    sa.Column('consumer', sa.String(length=64), nullable=False),
    sa.Column('segment', sa.Integer(), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=False),
    sa.Column('records', sa.BigInteger(), nullable=False),
    sa.Column('last_record_ts', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('spool_id', 'stream', 'consumer', name=op.f('pk_consumer_positions'))
    )
    op.create_table('event_totals',
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('segment_id', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('total', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('uniques', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('first_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('machine', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('machine_uniques', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('amount', sa.Float(), server_default=sa.text('0'), nullable=False),
    sa.PrimaryKeyConstraint('instance_id', 'segment_id', 'event', name=op.f('pk_event_totals'))
    )
    op.create_table('hourly_counts',
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('hour', sa.DateTime(timezone=True), nullable=False),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('total', sa.BigInteger(), nullable=False),
    sa.Column('uniques', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('machine', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('machine_uniques', sa.BigInteger(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('instance_id', 'hour', 'event', name=op.f('pk_hourly_counts'))
    )
    op.create_table('click_facts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('link_id', sa.BigInteger(), nullable=False),
    sa.Column('clicked_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('machine', sa.Boolean(), nullable=False),
    sa.Column('why', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_click_facts'))
    )
    op.create_table('open_facts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('machine', sa.Boolean(), nullable=False),
    sa.Column('why', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_open_facts'))
    )
    op.create_table('first_hits',
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('machine', sa.Boolean(), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('instance_id', 'machine', 'customer_id',
                            name=op.f('pk_first_hits')),
    sqlite_with_rowid=False
    )
    op.create_table('link_counts',
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('link_id', sa.BigInteger(), nullable=False),
    sa.Column('total', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('machine', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('conversions', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('amount', sa.Float(), server_default=sa.text('0'), nullable=False),
    sa.PrimaryKeyConstraint('instance_id', 'link_id', name=op.f('pk_link_counts'))
    )
    op.create_table('conversion_orders',
    sa.Column('order_key', sa.String(length=200), nullable=False),
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('order_key', name=op.f('pk_conversion_orders'))
    )
    op.create_table('message_facts',
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('segment_id', sa.BigInteger(), nullable=True),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('open_count', sa.Integer(), nullable=False),
    sa.Column('first_open_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_open_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('failed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('bounced_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('bounce_kind', sa.String(length=8), nullable=True),
    sa.Column('reply_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_reply_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('unsubscribed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('complained_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('machine_open_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_click_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_click_link', sa.BigInteger(), nullable=True),
    sa.Column('conversion_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('conversion_amount', sa.Float(), server_default=sa.text('0'), nullable=False),
    sa.PrimaryKeyConstraint('instance_id', 'customer_id', name=op.f('pk_message_facts'))
    )
    op.create_table('report_instances',
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('message_id', sa.BigInteger(), nullable=False),
    sa.Column('campaign_id', sa.BigInteger(), nullable=False),
    sa.Column('campaign_name', sa.String(length=200), nullable=False),
    sa.Column('message_name', sa.String(length=200), nullable=False),
    sa.Column('message_kind', sa.String(length=16), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('instance_id', name=op.f('pk_report_instances'))
    )
    op.create_index(op.f('ix_report_instances_campaign_id'), 'report_instances', ['campaign_id'])
    op.create_index(op.f('ix_report_instances_campaign_name'), 'report_instances', ['campaign_name'])
    op.create_table('report_segments',
    sa.Column('segment_id', sa.BigInteger(), nullable=False),
    sa.Column('campaign_id', sa.BigInteger(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.PrimaryKeyConstraint('segment_id', name=op.f('pk_report_segments'))
    )
    op.create_index(op.f('ix_report_segments_campaign_id'), 'report_segments', ['campaign_id'])

    op.create_table('inbound_messages',
    sa.Column('message', sa.String(length=255), nullable=False),
    sa.Column('received_id', sa.String(length=64), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('handler', sa.String(length=64), server_default='', nullable=False),
    sa.Column('actions', sa.String(length=255), server_default='', nullable=False),
    sa.Column('instance_id', sa.BigInteger(), nullable=True),
    sa.Column('customer_id', sa.BigInteger(), nullable=True),
    sa.Column('context_via', sa.String(length=16), nullable=True),
    sa.Column('hard', sa.Boolean(), nullable=True),
    sa.Column('reason', sa.String(length=64), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=True),
    sa.Column('recipients', sa.Integer(), server_default='0', nullable=False),
    sa.Column('errors', sa.Integer(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('message', name=op.f('pk_inbound_messages'))
    )
    op.create_index(op.f('ix_inbound_messages_instance_id'), 'inbound_messages', ['instance_id'])
    op.create_index(op.f('ix_inbound_messages_processed_at'), 'inbound_messages', ['processed_at'])
    op.create_table('inbound_totals',
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('handler', sa.String(length=64), nullable=False),
    sa.Column('total', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('hard', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('soft', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('first_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('instance_id', 'kind', 'handler', name=op.f('pk_inbound_totals'))
    )
    op.create_table('trigger_counts',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('total', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('first_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('name', 'instance_id', name=op.f('pk_trigger_counts'))
    )

def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('trigger_counts')
    op.drop_table('inbound_totals')
    op.drop_index(op.f('ix_inbound_messages_processed_at'), table_name='inbound_messages')
    op.drop_index(op.f('ix_inbound_messages_instance_id'), table_name='inbound_messages')
    op.drop_table('inbound_messages')
    op.drop_index(op.f('ix_report_segments_campaign_id'), table_name='report_segments')
    op.drop_table('report_segments')
    op.drop_index(op.f('ix_report_instances_campaign_name'), table_name='report_instances')
    op.drop_index(op.f('ix_report_instances_campaign_id'), table_name='report_instances')
    op.drop_table('report_instances')
    op.drop_table('message_facts')
    op.drop_table('conversion_orders')
    op.drop_table('link_counts')
    op.drop_table('first_hits')
    op.drop_table('open_facts')
    op.drop_table('click_facts')
    op.drop_table('hourly_counts')
    op.drop_table('event_totals')
    op.drop_table('consumer_positions')
