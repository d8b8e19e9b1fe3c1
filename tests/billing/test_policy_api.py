"""The overage policy and the package balances through the REST API, reaching the credit hook
through the devices' profiles."""

from __future__ import annotations

from typing import Any

import pytest

from billing import ledger
from tests.billing.credit import billed_tenant, buy_package

pytestmark = pytest.mark.usefixtures("committed_app")


def test_the_policy_defaults_to_no_overage_and_a_change_reaches_the_profiles(
        client: Any) -> None:
    billed = billed_tenant()
    headers = billed.headers
    assert client.get("/api/v1/billing/policy", headers=headers).get_json() == {
        "overage_allowed": False, "overage_cap_credits": None, "auto_renew": False,
        "postpaid_plan_id": None}
    assert billed.profile().licence["overage_limit"] == -1
    response = client.put("/api/v1/billing/policy", headers=headers,
                          json={"overage_allowed": True, "overage_cap_credits": 500})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["overage_cap_credits"] == 500
    assert billed.profile().licence["overage_limit"] == 500


@pytest.mark.parametrize("body", [{"overage_allowed": True, "overage_cap_credits": -1},
                                  {"overage_allowed": "maybe"}, {}])
def test_a_bad_policy_is_refused_with_the_error_shape(client: Any, body: dict[str, Any]
                                                      ) -> None:
    billed = billed_tenant()
    response = client.put("/api/v1/billing/policy",
                          headers=billed.headers, json=body)
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "validation_failed"


def test_packages_list_their_ledger_balance(client: Any) -> None:
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 250)
    body = client.get("/api/v1/billing/packages",
                      headers=billed.headers).get_json()
    [listed] = body["items"]
    assert listed["id"] == str(package.id)
    assert listed["credits"] == 250 and listed["balance"] == 250
    assert listed["expired"] is False
    assert ledger.balance(billed.tenant_id, ledger.package_account(package.id)) == 250
