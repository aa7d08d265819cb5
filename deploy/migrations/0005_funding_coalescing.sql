-- Coalesced top-ups and announcements through the outbox (issue 5).
--
-- A top-up is started by one order and covers every order that waits for it: `order_ids` lists them,
-- and an order finds "its" top-ups with `order_ids @> ARRAY[txn]` (GIN). order.funded is written to the
-- outbox with the transition to `funded`; an order's announcements are found by transaction id.
CREATE INDEX IF NOT EXISTS wallet_topups_order_ids_idx ON wallet_topups USING gin (order_ids);
CREATE INDEX IF NOT EXISTS outbox_transaction_idx ON outbox (transaction_id, routing_key);
-- Waiting orders are read in payment order under the wallet lock.
CREATE INDEX IF NOT EXISTS esim_purchases_waiting_idx ON esim_purchases (paid_at, transaction_id)
    WHERE status IN ('funding', 'awaiting_funds');
-- Set (and committed) just before the Stripe card is created: after a crash in between, the top-up is
-- known to maybe have a card at Stripe, which is then fetched again (same idempotency key) and cancelled.
ALTER TABLE wallet_topups ADD COLUMN card_requested_at timestamptz;
-- Names the idempotency key of the card creation (`issuing-card:<id>`, then `issuing-card:<id>:<n>`):
-- after an attempt that made no card (Stripe would replay its error for 24 h), the next gets a new key.
ALTER TABLE wallet_topups ADD COLUMN card_attempts integer NOT NULL DEFAULT 1 CHECK (card_attempts >= 1);
-- prefunded mode: when a waiting order last looked at the Zendit balance. While the first order in line
-- keeps looking, the ones behind it need not (its look funds them too, in payment order).
ALTER TABLE esim_purchases ADD COLUMN funds_checked_at timestamptz;
-- An order that took over a stalled top-up (its starter's message went to the DLQ) closes it if it gives up.
ALTER TABLE wallet_topups ADD COLUMN driven_by text;
