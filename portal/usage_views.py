"""The usage page: requests, credits and raw metered units per day of the last 30 (the
tenant's calendar days), per product, and each device's credits this month; and the same per
day, product and device as a streamed CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Response, render_template, request, stream_with_context
from flask_babel import gettext as _
from werkzeug.datastructures import MultiDict

from accounts import permissions as perm
from accounts.auth import current_tenant, require
from billing import reports, usage_report
from billing.models import METRICS
from core.tenancy import get_owned
from fleet.models import Device, Product
from portal.billing_forms import UsageFilterForm
from portal.blueprint import bp
from portal.fleet_forms import product_choices
from portal.fleet_views import tenant_products

DEVICES_LISTED = 100
CSV_FLUSH_ROWS = 500
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _filters() -> tuple[usage_report.Filters, Product | None, Device | None]:
    """The product and device in the query string, the tenant's own or a 404."""
    product_id = request.args.get("product_id") or None
    device_id = request.args.get("device_id") or None
    product = get_owned(Product, product_id) if product_id else None
    device = get_owned(Device, device_id) if device_id else None
    return (usage_report.Filters(product.id if product else None,
                                 device.id if device else None), product, device)


@bp.route("/billing/usage")
@require(perm.BILLING_READ)
def billing_usage() -> str:
    tenant = current_tenant()
    filters, product, device = _filters()
    window = reports.DayWindow.ending_today(tenant.timezone)
    days = usage_report.per_day(tenant.id, window, filters)
    total = usage_report.Totals(
        sum(t.requests for _day, t in days), sum(t.credits for _day, t in days),
        {m: sum(t.units[m] for _day, t in days) for m in METRICS})
    costs, costed = usage_report.device_costs(
        tenant.id, reports.month_start(tenant.timezone), filters=filters, limit=DEVICES_LISTED)
    form = UsageFilterForm(formdata=MultiDict(request.args))
    form.product_id.choices = product_choices(tenant_products(), empty=_("All products"))
    return render_template(
        "billing/usage.html", tenant=tenant, window=window, days=list(reversed(days)),
        total=total, products=usage_report.per_product(tenant.id, window, filters),
        costs=costs, costed=costed, product=product, device=device, form=form,
        metrics=METRICS, filters={k: v for k, v in request.args.items()
                                  if k in ("product_id", "device_id") and v})


def _cell(value: Any) -> Any:
    """Free text a spreadsheet would run as a formula starts with a quote instead."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return "" if value is None else value


def _csv(rows: Iterable[tuple[Any, ...]]) -> Iterator[str]:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(usage_report.CSV_COLUMNS)
    for count, row in enumerate(rows, 1):
        writer.writerow([_cell(value) for value in row])
        if count % CSV_FLUSH_ROWS == 0:
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    yield out.getvalue()


@bp.route("/billing/usage.csv")
@require(perm.BILLING_READ)
def billing_usage_csv() -> Response:
    """Per day, product and device, every row, streamed (the query runs as the body is sent)."""
    tenant = current_tenant()
    filters = _filters()[0]
    window = reports.DayWindow.ending_today(tenant.timezone)
    rows = usage_report.csv_rows(tenant.id, window, filters)
    name = f"usage-{tenant.slug}-{window.days[0]:%Y%m%d}-{window.days[-1]:%Y%m%d}.csv"
    return Response(stream_with_context(_csv(rows)), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})
