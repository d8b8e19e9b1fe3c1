"""Translated names for what the fleet speaks in codes: statuses, kinds, events, bulk actions,
and the messages its services and the CSV import put on fields and rows."""

from __future__ import annotations

import re
from typing import Any

from flask_babel import gettext, lazy_gettext
from flask_babel import lazy_pgettext as pgettext  # lazy, under the name the extractor knows
from flask_babel.speaklater import LazyString

from fleet.models import DeviceStatus, HardwareKind

# In context: "Active" is also an API token's state, with another word in Chinese.
STATUS_LABELS: dict[DeviceStatus, LazyString] = {
    DeviceStatus.PROVISIONED: pgettext("device status", "Provisioned"),
    DeviceStatus.ACTIVE: pgettext("device status", "Active"),
    DeviceStatus.SUSPENDED: pgettext("device status", "Suspended"),
    DeviceStatus.RETIRED: pgettext("device status", "Retired"),
}

# Bootstrap badge colours per status.
STATUS_STYLES: dict[DeviceStatus, str] = {
    DeviceStatus.PROVISIONED: "text-bg-info",
    DeviceStatus.ACTIVE: "text-bg-success",
    DeviceStatus.SUSPENDED: "text-bg-warning",
    DeviceStatus.RETIRED: "text-bg-secondary",
}

KIND_LABELS: dict[HardwareKind, LazyString] = {
    HardwareKind.GLASSES: lazy_gettext("Glasses"),
    HardwareKind.TOY: lazy_gettext("Toy"),
    HardwareKind.CAPSULE: lazy_gettext("Capsule"),
    HardwareKind.OTHER: lazy_gettext("Other"),
}

BULK_ACTION_LABELS: dict[str, LazyString] = {
    "suspend": lazy_gettext("Suspend"),
    "resume": lazy_gettext("Resume"),
    "retire": lazy_gettext("Retire"),
    "move_group": lazy_gettext("Move to group"),
}

EVENT_LABELS: dict[str, LazyString] = {
    "created": lazy_gettext("Registered"),
    "activated": lazy_gettext("Activated"),
    "activation_code_issued": lazy_gettext("Activation code shown"),
    "activation_code_claimed": lazy_gettext("Activation code claimed"),
    "suspend": lazy_gettext("Suspended"),
    "resume": lazy_gettext("Resumed"),
    "retire": lazy_gettext("Retired"),
    "credentials_issued": lazy_gettext("Credentials issued"),
    "credentials_rotated": lazy_gettext("Credentials rotated"),
    "credentials_revoked": lazy_gettext("Credentials revoked"),
    "reset": lazy_gettext("Reset"),
    "transferred": lazy_gettext("Transferred"),
}

# The import's columns (and "_row" for a row that cannot be split into them).
COLUMN_LABELS: dict[str, LazyString] = {
    "_row": lazy_gettext("Row"),
    "serial": lazy_gettext("Serial"),
    "mac": lazy_gettext("MAC"),
    "name": lazy_gettext("Name"),
    "group": lazy_gettext("Group"),
    "tags": lazy_gettext("Tags"),
    "hardware_key": lazy_gettext("Hardware key"),
}

# Fixed field messages of fleet.services and fleet.imports, marked for the catalogues.
FIELD_MESSAGES = (
    lazy_gettext("Already used."),
    lazy_gettext("Not a MAC address (12 hex digits)."),
    lazy_gettext("1-64 characters: letters, digits, '.', '_', ':' or '-', starting with a "
                 "letter or digit."),
    lazy_gettext("A hex key of 16 to 64 bytes."),
)

# Messages with a number or a value in them: the English pattern and its translation.
_PATTERNS: tuple[tuple[re.Pattern[str], LazyString], ...] = (
    (re.compile(r"^Duplicate of line (?P<line>\d+)\.$"),
     lazy_gettext("Duplicate of line %(line)s.")),
    (re.compile(r"^Expected (?P<expected>\d+) fields, found (?P<found>\d+)\.$"),
     lazy_gettext("Expected %(expected)s fields, found %(found)s.")),
    (re.compile(r"^At most (?P<n>\d+) tags\.$"), lazy_gettext("At most %(n)s tags.")),
    (re.compile(r"^Invalid tag (?P<tag>.+?): letters, digits, '\.', '_', ':' or '-', up to "
                r"64\.$"),
     lazy_gettext("Invalid tag %(tag)s: letters, digits, '.', '_', ':' or '-', up to 64.")),
)


def fleet_message(message: Any) -> str:
    """A service's field or row message in the reader's language, where the catalogue knows it."""
    text = str(message)
    for pattern, translated in _PATTERNS:
        match = pattern.match(text)
        if match:
            return str(translated) % match.groupdict()
    return gettext(text)
