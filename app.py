"""Ensoul's application factory; also the entry point of the ``flask --app app`` CLI."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask_wtf.csrf import CSRFProtect

from config import load_settings

csrf = CSRFProtect()


def create_app(config_override: dict[str, Any] | None = None) -> Flask:
    settings = load_settings(config_override)
    app = Flask(__name__, static_folder="portal/static", template_folder="portal/templates")
    app.config.update(settings)
    app.config.update(
        EMBEDDED=settings.embedded,
        MAX_CONTENT_LENGTH=settings["ENSOUL_MAX_BODY_BYTES"],
        SESSION_COOKIE_SECURE=settings["ENSOUL_COOKIE_SECURE"],
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=settings["ENSOUL_COOKIE_SECURE"],
        REMEMBER_COOKIE_HTTPONLY=True,
        PERMANENT_SESSION_LIFETIME=12 * 3600,
        WTF_CSRF_TIME_LIMIT=None,
        API_TITLE="Ensoul API",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api/v1",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL="/static/vendor/swagger-ui-dist/",
        JSON_SORT_KEYS=False,
        BABEL_TRANSLATION_DIRECTORIES=app.root_path + "/portal/translations",
    )

    from core import ratelimit, web
    from core.api import api
    from core.db import db
    from core.i18n import init_app as init_i18n
    from core.logging import configure_logging
    from core.redis import redis_ext

    if not app.testing and not settings.get("ENSOUL_SKIP_LOGGING"):
        configure_logging(settings["ENSOUL_LOG_JSON"], settings["ENSOUL_LOG_LEVEL"])
    db.init_app(app)
    redis_ext.init_app(app)
    web.init_app(app)  # first: the request id is set before any other hook can answer
    csrf.init_app(app)
    ratelimit.init_app(app)
    init_i18n(app)

    from accounts import auth

    auth.init_app(app)
    api.init_app(app)
    from billing import services as billing_services
    from inference import services as inference_services

    billing_services.init_app(app)
    inference_services.init_app(app)
    _register_blueprints(app)
    _register_cli(app)
    return app


def _register_blueprints(app: Flask) -> None:
    from accounts.api import blp as accounts_api
    from billing.api import blp as billing_api
    from billing.notifications_api import blp as billing_notifications_api
    from core.api import api
    from core.health import bp as health_bp
    from core.ratelimit import limit_api
    from fleet.api import blp as fleet_api
    from fleet.bootstrap_api import blp as bootstrap_bp
    from fleet.broker_access.http import bp as mqtt_hooks_bp
    from inference.api import blp as inference_api
    from portal.views import bp as portal_bp

    for blueprint in (accounts_api, fleet_api, inference_api, billing_api,
                      billing_notifications_api):
        limit_api(blueprint)
        csrf.exempt(blueprint)
        api.register_blueprint(blueprint)
    csrf.exempt(bootstrap_bp)
    api.register_blueprint(bootstrap_bp)
    # EMQX's authn/authz hooks: outside the REST API, authenticated by a shared secret.
    csrf.exempt(mqtt_hooks_bp)
    app.register_blueprint(mqtt_hooks_bp)
    app.register_blueprint(health_bp)
    app.register_blueprint(portal_bp)


def _register_cli(app: Flask) -> None:
    from accounts.cli import register as register_accounts_cli
    from core.cli import register as register_core_cli
    from processes import register as register_processes

    register_core_cli(app)
    register_accounts_cli(app)
    register_processes(app)
    from billing.cli import register as register_billing_cli
    from inference.cli import register as register_inference_cli

    register_inference_cli(app)
    register_billing_cli(app)
