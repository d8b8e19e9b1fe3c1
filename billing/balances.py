"""Live balances in Redis, kept equal to the ledger: loading, rebuild, reconciliation, expiry.

The invariant, per account: ``Redis = ledger balance - open reservations - settled events not
yet in the ledger`` (for an ``overage:`` account, which counts credits used, the same with the
signs turned). An allowance granted in Redis but not yet in the ledger (its first request is
still open) counts as granted. :func:`reconcile` checks it and, when asked, repairs an account
only while no reservation is open on the tenant and no event has been settled since the check
(a script checks both). :func:`rebuild` writes the state from Postgres after Redis lost it.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import orjson
from flask import current_app
from sqlalchemy import select

from accounts.services import get_tenant
from billing import ledger
from billing.enforcement import billing_keys
from billing.models import CreditPackage, EntryKind, LedgerEntry
from core.db import db, on_commit, utcnow
from core.redis import get_redis
from inference.usage import entry_data, usage_stream

log = logging.getLogger(__name__)

# Expired packages are closed this long after their expiry: every stream that could have
# reserved from one has ended (the request timeout) and been settled by then.
EXPIRY_MARGIN = dt.timedelta(minutes=10)
# Packages expired longer ago than this are left alone (closed long since, or forgotten).
EXPIRY_LOOKBACK = dt.timedelta(days=30)

# KEYS: acct, pkgs, grants, resv, usage stream; ARGV: last usage entry id seen ('' none),
#       JSON {account: credits} to set, JSON {package account: expiry} , JSON grants, replace
# Refuses (0) while a reservation is open or when an event was settled since the check.
WRITE = """
if redis.call('HLEN', KEYS[4]) > 0 then return 0 end
local last = ''
if redis.call('EXISTS', KEYS[5]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[5])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
if last ~= ARGV[1] then return 0 end
if ARGV[5] == '1' then redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) end
for account, credits in pairs(cjson.decode(ARGV[2])) do
  redis.call('HSET', KEYS[1], account, credits)
end
for account, expiry in pairs(cjson.decode(ARGV[3])) do
  redis.call('ZADD', KEYS[2], expiry, account)
end
for account, grant in pairs(cjson.decode(ARGV[4])) do
  redis.call('HSET', KEYS[3], account, grant)
end
return 1
"""

# KEYS: acct, pkgs; ARGV: package account. Closes it; 1 if Redis still had it.
CLOSE = """
local listed = redis.call('ZREM', KEYS[2], ARGV[1])
local held = redis.call('HDEL', KEYS[1], ARGV[1])
if listed + held > 0 then return 1 end
return 0
"""


def _keys(tenant_id: uuid.UUID | str) -> dict[str, str]:
    return billing_keys(current_app.config["ENSOUL_REDIS_PREFIX"], str(tenant_id))


def _epoch(moment: dt.datetime) -> int:
    return int(moment.replace(tzinfo=dt.UTC).timestamp()) if moment.tzinfo is None \
        else int(moment.timestamp())


def load_packages_after_commit(tenant_id: uuid.UUID, packages: list[CreditPackage]) -> None:
    """Make paid packages spendable once the purchase commits (the reconciler repairs a
    failure here)."""
    loaded = [(ledger.package_account(p.id), p.credits, _epoch(p.expires_at)) for p in packages]

    def load() -> None:
        k = _keys(tenant_id)
        try:
            pipe = get_redis().pipeline(transaction=True)
            for account, credits, expiry in loaded:
                pipe.hsetnx(k["acct"], account, credits)
                pipe.zadd(k["pkgs"], {account: expiry}, nx=True)
            pipe.execute()
        except Exception:
            log.exception("could not load packages of tenant %s into Redis", tenant_id)

    on_commit(load)


@dataclass(frozen=True, slots=True)
class State:
    """What Redis should hold for a tenant, from the ledger and what is still in flight."""

    accounts: dict[str, int]
    packages: dict[str, int]  # package account -> expiry
    grants: dict[str, int]
    last_entry: str  # the usage stream's last entry id when this was computed
    reserved: dict[str, int]
    held: dict[str, int]  # what Redis held then (read with the rest)


def _live_months(tenant_timezone: str, now: dt.datetime) -> set[str]:
    """This month and the previous one in the tenant's calendar: the months whose allowances
    a stream can still reserve from."""
    zone = ZoneInfo(tenant_timezone)
    return {ledger.month_of(now, zone), ledger.month_of(now - dt.timedelta(days=31), zone)}


def expected_state(tenant_id: uuid.UUID) -> State:
    redis = get_redis()
    k = _keys(tenant_id)
    stream = usage_stream(tenant_id)
    tenant = get_tenant(tenant_id)
    now = utcnow()
    months = _live_months(tenant.timezone, now)
    # Read Redis' in-flight parts first: an event settled after this read is also counted
    # either in the stream or in the ledger, never in neither.
    pipe = redis.pipeline(transaction=True)
    pipe.hgetall(k["resv"])
    if redis.exists(stream):
        pipe.xinfo_stream(stream)
    else:
        pipe.echo("")
    pipe.xrange(stream)
    pipe.hgetall(k["grants"])
    pipe.hgetall(k["acct"])
    raw_reservations, info, entries, redis_grants, raw_held = pipe.execute()
    held = {(a.decode() if isinstance(a, bytes) else a): int(v) for a, v in raw_held.items()}
    last_entry = info["last-generated-id"] if isinstance(info, dict) else ""
    last_entry = last_entry.decode() if isinstance(last_entry, bytes) else last_entry
    reserved: Counter[str] = Counter()
    for raw in raw_reservations.values():
        for account, credits in orjson.loads(raw).get("a", []):
            reserved[account] += int(credits)
    unwritten: Counter[str] = Counter()
    pending_grants: dict[str, int] = {}
    causes = {}
    for _, fields in entries:
        event = entry_data(fields)
        causes[f"{event['device_id']}:{event['request_id']}:{event['admitted_at_ms']}"] = event
    written = set(db.session.scalars(select(LedgerEntry.cause_id).where(
        LedgerEntry.tenant_id == tenant_id, LedgerEntry.cause_type == "usage_event",
        LedgerEntry.cause_id.in_(list(causes))))) if causes else set()
    for cause, event in causes.items():
        if cause in written:
            continue
        for account, credits in (event.get("credit_split") or {}).items():
            unwritten[account] += int(credits)
        pending_grants.update(event.get("grants") or {})
    balances = ledger.balances(tenant_id)
    granted = set(db.session.scalars(select(LedgerEntry.account).where(
        LedgerEntry.tenant_id == tenant_id, LedgerEntry.kind == EntryKind.GRANT,
        LedgerEntry.account.startswith("allowance:"))))
    grants = {(a.decode() if isinstance(a, bytes) else a): int(v) for a, v in redis_grants.items()}
    accounts: dict[str, int] = {}
    packages: dict[str, int] = {}
    closed = set(db.session.scalars(select(LedgerEntry.account).where(
        LedgerEntry.tenant_id == tenant_id, LedgerEntry.kind == EntryKind.EXPIRY,
        LedgerEntry.account.startswith("package:"))))
    # Packages not closed yet, past their expiry too: the expiry job closes them a little later.
    for package in db.session.scalars(select(CreditPackage).where(
            CreditPackage.tenant_id == tenant_id,
            CreditPackage.expires_at > now - EXPIRY_LOOKBACK)):
        account = ledger.package_account(package.id)
        if account in closed or (package.expires_at <= now and account not in held):
            continue
        packages[account] = _epoch(package.expires_at)
        accounts[account] = balances.get(account, 0) - reserved[account] - unwritten[account]
    allowance_accounts = {a for a in set(balances) | set(grants)
                          if a.startswith("allowance:") and a.rsplit(":", 1)[1] in months}
    for account in allowance_accounts:
        balance = balances.get(account, 0)
        if account not in granted:  # its grant reaches the ledger with its first event
            balance += grants.get(account, pending_grants.get(account, 0))
        accounts[account] = balance - reserved[account] - unwritten[account]
    for month in months:
        account = ledger.overage_account(month)
        used = -balances.get(account, 0) + reserved[account] + unwritten[account]
        if used or account in balances:
            accounts[account] = used
    for account in list(grants):
        if account not in allowance_accounts:
            del grants[account]
    for account in allowance_accounts:
        if account not in grants:
            grant = db.session.scalar(select(LedgerEntry.credits).where(
                LedgerEntry.tenant_id == tenant_id, LedgerEntry.account == account,
                LedgerEntry.kind == EntryKind.GRANT).limit(1))
            grants[account] = int(grant or 0)
    return State(accounts, packages, grants, last_entry, dict(reserved), held)


def _write(tenant_id: uuid.UUID, state: State, *, replace: bool) -> bool:
    k = _keys(tenant_id)
    return bool(get_redis().eval(
        WRITE, 5, k["acct"], k["pkgs"], k["grants"], k["resv"], usage_stream(tenant_id),
        state.last_entry, orjson.dumps(state.accounts), orjson.dumps(state.packages),
        orjson.dumps(state.grants), "1" if replace else "0"))


def rebuild(tenant_id: uuid.UUID) -> bool:
    """Write the tenant's billing state from Postgres (after Redis lost its data). Refused
    (``False``) while a reservation is open: run it again once streams ended."""
    return _write(tenant_id, expected_state(tenant_id), replace=True)


@dataclass(frozen=True, slots=True)
class Difference:
    account: str
    redis: int | None
    expected: int


def reconcile(tenant_id: uuid.UUID, *, repair: bool = False) -> tuple[list[Difference], bool]:
    """Compare Redis with the ledger; returns the differences and whether they were repaired.

    A request settled while the check reads Postgres can show as a difference for a moment,
    so a difference is reported only if a second check right after finds it too."""
    state, differences = _differences(tenant_id)
    if differences:
        first = {d.account for d in differences}
        state, differences = _differences(tenant_id)
        differences = [d for d in differences if d.account in first]
    if differences:
        log.warning("billing: tenant %s differs from the ledger on %d accounts: %s", tenant_id,
                    len(differences), ", ".join(f"{d.account} redis={d.redis} "
                                                f"ledger={d.expected}" for d in differences))
    repaired = False
    if differences and repair:
        fixes = State({d.account: d.expected for d in differences}, state.packages, {},
                      state.last_entry, state.reserved, state.held)
        repaired = _write(tenant_id, fixes, replace=False)
    return differences, repaired


def _differences(tenant_id: uuid.UUID) -> tuple[State, list[Difference]]:
    state = expected_state(tenant_id)
    held = state.held
    # Redis holds an account's free credits apart from what is reserved.
    differences = [Difference(account, held.get(account), expected)
                   for account, expected in sorted(state.accounts.items())
                   if held.get(account) != expected
                   and not (expected == 0 and account not in held)]
    for account in sorted(set(held) - set(state.accounts)):
        if account.startswith("package:") and held[account] != 0:
            differences.append(Difference(account, held[account], 0))
    return state, differences


def expire_packages(at: dt.datetime | None = None) -> int:
    """Close the packages that expired more than :data:`EXPIRY_MARGIN` ago: what they still
    held is forfeited and recorded as an ``expiry`` entry. Returns how many were closed."""
    moment = at or utcnow()
    closed = 0
    expired = list(db.session.scalars(select(CreditPackage).where(
        CreditPackage.expires_at <= moment - EXPIRY_MARGIN,
        CreditPackage.expires_at > moment - EXPIRY_LOOKBACK)))
    for package in expired:
        account = ledger.package_account(package.id)
        exists = db.session.scalar(select(LedgerEntry.id).where(
            LedgerEntry.tenant_id == package.tenant_id, LedgerEntry.account == account,
            LedgerEntry.kind == EntryKind.EXPIRY).limit(1))
        if exists is not None:
            continue
        if get_redis().xlen(usage_stream(package.tenant_id)):
            continue  # its last events are not in the ledger yet: next run
        k = _keys(package.tenant_id)
        was_open = bool(get_redis().eval(CLOSE, 2, k["acct"], k["pkgs"], account))
        left = ledger.balance(package.tenant_id, account)
        if left > 0:
            ledger.post(package.tenant_id, [ledger.Movement(
                account, EntryKind.EXPIRY, -left, "package_expiry", str(package.id))])
        if left > 0 or was_open:  # a used-up one is closed once, with nothing to record
            closed += 1
    db.session.flush()
    return closed


def rebuild_all() -> tuple[int, int]:
    """Every tenant's billing state from Postgres; returns (rebuilt, refused while busy)."""
    from accounts.models import Tenant

    done = busy = 0
    for tenant_id in list(db.session.scalars(select(Tenant.id))):
        if rebuild(tenant_id):
            done += 1
        else:
            busy += 1
    return done, busy


def prune_allowances(tenant_id: uuid.UUID) -> int:
    """Forget in Redis the allowances of months before the previous one (no stream can still
    reserve from them; their figures stay in the ledger). Returns how many were dropped."""
    from accounts.models import Tenant

    tenant = db.session.get(Tenant, tenant_id)
    if tenant is None:
        return 0
    keep = _live_months(tenant.timezone, utcnow())
    k = _keys(tenant_id)
    redis = get_redis()
    old = [account for account, _ in redis.hscan_iter(k["acct"], match="allowance:*")
           if (account.decode() if isinstance(account, bytes) else account).rsplit(":", 1)[1]
           not in keep]
    if old:
        pipe = redis.pipeline(transaction=True)
        pipe.hdel(k["acct"], *old)
        pipe.hdel(k["grants"], *old)
        pipe.execute()
    return len(old)
