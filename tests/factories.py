"""Factories for the accounts domain.

Every row is made through ``accounts.services`` so it carries what real rows carry (slugs,
hashed secrets, audit entries). The test is the transaction boundary, so each factory commits:
inside the ``app`` fixture that only releases a savepoint of the rolled-back outer transaction,
and it keeps a failing request's rollback from undoing the test's own setup.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

import factory

from accounts import services
from accounts.models import ApiToken, Invitation, Membership, Role, Tenant, TokenScope, User
from core.db import db

PASSWORD = "correct horse battery staple"


def _unique() -> str:
    return uuid.uuid4().hex[:8]


class _ServiceFactory(factory.Factory):
    """Builds the keyword arguments with factory_boy, then lets a service create the row."""

    class Meta:
        abstract = True

    @classmethod
    def _create(cls, model_class: type, *args: Any, **kwargs: Any) -> Any:
        row = cls._service(**kwargs)
        db.session.commit()
        return row

    @classmethod
    def _service(cls, **kwargs: Any) -> Any:
        raise NotImplementedError


class TenantFactory(_ServiceFactory):
    class Meta:
        model = Tenant

    name = factory.Sequence(lambda n: f"Vendor {n} {_unique()}")
    currency = "EUR"
    timezone = "Europe/Berlin"

    @classmethod
    def _service(cls, **kwargs: Any) -> Tenant:
        return services.create_tenant(kwargs["name"], kwargs["currency"], kwargs["timezone"])


class UserFactory(_ServiceFactory):
    class Meta:
        model = User

    email = factory.Sequence(lambda n: f"user{n}-{_unique()}@example.com")
    password = PASSWORD
    name = factory.Sequence(lambda n: f"User {n}")
    platform_admin = False

    @classmethod
    def _service(cls, **kwargs: Any) -> User:
        return services.create_user(kwargs["email"], kwargs["password"], kwargs["name"],
                                    platform_admin=kwargs["platform_admin"])


class MembershipFactory(_ServiceFactory):
    class Meta:
        model = Membership

    tenant = factory.SubFactory(TenantFactory)
    user = factory.SubFactory(UserFactory)
    role = Role.DEVELOPER

    @classmethod
    def _service(cls, **kwargs: Any) -> Membership:
        return services.add_member(kwargs["tenant"], kwargs["user"], kwargs["role"])


def make_token(tenant: Tenant, scope: TokenScope = TokenScope.WRITE, *, name: str | None = None,
               created_by: User | None = None) -> tuple[ApiToken, str]:
    """A token and its raw secret (the only time the secret exists)."""
    token, raw = services.create_token(tenant, name or f"token-{_unique()}", scope, created_by)
    db.session.commit()
    return token, raw


def make_invitation(tenant: Tenant, email: str | None = None, role: Role = Role.VIEWER,
                    invited_by: User | None = None) -> Invitation:
    """An invitation; its mail goes to the SMTP sink when this commits."""
    invitation = services.invite(tenant, email or f"invitee-{_unique()}@example.com", role,
                                 invited_by)
    db.session.commit()
    return invitation


class TenantSetup(NamedTuple):
    tenant: Tenant
    owner: User
    token: str  # raw secret of a write token

    @property
    def headers(self) -> dict[str, str]:
        return auth(self.token)


def tenant_with_owner(**tenant_kwargs: Any) -> TenantSetup:
    """A tenant, its owner and a raw write token: ``tenant, owner, token = tenant_with_owner()``."""
    tenant = TenantFactory(**tenant_kwargs)
    owner = UserFactory()
    MembershipFactory(tenant=tenant, user=owner, role=Role.OWNER)
    _, raw = make_token(tenant, TokenScope.WRITE, created_by=owner)
    return TenantSetup(tenant, owner, raw)


def auth(raw_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw_token}"}
