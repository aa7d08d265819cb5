-- Client-supplied idempotency keys of POST /api/create-checkout-session (the `Idempotency-Key` header).
-- A row is the claim of a key: written before any work starts, deleted again when the attempt fails (a
-- failure never burns a key), completed with the answer to replay when the Checkout Session is made.
-- transaction_id has no foreign key on purpose: the key is claimed before its order row exists.
CREATE TABLE checkout_idempotency_keys (
    idempotency_key      text PRIMARY KEY CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_fingerprint  text NOT NULL CHECK (request_fingerprint ~ '^[0-9a-f]{64}$'),  -- sha256 hex
    transaction_id       text NOT NULL,
    -- the answer replayed to a retry without calling Stripe again; all set at once on completion
    session_id           text,
    session_url          text,
    amount               bigint CHECK (amount > 0),
    currency             char(3) CHECK (currency ~ '^[A-Z]{3}$'),
    created_at           timestamptz NOT NULL DEFAULT now(),
    -- when the running attempt claimed the key; a claim older than the lease belongs to a dead process
    locked_at            timestamptz NOT NULL DEFAULT now(),
    completed_at         timestamptz,
    CONSTRAINT checkout_idempotency_keys_answer CHECK (
        (completed_at IS NULL AND session_id IS NULL AND session_url IS NULL AND amount IS NULL
             AND currency IS NULL)
        OR (completed_at IS NOT NULL AND session_id IS NOT NULL AND session_url IS NOT NULL
             AND amount IS NOT NULL AND currency IS NOT NULL))
);
-- For pruning old keys by age.
CREATE INDEX checkout_idempotency_keys_created_idx ON checkout_idempotency_keys (created_at);

-- Like every table of 0001: only our services may read or write it, never Supabase's API roles.
ALTER TABLE checkout_idempotency_keys ENABLE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        REVOKE ALL ON TABLE checkout_idempotency_keys FROM anon;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        REVOKE ALL ON TABLE checkout_idempotency_keys FROM authenticated;
    END IF;
END
$$;
