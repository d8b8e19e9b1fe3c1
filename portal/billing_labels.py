"""How the billing pages write what billing speaks in codes and minor units: purchase statuses,
metric names, plan billing and modalities, and money."""

from __future__ import annotations

import decimal

from babel.numbers import get_currency_precision
from flask.sansio.blueprints import BlueprintSetupState
from flask_babel import format_currency, format_decimal, lazy_gettext
from flask_babel import lazy_pgettext as pgettext  # lazy, under the name the extractor knows
from flask_babel.speaklater import LazyString

from billing.models import PlanBilling, PurchaseKind, PurchaseStatus
from portal.blueprint import bp

# In context: "Paid" and "Pending" are words of other states too.
PURCHASE_STATUS_LABELS: dict[PurchaseStatus, LazyString] = {
    PurchaseStatus.PENDING: pgettext("purchase status", "Pending"),
    PurchaseStatus.PAID: pgettext("purchase status", "Paid"),
    PurchaseStatus.CANCELLED: pgettext("purchase status", "Cancelled"),
}

PURCHASE_STATUS_STYLES: dict[PurchaseStatus, str] = {
    PurchaseStatus.PENDING: "text-bg-warning",
    PurchaseStatus.PAID: "text-bg-success",
    PurchaseStatus.CANCELLED: "text-bg-secondary",
}

PURCHASE_KIND_LABELS: dict[PurchaseKind, LazyString] = {
    PurchaseKind.LICENCE_PACK: lazy_gettext("Licence seats"),
    PurchaseKind.PACKAGE: lazy_gettext("Credit package"),
}

METRIC_LABELS: dict[str, LazyString] = {
    "input_tokens": lazy_gettext("Input tokens"),
    "output_tokens": lazy_gettext("Output tokens"),
    "audio_in_ms": lazy_gettext("Audio in (ms)"),
    "audio_out_ms": lazy_gettext("Audio out (ms)"),
    "images": lazy_gettext("Images"),
    "tool_calls": lazy_gettext("Tool calls"),
}

BILLING_LABELS: dict[PlanBilling, LazyString] = {
    PlanBilling.PREPAID: lazy_gettext("Prepaid"),
    PlanBilling.POSTPAID: lazy_gettext("Postpaid"),
}

MODALITY_LABELS: dict[str, LazyString] = {
    "text": lazy_gettext("Text"),
    "voice": lazy_gettext("Voice"),
    "vision": lazy_gettext("Vision"),
}


def money(amount_minor: int, currency: str) -> str:
    """Integer minor units as the reader's locale writes the amount: exact, as a ``Decimal``
    with the currency's own number of decimals (none for JPY, two for EUR)."""
    amount = decimal.Decimal(amount_minor).scaleb(-get_currency_precision(currency))
    return str(format_currency(amount, currency))


def per_credit(minor_units: decimal.Decimal) -> str:
    """A price or value of one credit, in minor units with up to the 6 decimals billing keeps
    (a fraction of a cent, so not written as money)."""
    return str(format_decimal(minor_units, format="#,##0.######"))


@bp.record_once
def _billing_labels(state: BlueprintSetupState) -> None:
    state.app.jinja_env.globals.update(
        purchase_status_label=PURCHASE_STATUS_LABELS.get,
        purchase_status_style=PURCHASE_STATUS_STYLES.get,
        purchase_kind_label=PURCHASE_KIND_LABELS.get, metric_label=METRIC_LABELS.get,
        billing_label=BILLING_LABELS.get, modality_label=MODALITY_LABELS.get)
    state.app.jinja_env.filters["money"] = money
    state.app.jinja_env.filters["per_credit"] = per_credit
