"""The notify service: emails the customer their eSIM (or the news that their order failed) exactly
once per order and template, and alerts the operator when only a person can help."""
