"""The funding service: makes sure the Zendit wallet can pay for each paid order (Issuing-card top-ups
or prefunded waiting), announces order.funded, and refunds the customer when funding fails for good."""
