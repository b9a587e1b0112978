-- Only queued operations are looked for in queue order, so only they are indexed that way.
-- With the status as the index's first column, the planner walked it for `status =
-- 'running'` (the subject checks of a claim, the leases of a batch of task records): during a
-- drain those entries are mostly dead rows of finished operations, thousands to step over
-- for every probe. Without it, running operations are found by primary key or by subject
-- (`operations_one_running_per_subject`). Kept equivalent with migrations/sqlite.
DROP INDEX operations_waiting;
CREATE INDEX operations_waiting ON operations (queued_at, id) WHERE status = 'queued';
