"""Every Lua script the package runs, once each, named for what it guarantees.

A script is the way to make a read-decide-write atomic on one node: all its keys share a slot (callers
build them so), and Redis runs it without interleaving another client's command.
"""

from __future__ import annotations

# incr()/decr(): INCRBY only where the key exists, so a missing key is a ValueError as Django requires;
# INCRBY keeps the key's TTL.
INCR_IF_PRESENT = "if redis.call('EXISTS', KEYS[1]) == 0 then return false end return redis.call('INCRBY', KEYS[1], ARGV[1])"

# touch(timeout=None): PERSIST answers 0 both for "missing" and for "had no TTL"; this says whether the
# key exists.
PERSIST_IF_PRESENT = (
    "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end redis.call('PERSIST', KEYS[1]) return 1"
)

# Compare-and-set of an entry: write KEYS[1] only if it is absent or still holds the bytes whose sha1 is
# ARGV[1] (what the writer saw; '-' for nothing), and, when KEYS[2] is given (a write-behind row's patch),
# only if no queued change of the row is still on its way. ARGV[2] the bytes, ARGV[3] the TTL in ms ('' =
# none). So a fill or an add() over a dead entry never overwrites a value someone wrote meanwhile.
SET_IF_UNCHANGED = """
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local current = redis.call('GET', KEYS[1])
if current and redis.sha1hex(current) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[2]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"""

# A lease or lock is released only by the holder of its token ARGV[1]: a holder that overran its lease never
# frees the next holder's.
RELEASE_IF_OWNER = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)

# A lease is extended (ARGV[2] ms) only by the holder of its token ARGV[1].
RENEW_IF_OWNER = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"

# The namespace key holds something that is not a generation (written by hand or by another program):
# replace it, once, whoever of the processes that saw it comes first.
REPLACE_FOREIGN_GENERATION = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[2])
return ARGV[2]
"""

# A tag's version for a write: the current one (a missing key is created holding ARGV[1]), with the key
# made to live at least ARGV[2] ms more, or forever when ARGV[2] is ''. A TTL is never shortened, so a tag
# outlives every entry stamped with it.
TAG_VERSION_FOR_WRITE = """
local version = redis.call('GET', KEYS[1])
if not version then
  if ARGV[2] == '' then redis.call('SET', KEYS[1], ARGV[1])
  else redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
  return ARGV[1]
end
if ARGV[2] == '' then
  redis.call('PERSIST', KEYS[1])
else
  local left = redis.call('PTTL', KEYS[1])
  if left >= 0 and left < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
end
return version
"""

# Admits `member` (a page's key) to a view's set of stored pages (KEYS[1], scored by expiry) if it is
# already there or the set holds fewer than `limit` live pages: a flood of distinct URLs cannot grow the
# key space past the view's bound. ARGV: member, now and expiry (ms), limit.
ADMIT_PAGE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  local ttl = tonumber(ARGV[3]) - tonumber(ARGV[2])
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
  return 1
end
return 0
"""

# Write-behind, queueing: the patch of a row. 'v:<field>' the newest value set (encoded), 't:<field>' the
# set's order token, 'd:<field>' the sum of increments queued after it. ARGV[1]: TTL, ARGV[2]: the change's
# token, then triples (op, field, value) with op 'v' (set: replaces the value, drops earlier increments) or
# 'd' (add). With KEYS[2] (the row's entry, for incr_behind): returns the entry, the first field's value
# set and its increments, from which the caller reads the field's new value. Increments are HINCRBY:
# concurrent callers never lose one.
PATCH_ROW = """
local i = 3
while i <= #ARGV do
  local op, name = ARGV[i], ARGV[i + 1]
  if op == 'v' then
    redis.call('HSET', KEYS[1], 'v:' .. name, ARGV[i + 2], 't:' .. name, ARGV[2])
    redis.call('HDEL', KEYS[1], 'd:' .. name)
  else
    if redis.call('HINCRBY', KEYS[1], 'd:' .. name, ARGV[i + 2]) == 0 then
      redis.call('HDEL', KEYS[1], 'd:' .. name)
    end
  end
  i = i + 3
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if KEYS[2] then
  return {redis.call('GET', KEYS[2]), redis.call('HGET', KEYS[1], 'v:' .. ARGV[4]), redis.call('HGET', KEYS[1], 'd:' .. ARGV[4])}
end
return 1
"""

# Write-behind, queueing: undo of a patch whose change could not be queued. Only what this change still
# owns is taken back (ARGV[1] the change's token, then the patch's triples with each increment negated), so
# a later change's value is never removed.
TAKE_BACK_PATCH = """
local i = 2
while i <= #ARGV do
  local op, name = ARGV[i], ARGV[i + 1]
  if op == 'v' then
    if redis.call('HGET', KEYS[1], 't:' .. name) == ARGV[1] then
      redis.call('HDEL', KEYS[1], 'v:' .. name, 't:' .. name)
    end
  elseif redis.call('HEXISTS', KEYS[1], 'd:' .. name) == 1 then
    if redis.call('HINCRBY', KEYS[1], 'd:' .. name, ARGV[i + 2]) == 0 then
      redis.call('HDEL', KEYS[1], 'd:' .. name)
    end
  end
  i = i + 3
end
if redis.call('HLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 1
"""

# Write-behind, draining: after a drain's commit, once per row and stream id. KEYS entry, patch, drained
# mark. ARGV[1] the newest stream id done for the row (applied, found applied, dropped or dead-lettered),
# ARGV[2] the row as the database holds it ('' = the row is gone), ARGV[3] its TTL ('' = none), ARGV[4] the
# marks' TTL, then the count of set fields and pairs (field, newest token of a done set), then the count of
# added fields and for each: field, token of the last done set of it ('' = none), count, pairs (stream id,
# minus the amount) of the done increments after that set (Redis adds them: exact 64-bit sums, which Lua's
# doubles are not). Returns 0 if a drain did this already (or a newer one): a slow drain never moves the
# entry back.
REFRESH_DRAINED_ROW = """
local function newer(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
local drained = redis.call('GET', KEYS[3])
if drained and not newer(ARGV[1], drained) then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
elseif ARGV[3] == '' then redis.call('SET', KEYS[1], ARGV[2])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[4])
local i = 5
local sets = tonumber(ARGV[i]); i = i + 1
for _ = 1, sets do
  local token = redis.call('HGET', KEYS[2], 't:' .. ARGV[i])
  if token and token <= ARGV[i + 1] then redis.call('HDEL', KEYS[2], 'v:' .. ARGV[i], 't:' .. ARGV[i]) end
  i = i + 2
end
local adds = tonumber(ARGV[i]); i = i + 1
for _ = 1, adds do
  local name, last_set, count = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local todo = {}
  for _ = 1, count do
    if not drained or newer(ARGV[i], drained) then table.insert(todo, ARGV[i + 1]) end
    i = i + 2
  end
  -- a set queued after these increments (still in the patch) already dropped them from it
  local pending_set = redis.call('HGET', KEYS[2], 't:' .. name)
  local superseded = pending_set and (last_set == '' or pending_set > last_set)
  if #todo > 0 and not superseded and redis.call('HEXISTS', KEYS[2], 'd:' .. name) == 1 then
    local left = 0
    for _, taken in ipairs(todo) do left = redis.call('HINCRBY', KEYS[2], 'd:' .. name, taken) end
    if left == 0 then redis.call('HDEL', KEYS[2], 'd:' .. name) end
  end
end
if redis.call('HLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[2]) end
return 1
"""

# Write-behind, draining: the end of a batch, in the shard's slot. Deletes the entries, forgets their failure
# counts and counts them, each id once (KEYS stream, attempts, stats). ARGV: applied, dropped,
# dead-lettered counts, rows written, seconds, then the ids in that order.
FINISH_DRAINED_BATCH = """
local counts = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])}
local names = {'changes_applied', 'dropped_deleted', 'dead_lettered'}
local i = 6
for c = 1, 3 do
  local deleted = 0
  for _ = 1, counts[c] do
    deleted = deleted + redis.call('XDEL', KEYS[1], ARGV[i])
    redis.call('HDEL', KEYS[2], ARGV[i])
    i = i + 1
  end
  if deleted > 0 then redis.call('HINCRBY', KEYS[3], names[c], deleted) end
end
redis.call('HINCRBY', KEYS[3], 'rows_written', ARGV[4])
redis.call('HINCRBYFLOAT', KEYS[3], 'apply_seconds', ARGV[5])
redis.call('HINCRBY', KEYS[3], 'batches', 1)
return 1
"""
