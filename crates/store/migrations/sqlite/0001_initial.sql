-- Hefring's state, SQLite flavour. Keep equivalent with migrations/postgres.
-- Timestamps are milliseconds since the Unix epoch (UTC). Ids are time-ordered strings.

CREATE TABLE targets (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    host TEXT NOT NULL,
    root TEXT NOT NULL,
    http_port INTEGER NOT NULL,
    https_port INTEGER NOT NULL,
    web_user TEXT NOT NULL,
    host_key TEXT,
    inspection TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE projects (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL UNIQUE,
    git_url TEXT NOT NULL,
    branch TEXT NOT NULL,
    status TEXT NOT NULL,
    manifest TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE releases (
    id TEXT PRIMARY KEY NOT NULL,
    project_id TEXT NOT NULL REFERENCES projects(id),
    git_ref TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    status TEXT NOT NULL,
    artifact_sha256 TEXT,
    artifact_size INTEGER,
    image TEXT,
    build_operation_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (project_id, commit_sha)
);

CREATE TABLE environments (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    project_id TEXT NOT NULL REFERENCES projects(id),
    target_id TEXT NOT NULL REFERENCES targets(id),
    release_id TEXT REFERENCES releases(id),
    domain TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX environments_release ON environments (release_id);
CREATE INDEX environments_target ON environments (target_id);

-- Operations are also the embedded queue: a worker claims a queued row by taking its lease.
CREATE TABLE operations (
    id TEXT PRIMARY KEY NOT NULL,
    kind TEXT NOT NULL,
    subject_type TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    parent_id TEXT,
    requested_by TEXT NOT NULL,
    inputs TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    state TEXT NOT NULL,
    result TEXT NOT NULL,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    queue TEXT NOT NULL,
    lease_owner TEXT,
    lease_expires_at INTEGER,
    created_at INTEGER NOT NULL,
    queued_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    updated_at INTEGER NOT NULL
);
-- The store, not a worker, is the arbiter: at most one active duplicate, one running per subject.
CREATE UNIQUE INDEX operations_one_active_duplicate ON operations (dedupe_key)
    WHERE status IN ('queued', 'running');
CREATE UNIQUE INDEX operations_one_running_per_subject ON operations (subject_id)
    WHERE status = 'running';
CREATE INDEX operations_waiting ON operations (status, queued_at, id);
CREATE INDEX operations_by_subject ON operations (subject_id, status, queued_at);
CREATE INDEX operations_by_parent ON operations (parent_id);

CREATE TABLE tasks (
    operation_id TEXT NOT NULL REFERENCES operations(id),
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    rollback INTEGER NOT NULL DEFAULT 0,
    started_at INTEGER,
    finished_at INTEGER,
    PRIMARY KEY (operation_id, position)
);

CREATE TABLE log_lines (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    operation_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    at INTEGER NOT NULL,
    task TEXT NOT NULL,
    stream TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX log_lines_by_operation ON log_lines (operation_id, seq);

CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

-- Installation-wide facts, such as whether the local target was registered once already.
CREATE TABLE settings (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
