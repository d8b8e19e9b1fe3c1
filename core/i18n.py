"""Portal language (English, Simplified Chinese) and the tenant's time zone and currency."""

from __future__ import annotations

from flask import Flask, g, request, session
from flask_babel import Babel

LOCALES = ("en", "zh_Hans")
babel = Babel()


def select_locale() -> str:
    chosen = session.get("locale")
    if chosen in LOCALES:
        return chosen
    user = g.get("actor_user")
    if user is not None and user.locale in LOCALES:
        return str(user.locale)
    best = request.accept_languages.best_match(["en", "zh", "zh-CN", "zh-Hans"], default="en")
    return "zh_Hans" if best.startswith("zh") else "en"


def select_timezone() -> str:
    tenant = g.get("tenant")
    return tenant.timezone if tenant is not None else "UTC"


def init_app(app: Flask) -> None:
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", str(app.root_path) + "/translations")
    babel.init_app(app, locale_selector=select_locale, timezone_selector=select_timezone)
