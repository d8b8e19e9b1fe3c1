"""REST endpoints of billing for tenants: the catalogue, purchases (pending until paid),
licence packs and a device's licence. Marking a purchase paid is a platform administrator's
(`flask --app app mark-purchase-paid`) until payment comes with the finance issue."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from flask import g
from sqlalchemy import select

from accounts import permissions as perm
from accounts.auth import current_tenant, require
from billing import costs, ledger, licences, policy, postpaid, purchases, schemas
from billing.models import (
    CreditPackage,
    DeviceLicence,
    LicencePack,
    PackageOffer,
    Plan,
    Purchase,
)
from core.api import api_blueprint
from core.db import utcnow
from core.idempotency import idempotent
from core.pagination import PageArgsSchema, paginate
from core.tenancy import get_owned, owned_resource, scoped
from fleet.models import Device

blp = api_blueprint("billing_api", __name__, "",
                    description="Plans, packages, purchases, licence seats")


@blp.route("/billing/plans", methods=["GET"])
@require(perm.BILLING_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.PlanPage)
def list_plans(args: dict[str, Any]) -> Any:
    """The licence plans on sale, with their prices per currency."""
    return paginate(select(Plan).where(Plan.active.is_(True)), Plan.id, args)


@blp.route("/billing/package-offers", methods=["GET"])
@require(perm.BILLING_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.PackageOfferPage)
def list_package_offers(args: dict[str, Any]) -> Any:
    """The prepaid credit packages on sale."""
    return paginate(select(PackageOffer).where(PackageOffer.active.is_(True)),
                    PackageOffer.id, args)


@blp.route("/billing/purchases", methods=["GET"])
@require(perm.BILLING_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.PurchasePage)
def list_purchases(args: dict[str, Any]) -> Any:
    """Newest first."""
    return paginate(scoped(Purchase), Purchase.id, args, newest_first=True)


@blp.route("/billing/purchases/licence-packs", methods=["POST"])
@require(perm.BILLING_WRITE)
@idempotent()
@blp.arguments(schemas.PackOrderIn)
@blp.response(201, schemas.PurchaseOut)
def order_licence_pack(data: dict[str, Any]) -> Any:
    """Order seats of a plan in the tenant's currency, at the catalogue's price. The purchase
    is `pending` until paid; send an `Idempotency-Key` to retry safely."""
    tenant = current_tenant()
    return purchases.order_pack(tenant.id, tenant.currency, data["plan_id"], data["quantity"],
                                user_id=_user_id())


@blp.route("/billing/purchases/packages", methods=["POST"])
@require(perm.BILLING_WRITE)
@idempotent()
@blp.arguments(schemas.PackageOrderIn)
@blp.response(201, schemas.PurchaseOut)
def order_package(data: dict[str, Any]) -> Any:
    """Order prepaid credit packages in the tenant's currency; `pending` until paid."""
    tenant = current_tenant()
    return purchases.order_package(tenant.id, tenant.currency, data["offer_id"],
                                   data["quantity"], user_id=_user_id())


def _user_id() -> Any:
    user = g.get("actor_user")
    return user.id if user is not None else None


@blp.route("/billing/purchases/<purchase_id>", methods=["GET"])
@owned_resource(Purchase)
@require(perm.BILLING_READ)
@blp.response(200, schemas.PurchaseOut)
def get_purchase(purchase_id: str) -> Any:
    return get_owned(Purchase, purchase_id)


@blp.route("/billing/purchases/<purchase_id>/cancel", methods=["POST"])
@owned_resource(Purchase)
@require(perm.BILLING_WRITE)
@blp.response(200, schemas.PurchaseOut)
def cancel_purchase(purchase_id: str) -> Any:
    """Only a pending purchase can be cancelled (409 otherwise)."""
    purchase = get_owned(Purchase, purchase_id)
    purchases.cancel(purchase)
    return purchase


@blp.route("/billing/licence-packs", methods=["GET"])
@require(perm.BILLING_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.LicencePackPage)
def list_licence_packs(args: dict[str, Any]) -> Any:
    """Seats bought, used and free, per pack."""
    return paginate(scoped(LicencePack), LicencePack.id, args)


@blp.route("/devices/<device_id>/licence", methods=["GET"])
@owned_resource(Device)
@require(perm.BILLING_READ)
@blp.response(200, schemas.DeviceLicenceOut)
def device_licence(device_id: str) -> Any:
    """The seat the device holds now (in its term or grace), if any."""
    device = get_owned(Device, device_id)
    return _licence_out(licences.current_licence(device.id))


def _licence_out(licence: DeviceLicence | None) -> dict[str, Any]:
    if licence is None:
        return {"licensed": False, "plan_id": None, "pack_id": None, "starts_at": None,
                "ends_at": None, "grace_ends_at": None}
    return {"licensed": True, "plan_id": licence.plan_id, "pack_id": licence.pack_id,
            "starts_at": licence.starts_at, "ends_at": licence.ends_at,
            "grace_ends_at": licence.grace_ends_at}

@blp.route("/billing/packages", methods=["GET"])
@require(perm.BILLING_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, schemas.PackagePage)
def list_packages(args: dict[str, Any]) -> Any:
    """The tenant's credit packages with what the ledger says is left, newest first."""
    page = paginate(scoped(CreditPackage), CreditPackage.id, args, newest_first=True)
    tenant = current_tenant()
    now = utcnow()
    balances = ledger.balances(tenant.id, "package:")
    page["items"] = [{"id": p.id, "name": p.name, "purchase_id": p.purchase_id,
                      "credits": p.credits,
                      "balance": balances.get(ledger.package_account(p.id), 0),
                      "starts_at": p.starts_at, "expires_at": p.expires_at,
                      "expired": p.expires_at <= now} for p in page["items"]]
    return page


@blp.route("/billing/policy", methods=["GET"])
@require(perm.BILLING_READ)
@blp.response(200, schemas.PolicyOut)
def get_policy() -> Any:
    return policy.get_policy(current_tenant().id)


@blp.route("/billing/policy", methods=["PUT"])
@require(perm.BILLING_WRITE)
@blp.arguments(schemas.PolicyIn)
@blp.response(200, schemas.PolicyOut)
def put_policy(data: dict[str, Any]) -> Any:
    """Overage and its monthly cap take effect on the devices' next requests."""
    return policy.set_policy(current_tenant().id, **data)


@blp.route("/devices/<device_id>/licence/renew", methods=["POST"])
@owned_resource(Device)
@require(perm.BILLING_WRITE)
@blp.response(201, schemas.DeviceLicenceOut)
def renew_licence(device_id: str) -> Any:
    """A new seat for the device, starting where its live licence ends (or now, when it has
    none). `409` without a free seat, or when a renewal is already waiting."""
    device = get_owned(Device, device_id)
    return _licence_out(licences.renew(device.tenant_id, device.id))


@blp.route("/devices/<device_id>/cost", methods=["GET"])
@owned_resource(Device)
@require(perm.BILLING_READ)
@blp.response(200, schemas.DeviceCostOut)
def device_cost(device_id: str) -> Any:
    """Credits this month, their money value and the forecast to month end."""
    device = get_owned(Device, device_id)
    tenant = current_tenant()
    return costs.device_cost(device.id, tenant.timezone, tenant.currency)


@blp.route("/billing/statement", methods=["GET"])
@require(perm.BILLING_READ)
@blp.arguments(schemas.StatementArgs, location="query")
@blp.response(200, schemas.StatementOut)
def month_statement(args: dict[str, Any]) -> Any:
    """What a month (`?month=YYYY-MM`, the tenant's calendar; default this month, so far)
    bills in arrears: postpaid device-days and overage."""
    tenant = current_tenant()
    month = args.get("month") or ledger.month_of(utcnow(), ZoneInfo(tenant.timezone))
    return postpaid.statement(tenant.id, month, tenant.timezone, tenant.currency)
