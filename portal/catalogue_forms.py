"""The platform administrators' catalogue forms: a plan, a rate card version, a package offer
(Flask-WTF; every POST carries the session's CSRF token).

Whole prices (a seat, a package) are typed in the currency's major unit, as the portal shows
money, and stored in minor units; the value or price of one credit is typed in minor units,
since it is often a fraction of a cent (billing keeps 6 decimals of a minor unit).
"""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

from babel.numbers import get_currency_precision
from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import (
    DateTimeLocalField,
    DecimalField,
    FieldList,
    Form,
    FormField,
    IntegerField,
    SelectChoice,
    SelectField,
    SelectMultipleField,
    StringField,
    SubmitField,
)
from wtforms.validators import DataRequired, InputRequired, Length, NumberRange, Optional, Regexp

from accounts.services import CURRENCIES
from billing.models import METRICS, MODALITIES, PlanBilling
from core.fields import TEXT_PATTERN
from portal.billing_labels import BILLING_LABELS, MODALITY_LABELS

CURRENCY_ROWS = 3
INT_MAX = 2**31 - 1  # the columns are Postgres integers
MONEY_MAX = decimal.Decimal(10) ** 12  # in major units; minor units are BIGINT
PER_CREDIT_MAX = decimal.Decimal(10) ** 13  # Numeric(20, 6)
PER_CREDIT_STEP = decimal.Decimal("0.000001")

PLAIN = Regexp(TEXT_PATTERN, message=_l("Must not contain control characters."))
CODE = Regexp(r"^[a-z0-9][a-z0-9._-]*$",
              message=_l("Lower-case letters, digits, “.”, “_” and “-”, e.g. “companion-12m”."))
NOT_NEGATIVE = _l("Must not be negative.")
AT_LEAST_ONE = _l("Must be at least 1.")


def _count(label: Any, *, minimum: int = 0, default: int | None = None,
           required: bool = True, testid: str, description: Any = "") -> IntegerField:
    message = AT_LEAST_ONE if minimum == 1 else NOT_NEGATIVE
    first = InputRequired(message=_l("Required.")) if required else Optional()
    return IntegerField(label, default=default, description=description,
                        validators=[first, NumberRange(min=minimum, max=INT_MAX,
                                                       message=message)],
                        render_kw={"min": minimum, "inputmode": "numeric",
                                   "data-testid": testid})


def _per_credit(label: Any, testid: str) -> DecimalField:
    return DecimalField(label, places=None, validators=[Optional(), NumberRange(
        min=0, max=PER_CREDIT_MAX, message=NOT_NEGATIVE)],
        render_kw={"min": 0, "step": "any", "inputmode": "decimal", "data-testid": testid})


def to_minor(amount: decimal.Decimal, currency: str) -> int:
    """An amount in the major unit as integer minor units, exactly (refused in the form when
    it has more decimals than the currency)."""
    return int(amount.scaleb(get_currency_precision(currency)))


def _fits_currency(amount: decimal.Decimal, currency: str) -> bool:
    minor = amount.scaleb(get_currency_precision(currency))
    return minor == minor.to_integral_value()


class _CurrencyRow(Form):
    """One currency of a price list; a row left empty is ignored."""

    currency = StringField(_l("Currency"), filters=[lambda v: (v or "").strip().upper()],
                           render_kw={"maxlength": 3, "autocapitalize": "characters"})

    def priced_fields(self) -> list[Any]:
        return [f for f in self if f.name != self.currency.name]

    def is_empty(self) -> bool:
        return not self.currency.data and all(f.data is None for f in self.priced_fields())

    def validate(self, extra_validators: Any = None) -> bool:
        if not super().validate(extra_validators):
            return False
        if self.is_empty():
            return True
        ok = True
        if self.currency.data not in CURRENCIES:
            self.currency.errors = [*self.currency.errors,
                                    _l("Not an ISO 4217 currency code.")]
            ok = False
        for f in self.priced_fields():
            if f.data is None:
                f.errors = [*f.errors, _l("Required with a currency.")]
                ok = False
        return ok


class PlanPriceRow(_CurrencyRow):
    seat_price = DecimalField(_l("Seat price"), places=None, validators=[Optional(), NumberRange(
        min=0, max=MONEY_MAX, message=NOT_NEGATIVE)],
        render_kw={"min": 0, "step": "any", "inputmode": "decimal"})
    credit_value = _per_credit(_l("Value of one credit (minor units)"), "")

    def validate(self, extra_validators: Any = None) -> bool:
        ok = super().validate(extra_validators)
        if ok and not self.is_empty():
            ok = _check_whole_price(self.seat_price, self.currency.data)
            ok = _check_per_credit(self.credit_value) and ok
        return ok


class OfferPriceRow(_CurrencyRow):
    price = DecimalField(_l("Price"), places=None, validators=[Optional(), NumberRange(
        min=0, max=MONEY_MAX, message=NOT_NEGATIVE)],
        render_kw={"min": 0, "step": "any", "inputmode": "decimal"})

    def validate(self, extra_validators: Any = None) -> bool:
        ok = super().validate(extra_validators)
        if ok and not self.is_empty():
            ok = _check_whole_price(self.price, self.currency.data)
        return ok


class OveragePriceRow(_CurrencyRow):
    credit_price = _per_credit(_l("Price of one overage credit (minor units)"), "")

    def validate(self, extra_validators: Any = None) -> bool:
        ok = super().validate(extra_validators)
        if ok and not self.is_empty():
            ok = _check_per_credit(self.credit_price)
        return ok


def _check_whole_price(field: DecimalField, currency: str) -> bool:
    if _fits_currency(field.data, currency):
        return True
    field.errors = [*field.errors, _l("%(currency)s has %(n)d decimals.", currency=currency,
                                      n=get_currency_precision(currency))]
    return False


def _check_per_credit(field: DecimalField) -> bool:
    if field.data == field.data.quantize(PER_CREDIT_STEP, rounding=decimal.ROUND_DOWN):
        return True
    field.errors = [*field.errors, _l("At most 6 decimals.")]
    return False


def _price_rows(row: type[Form]) -> FieldList:
    return FieldList(FormField(row), min_entries=CURRENCY_ROWS, max_entries=CURRENCY_ROWS)


class _PricedForm(FlaskForm):
    """A form with rows of prices per currency: at least one, each currency once."""

    prices: FieldList
    prices_required = True

    def priced_rows(self) -> list[Any]:
        return [entry.form for entry in self.prices if not entry.form.is_empty()]

    def validate(self, extra_validators: Any = None) -> bool:
        ok = super().validate(extra_validators)
        rows = self.priced_rows()
        currencies = [row.currency.data for row in rows]
        if self.prices_required and not rows:
            self.form_errors.append(_l("Give a price in at least one currency."))
            ok = False
        if len(set(currencies)) != len(currencies):
            self.form_errors.append(_l("Give each currency once."))
            ok = False
        return ok


class PlanForm(_PricedForm):
    code = StringField(_l("Code"), validators=[DataRequired(), Length(max=64), CODE],
                       description=_l("Fixed: tenants and scripts name the plan by it."),
                       render_kw={"data-testid": "plan-code"})
    name = StringField(_l("Name"), validators=[DataRequired(), Length(max=200), PLAIN],
                       render_kw={"data-testid": "plan-name"})
    billing = SelectField(_l("Billing"), default=PlanBilling.PREPAID.value,
                          choices=[SelectChoice(b.value, label)
                                   for b, label in BILLING_LABELS.items()],
                          render_kw={"data-testid": "plan-billing"})
    term_months = _count(_l("Term (months)"), minimum=1, default=12, testid="plan-term")
    grace_days = _count(_l("Grace (days)"), default=0, testid="plan-grace")
    allowance_credits = _count(_l("Allowance (credits per device per month)"), default=0,
                               testid="plan-allowance")
    requests_per_minute = _count(_l("Requests per minute"), minimum=1, default=20,
                                 testid="plan-rpm")
    concurrent_streams = _count(_l("Concurrent streams"), minimum=1, default=2,
                                testid="plan-streams")
    daily_request_cap = _count(_l("Daily request cap"), minimum=1, required=False,
                               testid="plan-daily-cap",
                               description=_l("Per device; empty: no cap."))
    modalities = SelectMultipleField(
        _l("Modalities"), default=list(MODALITIES),
        choices=[SelectChoice(m, label) for m, label in MODALITY_LABELS.items()],
        validators=[DataRequired(message=_l("Choose at least one."))])
    prices = _price_rows(PlanPriceRow)
    submit = SubmitField(_l("Create plan"), render_kw={"data-testid": "plan-submit"})

    def price_map(self) -> dict[str, tuple[int, decimal.Decimal]]:
        return {row.currency.data: (to_minor(row.seat_price.data, row.currency.data),
                                    row.credit_value.data) for row in self.priced_rows()}


class PackageOfferForm(_PricedForm):
    code = StringField(_l("Code"), validators=[DataRequired(), Length(max=64), CODE],
                       render_kw={"data-testid": "offer-code"})
    name = StringField(_l("Name"), validators=[DataRequired(), Length(max=200), PLAIN],
                       render_kw={"data-testid": "offer-name"})
    credits = _count(_l("Credits"), minimum=1, default=None, testid="offer-credits")
    validity_days = _count(_l("Validity (days)"), minimum=1, default=90,
                           testid="offer-validity")
    prices = _price_rows(OfferPriceRow)
    submit = SubmitField(_l("Create package offer"), render_kw={"data-testid": "offer-submit"})

    def price_map(self) -> dict[str, int]:
        return {row.currency.data: to_minor(row.price.data, row.currency.data)
                for row in self.priced_rows()}


class MetricRate(Form):
    """A metric's rate; both empty: the metric is not rated (free)."""

    block_units = IntegerField(_l("Block (units)"), validators=[Optional(), NumberRange(
        min=1, max=INT_MAX, message=AT_LEAST_ONE)], render_kw={"min": 1, "inputmode": "numeric"})
    credits_per_block = IntegerField(_l("Credits per block"), validators=[
        Optional(), NumberRange(min=0, max=INT_MAX, message=NOT_NEGATIVE)],
        render_kw={"min": 0, "inputmode": "numeric"})

    def validate(self, extra_validators: Any = None) -> bool:
        ok = super().validate(extra_validators)
        if ok and (self.block_units.data is None) is not (self.credits_per_block.data is None):
            empty = self.block_units if self.block_units.data is None else self.credits_per_block
            empty.errors = [*empty.errors, _l("Give both, or neither for a free metric.")]
            ok = False
        return ok


class MetricRates(Form):
    """One :class:`MetricRate` per metric (fields added below, one per name in ``METRICS``)."""


for _metric in METRICS:
    setattr(MetricRates, _metric, FormField(MetricRate))


class RateCardForm(_PricedForm):
    prices_required = False  # overage prices are optional
    rates = FormField(MetricRates)
    effective_from = DateTimeLocalField(
        _l("Effective from (UTC)"), format="%Y-%m-%dT%H:%M", validators=[Optional()],
        description=_l("Now or later. The current minute, or empty, means now."),
        render_kw={"data-testid": "rate-card-effective-from"})
    prices = _price_rows(OveragePriceRow)
    submit = SubmitField(_l("Publish version"), render_kw={"data-testid": "rate-card-submit"})

    def rate_map(self) -> dict[str, tuple[int, int]]:
        return {metric: (rate.block_units.data, rate.credits_per_block.data)
                for metric in METRICS
                if (rate := self.rates.form[metric].form).block_units.data is not None}

    def overage_map(self) -> dict[str, decimal.Decimal]:
        return {row.currency.data: row.credit_price.data for row in self.priced_rows()}

    def starts(self, now: dt.datetime) -> dt.datetime | None:
        """The moment typed, in UTC; ``None`` (now) for an empty field or the current
        minute, which the field's minute precision cannot say more exactly."""
        typed = self.effective_from.data
        if typed is None:
            return None
        moment = typed.replace(tzinfo=dt.UTC)
        return None if moment == now.replace(second=0, microsecond=0) else moment
