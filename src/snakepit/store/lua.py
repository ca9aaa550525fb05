"""The Lua scripts behind every Redis store operation; each runs atomically inside Redis.

Keys of one session (``{sid}`` is a Redis Cluster hash tag, so they share a slot):
  ``P:{sid}``    hash  c created ms, a accessed ms, t ttl ms, w worker, m metadata JSON,
                       q number of the last change put in the stream, l watcher lease (ms),
                       u last write (ms), x most variables, y most bytes of values (limits
                       fixed at creation; 0 or absent: none), b bytes of values held
  ``P:{sid}:v``  hash  per variable NAME: d:NAME declaration, v:NAME value (codec bytes),
                       s:NAME "version:created_ms:updated_ms"
  ``P:{sid}:w``  stream of changes, written only while a watcher holds the lease
  ``P:{sid}:o``  sorted set of recent write ids (score: ms), so a retried write that had been
                       applied is not applied twice
  ``P:sessions`` sorted set sid -> expiry ms, to count and list live sessions
  ``P:sessions:PRINCIPAL`` set of the session hash keys of an authenticated principal's
                       sessions (ids ``PRINCIPAL/ID``), to bound what one caller holds; expired
                       members are removed only when the set reaches its limit
KEYS[1] is ``P:{sid}`` and KEYS[2] the index; the other three are derived from KEYS[1] (same
hash slot), which keeps every call two arguments shorter. ARGV[1] is always the session id.
Every script slides the session keys' TTL together and answers ``{status, ...}``; statuses other
than "ok" are refusals the Python side turns into errors. Time is Redis's own clock (TIME), so
clients with skewed clocks agree on expiry.
"""

from __future__ import annotations

PRELUDE = r"""
local SK, IX = KEYS[1], KEYS[2]
local VK, WK, OK = SK .. ':v', SK .. ':w', SK .. ':o'
local SID = ARGV[1]
local T = redis.call('TIME')
local NOW = tonumber(T[1]) * 1000 + math.floor(tonumber(T[2]) / 1000)

local function int(n) return string.format('%.0f', n) end

-- The set of the session's principal (ids PRINCIPAL/ID); nil for an anonymous (bare) id.
local function principal_key()
  local slash = string.find(SID, '/', 1, true)
  if not slash then return nil end
  return IX .. ':' .. string.sub(SID, 1, slash - 1)
end

local LEASE = 0
local ACCESSED = 0

-- The session's TTL in ms (nil when it does not exist); notes whether a watcher holds the lease
-- and when the session's expiry last slid.
local function session_ttl()
  local f = redis.call('HMGET', SK, 't', 'l', 'a')
  if not f[1] then return nil end
  LEASE = tonumber(f[2] or '0')
  ACCESSED = tonumber(f[3] or '0')
  return tonumber(f[1])
end

local WROTE = false

local function touch(ttl)
  if WROTE then
    redis.call('HSET', SK, 'a', int(NOW), 'u', int(NOW))
    redis.call('PEXPIRE', OK, ttl)
  else
    redis.call('HSET', SK, 'a', int(NOW))
  end
  redis.call('PEXPIRE', SK, ttl)
  redis.call('PEXPIRE', VK, ttl)
  if LEASE >= NOW then redis.call('PEXPIRE', WK, ttl) end
  redis.call('ZADD', IX, int(NOW + ttl), SID)
end

-- Slide the TTL and answer: every exit of a script that found its session goes through here.
local function done(ttl, reply)
  touch(ttl)
  return reply
end

-- Reads slide the TTL too, but at most once per min(1 s, ttl/100): a read then writes nothing,
-- and the session may expire that much early. Writes always slide (they may create keys).
local function touch_read(ttl)
  if NOW - ACCESSED >= math.min(1000, ttl / 100) then touch(ttl) end
end

local function info()
  local f = redis.call('HMGET', SK, 'c', 'a', 't', 'w', 'm')
  f[6] = redis.call('HLEN', VK)
  return f
end

local function seen(opid)
  return redis.call('ZSCORE', OK, opid)
end

local function remember(opid, window)
  WROTE = true
  if redis.call('ZADD', OK, int(NOW), opid) == 1 and redis.call('ZCARD', OK) % 64 == 0 then
    redis.call('ZREMRANGEBYSCORE', OK, '-inf', '(' .. int(NOW - window))
  end
end

-- Put a change in the stream when someone watches; unwatched sessions cost nothing here.
local function emit(maxlen, ...)
  if LEASE >= NOW then
    local q = redis.call('HINCRBY', SK, 'q', 1)
    redis.call('XADD', WK, 'MAXLEN', '~', maxlen, '*', 'q', q, ...)
  end
end

-- Whether writing values of lengths LENS[i] to NAMES[i] keeps the session within its limits
-- (fields x and y). Answers nil when it does, else the refusal to return; GROW is then the
-- change in bytes held, which `grown()` adds to field b once the values are written.
local GROW = 0
local function over_limits(names, lens)
  local f = redis.call('HMGET', SK, 'x', 'y', 'b')
  local most_vars, most_bytes = tonumber(f[1] or '0'), tonumber(f[2] or '0')
  local count = redis.call('HLEN', VK) / 3
  local delta = 0
  for i = 1, #names do
    if redis.call('HEXISTS', VK, 's:' .. names[i]) == 0 then count = count + 1 end
    delta = delta + lens[i] - redis.call('HSTRLEN', VK, 'v:' .. names[i])
  end
  if most_vars > 0 and count > most_vars then return {'limit', 'variables', count, most_vars} end
  local held = tonumber(f[3] or '0') + delta
  if most_bytes > 0 and held > most_bytes then return {'limit', 'bytes', held, most_bytes} end
  GROW = delta
  return nil
end

local function grown()
  if GROW ~= 0 then redis.call('HINCRBY', SK, 'b', GROW) end
end

local function state_of(s)
  local v, c = string.match(s, '^(%d+):(%d+):')
  return tonumber(v), c
end

local function state(version, created)
  return int(version) .. ':' .. created .. ':' .. int(NOW)
end
"""

# ARGV: sid, opid, window_ms, ttl_ms, metadata, get_or_create, max_sessions, max_variables,
#       max_session_bytes, max_sessions_per_principal
CREATE = r"""
redis.call('ZREMRANGEBYSCORE', IX, '-inf', int(NOW))
local ttl = session_ttl()
if ttl then
  if seen(ARGV[2]) then touch(ttl); return {'ok', 1, info()} end
  if ARGV[6] ~= '1' then return {'exists'} end
  touch(ttl)
  return {'ok', 0, info()}
end
local n = redis.call('ZCARD', IX)
if n >= tonumber(ARGV[7]) then return {'full', n} end
local PK = principal_key()
if PK then
  local most = tonumber(ARGV[10])
  if redis.call('SCARD', PK) >= most then
    -- Only at the limit: forget the principal's sessions that expired (at most `most` EXISTS).
    for _, key in ipairs(redis.call('SMEMBERS', PK)) do
      if redis.call('EXISTS', key) == 0 then redis.call('SREM', PK, key) end
    end
    local held = redis.call('SCARD', PK)
    if held >= most then return {'principal_full', held} end
  end
  redis.call('SADD', PK, SK)
end
redis.call('DEL', VK, WK, OK)
redis.call('HSET', SK, 'c', int(NOW), 't', ARGV[4], 'm', ARGV[5], 'w', '', 'q', 0,
  'x', ARGV[8], 'y', ARGV[9], 'b', 0)
remember(ARGV[2], tonumber(ARGV[3]))
touch(tonumber(ARGV[4]))
return {'ok', 1, info()}
"""

# ARGV: sid, worker, set_worker ("1"/"0")
SESSION = r"""
local ttl = session_ttl()
if not ttl then return {'nf'} end
if ARGV[3] == '1' then redis.call('HSET', SK, 'w', ARGV[2]) end
touch(ttl)
return {'ok', info()}
"""

# ARGV: sid
DELETE_SESSION = r"""
redis.call('ZREM', IX, SID)
local PK = principal_key()
if PK then redis.call('SREM', PK, SK) end
if not session_ttl() then return 0 end
redis.call('DEL', SK, VK, OK)
if LEASE >= NOW then
  redis.call('XADD', WK, '*', 'q', 0, 'k', 'expired')
  redis.call('PEXPIRE', WK, 60000)
else
  redis.call('DEL', WK)
end
return 1
"""

# ARGV: sid, lease_ms. Takes (or renews) the watcher lease; tells where the feed stands and
# whether a write went unrecorded because the previous lease had lapsed.
WATCH = r"""
local ttl = session_ttl()
if not ttl then return {'nf'} end
local f = redis.call('HMGET', SK, 'q', 'c', 'u')
local lapsed = 0
if LEASE < NOW and tonumber(f[3] or '0') > LEASE then lapsed = 1 end
redis.call('HSET', SK, 'l', int(NOW + tonumber(ARGV[2])))
local last = redis.call('XREVRANGE', WK, '+', '-', 'COUNT', 1)
local id = '0-0'
if #last > 0 then id = last[1][1] end
return {'ok', id, f[1] or '0', f[2], lapsed, redis.call('PTTL', SK)}
"""

# ARGV: sid, name
GET = r"""
local ttl = session_ttl()
if not ttl then return {'nf'} end
local n = ARGV[2]
local f = redis.call('HMGET', VK, 'd:' .. n, 'v:' .. n, 's:' .. n)
touch_read(ttl)
if not f[1] then return {'nv', n} end
return {'ok', f[1], f[2], f[3]}
"""

# ARGV: sid, name...
GET_MANY = r"""
local ttl = session_ttl()
if not ttl then return {'nf'} end
touch_read(ttl)
local out = {'ok'}
for i = 2, #ARGV do
  local n = ARGV[i]
  local f = redis.call('HMGET', VK, 'd:' .. n, 'v:' .. n, 's:' .. n)
  if not f[1] then return {'nv', n} end
  out[#out + 1] = f[1]
  out[#out + 1] = f[2]
  out[#out + 1] = f[3]
end
return out
"""

# ARGV: sid
LIST = r"""
local ttl = session_ttl()
if not ttl then return {'nf'} end
touch_read(ttl)
return {'ok', redis.call('HGETALL', VK)}
"""

# ARGV: sid, opid, window_ms, maxlen, inline, name, expected_decl, create_decl, value,
#       expected_version ("" for none)
SET = r"""
local ttl = session_ttl()
if not ttl then return {'nf'} end
if seen(ARGV[2]) then return done(ttl, {'dup'}) end
local name, ev = ARGV[6], ARGV[10]
local d = redis.call('HGET', VK, 'd:' .. name)
local version, created
if not d then
  if ARGV[8] == '' or (ev ~= '' and ev ~= '0') then return done(ttl, {'nv', name}) end
  d = ARGV[8]
  version, created = 1, int(NOW)
else
  if d ~= ARGV[7] then return done(ttl, {'decl', d}) end
  version, created = state_of(redis.call('HGET', VK, 's:' .. name))
  if ev ~= '' and tonumber(ev) ~= version then return done(ttl, {'ver', version}) end
  version = version + 1
end
local refused = over_limits({name}, {#ARGV[9]})
if refused then return done(ttl, refused) end
local s = state(version, created)
redis.call('HSET', VK, 'd:' .. name, d, 'v:' .. name, ARGV[9], 's:' .. name, s)
grown()
remember(ARGV[2], tonumber(ARGV[3]))
if ARGV[5] == '1' then
  emit(ARGV[4], 'k', 'set', 'n', name, 'd', d, 's', s, 'v', ARGV[9])
else
  emit(ARGV[4], 'k', 'set', 'n', name, 'd', d, 's', s)
end
return done(ttl, {'ok', d, s})
"""

# ARGV: sid, opid, window_ms, maxlen, inline, name, decl, value
REGISTER = r"""
local ttl = session_ttl()
if not ttl then return {'nf'} end
if seen(ARGV[2]) then return done(ttl, {'dup'}) end
local name, d = ARGV[6], ARGV[7]
local old = redis.call('HGET', VK, 's:' .. name)
local version, created = 1, int(NOW)
if old then
  version, created = state_of(old)
  version = version + 1
end
local refused = over_limits({name}, {#ARGV[8]})
if refused then return done(ttl, refused) end
local s = state(version, created)
redis.call('HSET', VK, 'd:' .. name, d, 'v:' .. name, ARGV[8], 's:' .. name, s)
grown()
remember(ARGV[2], tonumber(ARGV[3]))
if ARGV[5] == '1' then
  emit(ARGV[4], 'k', 'set', 'n', name, 'd', d, 's', s, 'v', ARGV[8])
else
  emit(ARGV[4], 'k', 'set', 'n', name, 'd', d, 's', s)
end
return done(ttl, {'ok', d, s})
"""

# ARGV: sid, opid, window_ms, maxlen, then per variable: name, expected_decl, create_decl,
#       value, inline. Checks every declaration before writing anything: all or none.
SET_MANY = r"""
local ttl = session_ttl()
if not ttl then return {'nf'} end
if seen(ARGV[2]) then return done(ttl, {'dup'}) end
local bad = {'decl'}
local decls = {}
for i = 5, #ARGV, 5 do
  local name = ARGV[i]
  local d = redis.call('HGET', VK, 'd:' .. name)
  if not d then
    if ARGV[i + 2] == '' then return done(ttl, {'nv', name}) end
    decls[i] = false
  elseif d ~= ARGV[i + 1] then
    bad[#bad + 1] = name
    bad[#bad + 1] = d
  else
    decls[i] = d
  end
end
if #bad > 1 then return done(ttl, bad) end
local names, lens = {}, {}
for i = 5, #ARGV, 5 do
  names[#names + 1] = ARGV[i]
  lens[#lens + 1] = #ARGV[i + 3]
end
local refused = over_limits(names, lens)
if refused then return done(ttl, refused) end
grown()
local out = {'ok'}
for i = 5, #ARGV, 5 do
  local name, d, version, created = ARGV[i], decls[i], 1, int(NOW)
  if d then
    version, created = state_of(redis.call('HGET', VK, 's:' .. name))
    version = version + 1
    redis.call('HSET', VK, 'v:' .. name, ARGV[i + 3], 's:' .. name, state(version, created))
  else
    d = ARGV[i + 2]
    redis.call('HSET', VK, 'd:' .. name, d, 'v:' .. name, ARGV[i + 3],
      's:' .. name, state(version, created))
  end
  local s = state(version, created)
  if ARGV[i + 4] == '1' then
    emit(ARGV[4], 'k', 'set', 'n', name, 'd', d, 's', s, 'v', ARGV[i + 3])
  else
    emit(ARGV[4], 'k', 'set', 'n', name, 'd', d, 's', s)
  end
  out[#out + 1] = d
  out[#out + 1] = s
end
remember(ARGV[2], tonumber(ARGV[3]))
return done(ttl, out)
"""

# ARGV: sid, opid, window_ms, maxlen, name, expected_decl, create_decl, kind, by, min, max,
#       choices (JSON array or "")
INCREMENT = r"""
local EXACT = 9007199254740992

local function varint(s, p)
  local n, mul = 0, 1
  while true do
    local b = string.byte(s, p)
    if not b then return nil, p end
    p = p + 1
    n = n + (b % 128) * mul
    if b < 128 then return n, p end
    mul = mul * 128
  end
end

-- The number in a codec Value whose payload is JSON (field 2), or nil.
local function read_number(raw)
  local p, text = 1, nil
  while p <= #raw do
    local tag, len
    tag, p = varint(raw, p)
    if not tag or tag % 8 ~= 2 then return nil end
    len, p = varint(raw, p)
    if not len then return nil end
    if tag == 18 then text = string.sub(raw, p, p + len - 1) end
    p = p + len
  end
  if not text then return nil end
  return tonumber(text)
end

-- JSON text of a number the way Python's json module would read it back exactly.
local function number_text(kind, x)
  if kind == 'integer' then return string.format('%.0f', x) end
  if x ~= x then return 'NaN' end
  if x == math.huge then return 'Infinity' end
  if x == -math.huge then return '-Infinity' end
  local s
  for _, f in ipairs({'%.15g', '%.16g', '%.17g'}) do
    s = string.format(f, x)
    if tonumber(s) == x then break end
  end
  if not string.find(s, '[%.eEn]') then s = s .. '.0' end
  return s
end

local ttl = session_ttl()
if not ttl then return {'nf'} end
if seen(ARGV[2]) then return done(ttl, {'dup'}) end
local name, kind = ARGV[5], ARGV[8]
local by = tonumber(ARGV[9])
local d = redis.call('HGET', VK, 'd:' .. name)
local total, version, created
if not d then
  if ARGV[7] == '' then return done(ttl, {'nv', name}) end
  d = ARGV[7]
  total, version, created = by, 1, int(NOW)
else
  if d ~= ARGV[6] then return done(ttl, {'decl', d}) end
  local f = redis.call('HMGET', VK, 'v:' .. name, 's:' .. name)
  local current = read_number(f[1])
  if current == nil then return done(ttl, {'range'}) end
  total = current + by
  if kind == 'integer' and (math.abs(current) >= EXACT or math.abs(total) >= EXACT) then
    return done(ttl, {'range'})
  end
  local text = number_text(kind, total)
  if ARGV[10] ~= '' and not (total >= tonumber(ARGV[10])) then return done(ttl, {'bound', text}) end
  if ARGV[11] ~= '' and not (total <= tonumber(ARGV[11])) then return done(ttl, {'bound', text}) end
  if ARGV[12] ~= '' then
    local ok = false
    for _, c in ipairs(cjson.decode(ARGV[12])) do
      if c == total then ok = true end
    end
    if not ok then return done(ttl, {'bound', text}) end
  end
  version, created = state_of(f[2])
  version = version + 1
end
local text = number_text(kind, total)
local value = '\10' .. string.char(#kind) .. kind .. '\18' .. string.char(#text) .. text
local refused = over_limits({name}, {#value})
if refused then return done(ttl, refused) end
grown()
local s = state(version, created)
redis.call('HSET', VK, 'd:' .. name, d, 'v:' .. name, value, 's:' .. name, s)
remember(ARGV[2], tonumber(ARGV[3]))
emit(ARGV[4], 'k', 'set', 'n', name, 'd', d, 's', s, 'v', value)
return done(ttl, {'ok', d, s, value})
"""

# ARGV: sid, opid, window_ms, maxlen, name
DELETE = r"""
local ttl = session_ttl()
if not ttl then return {'nf'} end
if seen(ARGV[2]) then return done(ttl, {'ok', 1}) end
local name = ARGV[5]
local held = redis.call('HSTRLEN', VK, 'v:' .. name)
local n = redis.call('HDEL', VK, 'd:' .. name, 'v:' .. name, 's:' .. name)
if held > 0 then redis.call('HINCRBY', SK, 'b', -held) end
remember(ARGV[2], tonumber(ARGV[3]))
if n > 0 then emit(ARGV[4], 'k', 'deleted', 'n', name) end
return done(ttl, {'ok', n > 0 and 1 or 0})
"""

# KEYS: the sessions index. ARGV: "count" or "list". Drops expired entries, then answers.
SESSIONS = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if ARGV[1] == 'count' then return redis.call('ZCARD', KEYS[1]) end
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

SCRIPTS: dict[str, str] = {
    name: PRELUDE + body
    for name, body in {
        "create": CREATE,
        "session": SESSION,
        "delete_session": DELETE_SESSION,
        "watch": WATCH,
        "get": GET,
        "get_many": GET_MANY,
        "list": LIST,
        "set": SET,
        "register": REGISTER,
        "set_many": SET_MANY,
        "increment": INCREMENT,
        "delete": DELETE,
    }.items()
}
