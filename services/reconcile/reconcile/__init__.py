"""The reconcile service: logs and counts order outcomes, computes the seed's business gauges from
Postgres, and serves the admin API (`POST /api/admin/reconcile-zendit`)."""
