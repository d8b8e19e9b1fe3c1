"""Extension points other domains plug into without fleet importing them.

- Activation hooks run inside the activation's transaction, get the device and its history,
  and may refuse with a typed error (billing assigns a licence seat here).
- Reset hooks run when a device is reset or transferred (inference deletes its memory here).
- Registry hooks run after a commit that changed devices, before the registry's pub/sub
  message goes out (inference writes the devices' admission profiles to Redis here).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from core.errors import EnsoulError
from fleet.models import Device, DeviceEvent

ActivationHook = Callable[[Device, list[DeviceEvent]], None]
# The same hook for many devices activated for the first time at once (a factory import).
NewDevicesHook = Callable[[uuid.UUID, list[Device]], None]
ResetHook = Callable[[Device], None]
RegistryHook = Callable[[uuid.UUID, list[uuid.UUID]], None]

_activation_hooks: list[ActivationHook] = []
_new_devices_hooks: dict[ActivationHook, NewDevicesHook] = {}
_reset_hooks: list[ResetHook] = []
_registry_hooks: list[RegistryHook] = []


class ActivationRefused(EnsoulError):
    """Raised by an activation hook; its code reaches the API and the bootstrap endpoint."""

    code, http_status, message = "activation_refused", 409, "Activation was refused."


def register_activation_hook(hook: ActivationHook, *,
                             new_devices: NewDevicesHook | None = None) -> ActivationHook:
    """``new_devices``: an optional bulk form of ``hook`` for devices with no history."""
    if hook not in _activation_hooks:
        _activation_hooks.append(hook)
    if new_devices is not None:
        _new_devices_hooks[hook] = new_devices
    return hook


def unregister_activation_hook(hook: ActivationHook) -> None:
    if hook in _activation_hooks:
        _activation_hooks.remove(hook)
    _new_devices_hooks.pop(hook, None)


def register_reset_hook(hook: ResetHook) -> ResetHook:
    if hook not in _reset_hooks:
        _reset_hooks.append(hook)
    return hook


def run_activation_hooks(device: Device, history: list[DeviceEvent]) -> None:
    for hook in list(_activation_hooks):
        hook(device, history)


def run_activation_hooks_for_new(tenant_id: uuid.UUID, devices: list[Device]) -> None:
    """Activation hooks for devices activated for the first time, in bulk where a hook can."""
    for hook in list(_activation_hooks):
        bulk = _new_devices_hooks.get(hook)
        if bulk is not None:
            bulk(tenant_id, devices)
        else:
            for device in devices:
                hook(device, [])


def run_reset_hooks(device: Device) -> None:
    for hook in list(_reset_hooks):
        hook(device)


def register_registry_hook(hook: RegistryHook) -> RegistryHook:
    if hook not in _registry_hooks:
        _registry_hooks.append(hook)
    return hook


def run_registry_hooks(tenant_id: uuid.UUID, device_ids: list[uuid.UUID]) -> None:
    for hook in list(_registry_hooks):
        hook(tenant_id, device_ids)
