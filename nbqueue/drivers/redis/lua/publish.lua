-- ARGV: prefix, now, then (id, queue, priority, eta or '', body) per message.
-- Stores the messages whose id is not known yet; returns how many.
return publish_messages(3)
