-- The plan the customer bought, as the Zendit offer described it at checkout, so the eSIM email can say
-- how much data and how many days it gives without asking Zendit again (the offer may change or be
-- withdrawn later). NULL for orders created before this migration: the email then names the offer only.
-- Data in whole megabytes (Zendit's `dataGB` × 1000, e.g. 0.5 GB → 500): no fractional column anywhere.
ALTER TABLE esim_purchases
    ADD COLUMN offer_data_mb         integer CHECK (offer_data_mb >= 0),
    ADD COLUMN offer_data_unlimited  boolean,
    ADD COLUMN offer_duration_days   integer CHECK (offer_duration_days >= 0);
