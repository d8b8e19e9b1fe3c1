"""Account operations. Services flush; the request, job or CLI command commits."""

from __future__ import annotations

import datetime as dt
import re
import uuid
import zoneinfo

import marshmallow as ma
from babel.numbers import list_currencies
from flask import current_app
from sqlalchemy import func, select

from accounts import audit
from accounts.audit import current_actor_label as current_actor_label  # for other domains
from accounts.models import (
    ApiToken,
    Invitation,
    Membership,
    PasswordReset,
    Role,
    Tenant,
    TenantStatus,
    TokenScope,
    User,
)
from accounts.passwords import hash_password, needs_rehash, verify_password
from core.crypto import new_token, sha256_hex
from core.db import db, on_commit, utcnow
from core.errors import (
    Conflict,
    EnsoulError,
    Forbidden,
    Gone,
    NotFound,
    Unauthorized,
    ValidationFailed,
)
from core.mail import send_mail

record_audit = audit.record  # for other domains

TOKEN_PREFIX = "ens"  # noqa: S105 - a label, not a secret
_SLUG_RE = re.compile(r"[^a-z0-9]+")
CURRENCIES = frozenset(list_currencies())


class AccountLocked(EnsoulError):
    code, http_status, message = "account_locked", 429, "Too many failed logins; try later."


class TenantSuspended(EnsoulError):
    code, http_status, message = "tenant_suspended", 403, "This tenant is suspended."


# --- validation helpers -------------------------------------------------------------------


_email_rule = ma.validate.Email(error="Not a valid e-mail address.")


def normalize_email(email: str, field: str = "email") -> str:
    """The same rule as the API's ``format: email`` fields; internal domains are fine."""
    email = email.strip()
    try:
        _email_rule(email)
    except ma.ValidationError as exc:
        raise ValidationFailed(details={field: exc.messages}) from exc
    if len(email.split()) > 1 or any(ord(c) < 32 or ord(c) == 127 for c in email) \
            or len(email.splitlines()) > 1:  # what a mail header cannot carry
        raise ValidationFailed(details={field: ["Not a valid e-mail address."]})
    local, _, domain = email.rpartition("@")
    return f"{local}@{domain.lower()}".lower()


def check_currency(currency: str) -> str:
    code = currency.upper()
    if code not in CURRENCIES:
        raise ValidationFailed(details={"currency": ["Not an ISO 4217 currency code."]})
    return code


def check_timezone(name: str) -> str:
    if name not in zoneinfo.available_timezones():
        raise ValidationFailed(details={"timezone": ["Not an IANA time zone."]})
    return name


# --- tenants ------------------------------------------------------------------------------


def _unique_slug(name: str) -> str:
    base = _SLUG_RE.sub("-", name.lower()).strip("-")[:48] or "tenant"
    slug, n = base, 1
    while db.session.execute(select(Tenant.id).where(Tenant.slug == slug)).first():
        n += 1
        slug = f"{base}-{n}"
    return slug


def create_tenant(name: str, currency: str, timezone: str) -> Tenant:
    name = name.strip()
    if not name:
        raise ValidationFailed(details={"name": ["Must not be empty."]})
    tenant = Tenant(
        name=name,
        slug=_unique_slug(name),
        currency=check_currency(currency),
        timezone=check_timezone(timezone),
        status=TenantStatus.ACTIVE,
    )
    db.session.add(tenant)
    db.session.flush()
    audit.record("tenant.create", tenant_id=tenant.id, target=tenant,
                 details={"name": name, "currency": tenant.currency})
    return tenant


def update_tenant(
    tenant: Tenant,
    *,
    name: str | None = None,
    timezone: str | None = None,
    require_two_factor: bool | None = None,
) -> Tenant:
    changes: dict[str, object] = {}
    if name is not None and name.strip() and name.strip() != tenant.name:
        tenant.name = changes["name"] = name.strip()
    if timezone is not None and timezone != tenant.timezone:
        tenant.timezone = changes["timezone"] = check_timezone(timezone)
    if require_two_factor is not None and require_two_factor != tenant.require_two_factor:
        tenant.require_two_factor = changes["require_two_factor"] = require_two_factor
    if changes:
        audit.record("tenant.update", tenant_id=tenant.id, target=tenant, details=changes)
    db.session.flush()
    return tenant


def set_tenant_status(tenant: Tenant, status: TenantStatus, reason: str | None = None) -> Tenant:
    tenant.status = status
    tenant.suspended_reason = reason if status is TenantStatus.SUSPENDED else None
    audit.record(f"tenant.{'suspend' if status is TenantStatus.SUSPENDED else 'reactivate'}",
                 tenant_id=tenant.id, target=tenant, details={"reason": reason})
    db.session.flush()
    return tenant


def get_tenant(tenant_id: uuid.UUID) -> Tenant:
    tenant = db.session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("No such tenant.")
    return tenant


def ensure_tenant_active(tenant: Tenant) -> None:
    if tenant.status is not TenantStatus.ACTIVE:
        raise TenantSuspended()


# --- users and logins ---------------------------------------------------------------------


def get_user_by_email(email: str) -> User | None:
    return db.session.execute(
        select(User).where(User.email == email.strip().lower())
    ).scalar_one_or_none()


def create_user(email: str, password: str, name: str = "", *, platform_admin: bool = False) -> User:
    email = normalize_email(email)
    if get_user_by_email(email) is not None:
        raise Conflict("A user with this e-mail exists.", code="email_taken",
                       details={"email": ["Already registered."]})
    user = User(email=email, name=name.strip(), password_hash=hash_password(password),
                is_platform_admin=platform_admin)
    db.session.add(user)
    db.session.flush()
    audit.record("user.create", tenant_id=None, target=user,
                 details={"email": email, "platform_admin": platform_admin})
    return user


def ensure_not_locked(user: User, password: str | None = None) -> None:
    now = utcnow()
    if user.locked_until is not None and user.locked_until > now:
        if password is not None:
            verify_password(None, password)  # same cost as a real check
        raise AccountLocked(retry_after=int((user.locked_until - now).total_seconds()) + 1)


def register_failed_login(user: User) -> None:
    """Count a wrong password or second factor; lock the account after too many."""
    config = current_app.config
    user.failed_logins += 1
    if user.failed_logins >= config["ENSOUL_LOGIN_LOCKOUT_ATTEMPTS"]:
        minutes = config["ENSOUL_LOGIN_LOCKOUT_MINUTES"]
        user.locked_until = utcnow() + dt.timedelta(minutes=minutes)
        user.failed_logins = 0
        audit.record("user.lockout", tenant_id=None, target=user, actor_label=user.email)
    db.session.flush()


def authenticate(email: str, password: str) -> User:
    """The user for these credentials; counts failures and locks the account after too many."""
    user = get_user_by_email(email)
    if user is not None:
        ensure_not_locked(user, password)
    if user is None or not verify_password(user.password_hash, password):
        if user is not None:
            register_failed_login(user)
        raise Unauthorized("Wrong e-mail or password.", code="invalid_credentials")
    user.failed_logins = 0
    user.locked_until = None
    user.last_login_at = utcnow()
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    db.session.flush()
    return user


def change_own_password(user: User, current: str, new_password: str) -> None:
    """A user changing their password: the current one must be right (wrong ones count)."""
    ensure_not_locked(user, current)
    if not verify_password(user.password_hash, current):
        register_failed_login(user)
        raise Unauthorized("That is not your current password.", code="invalid_credentials",
                           details={"current": ["Not your current password."]})
    change_password(user, new_password)
    audit.record("user.password_change", tenant_id=None, target=user, actor_label=user.email)


def change_password(user: User, new_password: str) -> None:
    user.password_hash = hash_password(new_password)
    user.session_version += 1
    db.session.flush()


def set_locale(user: User, locale: str | None) -> None:
    if locale not in (None, "en", "zh_Hans"):
        raise ValidationFailed(details={"locale": ["Use en or zh_Hans."]})
    user.locale = locale
    db.session.flush()


# --- memberships --------------------------------------------------------------------------


def memberships_of(user: User) -> list[Membership]:
    return list(
        db.session.execute(
            select(Membership).join(Tenant).where(Membership.user_id == user.id)
            .order_by(Tenant.name)
        ).scalars()
    )


def membership(tenant_id: uuid.UUID, user_id: uuid.UUID) -> Membership | None:
    return db.session.execute(
        select(Membership).where(Membership.tenant_id == tenant_id, Membership.user_id == user_id)
    ).scalar_one_or_none()


def add_member(tenant: Tenant, user: User, role: Role) -> Membership:
    if membership(tenant.id, user.id) is not None:
        raise Conflict("Already a member of this tenant.", code="already_member")
    member = Membership(tenant_id=tenant.id, user_id=user.id, role=role)
    db.session.add(member)
    db.session.flush()
    audit.record("member.add", tenant_id=tenant.id, target=member,
                 details={"email": user.email, "role": role.value})
    return member


def _owners(tenant_id: uuid.UUID) -> int:
    return db.session.execute(
        select(func.count()).select_from(Membership)
        .where(Membership.tenant_id == tenant_id, Membership.role == Role.OWNER)
    ).scalar_one()


def change_role(member: Membership, role: Role) -> Membership:
    if member.role is Role.OWNER and role is not Role.OWNER and _owners(member.tenant_id) <= 1:
        raise Conflict("A tenant needs at least one owner.", code="last_owner")
    old = member.role
    member.role = role
    db.session.flush()
    audit.record("member.role_change", tenant_id=member.tenant_id, target=member,
                 details={"email": member.user.email, "from": old.value, "to": role.value})
    return member


def remove_member(member: Membership) -> None:
    if member.role is Role.OWNER and _owners(member.tenant_id) <= 1:
        raise Conflict("A tenant needs at least one owner.", code="last_owner")
    audit.record("member.remove", tenant_id=member.tenant_id, target=member,
                 details={"email": member.user.email, "role": member.role.value})
    db.session.delete(member)
    db.session.flush()


# --- invitations --------------------------------------------------------------------------


def invite(tenant: Tenant, email: str, role: Role, invited_by: User | None) -> Invitation:
    email = normalize_email(email)
    existing = get_user_by_email(email)
    if existing is not None and membership(tenant.id, existing.id) is not None:
        raise Conflict("This person is already a member.", code="already_member",
                       details={"email": ["Already a member."]})
    raw = new_token("inv")
    hours = current_app.config["ENSOUL_INVITATION_TTL_HOURS"]
    invitation = Invitation(
        tenant_id=tenant.id, email=email, role=role, token_hash=sha256_hex(raw),
        invited_by_id=invited_by.id if invited_by else None,
        expires_at=utcnow() + dt.timedelta(hours=hours),
    )
    db.session.add(invitation)
    db.session.flush()
    audit.record("invitation.create", tenant_id=tenant.id, target=invitation,
                 details={"email": email, "role": role.value})
    link = f"{current_app.config['ENSOUL_BASE_URL']}/invitations/{raw}"
    tenant_name = tenant.name
    on_commit(lambda: send_mail(
        email,
        f"You are invited to {tenant_name} on Ensoul",
        f"You have been invited to join {tenant_name} as {role.value}.\n\n"
        f"Accept the invitation within {hours} hours:\n{link}\n",
    ))
    return invitation


def invitation_by_token(raw: str) -> Invitation:
    invitation = db.session.execute(
        select(Invitation).where(Invitation.token_hash == sha256_hex(raw))
    ).scalar_one_or_none()
    if invitation is None or invitation.revoked_at is not None:
        raise Gone("This invitation is not valid.", code="invitation_invalid")
    if invitation.accepted_at is not None:
        raise Gone("This invitation was already accepted.", code="invitation_used")
    if invitation.expires_at <= utcnow():
        raise Gone("This invitation has expired.", code="invitation_expired")
    return invitation


def accept_invitation(raw: str, user: User | None, *, name: str = "",
                      password: str | None = None) -> Membership:
    """Join the tenant: as ``user`` when logged in, else as a new user with this password."""
    invitation = invitation_by_token(raw)
    if user is None:
        if get_user_by_email(invitation.email) is not None:
            raise Conflict("Log in first to accept this invitation.", code="login_required")
        user = create_user(invitation.email, password or "", name)
    elif user.email != invitation.email:
        raise Forbidden("This invitation is for another e-mail address.",
                        code="invitation_other_email")
    tenant = db.session.get(Tenant, invitation.tenant_id)
    assert tenant is not None
    invitation.accepted_at = utcnow()
    return add_member(tenant, user, invitation.role)


def revoke_invitation(invitation: Invitation) -> None:
    if invitation.revoked_at is not None:
        return
    invitation.revoked_at = utcnow()
    db.session.flush()
    audit.record("invitation.revoke", tenant_id=invitation.tenant_id, target=invitation,
                 details={"email": invitation.email})


# --- password reset -----------------------------------------------------------------------


def request_password_reset(email: str) -> None:
    """Mails a reset link if the address is known; answers the same either way."""
    user = get_user_by_email(email)
    if user is None:
        return
    raw = new_token("pwr")
    minutes = current_app.config["ENSOUL_PASSWORD_RESET_TTL_MINUTES"]
    db.session.add(PasswordReset(user_id=user.id, token_hash=sha256_hex(raw),
                                 expires_at=utcnow() + dt.timedelta(minutes=minutes)))
    db.session.flush()
    audit.record("user.password_reset_request", tenant_id=None, target=user,
                 actor_label=user.email)
    link = f"{current_app.config['ENSOUL_BASE_URL']}/password/reset/{raw}"
    to = user.email
    on_commit(lambda: send_mail(
        to, "Reset your Ensoul password",
        f"Someone asked to reset your password. The link works once, for {minutes} minutes:\n"
        f"{link}\n\nIf it was not you, ignore this mail.\n",
    ))


def password_reset_by_token(raw: str) -> PasswordReset:
    reset = db.session.execute(
        select(PasswordReset).where(PasswordReset.token_hash == sha256_hex(raw))
    ).scalar_one_or_none()
    if reset is None:
        raise Gone("This reset link is not valid.", code="reset_link_invalid")
    if reset.used_at is not None:
        raise Gone("This reset link was already used.", code="reset_link_used")
    if reset.expires_at <= utcnow():
        raise Gone("This reset link has expired.", code="reset_link_expired")
    return reset


def reset_password(raw: str, new_password: str) -> User:
    reset = password_reset_by_token(raw)
    user = db.session.get(User, reset.user_id)
    assert user is not None
    change_password(user, new_password)
    reset.used_at = utcnow()
    user.failed_logins = 0
    user.locked_until = None
    audit.record("user.password_reset", tenant_id=None, target=user, actor_label=user.email)
    db.session.flush()
    return user


# --- API tokens ---------------------------------------------------------------------------


def create_token(tenant: Tenant, name: str, scope: TokenScope,
                 created_by: User | None) -> tuple[ApiToken, str]:
    """A new token and its secret, which is shown once and stored only as SHA-256."""
    name = name.strip()
    if not name:
        raise ValidationFailed(details={"name": ["Must not be empty."]})
    raw = new_token(TOKEN_PREFIX)
    token = ApiToken(tenant_id=tenant.id, name=name, prefix=raw[:12], token_hash=sha256_hex(raw),
                     scope=scope, created_by_id=created_by.id if created_by else None)
    db.session.add(token)
    db.session.flush()
    audit.record("token.create", tenant_id=tenant.id, target=token,
                 details={"name": name, "scope": scope.value, "prefix": token.prefix})
    return token, raw


def authenticate_token(raw: str) -> ApiToken:
    token = db.session.execute(
        select(ApiToken).where(ApiToken.token_hash == sha256_hex(raw))
    ).scalar_one_or_none()
    if token is None or token.revoked_at is not None:
        raise Unauthorized("The API token is not valid.", code="invalid_token")
    tenant = db.session.get(Tenant, token.tenant_id)
    assert tenant is not None
    ensure_tenant_active(tenant)
    now = utcnow()
    # At most one write a minute per token, not one per request.
    if token.last_used_at is None or now - token.last_used_at > dt.timedelta(minutes=1):
        token.last_used_at = now
    return token


def revoke_token(token: ApiToken) -> ApiToken:
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        db.session.flush()
        audit.record("token.revoke", tenant_id=token.tenant_id, target=token,
                     details={"name": token.name, "prefix": token.prefix})
    return token
