"""Tenant scoping in one place.

A request's tenant comes from its session or its API token (``accounts.auth`` sets it). Every
query of tenant-owned rows goes through :func:`scoped` or :func:`get_owned`; a row of another
tenant is simply not found, so it answers 404 and never leaks that it exists.
"""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from flask import g, has_request_context
from sqlalchemy import ForeignKey, Select, select
from sqlalchemy.orm import Mapped, declared_attr, mapped_column

from core.db import Base, db
from core.errors import NotFound, Unauthorized

T = TypeVar("T", bound=Base)


class TenantOwned:
    """Mixin for every row that belongs to one tenant."""

    @declared_attr
    def tenant_id(cls) -> Mapped[uuid.UUID]:  # noqa: N805 - declared_attr takes the class
        return mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)


def tenant_owned_models() -> list[type[Any]]:
    models: list[type[Any]] = [
        m.class_ for m in Base.registry.mappers if issubclass(m.class_, TenantOwned)
    ]
    return sorted(models, key=lambda cls: cls.__name__)


def set_current_tenant(tenant_id: uuid.UUID | None) -> None:
    g.tenant_id = tenant_id


def current_tenant_id() -> uuid.UUID:
    tenant_id = g.get("tenant_id") if has_request_context() else None
    if tenant_id is None:
        raise Unauthorized("No tenant is selected for this request.")
    return tenant_id


def scoped(model: type[T], tenant_id: uuid.UUID | None = None) -> Select[Any]:
    """``SELECT model`` restricted to the current (or given) tenant."""
    if not issubclass(model, TenantOwned):
        raise TypeError(f"{model.__name__} is not tenant-owned")
    tid = tenant_id if tenant_id is not None else current_tenant_id()
    return select(model).where(model.tenant_id == tid)  # type: ignore[attr-defined]


def get_owned(model: type[T], obj_id: Any, tenant_id: uuid.UUID | None = None) -> T:
    """The tenant's row with this id, or :class:`NotFound` (also for other tenants' rows)."""
    try:
        key = obj_id if isinstance(obj_id, uuid.UUID) else uuid.UUID(str(obj_id))
    except ValueError as exc:
        raise NotFound() from exc
    stmt = scoped(model, tenant_id).where(model.id == key)  # type: ignore[attr-defined]
    row: T | None = db.session.execute(stmt).scalar_one_or_none()
    if row is None:
        raise NotFound(f"No such {model.__name__.lower()}.")
    return row


def owned_resource(model: type[Base]) -> Any:
    """Mark a view that looks up one ``model`` row by id from its URL.

    The cross-tenant test finds every such view in the URL map and checks that another
    tenant's row answers 404, so a new resource type joins that test by being marked.
    """

    def decorator(view: Any) -> Any:
        view._owned_model = model
        return view

    return decorator
