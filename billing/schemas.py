"""Marshmallow schemas of the billing API: the catalogue, purchases, licence packs and a
device's licence."""

from __future__ import annotations

import marshmallow as ma

from billing.models import MODALITIES, PurchaseKind, PurchaseStatus
from billing.purchases import MAX_QUANTITY
from core.pagination import page_schema


class PlanPriceOut(ma.Schema):
    currency = ma.fields.String(required=True)
    seat_price_minor = ma.fields.Integer(required=True, metadata={
        "description": "One seat for the plan's term, in minor units (cents, fen)."})
    credit_value_minor = ma.fields.Decimal(required=True, as_string=True, places=6, metadata={
        "description": "What one credit is worth, in minor units (a decimal string)."})


class PlanOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    code = ma.fields.String(required=True)
    name = ma.fields.String(required=True)
    billing = ma.fields.Function(lambda plan: plan.billing.value, required=True)
    term_months = ma.fields.Integer(required=True)
    grace_days = ma.fields.Integer(required=True)
    allowance_credits = ma.fields.Integer(required=True, metadata={
        "description": "Credits per device per calendar month, prorated in the first month."})
    requests_per_minute = ma.fields.Integer(required=True)
    concurrent_streams = ma.fields.Integer(required=True)
    daily_request_cap = ma.fields.Integer(required=True, allow_none=True)
    modalities = ma.fields.List(ma.fields.String(validate=ma.validate.OneOf(MODALITIES)),
                                required=True)
    prices = ma.fields.List(ma.fields.Nested(PlanPriceOut), required=True)


class PackageOfferOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    code = ma.fields.String(required=True)
    name = ma.fields.String(required=True)
    credits = ma.fields.Integer(required=True)
    validity_days = ma.fields.Integer(required=True)
    prices = ma.fields.Method("_prices", required=True, metadata={
        "description": "Currency -> price in minor units."})

    def _prices(self, offer: object) -> dict[str, int]:
        return {p.currency: p.price_minor for p in offer.prices}  # type: ignore[attr-defined]


def _quantity(what: str) -> ma.fields.Integer:
    return ma.fields.Integer(strict=True, required=True, validate=ma.validate.Range(
        min=1, max=MAX_QUANTITY), metadata={"description": what})


class PackOrderIn(ma.Schema):
    plan_id = ma.fields.UUID(required=True)
    quantity = _quantity("Seats.")


class PackageOrderIn(ma.Schema):
    offer_id = ma.fields.UUID(required=True)
    quantity = _quantity("Packages, each with the offer's credits and validity.")


class PurchaseOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    kind = ma.fields.Enum(PurchaseKind, by_value=True, required=True)
    status = ma.fields.Enum(PurchaseStatus, by_value=True, required=True, metadata={
        "description": "`pending` until paid; `paid`; `cancelled`."})
    plan_id = ma.fields.UUID(required=True, allow_none=True)
    offer_id = ma.fields.UUID(required=True, allow_none=True)
    quantity = ma.fields.Integer(required=True)
    currency = ma.fields.String(required=True)
    unit_price_minor = ma.fields.Integer(required=True)
    amount_minor = ma.fields.Integer(required=True)
    created_at = ma.fields.AwareDateTime(required=True)
    paid_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    cancelled_at = ma.fields.AwareDateTime(required=True, allow_none=True)


class LicencePackOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    plan_id = ma.fields.UUID(required=True)
    purchase_id = ma.fields.UUID(required=True, allow_none=True)
    seats = ma.fields.Integer(required=True)
    seats_used = ma.fields.Integer(required=True)
    seats_free = ma.fields.Function(lambda pack: pack.seats - pack.seats_used, required=True)
    activation_deadline = ma.fields.AwareDateTime(required=True)
    created_at = ma.fields.AwareDateTime(required=True)


class DeviceLicenceOut(ma.Schema):
    licensed = ma.fields.Boolean(required=True, metadata={
        "description": "Whether the device holds a licence in its term or grace now."})
    plan_id = ma.fields.UUID(required=True, allow_none=True)
    pack_id = ma.fields.UUID(required=True, allow_none=True)
    starts_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    ends_at = ma.fields.AwareDateTime(required=True, allow_none=True)
    grace_ends_at = ma.fields.AwareDateTime(required=True, allow_none=True)


class PolicyIn(ma.Schema):
    overage_allowed = ma.fields.Boolean(required=True, metadata={
        "description": "Whether requests may use credits past allowance and packages, billed "
                       "in arrears at the rate card's overage price."})
    overage_cap_credits = ma.fields.Integer(
        load_default=None, allow_none=True, validate=ma.validate.Range(min=0, max=2**40),
        metadata={"description": "Overage credits allowed per calendar month; null: no cap."})
    auto_renew = ma.fields.Boolean(load_default=False)
    postpaid_plan_id = ma.fields.UUID(load_default=None, allow_none=True, metadata={
        "description": "A postpaid plan sold in the tenant's currency: every active device "
                       "without a seat is licensed under it and billed by device-days."})


class PolicyOut(PolicyIn):
    pass


class StatementArgs(ma.Schema):
    month = ma.fields.String(load_default=None, validate=ma.validate.Regexp(
        r"^(19|20)[0-9]{2}-(0[1-9]|1[0-2])$", error="Not YYYY-MM."))


class StatementOut(ma.Schema):
    month = ma.fields.String(required=True)
    currency = ma.fields.String(required=True)
    plan_code = ma.fields.String(required=True, allow_none=True, metadata={
        "description": "The postpaid plan, if the tenant uses one."})
    device_days = ma.fields.Integer(required=True, metadata={
        "description": "Licensed device-days on the postpaid plan (so far, this month)."})
    devices = ma.fields.Integer(required=True)
    days_in_month = ma.fields.Integer(required=True)
    device_month_price_minor = ma.fields.Integer(required=True, allow_none=True)
    device_days_amount_minor = ma.fields.Integer(required=True, metadata={
        "description": "device_days * device_month_price_minor / days_in_month, rounded "
                       "half-even."})
    overage_credits = ma.fields.Integer(required=True)
    overage_credit_price_minor = ma.fields.Decimal(required=True, allow_none=True,
                                                   as_string=True)
    overage_amount_minor = ma.fields.Integer(required=True)
    total_minor = ma.fields.Integer(required=True)


class PackageOut(ma.Schema):
    id = ma.fields.UUID(required=True)
    name = ma.fields.String(required=True)
    purchase_id = ma.fields.UUID(required=True, allow_none=True)
    credits = ma.fields.Integer(required=True, metadata={"description": "As bought."})
    balance = ma.fields.Integer(required=True, metadata={
        "description": "What the ledger says is left (settled usage only; streams in flight "
                       "hold a little more)."})
    starts_at = ma.fields.AwareDateTime(required=True)
    expires_at = ma.fields.AwareDateTime(required=True)
    expired = ma.fields.Boolean(required=True)


class DeviceCostOut(ma.Schema):
    month = ma.fields.String(required=True, metadata={
        "description": "The tenant's calendar month, YYYY-MM."})
    credits = ma.fields.Integer(required=True, metadata={
        "description": "Credits of the requests admitted this month (settled ones)."})
    forecast_credits = ma.fields.Integer(required=True, metadata={
        "description": "This month's daily average carried to its last day."})
    currency = ma.fields.String(required=True)
    money_minor = ma.fields.Decimal(required=True, allow_none=True, as_string=True, metadata={
        "description": "The credits' value in minor units at the plan's credit value (exact, "
                       "two decimals of a minor unit); null without a licence."})
    forecast_money_minor = ma.fields.Decimal(required=True, allow_none=True, as_string=True)


PlanPage = page_schema(PlanOut, "PlanPage")
PackagePage = page_schema(PackageOut, "PackagePage")
PackageOfferPage = page_schema(PackageOfferOut, "PackageOfferPage")
PurchasePage = page_schema(PurchaseOut, "PurchasePage")
LicencePackPage = page_schema(LicencePackOut, "LicencePackPage")
