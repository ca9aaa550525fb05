-- snakepit: a principal's tool calls over its share wait here for one of its slots.
--
-- Loaded by the router's HAProxy (lua-load); the rules around this action, and why a call is
-- let through the moment the principal's running calls drop below its share, are in
-- principal_shares.py, which also names the action and its arguments.
--
-- http-request lua.snakepit_share <limit> <wait ms> <table of running calls>
--   returns as soon as the principal in txn.principal has fewer than <limit> calls in the stick
--   table (tracked by HAProxy, plus the Python router's in gpc0; the rule after this one tracks
--   the call there); sets txn.share_waited
--   when <wait ms> passed first. HAProxy 2.6's Lua has no queue to sleep on, so the action
--   looks again after a pause that doubles from 1 ms to 32 ms: a call that waits long costs
--   HAProxy ~30 looks a second, and a freed slot is taken within 32 ms.

local FIRST_PAUSE_MS = 1
local LONGEST_PAUSE_MS = 32

local function now_ms()
  local now = core.now()
  return now.sec * 1000 + now.usec / 1000
end

core.register_action("snakepit_share", { "http-req" }, function(txn, limit, wait_ms, table_name)
  limit = tonumber(limit)
  wait_ms = tonumber(wait_ms)
  local key = txn:get_var("txn.principal")
  local running = core.backends[table_name].stktable
  local started = now_ms()
  local pause = FIRST_PAUSE_MS
  while true do
    local entry = running:lookup(key)
    -- use: the calls HAProxy carries; gpc0: the Python router's (share_sync.py)
    if entry == nil or entry.use + entry.gpc0 < limit then
      return
    end
    if now_ms() - started >= wait_ms then
      txn:set_var("txn.share_waited", true)
      return
    end
    core.msleep(pause)
    pause = math.min(pause * 2, LONGEST_PAUSE_MS)
  end
end, 3)
