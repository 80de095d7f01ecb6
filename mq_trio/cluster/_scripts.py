"""The Lua scripts a cluster node runs in Redis (docs/cluster.md, "Design").

Every script takes a topic's keys plus the epoch key, so one topic's index, cache and
subscriber counts change in one atomic step, and its frame is published in that step:
the channel's order is the order of the indexes. Per topic (``T`` is the topic's name,
hex-encoded, so any string is a safe key):

* ``mq:{T}:m`` hash: ``next`` (the next index), ``evicted`` (the highest index the
  cache-size rule dropped);
* ``mq:{T}:c`` list: the cache, oldest first; an entry is ``<flag><index> <command>``
  with flag ``1`` for a "one" message, ``0`` otherwise;
* ``mq:{T}:s`` hash: node id -> ``<subscribers>:<lease end, ms>`` (for "one").

``mq:epoch`` holds the epoch: a script that finds it missing (Redis lost its data)
sets the candidate the node passed, and every reply carries the current one.

A frame (the payload published on the channel) for a batch of messages:
``<origin> <seq> <first index> <count> <topic length>\\n<topic>`` followed, per message,
by ``<target> <length>\\n<command>``: target ``*`` (everyone), ``-`` (a "one" message
nobody could take: cached or dropped) or the id of the node that delivers it.
"""

from __future__ import annotations

#: Shared preamble: the epoch (KEYS[4], candidate ARGV[1]) and a small random generator
#: seeded by the node (ARGV[2]), for the choice of a "one" target.
_PREAMBLE = r"""
local epoch = redis.call('GET', KEYS[4])
local created = 0
if not epoch then
  epoch = ARGV[1]
  created = 1
  redis.call('SET', KEYS[4], epoch)
end
local seed = tonumber(ARGV[2]) % 2147483646 + 1
local function rand(n)
  -- MINSTD: every product stays below 2^53, where Lua's doubles are exact
  seed = (seed * 48271) % 2147483647
  return math.floor(seed / 2147483647 * n)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: Message ids (both kinds of publish): ``admit`` says whether message ``i`` is taken.
#: A repeated id (kept in ``<meta>:id:<id>`` for the window, ARGV[8] ms) is not, nor is
#: the rest of a batch whose head is a repeat; ``results[i]`` then says why. Needs
#: ``first``, ``fresh`` and ``results`` defined before it.
_ADMIT = r"""
local ids, skipping = false, false
local function admit(i, flags, id)
  if flags % 8 >= 4 then  -- the rest of a batch: as its head
    if skipping then results[i] = 's'; return false end
    return true
  end
  skipping = false
  if id == '' then return true end
  ids = true
  local key = KEYS[1] .. ':id:' .. id
  local seen = redis.call('GET', key)
  if seen then
    skipping = true; results[i] = 'd' .. seen
    return false
  end
  local count = math.max(math.floor(flags / 16), 1)
  redis.call('SET', key, (first + fresh) .. ':' .. count, 'PX', tonumber(ARGV[8]))
  return true
end
"""

#: Live subscriber counts per node (expired leases removed), for "one" targets.
_LIVE = r"""
local function live()
  local fields = redis.call('HGETALL', KEYS[3])
  local nodes, counts, total = {}, {}, 0
  for i = 1, #fields, 2 do
    local c, e = string.match(fields[i + 1], '^(%d+):(%d+)$')
    c = tonumber(c); e = tonumber(e)
    if (not e) or e < now then
      redis.call('HDEL', KEYS[3], fields[i])
    elseif c > 0 then
      table.insert(nodes, fields[i]); table.insert(counts, c); total = total + c
    end
  end
  return nodes, counts, total
end
local function pick(nodes, counts, total)
  local r = rand(total)
  for i = 1, #nodes do
    if r < counts[i] then return nodes[i] end
    r = r - counts[i]
  end
  return nodes[#nodes]
end
"""

#: Publish messages of one topic (one script call per batch of them).
#: KEYS: meta, cache, subs, epoch. ARGV: candidate epoch, seed, origin node, seq,
#: cache size, channel, topic, id window (ms), then per message three values: flags,
#: id ("" if none), command. Flags: 1 "one", 2 cache, 4 the rest of a batch (skipped
#: with its head if that is a repeat), and the batch's size times 16 on its head.
#: Returns {first index, epoch, messages published, epoch created (Redis had none: it
#: lost its data)} and, if any message had an id, one result per message:
#: "<index>", "d<first>:<count>" (a repeated id: the original's), or "s" (skipped).
PUBLISH = _PREAMBLE + _LIVE + r"""
local size = tonumber(ARGV[5])
local n = (#ARGV - 8) / 3
local nodes, counts, total = nil, nil, 0
local parts, results = {}, {}
local cached, cached_index = {}, {}
local function push(from, to)  -- RPUSH cached[from..to] as entries, 500 per call
  for start = from, to, 500 do
    local entries = {}
    for k = start, math.min(start + 499, to) do
      local index = cached_index[k]
      if index < 0 then
        entries[#entries + 1] = '1' .. (-index - 1) .. ' ' .. cached[k]
      else
        entries[#entries + 1] = '0' .. index .. ' ' .. cached[k]
      end
    end
    redis.call('RPUSH', KEYS[2], unpack(entries))
  end
end
local fresh, pushed = 0, 0
local first = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
""" + _ADMIT + r"""
local np = 0
for i = 1, n do
  local flags = tonumber(ARGV[6 + 3 * i])
  local id = ARGV[7 + 3 * i]
  local cmd = ARGV[8 + 3 * i]
  local take
  if flags < 4 and id == '' then  -- (the common case, without a call)
    skipping = false; take = true
  else
    take = admit(i, flags, id)
  end
  if take then
    local index = first + fresh
    fresh = fresh + 1
    results[i] = index
    local one = flags % 2 == 1
    local target = '*'
    if one then
      if nodes == nil then nodes, counts, total = live() end
      if total > 0 then target = pick(nodes, counts, total) else target = '-' end
    end
    if flags % 4 >= 2 and (not one or target == '-') and size > 0 then
      -- (the entry's text is made at the end, for the ones the cache keeps)
      pushed = pushed + 1
      cached[pushed] = cmd
      cached_index[pushed] = one and -index - 1 or index
    end
    parts[np + 1] = target .. ' ' .. #cmd .. '\n'
    parts[np + 2] = cmd
    np = np + 2
  end
end
if fresh > 0 then
  redis.call('HSET', KEYS[1], 'next', first + fresh)
  if pushed >= size then
    -- The batch alone fills the cache: only its last `size` entries are written (a
    -- batch of 1,000 to a cache of 100 was 900 pushes trimmed away again).
    local evicted
    if pushed > size then
      evicted = cached_index[pushed - size]
      if evicted < 0 then evicted = -evicted - 1 end  -- (a "one" is kept as -index - 1)
    else
      local newest = redis.call('LINDEX', KEYS[2], -1)
      if newest then evicted = string.match(newest, '^%d(%d+)') end
    end
    redis.call('DEL', KEYS[2])
    push(pushed - size + 1, pushed)
    if evicted then redis.call('HSET', KEYS[1], 'evicted', evicted) end
  elseif pushed > 0 then
    push(1, pushed)
    local len = redis.call('LLEN', KEYS[2])
    if len > size then
      local last = redis.call('LINDEX', KEYS[2], len - size - 1)
      redis.call('LTRIM', KEYS[2], len - size, -1)
      redis.call('HSET', KEYS[1], 'evicted', string.match(last, '^%d(%d+)'))
    end
  end
  local topic = ARGV[7]
  redis.call('PUBLISH', ARGV[6], ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. first .. ' ' .. fresh
    .. ' ' .. #topic .. '\n' .. topic .. table.concat(parts))
end
local out = {first, epoch, fresh, created}
if ids then
  for i = 1, n do out[#out + 1] = tostring(results[i]) end
end
return out
"""

#: A node's subscriber count for a topic, and a subscribe's replay, in one step.
#: KEYS: meta, cache, subs, epoch. ARGV: candidate epoch, seed, node, count, lease (ms),
#: last_seen, replay (1/0), then for a leave a seq and the channel: an empty frame is
#: published, so the node's intake knows when every message before it has passed.
#: Returns {next index, evicted, epoch, epoch created, entries...}; the "one" messages
#: among the entries leave the cache.
JOIN = _PREAMBLE + r"""
local count = tonumber(ARGV[4])
if count > 0 then
  redis.call('HSET', KEYS[3], ARGV[3], count .. ':' .. (now + tonumber(ARGV[5])))
else
  redis.call('HDEL', KEYS[3], ARGV[3])
end
local out = {tonumber(redis.call('HGET', KEYS[1], 'next') or '0'),
             tonumber(redis.call('HGET', KEYS[1], 'evicted') or '-1'), epoch, created}
if ARGV[8] then
  local topic = ARGV[10]
  redis.call('PUBLISH', ARGV[9], ARGV[3] .. ' ' .. ARGV[8] .. ' -1 0 ' .. #topic .. '\n'
    .. topic)
end
if ARGV[7] == '1' then
  local last_seen = tonumber(ARGV[6])
  local entries = redis.call('LRANGE', KEYS[2], 0, -1)
  for _, e in ipairs(entries) do
    if tonumber(string.match(e, '^%d(%d+)')) > last_seen then
      out[#out + 1] = e
      if string.sub(e, 1, 1) == '1' then redis.call('LREM', KEYS[2], 1, e) end
    end
  end
end
return out
"""

#: Lease renewal of a node's counts: KEYS: subs of each topic; ARGV: node, lease (ms),
#: then one count per key (0: remove). No reply worth reading.
RENEW = r"""
local t = redis.call('TIME')
local until_ = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[2 + i])
  if count > 0 then
    redis.call('HSET', key, ARGV[1], count .. ':' .. until_)
  else
    redis.call('HDEL', key, ARGV[1])
  end
end
return #KEYS
"""

#: A topic's state for introspection and the resync after a lost channel: KEYS: meta,
#: cache, epoch; ARGV: after (entries with a greater index). Returns {next, evicted,
#: epoch, entries...} without changing anything.
READ = r"""
local epoch = redis.call('GET', KEYS[3]) or ''
local out = {tonumber(redis.call('HGET', KEYS[1], 'next') or '0'),
             tonumber(redis.call('HGET', KEYS[1], 'evicted') or '-1'), epoch}
local after = tonumber(ARGV[1])
for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if tonumber(string.match(e, '^%d(%d+)')) > after then out[#out + 1] = e end
end
return out
"""


#: Move the epoch from ``ARGV[1]`` to ``ARGV[2]`` unless another node already moved it;
#: returns the epoch now. KEYS: the epoch key (the one of slot 0, with Redis Cluster).
MOVE_EPOCH = r"""
local now = redis.call('GET', KEYS[1])
if (not now) or now == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return now
"""


# --- acknowledged jobs (docs/cluster.md, "Jobs") ---
#
# Per topic, beside the keys above: ``mq:{T}:jw`` list (waiting job indexes, oldest
# first), ``mq:{T}:jb`` hash (index -> the job's command), ``mq:{T}:jn`` hash (index ->
# deliveries so far), ``mq:{T}:jo`` hash (index -> the node holding it) and ``mq:{T}:jt``
# zset (index -> when the holder's claim ends, ms). A node takes jobs for its own
# consumers (``JOB_TAKE``), which run the single-node rules (prefetch, deadlines, nack
# delays) locally; Redis knows which node holds which job, so a dead node's jobs are
# taken back by the others once its claims end.

#: Add jobs (a send or a batch with ``"ack": true``). KEYS: meta, jw, jb, epoch. ARGV:
#: candidate epoch, seed, origin node, seq, max jobs per topic, channel, topic, id
#: window (ms), then per job: flags (as PUBLISH), id, command. Returns as PUBLISH; first
#: index -1: the queue is full (nothing added). A frame with count -1 tells the nodes
#: that jobs wait.
JOB_ADD = _PREAMBLE + r"""
local n = (#ARGV - 8) / 3
if redis.call('HLEN', KEYS[3]) + n > tonumber(ARGV[5]) then
  return {-1, epoch, 0, created}
end
local first = tonumber(redis.call('HGET', KEYS[1], 'next') or '0')
local results, fresh = {}, 0
""" + _ADMIT + r"""
for i = 1, n do
  local flags = tonumber(ARGV[6 + 3 * i])
  local id = ARGV[7 + 3 * i]
  if admit(i, flags, id) then
    local index = first + fresh
    fresh = fresh + 1
    results[i] = tostring(index)
    redis.call('HSET', KEYS[3], index, ARGV[8 + 3 * i])
    redis.call('RPUSH', KEYS[2], index)
  end
end
if fresh > 0 then
  redis.call('HSET', KEYS[1], 'next', first + fresh)
  local topic = ARGV[7]
  redis.call('PUBLISH', ARGV[6], ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. first .. ' -1 '
    .. #topic .. '\n' .. topic)
end
local out = {first, epoch, fresh, created}
if ids then
  for i = 1, n do out[#out + 1] = results[i] end
end
return out
"""

#: Take up to ARGV[2] waiting jobs for node ARGV[1], claimed for ARGV[3] ms; claims
#: that ended first go back to the front of the queue. KEYS: jw, jb, jn, jo, jt.
#: Returns {index, deliveries before this one, command, ...}.
JOB_TAKE = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ended = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)
if #ended > 0 then
  table.sort(ended, function(a, b) return tonumber(a) > tonumber(b) end)
  for _, index in ipairs(ended) do
    redis.call('HDEL', KEYS[4], index)
    redis.call('ZREM', KEYS[5], index)
    redis.call('LPUSH', KEYS[1], index)
  end
end
local out = {}
local want = tonumber(ARGV[2])
local until_ = now + tonumber(ARGV[3])
while want > 0 do
  local index = redis.call('LPOP', KEYS[1])
  if not index then break end
  local command = redis.call('HGET', KEYS[2], index)
  if command then
    local before = tonumber(redis.call('HGET', KEYS[3], index) or '0')
    redis.call('HSET', KEYS[3], index, before + 1)
    redis.call('HSET', KEYS[4], index, ARGV[1])
    redis.call('ZADD', KEYS[5], until_, index)
    out[#out + 1] = tonumber(index); out[#out + 1] = before; out[#out + 1] = command
    want = want - 1
  end
end
return out
"""

#: A held job's news from its node ARGV[1]: ARGV[2] the index, ARGV[3] what (``touch``:
#: claim it for ARGV[4] more ms, deliveries ARGV[5] if not ""; ``done``: acknowledged or
#: dead-lettered, forget it; ``back``: to the front of the queue). KEYS: jw, jb, jn,
#: jo, jt, meta. Returns 1, or 0 if the node no longer holds it. ``back`` publishes the
#: "jobs wait" frame on channel ARGV[6] for topic ARGV[7].
JOB_SET = r"""
local index = ARGV[2]
if redis.call('HGET', KEYS[4], index) ~= ARGV[1] then return 0 end
local what = ARGV[3]
if what == 'touch' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[4]), index)
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], index, ARGV[5]) end
  return 1
end
redis.call('HDEL', KEYS[4], index)
redis.call('ZREM', KEYS[5], index)
if what == 'done' then
  redis.call('HDEL', KEYS[2], index)
  redis.call('HDEL', KEYS[3], index)
else
  redis.call('LPUSH', KEYS[1], index)
  local topic = ARGV[7]
  redis.call('PUBLISH', ARGV[6], ARGV[1] .. ' -1 -1 -1 ' .. #topic .. '\n' .. topic)
end
return 1
"""


def job_keys(topic: str) -> tuple[str, str, str, str, str]:
    """A topic's job keys (one slot with its other keys): jw, jb, jn, jo, jt."""
    tag = topic.encode().hex()
    return (f"mq:{{{tag}}}:jw", f"mq:{{{tag}}}:jb", f"mq:{{{tag}}}:jn",
            f"mq:{{{tag}}}:jo", f"mq:{{{tag}}}:jt")


def topic_keys(topic: str) -> tuple[str, str, str]:
    """The keys of a topic: meta, cache, subscriber counts. Hex in a hash tag: any
    topic string is a valid key, and all three land in one Redis Cluster slot."""
    tag = topic.encode().hex()
    return f"mq:{{{tag}}}:m", f"mq:{{{tag}}}:c", f"mq:{{{tag}}}:s"


def sharded(script: str) -> str:
    """The script for Redis Cluster: frames go out with SPUBLISH (sharded pub/sub, on
    the slot's own channel)."""
    return script.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',")


EPOCH_KEY = "mq:epoch"
CHANNEL = "mq:frames"


def slot_epoch_key(tag: str) -> str:
    """With Redis Cluster: the epoch's copy in the slot of ``{tag}`` (a script may only
    touch keys of its own slot). Every slot holds the same epoch; a shard that lost its
    data has lost these copies, which is how a script notices."""
    return f"mq:{{{tag}}}:epoch"


def slot_channel(tag: str) -> str:
    """With Redis Cluster: the frames channel of the slot of ``{tag}``."""
    return f"mq:{{{tag}}}:frames"
