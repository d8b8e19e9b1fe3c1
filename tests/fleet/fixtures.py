"""Fleet fixtures for the registry, import and bootstrap tests (import them by name)."""

from __future__ import annotations

import io
from typing import Any, NamedTuple

import pytest
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from core.db import db
from fleet import services
from fleet.models import HardwareKind, Product
from tests.factories import TenantSetup, tenant_with_owner


class Vendor(NamedTuple):
    setup: TenantSetup
    product: Product
    enrolment_key: str

    @property
    def headers(self) -> dict[str, str]:
        return self.setup.headers


def make_vendor(**product_kwargs: Any) -> Vendor:
    setup = tenant_with_owner()
    product, key = services.create_product(setup.tenant.id, "Companion Bear", HardwareKind.TOY,
                                           **product_kwargs)
    db.session.commit()
    return Vendor(setup, product, key)


@pytest.fixture
def vendor(app: Any) -> Vendor:
    return make_vendor()


@pytest.fixture
def other_vendor(app: Any) -> Vendor:
    return make_vendor()


def upload(client: Any, vendor: Vendor, csv_text: str | bytes, **options: Any) -> Any:
    """POST a CSV as multipart. The body is encoded in memory: werkzeug's test client would
    spool a large one to a temporary file that it never closes."""
    data = csv_text.encode() if isinstance(csv_text, str) else csv_text
    form: dict[str, Any] = {"product_id": str(vendor.product.id),
                            "file": FileStorage(io.BytesIO(data), filename="devices.csv",
                                               content_type="text/csv")}
    form.update({k: "true" if v else "false" for k, v in options.items()})
    boundary, body = encode_multipart(form)
    return client.post("/api/v1/device-imports", data=body, headers=vendor.headers,
                       content_type=f"multipart/form-data; boundary={boundary}")
