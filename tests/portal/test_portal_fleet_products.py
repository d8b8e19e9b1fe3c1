"""Products pages: create (the enrolment key shown once), edit, rotate the key; roles; tenancy."""

from __future__ import annotations

import re
import uuid
from typing import Any

from sqlalchemy import select

from accounts.models import Role
from core.crypto import sha256_hex
from core.db import db
from fleet.models import HardwareKind, Product
from tests.fleet.fixtures import Vendor
from tests.portal.fleet_helpers import log_in_as, make_device
from tests.portal.helpers import post, text

KEY_RE = re.compile(r'data-testid="product-enrolment-key">([^<]+)<')


def bootstrap(client: Any, key: str) -> Any:
    mac = ":".join(f"{b:02x}" for b in uuid.uuid4().bytes[:6])
    return client.post("/bootstrap/ota/", json={"application": {"version": "1.0.0"}},
                       headers={"Enrolment-Key": key, "Device-Id": mac})


def test_list_shows_products_with_their_device_counts(client: Any, vendor: Vendor) -> None:
    make_device(vendor.product)
    make_device(vendor.product)
    log_in_as(client, vendor)
    page = text(client.get("/fleet/products"))
    row = re.search(r'data-testid="product-row" data-product-name="Companion Bear">(.*?)</tr>',
                    page, re.S)
    assert row and vendor.product.enrolment_key_prefix in row.group(1)
    assert f'href="/fleet/devices?product_id={vendor.product.id}">2<' in row.group(1)
    assert vendor.enrolment_key not in page
    assert 'data-testid="product-form"' in page


def test_create_shows_the_enrolment_key_once(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    response = post(client, "/fleet/products", {
        "name": "Smart Glasses S1", "hardware_kind": "glasses", "description": "First run",
        "requires_hardware_binding": "y", "allow_self_registration": ""}, page="/fleet/products")
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    key = KEY_RE.search(text(response))
    assert key
    raw = key.group(1).strip()
    product = db.session.execute(
        select(Product).where(Product.name == "Smart Glasses S1")).scalar_one()
    assert product.enrolment_key_hash == sha256_hex(raw)
    assert product.hardware_kind is HardwareKind.GLASSES and product.description == "First run"
    assert product.requires_hardware_binding and not product.allow_self_registration
    assert raw not in text(client.get("/fleet/products"))
    assert raw not in text(client.get(f"/fleet/products/{product.id}"))
    # Self-registration is off: the key is accepted, the unknown device is not.
    answer = bootstrap(client, raw)
    assert answer.status_code == 404 and answer.json["error"]["code"] == "device_unknown"


def test_create_refuses_a_taken_or_empty_name(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    taken = post(client, "/fleet/products", {"name": "Companion Bear", "hardware_kind": "toy"},
                 page="/fleet/products")
    assert taken.status_code == 409
    assert "Already used." in text(taken) and 'data-testid="product-enrolment-key"' not in text(
        taken)
    empty = post(client, "/fleet/products", {"name": "  ", "hardware_kind": "toy"},
                 page="/fleet/products")
    assert empty.status_code == 422
    nul = post(client, "/fleet/products", {"name": "Bad\x00name", "hardware_kind": "toy"},
               page="/fleet/products")
    assert nul.status_code == 422 and "control characters" in text(nul)
    assert db.session.execute(select(Product)).scalars().all() == [vendor.product]


def test_edit_a_product(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    url = f"/fleet/products/{vendor.product.id}"
    page = text(client.get(url))
    assert 'data-testid="product-edit-form"' in page and "Companion Bear" in page
    response = post(client, url, {"name": "Companion Bear 2", "description": "Second run",
                                  "allow_self_registration": "y"})
    assert response.status_code == 302 and response.headers["Location"] == url
    db.session.refresh(vendor.product)
    assert vendor.product.name == "Companion Bear 2"
    assert vendor.product.description == "Second run"
    assert not vendor.product.requires_hardware_binding
    assert vendor.product.allow_self_registration
    assert 'The product “Companion Bear 2” is saved.' in text(client.get(url))


def test_edit_refuses_another_products_name(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    post(client, "/fleet/products", {"name": "Capsule", "hardware_kind": "capsule"},
         page="/fleet/products")
    response = post(client, f"/fleet/products/{vendor.product.id}", {"name": "Capsule"})
    assert response.status_code == 409 and "Already used." in text(response)
    db.session.refresh(vendor.product)
    assert vendor.product.name == "Companion Bear"


def test_rotating_the_key_shows_the_new_one_once(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor)
    url = f"/fleet/products/{vendor.product.id}"
    assert 'data-testid="product-rotate-key"' in text(client.get(url))
    response = post(client, f"{url}/enrolment-key", page=url)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    key = KEY_RE.search(text(response))
    assert key
    new = key.group(1).strip()
    assert new != vendor.enrolment_key
    assert bootstrap(client, vendor.enrolment_key).status_code == 401
    assert bootstrap(client, new).status_code == 200
    assert new not in text(client.get(url))


def test_a_viewer_sees_products_but_changes_nothing(client: Any, vendor: Vendor) -> None:
    log_in_as(client, vendor, Role.VIEWER)
    url = f"/fleet/products/{vendor.product.id}"
    page = text(client.get("/fleet/products"))
    assert "Companion Bear" in page and 'data-testid="product-form"' not in page
    detail = text(client.get(url))
    assert 'data-testid="product-edit-form"' not in detail
    assert 'data-testid="product-rotate-key"' not in detail
    assert post(client, "/fleet/products", {"name": "Mine", "hardware_kind": "toy"},
                page="/fleet/products").status_code == 403
    assert post(client, url, {"name": "Mine"}, page="/fleet/products").status_code == 403
    assert post(client, f"{url}/enrolment-key", page="/fleet/products").status_code == 403
    db.session.refresh(vendor.product)
    assert vendor.product.name == "Companion Bear"


def test_another_tenants_product_is_not_found(client: Any, vendor: Vendor,
                                              other_vendor: Vendor) -> None:
    log_in_as(client, vendor)
    url = f"/fleet/products/{other_vendor.product.id}"
    assert client.get(url).status_code == 404
    assert post(client, url, {"name": "Taken over"}, page="/fleet/products").status_code == 404
    assert post(client, f"{url}/enrolment-key", page="/fleet/products").status_code == 404
    assert "Companion Bear" in text(client.get("/fleet/products"))  # only its own
    assert str(other_vendor.product.id) not in text(client.get("/fleet/products"))
    db.session.refresh(other_vendor.product)
    assert other_vendor.product.name == "Companion Bear"
    assert bootstrap(client, other_vendor.enrolment_key).status_code == 200
    assert client.get("/fleet/products/not-a-uuid").status_code == 404
