"""REST endpoints of inference: the tenant's settings and provider configurations, what each
device did (recent requests and transcripts), and deleting a device's conversation data."""

from __future__ import annotations

from typing import Any

from accounts import permissions as perm
from accounts.auth import require
from core.api import api_blueprint
from core.pagination import PageArgsSchema, paginate
from core.tenancy import current_tenant_id, get_owned, owned_resource, scoped
from fleet.models import Device
from inference import schemas, services
from inference.models import ProviderConfig

blp = api_blueprint("inference_api", __name__, "",
                    description="Inference settings, providers, what devices did")


# --- settings ------------------------------------------------------------------------------


@blp.route("/inference/settings", methods=["GET"])
@require(perm.INFERENCE_READ)
@blp.response(200, schemas.InferenceSettingsOut)
def get_settings() -> Any:
    """Conversation memory and transcript retention of every device of the tenant."""
    return services.get_settings(current_tenant_id())


@blp.route("/inference/settings", methods=["PUT"])
@require(perm.INFERENCE_WRITE)
@blp.arguments(schemas.InferenceSettingsIn)
@blp.response(200, schemas.InferenceSettingsOut)
def put_settings(data: dict[str, Any]) -> Any:
    """Replace the settings; devices follow within a second of the answer."""
    return services.put_settings(current_tenant_id(), data)


# --- provider configurations ---------------------------------------------------------------


@blp.route("/providers", methods=["GET"])
@require(perm.INFERENCE_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.ProviderPage)
def list_providers(args: dict[str, Any]) -> Any:
    return paginate(scoped(ProviderConfig), ProviderConfig.id, args)


@blp.route("/providers", methods=["POST"])
@require(perm.INFERENCE_WRITE)
@blp.arguments(schemas.ProviderIn)
@blp.response(201, schemas.ProviderOut)
def create_provider(data: dict[str, Any]) -> Any:
    """Add a provider configuration; its API key is stored encrypted and never shown."""
    return services.create_provider(current_tenant_id(), data)


@blp.route("/providers/<provider_id>", methods=["GET"])
@owned_resource(ProviderConfig)
@require(perm.INFERENCE_READ)
@blp.response(200, schemas.ProviderOut)
def get_provider(provider_id: str) -> Any:
    return get_owned(ProviderConfig, provider_id)


@blp.route("/providers/<provider_id>", methods=["PATCH"])
@owned_resource(ProviderConfig)
@require(perm.INFERENCE_WRITE)
@blp.arguments(schemas.ProviderUpdateIn(partial=True))
@blp.response(200, schemas.ProviderOut)
def update_provider(data: dict[str, Any], provider_id: str) -> Any:
    return services.update_provider(get_owned(ProviderConfig, provider_id), data)


@blp.route("/providers/<provider_id>", methods=["DELETE"])
@owned_resource(ProviderConfig)
@require(perm.INFERENCE_WRITE)
@blp.response(204)
def delete_provider(provider_id: str) -> None:
    """Refused (409 ``provider_in_use``) while another configuration fails over to it."""
    services.delete_provider(get_owned(ProviderConfig, provider_id))


# --- what a device did ---------------------------------------------------------------------


@blp.route("/devices/<device_id>/requests", methods=["GET"])
@owned_resource(Device)
@require(perm.INFERENCE_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.DeviceRequestPage)
def device_requests(args: dict[str, Any], device_id: str) -> Any:
    """The device's settled requests, newest first: timing, units, credits, outcome."""
    device = get_owned(Device, device_id)
    return services.recent_requests(device.tenant_id, device.id, args.get("cursor"),
                                    args["limit"])


@blp.route("/devices/<device_id>/transcripts", methods=["GET"])
@owned_resource(Device)
@require(perm.TRANSCRIPTS_READ)
@blp.response(200, schemas.DeviceTranscriptList)
def device_transcripts(device_id: str) -> Any:
    """The device's recent turns (at most 50, newest first), kept as long as the tenant's
    ``transcript_retention_hours``."""
    device = get_owned(Device, device_id)
    return {"items": services.recent_transcripts(device.tenant_id, device.id)}


@blp.route("/devices/<device_id>/inference-data", methods=["DELETE"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
@blp.response(204)
def delete_inference_data(device_id: str) -> None:
    """Delete the device's conversation memory and transcripts (its user asked); usage
    records stay, they hold no conversation content."""
    services.delete_inference_data(get_owned(Device, device_id))
