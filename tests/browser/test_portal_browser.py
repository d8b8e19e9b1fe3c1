"""The portal in a real browser: log in, switch language, invite a member, create and revoke a
token. Data is committed (the live server runs in other threads) and truncated afterwards."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from accounts import services
from accounts.models import ApiToken, Invitation, Role
from core.db import db

pytestmark = pytest.mark.browser

PASSWORD = "a long enough password"


@pytest.fixture
def owner(committed_app: Any) -> tuple[str, str]:
    user = services.create_user("owner@vendor.example", PASSWORD, "Olive Owner")
    tenant = services.create_tenant("Shenzhen Toys", "CNY", "Asia/Shanghai")
    services.add_member(tenant, user, Role.OWNER)
    db.session.commit()
    return user.email, tenant.name


def log_in(page: Page, base: str, email: str) -> None:
    page.goto(f"{base}/login")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("dashboard-tenant")).to_be_visible()


def test_log_in_and_switch_language(page: Page, live_server: str,
                                    owner: tuple[str, str]) -> None:
    email, tenant_name = owner
    page.goto(f"{live_server}/login")
    page.fill("#email", email)
    page.fill("#password", "wrong password!")
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("form-error")).to_be_visible()

    log_in(page, live_server, email)
    expect(page.get_by_test_id("dashboard-tenant")).to_contain_text(tenant_name)
    expect(page.locator("html")).to_have_attribute("lang", re.compile("^en"))

    page.get_by_test_id("language-zh_Hans").click()
    expect(page.locator("html")).to_have_attribute("lang", re.compile("^zh"))
    expect(page.get_by_test_id("language-switcher")).to_be_visible()
    assert "团队" in page.content()  # the team nav entry, from the zh_Hans catalogue

    page.get_by_test_id("language-en").click()
    expect(page.locator("html")).to_have_attribute("lang", re.compile("^en"))


def test_invite_a_member(page: Page, live_server: str, owner: tuple[str, str],
                         mailbox: Any) -> None:
    log_in(page, live_server, owner[0])
    page.goto(f"{live_server}/team")
    page.get_by_test_id("invite-email").fill("new.dev@vendor.example")
    page.get_by_test_id("invite-role").select_option("developer")
    page.get_by_test_id("invite-submit").click()
    row = page.locator('[data-testid="invitation-row"][data-email="new.dev@vendor.example"]')
    expect(row).to_be_visible()

    mail = mailbox.wait_for("new.dev@vendor.example")
    link = re.search(r"/invitations/\S+", mailbox.body(mail))
    assert link is not None
    invitation = db.session.query(Invitation).filter_by(email="new.dev@vendor.example").one()
    assert invitation.role is Role.DEVELOPER


def test_create_and_revoke_a_token(page: Page, live_server: str, owner: tuple[str, str]) -> None:
    log_in(page, live_server, owner[0])
    page.goto(f"{live_server}/tokens")
    page.get_by_test_id("token-name").fill("factory line 3")
    page.get_by_test_id("token-scope").select_option("write")
    page.get_by_test_id("token-submit").click()
    secret = page.get_by_test_id("token-secret")
    expect(secret).to_be_visible()
    raw = (secret.input_value() if secret.evaluate("e => e.tagName") == "INPUT"
           else secret.inner_text()).strip()
    assert raw.startswith("ens_")

    page.goto(f"{live_server}/tokens")
    assert raw not in page.content()  # shown once, never again
    row = page.locator('[data-testid="token-row"][data-token-name="factory line 3"]')
    expect(row).to_be_visible()
    row.get_by_test_id("token-revoke").click()
    expect(row.get_by_test_id("token-status")).to_contain_text(re.compile("revoked", re.I))

    db.session.expire_all()
    token = db.session.query(ApiToken).filter_by(name="factory line 3").one()
    assert token.revoked_at is not None
