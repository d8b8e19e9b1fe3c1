"""Operator commands (``flask --app app ...``): they commit for real, print clear errors and
exit non-zero on bad input."""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

import pytest
from sqlalchemy import func, select

from accounts import services
from accounts.cli import DEMO_EMAIL, DEMO_PASSWORD, DEMO_TENANT
from accounts.models import ApiToken, Membership, Role, Tenant, TenantStatus, User
from core.db import db
from tests.factories import PASSWORD, tenant_with_owner
from tests.support.processes import PROJECT_ROOT

pytestmark = pytest.mark.committed


@pytest.fixture
def cli(committed_app: Any) -> Any:
    runner = committed_app.test_cli_runner()

    def invoke(*args: str) -> Any:
        result = runner.invoke(args=list(args))
        db.session.expire_all()  # the command committed; read what it wrote
        return result

    return invoke


def count(model: Any, *where: Any) -> int:
    return db.session.execute(select(func.count()).select_from(model).where(*where)).scalar_one()


def test_create_admin(cli: Any) -> None:
    result = cli("create-admin", "--email", "Root@Example.com", "--password", PASSWORD,
                 "--name", "Root")
    assert result.exit_code == 0, result.output
    assert "root@example.com" in result.output
    user = services.get_user_by_email("root@example.com")
    assert user is not None and user.is_platform_admin and user.name == "Root"
    assert services.authenticate("root@example.com", PASSWORD).id == user.id


@pytest.mark.parametrize(("args", "message"), [
    (["--email", "not-an-email", "--password", PASSWORD], "email"),
    (["--email", "short@example.com", "--password", "short"], "password"),
])
def test_create_admin_refuses_bad_input(cli: Any, args: list[str], message: str) -> None:
    result = cli("create-admin", *args)
    assert result.exit_code != 0
    assert "validation_failed" in result.output and message in result.output
    assert count(User) == 0


def test_create_admin_twice_is_refused(cli: Any) -> None:
    assert cli("create-admin", "--email", "a@example.com", "--password", PASSWORD).exit_code == 0
    again = cli("create-admin", "--email", "a@example.com", "--password", PASSWORD)
    assert again.exit_code != 0
    assert "email_taken" in again.output
    assert count(User) == 1


def test_create_tenant_with_a_new_owner(cli: Any) -> None:
    result = cli("create-tenant", "--name", "Pearl River Toys", "--owner-email",
                 "boss@example.com", "--currency", "usd", "--timezone", "Asia/Hong_Kong")
    assert result.exit_code == 0, result.output
    password = re.search(r"owner password \(shown once\): (\S+)", result.output)
    assert password, result.output
    tenant = db.session.execute(select(Tenant)).scalar_one()
    assert (tenant.name, tenant.slug, tenant.currency, tenant.timezone) == (
        "Pearl River Toys", "pearl-river-toys", "USD", "Asia/Hong_Kong")
    assert tenant.slug in result.output
    owner = services.authenticate("boss@example.com", password.group(1))
    member = db.session.execute(select(Membership)).scalar_one()
    assert (member.tenant_id, member.user_id, member.role) == (tenant.id, owner.id, Role.OWNER)


def test_create_tenant_for_an_existing_user(cli: Any) -> None:
    assert cli("create-admin", "--email", "op@example.com", "--password", PASSWORD).exit_code == 0
    result = cli("create-tenant", "--name", "Second", "--owner-email", "op@example.com")
    assert result.exit_code == 0, result.output
    assert "shown once" not in result.output
    assert count(User) == 1 and count(Membership) == 1


@pytest.mark.parametrize(("option", "value", "field"), [
    ("--currency", "DOLLARS", "currency"), ("--timezone", "Moon/Base", "timezone")])
def test_create_tenant_refuses_bad_input(cli: Any, option: str, value: str, field: str) -> None:
    result = cli("create-tenant", "--name", "Bad", "--owner-email", "x@example.com",
                 option, value)
    assert result.exit_code != 0
    assert "validation_failed" in result.output and field in result.output
    assert count(Tenant) == 0 and count(User) == 0  # nothing half-created


def test_create_token_prints_a_working_token(cli: Any, committed_app: Any) -> None:
    setup = tenant_with_owner()
    result = cli("create-token", "--tenant", setup.tenant.slug, "--name", "ops", "--scope",
                 "write")
    assert result.exit_code == 0, result.output
    raw = result.output.strip()
    assert raw.startswith("ens_")
    client = committed_app.test_client()
    response = client.get("/api/v1/tenant", headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 200
    assert response.get_json()["id"] == str(setup.tenant.id)
    # By id as well as by slug; read is the default scope.
    by_id = cli("create-token", "--tenant", str(setup.tenant.id), "--name", "reader")
    assert by_id.exit_code == 0, by_id.output
    token = db.session.execute(select(ApiToken).where(ApiToken.name == "reader")).scalar_one()
    assert token.scope.value == "read"


@pytest.mark.parametrize("command", [
    ["create-token", "--name", "x", "--tenant"],
    ["suspend-tenant", "--reason", "x", "--tenant"],
    ["reactivate-tenant", "--tenant"],
])
@pytest.mark.parametrize("ref", ["no-such-tenant", "00000000-0000-7000-8000-000000000000"])
def test_unknown_tenant_is_refused(cli: Any, command: list[str], ref: str) -> None:
    result = cli(*command, ref)
    assert result.exit_code != 0
    assert f"no tenant with slug or id '{ref}'" in result.output


def test_suspend_and_reactivate_tenant(cli: Any, committed_app: Any) -> None:
    setup = tenant_with_owner()
    client = committed_app.test_client()
    result = cli("suspend-tenant", "--tenant", setup.tenant.slug, "--reason", "chargebacks")
    assert result.exit_code == 0, result.output
    tenant = db.session.get(Tenant, setup.tenant.id)
    assert tenant.status is TenantStatus.SUSPENDED and tenant.suspended_reason == "chargebacks"
    refused = client.get("/api/v1/tenant", headers=setup.headers)
    assert refused.status_code == 403
    assert refused.get_json()["error"]["code"] == "tenant_suspended"

    assert cli("reactivate-tenant", "--tenant", setup.tenant.slug).exit_code == 0
    assert client.get("/api/v1/tenant", headers=setup.headers).status_code == 200


def test_seed_demo_is_idempotent(cli: Any, committed_app: Any) -> None:
    first = cli("seed-demo")
    assert first.exit_code == 0, first.output
    assert DEMO_EMAIL in first.output and DEMO_PASSWORD in first.output
    token = re.search(r"demo API token \(shown once\): (\S+)", first.output)
    assert token, first.output

    second = cli("seed-demo")
    assert second.exit_code == 0, second.output
    assert "shown once" not in second.output
    assert count(Tenant, Tenant.name == DEMO_TENANT) == 1
    assert count(User, User.email == DEMO_EMAIL) == 1
    assert count(Membership) == 1 and count(ApiToken) == 1

    assert services.authenticate(DEMO_EMAIL, DEMO_PASSWORD).email == DEMO_EMAIL
    client = committed_app.test_client()
    headers = {"Authorization": f"Bearer {token.group(1)}"}
    response = client.get("/api/v1/tenant", headers=headers)
    assert response.get_json()["name"] == DEMO_TENANT
    # Something to sell on a fresh platform, once: a plan priced in the demo's CNY, a package.
    [plan] = client.get("/api/v1/billing/plans", headers=headers).get_json()["items"]
    assert plan["code"] == "companion-12m" and "CNY" in [p["currency"] for p in plan["prices"]]
    [offer] = client.get("/api/v1/billing/package-offers", headers=headers).get_json()["items"]
    ordered = client.post("/api/v1/billing/purchases/packages", headers=headers,
                          json={"offer_id": offer["id"], "quantity": 1})
    assert ordered.status_code == 201 and ordered.get_json()["amount_minor"] == 6500


def test_unreachable_database_fails_with_the_url_masked() -> None:
    password = "pw-that-must-not-leak"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENSOUL_", "REDIS_", "MQTT_"))}
    env.update({"DATABASE_URL": f"postgresql://postgres:{password}@127.0.0.1:1/nope",
                "SECRET_KEY": "x", "ENSOUL_ENCRYPTION_KEY": "x"})
    done = subprocess.run([str(PROJECT_ROOT / ".venv/bin/flask"), "--app", "app", "db-upgrade"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "postgresql://postgres:***@127.0.0.1:1/nope" in output, output
    assert password not in output
    assert "Traceback" not in output
