"""The Lua scripts that hold a tenant's live credit balances in Redis.

All of one tenant's billing keys carry its hash tag ``{t:<tenant>}`` (one Redis Cluster slot):

- ``billing:{t}:acct``  hash, account -> credits: what an allowance (``allowance:<device>:
  <YYYY-MM>``) or a package (``package:<id>``) still has free, or what overage has used this
  month (``overage:<YYYY-MM>``, counting up to the cap);
- ``billing:{t}:pkgs``  sorted set, package account -> expiry (epoch seconds);
- ``billing:{t}:grants`` hash, allowance account -> credits granted (for the ledger);
- ``billing:{t}:resv``  hash, stream id -> reservation: what was taken from which account, in
  burn order, the rate card that prices the stream and where an overshoot is taken from.

Only these scripts change them, so admit, extend and settle are atomic with each other.
``TAKE`` walks the burn order: the device's allowance, live packages by earliest expiry, then
overage when the tenant allows it, up to its cap.
"""

from __future__ import annotations

from inference.hook import SETTLED_TTL_SECONDS

TAKE = """
local function add(order, account, n)
  order[#order + 1] = {account, n}
end

-- Take up to `need` credits along the burn order; returns what was taken.
local function take(acct, pkgs, need, order, allowance, grant, overage, limit, now)
  local taken = 0
  if need <= 0 then return 0 end
  if allowance ~= '' then
    if grant >= 0 and redis.call('HSETNX', acct, allowance, grant) == 1 then
      redis.call('HSET', KEYS_GRANTS, allowance, grant)
    end
    local free = tonumber(redis.call('HGET', acct, allowance) or '0')
    local n = math.min(free, need)
    if n > 0 then
      redis.call('HINCRBY', acct, allowance, -n)
      add(order, allowance, n)
      taken = taken + n
    end
  end
  if taken < need then
    for _, package in ipairs(redis.call('ZRANGEBYSCORE', pkgs, '(' .. now, '+inf')) do
      local free = tonumber(redis.call('HGET', acct, package) or '0')
      local n = math.min(free, need - taken)
      if n > 0 then
        redis.call('HINCRBY', acct, package, -n)
        add(order, package, n)
        taken = taken + n
        if taken >= need then break end
      end
    end
  end
  if taken < need and limit >= 0 and overage ~= '' then
    local used = tonumber(redis.call('HGET', acct, overage) or '0')
    local n = math.min(limit - used, need - taken)
    if n > 0 then
      redis.call('HINCRBY', acct, overage, n)
      add(order, overage, n)
      taken = taken + n
    end
  end
  return taken
end

-- Give back `n` credits taken from `account` (an expired package's are forfeited).
local function give_back(acct, account, n)
  if n <= 0 then return end
  if string.sub(account, 1, 8) == 'overage:' then
    redis.call('HINCRBY', acct, account, -n)
  elseif redis.call('HEXISTS', acct, account) == 1 then
    redis.call('HINCRBY', acct, account, n)
  end
end
"""

# KEYS: inflight, streams, seen, rate, day, acct, pkgs, resv, grants
# ARGV: 1 device, 2 request id, 3 stream id, 4 in-flight record, 5 dedup ttl, 6 minute, 7 rpm,
#       8 concurrency, 9 day, 10 daily cap (0: none), 11 seconds left in the minute,
#       12 credits wanted, 13 credits needed at least, 14 allowance account ('' none),
#       15 allowance grant, 16 now (epoch s), 17 overage account, 18 overage limit (-1: none),
#       19 reservation header (JSON: rates, version, burn order for an overshoot)
ADMIT = """
local KEYS_GRANTS = KEYS[9]
""" + TAKE + """
local seen = KEYS[3] .. ':' .. ARGV[1] .. ':' .. ARGV[2]
if redis.call('EXISTS', seen) == 1 then return {'duplicate_request', 0, 0, 0} end
local rate = KEYS[4] .. ':' .. ARGV[1] .. ':' .. ARGV[6]
local count = tonumber(redis.call('GET', rate) or '0')
if count >= tonumber(ARGV[7]) then
  local refused = redis.call('INCR', rate .. ':refused')
  redis.call('EXPIRE', rate .. ':refused', 61)
  return {'rate_limited', refused, tonumber(ARGV[11]), 0}
end
local open = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if open >= tonumber(ARGV[8]) then return {'concurrency_limited', 0, 1, 0} end
local day = KEYS[5] .. ':' .. ARGV[1] .. ':' .. ARGV[9]
local cap = tonumber(ARGV[10])
if cap > 0 and tonumber(redis.call('GET', day) or '0') >= cap then
  return {'daily_cap_reached', 0, 0, 0}
end
local want = tonumber(ARGV[12])
local taken = 0
if want > 0 then
  local order = {}
  taken = take(KEYS[6], KEYS[7], want, order, ARGV[14], tonumber(ARGV[15]), ARGV[17],
               tonumber(ARGV[18]), ARGV[16])
  if taken < tonumber(ARGV[13]) then
    for _, part in ipairs(order) do give_back(KEYS[6], part[1], part[2]) end
    return {'quota_exhausted', 0, 0, 0}  -- answered every time (only rate_limited repeats drop)
  end
  local reservation = cjson.decode(ARGV[19])
  reservation['a'] = order
  redis.call('HSET', KEYS[8], ARGV[3], cjson.encode(reservation))
end
redis.call('SET', seen, ARGV[3], 'EX', ARGV[5])
redis.call('INCR', rate)
redis.call('EXPIRE', rate, 61)
redis.call('INCR', day)
redis.call('EXPIRE', day, 172800)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return {'ok', 0, 0, taken}
"""

# KEYS: acct, pkgs, resv, grants; ARGV: stream id, credits wanted, now (epoch s)
EXTEND = """
local KEYS_GRANTS = KEYS[4]
""" + TAKE + """
local raw = redis.call('HGET', KEYS[3], ARGV[1])
if not raw then return -1 end
local reservation = cjson.decode(raw)
local o = reservation['o']
local taken = take(KEYS[1], KEYS[2], tonumber(ARGV[2]), reservation['a'], o[1], o[2], o[3],
                   o[4], ARGV[3])
if taken > 0 then redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(reservation)) end
return taken
"""

# KEYS: inflight, streams, usage stream, acct, pkgs, resv, grants
# ARGV: stream id, device, event JSON, now (epoch s), the units in UNIT_NAMES order (5-10),
#       settler (11)
# Prices the units with the reservation's rate card (ceiling per block and metric), commits
# along the reservation, takes an overshoot along the burn order (what none of it covers is
# recorded as `overdraft`), gives the rest back and appends the event with its price beside it
# (entry fields `e`: the event as the broker encoded it, `p`: credits, credit_split, grants,
# rate_card_version; the writer merges them), so the event is never decoded here.
SETTLE = """
local KEYS_GRANTS = KEYS[7]
local SETTLED_TTL = """ + str(SETTLED_TTL_SECONDS) + """
""" + TAKE + """
local done = KEYS[1] .. ':settled:' .. ARGV[1]
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  -- this settler's own settle sent again after its answer was lost: the same answer
  local previous = redis.call('GET', done)
  if previous then
    local settler, price, split = string.match(previous, '^(.-)\\n(.-)\\n(.*)$')
    if settler == ARGV[11] then return {1, tonumber(price), split} end
  end
  return {0, 0}
end
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
local raw = redis.call('HGET', KEYS[6], ARGV[1])
if not raw then
  redis.call('SET', done, ARGV[11] .. '\\n0\\n{}', 'EX', SETTLED_TTL)
  redis.call('XADD', KEYS[3], '*', 'e', ARGV[3])
  return {1, 0}
end
redis.call('HDEL', KEYS[6], ARGV[1])
local reservation = cjson.decode(raw)
local units = {input_tokens = ARGV[5], output_tokens = ARGV[6], audio_in_ms = ARGV[7],
               audio_out_ms = ARGV[8], images = ARGV[9], tool_calls = ARGV[10]}
local price = 0
for metric, rate in pairs(reservation['r']) do
  local used = tonumber(units[metric] or 0)
  if used > 0 then price = price + math.ceil(used / rate[1]) * rate[2] end
end
local split = {}
local grants = {}
local left = price
for _, part in ipairs(reservation['a']) do
  local used = math.min(part[2], left)
  left = left - used
  if used > 0 then split[part[1]] = (split[part[1]] or 0) + used end
  give_back(KEYS[4], part[1], part[2] - used)
end
if left > 0 then
  local o = reservation['o']
  local order = {}
  left = left - take(KEYS[4], KEYS[5], left, order, o[1], o[2], o[3], o[4], ARGV[4])
  for _, part in ipairs(order) do split[part[1]] = (split[part[1]] or 0) + part[2] end
  if left > 0 then split['overdraft'] = left end
end
local has_grants = false
for account, _ in pairs(split) do
  if string.sub(account, 1, 10) == 'allowance:' then
    grants[account] = tonumber(redis.call('HGET', KEYS_GRANTS, account) or '0')
    has_grants = true
  end
end
local priced = {credits = price, rate_card_version = reservation['v']}
if next(split) ~= nil then priced['credit_split'] = split end
if has_grants then priced['grants'] = grants end
local encoded_split = cjson.encode(split)
redis.call('SET', done, ARGV[11] .. '\\n' .. price .. '\\n' .. encoded_split, 'EX', SETTLED_TTL)
redis.call('XADD', KEYS[3], '*', 'e', ARGV[3], 'p', cjson.encode(priced))
return {1, price, encoded_split}
"""
