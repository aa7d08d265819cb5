-- Manual capture (CAPTURE_MODE=manual): the card is only authorised at checkout and the funding service
-- captures the payment once the eSIM has been emailed. These columns record that capture. They stay NULL
-- for automatic-capture orders (Stripe captured those at checkout) and until the capture is attempted.
-- The order's status stays `delivered` either way: the customer has their eSIM; a failed capture is the
-- shop's money to chase, which is an operator's job, not a state of the order.
ALTER TABLE esim_purchases
    ADD COLUMN capture_status          text CHECK (capture_status IN ('captured', 'failed')),
    ADD COLUMN captured_at             timestamptz,
    ADD COLUMN capture_failure_reason  text,
    -- Counts capture attempts; each attempt's Stripe idempotency key is `capture:{txn}:{n}` (see
    -- services/funding/funding/capture.py for why one key per attempt).
    ADD COLUMN capture_attempts        integer NOT NULL DEFAULT 0 CHECK (capture_attempts >= 0),
    -- Only an authorised-then-captured payment has a capture to record.
    ADD CONSTRAINT esim_purchases_capture_only_manual
        CHECK (capture_status IS NULL OR capture_method = 'manual'),
    -- captured ⇔ captured_at set (NULL or failed: no captured_at). IS NOT DISTINCT FROM, because a CHECK
    -- that evaluates to NULL passes: `capture_status = 'captured'` would let a NULL status carry a time.
    ADD CONSTRAINT esim_purchases_captured_at_iff_captured
        CHECK ((capture_status IS NOT DISTINCT FROM 'captured') = (captured_at IS NOT NULL));

-- The operator's list: delivered orders whose payment could not be captured.
CREATE INDEX esim_purchases_capture_failed_idx ON esim_purchases (updated_at) WHERE capture_status = 'failed';
