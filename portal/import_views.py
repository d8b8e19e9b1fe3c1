"""Factory provisioning by CSV: the upload, its row-error report, the import's summary with the
one-time credentials file, and the past imports."""

from __future__ import annotations

import uuid
from typing import Any

from flask import flash, make_response, redirect, render_template, request, url_for
from flask_babel import gettext as _
from sqlalchemy import Select
from sqlalchemy.orm import defer
from werkzeug.wrappers import Response

from accounts import permissions as perm
from accounts.auth import require
from core.db import db
from core.errors import EnsoulError, Gone, NotFound
from core.pagination import paginate
from core.tenancy import get_owned, owned_resource, scoped
from fleet import imports
from fleet.imports import ImportInvalid
from fleet.models import DeviceImport, Product
from portal.blueprint import bp
from portal.fleet_forms import ImportForm, product_choices
from portal.fleet_labels import fleet_message
from portal.fleet_views import tenant_products
from portal.labels import error_text

PAGE_SIZE = 25
SHOWN_BAD_LINES = 1000  # a report of 100,000 bad lines would not help anyone read it
# A multipart body carries the file and a little more (the boundary, the other fields).
UPLOAD_LIMIT = imports.MAX_BYTES + 64 * 1024


@bp.url_value_preprocessor
def _allow_large_uploads(endpoint: str | None, values: dict[str, Any] | None) -> None:
    # URL value preprocessors run before every before_request hook, CSRFProtect's included,
    # which reads (and so limits) the form first.
    if endpoint == "portal.create_import":
        request.max_content_length = UPLOAD_LIMIT


def _without_file() -> Select[Any]:
    """The tenant's imports without their credentials files, which may be megabytes each: a
    file is available while it was issued and not yet downloaded."""
    return scoped(DeviceImport).options(defer(DeviceImport.credentials_file_encrypted))


def _import_list() -> dict[str, Any]:
    cursor = request.args.get("cursor") or None
    page = paginate(_without_file(), DeviceImport.id, {"cursor": cursor, "limit": PAGE_SIZE},
                    newest_first=True)
    return {"batches": page["items"], "next_cursor": page["next_cursor"],
            "first_page": cursor is None}


def _report(error: EnsoulError) -> dict[str, Any]:
    """What the upload page shows for a refused file: the bad lines, or the file's problem."""
    rows = error.details.get("rows")
    if rows is None:
        message = (_("The file is too large: at most %(n)s devices and %(mib)d MiB.",
                     n=f"{imports.MAX_ROWS:,}", mib=imports.MAX_BYTES // (1024 * 1024))
                   if error.code == "too_large" else error_text(error))
        return {"message": message, "code": error.code, "line": error.details.get("line"),
                "missing": error.details.get("missing_columns") or [],
                "unknown": error.details.get("unknown_columns") or []}
    lines: dict[int, dict[str, list[str]]] = {}
    for row in rows:  # one line may be reported more than once (a duplicate serial and MAC)
        fields = lines.setdefault(row["line"], {})
        for field, messages in row["errors"].items():
            fields.setdefault(field, []).extend(fleet_message(m) for m in messages)
    shown = sorted(lines.items())[:SHOWN_BAD_LINES]
    return {"message": error_text(error), "code": error.code, "lines": shown,
            "bad_rows": len(lines), "hidden": max(len(lines) - SHOWN_BAD_LINES, 0)}


def _render(form: ImportForm, products: list[Product], *, report: dict[str, Any] | None = None,
            status: int = 200) -> tuple[str, int]:
    return render_template("fleet/imports.html", form=form, report=report,
                           products={p.id: p for p in products}, **_import_list()), status


def _form(products: list[Product], *, submitted: bool = True) -> ImportForm:
    form = ImportForm() if submitted else ImportForm(formdata=None)
    form.product_id.choices = product_choices(products)
    return form


@bp.route("/fleet/imports")
@require(perm.FLEET_READ)
def imports_page() -> tuple[str, int]:
    products = tenant_products()
    return _render(_form(products, submitted=False), products)


@bp.route("/fleet/imports", methods=["POST"])
@require(perm.FLEET_WRITE)
def create_import() -> Response | tuple[str, int]:
    products = tenant_products()
    form = _form(products)
    if not form.validate_on_submit():
        return _render(form, products, status=422)
    product = get_owned(Product, form.product_id.data)
    upload = form.file.data
    with upload.stream:  # large uploads are spooled to a temporary file
        data = upload.read()
    try:
        batch = imports.import_devices(product, data, filename=upload.filename or "",
                                       issue_credentials=form.issue_credentials.data,
                                       activate=form.activate.data)
    except ImportInvalid as exc:
        return _render(form, products, report=_report(exc), status=exc.http_status)
    except EnsoulError as exc:  # an activation hook refusing, for instance
        form.form_errors.append(error_text(exc))
        return _render(form, products, status=exc.http_status)
    flash(_("%(n)d devices imported.", n=batch.row_count), "success")
    return redirect(url_for("portal.device_import", import_id=batch.id))


@bp.route("/fleet/imports/<import_id>")
@owned_resource(DeviceImport)
@require(perm.FLEET_READ)
def device_import(import_id: str) -> str:
    try:
        key = uuid.UUID(import_id)
    except ValueError as exc:
        raise NotFound() from exc
    batch = db.session.execute(
        _without_file().where(DeviceImport.id == key)).scalar_one_or_none()
    if batch is None:
        raise NotFound("No such import.")
    return render_template("fleet/import.html", batch=batch,
                           product=db.session.get(Product, batch.product_id))


@bp.route("/fleet/imports/<import_id>/credentials.csv", methods=["POST"])
@owned_resource(DeviceImport)
@require(perm.FLEET_WRITE)
def download_credentials(import_id: str) -> Response | tuple[str, int]:
    """The one-time credentials file. A POST: a link prefetched or previewed must not take it."""
    batch = get_owned(DeviceImport, import_id)
    try:
        content = imports.take_credentials_file(batch)
    except Gone as exc:
        return render_template("fleet/credentials_gone.html", batch=batch, error=exc,
                               message=error_text(exc)), 410
    response = make_response(content)
    response.mimetype = "text/csv"
    response.headers["Content-Disposition"] = f'attachment; filename="credentials-{batch.id}.csv"'
    response.headers["Cache-Control"] = "no-store"
    return response
