"""Billing as the other domains and the web layers see it.

The catalogue (plans, rate cards, package offers), purchases, licence seats and the credit
ledger live in their own modules; this one wires billing into the fleet (a seat at
activation) and into inference (the licence in each device's profile, the ledger fed by the
usage writer), and re-exports what callers use.
"""

from __future__ import annotations

import uuid

from flask import Flask

from billing import catalog, ledger, licences, purchases
from billing.pricing import Rate, RateTable
from billing.profiles import licence_parts
from billing.settlement import post_usage
from fleet.hooks import register_activation_hook
from fleet.models import Device, DeviceEvent
from inference.directory import register_licence_part
from inference.usage import register_settled_hook

__all__ = ["Rate", "RateTable", "catalog", "init_app", "ledger", "licences", "purchases"]


def init_app(app: Flask) -> None:
    register_activation_hook(assign_seat_on_activation, new_devices=assign_seats_to_new)
    register_licence_part(licence_parts)  # the profile's licence, read by the credit hook
    register_settled_hook(post_usage)  # the usage writer posts consumption to the ledger


def assign_seat_on_activation(device: Device, history: list[DeviceEvent]) -> None:
    """A device keeps its live licence or takes a free seat; with none it is activated
    unlicensed (never refused here: inference refuses it until it has a seat)."""
    licences.on_activation(device.tenant_id, device.id)


def assign_seats_to_new(tenant_id: uuid.UUID, devices: list[Device]) -> None:
    licences.assign_new(tenant_id, [device.id for device in devices])
