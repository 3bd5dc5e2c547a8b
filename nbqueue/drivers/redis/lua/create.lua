-- KEYS: index, record...; ARGV: per record a count n, then n name/value pairs
-- (id and created_at among them). Existing records are left alone.
create_records(1)
return 1
