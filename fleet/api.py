"""REST endpoints of the fleet: products, devices, imports, activation codes."""

from __future__ import annotations

from typing import Any

from flask import Response, request
from sqlalchemy import select

from accounts import permissions as perm
from accounts.auth import require
from core.api import api_blueprint
from core.db import db
from core.idempotency import idempotent
from core.pagination import PageArgsSchema, paginate
from core.tenancy import current_tenant_id, get_owned, owned_resource, scoped
from fleet import activation, imports, presence, schemas, services, topics
from fleet.models import Device, DeviceEvent, DeviceImport, Product

blp = api_blueprint("fleet_api", __name__, "", description="Products, devices, activation")


def _with_presence(devices: list[Device]) -> list[Device]:
    """Set each device's ``online`` flag: one Redis round trip for the page."""
    if devices:
        flags = presence.online_flags(devices[0].tenant_id, [str(d.id) for d in devices])
        for device, online in zip(devices, flags, strict=True):
            device.online = online  # type: ignore[attr-defined]
    return devices


@blp.before_request
def _allow_large_imports() -> None:
    if request.endpoint == "fleet_api.create_import":
        request.max_content_length = imports.MAX_BYTES


# --- products -----------------------------------------------------------------------------


@blp.route("/products", methods=["GET"])
@require(perm.FLEET_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.ProductPage)
def list_products(args: dict[str, Any]) -> Any:
    return paginate(scoped(Product), Product.id, args)


@blp.route("/products", methods=["POST"])
@require(perm.FLEET_WRITE)
@idempotent(redact=("enrolment_key",))
@blp.arguments(schemas.ProductIn)
@blp.response(201, schemas.ProductCreatedOut)
def create_product(data: dict[str, Any]) -> Any:
    """Create a product. Its enrolment key is in this answer only (stored as SHA-256)."""
    product, raw = services.create_product(current_tenant_id(), **data)
    product.secret = raw  # type: ignore[attr-defined]
    return product


@blp.route("/products/<product_id>", methods=["GET"])
@owned_resource(Product)
@require(perm.FLEET_READ)
@blp.response(200, schemas.ProductOut)
def get_product(product_id: str) -> Any:
    return get_owned(Product, product_id)


@blp.route("/products/<product_id>", methods=["PATCH"])
@owned_resource(Product)
@require(perm.FLEET_WRITE)
@blp.arguments(schemas.ProductUpdateIn)
@blp.response(200, schemas.ProductOut)
def update_product(data: dict[str, Any], product_id: str) -> Any:
    return services.update_product(get_owned(Product, product_id), **data)


@blp.route("/products/<product_id>/enrolment-key", methods=["POST"])
@owned_resource(Product)
@require(perm.FLEET_WRITE)
@blp.response(200, schemas.ProductCreatedOut)
def rotate_enrolment_key(product_id: str) -> Any:
    """Replace the enrolment key; the old one stops working at once."""
    product = get_owned(Product, product_id)
    product.secret = services.rotate_enrolment_key(product)  # type: ignore[attr-defined]
    return product


# --- devices ------------------------------------------------------------------------------


@blp.route("/devices", methods=["GET"])
@require(perm.FLEET_READ)
@blp.arguments(schemas.DeviceSearchArgs, location="query")
@blp.response(200, schemas.DevicePage)
def list_devices(args: dict[str, Any]) -> Any:
    """Search the fleet; every filter narrows; keyset pagination by creation order."""
    tenant_id = current_tenant_id()
    online = presence.online_ids(tenant_id) if args.get("online") is not None else None
    page = paginate(services.search_devices(tenant_id, args, online), Device.id, args)
    _with_presence(page["items"])
    return page


@blp.route("/devices", methods=["POST"])
@require(perm.FLEET_WRITE)
@idempotent()
@blp.arguments(schemas.DeviceIn)
@blp.response(201, schemas.DeviceOut)
def create_device(data: dict[str, Any]) -> Any:
    product = get_owned(Product, data.pop("product_id"))
    device = services.create_device(product, **data)
    return _with_presence([device])[0]


@blp.route("/devices/export.csv", methods=["GET"])
@require(perm.FLEET_READ)
@blp.arguments(schemas.DeviceSearchArgs, location="query")
@blp.response(200, {"type": "string"}, content_type="text/csv")
def export_devices(args: dict[str, Any]) -> Any:
    """The matching devices as CSV (no secrets), all pages at once."""
    tenant_id = current_tenant_id()
    online = presence.online_ids(tenant_id) if args.get("online") is not None else None
    stmt = services.search_devices(tenant_id, args, online).order_by(Device.id)
    devices = list(db.session.execute(stmt).scalars())
    return Response(imports.export_csv(devices), mimetype="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="devices.csv"'})


@blp.route("/devices/bulk", methods=["POST"])
@require(perm.FLEET_WRITE)
@blp.arguments(schemas.BulkActionIn)
@blp.response(200, schemas.BulkActionOut)
def bulk_action(data: dict[str, Any]) -> Any:
    """Suspend, resume, retire or move many devices (``move_group`` without a ``group``
    takes them out of their group); per-device failures are reported."""
    return services.bulk_action(current_tenant_id(), data["device_ids"], data["action"],
                                data.get("group"))


@blp.route("/devices/<device_id>", methods=["GET"])
@owned_resource(Device)
@require(perm.FLEET_READ)
@blp.response(200, schemas.DeviceOut)
def get_device(device_id: str) -> Any:
    return _with_presence([get_owned(Device, device_id)])[0]


@blp.route("/devices/<device_id>", methods=["PATCH"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
@blp.arguments(schemas.DeviceUpdateIn)
@blp.response(200, schemas.DeviceOut)
def update_device(data: dict[str, Any], device_id: str) -> Any:
    device = get_owned(Device, device_id)
    clear_group = "group" in data and not data["group"]
    services.update_device(device, name=data.get("name"), group=data.get("group"),
                           tags=data.get("tags"),
                           end_user_ref=(data["end_user_ref"] or "")
                           if "end_user_ref" in data else None,
                           clear_group=clear_group)
    return _with_presence([device])[0]


def _status_route(action: str, doc: str) -> None:
    @blp.route(f"/devices/<device_id>/{action}", methods=["POST"], endpoint=f"{action}_device")
    @owned_resource(Device)
    @require(perm.FLEET_WRITE)
    @blp.response(200, schemas.DeviceOut)
    @blp.doc(summary=doc)
    def view(device_id: str) -> Any:
        device = get_owned(Device, device_id)
        if action == "activate":
            services.activate(device)
        elif action == "reset":
            services.reset(device)
        else:
            services.change_status(device, action)
        return _with_presence([device])[0]


_status_route("activate", "Activate a provisioned device (runs the activation hooks).")
_status_route("suspend", "Suspend a device: its broker access ends at once.")
_status_route("resume", "Resume a suspended device.")
_status_route("retire", "Retire a device for good; its credentials are revoked.")
_status_route("reset", "Reset: end user cleared, credentials revoked, memory deleted, "
                       "new activation required.")


@blp.route("/devices/<device_id>/transfer", methods=["POST"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
@blp.arguments(schemas.TransferIn)
@blp.response(200, schemas.DeviceOut)
def transfer_device(data: dict[str, Any], device_id: str) -> Any:
    """Hand the device to another end user; the previous user's memory is deleted."""
    device = services.transfer(get_owned(Device, device_id), data["end_user_ref"])
    return _with_presence([device])[0]


@blp.route("/devices/<device_id>/credentials", methods=["POST"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
@idempotent(redact=("mqtt",))
@blp.response(201, schemas.CredentialsOut)
def issue_credentials(device_id: str) -> Any:
    """Issue or rotate the device's MQTT password: shown in this answer only."""
    device = get_owned(Device, device_id)
    password = services.issue_credentials(device)
    return {"device_id": device.id, "mqtt": topics.connection_info(device, password)}


@blp.route("/devices/<device_id>/credentials", methods=["DELETE"])
@owned_resource(Device)
@require(perm.FLEET_WRITE)
@blp.response(204)
def revoke_credentials(device_id: str) -> None:
    """Revoke the MQTT password; a connected device is disconnected."""
    services.revoke_credentials(get_owned(Device, device_id))


@blp.route("/devices/<device_id>/events", methods=["GET"])
@owned_resource(Device)
@require(perm.FLEET_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.DeviceEventPage)
def device_events(args: dict[str, Any], device_id: str) -> Any:
    """The device's history: activations, resets, transfers, credentials, status changes."""
    device = get_owned(Device, device_id)
    stmt = select(DeviceEvent).where(DeviceEvent.device_id == device.id)
    return paginate(stmt, DeviceEvent.id, args, newest_first=True)


@blp.route("/fleet/summary", methods=["GET"])
@require(perm.FLEET_READ)
@blp.response(200, schemas.FleetSummaryOut)
def fleet_summary() -> Any:
    tenant_id = current_tenant_id()
    by_status = services.count_by_status(tenant_id)
    return {"total": sum(by_status.values()), "online": presence.online_count(tenant_id),
            "by_status": by_status}


# --- imports ------------------------------------------------------------------------------


@blp.route("/device-imports", methods=["POST"])
@require(perm.FLEET_WRITE)
@idempotent()
@blp.arguments(schemas.ImportIn, location="form_and_files")
@blp.response(201, schemas.ImportOut)
def create_import(args: dict[str, Any]) -> Any:
    """Import a CSV of devices, all or nothing; every bad row is reported with its line."""
    product = get_owned(Product, args["product_id"])
    upload = args["file"]
    with upload.stream:  # large uploads are spooled to a temporary file
        data = upload.read()
    return imports.import_devices(product, data, filename=upload.filename or "",
                                  issue_credentials=args["issue_credentials"],
                                  activate=args["activate"])


@blp.route("/device-imports", methods=["GET"])
@require(perm.FLEET_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.ImportPage)
def list_imports(args: dict[str, Any]) -> Any:
    return paginate(scoped(DeviceImport), DeviceImport.id, args, newest_first=True)


@blp.route("/device-imports/<import_id>", methods=["GET"])
@owned_resource(DeviceImport)
@require(perm.FLEET_READ)
@blp.response(200, schemas.ImportOut)
def get_import(import_id: str) -> Any:
    return get_owned(DeviceImport, import_id)


@blp.route("/device-imports/<import_id>/credentials.csv", methods=["POST"])
@owned_resource(DeviceImport)
@require(perm.FLEET_WRITE)
@blp.response(200, {"type": "string"}, content_type="text/csv")
def download_credentials(import_id: str) -> Any:
    """The one-time credentials file: the second download answers 410."""
    content = imports.take_credentials_file(get_owned(DeviceImport, import_id))
    return Response(content, mimetype="text/csv", headers={
        "Content-Disposition": f'attachment; filename="credentials-{import_id}.csv"',
        "Cache-Control": "no-store"})


# --- activation codes ---------------------------------------------------------------------


@blp.route("/activation-codes/claim", methods=["POST"])
@require(perm.FLEET_WRITE)
@blp.arguments(schemas.ClaimIn)
@blp.response(200, schemas.DeviceOut)
def claim_code(data: dict[str, Any]) -> Any:
    """Claim the 6-digit code a device shows: the device is activated for this tenant."""
    activation.check_claim_rate(current_tenant_id())
    device = activation.claim(current_tenant_id(), data["code"],
                              end_user_ref=data.get("end_user_ref"))
    return _with_presence([device])[0]
