"""Inference's side of the other domains: profiles follow the registry, resets forget."""

from __future__ import annotations

import uuid

from flask import Flask, current_app

from core.redis import get_redis
from fleet.hooks import register_registry_hook, register_reset_hook
from fleet.models import Device
from inference.directory import project_devices
from inference.sessions import memory_key, recent_key


def init_app(app: Flask) -> None:
    register_registry_hook(project_devices_after_commit)
    register_reset_hook(forget_device)


def project_devices_after_commit(tenant_id: uuid.UUID, device_ids: list[uuid.UUID]) -> None:
    project_devices(tenant_id, device_ids)


def delete_device_data(tenant_id: uuid.UUID, device_id: uuid.UUID) -> None:
    """Conversation memory and recent transcripts of a device (reset, transfer, a request
    from its user)."""
    prefix = current_app.config["ENSOUL_REDIS_PREFIX"]
    get_redis().delete(memory_key(prefix, str(tenant_id), str(device_id)),
                       recent_key(prefix, str(tenant_id), str(device_id)))


def forget_device(device: Device) -> None:
    delete_device_data(device.tenant_id, device.id)
