//! The SQLite store. Writes go to one dedicated thread that owns the only writer connection
//! (SQLite allows one writer at a time anyway, so this costs nothing and never meets
//! SQLITE_BUSY from itself); each store method is one message to that thread and runs all its
//! statements there, in one transaction. Reads use a small pool of read-only connections on
//! the blocking pool. WAL mode keeps readers and the writer out of each other's way.
//!
//! Why not sqlx for SQLite: its per-statement round trip to a connection thread costs 60-190
//! µs here, several times what SQLite itself needs, and the embedded queue's throughput is
//! bounded by exactly those writes. The schema is still applied by sqlx's migrator, so both
//! backends share one migration story.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hefring_core::operation::{
    self as op, OperationEvent, OperationKind, OperationStatus, SubjectType, TaskStatus,
};
use hefring_core::render::Https;
use rusqlite::types::Value as Sql;
use rusqlite::{
    params, params_from_iter, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior,
};
use serde_json::Value;

use crate::*;

type WriteJob = Box<dyn FnOnce(&mut Connection) + Send>;

pub struct SqliteStore {
    writer: mpsc::Sender<WriteJob>,
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    /// When `claim` last looked for expired leases. Leases last seconds, so looking once a
    /// second is enough, and it keeps a query off the hot path of every claim.
    last_expiry_scan: AtomicI64,
    /// Keeps the checkpoint thread going while the store exists.
    _alive: Arc<()>,
}

fn open(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    if !read_only {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints (copying the WAL into the database, with fsyncs) run on their own
        // thread, so a commit never waits for one.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    }
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.set_prepared_statement_cache_capacity(128);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH` or a plain path) and
    /// brings its schema up to date.
    pub async fn connect(url: &str) -> Result<SqliteStore> {
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        let path = PathBuf::from(path.split('?').next().unwrap_or(path));
        {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
            let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10));
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await?;
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
            pool.close().await;
        }
        let mut conn = open(&path, false)?;
        let (writer, jobs) = mpsc::channel::<WriteJob>();
        std::thread::Builder::new()
            .name("hefring-sqlite-writer".into())
            .spawn(move || {
                while let Ok(job) = jobs.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| StoreError::Corrupt(format!("cannot start the writer thread: {e}")))?;
        let alive = Arc::new(());
        spawn_checkpointer(&path, Arc::downgrade(&alive))?;
        Ok(SqliteStore {
            _alive: alive,
            writer,
            readers: Arc::default(),
            path,
            last_expiry_scan: AtomicI64::new(i64::MIN),
        })
    }

    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.writer
            .send(Box::new(move |conn| {
                let _ = reply.send(work(conn));
            }))
            .map_err(|_| StoreError::Corrupt("the writer thread stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Corrupt("the writer thread stopped".into()))?
    }

    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.lock().unwrap().pop();
            let conn = match conn {
                Some(conn) => conn,
                None => open(&path, true)?,
            };
            let result = work(&conn);
            let mut pool = readers.lock().unwrap();
            if pool.len() < 8 {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Corrupt(format!("a read panicked: {e}")))?
    }
}

/// Checkpoints the WAL twice a second from a connection of its own (a passive checkpoint
/// never blocks the writer), until `alive` can no longer be upgraded (the store is gone).
fn spawn_checkpointer(path: &Path, alive: std::sync::Weak<()>) -> Result<()> {
    let conn = open(path, false)?;
    std::thread::Builder::new()
        .name("hefring-sqlite-checkpoint".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            if alive.upgrade().is_none() {
                return;
            }
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                eprintln!("hefring: WAL checkpoint failed: {e}");
            }
        })
        .map_err(|e| StoreError::Corrupt(format!("cannot start the checkpoint thread: {e}")))?;
    Ok(())
}

fn unique_violation(e: &rusqlite::Error) -> Option<String> {
    match e {
        rusqlite::Error::SqliteFailure(err, msg)
            if err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            Some(msg.clone().unwrap_or_default())
        }
        _ => None,
    }
}

fn conflict_on_name(e: rusqlite::Error, what: &str) -> StoreError {
    match unique_violation(&e) {
        Some(msg) if msg.contains(".name") => {
            StoreError::Conflict(format!("a {what} with this name already exists"))
        }
        Some(msg) => StoreError::Conflict(msg),
        None => e.into(),
    }
}

/// The JSON path of a top-level key (a plain word: no quoting needed).
fn json_path(key: &str) -> Result<String> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(StoreError::Corrupt(format!("{key:?} is not a state key")));
    }
    Ok(format!("$.{key}"))
}

fn parse_json(col: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn json_col(row: &Row, col: &str) -> Result<Value> {
    parse_json(col, &row.get::<_, String>(col)?)
}

fn opt_json_col(row: &Row, col: &str) -> Result<Option<Value>> {
    row.get::<_, Option<String>>(col)?
        .map(|t| parse_json(col, &t))
        .transpose()
}

fn parse_enum<T>(row: &Row, col: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    let text: String = row.get(col)?;
    parse(&text).ok_or_else(|| StoreError::Corrupt(format!("{col}: unknown value {text:?}")))
}

fn target_from_row(row: &Row) -> Result<TargetRecord> {
    Ok(TargetRecord {
        id: row.get("id")?,
        name: row.get("name")?,
        kind: row.get("kind")?,
        status: row.get("status")?,
        host: row.get("host")?,
        root: row.get("root")?,
        http_port: row.get::<_, i64>("http_port")? as u16,
        https_port: row.get::<_, i64>("https_port")? as u16,
        web_user: row.get("web_user")?,
        host_key: row.get("host_key")?,
        inspection: opt_json_col(row, "inspection")?,
        settings: typed_json_col(row, "settings")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
    })
}

fn typed_json_col<T: serde::de::DeserializeOwned>(row: &Row, col: &str) -> Result<T> {
    serde_json::from_value(json_col(row, col)?)
        .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn environment_from_row(row: &Row) -> Result<EnvironmentRecord> {
    Ok(EnvironmentRecord {
        id: row.get("id")?,
        name: row.get("name")?,
        project_id: row.get("project_id")?,
        target_id: row.get("target_id")?,
        release_id: row.get("release_id")?,
        domain: row.get("domain")?,
        aliases: typed_json_col(row, "aliases")?,
        https: parse_enum(row, "https", Https::parse)?,
        status: row.get("status")?,
        secrets: Secret::new(json_col(row, "secrets")?),
        resources: json_col(row, "resources")?,
        settings: json_col(row, "settings")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
    })
}

fn backup_from_row(row: &Row) -> Result<BackupRecord> {
    Ok(BackupRecord {
        id: row.get("id")?,
        environment_id: row.get("environment_id")?,
        operation_id: row.get("operation_id")?,
        kind: row.get("kind")?,
        description: row.get("description")?,
        status: row.get("status")?,
        object_key: row.get("object_key")?,
        size: row.get("size")?,
        sha256: row.get("sha256")?,
        manifest: opt_json_col(row, "manifest")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
    })
}

fn project_from_row(row: &Row) -> Result<ProjectRecord> {
    Ok(ProjectRecord {
        id: row.get("id")?,
        name: row.get("name")?,
        git_url: row.get("git_url")?,
        branch: row.get("branch")?,
        status: row.get("status")?,
        manifest: opt_json_col(row, "manifest")?,
        deploy_key: deploy_key(
            row.get("deploy_public_key")?,
            row.get("deploy_private_key")?,
        ),
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
    })
}

fn release_from_row(row: &Row) -> Result<ReleaseRecord> {
    Ok(ReleaseRecord {
        id: row.get("id")?,
        project_id: row.get("project_id")?,
        git_ref: row.get("git_ref")?,
        commit: row.get("commit_sha")?,
        status: row.get("status")?,
        artifact_sha256: row.get("artifact_sha256")?,
        artifact_size: row.get("artifact_size")?,
        image: row.get("image")?,
        build_operation_id: row.get("build_operation_id")?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
    })
}

fn operation_from_row(row: &Row, tasks: Vec<TaskRecord>) -> Result<OperationRecord> {
    Ok(OperationRecord {
        id: row.get("id")?,
        kind: parse_enum(row, "kind", OperationKind::parse)?,
        subject_type: parse_enum(row, "subject_type", SubjectType::parse)?,
        subject_id: row.get("subject_id")?,
        status: parse_enum(row, "status", OperationStatus::parse)?,
        attempt: row.get("attempt")?,
        parent_id: row.get("parent_id")?,
        requested_by: row.get("requested_by")?,
        inputs: json_col(row, "inputs")?,
        state: json_col(row, "state")?,
        result: json_col(row, "result")?,
        error: row.get("error")?,
        cancel_requested: row.get::<_, i64>("cancel_requested")? != 0,
        deliveries: row.get("deliveries")?,
        queue: row.get("queue")?,
        created_at: row.get("created_at")?,
        started_at: row.get("started_at")?,
        finished_at: row.get("finished_at")?,
        updated_at: row.get("updated_at")?,
        tasks,
    })
}

fn task_from_row(row: &Row) -> Result<TaskRecord> {
    Ok(TaskRecord {
        position: row.get("position")?,
        name: row.get("name")?,
        status: parse_enum(row, "status", TaskStatus::parse)?,
        attempts: row.get("attempts")?,
        rollback: row.get::<_, i64>("rollback")? != 0,
        started_at: row.get("started_at")?,
        finished_at: row.get("finished_at")?,
    })
}

/// Runs `sql` and maps every row; `map` may fail with a store error.
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl Fn(&Row) -> Result<T>,
) -> Result<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(map(row)?);
    }
    Ok(out)
}

fn query_one<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl Fn(&Row) -> Result<T>,
) -> Result<Option<T>> {
    Ok(query_all(conn, sql, params, map)?.into_iter().next())
}

fn load_tasks(conn: &Connection, id: &str) -> Result<Vec<TaskRecord>> {
    query_all(
        conn,
        "SELECT * FROM tasks WHERE operation_id = ? ORDER BY position",
        [id],
        task_from_row,
    )
}

fn load_operation(conn: &Connection, id: &str) -> Result<Option<OperationRecord>> {
    let Some(row) = query_one(conn, "SELECT * FROM operations WHERE id = ?", [id], |row| {
        operation_from_row(row, Vec::new())
    })?
    else {
        return Ok(None);
    };
    Ok(Some(OperationRecord {
        tasks: load_tasks(conn, id)?,
        ..row
    }))
}

fn must_load(conn: &Connection, id: &str) -> Result<OperationRecord> {
    load_operation(conn, id)?.ok_or(StoreError::NotFound)
}

/// The active operation sharing `dedupe_key`, to name it in a 409.
fn active_duplicate(conn: &Connection, dedupe_key: &str) -> Result<StoreError> {
    let existing: Option<String> = conn
        .query_row(
            "SELECT id FROM operations WHERE dedupe_key = ? AND status IN ('queued', 'running')",
            [dedupe_key],
            |r| r.get(0),
        )
        .optional()?;
    Ok(StoreError::Duplicate {
        existing: existing.unwrap_or_default(),
    })
}

fn check_lease(conn: &Connection, id: &str, owner: &str) -> Result<()> {
    let held: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM operations WHERE id = ? AND lease_owner = ? AND status = 'running'",
            [id, owner],
            |r| r.get(0),
        )
        .optional()?;
    held.map(|_| ())
        .ok_or_else(|| StoreError::LeaseLost(id.into()))
}

fn end_operation(
    conn: &Connection,
    id: &str,
    owner: &str,
    outcome: &OperationOutcome,
    now: i64,
) -> Result<()> {
    let done = conn.prepare_cached(
        "UPDATE operations SET status = ?, result = ?, error = ?, finished_at = ?, updated_at = ?,
                lease_owner = NULL, lease_expires_at = NULL, cancel_requested = 0
         WHERE id = ? AND lease_owner = ? AND status = 'running'",
    )?
    .execute(params![outcome.status.as_str(), outcome.result.to_string(), outcome.error, now, now, id, owner])?;
    if done == 0 {
        return Err(StoreError::LeaseLost(id.into()));
    }
    if outcome.status == OperationStatus::Cancelled {
        conn.prepare_cached(
            "UPDATE tasks SET status = 'cancelled', finished_at = COALESCE(finished_at, ?)
             WHERE operation_id = ? AND status IN ('pending', 'running')",
        )?
        .execute(params![now, id])?;
    }
    Ok(())
}

/// `WHERE`/`AND` plus the cursor condition, and the order and limit, of a list query.
fn page_clause(sql: &mut String, args: &mut Vec<Sql>, page: &Page, has_where: bool) {
    if let Some(cursor) = &page.cursor {
        sql.push_str(if has_where {
            " AND id < ?"
        } else {
            " WHERE id < ?"
        });
        args.push(Sql::Text(cursor.clone()));
    }
    sql.push_str(" ORDER BY id DESC LIMIT ?");
    args.push(Sql::Integer(page.limit as i64 + 1));
}

fn paged<T>(mut items: Vec<T>, page: &Page, id: impl Fn(&T) -> &str) -> Listed<T> {
    let next = if items.len() > page.limit as usize {
        items.truncate(page.limit as usize);
        items.last().map(|i| id(i).to_string())
    } else {
        None
    };
    Listed { items, next }
}

fn list_page<T>(
    conn: &Connection,
    base: &str,
    mut args: Vec<Sql>,
    has_where: bool,
    page: &Page,
    map: impl Fn(&Row) -> Result<T>,
    id: impl Fn(&T) -> &str,
) -> Result<Listed<T>> {
    let mut sql = base.to_string();
    page_clause(&mut sql, &mut args, page, has_where);
    let items = query_all(conn, &sql, params_from_iter(args), map)?;
    Ok(paged(items, page, id))
}

/// `AND alias.id = ?` and `AND alias.queue IN (...)` for a claim.
fn narrow(sql: &mut String, args: &mut Vec<Sql>, only: &Option<String>, queues: &[String]) {
    if let Some(only) = only {
        sql.push_str(" AND o.id = ?");
        args.push(Sql::Text(only.clone()));
    }
    if !queues.is_empty() {
        sql.push_str(" AND o.queue IN (");
        sql.push_str(&vec!["?"; queues.len()].join(", "));
        sql.push(')');
        args.extend(queues.iter().map(|q| Sql::Text(q.clone())));
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_target(&self, t: &TargetRecord) -> Result<()> {
        let t = t.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO targets (id, name, kind, status, host, root, http_port, https_port,
                    web_user, host_key, inspection, settings, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )?
            .execute(params![
                t.id,
                t.name,
                t.kind,
                t.status,
                t.host,
                t.root,
                t.http_port as i64,
                t.https_port as i64,
                t.web_user,
                t.host_key,
                t.inspection.as_ref().map(Value::to_string),
                to_json(&t.settings),
                t.created_at,
                t.updated_at
            ])
            .map_err(|e| conflict_on_name(e, "target"))?;
            Ok(())
        })
        .await
    }

    async fn get_target(&self, id: &str) -> Result<Option<TargetRecord>> {
        let id = id.to_string();
        self.read(move |conn| {
            query_one(
                conn,
                "SELECT * FROM targets WHERE id = ?",
                [id],
                target_from_row,
            )
        })
        .await
    }

    async fn target_by_name(&self, name: &str) -> Result<Option<TargetRecord>> {
        let name = name.to_string();
        self.read(move |conn| {
            query_one(
                conn,
                "SELECT * FROM targets WHERE name = ?",
                [name],
                target_from_row,
            )
        })
        .await
    }

    async fn list_targets(&self, page: &Page) -> Result<Listed<TargetRecord>> {
        let page = page.clone();
        self.read(move |conn| {
            list_page(
                conn,
                "SELECT * FROM targets",
                Vec::new(),
                false,
                &page,
                target_from_row,
                |t| &t.id,
            )
        })
        .await
    }

    async fn update_target(&self, t: &TargetRecord) -> Result<()> {
        let t = t.clone();
        self.write(move |conn| {
            let done = conn
                .prepare_cached(
                    "UPDATE targets SET status = ?, host_key = ?, inspection = ?, settings = ?, updated_at = ?
                     WHERE id = ?",
                )?
                .execute(params![
                    t.status,
                    t.host_key,
                    t.inspection.as_ref().map(Value::to_string),
                    to_json(&t.settings),
                    t.updated_at,
                    t.id
                ])?;
            if done == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn delete_target(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM targets WHERE id = ?")?
                .execute([id])?;
            Ok(())
        })
        .await
    }

    async fn insert_project(&self, p: &ProjectRecord) -> Result<()> {
        let p = p.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO projects (id, name, git_url, branch, status, manifest, deploy_public_key,
                    deploy_private_key, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )?
            .execute(params![
                p.id,
                p.name,
                p.git_url,
                p.branch,
                p.status,
                p.manifest.as_ref().map(Value::to_string),
                p.deploy_key.as_ref().map(|k| k.public_key.clone()),
                p.deploy_key.as_ref().map(|k| k.private_key.expose().clone()),
                p.created_at,
                p.updated_at
            ])
            .map_err(|e| conflict_on_name(e, "project"))?;
            Ok(())
        })
        .await
    }

    async fn get_project(&self, id: &str) -> Result<Option<ProjectRecord>> {
        let id = id.to_string();
        self.read(move |conn| {
            query_one(
                conn,
                "SELECT * FROM projects WHERE id = ?",
                [id],
                project_from_row,
            )
        })
        .await
    }

    async fn list_projects(&self, page: &Page) -> Result<Listed<ProjectRecord>> {
        let page = page.clone();
        self.read(move |conn| {
            list_page(
                conn,
                "SELECT * FROM projects",
                Vec::new(),
                false,
                &page,
                project_from_row,
                |p| &p.id,
            )
        })
        .await
    }

    async fn update_project(&self, p: &ProjectRecord) -> Result<()> {
        let p = p.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                // A deploy key is never removed: a record read before it was made keeps it.
                "UPDATE projects SET status = ?, manifest = ?,
                    deploy_public_key = COALESCE(?, deploy_public_key),
                    deploy_private_key = COALESCE(?, deploy_private_key), updated_at = ? WHERE id = ?",
            )?
            .execute(params![
                p.status,
                p.manifest.as_ref().map(Value::to_string),
                p.deploy_key.as_ref().map(|k| k.public_key.clone()),
                p.deploy_key
                    .as_ref()
                    .map(|k| k.private_key.expose().clone()),
                p.updated_at,
                p.id
            ])?;
            Ok(())
        })
        .await
    }

    async fn insert_release(&self, r: &ReleaseRecord) -> Result<()> {
        let r = r.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO releases (id, project_id, git_ref, commit_sha, status, artifact_sha256,
                    artifact_size, image, build_operation_id, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )?
            .execute(params![
                r.id,
                r.project_id,
                r.git_ref,
                r.commit,
                r.status,
                r.artifact_sha256,
                r.artifact_size,
                r.image,
                r.build_operation_id,
                r.created_at,
                r.updated_at
            ])
            .map_err(|e| match unique_violation(&e) {
                Some(_) => StoreError::Conflict("a release of this commit already exists".into()),
                None => e.into(),
            })?;
            Ok(())
        })
        .await
    }

    async fn get_release(&self, id: &str) -> Result<Option<ReleaseRecord>> {
        let id = id.to_string();
        self.read(move |conn| {
            query_one(
                conn,
                "SELECT * FROM releases WHERE id = ?",
                [id],
                release_from_row,
            )
        })
        .await
    }

    async fn release_by_commit(
        &self,
        project: &str,
        commit: &str,
    ) -> Result<Option<ReleaseRecord>> {
        let (project, commit) = (project.to_string(), commit.to_string());
        self.read(move |conn| {
            query_one(
                conn,
                "SELECT * FROM releases WHERE project_id = ? AND commit_sha = ?",
                [project, commit],
                release_from_row,
            )
        })
        .await
    }

    async fn list_releases(
        &self,
        project: Option<&str>,
        page: &Page,
    ) -> Result<Listed<ReleaseRecord>> {
        let (project, page) = (project.map(str::to_string), page.clone());
        self.read(move |conn| match project {
            Some(project) => list_page(
                conn,
                "SELECT * FROM releases WHERE project_id = ?",
                vec![Sql::Text(project)],
                true,
                &page,
                release_from_row,
                |r| &r.id,
            ),
            None => list_page(
                conn,
                "SELECT * FROM releases",
                Vec::new(),
                false,
                &page,
                release_from_row,
                |r| &r.id,
            ),
        })
        .await
    }

    async fn update_release(&self, r: &ReleaseRecord) -> Result<()> {
        let r = r.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE releases SET status = ?, artifact_sha256 = ?, artifact_size = ?, image = ?,
                    build_operation_id = ?, updated_at = ? WHERE id = ?",
            )?
            .execute(params![
                r.status,
                r.artifact_sha256,
                r.artifact_size,
                r.image,
                r.build_operation_id,
                r.updated_at,
                r.id
            ])?;
            Ok(())
        })
        .await
    }

    async fn insert_environment(&self, e: &EnvironmentRecord) -> Result<()> {
        let e = e.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO environments (id, name, project_id, target_id, release_id, domain, aliases,
                    https, status, secrets, resources, settings, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )?
            .execute(params![
                e.id,
                e.name,
                e.project_id,
                e.target_id,
                e.release_id,
                e.domain,
                to_json(&e.aliases),
                e.https.as_str(),
                e.status,
                e.secrets.expose().to_string(),
                e.resources.to_string(),
                e.settings.to_string(),
                e.created_at,
                e.updated_at
            ])
            .map_err(|err| match unique_violation(&err) {
                Some(msg) if msg.contains("domain") => {
                    StoreError::Conflict("another environment already uses this domain".into())
                }
                Some(_) => StoreError::Conflict(
                    "an environment with this name already exists in the project".into(),
                ),
                None => err.into(),
            })?;
            Ok(())
        })
        .await
    }

    async fn get_environment(&self, id: &str) -> Result<Option<EnvironmentRecord>> {
        let id = id.to_string();
        self.read(move |conn| {
            query_one(
                conn,
                "SELECT * FROM environments WHERE id = ?",
                [id],
                environment_from_row,
            )
        })
        .await
    }

    async fn list_environments(
        &self,
        filter: &EnvironmentFilter,
        page: &Page,
    ) -> Result<Listed<EnvironmentRecord>> {
        let filter = filter.clone();
        let page = page.clone();
        self.read(move |conn| {
            let mut sql = String::from("SELECT * FROM environments WHERE 1 = 1");
            let mut args = Vec::new();
            for (column, value) in [
                ("project_id", &filter.project),
                ("target_id", &filter.target),
                ("release_id", &filter.release),
            ] {
                if let Some(value) = value {
                    sql.push_str(&format!(" AND {column} = ?"));
                    args.push(Sql::Text(value.clone()));
                }
            }
            if !filter.include_deleted {
                sql.push_str(" AND status != 'deleted'");
            }
            list_page(conn, &sql, args, true, &page, environment_from_row, |e| {
                &e.id
            })
        })
        .await
    }

    async fn update_environment(&self, e: &EnvironmentRecord) -> Result<()> {
        let e = e.clone();
        self.write(move |conn| {
            let done = conn
                .prepare_cached(
                    "UPDATE environments SET release_id = ?, domain = ?, aliases = ?, https = ?,
                        status = ?, secrets = ?, resources = ?, settings = ?, target_id = ?,
                        updated_at = ? WHERE id = ?",
                )?
                .execute(params![
                    e.release_id,
                    e.domain,
                    to_json(&e.aliases),
                    e.https.as_str(),
                    e.status,
                    e.secrets.expose().to_string(),
                    e.resources.to_string(),
                    e.settings.to_string(),
                    e.target_id,
                    e.updated_at,
                    e.id
                ])?;
            if done == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn count_redelivery(&self, id: &str) -> Result<Option<i64>> {
        let id = id.to_string();
        self.write(move |conn| {
            Ok(conn
                .prepare_cached(
                    "UPDATE operations SET deliveries = deliveries + 1 WHERE id = ? RETURNING deliveries",
                )?
                .query_row([id], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    async fn environments_running(&self, release: &str) -> Result<Vec<String>> {
        let release = release.to_string();
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT id FROM environments WHERE release_id = ? AND status != 'deleted' ORDER BY id",
                [release],
                |r| Ok(r.get(0)?),
            )
        })
        .await
    }

    async fn environments_on_target(&self, target: &str) -> Result<Vec<String>> {
        let target = target.to_string();
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT id FROM environments WHERE target_id = ? AND status != 'deleted' ORDER BY id",
                [target],
                |r| Ok(r.get(0)?),
            )
        })
        .await
    }

    async fn insert_backup(&self, b: &BackupRecord) -> Result<()> {
        let b = b.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO backups (id, environment_id, operation_id, kind, description, status,
                    object_key, size, sha256, manifest, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )?
            .execute(params![
                b.id,
                b.environment_id,
                b.operation_id,
                b.kind,
                b.description,
                b.status,
                b.object_key,
                b.size,
                b.sha256,
                b.manifest.as_ref().map(|m| m.to_string()),
                b.created_at,
                b.updated_at
            ])?;
            Ok(())
        })
        .await
    }

    async fn get_backup(&self, id: &str) -> Result<Option<BackupRecord>> {
        let id = id.to_string();
        self.read(move |conn| {
            query_one(
                conn,
                "SELECT * FROM backups WHERE id = ?",
                [id],
                backup_from_row,
            )
        })
        .await
    }

    async fn list_backups(
        &self,
        filter: &BackupFilter,
        page: &Page,
    ) -> Result<Listed<BackupRecord>> {
        let filter = filter.clone();
        let page = page.clone();
        self.read(move |conn| {
            let mut sql = String::from("SELECT * FROM backups WHERE status != 'deleted'");
            let mut args = Vec::new();
            for (column, value) in [
                ("environment_id", &filter.environment),
                ("operation_id", &filter.operation),
                ("kind", &filter.kind),
                ("status", &filter.status),
            ] {
                if let Some(value) = value {
                    sql.push_str(&format!(" AND {column} = ?"));
                    args.push(Sql::Text(value.clone()));
                }
            }
            list_page(conn, &sql, args, true, &page, backup_from_row, |b| &b.id)
        })
        .await
    }

    async fn update_backup(&self, b: &BackupRecord) -> Result<()> {
        let b = b.clone();
        self.write(move |conn| {
            let done = conn
                .prepare_cached(
                    "UPDATE backups SET description = ?, status = ?, size = ?, sha256 = ?,
                        manifest = ?, updated_at = ? WHERE id = ?",
                )?
                .execute(params![
                    b.description,
                    b.status,
                    b.size,
                    b.sha256,
                    b.manifest.as_ref().map(|m| m.to_string()),
                    b.updated_at,
                    b.id
                ])?;
            if done == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn create_operation(&self, new: &NewOperation, now: i64) -> Result<OperationRecord> {
        let new = new.clone();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let dedupe_key = new.dedupe_key();
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO operations (id, kind, subject_type, subject_id, status, attempt, parent_id,
                        requested_by, inputs, dedupe_key, state, result, queue, created_at, queued_at, updated_at)
                     VALUES (?, ?, ?, ?, 'queued', 1, ?, ?, ?, ?, '{}', '{}', ?, ?, ?, ?)",
                )?
                .execute(params![
                    new.id,
                    new.kind.as_str(),
                    new.subject_type.as_str(),
                    new.subject_id,
                    new.parent_id,
                    new.requested_by,
                    new.inputs.to_string(),
                    dedupe_key,
                    new.queue,
                    now,
                    now,
                    now
                ]);
            if let Err(e) = inserted {
                match unique_violation(&e) {
                    Some(msg) if msg.contains("dedupe_key") => return Err(active_duplicate(&tx, &dedupe_key)?),
                    Some(msg) => return Err(StoreError::Conflict(msg)),
                    None => {}
                }
                return Err(e.into());
            }
            {
                let mut insert_task = tx.prepare_cached(
                    "INSERT INTO tasks (operation_id, position, name, status) VALUES (?, ?, ?, 'pending')",
                )?;
                for (i, name) in new.tasks.iter().enumerate() {
                    insert_task.execute(params![new.id, i as i64, name])?;
                }
            }
            let record = must_load(&tx, &new.id)?;
            tx.commit()?;
            Ok(record)
        })
        .await
    }

    async fn get_operation(&self, id: &str) -> Result<Option<OperationRecord>> {
        let id = id.to_string();
        self.read(move |conn| load_operation(conn, &id)).await
    }

    async fn list_operations(
        &self,
        filter: &OperationFilter,
        page: &Page,
    ) -> Result<Listed<OperationRecord>> {
        let (filter, page) = (filter.clone(), page.clone());
        self.read(move |conn| {
            let mut sql = String::from("SELECT id FROM operations WHERE 1 = 1");
            let mut args = Vec::new();
            if let Some(subject) = filter.subject {
                sql.push_str(" AND subject_id = ?");
                args.push(Sql::Text(subject));
            }
            if let Some(status) = filter.status {
                sql.push_str(" AND status = ?");
                args.push(Sql::Text(status.as_str().into()));
            }
            if let Some(parent) = filter.parent {
                sql.push_str(" AND parent_id = ?");
                args.push(Sql::Text(parent));
            }
            page_clause(&mut sql, &mut args, &page, true);
            let ids: Vec<String> =
                query_all(conn, &sql, params_from_iter(args), |r| Ok(r.get(0)?))?;
            let mut items = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(record) = load_operation(conn, &id)? {
                    items.push(record);
                }
            }
            Ok(paged(items, &page, |o| &o.id))
        })
        .await
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<OperationRecord>> {
        let last_scan = self.last_expiry_scan.load(Ordering::Relaxed);
        let scan_expired = claim.only.is_some() || claim.now.saturating_sub(last_scan) >= 1000;
        if scan_expired && claim.only.is_none() {
            self.last_expiry_scan.store(claim.now, Ordering::Relaxed);
        }
        let (owner, now, until) = (claim.owner.to_string(), claim.now, claim.lease_until);
        let (only, queues) = (claim.only.map(str::to_string), claim.queues.to_vec());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut claimed: Option<OperationRecord> = None;
            if scan_expired {
                // A lease that expired belongs to a worker that died: take the operation over.
                let mut sql = String::from(
                    "UPDATE operations SET lease_owner = ?, lease_expires_at = ?, updated_at = ?
                     WHERE id = (SELECT o.id FROM operations o
                                 WHERE o.status = 'running' AND o.lease_expires_at < ?",
                );
                let mut args = vec![Sql::Text(owner.clone()), Sql::Integer(until), Sql::Integer(now), Sql::Integer(now)];
                narrow(&mut sql, &mut args, &only, &queues);
                sql.push_str(" ORDER BY o.lease_expires_at LIMIT 1) RETURNING *");
                claimed = query_one(&tx, &sql, params_from_iter(args), |r| operation_from_row(r, Vec::new()))?;
            }
            if claimed.is_none() {
                let mut sql = String::from(
                    "UPDATE operations SET status = 'running', lease_owner = ?, lease_expires_at = ?,
                        started_at = COALESCE(started_at, ?), updated_at = ?
                     WHERE id = (SELECT o.id FROM operations o WHERE o.status = 'queued'
                       AND NOT EXISTS (SELECT 1 FROM operations r
                           WHERE r.subject_id = o.subject_id AND r.status = 'running')
                       AND NOT EXISTS (SELECT 1 FROM operations q
                           WHERE q.subject_id = o.subject_id AND q.status = 'queued'
                             AND (q.queued_at < o.queued_at OR (q.queued_at = o.queued_at AND q.id < o.id)))",
                );
                let mut args = vec![Sql::Text(owner.clone()), Sql::Integer(until), Sql::Integer(now), Sql::Integer(now)];
                narrow(&mut sql, &mut args, &only, &queues);
                sql.push_str(" ORDER BY o.queued_at, o.id LIMIT 1) RETURNING *");
                claimed = query_one(&tx, &sql, params_from_iter(args), |r| operation_from_row(r, Vec::new()))?;
            }
            let record = match claimed {
                Some(op) => {
                    let tasks = load_tasks(&tx, &op.id)?;
                    Some(OperationRecord { tasks, ..op })
                }
                None => None,
            };
            tx.commit()?;
            Ok(record)
        })
        .await
    }

    async fn renew_lease(&self, id: &str, owner: &str, until: i64) -> Result<LeaseState> {
        let (id, owner) = (id.to_string(), owner.to_string());
        self.write(move |conn| {
            let cancel: Option<i64> = conn
                .prepare_cached(
                    "UPDATE operations SET lease_expires_at = ?
                     WHERE id = ? AND lease_owner = ? AND status = 'running' RETURNING cancel_requested",
                )?
                .query_row(params![until, id, owner], |r| r.get(0))
                .optional()?;
            Ok(match cancel {
                Some(flag) => LeaseState::Held { cancel_requested: flag != 0 },
                None => LeaseState::Lost,
            })
        })
        .await
    }

    async fn expire_all_leases(&self) -> Result<u64> {
        self.last_expiry_scan.store(i64::MIN, Ordering::Relaxed);
        self.write(|conn| {
            Ok(conn.execute(
                "UPDATE operations SET lease_expires_at = 0 WHERE status = 'running'",
                [],
            )? as u64)
        })
        .await
    }

    async fn start_task(&self, id: &str, owner: &str, position: i64, now: i64) -> Result<()> {
        let (id, owner) = (id.to_string(), owner.to_string());
        self.write(move |conn| {
            let done = conn
                .prepare_cached(
                    "UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = ?, finished_at = NULL
                     WHERE operation_id = ? AND position = ?
                       AND EXISTS (SELECT 1 FROM operations
                                   WHERE id = ? AND lease_owner = ? AND status = 'running')",
                )?
                .execute(params![now, id, position, id, owner])?;
            if done == 0 {
                return Err(StoreError::LeaseLost(id));
            }
            Ok(())
        })
        .await
    }

    async fn finish_task(
        &self,
        id: &str,
        owner: &str,
        position: i64,
        outcome: &TaskOutcome,
        finish: Option<&OperationOutcome>,
        now: i64,
    ) -> Result<()> {
        let (id, owner, outcome, finish) = (
            id.to_string(),
            owner.to_string(),
            outcome.clone(),
            finish.cloned(),
        );
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let sql = if outcome.status == TaskStatus::Skipped {
                "UPDATE tasks SET status = ?, finished_at = ?, started_at = NULL
                 WHERE operation_id = ? AND position = ?
                   AND EXISTS (SELECT 1 FROM operations WHERE id = ? AND lease_owner = ? AND status = 'running')"
            } else {
                "UPDATE tasks SET status = ?, finished_at = ?
                 WHERE operation_id = ? AND position = ?
                   AND EXISTS (SELECT 1 FROM operations WHERE id = ? AND lease_owner = ? AND status = 'running')"
            };
            let updated = tx.prepare_cached(sql)?.execute(params![outcome.status.as_str(), now, id, position, id, owner])?;
            if updated == 0 {
                return Err(StoreError::LeaseLost(id));
            }
            if let Some(patch) = &outcome.state_patch {
                tx.prepare_cached("UPDATE operations SET state = json_patch(state, ?), updated_at = ? WHERE id = ?")?
                    .execute(params![patch.to_string(), now, id])?;
            }
            if let Some(finish) = &finish {
                end_operation(&tx, &id, &owner, finish, now)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn begin_rollback(
        &self,
        id: &str,
        owner: &str,
        names: &[&str],
        ending: &Value,
    ) -> Result<()> {
        let (id, owner, ending) = (id.to_string(), owner.to_string(), ending.clone());
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            check_lease(&tx, &id, &owner)?;
            tx.execute("UPDATE operations SET state = json_patch(state, ?) WHERE id = ?", params![ending.to_string(), id])?;
            let next: i64 = tx.query_row(
                "SELECT COALESCE(MAX(position), -1) + 1 FROM tasks WHERE operation_id = ?",
                [&id],
                |r| r.get(0),
            )?;
            for (i, name) in names.iter().enumerate() {
                tx.execute(
                    "INSERT INTO tasks (operation_id, position, name, status, rollback) VALUES (?, ?, ?, 'pending', 1)",
                    params![id, next + i as i64, name],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn finish_operation(
        &self,
        id: &str,
        owner: &str,
        outcome: &OperationOutcome,
        now: i64,
    ) -> Result<()> {
        let (id, owner, outcome) = (id.to_string(), owner.to_string(), outcome.clone());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            end_operation(&tx, &id, &owner, &outcome, now)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn request_cancel(&self, id: &str, now: i64) -> Result<OperationRecord> {
        let id = id.to_string();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let current = must_load(&tx, &id)?;
            op::transition(current.status, OperationEvent::Cancel)
                .map_err(|e| StoreError::InvalidTransition(e.to_string()))?;
            if current.status == OperationStatus::Queued {
                tx.execute(
                    "UPDATE operations SET status = 'cancelled', finished_at = ?, updated_at = ? WHERE id = ?",
                    params![now, now, id],
                )?;
                tx.execute(
                    "UPDATE tasks SET status = 'cancelled', finished_at = ? WHERE operation_id = ? AND status = 'pending'",
                    params![now, id],
                )?;
            } else {
                tx.execute("UPDATE operations SET cancel_requested = 1, updated_at = ? WHERE id = ?", params![now, id])?;
            }
            let record = must_load(&tx, &id)?;
            tx.commit()?;
            Ok(record)
        })
        .await
    }

    async fn retry_operation(
        &self,
        id: &str,
        from_start: bool,
        now: i64,
    ) -> Result<OperationRecord> {
        let id = id.to_string();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let current = must_load(&tx, &id)?;
            op::transition(current.status, OperationEvent::Retry)
                .map_err(|e| StoreError::InvalidTransition(e.to_string()))?;
            tx.execute(
                "DELETE FROM tasks WHERE operation_id = ? AND rollback = 1",
                [&id],
            )?;
            let planned: Vec<&TaskRecord> = current.tasks.iter().filter(|t| !t.rollback).collect();
            let statuses: Vec<TaskStatus> = planned.iter().map(|t| t.status).collect();
            for (task, status) in planned
                .iter()
                .zip(op::statuses_for_retry(&statuses, from_start))
            {
                if status != task.status {
                    tx.execute(
                        "UPDATE tasks SET status = ?, started_at = NULL, finished_at = NULL
                         WHERE operation_id = ? AND position = ?",
                        params![status.as_str(), id, task.position],
                    )?;
                }
            }
            let requeued = tx.execute(
                &format!(
                    "UPDATE operations SET status = 'queued', attempt = attempt + 1, error = NULL,
                        result = '{{}}', cancel_requested = 0, finished_at = NULL, queued_at = ?,
                        updated_at = ?, lease_owner = NULL, lease_expires_at = NULL{}
                     WHERE id = ?",
                    if from_start { ", state = '{}'" } else { "" }
                ),
                params![now, now, id],
            );
            if let Err(e) = requeued {
                if unique_violation(&e).is_some() {
                    let key: String = tx.query_row(
                        "SELECT dedupe_key FROM operations WHERE id = ?",
                        [&id],
                        |r| r.get(0),
                    )?;
                    return Err(active_duplicate(&tx, &key)?);
                }
                return Err(e.into());
            }
            let record = must_load(&tx, &id)?;
            tx.commit()?;
            Ok(record)
        })
        .await
    }

    async fn append_logs(&self, id: &str, lines: &[NewLogLine]) -> Result<()> {
        let (id, lines) = (id.to_string(), lines.to_vec());
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO log_lines (operation_id, attempt, at, task, stream, text) VALUES (?, ?, ?, ?, ?, ?)",
                )?;
                for line in &lines {
                    insert.execute(params![id, line.attempt, line.at, line.task, line.stream, line.text])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn read_logs(&self, id: &str, after_seq: i64, limit: u32) -> Result<Vec<LogLine>> {
        let id = id.to_string();
        self.read(move |conn| {
            query_all(
                conn,
                "SELECT seq, attempt, at, task, stream, text FROM log_lines
                 WHERE operation_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                params![id, after_seq, limit as i64],
                |row| {
                    Ok(LogLine {
                        seq: row.get("seq")?,
                        attempt: row.get("attempt")?,
                        at: row.get("at")?,
                        task: row.get("task")?,
                        stream: row.get("stream")?,
                        text: row.get("text")?,
                    })
                },
            )
        })
        .await
    }

    async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        let key = key.to_string();
        self.read(move |conn| {
            query_one(
                conn,
                "SELECT value FROM settings WHERE key = ?",
                [key],
                |r| Ok(r.get(0)?),
            )
        })
        .await
    }

    async fn remove_state_key(&self, id: &str, key: &str) -> Result<()> {
        let (id, path) = (id.to_string(), json_path(key)?);
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE operations SET state = json_remove(state, ?) WHERE id = ?",
            )?
            .execute([path, id])?;
            Ok(())
        })
        .await
    }

    async fn scrub(&self) -> Result<()> {
        self.write(|conn| {
            conn.execute_batch("VACUUM")?;
            // Readers may hold the WAL a moment: try again until it is empty.
            for _ in 0..100 {
                let busy: i64 =
                    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
                if busy == 0 {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(StoreError::Corrupt(
                "the WAL could not be truncated after a VACUUM".into(),
            ))
        })
        .await
    }

    async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let (key, value) = (key.to_string(), value.to_string());
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO settings (key, value) VALUES (?, ?)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute([key, value])?;
            Ok(())
        })
        .await
    }

    async fn replace_setting(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool> {
        let (key, expected, value) = (
            key.to_string(),
            expected.map(str::to_string),
            value.to_string(),
        );
        self.write(move |conn| {
            let changed = match expected {
                None => conn
                    .prepare_cached(
                        "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                    )?
                    .execute([key, value])?,
                Some(expected) => conn
                    .prepare_cached("UPDATE settings SET value = ? WHERE key = ? AND value = ?")?
                    .execute([value, key, expected])?,
            };
            Ok(changed == 1)
        })
        .await
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        let t = t.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO api_tokens (id, name, token_sha256, role, created_at) VALUES (?, ?, ?, ?, ?)",
            )?
            .execute(params![t.id, t.name, t.token_sha256, t.role, t.created_at])?;
            Ok(())
        })
        .await
    }

    async fn token_by_hash(&self, sha256: &str) -> Result<Option<TokenRecord>> {
        let sha256 = sha256.to_string();
        self.read(move |conn| {
            query_one(
                conn,
                "SELECT * FROM api_tokens WHERE token_sha256 = ?",
                [sha256],
                |row| {
                    Ok(TokenRecord {
                        id: row.get("id")?,
                        name: row.get("name")?,
                        token_sha256: row.get("token_sha256")?,
                        role: row.get("role")?,
                        created_at: row.get("created_at")?,
                    })
                },
            )
        })
        .await
    }
}
