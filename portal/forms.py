"""The portal's forms (Flask-WTF: every POST carries the session's CSRF token)."""

from __future__ import annotations

import functools
import zoneinfo

from flask_babel import lazy_gettext as _l
from flask_wtf import FlaskForm
from wtforms import (
    BooleanField,
    HiddenField,
    PasswordField,
    SelectChoice,
    SelectField,
    StringField,
    SubmitField,
)
from wtforms.validators import DataRequired, EqualTo, Length, Regexp

from accounts.models import Role, TokenScope
from core.errors import EnsoulError
from portal.labels import LANGUAGE_NAMES, ROLE_LABELS, SCOPE_LABELS, error_text, field_messages

MIN_PASSWORD = 10
PASSWORD_HINT = _l("At least %(n)d characters.", n=MIN_PASSWORD)


def apply_error(form: FlaskForm, error: EnsoulError) -> None:
    """Show a service's typed error on the form: per field where it names one."""
    placed = False
    for name, messages in field_messages(error).items():
        field = form._fields.get(name)
        if field is None:
            continue
        field.errors = [*field.errors, *messages]
        placed = True
    if not placed:
        form.form_errors.append(error_text(error))


def _role_choices() -> list[SelectChoice]:
    return [SelectChoice(role.value, label) for role, label in ROLE_LABELS.items()]


@functools.cache
def _timezones() -> list[SelectChoice]:
    return [SelectChoice(name) for name in sorted(zoneinfo.available_timezones())]


def _code_field() -> StringField:
    return StringField(
        _l("Six-digit code"),
        validators=[DataRequired(), Regexp(r"^\s*\d{3}\s*\d{3}\s*$", message=_l("Enter the six "
                                                                              "digits."))],
        render_kw={"autocomplete": "one-time-code", "inputmode": "numeric", "maxlength": 8},
    )


def _new_password_fields() -> tuple[PasswordField, PasswordField]:
    new = PasswordField(_l("New password"),
                        validators=[DataRequired(), Length(min=MIN_PASSWORD, max=200)],
                        description=PASSWORD_HINT, render_kw={"autocomplete": "new-password"})
    confirm = PasswordField(_l("Repeat the new password"),
                            validators=[DataRequired(), EqualTo("password", message=_l(
                                "The passwords do not match."))],
                            render_kw={"autocomplete": "new-password"})
    return new, confirm


class LoginForm(FlaskForm):
    email = StringField(_l("E-mail"), validators=[DataRequired(), Length(max=320)],
                        render_kw={"autocomplete": "username", "autofocus": True,
                                   "data-testid": "login-email"})
    password = PasswordField(_l("Password"), validators=[DataRequired(), Length(max=200)],
                             render_kw={"autocomplete": "current-password",
                                        "data-testid": "login-password"})
    next = HiddenField()
    submit = SubmitField(_l("Log in"), render_kw={"data-testid": "login-submit"})


class TwoFactorLoginForm(FlaskForm):
    code = _code_field()
    submit = SubmitField(_l("Verify"), render_kw={"data-testid": "login-2fa-submit"})


class ForgotPasswordForm(FlaskForm):
    email = StringField(_l("E-mail"), validators=[DataRequired(), Length(max=320)],
                        render_kw={"autocomplete": "email", "data-testid": "forgot-email"})
    submit = SubmitField(_l("Send the link"), render_kw={"data-testid": "forgot-submit"})


class ResetPasswordForm(FlaskForm):
    password, confirm = _new_password_fields()
    submit = SubmitField(_l("Set the new password"), render_kw={"data-testid": "reset-submit"})


class AcceptInvitationForm(FlaskForm):
    name = StringField(_l("Your name"), validators=[DataRequired(), Length(max=200)],
                       render_kw={"autocomplete": "name", "data-testid": "accept-name"})
    password, confirm = _new_password_fields()
    submit = SubmitField(_l("Create my account and join"),
                         render_kw={"data-testid": "accept-submit"})


class InviteForm(FlaskForm):
    email = StringField(_l("E-mail"), validators=[DataRequired(), Length(max=320)],
                        render_kw={"type": "email", "data-testid": "invite-email"})
    role = SelectField(_l("Role"), choices=_role_choices, default=Role.DEVELOPER.value,
                       render_kw={"data-testid": "invite-role"})
    submit = SubmitField(_l("Send invitation"), render_kw={"data-testid": "invite-submit"})


class RoleForm(FlaskForm):
    role = SelectField(_l("Role"), choices=_role_choices)


class TokenForm(FlaskForm):
    name = StringField(_l("Name"), validators=[DataRequired(), Length(max=200)],
                       description=_l("Where the token is used, e.g. “factory provisioning”."),
                       render_kw={"data-testid": "token-name"})
    scope = SelectField(_l("Scope"), default=TokenScope.READ.value,
                        choices=[SelectChoice(scope.value, label)
                                 for scope, label in SCOPE_LABELS.items()],
                        render_kw={"data-testid": "token-scope"})
    submit = SubmitField(_l("Create token"), render_kw={"data-testid": "token-submit"})


class LanguagePreferenceForm(FlaskForm):
    locale = SelectField(_l("Language"),
                         choices=[SelectChoice("", _l("Same as my browser")),
                                  *(SelectChoice(*item) for item in LANGUAGE_NAMES.items())],
                         render_kw={"data-testid": "profile-locale"})
    submit = SubmitField(_l("Save language"), render_kw={"data-testid": "profile-locale-submit"})


class ChangePasswordForm(FlaskForm):
    current = PasswordField(_l("Current password"), validators=[DataRequired()],
                            render_kw={"autocomplete": "current-password"})
    password, confirm = _new_password_fields()
    submit = SubmitField(_l("Change password"), render_kw={"data-testid": "password-submit"})


class TenantSettingsForm(FlaskForm):
    name = StringField(_l("Organisation name"), validators=[DataRequired(), Length(max=200)],
                       render_kw={"data-testid": "tenant-name"})
    timezone = SelectField(_l("Time zone"), choices=_timezones,
                           description=_l("Dates and times in the portal are shown in this "
                                          "time zone."),
                           render_kw={"data-testid": "tenant-timezone"})
    require_two_factor = BooleanField(
        _l("Require two-factor authentication for owners and finance"),
        render_kw={"data-testid": "tenant-require-2fa"})
    submit = SubmitField(_l("Save organisation settings"),
                         render_kw={"data-testid": "tenant-submit"})


class EnrolTwoFactorForm(FlaskForm):
    code = _code_field()
    submit = SubmitField(_l("Turn on two-factor authentication"),
                         render_kw={"data-testid": "2fa-confirm"})


class DisableTwoFactorForm(FlaskForm):
    code = _code_field()
    submit = SubmitField(_l("Turn off two-factor authentication"),
                         render_kw={"data-testid": "2fa-disable"})


class SuspendTenantForm(FlaskForm):
    reason = StringField(_l("Reason"), validators=[DataRequired(), Length(max=500)])
    submit = SubmitField(_l("Suspend"))
