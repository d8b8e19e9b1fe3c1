"""The device list: search and filters, keyset pages, live counts, bulk actions, CSV export and
adding one device."""

from __future__ import annotations

import uuid
from typing import Any

from flask import flash, jsonify, make_response, redirect, render_template, request, url_for
from flask.sansio.blueprints import BlueprintSetupState
from flask_babel import gettext as _
from sqlalchemy import Select
from sqlalchemy.orm import selectinload
from werkzeug.datastructures import MultiDict
from werkzeug.wrappers import Response

from accounts import permissions as perm
from accounts.auth import require
from core.db import db
from core.errors import EnsoulError
from core.pagination import paginate
from core.tenancy import current_tenant_id, get_owned, scoped
from fleet import imports, presence, services
from fleet.models import Device, Product
from portal.blueprint import bp
from portal.fleet_forms import (
    BulkActionForm,
    DeviceForm,
    DeviceSearchForm,
    apply_fleet_error,
    product_choices,
    split_tags,
)
from portal.fleet_labels import (
    BULK_ACTION_LABELS,
    COLUMN_LABELS,
    EVENT_LABELS,
    KIND_LABELS,
    STATUS_LABELS,
    STATUS_STYLES,
)
from portal.labels import ERROR_MESSAGES
from portal.login_session import safe_next

PAGE_SIZE = 50
FILTERS = ("q", "status", "product_id", "group", "tag", "firmware_version", "online")


@bp.record_once
def _fleet_labels(state: BlueprintSetupState) -> None:
    # Globals, not a context processor: the macros in fleet/_macros.html need them too.
    state.app.jinja_env.globals.update(
        status_label=STATUS_LABELS.get, status_style=STATUS_STYLES.get,
        kind_label=KIND_LABELS.get, event_label=EVENT_LABELS.get,
        column_label=COLUMN_LABELS.get)


def tenant_products() -> list[Product]:
    return list(db.session.execute(scoped(Product).order_by(Product.name)).scalars())


def _search(products: list[Product]) -> tuple[DeviceSearchForm, dict[str, Any] | None]:
    """The filter form from the query string, and the filters for ``search_devices`` (``None``
    when a filter is invalid)."""
    form = DeviceSearchForm(formdata=MultiDict(request.args))
    form.product_id.choices = product_choices(products, empty=_("Any product"))
    if not form.validate():
        return form, None
    product_id = None
    if form.product_id.data:
        try:
            product_id = uuid.UUID(form.product_id.data)
        except ValueError:
            form.product_id.errors.append(_("Not a product of yours."))
            return form, None
    online = {"yes": True, "no": False}.get(form.online.data or "")
    return form, {
        "q": form.q.data, "status": form.status.data or None, "product_id": product_id,
        "group": form.group.data, "tag": form.tag.data,
        "firmware_version": form.firmware_version.data, "online": online,
    }


def _matching(filters: dict[str, Any], online: set[str]) -> Select[Any]:
    return (services.search_devices(current_tenant_id(), filters, online)
            .options(selectinload(Device.tags)))


def filter_args() -> dict[str, str]:
    """The current filters as query arguments (for the next page, the export and coming
    back after a bulk action)."""
    return {k: v for k in FILTERS if (v := request.args.get(k, "").strip())}


@bp.route("/fleet")
@require(perm.FLEET_READ)
def fleet() -> Response:
    return redirect(url_for("portal.devices"))


@bp.route("/fleet/devices")
@require(perm.FLEET_READ)
def devices() -> tuple[str, int]:
    tenant_id = current_tenant_id()
    products = tenant_products()
    form, filters = _search(products)
    page: dict[str, Any] = {"items": [], "next_cursor": None}
    if filters is not None:
        wanted = presence.online_ids(tenant_id) if filters["online"] is not None else set()
        page = paginate(_matching(filters, wanted), Device.id,
                        {"cursor": request.args.get("cursor") or None, "limit": PAGE_SIZE})
    page_ids = [str(d.id) for d in page["items"]]
    online = {i for i, on in zip(page_ids, presence.online_flags(tenant_id, page_ids),
                                 strict=True) if on}
    by_status = services.count_by_status(tenant_id)
    return render_template(
        "fleet/devices.html", form=form, devices=page["items"], next_cursor=page["next_cursor"],
        first_page=not request.args.get("cursor"), filters=filter_args(), online=online,
        summary={"total": sum(by_status.values()), "online": presence.online_count(tenant_id),
                 "by_status": by_status},
        products={p.id: p for p in products}, bulk_form=BulkActionForm(formdata=None),
    ), 200 if filters is not None else 422


@bp.route("/fleet/summary.json")
@require(perm.FLEET_READ)
def fleet_summary() -> Response:
    """The counts at the top of the device list, polled by ``fleet.js``."""
    tenant_id = current_tenant_id()
    by_status = services.count_by_status(tenant_id)
    response = jsonify({"total": sum(by_status.values()),
                        "online": presence.online_count(tenant_id), "by_status": by_status})
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/fleet/devices/export.csv")
@require(perm.FLEET_READ)
def export_devices() -> Response | tuple[str, int]:
    """The devices matching the current filters, every page, as CSV (never with secrets)."""
    filters = _search(tenant_products())[1]
    if filters is None:
        return devices()
    online = presence.online_ids(current_tenant_id()) if filters["online"] is not None else set()
    stmt = _matching(filters, online).order_by(Device.id)
    response = make_response(imports.export_csv(list(db.session.execute(stmt).scalars())))
    response.mimetype = "text/csv"
    response.headers["Content-Disposition"] = 'attachment; filename="devices.csv"'
    return response


def _device_ids() -> tuple[list[uuid.UUID], dict[str, str]]:
    ids: list[uuid.UUID] = []
    malformed: dict[str, str] = {}
    for raw in request.form.getlist("device_ids"):
        try:
            ids.append(uuid.UUID(raw))
        except ValueError:
            malformed[raw[:40]] = "not_found"
    return ids, malformed


@bp.route("/fleet/devices/bulk", methods=["POST"])
@require(perm.FLEET_WRITE)
def bulk_devices() -> Response | tuple[str, int]:
    back = safe_next(request.form.get("next"), url_for("portal.devices"))
    form = BulkActionForm()
    ids, malformed = _device_ids()
    if not form.validate_on_submit():
        flash(_("Choose an action for the selected devices."), "warning")
        return redirect(back)
    if not ids and not malformed:
        flash(_("Select the devices first."), "warning")
        return redirect(back)
    action = form.action.data or ""
    result = services.bulk_action(current_tenant_id(), ids, action,
                                  (form.group.data or "").strip() or None)
    failed = {**result["failed"], **malformed}
    label = BULK_ACTION_LABELS[action]
    if not failed:
        flash(_("%(action)s: done for %(n)d devices.", action=label, n=len(result["changed"])),
              "success")
        return redirect(back)
    known = {str(d.id): d for d in db.session.execute(
        scoped(Device).where(Device.id.in_([uuid.UUID(i) for i in result["failed"]]))
    ).scalars()}
    return render_template("fleet/bulk_result.html", action=label, changed=result["changed"],
                           failed=failed, known=known, back=back, reason=_reason), 200


def _reason(code: str) -> str:
    """Why one device of a bulk action was not changed."""
    if code == "not_found":
        return _("Not a device of this organisation.")
    return str(ERROR_MESSAGES.get(code, code))


def _render_new(form: DeviceForm, products: list[Product], status: int = 200) -> tuple[str, int]:
    return render_template("fleet/device_new.html", form=form, has_products=bool(products)), status


def _device_form(products: list[Product], *, submitted: bool = True) -> DeviceForm:
    form = DeviceForm() if submitted else DeviceForm(formdata=None)
    form.product_id.choices = product_choices(products)
    return form


@bp.route("/fleet/devices/new")
@require(perm.FLEET_WRITE)
def new_device() -> tuple[str, int]:
    products = tenant_products()
    form = _device_form(products, submitted=False)
    form.product_id.data = request.args.get("product_id") or None
    return _render_new(form, products)


@bp.route("/fleet/devices", methods=["POST"])
@require(perm.FLEET_WRITE)
def create_device() -> Response | tuple[str, int]:
    products = tenant_products()
    form = _device_form(products)
    if not form.validate_on_submit():
        return _render_new(form, products, status=422)
    product = get_owned(Product, form.product_id.data)
    try:
        device = services.create_device(
            product, form.serial.data or "", mac=form.mac.data or None,
            name=form.name.data or "", group=form.group.data or None,
            tags=split_tags(form.tags.data), hardware_key=form.hardware_key.data or None,
            end_user_ref=(form.end_user_ref.data or "").strip() or None)
    except EnsoulError as exc:
        apply_fleet_error(form, exc)
        return _render_new(form, products, status=exc.http_status)
    flash(_("The device %(serial)s is registered.", serial=device.serial), "success")
    return redirect(url_for("portal.device", device_id=device.id))
