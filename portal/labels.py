"""Translated names for values the services speak in codes: roles, scopes, error codes.

Services raise English messages; the portal shows the translation of the error's stable code
when it has one and the service's own message otherwise.
"""

from __future__ import annotations

from typing import Any

from flask_babel import gettext, lazy_gettext
from flask_babel.speaklater import LazyString

from accounts.models import Role, TokenScope
from core.errors import EnsoulError

ROLE_LABELS: dict[Role, LazyString] = {
    Role.OWNER: lazy_gettext("Owner"),
    Role.DEVELOPER: lazy_gettext("Developer"),
    Role.OPERATIONS: lazy_gettext("Operations"),
    Role.FINANCE: lazy_gettext("Finance"),
    Role.VIEWER: lazy_gettext("Viewer"),
}

SCOPE_LABELS: dict[TokenScope, LazyString] = {
    TokenScope.READ: lazy_gettext("Read only"),
    TokenScope.WRITE: lazy_gettext("Read and write"),
}

# The portal's languages, each named in itself.
LANGUAGE_NAMES = {"en": "English", "zh_Hans": "简体中文"}

ERROR_MESSAGES: dict[str, LazyString] = {
    "invalid_credentials": lazy_gettext("Wrong e-mail or password."),
    "account_locked": lazy_gettext("Too many failed logins. Try again later."),
    "invalid_totp": lazy_gettext("That code is not right."),
    "two_factor_enabled": lazy_gettext("Two-factor authentication is already enabled."),
    "already_member": lazy_gettext("This person is already a member."),
    "last_owner": lazy_gettext("A tenant needs at least one owner."),
    "email_taken": lazy_gettext("A user with this e-mail exists."),
    "login_required": lazy_gettext("Log in first to accept this invitation."),
    "invitation_other_email": lazy_gettext("This invitation is for another e-mail address."),
    "invitation_invalid": lazy_gettext("This invitation is not valid."),
    "invitation_used": lazy_gettext("This invitation was already accepted."),
    "invitation_expired": lazy_gettext("This invitation has expired."),
    "reset_link_invalid": lazy_gettext("This reset link is not valid."),
    "reset_link_used": lazy_gettext("This reset link was already used."),
    "reset_link_expired": lazy_gettext("This reset link has expired."),
    "tenant_suspended": lazy_gettext("This tenant is suspended."),
    "validation_failed": lazy_gettext("Some fields are invalid."),
    "bad_request": lazy_gettext("The request is malformed."),
    "malformed_json": lazy_gettext("The request is malformed."),
    "method_not_allowed": lazy_gettext("This action is not available here."),
    "unauthorized": lazy_gettext("Please log in to continue."),
    "forbidden": lazy_gettext("Your role does not allow this."),
    "not_found": lazy_gettext("There is nothing here."),
    "conflict": lazy_gettext("The request conflicts with the current state."),
    "gone": lazy_gettext("This link is no longer valid."),
    "too_large": lazy_gettext("The request is too large."),
    "rate_limited": lazy_gettext("Too many requests. Wait a moment and try again."),
    "csrf_failed": lazy_gettext("The form expired or was sent from elsewhere. Reload the page "
                                "and try again."),
    "unavailable": lazy_gettext("A service the platform needs is unavailable. Try again soon."),
    "internal": lazy_gettext("Something went wrong on our side. It has been logged."),
    # fleet
    "product_exists": lazy_gettext("A product with this name exists."),
    "duplicate_serial": lazy_gettext("A device with this serial exists."),
    "duplicate_mac": lazy_gettext("A device with this MAC address exists."),
    "invalid_status_transition": lazy_gettext("The device cannot do that in its current "
                                              "status."),
    "device_suspended": lazy_gettext("The device is suspended."),
    "device_retired": lazy_gettext("The device is retired."),
    "activation_refused": lazy_gettext("The activation was refused."),
    "activation_code_invalid": lazy_gettext("No device shows this code."),
    "activation_code_used": lazy_gettext("This code was already claimed."),
    "activation_code_expired": lazy_gettext("This code has expired. Restart the device to get "
                                            "a new one."),
    "import_invalid": lazy_gettext("The file has errors; nothing was imported."),
    "import_columns": lazy_gettext("The header row must name the columns: serial (required), "
                                   "mac, name, group, tags, hardware_key."),
    "import_encoding": lazy_gettext("The file is not UTF-8 text."),
    "import_not_csv": lazy_gettext("This is not a CSV file."),
    "import_empty": lazy_gettext("The file has no devices."),
    "credentials_already_downloaded": lazy_gettext("The credentials file was already "
                                                   "downloaded. It can be downloaded only once."),
    "no_credentials_file": lazy_gettext("This import issued no credentials."),
}

# Field messages the services use, marked here so the catalogues carry their translations.
FIELD_MESSAGES = (
    lazy_gettext("Must not be empty."),
    lazy_gettext("Not a valid e-mail address."),
    lazy_gettext("Not an IANA time zone."),
    lazy_gettext("Not an ISO 4217 currency code."),
    lazy_gettext("Already a member."),
    lazy_gettext("Already registered."),
    lazy_gettext("Use en or zh_Hans."),
    lazy_gettext("Must not be in the past."),  # billing.catalog.publish_rate_card
)


def error_text(error: EnsoulError) -> str:
    message = ERROR_MESSAGES.get(error.code)
    return str(message) if message is not None else error.message


def field_messages(error: EnsoulError) -> dict[str, list[str]]:
    """The error's per-field messages, translated where the catalogue knows them."""
    fields: dict[str, list[str]] = {}
    for field, messages in error.details.items():
        items: list[Any] = messages if isinstance(messages, list) else [messages]
        fields[field] = [gettext(str(m)) for m in items]
    return fields
