"""Role and scope checks for every REST endpoint.

The API authenticates with tokens (scope read/write); portal sessions carry a member's role.
Both become permissions (``accounts.permissions``) that each endpoint checks with ``require``.
The endpoints and who may call them are tabled per domain in ``tests/<domain>/endpoints.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from accounts.models import Role, TokenScope
from accounts.permissions import ROLE_PERMISSIONS, SCOPE_PERMISSIONS
from tests.core.endpoints import (
    api_routes,
    endpoints,
    required_permissions,
    route_for,
    url_with_rows_of,
)
from tests.factories import auth, make_token, tenant_with_owner

KEYS = sorted(endpoints())
IDS = [f"{method} {rule}" for rule, method in KEYS]


def test_every_api_endpoint_is_in_a_table(app: Any) -> None:
    live = {route.key for route in api_routes(app)}
    missing = sorted(live - set(endpoints()))
    assert not missing, f"add these to ENDPOINTS in tests/<domain>/endpoints.py: {missing}"
    assert sorted(set(endpoints()) - live) == [], "the table lists endpoints the app lacks"


def test_every_api_endpoint_requires_its_permission(app: Any) -> None:
    wrong = {route.key: required_permissions(route.view) for route in api_routes(app)
             if route.key in endpoints()
             and required_permissions(route.view) != [endpoints()[route.key].permission]}
    assert not wrong, f"permission checks differ from the table: {wrong}"


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_roles_per_endpoint(key: tuple[str, str], role: Role) -> None:
    endpoint = endpoints()[key]
    allowed = endpoint.permission in ROLE_PERMISSIONS[role]
    assert allowed is (role in endpoint.roles)


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_read_token_reads_everything_and_writes_nothing(client: Any, mailbox: Any,
                                                        key: tuple[str, str]) -> None:
    setup = tenant_with_owner()
    _, reader = make_token(setup.tenant, TokenScope.READ)
    endpoint = endpoints()[key]
    route = route_for(client.application, key)
    url, _ = url_with_rows_of(route, setup.tenant)
    response = client.open(url, method=route.method, headers=auth(reader),
                           **endpoint.request(setup.tenant))
    if route.method == "GET":
        assert endpoint.permission in SCOPE_PERMISSIONS[TokenScope.READ]
        assert response.status_code == 200, response.get_data(as_text=True)[:500]
    else:
        assert response.status_code == 403, response.get_json()
        error = response.get_json()["error"]
        assert (error["code"], error["details"]) == (
            "forbidden", {"permission": endpoint.permission})


@pytest.mark.parametrize("key", KEYS, ids=IDS)
def test_write_token_may_call_everything(client: Any, mailbox: Any,
                                         key: tuple[str, str]) -> None:
    setup = tenant_with_owner()
    route = route_for(client.application, key)
    url, _ = url_with_rows_of(route, setup.tenant)
    response = client.open(url, method=route.method, headers=setup.headers,
                           **endpoints()[key].request(setup.tenant))
    assert 200 <= response.status_code < 300, response.get_data(as_text=True)[:500]


def test_scopes_grant_read_only_or_everything() -> None:
    assert all(p.endswith(":read") for p in SCOPE_PERMISSIONS[TokenScope.READ])
    assert SCOPE_PERMISSIONS[TokenScope.WRITE] == ROLE_PERMISSIONS[Role.OWNER]
