//! The store's transitions as Lua scripts: each runs atomically in Redis,
//! so a transition is one round trip and never interleaves with another.
//! Times come from the Redis clock (`TIME`), never from an instance's.

/// `claim(key; owner, instance, lease_ms, ttl_secs, now, alive_prefix,
/// fingerprint, liveness_ttl_ms[, 'cluster', holder, holder_pttl])`.
///
/// Answers `{'new', first_attempt_ms}`, `{'send', attempts, first_attempt_ms,
/// takeovers, took_over, pinned_provider}`, `{'claimed', fields...}` (an outcome to publish),
/// `{'done'}` / `{'done', fields...}` (failed), or
/// `{'busy', lease_left_ms, holder_alive_ms}` (`'cancelling'` instead of
/// `'busy'` for a cancelled key whose SmsFailed its holder publishes).
///
/// A lease held by another claim is respected while it lasts and its
/// instance's liveness record exists; once that record is gone, for a
/// whole liveness TTL after a claim first found it gone (`dead_since`),
/// or once the lease ran out, the lease is taken over, and the takeover
/// counted (`takeovers`): a delivery that never reached an outcome. A claim that may send counts the call about to be made in
/// `attempts` and keeps `first_attempt_ms`, so that a crash during the call
/// still counts. Every granted claim refreshes the key's TTL.
///
/// In cluster mode (`'cluster'` given) the holder's liveness record is in
/// another hash slot, which a script may not read: the store passes the
/// liveness it observed (`holder` and the `PTTL` of its record, read just
/// before; empty: none observed yet). When the liveness matters (the key
/// held by another claim whose lease runs) and the hash's holder is not
/// the one observed, the script changes nothing and answers
/// `{'check', holder}`; the store reads that holder's record and claims
/// again. The observation is at most one round trip old: a holder seen
/// alive that dies meanwhile is busy for one more claim (as if it died
/// just after), and one seen dead that writes its record meanwhile is
/// only marked `dead_since` (or, once dead a whole liveness TTL before,
/// taken over: it had already stayed silent that long).
pub const CLAIM: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_until = tostring(now + tonumber(ARGV[3]))
local h = redis.call('HMGET', KEYS[1], 'status', 'published', 'lease_until', 'owner', 'holder',
  'attempts', 'first_attempt_ms', 'takeovers', 'invalid', 'fingerprint', 'dead_since', 'pinned',
  'cancelled')
local status = h[1]
local busy = 'busy'
if h[13] == '1' then busy = 'cancelling' end
-- Admitted at a front door, held until its sendAt, or failed as an
-- invalid command: nothing was sent, so the key is new to a valid command.
local fingerprint = h[10] or ARGV[7]
if status == 'accepted' or status == 'scheduled' or (status == 'failed' and h[9] == '1') then
  if status == 'failed' then fingerprint = ARGV[7] end
  redis.call('HDEL', KEYS[1], 'reason', 'detail', 'failed_at', 'invalid')
  status = nil
end
if not status then
  redis.call('HSET', KEYS[1], 'status', 'processing', 'attempts', '1', 'published', '0',
    'owner', ARGV[1], 'holder', ARGV[2], 'lease_until', lease_until,
    'first_attempt_ms', tostring(now), 'takeovers', '0', 'updated_at', ARGV[5],
    'fingerprint', fingerprint)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {'new', tostring(now)}
end
if status ~= 'processing' and status ~= 'retrying' and h[2] == '1' then
  if status == 'failed' then
    return {'done', redis.call('HGETALL', KEYS[1])}
  end
  return {'done'}
end
local attempts = tonumber(h[6] or '0') or 0
local first = h[7] or tostring(now)
local takeovers = tonumber(h[8] or '0') or 0
local takeover = 0
if h[4] == ARGV[1] then
  -- This very claim, retried after a lost reply: granted again, counted once.
  redis.call('HSET', KEYS[1], 'lease_until', lease_until)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  if status == 'processing' then
    return {'send', tostring(math.max(attempts - 1, 0)), first, tostring(takeovers), '0',
      h[12] or ''}
  end
  return {'claimed', redis.call('HGETALL', KEYS[1])}
end
if h[4] then
  local left = tonumber(h[3] or '0') - now
  if left > 0 then
    local alive
    if ARGV[9] then
      if ARGV[11] == '' or ARGV[10] ~= (h[5] or '') then return {'check', h[5] or ''} end
      alive = tonumber(ARGV[11])
    else
      alive = redis.call('PTTL', ARGV[6] .. (h[5] or ''))
    end
    if alive == -1 then alive = left end
    if alive > 0 then
      if h[11] then redis.call('HDEL', KEYS[1], 'dead_since') end
      return {busy, tostring(left), tostring(alive)}
    end
    -- The holder looks dead. It may only have lost its record in a store
    -- outage: it is taken over only once it has stayed dead for a whole
    -- liveness TTL (a live holder writes its record again well before).
    local since = tonumber(h[11] or '')
    if not since then
      redis.call('HSET', KEYS[1], 'dead_since', tostring(now))
      since = now
    end
    local wait = since + tonumber(ARGV[8]) - now
    if wait > 0 then
      return {busy, tostring(left), tostring(wait)}
    end
  end
  takeovers = takeovers + 1
  takeover = 1
end
redis.call('HDEL', KEYS[1], 'dead_since')
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'holder', ARGV[2], 'lease_until', lease_until,
  'takeovers', tostring(takeovers), 'updated_at', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if status == 'processing' or status == 'retrying' then
  redis.call('HSET', KEYS[1], 'status', 'processing', 'attempts', tostring(attempts + 1),
    'first_attempt_ms', first)
  return {'send', tostring(attempts), first, tostring(takeovers), tostring(takeover),
    h[12] or ''}
end
return {'claimed', redis.call('HGETALL', KEYS[1])}
"#;

/// `renew(key; owner, lease_ms)`: 1 if `owner` holds the key (its lease
/// now runs for another `lease_ms`), else 0.
pub const RENEW: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'lease_until', tostring(now + tonumber(ARGV[2])))
return 1
"#;

/// The fence shared by both records: goes on to write when `ARGV[1]` holds
/// the key without an outcome, or the key's hash is gone; answers 1 when
/// this owner already wrote an outcome (a retry after a lost reply, or a
/// delivery report came in meanwhile), 0 when another owner holds the key.
/// A write also renews the lease (`ARGV[2]` ms): the holder still has to
/// publish, however long the store was away.
const FENCE: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'status', 'owner')
if h[1] and h[2] ~= ARGV[1] then return 0 end
if h[1] and h[1] ~= 'processing' and h[1] ~= 'retrying' then return 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'lease_until', tostring(now + tonumber(ARGV[2])))
"#;

/// The delivery-report transition shared by [`record_report`] and
/// [`record_sent`] (parked reports): `apply(msg, hist, part, status,
/// provider_status, error_code, permanent, at, hist_cap, ttl)` answers
/// `'publish'` when the message's final status is set by this report (or
/// this is a repeat of the report that set it and its event is not
/// confirmed yet), else `'unchanged'`. A report seen before (same part,
/// status, provider status and code) changes nothing; any other is added
/// to the history (capped). Each part's status only moves forward, and
/// the message's is set once: the failure of any part, or `delivered`
/// once every part is, or `unknown` once all are final otherwise
/// (`DeliveryStatus::of_parts`). With `unpub` empty (cluster mode: the
/// index is in another slot) the index is left to the caller.
///
/// `apply_entry(msg, hist, part, entry, cap, ttl, key, unpub)` applies a
/// report stored as JSON (a parked one); one that cannot be decoded or
/// applied is dropped (`'unchanged'`): the writes that apply parked
/// reports are retried until they succeed, and must never fail for one.
const APPLY: &str = r#"
local FINAL = {delivered=true, undelivered=true, rejected=true, expired=true, unknown=true}
local FAILURE = {undelivered=true, rejected=true, expired=true}
local function apply(msg, hist, part, st, pst, code, perm, at, cap, ttl, key, unpub)
  for _, e in ipairs(redis.call('LRANGE', hist, 0, -1)) do
    local d = cjson.decode(e)
    if d.part == part and d.status == st and d.providerStatus == pst and d.errorCode == code then
      -- The very report that set the final status (of a part, for a
      -- message in parts), its event not confirmed: publish it again.
      local h = redis.call('HMGET', msg, 'd_published', 'd_part', 'd_provider_status',
        'd_error_code')
      if h[1] == '0' and h[2] == part and h[3] == pst and h[4] == code then return 'publish' end
      return 'unchanged'
    end
  end
  redis.call('RPUSH', hist, cjson.encode({part=part, status=st, providerStatus=pst,
    errorCode=code, at=at}))
  redis.call('LTRIM', hist, -tonumber(cap), -1)
  redis.call('EXPIRE', hist, ttl)
  if redis.call('HEXISTS', msg, 'delivery') == 1 then return 'unchanged' end
  local current = redis.call('HGET', msg, 'p:' .. part)
  if current and (FINAL[current] or not FINAL[st]) then return 'unchanged' end
  redis.call('HSET', msg, 'p:' .. part, st)
  local failure, all_delivered, all_final = nil, true, true
  for id in string.gmatch(redis.call('HGET', msg, 'parts') or part, '[^\n]+') do
    local s = redis.call('HGET', msg, 'p:' .. id) or 'sent'
    if FAILURE[s] and not failure then failure = s end
    if s ~= 'delivered' then all_delivered = false end
    if not FINAL[s] then all_final = false end
  end
  local final = failure
  if not final and all_final then
    if all_delivered then final = 'delivered' else final = 'unknown' end
  end
  if not final then return 'unchanged' end
  redis.call('HSET', msg, 'delivery', final, 'd_provider_status', pst, 'd_error_code', code,
    'd_permanent', perm, 'd_at', at, 'd_part', part, 'd_published', '0', 'updated_at', at)
  -- Until its event is confirmed, the sweeper finds it here.
  if unpub ~= '' then
    local t = redis.call('TIME')
    redis.call('ZADD', unpub, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), key)
  end
  return 'publish'
end
local function apply_entry(msg, hist, part, e, cap, ttl, key, unpub)
  local ok, r = pcall(cjson.decode, e)
  if not ok or type(r) ~= 'table' then return 'unchanged' end
  local applied, result = pcall(apply, msg, hist, part, tostring(r.status),
    tostring(r.providerStatus), tostring(r.errorCode), tostring(r.permanent), tostring(r.at),
    cap, ttl, key, unpub)
  if applied then return result end
  return 'unchanged'
end
"#;

/// `record_sent(key, pid_key, hist_key; owner, lease_ms, provider,
/// provider_message_id, segments, attempts, sent_at, ttl_secs,
/// idempotency_key, instance, phone, parts, pid_prefix, park_prefix,
/// hist_cap, unpublished_key, traceparent)`: 1 written, 2 written and parked reports set a final status
/// (its event to publish), 0 fenced. `parts` lists every part's id, one
/// per line; each gets its own provider-id key.
///
/// Cluster mode (a 18th argument, `'cluster'`; only `key` in KEYS): the
/// record alone, no provider-id key, parked report nor index (other
/// slots); 1 also when this owner's record is already there. The store
/// then links the parts ([`LINK`], [`APPLY_REPORTS`]).
pub fn record_sent() -> String {
    format!(
        r#"{APPLY}
-- This owner's own write, retried after a lost reply: say again whether
-- parked reports left an event to publish.
local mine = redis.call('HMGET', KEYS[1], 'status', 'owner', 'delivery', 'd_published')
if mine[1] == 'sent' and mine[2] == ARGV[1] and mine[3] and mine[4] == '0' then return 2 end
{FENCE}
redis.call('HSET', KEYS[1], 'status', 'sent', 'published', '0', 'owner', ARGV[1], 'holder', ARGV[10],
  'provider', ARGV[3], 'provider_message_id', ARGV[4], 'segments', ARGV[5], 'attempts', ARGV[6],
  'sent_at', ARGV[7], 'updated_at', ARGV[7], 'phone', ARGV[11], 'parts', ARGV[12], 'tp', ARGV[17])
redis.call('EXPIRE', KEYS[1], ARGV[8])
if ARGV[4] == '' or ARGV[18] then return 1 end
redis.call('SET', KEYS[2], ARGV[9], 'EX', ARGV[8])
local answer = 1
for part in string.gmatch(ARGV[12], '[^\n]+') do
  if part ~= ARGV[4] then redis.call('SET', ARGV[13] .. part, ARGV[9], 'EX', ARGV[8]) end
  local park = ARGV[14] .. part
  for _, e in ipairs(redis.call('LRANGE', park, 0, -1)) do
    if apply_entry(KEYS[1], KEYS[3], part, e, ARGV[15], ARGV[8], ARGV[9], ARGV[16]) == 'publish'
    then
      answer = 2
    end
  end
  redis.call('DEL', park)
end
return answer
"#
    )
}

/// `record_report(pid_key, park_key; msg_prefix, hist_prefix, part, status,
/// provider_status, error_code, permanent, at, park_ttl_secs, hist_cap,
/// park_cap, unpublished_key)`: `{'publish', key, phone, provider, provider_message_id,
/// status, provider_status, error_code, permanent, at, send_traceparent}`, `{'unchanged'}`,
/// `{'parked'}` (no message has this id yet: kept for `park_ttl_secs`,
/// at most `park_cap` reports; never when `park_ttl_secs` is 0), or
/// `{'unmatched'}`.
///
/// Cluster mode (a 13th argument, `'cluster'`): the provider-id slot only.
/// Parks as above, or answers `{'found', key, parked...}`: the key the id
/// maps to, and any reports still parked for it (left by a link that
/// stopped half-way, [`LINK`]), for the store to apply with
/// [`APPLY_REPORTS`].
pub fn record_report() -> String {
    format!(
        r#"{APPLY}
local key = redis.call('GET', KEYS[1])
if not key then
  if ARGV[9] == '0' then return {{'unmatched'}} end
  redis.call('RPUSH', KEYS[2], cjson.encode({{status=ARGV[4], providerStatus=ARGV[5],
    errorCode=ARGV[6], permanent=ARGV[7], at=ARGV[8]}}))
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[11]), -1)
  redis.call('EXPIRE', KEYS[2], ARGV[9])
  return {{'parked'}}
end
if ARGV[13] then
  local found = {{'found', key}}
  for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do table.insert(found, e) end
  return found
end
local msg, hist = ARGV[1] .. key, ARGV[2] .. key
if redis.call('EXISTS', msg) == 0 then return {{'unmatched'}} end
local ttl = redis.call('TTL', msg)
if ttl < 1 then ttl = 1 end
if apply(msg, hist, ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[10], ttl,
    key, ARGV[12]) ~= 'publish' then
  return {{'unchanged'}}
end
{PUBLISH_ANSWER}"#
    )
}

/// The answer of a report that set (or repeats) the final status of
/// `msg` (of idempotency key `key`).
const PUBLISH_ANSWER: &str = r#"
local h = redis.call('HMGET', msg, 'phone', 'provider', 'provider_message_id', 'delivery',
  'd_provider_status', 'd_error_code', 'd_permanent', 'd_at', 'tp')
return {'publish', key, h[1] or '', h[2] or '', h[3] or '', h[4], h[5] or '', h[6] or '',
  h[7] or '0', h[8] or '', h[9] or ''}
"#;

/// Cluster mode, the provider-id slot of a sent record's part:
/// `link(pid_key, park_key; idempotency_key, ttl_secs)` maps the id to the
/// key and answers the reports parked for it, left in place: the store
/// applies them to the message ([`APPLY_REPORTS`]), then deletes them.
/// From here on no report for the id is parked (it finds the key), so
/// that delete drops nothing new.
pub const LINK: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return redis.call('LRANGE', KEYS[2], 0, -1)
"#;

/// Cluster mode, the message's slot: `apply_reports(msg, hist;
/// idempotency_key, hist_cap, part, report, part, report, ...)` applies
/// each report (JSON as parked) as [`record_report`] does, the
/// unpublished index left to the store (written before this). Answers as
/// `record_report`: `{'publish', ...}` when one of them set the final
/// status (or repeats the unconfirmed one that did), `{'unchanged'}`, or
/// `{'unmatched'}` when the message is gone.
pub fn apply_reports() -> String {
    format!(
        r#"{APPLY}
local msg, hist, key = KEYS[1], KEYS[2], ARGV[1]
if redis.call('EXISTS', msg) == 0 then return {{'unmatched'}} end
local ttl = redis.call('TTL', msg)
if ttl < 1 then ttl = 1 end
local publish = false
for i = 3, #ARGV - 1, 2 do
  if apply_entry(msg, hist, ARGV[i], ARGV[i + 1], ARGV[2], ttl, key, '') == 'publish' then
    publish = true
  end
end
if not publish then return {{'unchanged'}} end
{PUBLISH_ANSWER}"#
    )
}

/// Cluster mode: `index_unpublished(unpublished_key; idempotency_key)`
/// puts the key in the index of unconfirmed SmsDeliveryReports, scored
/// by the Redis clock, before the reports that may set its final status
/// are applied (the index is in another slot than the message). An entry
/// whose message ends with no unconfirmed final status is dropped by the
/// sweeper ([`UNPUBLISHED_REPORTS`]).
pub const INDEX_UNPUBLISHED: &str = r#"
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
return 1
"#;

/// `mark_report_published(key, unpublished_key; status, idempotency_key)`:
/// the SmsDeliveryReport of final `status` is confirmed. Cluster mode:
/// `key` alone in KEYS (the index is in another slot); on 1 the store
/// then removes the key from the index (if it stops before, the sweeper
/// drops the entry: its report is confirmed).
pub const MARK_REPORT_PUBLISHED: &str = r#"
if redis.call('HGET', KEYS[1], 'delivery') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'd_published', '1')
if KEYS[2] then redis.call('ZREM', KEYS[2], ARGV[2]) end
return 1
"#;

/// `unpublished_reports(unpublished_key; msg_prefix, before_ms, limit)`:
/// keys whose final status was set before `before_ms` (Redis clock: now
/// minus the age asked) and whose SmsDeliveryReport is not confirmed, each
/// as `key, phone, provider, provider_message_id, status, provider_status,
/// error_code, permanent, at`; entries whose key is gone or confirmed are
/// dropped from the index.
///
/// Cluster mode (a 4th argument, `'cluster'`): the index's slot only;
/// answers those keys with their scores (`key, score, ...`); the store
/// reads each message, and drops an entry with [`DROP_UNPUBLISHED`].
pub const UNPUBLISHED_REPORTS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[4] then
  return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'WITHSCORES',
    'LIMIT', 0, tonumber(ARGV[3]))
end
local out = {}
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]),
    'LIMIT', 0, tonumber(ARGV[3]))) do
  local h = redis.call('HMGET', ARGV[1] .. key, 'phone', 'provider', 'provider_message_id',
    'delivery', 'd_provider_status', 'd_error_code', 'd_permanent', 'd_at', 'd_published')
  if h[4] and h[9] == '0' then
    for _, v in ipairs({key, h[1] or '', h[2] or '', h[3] or '', h[4], h[5] or '', h[6] or '',
        h[7] or '0', h[8] or ''}) do
      table.insert(out, v)
    end
  else
    redis.call('ZREM', KEYS[1], key)
  end
end
return out
"#;

/// Cluster mode: `drop_unpublished(unpublished_key; idempotency_key,
/// score)` removes the entry only if its score is still the one the
/// sweeper read: a report that set the key's final status meanwhile
/// indexed it again (a new score), and that entry stays.
pub const DROP_UNPUBLISHED: &str = r#"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"#;

/// `record_failed(key; owner, lease_ms, reason, detail, attempts, failed_at,
/// ttl_secs, instance)`: 1 written, 0 fenced.
pub fn record_failed() -> String {
    format!(
        r#"{FENCE}
redis.call('HSET', KEYS[1], 'status', 'failed', 'published', '0', 'owner', ARGV[1], 'holder', ARGV[8],
  'reason', ARGV[3], 'detail', ARGV[4], 'attempts', ARGV[5], 'failed_at', ARGV[6],
  'updated_at', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 1
"#
    )
}

/// `release(key; owner, attempts, now[, postpone[, pinned]])`: ends
/// `owner`'s lease without an outcome, writing the attempts actually made.
/// With `postpone` = `1` (a wait before any call, `CacheService::postpone`),
/// a key that made no call also forgets its `first_attempt_ms`: the next
/// claim that may send starts its age. A non-empty `pinned` is written as
/// the key's pin in the same step.
pub const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'owner', 'holder', 'lease_until')
if ARGV[5] and ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'pinned', ARGV[5]) end
if redis.call('HGET', KEYS[1], 'status') == 'processing' then
  redis.call('HSET', KEYS[1], 'status', 'retrying', 'attempts', ARGV[2], 'updated_at', ARGV[3])
  if ARGV[4] == '1' and ARGV[2] == '0' then redis.call('HDEL', KEYS[1], 'first_attempt_ms') end
end
return 1
"#;

/// `record_recipient_send(recipient; key, cap, window_ms, limit, ...)`:
/// `{'counted'}`, `{'counted_before'}` or `{'limited', wait_ms}`.
///
/// The recipient's record is one sorted set (one key, so one hash slot in
/// a cluster): a member per idempotency key counted, scored by when (ms,
/// Redis clock). Entries older than the longest window are dropped first.
/// A key already in it goes without being counted again. A window
/// `(window_ms, limit)` is full when `limit` entries lie in the last
/// `window_ms`; then it frees up when the oldest entry that must leave
/// does. Counting keeps the newest `cap` (the largest limit) entries,
/// which is all any window needs, and sets the record to expire with the
/// longest window.
pub const RECORD_RECIPIENT_SEND: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local longest = 0
for i = 3, #ARGV, 2 do
  longest = math.max(longest, tonumber(ARGV[i]))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - longest)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'counted_before'} end
local wait = 0
for i = 3, #ARGV, 2 do
  local window, limit = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local since = '(' .. tostring(now - window)
  local count = redis.call('ZCOUNT', KEYS[1], since, '+inf')
  if count >= limit then
    local leaving = redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf', 'WITHSCORES',
      'LIMIT', count - limit, 1)
    wait = math.max(wait, tonumber(leaving[2]) + window - now)
  end
end
if wait > 0 then return {'limited', tostring(wait)} end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[2]) + 1))
redis.call('PEXPIRE', KEYS[1], longest)
return {'counted'}
"#;

/// `admit(key; fingerprint, ttl_secs, now)`: `new` (recorded as
/// `accepted`), `same`, or `conflict` (another payload holds the key).
pub const ADMIT: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'status', 'fingerprint', 'invalid')
if not h[1] or (h[1] == 'failed' and h[3] == '1') then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'status', 'accepted', 'attempts', '0', 'published', '0',
    'fingerprint', ARGV[1], 'updated_at', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 'new'
end
if h[2] and h[2] ~= ARGV[1] then return 'conflict' end
return 'same'
"#;

/// `schedule(key; fingerprint, phone, send_at, ttl_secs, now)`: `scheduled`
/// (recorded as `scheduled`, or it was already) when the key is new,
/// admitted (its admitted fingerprint kept) or failed as an invalid
/// command; else `known`. The record's TTL only ever grows.
pub const SCHEDULE: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'status', 'invalid', 'fingerprint')
local status = h[1]
if status and status ~= 'accepted' and status ~= 'scheduled'
    and not (status == 'failed' and h[2] == '1') then
  return 'known'
end
if status ~= 'scheduled' then
  local fingerprint = ARGV[1]
  if status == 'accepted' and h[3] then fingerprint = h[3] end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'status', 'scheduled', 'attempts', '0', 'published', '0',
    'fingerprint', fingerprint, 'phone', ARGV[2], 'send_at', ARGV[3], 'updated_at', ARGV[5])
end
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return 'scheduled'
"#;

/// `cancel(key; owner, instance, lease_ms, detail, failed_at, keep_secs)`:
/// `{'too_late'}` for a key sent, in work, pinned after an ambiguous call,
/// or failed; else the key is (or already was) a tombstone: `failed`,
/// reason `cancelled`, `cancelled` = 1, kept at least `keep_secs`. Then
/// `{'publish', fields...}` when the number is known, the SmsFailed is not
/// out and nobody else holds the key (the caller now does, as `owner`),
/// else `{'cancelled', 'known' | 'unknown'}`.
pub const CANCEL: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'status', 'cancelled', 'pinned', 'phone', 'published',
  'owner', 'lease_until')
local status = h[1]
local before = status == 'failed' and h[2] == '1'
if not before then
  local open = not status or status == 'accepted' or status == 'scheduled'
    or (status == 'retrying' and not h[3])
  if not open then return {'too_late'} end
  redis.call('HDEL', KEYS[1], 'owner', 'holder', 'lease_until', 'dead_since', 'invalid')
  redis.call('HSET', KEYS[1], 'status', 'failed', 'cancelled', '1', 'reason', 'cancelled',
    'detail', ARGV[4], 'failed_at', ARGV[5], 'updated_at', ARGV[5], 'published', '0')
  redis.call('HSETNX', KEYS[1], 'attempts', '0')
end
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[6]) then
  redis.call('EXPIRE', KEYS[1], ARGV[6])
end
local held = before and h[6] and tonumber(h[7] or '0') > now
if h[4] and h[5] ~= '1' and not held then
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'holder', ARGV[2],
    'lease_until', tostring(now + tonumber(ARGV[3])))
  return {'publish', redis.call('HGETALL', KEYS[1])}
end
if status then return {'cancelled', 'known'} end
return {'cancelled', 'unknown'}
"#;

/// `withdraw(key)`: forgets an admission nothing else touched.
pub const WITHDRAW: &str = r#"
if redis.call('HGET', KEYS[1], 'status') == 'accepted' then
  redis.call('DEL', KEYS[1])
end
return 1
"#;

/// `record_invalid(key; reason, detail, failed_at, ttl_secs)`: `recorded`,
/// `unpublished` (an invalid command's SmsFailed still to confirm), or
/// `known`.
pub const RECORD_INVALID: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'status', 'invalid', 'published')
if not h[1] then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'invalid', '1', 'published', '0',
    'reason', ARGV[1], 'detail', ARGV[2], 'attempts', '0', 'failed_at', ARGV[3],
    'updated_at', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 'recorded'
end
if h[1] == 'failed' and h[2] == '1' and h[3] ~= '1' then return 'unpublished' end
return 'known'
"#;

/// `mark_published(key; owner, ttl_secs)`: the event of the outcome that
/// `owner` recorded (or claimed to publish) is confirmed. Nothing for any
/// other owner, nor for a key without an outcome.
pub const MARK_PUBLISHED: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'status', 'owner')
if h[2] ~= ARGV[1] then return 0 end
if h[1] ~= 'sent' and h[1] ~= 'failed' and h[1] ~= 'delivered' and h[1] ~= 'undelivered' then
  return 0
end
redis.call('HSET', KEYS[1], 'published', '1')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// `mark_invalid_published(key; ttl_secs)`: the SmsFailed of an invalid
/// command recorded as such is confirmed (nothing if the key moved on).
pub const MARK_INVALID_PUBLISHED: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'status', 'invalid')
if h[1] ~= 'failed' or h[2] ~= '1' then return 0 end
redis.call('HSET', KEYS[1], 'published', '1')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"#;

/// `pin(key; owner, provider)`: while `owner` holds the key, the provider
/// an ambiguous answer came from, for every later claim.
pub const PIN: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'pinned', ARGV[2])
return 1
"#;

/// `sms-service forget` and `dead-letters replay --reset`: deletes a
/// record only if it failed; returns the status it had, empty if none.
pub const CLEAR_FAILED: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if status == 'failed' then redis.call('DEL', KEYS[1]) end
return status
"#;
