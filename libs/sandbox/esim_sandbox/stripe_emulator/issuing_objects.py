"""Builders for the Issuing objects, field for field as in Stripe's fixtures.

Card numbers and CVCs never go into these dicts: they live in `StripeState.card_secrets` and are added
to a response copy only when the caller expands them.
"""

from __future__ import annotations

from typing import Any

from .payment_objects import empty_address

# Merchant category codes for the categories the sandbox uses; anything else reports 5999 (misc. retail).
CATEGORY_CODES = {
    "computer_network_information_services": "4816",
    "computer_software_stores": "5734",
    "digital_goods_applications": "5817",
    "digital_goods_media": "5815",
    "financial_institutions": "6012",
    "miscellaneous_general_merchandise": "5399",
    "non_fi_stored_value_card_purchase_load": "6540",
    "taxicabs_limousines": "4121",
    "telecommunication_services": "4814",
}
DEFAULT_MERCHANT_CATEGORY = "telecommunication_services"


def spending_controls(controls: dict[str, Any] | None, *, for_cardholder: bool = False) -> dict[str, Any]:
    """Stripe echoes spending controls with every key present; cardholders use [] where cards use null."""
    controls = controls or {}
    empty: list[str] | None = [] if for_cardholder else None
    limits = [
        {"amount": limit["amount"], "categories": limit.get("categories"), "interval": limit["interval"]}
        for limit in controls.get("spending_limits") or []
    ]
    return {
        "allowed_card_presences": controls.get("allowed_card_presences"),
        "allowed_categories": controls.get("allowed_categories") or empty,
        "allowed_merchant_countries": controls.get("allowed_merchant_countries") or empty,
        "blocked_card_presences": controls.get("blocked_card_presences"),
        "blocked_categories": controls.get("blocked_categories") or empty,
        "blocked_merchant_countries": controls.get("blocked_merchant_countries") or empty,
        "spending_limits": limits,
        "spending_limits_currency": controls.get("spending_limits_currency"),
    }


def cardholder(
    *,
    cardholder_id: str,
    created: int,
    name: str,
    holder_type: str,
    email: str | None,
    phone_number: str | None,
    billing_address: dict[str, Any],
    status: str,
    metadata: dict[str, str],
    controls: dict[str, Any] | None,
    preferred_locales: list[str] | None,
) -> dict[str, Any]:
    return {
        "id": cardholder_id,
        "object": "issuing.cardholder",
        "billing": {"address": {**empty_address(), **billing_address}},
        "company": {"tax_id_provided": False} if holder_type == "company" else None,
        "created": created,
        "email": email,
        "individual": None,
        "livemode": False,
        "metadata": metadata,
        "name": name,
        "phone_number": phone_number,
        "preferred_locales": preferred_locales or [],
        "requirements": {"disabled_reason": None, "past_due": []},
        "spending_controls": spending_controls(controls, for_cardholder=True),
        "status": status,
        "type": holder_type,
    }


def card(
    *,
    card_id: str,
    created: int,
    cardholder_id: str,
    currency: str,
    card_type: str,
    status: str,
    last4: str,
    exp_month: int,
    exp_year: int,
    controls: dict[str, Any] | None,
    payment_count: int | None,
    metadata: dict[str, str],
) -> dict[str, Any]:
    """`cardholder` holds the id here; responses embed the cardholder object, as Stripe does."""
    return {
        "id": card_id,
        "object": "issuing.card",
        "brand": "Visa",
        "cancellation_reason": None,
        "cardholder": cardholder_id,
        "created": created,
        "currency": currency,
        "exp_month": exp_month,
        "exp_year": exp_year,
        "last4": last4,
        "latest_fraud_warning": None,
        "lifecycle_controls": {"cancel_after": {"payment_count": payment_count}} if payment_count else None,
        "livemode": False,
        "metadata": metadata,
        "personalization_design": None,
        "replaced_by": None,
        "replacement_for": None,
        "replacement_reason": None,
        "second_line": None,
        "shipping": None,
        "spending_controls": spending_controls(controls),
        "status": status,
        "type": card_type,
        "wallets": {
            "apple_pay": {"eligible": False, "ineligible_reason": "unsupported_region"},
            "google_pay": {"eligible": False, "ineligible_reason": "unsupported_region"},
            "primary_account_identifier": None,
        },
    }


def merchant_data(given: dict[str, Any] | None) -> dict[str, Any]:
    given = given or {}
    category = given.get("category") or DEFAULT_MERCHANT_CATEGORY
    return {
        "category": category,
        "category_code": CATEGORY_CODES.get(category, "5999"),
        "city": given.get("city"),
        "country": given.get("country") or "US",
        "name": given.get("name") or "Sandbox Merchant",
        "network_id": given.get("network_id") or "1234567890",
        "postal_code": given.get("postal_code"),
        "state": given.get("state"),
        "tax_id": None,
        "terminal_id": given.get("terminal_id"),
        "url": given.get("url"),
    }


def request_history_entry(
    *, amount: int, currency: str, approved: bool, reason: str, reason_message: str | None, at: int
) -> dict[str, Any]:
    return {
        "amount": amount,
        "amount_details": {"atm_fee": None, "cashback_amount": None},
        "approved": approved,
        "authorization_code": "123456" if approved else None,
        "created": at,
        "currency": currency,
        "merchant_amount": amount,
        "merchant_currency": currency,
        "network_risk_score": None,
        "reason": reason,
        "reason_message": reason_message,
        "requested_at": at,
    }


def authorization(
    *,
    authorization_id: str,
    created: int,
    card_id: str,
    cardholder_id: str | None,
    amount: int,
    currency: str,
    merchant: dict[str, Any],
    authorization_method: str,
    verification: dict[str, Any],
    network_transaction_id: str | None,
    metadata: dict[str, str],
) -> dict[str, Any]:
    """A pending request; `authorizations.decide` fills in the outcome. `card` is expanded on render."""
    return {
        "id": authorization_id,
        "object": "issuing.authorization",
        "amount": 0,
        "amount_details": {"atm_fee": None, "cashback_amount": None},
        "approved": False,
        "authorization_method": authorization_method,
        "balance_transactions": [],
        "card": card_id,
        "card_presence": None,
        "cardholder": cardholder_id,
        "created": created,
        "currency": currency,
        "fleet": None,
        "fuel": None,
        "livemode": False,
        "merchant_amount": 0,
        "merchant_currency": currency,
        "merchant_data": merchant,
        "metadata": metadata,
        "network_data": {
            "acquiring_institution_id": None,
            "system_trace_audit_number": None,
            "transaction_id": network_transaction_id,
        },
        "pending_request": {
            "amount": amount,
            "amount_details": {"atm_fee": None, "cashback_amount": None},
            "currency": currency,
            "is_amount_controllable": False,
            "merchant_amount": amount,
            "merchant_currency": currency,
            "network_risk_score": None,
        },
        "request_history": [],
        "status": "pending",
        "token": None,
        "transactions": [],
        "verification_data": {
            "address_line1_check": "not_provided",
            "address_postal_code_check": "not_provided",
            "authentication_exemption": None,
            "cvc_check": verification.get("cvc_check", "match"),
            "expiry_check": verification.get("expiry_check", "match"),
            "postal_code": None,
            "three_d_secure": None,
        },
        "verified_by_fraud_challenge": None,
        "wallet": None,
    }


def transaction(
    *,
    transaction_id: str,
    created: int,
    authorization: dict[str, Any],
    amount: int,
    balance_transaction: str,
) -> dict[str, Any]:
    """A capture: Stripe signs Issuing transactions from the cardholder's side (money out is negative)."""
    return {
        "id": transaction_id,
        "object": "issuing.transaction",
        "amount": -amount,
        "amount_details": {"atm_fee": None, "cashback_amount": None},
        "authorization": authorization["id"],
        "balance_transaction": balance_transaction,
        "card": authorization["card"],
        "cardholder": authorization["cardholder"],
        "created": created,
        "currency": authorization["currency"],
        "dispute": None,
        "livemode": False,
        "merchant_amount": -amount,
        "merchant_currency": authorization["merchant_currency"],
        "merchant_data": dict(authorization["merchant_data"]),
        "metadata": {},
        "network_data": {
            "authorization_code": "123456",
            "processing_date": None,
            "transaction_id": authorization["network_data"]["transaction_id"],
        },
        "token": None,
        "type": "capture",
        "wallet": None,
    }
