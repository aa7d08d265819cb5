-- What operators did to orders through the admin API (issue 7): re-drives, refund retries, orders marked
-- resolved by hand. One row per accepted request, written in the transaction of the change it makes, so
-- an order's timeline shows who-did-what next to the transitions it caused. Append-only.
-- `detail` holds ids, states and routing keys (never card data or tokens); `note` is the operator's why.
-- transaction_id is nullable and has no foreign key on purpose: later actions (a dead letter replayed or
-- discarded) may concern a message whose order this database does not know.
CREATE TABLE operator_actions (
    id              bigserial PRIMARY KEY,
    transaction_id  text,
    action          text NOT NULL CHECK (action ~ '^[a-z][a-z_]{0,63}$'),
    detail          jsonb NOT NULL DEFAULT '{}'::jsonb,
    note            text CHECK (length(note) BETWEEN 1 AND 500),
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- An order's actions, in order (the timeline reads them by transaction id).
CREATE INDEX operator_actions_txn_idx ON operator_actions (transaction_id, created_at);

-- Like every other table: only our services may read or write it, never Supabase's API roles.
ALTER TABLE operator_actions ENABLE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        REVOKE ALL ON TABLE operator_actions FROM anon;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        REVOKE ALL ON TABLE operator_actions FROM authenticated;
    END IF;
END
$$;
