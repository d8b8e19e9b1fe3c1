"""The fleet pages' forms (Flask-WTF; every POST carries the session's CSRF token)."""

from __future__ import annotations

import re

from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from flask_wtf.file import FileField, FileRequired
from wtforms import (
    BooleanField,
    SelectChoice,
    SelectField,
    StringField,
    SubmitField,
    TextAreaField,
)
from wtforms.validators import DataRequired, Length, Optional, Regexp

from core.errors import EnsoulError
from core.fields import TEXT_PATTERN
from fleet.models import Product
from portal.fleet_labels import (
    BULK_ACTION_LABELS,
    KIND_LABELS,
    STATUS_LABELS,
    fleet_message,
)
from portal.forms import apply_error

# What the REST API refuses in text (control characters, NUL above all) is refused here too.
PLAIN = Regexp(TEXT_PATTERN, message=_l("Must not contain control characters."))
TAGS_HINT = _l("Separated by commas or spaces, e.g. “beta, eu”.")


def apply_fleet_error(form: FlaskForm, error: EnsoulError) -> None:
    """:func:`portal.forms.apply_error`, with the fleet's field messages translated."""
    details = {
        field: [fleet_message(m) for m in (messages if isinstance(messages, list)
                                           else [messages])]
        for field, messages in error.details.items()
    }
    apply_error(form, EnsoulError(error.message, code=error.code, details=details))


def split_tags(raw: str | None) -> list[str]:
    return [t for t in re.split(r"[\s,;]+", raw or "") if t]


def product_choices(products: list[Product], empty: str | None = None) -> list[SelectChoice]:
    choices = [SelectChoice(str(p.id), p.name) for p in products]
    return [SelectChoice("", empty), *choices] if empty is not None else choices


class ProductForm(FlaskForm):
    name = StringField(_l("Name"), validators=[DataRequired(), Length(max=200), PLAIN],
                       description=_l("The model line, e.g. “Bear Companion v2”."),
                       render_kw={"data-testid": "product-name"})
    hardware_kind = SelectField(
        _l("Hardware kind"),
        choices=[SelectChoice(kind.value, label) for kind, label in KIND_LABELS.items()],
        render_kw={"data-testid": "product-kind"})
    description = TextAreaField(_l("Description"), validators=[Length(max=2000), PLAIN],
                                render_kw={"rows": 2, "data-testid": "product-description"})
    requires_hardware_binding = BooleanField(
        _l("Requires hardware-bound activation"),
        description=_l("Devices must prove their per-device hardware key (HMAC) to activate."),
        render_kw={"data-testid": "product-hardware-binding"})
    allow_self_registration = BooleanField(
        _l("Allow self-registration"), default=True,
        description=_l("Unknown devices with the enrolment key register themselves when they "
                       "bootstrap."),
        render_kw={"data-testid": "product-self-registration"})
    submit = SubmitField(_l("Create product"), render_kw={"data-testid": "product-submit"})


class ProductEditForm(FlaskForm):
    name = ProductForm.name
    description = ProductForm.description
    requires_hardware_binding = ProductForm.requires_hardware_binding
    allow_self_registration = ProductForm.allow_self_registration
    submit = SubmitField(_l("Save product"), render_kw={"data-testid": "product-save"})


class DeviceSearchForm(FlaskForm):
    """The device list's filters, read from the query string (a GET form: no CSRF token)."""

    class Meta:
        csrf = False

    q = StringField(_l("Serial or name starts with"),
                    validators=[Optional(), Length(max=64), PLAIN],
                    render_kw={"data-testid": "device-search", "type": "search",
                               "placeholder": _l("Serial or name…")})
    status = SelectField(
        _l("Status"),
        choices=[SelectChoice("", _l("Any status")),
                 *(SelectChoice(s.value, label) for s, label in STATUS_LABELS.items())],
        validators=[Optional()], render_kw={"data-testid": "device-filter-status"})
    product_id = SelectField(_l("Product"), validators=[Optional()], validate_choice=False,
                             render_kw={"data-testid": "device-filter-product"})
    group = StringField(_l("Group"), validators=[Optional(), Length(max=100), PLAIN],
                        render_kw={"data-testid": "device-filter-group"})
    tag = StringField(_l("Tag"), validators=[Optional(), Length(max=64), PLAIN],
                      render_kw={"data-testid": "device-filter-tag"})
    firmware_version = StringField(_l("Firmware version"),
                                   validators=[Optional(), Length(max=64), PLAIN],
                                   render_kw={"data-testid": "device-filter-firmware"})
    online = SelectField(_l("Presence"),
                         choices=[SelectChoice("", _l("Online or offline")),
                                  SelectChoice("yes", _l("Online")),
                                  SelectChoice("no", _l("Offline"))],
                         validators=[Optional()], render_kw={"data-testid": "device-filter-online"})


class DeviceForm(FlaskForm):
    product_id = SelectField(_l("Product"), validators=[DataRequired()],
                             render_kw={"data-testid": "device-product"})
    serial = StringField(_l("Serial"), validators=[DataRequired(), Length(max=64), PLAIN],
                         description=_l("Unique in your organisation: letters, digits, “.”, "
                                        "“_”, “:” or “-”."),
                         render_kw={"data-testid": "device-serial"})
    mac = StringField(_l("MAC address"), validators=[Optional(), Length(max=32), PLAIN],
                      render_kw={"data-testid": "device-mac", "placeholder": "a4:cf:12:00:00:01"})
    name = StringField(_l("Name"), validators=[Optional(), Length(max=200), PLAIN],
                       description=_l("Defaults to the serial."),
                       render_kw={"data-testid": "device-name"})
    group = StringField(_l("Group"), validators=[Optional(), Length(max=100), PLAIN],
                        render_kw={"data-testid": "device-group"})
    tags = StringField(_l("Tags"), validators=[PLAIN], description=TAGS_HINT,
                       render_kw={"data-testid": "device-tags"})
    hardware_key = StringField(
        _l("Hardware key"), validators=[Optional(), Length(max=128), PLAIN],
        description=_l("Hex, 16 to 64 bytes, for hardware-bound activation. Stored encrypted "
                       "and never shown again."),
        render_kw={"autocomplete": "off", "data-testid": "device-hardware-key"})
    end_user_ref = StringField(_l("End-user reference"),
                               validators=[Optional(), Length(max=200), PLAIN],
                               description=_l("Your own app's id for the device's owner."),
                               render_kw={"data-testid": "device-end-user"})
    submit = SubmitField(_l("Add device"), render_kw={"data-testid": "device-submit"})


class DeviceEditForm(FlaskForm):
    name = StringField(_l("Name"), validators=[DataRequired(), Length(max=200), PLAIN],
                       render_kw={"data-testid": "device-edit-name"})
    group = StringField(_l("Group"), validators=[Optional(), Length(max=100), PLAIN],
                        description=_l("Empty: no group."),
                        render_kw={"data-testid": "device-edit-group"})
    tags = StringField(_l("Tags"), validators=[PLAIN], description=TAGS_HINT,
                       render_kw={"data-testid": "device-edit-tags"})
    submit = SubmitField(_l("Save"), render_kw={"data-testid": "device-edit-submit"})


class TransferForm(FlaskForm):
    end_user_ref = StringField(_l("New end-user reference"),
                               validators=[Optional(), Length(max=200), PLAIN],
                               description=_l("Empty: the device belongs to no end user."),
                               render_kw={"data-testid": "device-transfer-ref"})
    submit = SubmitField(_l("Transfer"), render_kw={"data-testid": "device-transfer-submit"})


class BulkActionForm(FlaskForm):
    action = SelectField(
        _l("With the selected devices"),
        choices=[SelectChoice(a, label) for a, label in BULK_ACTION_LABELS.items()],
        render_kw={"data-testid": "bulk-action"})
    group = StringField(_l("Group"), validators=[Optional(), Length(max=100), PLAIN],
                        render_kw={"data-testid": "bulk-group", "placeholder": _l("No group")})
    submit = SubmitField(_l("Apply"), render_kw={"data-testid": "bulk-submit"})


class ImportForm(FlaskForm):
    product_id = SelectField(_l("Product"), validators=[DataRequired()],
                             render_kw={"data-testid": "import-product"})
    file = FileField(_l("CSV file"), validators=[FileRequired(_l("Choose a CSV file."))],
                     description=_l("UTF-8, with a header row: serial (required), mac, name, "
                                    "group, tags (separated by “;”), hardware_key."),
                     render_kw={"accept": ".csv,text/csv", "data-testid": "import-file"})
    issue_credentials = BooleanField(
        _l("Issue MQTT credentials"),
        description=_l("You get a credentials file for flashing, which can be downloaded once."),
        render_kw={"data-testid": "import-credentials"})
    activate = BooleanField(_l("Activate the devices now"),
                            description=_l("For devices activated at the factory."),
                            render_kw={"data-testid": "import-activate"})
    submit = SubmitField(_l("Import"), render_kw={"data-testid": "import-submit"})


class ClaimForm(FlaskForm):
    code = StringField(
        _l("Activation code"),
        validators=[DataRequired(), Regexp(r"^\s*\d{3}\s*\d{3}\s*$",
                                           message=_l("Enter the six digits."))],
        description=_l("The six digits the device shows or speaks."),
        render_kw={"autocomplete": "off", "inputmode": "numeric", "maxlength": 8,
                   "autofocus": True, "data-testid": "claim-code"})
    end_user_ref = StringField(_l("End-user reference"),
                               validators=[Optional(), Length(max=200), PLAIN],
                               description=_l("Optional: your own app's id for the owner."),
                               render_kw={"data-testid": "claim-end-user"})
    submit = SubmitField(_l("Claim and activate"), render_kw={"data-testid": "claim-submit"})

