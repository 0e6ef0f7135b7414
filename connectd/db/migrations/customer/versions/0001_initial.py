"""customer DB: initial schema (and the seeded roles).

Revision ID: customer_0001
Revises: (none)

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = 'customer_0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('attribute_defs',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('type', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_attribute_defs'))
    )
    op.create_table('composer_heartbeats',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.Column('throughput', sa.Float(), server_default=sa.text('0'), nullable=False),
    sa.Column('backlog', sa.Integer(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_composer_heartbeats')),
    sa.UniqueConstraint('name', name=op.f('uq_composer_heartbeats_name'))
    )
    op.create_table('rate_buckets',
    sa.Column('key', sa.String(length=300), nullable=False),
    sa.Column('rate', sa.Float(), nullable=False),
    sa.Column('burst', sa.Float(), nullable=False),
    sa.Column('tokens', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_rate_buckets'))
    )
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
    op.create_table('contents',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('subject', sa.String(length=998), nullable=False),
    sa.Column('from_address', sa.String(length=320), nullable=True),
    sa.Column('html_url', sa.String(length=2048), nullable=True),
    sa.Column('text_url', sa.String(length=2048), nullable=True),
    sa.Column('html', sa.Text(), nullable=True),
    sa.Column('text', sa.Text(), nullable=True),
    sa.Column('version', sa.Integer(), server_default='1', nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_contents'))
    )
    op.create_table('conversations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conversations')),
    sa.UniqueConstraint('name', name=op.f('uq_conversations_name'))
    )
    op.create_table('customers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('email_key', sa.String(length=320), nullable=False),
    sa.Column('attributes', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_customers')),
    sa.UniqueConstraint('email_key', name=op.f('uq_customers_email_key'))
    )
    op.create_table('roles',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('permissions', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_roles'))
    )
    op.create_table('suppression_lists',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_suppression_lists')),
    sa.UniqueConstraint('name', name=op.f('uq_suppression_lists_name'))
    )
    op.create_table('campaigns',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('conversation_id', sa.BigInteger(), nullable=True),
    sa.Column('audience_filter', sa.Text(), nullable=True),
    sa.Column('from_address', sa.String(length=320), nullable=True),
    sa.Column('cron', sa.String(length=100), nullable=True),
    sa.Column('every_n_days', sa.Integer(), nullable=True),
    sa.Column('event_name', sa.String(length=64), nullable=True),
    sa.Column('starts_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('ends_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_by', sa.String(length=64), nullable=True),
    sa.Column('approved_by', sa.String(length=64), nullable=True),
    sa.Column('approved_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('normal', 'recurring', 'event', 'subscribe', 'unsubscribe')", name=op.f('ck_campaigns_kind')),
    sa.CheckConstraint("status IN ('draft', 'ready', 'approved', 'running', 'paused', 'done', 'cancelled', 'archived')", name=op.f('ck_campaigns_status')),
    sa.CheckConstraint('every_n_days IS NULL OR every_n_days > 0', name=op.f('ck_campaigns_every_n_days_positive')),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_campaigns_conversation_id_conversations'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_campaigns')),
    sa.UniqueConstraint('name', name=op.f('uq_campaigns_name'))
    )
    op.create_index(op.f('ix_campaigns_conversation_id'), 'campaigns', ['conversation_id'])
    op.create_index(op.f('ix_campaigns_event_name'), 'campaigns', ['event_name'])
    op.create_index(op.f('ix_campaigns_status'), 'campaigns', ['status'])
    op.create_table('customer_interests',
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('label', sa.String(length=64), nullable=False),
    sa.Column('count', sa.Integer(), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_customer_interests_customer_id_customers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('customer_id', 'label', name=op.f('pk_customer_interests')),
    sqlite_with_rowid=False
    )
    op.create_table('customer_stats',
    sa.Column('customer_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('sent_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('open_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('click_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('reply_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('soft_bounce_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_open_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_click_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_reply_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('hard_bounce_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('complaint_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_bounce_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_bounce_reason', sa.String(length=64), nullable=True),
    sa.Column('bounced_out_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_complaint_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_customer_stats_customer_id_customers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('customer_id', name=op.f('pk_customer_stats'))
    )
    op.create_table('bounces',
    sa.Column('record_id', sa.String(length=64), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('bounced_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('hard', sa.Boolean(), nullable=False),
    sa.Column('reason', sa.String(length=64), server_default='', nullable=False),
    sa.Column('status', sa.String(length=16), nullable=True),
    sa.Column('instance_id', sa.BigInteger(), nullable=True),
    sa.Column('message', sa.String(length=255), server_default='', nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_bounces_customer_id_customers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('record_id', name=op.f('pk_bounces'))
    )
    op.create_index('ix_bounces_customer_id_bounced_at', 'bounces', ['customer_id', 'bounced_at'])
    op.create_table('customer_replies',
    sa.Column('record_id', sa.String(length=64), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('replied_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('instance_id', sa.BigInteger(), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('handler', sa.String(length=64), server_default='', nullable=False),
    sa.Column('subject', sa.String(length=200), server_default='', nullable=False),
    sa.Column('message', sa.String(length=255), server_default='', nullable=False),
    sa.Column('forwarded', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_customer_replies_customer_id_customers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('record_id', name=op.f('pk_customer_replies'))
    )
    op.create_index('ix_customer_replies_customer_id_replied_at', 'customer_replies', ['customer_id', 'replied_at'])
    op.create_table('customer_events',
    sa.Column('record_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=True),
    sa.Column('instance_id', sa.BigInteger(), nullable=True),
    sa.Column('message', sa.String(length=255), server_default='', nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_customer_events_customer_id_customers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('record_id', name=op.f('pk_customer_events'))
    )
    op.create_index(op.f('ix_customer_events_customer_id'), 'customer_events', ['customer_id'])
    op.create_index('ix_customer_events_name_occurred_at', 'customer_events', ['name', 'occurred_at'])
    op.create_table('subscriptions',
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('conversation_id', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('changed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=True),
    sa.CheckConstraint("status IN ('active', 'opting_in', 'opted_out', 'bounced_out')", name=op.f('ck_subscriptions_status')),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_subscriptions_conversation_id_conversations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_subscriptions_customer_id_customers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('customer_id', 'conversation_id', name=op.f('pk_subscriptions'))
    )
    op.create_index('ix_subscriptions_conversation_id_status', 'subscriptions', ['conversation_id', 'status'])
    op.create_table('suppression_entries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('list_id', sa.BigInteger(), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('value', sa.String(length=320), nullable=False),
    sa.Column('reason', sa.String(length=200), nullable=True),
    sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('address', 'domain')", name=op.f('ck_suppression_entries_kind')),
    sa.ForeignKeyConstraint(['list_id'], ['suppression_lists.id'], name=op.f('fk_suppression_entries_list_id_suppression_lists'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_suppression_entries')),
    sa.UniqueConstraint('list_id', 'value', name=op.f('uq_suppression_entries_list_id_value'))
    )
    op.create_index(op.f('ix_suppression_entries_value'), 'suppression_entries', ['value'])
    op.create_table('users',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('disabled', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_login_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['role'], ['roles.name'], name=op.f('fk_users_role_roles'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username'))
    )
    op.create_table('segments',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('campaign_id', sa.BigInteger(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('filter_expr', sa.Text(), nullable=True),
    sa.Column('split', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=True),
    sa.Column('is_leftovers', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_segments_campaign_id_campaigns'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_segments')),
    sa.UniqueConstraint('campaign_id', 'name', name=op.f('uq_segments_campaign_id_name')),
    sa.UniqueConstraint('campaign_id', 'position', name=op.f('uq_segments_campaign_id_position'))
    )
    op.create_table('messages',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('campaign_id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('parent_id', sa.BigInteger(), nullable=True),
    sa.Column('trigger_event', sa.String(length=16), nullable=True),
    sa.Column('trigger_delay', sa.Integer(), server_default='0', nullable=False),
    sa.Column('content_id', sa.BigInteger(), nullable=True),
    sa.Column('segment_id', sa.BigInteger(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind <> 'followup' OR (parent_id IS NOT NULL AND trigger_event IS NOT NULL)", name=op.f('ck_messages_followup_has_parent')),
    sa.CheckConstraint("kind IN ('main', 'trial', 'followup')", name=op.f('ck_messages_kind')),
    sa.CheckConstraint("trigger_event IN ('sent', 'opened', 'clicked', 'not_opened', 'not_clicked', 'replied', 'bounced')", name=op.f('ck_messages_trigger_event')),
    sa.CheckConstraint('trigger_delay >= 0', name=op.f('ck_messages_trigger_delay_nonnegative')),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], name=op.f('fk_messages_campaign_id_campaigns'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['content_id'], ['contents.id'], name=op.f('fk_messages_content_id_contents'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['parent_id'], ['messages.id'], name=op.f('fk_messages_parent_id_messages'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['segment_id'], ['segments.id'], name=op.f('fk_messages_segment_id_segments'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages'))
    )
    op.create_index(op.f('ix_messages_campaign_id'), 'messages', ['campaign_id'])
    op.create_index(op.f('ix_messages_parent_id'), 'messages', ['parent_id'])
    op.create_table('links',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.BigInteger(), nullable=True),
    sa.Column('url', sa.String(length=2048), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('labels', sa.JSON().with_variant(postgresql.JSONB(), 'postgresql'), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], name=op.f('fk_links_message_id_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_links'))
    )
    op.create_index(op.f('ix_links_message_id'), 'links', ['message_id'])
    op.create_table('message_instances',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.BigInteger(), nullable=False),
    sa.Column('run_key', sa.String(length=64), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=True),
    sa.Column('scheduled_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('target_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('sent_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('deferred_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('failed_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('unknown_count', sa.Integer(), server_default='0', nullable=False),
    sa.CheckConstraint("status IN ('ready', 'preparing', 'executing', 'paused', 'done', 'failed')", name=op.f('ck_message_instances_status')),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], name=op.f('fk_message_instances_message_id_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_message_instances')),
    sa.UniqueConstraint('message_id', 'run_key', name=op.f('uq_message_instances_message_id_run_key'))
    )
    op.create_index('ix_message_instances_status_scheduled_at', 'message_instances', ['status', 'scheduled_at'])
    op.create_table('mail_batches',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('claimed_by', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('size', sa.Integer(), server_default='0', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'claimed', 'done', 'failed')", name=op.f('ck_mail_batches_status')),
    sa.ForeignKeyConstraint(['instance_id'], ['message_instances.id'], name=op.f('fk_mail_batches_instance_id_message_instances'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mail_batches'))
    )
    op.create_index(op.f('ix_mail_batches_instance_id'), 'mail_batches', ['instance_id'])
    op.create_index('ix_mail_batches_status_lease_expires_at', 'mail_batches', ['status', 'lease_expires_at'])
    op.create_table('targets',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('instance_id', sa.BigInteger(), nullable=False),
    sa.Column('customer_id', sa.BigInteger(), nullable=False),
    sa.Column('segment_id', sa.BigInteger(), nullable=True),
    sa.Column('batch_id', sa.BigInteger(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_reply', sa.Text(), nullable=True),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_click_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_click_link', sa.BigInteger(), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'batched', 'sending', 'sent', 'deferred', 'failed', 'unknown')", name=op.f('ck_targets_status')),
    sa.ForeignKeyConstraint(['batch_id'], ['mail_batches.id'], name=op.f('fk_targets_batch_id_mail_batches'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_targets_customer_id_customers'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['instance_id'], ['message_instances.id'], name=op.f('fk_targets_instance_id_message_instances'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['segment_id'], ['segments.id'], name=op.f('fk_targets_segment_id_segments'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_targets')),
    sa.UniqueConstraint('instance_id', 'customer_id', name=op.f('uq_targets_instance_id_customer_id'))
    )
    op.create_index(op.f('ix_targets_batch_id'), 'targets', ['batch_id'])
    op.create_index(op.f('ix_targets_customer_id'), 'targets', ['customer_id'])
    op.create_index('ix_targets_instance_id_status', 'targets', ['instance_id', 'status', 'id'])
    op.create_index('ix_targets_status_next_attempt_at', 'targets', ['status', 'next_attempt_at'])

    # The roles the web editor knows; users.role refers to them. The permissions are this
    # revision's own copy (a migration must not change when the models do).
    roles = sa.table("roles", sa.column("name", sa.String), sa.column("description", sa.Text),
                     sa.column("permissions", sa.JSON))
    op.bulk_insert(roles, [
        {"name": "admin", "description": "everything, including users and settings",
         "permissions": ["*"]},
        {"name": "marketer", "description": "builds conversations, audiences, content and campaigns",
         "permissions": ["campaign.view", "campaign.edit", "content.edit", "audience.edit",
                         "conversation.edit", "customer.view", "customer.import", "report.view",
                         "test.send"]},
        {"name": "approver", "description": "approves and launches campaigns",
         "permissions": ["campaign.view", "campaign.approve", "campaign.launch", "report.view"]},
        {"name": "viewer", "description": "reads campaigns and reports",
         "permissions": ["campaign.view", "report.view"]},
    ])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_targets_status_next_attempt_at', table_name='targets')
    op.drop_index('ix_targets_instance_id_status', table_name='targets')
    op.drop_index(op.f('ix_targets_customer_id'), table_name='targets')
    op.drop_index(op.f('ix_targets_batch_id'), table_name='targets')
    op.drop_table('targets')
    op.drop_table('rate_buckets')
    op.drop_index('ix_mail_batches_status_lease_expires_at', table_name='mail_batches')
    op.drop_index(op.f('ix_mail_batches_instance_id'), table_name='mail_batches')
    op.drop_table('mail_batches')
    op.drop_index('ix_message_instances_status_scheduled_at', table_name='message_instances')
    op.drop_table('message_instances')
    op.drop_index(op.f('ix_links_message_id'), table_name='links')
    op.drop_table('links')
    op.drop_index(op.f('ix_messages_parent_id'), table_name='messages')
    op.drop_index(op.f('ix_messages_campaign_id'), table_name='messages')
    op.drop_table('messages')
    op.drop_table('segments')
    op.drop_table('users')
    op.drop_index(op.f('ix_suppression_entries_value'), table_name='suppression_entries')
    op.drop_table('suppression_entries')
    op.drop_index('ix_subscriptions_conversation_id_status', table_name='subscriptions')
    op.drop_table('subscriptions')
    op.drop_index('ix_customer_events_name_occurred_at', table_name='customer_events')
    op.drop_index(op.f('ix_customer_events_customer_id'), table_name='customer_events')
    op.drop_table('customer_events')
    op.drop_index('ix_customer_replies_customer_id_replied_at', table_name='customer_replies')
    op.drop_table('customer_replies')
    op.drop_index('ix_bounces_customer_id_bounced_at', table_name='bounces')
    op.drop_table('bounces')
    op.drop_table('customer_stats')
    op.drop_table('customer_interests')
    op.drop_index(op.f('ix_campaigns_status'), table_name='campaigns')
    op.drop_index(op.f('ix_campaigns_event_name'), table_name='campaigns')
    op.drop_index(op.f('ix_campaigns_conversation_id'), table_name='campaigns')
    op.drop_table('campaigns')
    op.drop_table('suppression_lists')
    op.drop_table('roles')
    op.drop_table('customers')
    op.drop_table('conversations')
    op.drop_table('contents')
    op.drop_table('consumer_positions')
    op.drop_table('composer_heartbeats')
    op.drop_table('attribute_defs')
