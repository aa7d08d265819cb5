-- The activation facts of a delivered eSIM, so the email can be written from the database without
-- asking Zendit again. These are the customer's eSIM codes (what the QR code encodes), never card data.
ALTER TABLE esim_purchases
    ADD COLUMN iccid            text,
    ADD COLUMN smdp_address     text,
    ADD COLUMN activation_code  text;
