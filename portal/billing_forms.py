"""The billing pages' forms (Flask-WTF; every POST carries the session's CSRF token). The
choices are the catalogue's items sold in the tenant's currency; the views fill them in."""

from __future__ import annotations

from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import IntegerField, SelectField, SubmitField
from wtforms.validators import DataRequired, InputRequired, NumberRange, Optional

from billing.purchases import MAX_QUANTITY


def _quantity(label: str, testid: str, default: int) -> IntegerField:
    return IntegerField(label, default=default,
                        validators=[InputRequired(), NumberRange(min=1, max=MAX_QUANTITY)],
                        render_kw={"min": 1, "max": MAX_QUANTITY, "inputmode": "numeric",
                                   "data-testid": testid})


class PackOrderForm(FlaskForm):
    plan_id = SelectField(_l("Plan"), validators=[DataRequired()],
                          render_kw={"data-testid": "pack-plan"})
    quantity = _quantity(_l("Seats"), "pack-seats", 10)
    submit = SubmitField(_l("Order seats"), render_kw={"data-testid": "pack-submit"})


class PackageOrderForm(FlaskForm):
    offer_id = SelectField(_l("Package"), validators=[DataRequired()],
                           render_kw={"data-testid": "package-offer"})
    quantity = _quantity(_l("Quantity"), "package-quantity", 1)
    submit = SubmitField(_l("Order package"), render_kw={"data-testid": "package-submit"})


class UsageFilterForm(FlaskForm):
    """The usage page's filters, read from the query string (a GET form: no CSRF token)."""

    class Meta:
        csrf = False

    product_id = SelectField(_l("Product"), validators=[Optional()], validate_choice=False,
                             render_kw={"data-testid": "usage-product"})
