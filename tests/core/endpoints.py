"""The REST API as a table, for the tests that walk every endpoint (roles, scopes, tenancy).

Each domain's test package describes its own endpoints in ``tests/<domain>/endpoints.py``:

- ``ENDPOINTS``: ``{(rule, method): Endpoint(permission, roles, body)}``, one row per endpoint;
- ``CREATORS``: ``{Model: create(tenant) -> row}`` for every model an endpoint looks up by id
  (views marked with ``core.tenancy.owned_resource``). A row made by a creator must be safe to
  change or delete while the tenant's owner stays.

The walking tests find endpoints in the app's URL map, so a new endpoint cannot hide: they fail,
naming it, until its domain's table has a row for it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flask import Flask

import tests
from accounts.auth import PUBLIC_API_PATHS, require
from accounts.models import Role
from core.api import API_PREFIX

ALL_ROLES = frozenset(Role)
IGNORED_METHODS = {"HEAD", "OPTIONS"}


@dataclass(frozen=True)
class Endpoint:
    permission: str
    roles: frozenset[Role]  # the roles whose members may call it (portal sessions)
    # A valid body, for methods that take one; ``body(tenant)`` when it must name the caller's
    # own rows (a product to add a device to, a code to claim).
    body: dict[str, Any] | Callable[[Any], dict[str, Any]] | None = None
    multipart: bool = False  # sent as a form; files as ``(stream, filename)``

    def request(self, tenant: Any) -> dict[str, Any]:
        """The test client's keyword arguments that send this endpoint's body as ``tenant``."""
        body = self.body(tenant) if callable(self.body) else self.body
        if self.multipart:
            return {"data": body, "content_type": "multipart/form-data"}
        return {"json": body}


def _domain_tables() -> list[Any]:
    modules = []
    for package in sorted(p.name for p in pkgutil.iter_modules(tests.__path__) if p.ispkg):
        try:
            modules.append(importlib.import_module(f"tests.{package}.endpoints"))
        except ModuleNotFoundError as exc:
            if exc.name != f"tests.{package}.endpoints":
                raise
    return modules


def _collect(name: str) -> dict[Any, Any]:
    merged: dict[Any, Any] = {}
    for module in _domain_tables():
        table = getattr(module, name, {})
        overlap = set(merged) & set(table)
        assert not overlap, f"{module.__name__}.{name} repeats {overlap}"
        merged.update(table)
    return merged


@functools.cache
def endpoints() -> dict[tuple[str, str], Endpoint]:
    return _collect("ENDPOINTS")


@functools.cache
def creators() -> dict[type, Callable[[Any], Any]]:
    return _collect("CREATORS")

_REQUIRE_CODE = require("probe")(lambda: None).__code__


def wrapper_chain(view: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """The view and every function it wraps (``functools.wraps`` sets ``__wrapped__``)."""
    current: Any = view
    while current is not None:
        yield current
        current = getattr(current, "__wrapped__", None)


def owned_model(view: Callable[..., Any]) -> type | None:
    """The model marked by ``core.tenancy.owned_resource`` anywhere on the view."""
    return next((f._owned_model for f in wrapper_chain(view) if hasattr(f, "_owned_model")),
                None)


def required_permissions(view: Callable[..., Any]) -> list[str]:
    """The permissions ``accounts.auth.require`` checks before the view runs."""
    return [inspect.getclosurevars(f).nonlocals["permission"] for f in wrapper_chain(view)
            if getattr(f, "__code__", None) is _REQUIRE_CODE]


@dataclass(frozen=True)
class Route:
    rule: str
    method: str
    view: Callable[..., Any]
    arguments: tuple[str, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.rule, self.method)

    @property
    def model(self) -> type | None:
        return owned_model(self.view)


def api_routes(app: Flask) -> list[Route]:
    """Every authenticated REST endpoint of the app, one per (rule, method)."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(API_PREFIX) or rule.rule.startswith(PUBLIC_API_PATHS):
            continue
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            routes.append(Route(rule.rule, method, app.view_functions[rule.endpoint],
                                tuple(sorted(rule.arguments))))
    return sorted(routes, key=lambda r: r.key)


def route_for(app: Flask, key: tuple[str, str]) -> Route:
    return next(r for r in api_routes(app) if r.key == key)


def url_for_rule(rule: str, values: dict[str, Any]) -> str:
    url = rule
    for name, value in values.items():
        url = url.replace(f"<{name}>", str(value))
    assert "<" not in url, f"no value for an argument of {rule}"
    return url


def url_with_rows_of(route: Route, tenant: Any) -> tuple[str, Any]:
    """The route's URL with its id argument filled by a new row of ``tenant`` (and the row)."""
    if not route.arguments:
        return route.rule, None
    assert len(route.arguments) == 1, f"{route.key}: one id argument expected"
    model = route.model
    assert model is not None, f"{route.key} takes an id but is not marked owned_resource"
    assert model in creators(), (
        f"add a creator for {model.__name__} to CREATORS in tests/<domain>/endpoints.py")
    row = creators()[model](tenant)
    return url_for_rule(route.rule, {route.arguments[0]: row.id}), row
