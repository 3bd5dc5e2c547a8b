-- A send on one server: the PENDING records, then their messages, in one call.
-- KEYS: results index, record...; ARGV: prefix, now, the records' arguments (as create.lua's
-- ARGV), then (id, queue, priority, eta or '', body) per message (as publish.lua's).
-- Returns how many messages were stored (ids not known yet).
return publish_messages(create_records(3))
