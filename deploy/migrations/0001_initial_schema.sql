-- Initial schema. Plain SQL, applied in file-name order by `esim-migrate` (also valid for `supabase db push`).
-- Money is always an integer amount in minor units next to an explicit ISO-4217 currency code.

CREATE TABLE esim_purchases (
    id                          bigserial PRIMARY KEY,
    transaction_id              text NOT NULL UNIQUE,
    -- the seed's columns
    user_id                     text,
    offer_id                    text NOT NULL,
    price                       bigint NOT NULL CHECK (price > 0),
    currency                    char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    zendit_cost                 bigint CHECK (zendit_cost >= 0),
    zendit_cost_currency        char(3) CHECK (zendit_cost_currency ~ '^[A-Z]{3}$'),
    stripe_payment_intent_id    text UNIQUE,
    stripe_issuing_card_id      text,
    zendit_transaction_id       text UNIQUE,
    zendit_status               text,
    qr_code_url                 text,
    -- what a real order needs
    status                      text NOT NULL DEFAULT 'pending_payment',
    recipient_email             text NOT NULL,
    recipient_name              text NOT NULL,
    stripe_checkout_session_id  text UNIQUE,
    capture_method              text NOT NULL DEFAULT 'automatic' CHECK (capture_method IN ('automatic', 'manual')),
    refund_id                   text,
    refund_status               text,
    failure_reason              text,
    funding_attempts            integer NOT NULL DEFAULT 0 CHECK (funding_attempts >= 0),
    purchase_attempts           integer NOT NULL DEFAULT 0 CHECK (purchase_attempts >= 0),
    -- one timestamp per step, so time-to-eSIM and every step's duration can be measured
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    paid_at                     timestamptz,
    funded_at                   timestamptz,
    purchased_at                timestamptz,
    qr_stored_at                timestamptz,
    emailed_at                  timestamptz,
    failed_at                   timestamptz,
    refunded_at                 timestamptz,
    CONSTRAINT esim_purchases_status_known CHECK (status IN (
        'pending_payment', 'paid', 'funding', 'awaiting_funds', 'funded', 'purchasing',
        'provisioned', 'delivered', 'payment_failed', 'topup_failed', 'purchase_failed',
        'refund_pending', 'refunded', 'needs_attention'))
);
CREATE INDEX esim_purchases_status_updated_idx ON esim_purchases (status, updated_at);

-- Every accepted transition, for the order's timeline and for auditing.
CREATE TABLE order_transitions (
    id              bigserial PRIMARY KEY,
    transaction_id  text NOT NULL REFERENCES esim_purchases (transaction_id),
    from_status     text NOT NULL,
    to_status       text NOT NULL,
    reason          text,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_transitions_txn_idx ON order_transitions (transaction_id, at);

-- The webhook inbox: one row per Stripe event id, written before the event is acted upon.
CREATE TABLE stripe_events (
    event_id        text PRIMARY KEY,
    type            text NOT NULL,
    transaction_id  text,
    received_at     timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz,
    outcome         text
);

-- A top-up of the Zendit wallet; it may cover several orders (coalescing). Its id is the idempotency
-- root of the card and the gateway call.
CREATE TABLE wallet_topups (
    id                  text PRIMARY KEY,
    amount              bigint NOT NULL CHECK (amount > 0),
    currency            char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status              text NOT NULL DEFAULT 'pending' CHECK (status IN (
                            'pending', 'card_created', 'submitted', 'succeeded', 'declined', 'failed')),
    card_id             text,
    gateway_reference   text UNIQUE,
    gateway_topup_id    text,
    order_ids           text[] NOT NULL DEFAULT '{}',
    failure_reason      text,
    attempts            integer NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX wallet_topups_status_idx ON wallet_topups (status, updated_at);

-- Issuing cards we created. Never a PAN or a CVC: last4 and expiry only.
CREATE TABLE issuing_cards (
    card_id         text PRIMARY KEY,
    card_last4      char(4) NOT NULL CHECK (card_last4 ~ '^[0-9]{4}$'),
    card_exp        text NOT NULL CHECK (card_exp ~ '^[0-9]{2}/[0-9]{4}$'),  -- MM/YYYY
    active          boolean NOT NULL DEFAULT true,
    amount          bigint NOT NULL CHECK (amount > 0),
    currency        char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    topup_id        text NOT NULL UNIQUE REFERENCES wallet_topups (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    cancelled_at    timestamptz
);

-- One row per (order, template): the guard that makes every email exactly-once.
CREATE TABLE sent_emails (
    transaction_id  text NOT NULL,
    template        text NOT NULL,
    recipient       text NOT NULL,
    message_id      text,
    status          text NOT NULL DEFAULT 'sending' CHECK (status IN ('sending', 'sent', 'failed')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    PRIMARY KEY (transaction_id, template)
);

-- Transactional outbox: an event written in the same transaction as the state change that it
-- announces; a relay publishes it and stamps published_at.
CREATE TABLE outbox (
    event_id        uuid PRIMARY KEY,
    routing_key     text NOT NULL,
    transaction_id  text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    published_at    timestamptz
);
CREATE INDEX outbox_unpublished_idx ON outbox (created_at) WHERE published_at IS NULL;

-- On Supabase every table in `public` is served by its REST API to anyone holding the shop's public
-- anon key. Only our services (connecting as the table owner / service role) may touch these tables:
-- row-level security on with no policies denies the API roles everything; the REVOKE makes it explicit.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['esim_purchases', 'order_transitions', 'stripe_events', 'wallet_topups',
                             'issuing_cards', 'sent_emails', 'outbox']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
            EXECUTE format('REVOKE ALL ON TABLE %I FROM anon', t);
        END IF;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
            EXECUTE format('REVOKE ALL ON TABLE %I FROM authenticated', t);
        END IF;
    END LOOP;
END
$$;
