-- What failed, kept by reconcile for its admin API (issue 7): one row per dead letter a consumer copied to
-- a DLQ (from the observation copy in `reconcile.dead-letters`; the DLQ itself is never consumed), and one
-- row per `order.failed` event. Written idempotently by the consumers (a redelivery inserts nothing), so
-- the counts are exact across restarts and replicas. Append-only; ids, codes and redacted error summaries,
-- never card data or tokens.

CREATE TABLE dead_letter_events (
    id                bigserial PRIMARY KEY,
    queue             text NOT NULL CHECK (length(queue) BETWEEN 1 AND 255),  -- the DLQ's name
    -- The AMQP message id (our event id), or 'sha256:<hex>' of the body for a message without one.
    event_id          text NOT NULL CHECK (length(event_id) BETWEEN 1 AND 200),
    -- The consumer's x-esim-failed-at as sent ('' when absent): the same copy redelivered is one row, the
    -- same message dead-lettered again after a replay is a new one.
    copy_key          text NOT NULL CHECK (length(copy_key) <= 100),
    routing_key       text CHECK (length(routing_key) <= 255),  -- the event's, e.g. order.paid
    event_type        text CHECK (length(event_type) <= 100),
    transaction_id    text CHECK (length(transaction_id) <= 200),
    error             text CHECK (length(error) <= 500),       -- redacted by the consumer and again here
    attempt           integer NOT NULL CHECK (attempt >= 1),  -- x-esim-attempt; 1 when never retried
    dead_lettered_at  timestamptz NOT NULL,  -- x-esim-failed-at; when reconcile first saw it if absent
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT dead_letter_events_once UNIQUE (queue, event_id, copy_key)
);
-- Per-queue counts over a window and the latest one.
CREATE INDEX dead_letter_events_queue_at_idx ON dead_letter_events (queue, dead_lettered_at);

CREATE TABLE order_failures (
    event_id        uuid PRIMARY KEY,  -- the order.failed event's id: a redelivery inserts nothing
    transaction_id  text NOT NULL,     -- no foreign key: an event may name an order this database lacks
    step            text NOT NULL CHECK (step ~ '^[a-z_]{1,32}$'),
    reason          text NOT NULL CHECK (length(reason) <= 200),
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_failures_step_at_idx ON order_failures (step, occurred_at);

-- Like every other table: only our services may read or write it, never Supabase's API roles.
ALTER TABLE dead_letter_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE order_failures ENABLE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        REVOKE ALL ON TABLE dead_letter_events, order_failures FROM anon;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        REVOKE ALL ON TABLE dead_letter_events, order_failures FROM authenticated;
    END IF;
END
$$;
