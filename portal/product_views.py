"""Products: the list, creating and editing one, and its enrolment key, shown once."""

from __future__ import annotations

from typing import Any

from flask import current_app, flash, make_response, redirect, render_template, url_for
from flask_babel import gettext as _
from sqlalchemy import func, select
from werkzeug.wrappers import Response

from accounts import permissions as perm
from accounts.auth import require
from core.db import db
from core.errors import EnsoulError
from core.tenancy import current_tenant_id, get_owned, owned_resource, scoped
from fleet import services
from fleet.models import Device, HardwareKind, Product
from portal.blueprint import bp
from portal.fleet_forms import ProductEditForm, ProductForm, apply_fleet_error


def _render_list(form: ProductForm | None = None, status: int = 200) -> tuple[str, int]:
    products = db.session.execute(scoped(Product).order_by(Product.name)).scalars().all()
    device_counts: dict[Any, int] = {
        product_id: n for product_id, n in db.session.execute(
            select(Device.product_id, func.count()).where(Device.tenant_id == current_tenant_id())
            .group_by(Device.product_id))}
    return render_template("fleet/products.html", products=products, device_counts=device_counts,
                           form=form or ProductForm(formdata=None)), status


def _key_page(product: Product, key: str, created: bool) -> Response:
    """The enrolment key, once. Rendered, not redirected: it is never stored, not even in the
    session."""
    base = current_app.config["ENSOUL_BASE_URL"].rstrip("/")
    response = make_response(render_template("fleet/product_key.html", product=product, key=key,
                                             created=created, base_url=base))
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/fleet/products")
@require(perm.FLEET_READ)
def products() -> tuple[str, int]:
    return _render_list()


@bp.route("/fleet/products", methods=["POST"])
@require(perm.FLEET_WRITE)
def create_product() -> Response | tuple[str, int]:
    form = ProductForm()
    if not form.validate_on_submit():
        return _render_list(form, status=422)
    try:
        product, key = services.create_product(
            current_tenant_id(), form.name.data or "", HardwareKind(form.hardware_kind.data),
            description=form.description.data or "",
            requires_hardware_binding=form.requires_hardware_binding.data,
            allow_self_registration=form.allow_self_registration.data)
    except EnsoulError as exc:
        apply_fleet_error(form, exc)
        return _render_list(form, status=exc.http_status)
    return _key_page(product, key, created=True)


def _render_product(product: Product, form: ProductEditForm | None = None,
                    status: int = 200) -> tuple[str, int]:
    devices = db.session.execute(
        select(func.count()).select_from(Device)
        .where(Device.tenant_id == product.tenant_id, Device.product_id == product.id)
    ).scalar_one()
    return render_template("fleet/product.html", product=product, devices=devices,
                           form=form or ProductEditForm(formdata=None, obj=product)), status


@bp.route("/fleet/products/<product_id>")
@owned_resource(Product)
@require(perm.FLEET_READ)
def product(product_id: str) -> tuple[str, int]:
    return _render_product(get_owned(Product, product_id))


@bp.route("/fleet/products/<product_id>", methods=["POST"])
@owned_resource(Product)
@require(perm.FLEET_WRITE)
def update_product(product_id: str) -> Response | tuple[str, int]:
    found = get_owned(Product, product_id)
    form = ProductEditForm()
    if not form.validate_on_submit():
        return _render_product(found, form, status=422)
    try:
        services.update_product(found, name=form.name.data,
                                description=form.description.data or "",
                                requires_hardware_binding=form.requires_hardware_binding.data,
                                allow_self_registration=form.allow_self_registration.data)
    except EnsoulError as exc:
        apply_fleet_error(form, exc)
        return _render_product(found, form, status=exc.http_status)
    flash(_("The product “%(name)s” is saved.", name=found.name), "success")
    return redirect(url_for("portal.product", product_id=found.id))


@bp.route("/fleet/products/<product_id>/enrolment-key", methods=["POST"])
@owned_resource(Product)
@require(perm.FLEET_WRITE)
def rotate_enrolment_key(product_id: str) -> Response:
    found = get_owned(Product, product_id)
    return _key_page(found, services.rotate_enrolment_key(found), created=False)
