-- Only queued operations are looked for in queue order, so only they are indexed that way
-- (see migrations/postgres/0005_waiting_index.sql for why; kept equivalent).
DROP INDEX operations_waiting;
CREATE INDEX operations_waiting ON operations (queued_at, id) WHERE status = 'queued';
