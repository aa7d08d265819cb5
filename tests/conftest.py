"""Shared test wiring. Fixture modules live in tests/fixtures/ and are registered here."""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.stripe_emulator",
    "tests.fixtures.zendit_emulator",
    "tests.fixtures.storage_emulator",
    "tests.fixtures.smtp_capture",
    "tests.fixtures.private_rabbitmq",
    "tests.fixtures.funding",
]
