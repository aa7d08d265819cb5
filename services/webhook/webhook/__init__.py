"""The webhook service: the HTTP edge (checkout, Stripe webhooks, order status); publishes order.paid."""
