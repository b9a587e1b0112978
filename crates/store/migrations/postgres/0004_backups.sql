-- Backups and schedules (issue 4). Kept equivalent with migrations/sqlite.

-- One archive of an environment's database and persistent files in the backup store.
-- `status`: creating -> ready | failed; deleted once its archive is removed.
-- `kind`: manual (asked for), scheduled (made by the scheduler; pruned by retention), or
-- safety (taken by a restore before it overwrites anything).
CREATE TABLE backups (
    id TEXT PRIMARY KEY,
    environment_id TEXT NOT NULL REFERENCES environments (id),
    operation_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    object_key TEXT NOT NULL,
    size BIGINT,
    sha256 TEXT,
    manifest TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX backups_environment ON backups (environment_id, id);

-- Per-environment settings a user may change: the cron schedule override and the backup
-- schedule with its retention, as JSON.
ALTER TABLE environments ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
