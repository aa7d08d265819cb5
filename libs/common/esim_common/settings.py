"""Typed settings, read once from the environment and `.env`, then passed down.

Every field is an environment variable of the same name in upper case (pydantic-settings does the
mapping). The README's configuration table lists each one with its default; a test keeps them in step.
The defaults point at the sandbox emulators on loopback, so a fresh machine runs without a `.env`.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class FundingMode(StrEnum):
    ISSUING_CARD = "issuing_card"
    PREFUNDED = "prefunded"


class CaptureMode(StrEnum):
    AUTOMATIC = "automatic"
    MANUAL = "manual"


class PricingRule(StrEnum):
    SUGGESTED_RETAIL = "suggested_retail"  # Zendit's suggested price when it gives one, else cost + markup
    COST_PLUS_MARKUP = "cost_plus_markup"  # always cost + markup


# Values that mean "nobody configured this": refused outside the sandbox.
_SANDBOX_SECRETS = {
    "sk_test_sandbox",
    "whsec_sandbox",
    "sand_test_key",
    "topup_test_key",
    "admin-sandbox-token",
    "zendit_webhook_sandbox",
    # The Supabase Storage emulator's service-role key (esim_sandbox.storage_emulator, fixed on purpose).
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJzdXBhYmFzZSIsInJlZiI6InNhbmRib3giLCJyb2xlIjoic2Vy"
    "dmljZV9yb2xlIiwiaWF0IjoxNzAwMDAwMDAwLCJleHAiOjIwMTUzNjAwMDB9.7OQzOLUqDi2im7NjdhRDs0tFHxwyITzAfZGjhsyeJ8Q",
}


# Webhook secrets are what stands between the internet and our webhook endpoints. Zendit's is compared
# verbatim (an empty one would match an empty header) and chosen by us, so a short one is guessable;
# Stripe's `whsec_` secrets are ~38 characters, so anything shorter is a configuration mistake.
MIN_SHARED_SECRET_LENGTH = 16


def _weak_shared_secrets(settings: Settings) -> list[str]:
    """Names (never values) of webhook secrets too short to trust; an empty Stripe list counts too."""
    weak: list[str] = []
    if len(settings.zendit_webhook_secret.get_secret_value()) < MIN_SHARED_SECRET_LENGTH:
        weak.append("zendit_webhook_secret")
    lists = {
        "stripe_webhook_secrets": settings.stripe_webhook_secrets,
        "stripe_issuing_webhook_secrets": settings.stripe_issuing_webhook_secrets or [],
    }
    if not settings.stripe_webhook_secrets:
        weak.append("stripe_webhook_secrets")
    for name, secrets in lists.items():
        weak += [
            f"{name}[{index}]"
            for index, secret in enumerate(secrets)
            if len(secret.get_secret_value()) < MIN_SHARED_SECRET_LENGTH
        ]
    return weak


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def supabase_url_problem(url: str, environment: str) -> str | None:
    """Why SUPABASE_URL cannot be used, or None. Never quotes the URL (it may carry credentials)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "SUPABASE_URL is not a valid URL"
    if parts.scheme not in ("http", "https") or not host:
        return "SUPABASE_URL must be an http(s) URL such as https://<ref>.supabase.co"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        # The client adds /storage/v1 itself: people paste the Storage or REST endpoint instead.
        return (
            "SUPABASE_URL must be the project URL, e.g. https://<ref>.supabase.co, without /storage/v1 "
            "(no path, no query)"
        )
    if parts.scheme == "http" and environment != "sandbox" and not _is_loopback(host):
        return (
            f"SUPABASE_URL must use https with ENVIRONMENT={environment}: over http the service-role key "
            "would travel in clear"
        )
    return None


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error must never echo a secret it was given.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    # --- runtime
    environment: str = "sandbox"  # `sandbox` allows the built-in test secrets; anything else refuses them
    log_level: str = "INFO"

    # --- infrastructure
    # URLs may hold passwords: kept out of repr, and their passwords are redacted like other secrets.
    amqp_url: str = Field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
    database_url: str = Field(default="postgresql://postgres@127.0.0.1:5432/esim", repr=False)
    database_pool_min_size: int = 1
    database_pool_max_size: int = 10
    # 0 behind a transaction-mode pooler (Supabase's port 6543, PgBouncer), which breaks prepared statements.
    database_statement_cache_size: int = 100
    migrations_dir: str | None = None  # defaults to deploy/migrations of the source tree
    exchange_name: str = "esim.events"
    # Put in front of every exchange and queue name: several stacks (tests, tenants) on one broker.
    topology_prefix: str = ""
    broker_prefetch: int = 16

    # --- HTTP (every service serves /healthz and /metrics; webhook and reconcile serve their APIs)
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # each service has its own default port (README, "Services")
    shop_base_url: str = "http://127.0.0.1:8080"  # Checkout returns the customer here
    # Stripe deliveries processed at once by one webhook process; beyond, a quick 503 (Stripe retries).
    webhook_max_in_flight: int = Field(default=64, ge=1)

    # --- Stripe
    stripe_api_key: SecretStr = SecretStr("sk_test_sandbox")
    stripe_api_base: str = "http://127.0.0.1:12111"
    # Several secrets may be valid at once while an endpoint secret is rotated (comma-separated).
    stripe_webhook_secrets: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=lambda: [SecretStr("whsec_sandbox")]
    )
    # The Issuing real-time authorisation endpoint is configured apart from the ordinary webhook endpoint
    # and signs with its own secret(s); unset or empty: STRIPE_WEBHOOK_SECRETS are used for it too.
    stripe_issuing_webhook_secrets: Annotated[list[SecretStr] | None, NoDecode] = None
    stripe_max_network_retries: int = 2
    stripe_timeout_seconds: float = 10.0
    capture_mode: CaptureMode = CaptureMode.AUTOMATIC

    # --- Stripe Issuing (names kept from the seed)
    stripe_issuing_available: bool = True
    stripe_issuing_cardholder_id: str | None = None
    stripe_issuing_cardholder_name: str = "Platform Cardholder"
    stripe_issuing_company_name: str = "eSIM Shop Ltd"
    stripe_issuing_address_line1: str = "123 Main St"
    stripe_issuing_address_city: str = "San Francisco"
    stripe_issuing_address_state: str = "CA"
    stripe_issuing_address_postal: str = "94111"
    stripe_issuing_address_country: str = "US"
    # Optional allow-lists written onto every top-up card (comma-separated): Stripe merchant category
    # names (e.g. `computer_network_information_services`) and ISO country codes of the merchant.
    stripe_issuing_allowed_categories: Annotated[list[str], NoDecode] = Field(default_factory=list)
    stripe_issuing_allowed_merchant_countries: Annotated[list[str], NoDecode] = Field(default_factory=list)
    service_owner_email: str = "operator@example.com"

    # --- Zendit
    zendit_api_base: str = "http://127.0.0.1:12112/v1"
    zendit_api_key: SecretStr = SecretStr("sand_test_key")
    zendit_timeout_seconds: float = 10.0
    zendit_topup_url: str = "http://127.0.0.1:12112/v1/wallet/topup"
    zendit_topup_api_key: SecretStr = SecretStr("topup_test_key")
    zendit_min_topup: int = Field(default=5000, ge=1)  # minor units of the wallet currency
    zendit_max_topup: int = Field(default=100000, ge=1)
    funding_mode: FundingMode = FundingMode.ISSUING_CARD
    # prefunded mode: how often waiting orders look at the balance again, and how long an order may wait
    # for the operator to add money before it is refunded.
    awaiting_funds_recheck_seconds: int = Field(default=10, ge=1)
    awaiting_funds_max_age: int = Field(default=21600, ge=60)  # seconds (6 h)
    # Zendit finishes ~99% of purchases within 15 s but retries for up to 24 h in supplier outages.
    purchase_deadline_seconds: int = 86400
    # Zendit webhooks carry no signature: the console sends this header with this value (a hint only).
    zendit_webhook_header: str = "X-Zendit-Webhook-Secret"
    zendit_webhook_secret: SecretStr = SecretStr("zendit_webhook_sandbox")
    # The shop's catalogue (GET /api/offers) is served from a cache refreshed this often in the background.
    catalogue_refresh_seconds: int = 300

    # --- pricing (computed on the server from the Zendit offer; never taken from the client)
    pricing_rule: PricingRule = PricingRule.SUGGESTED_RETAIL
    pricing_markup_percent: int = 30  # on top of Zendit's cost when it suggests no retail price
    pricing_min_margin: int = 100  # minor units the price must exceed the cost by, or checkout refuses

    # --- QR storage
    qr_storage_dir: str = "var/qrcodes"
    qr_public_base_url: str = "http://127.0.0.1:8082/qrcodes"  # where the stored PNGs are served
    supabase_url: str | None = None
    supabase_service_role_key: SecretStr | None = None
    supabase_bucket: str = "esim-qrcodes"
    # 0: `qr_code_url` is the object's public URL (the bucket must be public); otherwise a signed URL
    # valid this long (a QR code is an activation secret: private bucket and signed URLs by default).
    supabase_signed_url_seconds: int = Field(default=604800, ge=0)
    # Also fetch Zendit's own QR image for every delivered purchase and check it reads as our LPA string.
    zendit_qr_cross_check: bool = False

    # --- email
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False  # upgrade a plain connection (port 587)
    smtp_tls: bool = False  # implicit TLS from the first byte (port 465); not together with STARTTLS
    smtp_ca_file: str | None = None  # PEM bundle to trust instead of the system's (a private relay)
    smtp_from: str = "eSIM Shop <esim@example.com>"
    smtp_timeout_seconds: float = 10.0
    # An eSIM email the relay cannot take (down, refusing our login) waits this long after the QR was
    # stored, re-tried with a backoff, before the order goes to needs_attention.
    email_give_up_seconds: int = Field(default=3600, ge=1)

    # --- admin
    admin_api_token: SecretStr = SecretStr("admin-sandbox-token")
    # Scheduled reconciliation compares this much of Stripe's and Zendit's history with ours. More than
    # the 24 h Zendit may keep a purchase in progress, so a ledger row still changing is always read.
    reconcile_lookback_hours: int = Field(default=72, ge=25, le=24 * 31)
    # A paid order is expected at Zendit after this long (a healthy one takes seconds; a top-up minutes).
    reconcile_paid_grace_minutes: int = Field(default=30, ge=1)
    # How often reconcile sweeps for orders stuck past their state's deadline (reconcile.stuck_rules).
    reconcile_interval: int = Field(default=60, gt=0)  # seconds
    # How often one replica (across all) runs the ledger and Issuing checks, which page 72 h of Zendit
    # and Stripe: a mismatch is money already moved, so ten minutes late costs nothing.
    reconcile_ledger_interval: int = Field(default=600, gt=0)  # seconds

    # --- recovery tests only (ENVIRONMENT=sandbox): the process dies abruptly at these named points
    crash_points: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _split_lists(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in (
                "stripe_webhook_secrets",
                "STRIPE_WEBHOOK_SECRETS",
                "stripe_issuing_webhook_secrets",
                "STRIPE_ISSUING_WEBHOOK_SECRETS",
                "stripe_issuing_allowed_categories",
                "STRIPE_ISSUING_ALLOWED_CATEGORIES",
                "stripe_issuing_allowed_merchant_countries",
                "STRIPE_ISSUING_ALLOWED_MERCHANT_COUNTRIES",
                "crash_points",
                "CRASH_POINTS",
            ):
                if key in data:
                    data[key] = _split_csv(data[key])
        return data

    @model_validator(mode="after")
    def _topup_bounds(self) -> Settings:
        if self.zendit_min_topup > self.zendit_max_topup:
            raise ValueError(
                f"ZENDIT_MIN_TOPUP ({self.zendit_min_topup}) is above "
                f"ZENDIT_MAX_TOPUP ({self.zendit_max_topup})"
            )
        return self

    @model_validator(mode="after")
    def _one_smtp_tls_mode(self) -> Settings:
        if self.smtp_tls and self.smtp_starttls:
            raise ValueError(
                "SMTP_TLS (implicit TLS, usually port 465) and SMTP_STARTTLS (upgrade, usually port 587) "
                "exclude each other: set the one your SMTP server speaks"
            )
        return self

    @model_validator(mode="after")
    def _supabase_storage(self) -> Settings:
        """A usable Supabase pair or none: both set, or both empty (QR codes stay in QR_STORAGE_DIR)."""
        raw_key = self.supabase_service_role_key.get_secret_value() if self.supabase_service_role_key else ""
        if raw_key and not raw_key.strip():
            raise ValueError(
                "SUPABASE_SERVICE_ROLE_KEY is blank: set the project's service_role key, or unset it"
            )
        key, url = raw_key.strip(), (self.supabase_url or "").strip()
        self.supabase_url = url or None
        self.supabase_service_role_key = SecretStr(key) if key else None
        if bool(url) != bool(key):
            given, missing = (
                ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY")
                if url
                else ("SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_URL")
            )
            raise ValueError(
                f"{given} is set but {missing} is not: set both to store QR codes in Supabase Storage, "
                "or neither to keep them in QR_STORAGE_DIR"
            )
        problem = supabase_url_problem(url, self.environment) if url else None
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _refuse_sandbox_secrets_in_production(self) -> Settings:
        if self.environment == "sandbox":
            return self
        if self.crash_points:
            raise ValueError(f"CRASH_POINTS is for recovery tests; ENVIRONMENT={self.environment} refuses it")
        offending = [name for name, value in self.secret_values().items() if value in _SANDBOX_SECRETS]
        if offending:
            raise ValueError(
                f"ENVIRONMENT={self.environment} but these secrets still have their sandbox defaults: "
                + ", ".join(sorted(offending))
                + ". Set real values (see the README's configuration table)."
            )
        weak = _weak_shared_secrets(self)
        if weak:
            raise ValueError(
                f"ENVIRONMENT={self.environment} but these secrets are empty or shorter than "
                f"{MIN_SHARED_SECRET_LENGTH} characters: " + ", ".join(weak) + "."
            )
        return self

    @property
    def issuing_webhook_secrets(self) -> list[SecretStr]:
        """The secrets the Issuing real-time authorisation endpoint verifies with (see the field)."""
        return self.stripe_issuing_webhook_secrets or self.stripe_webhook_secrets

    @property
    def effective_funding_mode(self) -> FundingMode:
        """The seed's `STRIPE_ISSUING_AVAILABLE=false` forces prefunded mode."""
        if not self.stripe_issuing_available:
            return FundingMode.PREFUNDED
        return self.funding_mode

    def secret_values(self) -> dict[str, str]:
        """Every configured secret by field name, for the log redaction filter."""
        found: dict[str, str] = {}
        for name in ("amqp_url", "database_url"):
            password = _url_password(getattr(self, name))
            if password:
                found[f"{name}.password"] = password
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                found[name] = value.get_secret_value()
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    if isinstance(item, SecretStr):
                        found[f"{name}[{index}]"] = item.get_secret_value()
        return found


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment and `.env`; keyword overrides win (handy in tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]
