-- When reconcile's scheduled sweep last claimed a job that must run once per interval across replicas
-- (the ledger and Issuing checks, every RECONCILE_LEDGER_INTERVAL): a replica claims a job with one
-- statement that moves `claimed_at` only when it is at least an interval old, so no lock or transaction
-- is held while the job pages Stripe and Zendit, and a replica that dies mid-run leaves a claim that
-- simply ages out.
CREATE TABLE reconcile_schedule (
    job         text PRIMARY KEY CHECK (job ~ '^[a-z][a-z_]{0,63}$'),
    claimed_at  timestamptz NOT NULL
);

-- Like every other table: only our services may read or write it, never Supabase's API roles.
ALTER TABLE reconcile_schedule ENABLE ROW LEVEL SECURITY;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        REVOKE ALL ON TABLE reconcile_schedule FROM anon;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        REVOKE ALL ON TABLE reconcile_schedule FROM authenticated;
    END IF;
END
$$;
