-- Scheduled reconciliation (issue 7): what it found, and what it needs to remember between runs.

-- One row per mismatch episode: (kind, subject) has at most one open row; a run that no longer finds it
-- (while its evidence is still inside the run's window) stamps resolved_at, and a later recurrence opens
-- a new row (the history stays). `detail` holds ids,
-- statuses and integer amounts with their currency; never card data or tokens.
CREATE TABLE reconcile_mismatches (
    id              bigserial PRIMARY KEY,
    kind            text NOT NULL CHECK (kind ~ '^[a-z][a-z_]{0,63}$'),
    subject         text NOT NULL CHECK (length(subject) BETWEEN 1 AND 200),
    transaction_id  text,
    detail          jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- When the evidence happened (the purchase, refund, debit or payment). A run reads only its look-back
    -- window, so a row whose evidence is older than the window is no longer re-checked: it is never
    -- resolved by not being found, only by an operator acknowledging it. NULL: always re-checked.
    evidence_at     timestamptz,
    -- Who closed it by hand and why (operator_actions holds the audit row too).
    resolution_note text CHECK (length(resolution_note) BETWEEN 1 AND 500),
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    CHECK (resolved_at IS NULL OR resolved_at >= first_seen_at)
);
CREATE UNIQUE INDEX reconcile_mismatches_open_idx ON reconcile_mismatches (kind, subject)
    WHERE resolved_at IS NULL;
CREATE INDEX reconcile_mismatches_seen_idx ON reconcile_mismatches (last_seen_at DESC);
-- Every run asks whether an operator acknowledged (kind, subject) before it opens a row again.
CREATE INDEX reconcile_mismatches_acknowledged_idx ON reconcile_mismatches (kind, subject)
    WHERE resolution_note IS NOT NULL;

-- One row per run: which kinds it checked and which sources it could not read (a source that failed
-- resolves nothing: its kinds keep their open rows until a run reads it again).
CREATE TABLE reconcile_runs (
    id              bigserial PRIMARY KEY,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL DEFAULT now(),
    kinds_checked   text[] NOT NULL,
    sources_failed  text[] NOT NULL,
    found           integer NOT NULL CHECK (found >= 0),
    opened          integer NOT NULL CHECK (opened >= 0),
    resolved        integer NOT NULL CHECK (resolved >= 0)
);
CREATE INDEX reconcile_runs_started_idx ON reconcile_runs (started_at DESC);

-- The Zendit wallet check's anchor (see reconcile/ledger_rules.py): available = base + the effects of
-- the ledger rows created at or after `since`, in Zendit's units of `currency` with `divisor`.
CREATE TABLE reconcile_wallet_anchor (
    currency        char(3) PRIMARY KEY CHECK (currency ~ '^[A-Z]{3}$'),
    divisor         integer NOT NULL CHECK (divisor > 0),
    since           timestamptz NOT NULL,
    base            bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Like every other table: only our services may read or write them, never Supabase's API roles.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['reconcile_mismatches', 'reconcile_runs', 'reconcile_wallet_anchor']
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
