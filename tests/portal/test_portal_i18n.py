"""Language from the session, the user's setting or the browser; money and time per tenant.

Needs the compiled catalogues (``pybabel compile -d portal/translations``, done by setup).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from accounts import services
from core.db import db
from tests.factories import tenant_with_owner
from tests.portal.helpers import login, post, text


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner(currency="CNY", timezone="Asia/Shanghai")


def test_browser_language_decides_for_anonymous_visitors(client: Any) -> None:
    assert "登录 Ensoul" in text(client.get("/login", headers={"Accept-Language": "zh-CN"}))
    assert "Log in to Ensoul" in text(client.get("/login", headers={"Accept-Language": "en"}))


def test_language_switcher_overrides_the_browser(client: Any) -> None:
    response = post(client, "/language", {"locale": "zh_Hans", "next": "/login"}, page="/login")
    assert response.status_code == 302 and response.headers["Location"] == "/login"
    page = text(client.get("/login", headers={"Accept-Language": "en"}))
    assert "登录 Ensoul" in page and '<html lang="zh-Hans">' in page
    post(client, "/language", {"locale": "en"}, page="/login")
    assert "Log in to Ensoul" in text(client.get("/login"))


def test_language_switch_refuses_unknown_locales_and_foreign_next(client: Any) -> None:
    assert post(client, "/language", {"locale": "xx"}, page="/login").status_code == 400
    response = post(client, "/language", {"locale": "en", "next": "https://evil.example/"},
                    page="/login")
    assert response.headers["Location"] == "/"


def test_chosen_language_survives_logging_in(client: Any, setup: Any) -> None:
    post(client, "/language", {"locale": "zh_Hans"}, page="/login")
    login(client, setup.owner.email)
    assert "团队" in text(client.get("/"))


def test_user_setting_applies_without_a_session_choice(client: Any, setup: Any) -> None:
    services.set_locale(setup.owner, "zh_Hans")
    db.session.commit()
    login(client, setup.owner.email)
    assert "概览" in text(client.get("/", headers={"Accept-Language": "en"}))


def test_form_errors_are_translated(client: Any, setup: Any) -> None:
    post(client, "/language", {"locale": "zh_Hans"}, page="/login")
    page = text(login(client, setup.owner.email, "not the password"))
    assert "邮箱或密码错误。" in page


def test_money_and_time_in_the_tenants_currency_and_zone(client: Any, setup: Any) -> None:
    login(client, setup.owner.email)
    page = text(client.get("/", headers={"Accept-Language": "en"}))
    assert "CN¥12,800.50" in page
    shanghai = dt.datetime.now(dt.timezone(dt.timedelta(hours=8)))
    assert f"{shanghai:%b} {shanghai.day}, {shanghai.year}" in page
    post(client, "/language", {"locale": "zh_Hans"}, page="/")
    assert "¥12,800.50" in text(client.get("/"))
