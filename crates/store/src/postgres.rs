//! The PostgreSQL store (distributed mode): one pool per process, any number of worker
//! processes on any number of machines. It behaves like the SQLite store; what SQLite gets from
//! having a single writer, this store gets from row locks:
//!
//! - a write that reads before it writes first locks the operation's row (`FOR UPDATE`), so a
//!   cancel, a retry, a task record and a lease takeover never interleave;
//! - a claim locks the row it picks with `FOR UPDATE SKIP LOCKED`, so two workers never take
//!   the same operation and never wait on each other;
//! - the two unique partial indexes stay the final arbiter: a claim that loses a race to them
//!   is rolled back and tried again, and is never reported as an error.
//!
//! JSON is stored as TEXT, as in SQLite, and the operation's `state` is merged with an RFC 7396
//! merge patch (SQLite's `json_patch`) while its row is locked.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use async_trait::async_trait;
use hefring_core::operation::{
    self as op, OperationEvent, OperationKind, OperationStatus, SubjectType, TaskStatus,
};
use hefring_core::render::Https;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

use crate::*;

/// How many times a claim that lost a race to a unique index is tried again before it answers
/// "nothing claimable now".
const CLAIM_ATTEMPTS: usize = 3;

/// How many times an operation is inserted again when its duplicate finished between the
/// insert and the look-up that names it.
const CREATE_ATTEMPTS: usize = 3;

/// The first key of the advisory locks this store takes (the second is a hash of the
/// operation id); two-key advisory locks never collide with sqlx's single-key migration lock.
const LOG_LOCK_CLASS: i32 = 0x4846_4c47; // "HFLG"

/// SQL: the queued operation `o` may start now: nothing of its subject runs, and nothing of
/// its subject was queued before it. `x.id <> o.id` keeps the first check a probe per row
/// (with equalities alone the planner may hash it over every running entry, most of them dead
/// rows during a drain); `o` is queued, so the condition changes nothing else. A macro, so
/// that the statements stay `&'static str` literals.
macro_rules! subject_free {
    () => {
        "NOT EXISTS (SELECT 1 FROM operations x
             WHERE x.subject_id = o.subject_id AND x.status = 'running' AND x.id <> o.id)
         AND NOT EXISTS (SELECT 1 FROM operations q
             WHERE q.subject_id = o.subject_id AND q.status = 'queued'
               AND (q.queued_at < o.queued_at OR (q.queued_at = o.queued_at AND q.id < o.id)))"
    };
}

/// SQL: the tasks of operation `o` as one JSON text column, `tasks_json` (read by
/// [`claimed_from_row`]), so a claim answers the whole operation in its own round trip.
macro_rules! tasks_json {
    () => {
        "(SELECT COALESCE(json_agg(json_build_array(t.position, t.name, t.status, t.attempts,
             t.rollback, t.started_at, t.finished_at) ORDER BY t.position), '[]')::text
          FROM tasks t WHERE t.operation_id = o.id) AS tasks_json"
    };
}

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://…` or `postgresql://…`) and brings its
    /// schema up to date. Several processes may do this at once: sqlx serialises migrations
    /// with an advisory lock.
    pub async fn connect(url: &str) -> Result<PostgresStore> {
        let options = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    /// Closes every connection of the pool, waiting for those in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn unique_violation(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Some(db.message().to_string()),
        _ => None,
    }
}

fn violated_constraint(e: &sqlx::Error) -> Option<&str> {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => db.constraint(),
        _ => None,
    }
}

/// `targets_name_key` and `projects_name_key` are the `UNIQUE` on `name` (SQLite says
/// `targets.name`).
fn conflict_on_name(e: sqlx::Error, what: &str) -> StoreError {
    match unique_violation(&e) {
        Some(_) if violated_constraint(&e).is_some_and(|c| c.ends_with("_name_key")) => {
            StoreError::Conflict(format!("a {what} with this name already exists"))
        }
        Some(msg) => StoreError::Conflict(msg),
        None => StoreError::Database(e),
    }
}

/// PostgreSQL text cannot hold NUL characters (SQLite's can); a NUL in free text such as a
/// command's output becomes U+FFFD instead of failing the whole write.
fn pg_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// RFC 7396 JSON merge patch, which is what SQLite's `json_patch` implements: objects merge
/// recursively, a `null` removes the key, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let Value::Object(target) = target else {
        unreachable!("made an object above");
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.as_str()).or_insert(Value::Null), value);
        }
    }
}

fn parse_json(col: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn json_col(row: &PgRow, col: &str) -> Result<Value> {
    let text: String = row.try_get(col)?;
    parse_json(col, &text)
}

fn opt_json_col(row: &PgRow, col: &str) -> Result<Option<Value>> {
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| parse_json(col, &t)).transpose()
}

fn parse_enum<T>(row: &PgRow, col: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    let text: String = row.try_get(col)?;
    parse(&text).ok_or_else(|| StoreError::Corrupt(format!("{col}: unknown value {text:?}")))
}

fn target_from_row(row: &PgRow) -> Result<TargetRecord> {
    Ok(TargetRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        status: row.try_get("status")?,
        host: row.try_get("host")?,
        root: row.try_get("root")?,
        http_port: row.try_get::<i64, _>("http_port")? as u16,
        https_port: row.try_get::<i64, _>("https_port")? as u16,
        web_user: row.try_get("web_user")?,
        host_key: row.try_get("host_key")?,
        inspection: opt_json_col(row, "inspection")?,
        settings: typed_json_col(row, "settings")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn typed_json_col<T: serde::de::DeserializeOwned>(row: &PgRow, col: &str) -> Result<T> {
    serde_json::from_value(json_col(row, col)?)
        .map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn environment_from_row(row: &PgRow) -> Result<EnvironmentRecord> {
    Ok(EnvironmentRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        project_id: row.try_get("project_id")?,
        target_id: row.try_get("target_id")?,
        release_id: row.try_get("release_id")?,
        domain: row.try_get("domain")?,
        aliases: typed_json_col(row, "aliases")?,
        https: parse_enum(row, "https", Https::parse)?,
        status: row.try_get("status")?,
        secrets: Secret::new(json_col(row, "secrets")?),
        resources: json_col(row, "resources")?,
        settings: json_col(row, "settings")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn backup_from_row(row: &PgRow) -> Result<BackupRecord> {
    Ok(BackupRecord {
        id: row.try_get("id")?,
        environment_id: row.try_get("environment_id")?,
        operation_id: row.try_get("operation_id")?,
        kind: row.try_get("kind")?,
        description: row.try_get("description")?,
        status: row.try_get("status")?,
        object_key: row.try_get("object_key")?,
        size: row.try_get("size")?,
        sha256: row.try_get("sha256")?,
        manifest: opt_json_col(row, "manifest")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn project_from_row(row: &PgRow) -> Result<ProjectRecord> {
    Ok(ProjectRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        git_url: row.try_get("git_url")?,
        branch: row.try_get("branch")?,
        status: row.try_get("status")?,
        manifest: opt_json_col(row, "manifest")?,
        deploy_key: deploy_key(
            row.try_get("deploy_public_key")?,
            row.try_get("deploy_private_key")?,
        ),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn release_from_row(row: &PgRow) -> Result<ReleaseRecord> {
    Ok(ReleaseRecord {
        id: row.try_get("id")?,
        project_id: row.try_get("project_id")?,
        git_ref: row.try_get("git_ref")?,
        commit: row.try_get("commit_sha")?,
        status: row.try_get("status")?,
        artifact_sha256: row.try_get("artifact_sha256")?,
        artifact_size: row.try_get("artifact_size")?,
        image: row.try_get("image")?,
        build_operation_id: row.try_get("build_operation_id")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn operation_from_row(row: &PgRow, tasks: Vec<TaskRecord>) -> Result<OperationRecord> {
    Ok(OperationRecord {
        id: row.try_get("id")?,
        kind: parse_enum(row, "kind", OperationKind::parse)?,
        subject_type: parse_enum(row, "subject_type", SubjectType::parse)?,
        subject_id: row.try_get("subject_id")?,
        status: parse_enum(row, "status", OperationStatus::parse)?,
        attempt: row.try_get("attempt")?,
        parent_id: row.try_get("parent_id")?,
        requested_by: row.try_get("requested_by")?,
        inputs: json_col(row, "inputs")?,
        state: json_col(row, "state")?,
        result: json_col(row, "result")?,
        error: row.try_get("error")?,
        cancel_requested: row.try_get("cancel_requested")?,
        deliveries: row.try_get("deliveries")?,
        queue: row.try_get("queue")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        updated_at: row.try_get("updated_at")?,
        tasks,
    })
}

/// Tasks as `claim_named` returns them: `[[position, name, status, attempts, rollback,
/// started_at, finished_at], ...]` in position order.
/// An operation a claim returned, with its `tasks_json` column.
fn claimed_from_row(row: &PgRow) -> Result<OperationRecord> {
    let tasks = tasks_from_json(&row.try_get::<String, _>("tasks_json")?)?;
    operation_from_row(row, tasks)
}

fn tasks_from_json(text: &str) -> Result<Vec<TaskRecord>> {
    let corrupt = || StoreError::Corrupt(format!("tasks: {text}"));
    let rows: Vec<Vec<Value>> = serde_json::from_str(text).map_err(|_| corrupt())?;
    rows.into_iter()
        .map(|r| {
            if r.len() != 7 {
                return Err(corrupt());
            }
            Ok(TaskRecord {
                position: r[0].as_i64().ok_or_else(corrupt)?,
                name: r[1].as_str().ok_or_else(corrupt)?.to_string(),
                status: r[2]
                    .as_str()
                    .and_then(TaskStatus::parse)
                    .ok_or_else(corrupt)?,
                attempts: r[3].as_i64().ok_or_else(corrupt)?,
                rollback: r[4].as_bool().ok_or_else(corrupt)?,
                started_at: r[5].as_i64(),
                finished_at: r[6].as_i64(),
            })
        })
        .collect()
}

fn task_from_row(row: &PgRow) -> Result<TaskRecord> {
    Ok(TaskRecord {
        position: row.try_get("position")?,
        name: row.try_get("name")?,
        status: parse_enum(row, "status", TaskStatus::parse)?,
        attempts: row.try_get("attempts")?,
        rollback: row.try_get("rollback")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

async fn load_operation(conn: &mut PgConnection, id: &str) -> Result<Option<OperationRecord>> {
    let Some(row) = sqlx::query("SELECT * FROM operations WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let tasks = sqlx::query("SELECT * FROM tasks WHERE operation_id = $1 ORDER BY position")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(task_from_row)
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(operation_from_row(&row, tasks)?))
}

async fn must_load(conn: &mut PgConnection, id: &str) -> Result<OperationRecord> {
    load_operation(conn, id).await?.ok_or(StoreError::NotFound)
}

/// Locks the operation's row for the rest of the transaction (`NotFound` if there is none).
async fn lock_operation(conn: &mut PgConnection, id: &str) -> Result<()> {
    sqlx::query("SELECT id FROM operations WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .map(|_| ())
        .ok_or(StoreError::NotFound)
}

/// The active operation sharing `dedupe_key`, if any.
async fn active_with_key(conn: &mut PgConnection, dedupe_key: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM operations WHERE dedupe_key = $1 AND status IN ('queued', 'running')",
    )
    .bind(dedupe_key)
    .fetch_optional(&mut *conn)
    .await?)
}

/// The active operation sharing `dedupe_key`, to name it in a 409.
async fn active_duplicate(conn: &mut PgConnection, dedupe_key: &str) -> Result<StoreError> {
    Ok(StoreError::Duplicate {
        existing: active_with_key(conn, dedupe_key).await?.unwrap_or_default(),
    })
}

/// Checks that `owner` holds the lease, and locks the operation's row for the rest of the
/// transaction (a takeover waits, or skips it); returns the operation's state.
async fn lock_lease(conn: &mut PgConnection, id: &str, owner: &str) -> Result<Value> {
    let state: Option<String> = sqlx::query_scalar(
        "SELECT state FROM operations
         WHERE id = $1 AND lease_owner = $2 AND status = 'running' FOR UPDATE",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut *conn)
    .await?;
    match state {
        Some(state) => parse_json("state", &state),
        None => Err(StoreError::LeaseLost(id.into())),
    }
}

/// Merges `patch` into the operation's `state` (whose row `lock_lease` locked).
async fn patch_state(
    conn: &mut PgConnection,
    id: &str,
    mut state: Value,
    patch: &Value,
    now: Option<i64>,
) -> Result<()> {
    merge_patch(&mut state, patch);
    let mut qb = QueryBuilder::<Postgres>::new("UPDATE operations SET state = ");
    qb.push_bind(state.to_string());
    if let Some(now) = now {
        qb.push(", updated_at = ").push_bind(now);
    }
    qb.push(" WHERE id = ").push_bind(id);
    qb.build().execute(&mut *conn).await?;
    Ok(())
}

async fn end_operation(
    conn: &mut PgConnection,
    id: &str,
    owner: &str,
    outcome: &OperationOutcome,
    now: i64,
) -> Result<()> {
    let done = sqlx::query(
        "UPDATE operations SET status = $1, result = $2, error = $3, finished_at = $4,
                updated_at = $4, lease_owner = NULL, lease_expires_at = NULL,
                cancel_requested = FALSE
         WHERE id = $5 AND lease_owner = $6 AND status = 'running'",
    )
    .bind(outcome.status.as_str())
    .bind(outcome.result.to_string())
    .bind(outcome.error.as_deref().map(pg_text))
    .bind(now)
    .bind(id)
    .bind(owner)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::LeaseLost(id.into()));
    }
    if outcome.status == OperationStatus::Cancelled {
        sqlx::query(
            "UPDATE tasks SET status = 'cancelled', finished_at = COALESCE(finished_at, $1)
             WHERE operation_id = $2 AND status IN ('pending', 'running')",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

fn push_page<'a>(qb: &mut QueryBuilder<'a, Postgres>, page: &'a Page, has_where: bool) {
    if let Some(cursor) = &page.cursor {
        qb.push(if has_where {
            " AND id < "
        } else {
            " WHERE id < "
        });
        qb.push_bind(cursor.as_str());
    }
    qb.push(" ORDER BY id DESC LIMIT ");
    qb.push_bind(page.limit as i64 + 1);
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

/// Commits when `result` is Ok; otherwise rolls back at once. Dropping the transaction would
/// only queue the rollback for whenever the pool next touches the connection, and until then
/// its row and advisory locks stay held (a claim would skip the row, a renewal would wait).
async fn settle<T>(tx: sqlx::Transaction<'_, Postgres>, result: Result<T>) -> Result<T> {
    match result {
        Ok(value) => {
            tx.commit().await?;
            Ok(value)
        }
        Err(e) => {
            // The original error says more than a failed rollback (whose connection the pool
            // then discards).
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

impl PostgresStore {
    /// Claims one named operation (a broker handed it over) in one statement: queued and its
    /// subject free, or running with an expired lease (taken over). Then reads its tasks,
    /// which only the lease holder changes. Two round trips instead of a transaction's six.
    async fn claim_named(&self, id: &str, claim: &Claim<'_>) -> Result<Option<OperationRecord>> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "UPDATE operations o SET status = 'running', lease_owner = ",
        );
        qb.push_bind(claim.owner)
            .push(", lease_expires_at = ")
            .push_bind(claim.lease_until)
            .push(", started_at = COALESCE(o.started_at, ")
            .push_bind(claim.now)
            .push("), updated_at = ")
            .push_bind(claim.now)
            .push(" WHERE o.id = ")
            .push_bind(id.to_string())
            .push(concat!(
                " AND ((o.status = 'queued' AND ",
                subject_free!(),
                ") OR (o.status = 'running' AND o.lease_expires_at < "
            ))
            .push_bind(claim.now)
            .push("))");
        if !claim.queues.is_empty() {
            qb.push(" AND o.queue IN (");
            let mut list = qb.separated(", ");
            for q in claim.queues {
                list.push_bind(q.clone());
            }
            qb.push(")");
        }
        qb.push(concat!(" RETURNING o.*, ", tasks_json!()));
        let row = match qb.build().fetch_optional(&self.pool).await {
            Ok(row) => row,
            // Another operation of the subject started at the same moment: not claimable now.
            Err(e) if unique_violation(&e).is_some() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        row.as_ref().map(claimed_from_row).transpose()
    }

    /// [`Store::finish_task`] in one statement, for the common case (no state to merge, not
    /// a cancel): lock and check the lease, end the task, and end the operation if asked.
    async fn finish_task_at_once(
        &self,
        id: &str,
        owner: &str,
        position: i64,
        outcome: &TaskOutcome,
        finish: Option<&OperationOutcome>,
        now: i64,
    ) -> Result<()> {
        let started = if outcome.status == TaskStatus::Skipped {
            "NULL"
        } else {
            "t.started_at"
        };
        let ending = match finish {
            Some(_) => {
                ", ended AS (UPDATE operations SET status = $6, result = $7, error = $8,
                     finished_at = $2, updated_at = $2, lease_owner = NULL,
                     lease_expires_at = NULL, cancel_requested = FALSE
                   WHERE id = $3 AND EXISTS (SELECT 1 FROM task) RETURNING 1)
                 SELECT (SELECT COUNT(*) FROM task) + (SELECT COUNT(*) FROM ended)"
            }
            None => " SELECT (SELECT COUNT(*) FROM task) * 2",
        };
        let sql = format!(
            "WITH lease AS (SELECT id FROM operations
                 WHERE id = $3 AND lease_owner = $5 AND status = 'running' FOR UPDATE),
             task AS (UPDATE tasks t SET status = $1, finished_at = $2, started_at = {started}
                 WHERE t.operation_id = $3 AND t.position = $4 AND EXISTS (SELECT 1 FROM lease)
                 RETURNING 1){ending}"
        );
        let mut query = sqlx::query_scalar::<_, i64>(&sql)
            .bind(outcome.status.as_str())
            .bind(now)
            .bind(id)
            .bind(position)
            .bind(owner);
        if let Some(finish) = finish {
            query = query
                .bind(finish.status.as_str())
                .bind(finish.result.to_string())
                .bind(finish.error.as_deref().map(|e| pg_text(e).into_owned()));
        }
        let changed = query.fetch_one(&self.pool).await?;
        // The task row and (when asked) the operation row: both, or the lease was lost.
        if changed != 2 {
            return Err(StoreError::LeaseLost(id.into()));
        }
        Ok(())
    }

    /// [`Store::record_progress`] set-based: one statement for the finishes, one for the
    /// claims, one for the starts, in one transaction. Every operation row is found by its
    /// primary key (`id = ANY`) and its status checked afterwards: with the status in an index
    /// condition the planner walks the status index, whose `running` entries are mostly dead
    /// rows of finished operations during a drain.
    async fn progress_at_once(&self, progress: &Progress) -> Result<ProgressMade> {
        // A prepared statement with array parameters is planned again at every execution
        // while PostgreSQL compares custom plans with the generic one; planning the claim
        // costs more than running it for a small batch. The generic plan is the right one
        // (primary-key lookups whatever the arrays hold), so it is used from the start.
        let mut tx = self
            .pool
            .begin_with("BEGIN; SET LOCAL plan_cache_mode = force_generic_plan")
            .await?;
        let result = async {
            let finished = if progress.finishes.is_empty() {
                HashSet::new()
            } else {
                finish_tasks_in(&mut tx, &progress.finishes).await?
            };
            let claimed = if progress.claims.is_empty() {
                HashMap::new()
            } else {
                claim_named_in(&mut tx, &progress.claims, &progress.queues).await?
            };
            let started = if progress.starts.is_empty() {
                HashSet::new()
            } else {
                start_tasks_in(&mut tx, &progress.starts).await?
            };
            Ok((finished, claimed, started))
        }
        .await;
        let (finished, mut claimed, started) = settle(tx, result).await?;
        let done = |set: &HashSet<(String, i64)>, id: &str, position: i64| {
            if set.contains(&(id.to_string(), position)) {
                Ok(())
            } else {
                Err(StoreError::LeaseLost(id.into()))
            }
        };
        Ok(ProgressMade {
            finishes: progress
                .finishes
                .iter()
                .map(|f| done(&finished, &f.operation, f.position))
                .collect(),
            claims: progress
                .claims
                .iter()
                .map(|c| {
                    Ok(match claimed.remove(&c.operation) {
                        Some((owner, record)) if owner == c.owner => Some(record),
                        Some(other) => {
                            // Named twice in the batch: the other request got it.
                            claimed.insert(c.operation.clone(), other);
                            None
                        }
                        None => None,
                    })
                })
                .collect(),
            starts: progress
                .starts
                .iter()
                .map(|s| done(&started, &s.operation, s.position))
                .collect(),
        })
    }

    /// A read-only transaction on one snapshot, so an operation and its tasks agree.
    async fn snapshot(&self) -> Result<sqlx::Transaction<'static, Postgres>> {
        Ok(self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?)
    }
}

/// The finishes of [`PostgresStore::progress_at_once`]: each task whose operation's lease its
/// worker still holds ends, and with it the operation when asked. Answers which did.
async fn finish_tasks_in(
    conn: &mut PgConnection,
    finishes: &[TaskFinish],
) -> Result<HashSet<(String, i64)>> {
    let ids: Vec<&str> = finishes.iter().map(|f| f.operation.as_str()).collect();
    let owners: Vec<&str> = finishes.iter().map(|f| f.owner.as_str()).collect();
    let positions: Vec<i64> = finishes.iter().map(|f| f.position).collect();
    let statuses: Vec<&str> = finishes.iter().map(|f| f.status.as_str()).collect();
    let nows: Vec<i64> = finishes.iter().map(|f| f.now).collect();
    let ends: Vec<Option<&str>> = finishes
        .iter()
        .map(|f| f.finish.as_ref().map(|o| o.status.as_str()))
        .collect();
    let results: Vec<Option<String>> = finishes
        .iter()
        .map(|f| f.finish.as_ref().map(|o| o.result.to_string()))
        .collect();
    let errors: Vec<Option<String>> = finishes
        .iter()
        .map(|f| {
            f.finish
                .as_ref()
                .and_then(|o| o.error.as_deref())
                .map(|e| pg_text(e).into_owned())
        })
        .collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "WITH held AS MATERIALIZED (SELECT o.id, o.lease_owner, o.status FROM operations o
             WHERE o.id = ANY($1) ORDER BY o.id FOR UPDATE),
         mine AS (SELECT r.* FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[],
                 $5::int8[], $6::text[], $7::text[], $8::text[])
                 AS r(id, owner, position, task_status, now, end_status, result, error)
             JOIN held h ON h.id = r.id AND h.lease_owner = r.owner AND h.status = 'running'),
         task AS (UPDATE tasks t SET status = m.task_status, finished_at = m.now,
                 started_at = CASE WHEN m.task_status = 'skipped' THEN NULL ELSE t.started_at END
             FROM mine m WHERE t.operation_id = m.id AND t.position = m.position
             RETURNING t.operation_id, t.position),
         ended AS (UPDATE operations o SET status = m.end_status, result = m.result,
                 error = m.error, finished_at = m.now, updated_at = m.now, lease_owner = NULL,
                 lease_expires_at = NULL, cancel_requested = FALSE
             FROM mine m JOIN task ON task.operation_id = m.id AND task.position = m.position
             WHERE o.id = m.id AND m.end_status IS NOT NULL)
         SELECT operation_id, position FROM task",
    )
    .bind(&ids)
    .bind(&owners)
    .bind(&positions)
    .bind(&statuses)
    .bind(&nows)
    .bind(&ends)
    .bind(&results)
    .bind(&errors)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The claims of [`PostgresStore::progress_at_once`]: each named operation that is claimable
/// now (queued with its subject free, or running with an expired lease), by whoever named it
/// first. Answers the claimed operations by id, with who claimed each.
async fn claim_named_in(
    conn: &mut PgConnection,
    claims: &[NamedClaim],
    queues: &[String],
) -> Result<HashMap<String, (String, OperationRecord)>> {
    let ids: Vec<&str> = claims.iter().map(|c| c.operation.as_str()).collect();
    let owners: Vec<&str> = claims.iter().map(|c| c.owner.as_str()).collect();
    // One moment for the whole batch: the latest of its requests.
    let now = claims.iter().map(|c| c.now).max().unwrap_or_default();
    let until = claims
        .iter()
        .map(|c| c.lease_until)
        .max()
        .unwrap_or_default();
    // The rows are found by primary key alone (`id = ANY`): no join for the planner to turn
    // around, and the status only inside a CASE, which no index or partial-index predicate
    // matches. A queue table's statistics are always stale; given the choice, the planner
    // once scanned every queued and running row (their count estimated from a moment when
    // there were 28) and ran the subject checks on each. An operation named twice goes to
    // whoever named it first (`array_position`).
    let rows = sqlx::query(concat!(
        "UPDATE operations o SET status = 'running',
             lease_owner = ($2::text[])[array_position($1::text[], o.id)],
             lease_expires_at = $4, started_at = COALESCE(o.started_at, $3), updated_at = $3
         WHERE o.id = ANY($1)
           AND CASE o.status
               WHEN 'queued' THEN ",
        subject_free!(),
        "
               WHEN 'running' THEN o.lease_expires_at < $3
               ELSE FALSE END
           AND (cardinality($5::text[]) = 0 OR o.queue = ANY($5))
         RETURNING o.lease_owner AS claimed_by, o.*, ",
        tasks_json!()
    ))
    .bind(&ids)
    .bind(&owners)
    .bind(now)
    .bind(until)
    .bind(queues)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            let record = claimed_from_row(row)?;
            Ok((record.id.clone(), (row.try_get("claimed_by")?, record)))
        })
        .collect()
}

/// The starts of [`PostgresStore::progress_at_once`]: each task whose operation's lease its
/// worker still holds starts. Answers which did.
async fn start_tasks_in(
    conn: &mut PgConnection,
    starts: &[TaskStart],
) -> Result<HashSet<(String, i64)>> {
    let ids: Vec<&str> = starts.iter().map(|s| s.operation.as_str()).collect();
    let owners: Vec<&str> = starts.iter().map(|s| s.owner.as_str()).collect();
    let positions: Vec<i64> = starts.iter().map(|s| s.position).collect();
    let nows: Vec<i64> = starts.iter().map(|s| s.now).collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "WITH held AS MATERIALIZED (SELECT o.id, o.lease_owner, o.status FROM operations o
             WHERE o.id = ANY($1) ORDER BY o.id FOR UPDATE)
         UPDATE tasks t SET status = 'running', attempts = t.attempts + 1, started_at = r.now,
             finished_at = NULL
         FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS r(id, owner, position, now)
         JOIN held h ON h.id = r.id AND h.lease_owner = r.owner AND h.status = 'running'
         WHERE t.operation_id = r.id AND t.position = r.position
         RETURNING t.operation_id, t.position",
    )
    .bind(&ids)
    .bind(&owners)
    .bind(&positions)
    .bind(&nows)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// One claim attempt, in the caller's transaction. A unique violation comes back as an error
/// for [`Store::claim`] to retry.
async fn claim_in(conn: &mut PgConnection, claim: &Claim<'_>) -> Result<Option<OperationRecord>> {
    let narrow = |qb: &mut QueryBuilder<'_, Postgres>| {
        if let Some(only) = claim.only {
            qb.push(" AND o.id = ").push_bind(only.to_string());
        }
        if !claim.queues.is_empty() {
            qb.push(" AND o.queue IN (");
            let mut list = qb.separated(", ");
            for q in claim.queues {
                list.push_bind(q.clone());
            }
            qb.push(")");
        }
    };

    // A lease that expired belongs to a worker that died: take the operation over. Rows
    // another worker is taking over, renewing or finishing right now are skipped.
    let mut qb = QueryBuilder::<Postgres>::new(
        "WITH expired AS (SELECT o.id FROM operations o
           WHERE o.status = 'running' AND o.lease_expires_at < ",
    );
    qb.push_bind(claim.now);
    narrow(&mut qb);
    qb.push(
        " ORDER BY o.lease_expires_at LIMIT 1 FOR UPDATE OF o SKIP LOCKED)
         UPDATE operations SET lease_owner = ",
    )
    .push_bind(claim.owner)
    .push(", lease_expires_at = ")
    .push_bind(claim.lease_until)
    .push(", updated_at = ")
    .push_bind(claim.now)
    .push(
        " FROM expired WHERE operations.id = expired.id AND operations.status = 'running'
         RETURNING operations.id",
    );
    let mut claimed: Option<String> = qb.build_query_scalar().fetch_optional(&mut *conn).await?;

    if claimed.is_none() {
        // The oldest queued operation whose subject has nothing running and nothing queued
        // before it. A queued row another worker is claiming is skipped, and so is anything
        // queued after it on the same subject (it is still queued in our snapshot).
        // Its own subject check, without `x.id <> o.id` (`subject_free!`): walking the queued
        // rows in order, the planner may rightly hash it. With the shared form the distributed
        // queue benchmark drained ~10% slower (four alternating rounds; why was not found).
        let mut qb = QueryBuilder::<Postgres>::new(
            "WITH next AS (SELECT o.id FROM operations o WHERE o.status = 'queued'
               AND NOT EXISTS (SELECT 1 FROM operations r
                   WHERE r.subject_id = o.subject_id AND r.status = 'running')
               AND NOT EXISTS (SELECT 1 FROM operations q
                   WHERE q.subject_id = o.subject_id AND q.status = 'queued'
                     AND (q.queued_at < o.queued_at OR (q.queued_at = o.queued_at AND q.id < o.id)))",
        );
        narrow(&mut qb);
        // With one operation named, no ORDER BY: the planner then finds it by its primary
        // key instead of walking the queued rows in order (20 ms with thousands queued).
        qb.push(if claim.only.is_some() {
            " FOR UPDATE OF o SKIP LOCKED)
             UPDATE operations SET status = 'running', lease_owner = "
        } else {
            " ORDER BY o.queued_at, o.id LIMIT 1 FOR UPDATE OF o SKIP LOCKED)
             UPDATE operations SET status = 'running', lease_owner = "
        })
        .push_bind(claim.owner)
        .push(", lease_expires_at = ")
        .push_bind(claim.lease_until)
        .push(", started_at = COALESCE(started_at, ")
        .push_bind(claim.now)
        .push("), updated_at = ")
        .push_bind(claim.now)
        .push(
            " FROM next WHERE operations.id = next.id AND operations.status = 'queued'
             RETURNING operations.id",
        );
        claimed = qb.build_query_scalar().fetch_optional(&mut *conn).await?;
    }

    Ok(match claimed {
        Some(id) => Some(must_load(conn, &id).await?),
        None => None,
    })
}

/// Inserts a queued operation and its planned tasks, in the caller's transaction; `None` if an
/// active duplicate refused it but ended before it could be named (the caller tries again).
async fn insert_operation(
    conn: &mut PgConnection,
    new: &NewOperation,
    dedupe_key: &str,
    now: i64,
) -> Result<Option<OperationRecord>> {
    // The duplicate guard is the unique partial index; `ON CONFLICT` names it so that
    // losing to it leaves the transaction usable (any other unique violation, such as
    // the id, is an error).
    let inserted = sqlx::query(
        "INSERT INTO operations (id, kind, subject_type, subject_id, status, attempt,
            parent_id, requested_by, inputs, dedupe_key, state, result, queue, created_at,
            queued_at, updated_at)
         VALUES ($1, $2, $3, $4, 'queued', 1, $5, $6, $7, $8, '{}', '{}', $9, $10, $10, $10)
         ON CONFLICT (dedupe_key) WHERE status IN ('queued', 'running') DO NOTHING",
    )
    .bind(&new.id)
    .bind(new.kind.as_str())
    .bind(new.subject_type.as_str())
    .bind(&new.subject_id)
    .bind(&new.parent_id)
    .bind(&new.requested_by)
    .bind(new.inputs.to_string())
    .bind(dedupe_key)
    .bind(&new.queue)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(|e| match unique_violation(&e) {
        Some(msg) => StoreError::Conflict(msg),
        None => StoreError::Database(e),
    })?;
    if inserted.rows_affected() == 0 {
        return match active_with_key(conn, dedupe_key).await? {
            Some(existing) => Err(StoreError::Duplicate { existing }),
            // It ended between the insert and the look-up: try again.
            None => Ok(None),
        };
    }
    if !new.tasks.is_empty() {
        let mut qb = QueryBuilder::<Postgres>::new(
            "INSERT INTO tasks (operation_id, position, name, status) ",
        );
        qb.push_values(new.tasks.iter().enumerate(), |mut b, (i, name)| {
            b.push_bind(&new.id)
                .push_bind(i as i64)
                .push_bind(name)
                .push_bind("pending");
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(Some(must_load(conn, &new.id).await?))
}

#[async_trait]
impl Store for PostgresStore {
    async fn insert_target(&self, t: &TargetRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO targets (id, name, kind, status, host, root, http_port, https_port,
                web_user, host_key, inspection, settings, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.kind)
        .bind(&t.status)
        .bind(&t.host)
        .bind(&t.root)
        .bind(t.http_port as i64)
        .bind(t.https_port as i64)
        .bind(&t.web_user)
        .bind(&t.host_key)
        .bind(t.inspection.as_ref().map(Value::to_string))
        .bind(to_json(&t.settings))
        .bind(t.created_at)
        .bind(t.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_on_name(e, "target"))?;
        Ok(())
    }

    async fn get_target(&self, id: &str) -> Result<Option<TargetRecord>> {
        sqlx::query("SELECT * FROM targets WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(target_from_row)
            .transpose()
    }

    async fn target_by_name(&self, name: &str) -> Result<Option<TargetRecord>> {
        sqlx::query("SELECT * FROM targets WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(target_from_row)
            .transpose()
    }

    async fn list_targets(&self, page: &Page) -> Result<Listed<TargetRecord>> {
        let mut qb = QueryBuilder::new("SELECT * FROM targets");
        push_page(&mut qb, page, false);
        let rows = qb.build().fetch_all(&self.pool).await?;
        let items = rows
            .iter()
            .map(target_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(paged(items, page, |t| &t.id))
    }

    async fn update_target(&self, t: &TargetRecord) -> Result<()> {
        let done = sqlx::query(
            "UPDATE targets SET status = $1, host_key = $2, inspection = $3, settings = $4,
                updated_at = $5 WHERE id = $6",
        )
        .bind(&t.status)
        .bind(&t.host_key)
        .bind(t.inspection.as_ref().map(Value::to_string))
        .bind(to_json(&t.settings))
        .bind(t.updated_at)
        .bind(&t.id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn delete_target(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM targets WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn insert_project(&self, p: &ProjectRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO projects (id, name, git_url, branch, status, manifest, deploy_public_key,
                deploy_private_key, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&p.id)
        .bind(&p.name)
        .bind(&p.git_url)
        .bind(&p.branch)
        .bind(&p.status)
        .bind(p.manifest.as_ref().map(Value::to_string))
        .bind(p.deploy_key.as_ref().map(|k| k.public_key.clone()))
        .bind(
            p.deploy_key
                .as_ref()
                .map(|k| k.private_key.expose().clone()),
        )
        .bind(p.created_at)
        .bind(p.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| conflict_on_name(e, "project"))?;
        Ok(())
    }

    async fn get_project(&self, id: &str) -> Result<Option<ProjectRecord>> {
        sqlx::query("SELECT * FROM projects WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(project_from_row)
            .transpose()
    }

    async fn list_projects(&self, page: &Page) -> Result<Listed<ProjectRecord>> {
        let mut qb = QueryBuilder::new("SELECT * FROM projects");
        push_page(&mut qb, page, false);
        let rows = qb.build().fetch_all(&self.pool).await?;
        let items = rows
            .iter()
            .map(project_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(paged(items, page, |p| &p.id))
    }

    async fn update_project(&self, p: &ProjectRecord) -> Result<()> {
        sqlx::query(
            // A deploy key is never removed: a record read before it was made keeps it.
            "UPDATE projects SET status = $1, manifest = $2,
                deploy_public_key = COALESCE($3, deploy_public_key),
                deploy_private_key = COALESCE($4, deploy_private_key), updated_at = $5 WHERE id = $6",
        )
        .bind(&p.status)
        .bind(p.manifest.as_ref().map(Value::to_string))
        .bind(p.deploy_key.as_ref().map(|k| k.public_key.clone()))
        .bind(
            p.deploy_key
                .as_ref()
                .map(|k| k.private_key.expose().clone()),
        )
        .bind(p.updated_at)
        .bind(&p.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn insert_release(&self, r: &ReleaseRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO releases (id, project_id, git_ref, commit_sha, status, artifact_sha256,
                artifact_size, image, build_operation_id, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&r.id)
        .bind(&r.project_id)
        .bind(&r.git_ref)
        .bind(&r.commit)
        .bind(&r.status)
        .bind(&r.artifact_sha256)
        .bind(r.artifact_size)
        .bind(&r.image)
        .bind(&r.build_operation_id)
        .bind(r.created_at)
        .bind(r.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|e| match unique_violation(&e) {
            Some(_) => StoreError::Conflict("a release of this commit already exists".into()),
            None => StoreError::Database(e),
        })?;
        Ok(())
    }

    async fn get_release(&self, id: &str) -> Result<Option<ReleaseRecord>> {
        sqlx::query("SELECT * FROM releases WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(release_from_row)
            .transpose()
    }

    async fn release_by_commit(
        &self,
        project: &str,
        commit: &str,
    ) -> Result<Option<ReleaseRecord>> {
        sqlx::query("SELECT * FROM releases WHERE project_id = $1 AND commit_sha = $2")
            .bind(project)
            .bind(commit)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(release_from_row)
            .transpose()
    }

    async fn list_releases(
        &self,
        project: Option<&str>,
        page: &Page,
    ) -> Result<Listed<ReleaseRecord>> {
        let mut qb = QueryBuilder::new("SELECT * FROM releases");
        if let Some(project) = project {
            qb.push(" WHERE project_id = ").push_bind(project);
        }
        push_page(&mut qb, page, project.is_some());
        let rows = qb.build().fetch_all(&self.pool).await?;
        let items = rows
            .iter()
            .map(release_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(paged(items, page, |r| &r.id))
    }

    async fn update_release(&self, r: &ReleaseRecord) -> Result<()> {
        sqlx::query(
            "UPDATE releases SET status = $1, artifact_sha256 = $2, artifact_size = $3, image = $4,
                build_operation_id = $5, updated_at = $6 WHERE id = $7",
        )
        .bind(&r.status)
        .bind(&r.artifact_sha256)
        .bind(r.artifact_size)
        .bind(&r.image)
        .bind(&r.build_operation_id)
        .bind(r.updated_at)
        .bind(&r.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn insert_environment(&self, e: &EnvironmentRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO environments (id, name, project_id, target_id, release_id, domain, aliases,
                https, status, secrets, resources, settings, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .bind(&e.id)
        .bind(&e.name)
        .bind(&e.project_id)
        .bind(&e.target_id)
        .bind(&e.release_id)
        .bind(&e.domain)
        .bind(to_json(&e.aliases))
        .bind(e.https.as_str())
        .bind(&e.status)
        .bind(e.secrets.expose().to_string())
        .bind(e.resources.to_string())
        .bind(e.settings.to_string())
        .bind(e.created_at)
        .bind(e.updated_at)
        .execute(&self.pool)
        .await
        .map_err(|err| match unique_violation(&err) {
            Some(_) if violated_constraint(&err) == Some("environments_domain") => {
                StoreError::Conflict("another environment already uses this domain".into())
            }
            Some(_) => StoreError::Conflict(
                "an environment with this name already exists in the project".into(),
            ),
            None => StoreError::Database(err),
        })?;
        Ok(())
    }

    async fn get_environment(&self, id: &str) -> Result<Option<EnvironmentRecord>> {
        sqlx::query("SELECT * FROM environments WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(environment_from_row)
            .transpose()
    }

    async fn list_environments(
        &self,
        filter: &EnvironmentFilter,
        page: &Page,
    ) -> Result<Listed<EnvironmentRecord>> {
        let mut qb = QueryBuilder::new("SELECT * FROM environments WHERE 1 = 1");
        for (column, value) in [
            (" AND project_id = ", &filter.project),
            (" AND target_id = ", &filter.target),
            (" AND release_id = ", &filter.release),
        ] {
            if let Some(value) = value {
                qb.push(column).push_bind(value.as_str());
            }
        }
        if !filter.include_deleted {
            qb.push(" AND status != 'deleted'");
        }
        push_page(&mut qb, page, true);
        let rows = qb.build().fetch_all(&self.pool).await?;
        let items = rows
            .iter()
            .map(environment_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(paged(items, page, |e| &e.id))
    }

    async fn update_environment(&self, e: &EnvironmentRecord) -> Result<()> {
        let done = sqlx::query(
            "UPDATE environments SET release_id = $1, domain = $2, aliases = $3, https = $4,
                status = $5, secrets = $6, resources = $7, settings = $8, target_id = $9,
                updated_at = $10 WHERE id = $11",
        )
        .bind(&e.release_id)
        .bind(&e.domain)
        .bind(to_json(&e.aliases))
        .bind(e.https.as_str())
        .bind(&e.status)
        .bind(e.secrets.expose().to_string())
        .bind(e.resources.to_string())
        .bind(e.settings.to_string())
        .bind(&e.target_id)
        .bind(e.updated_at)
        .bind(&e.id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn insert_backup(&self, b: &BackupRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO backups (id, environment_id, operation_id, kind, description, status,
                object_key, size, sha256, manifest, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&b.id)
        .bind(&b.environment_id)
        .bind(&b.operation_id)
        .bind(&b.kind)
        .bind(&b.description)
        .bind(&b.status)
        .bind(&b.object_key)
        .bind(b.size)
        .bind(&b.sha256)
        .bind(b.manifest.as_ref().map(|m| m.to_string()))
        .bind(b.created_at)
        .bind(b.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_backup(&self, id: &str) -> Result<Option<BackupRecord>> {
        sqlx::query("SELECT * FROM backups WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(backup_from_row)
            .transpose()
    }

    async fn list_backups(
        &self,
        filter: &BackupFilter,
        page: &Page,
    ) -> Result<Listed<BackupRecord>> {
        let mut qb = QueryBuilder::new("SELECT * FROM backups WHERE status != 'deleted'");
        for (column, value) in [
            (" AND environment_id = ", &filter.environment),
            (" AND operation_id = ", &filter.operation),
            (" AND kind = ", &filter.kind),
            (" AND status = ", &filter.status),
        ] {
            if let Some(value) = value {
                qb.push(column).push_bind(value.as_str());
            }
        }
        push_page(&mut qb, page, true);
        let rows = qb.build().fetch_all(&self.pool).await?;
        let items = rows
            .iter()
            .map(backup_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(paged(items, page, |b| &b.id))
    }

    async fn update_backup(&self, b: &BackupRecord) -> Result<()> {
        let done = sqlx::query(
            "UPDATE backups SET description = $1, status = $2, size = $3, sha256 = $4,
                manifest = $5, updated_at = $6 WHERE id = $7",
        )
        .bind(&b.description)
        .bind(&b.status)
        .bind(b.size)
        .bind(&b.sha256)
        .bind(b.manifest.as_ref().map(|m| m.to_string()))
        .bind(b.updated_at)
        .bind(&b.id)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn count_redelivery(&self, id: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "UPDATE operations SET deliveries = deliveries + 1 WHERE id = $1 RETURNING deliveries",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn environments_running(&self, release: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM environments WHERE release_id = $1 AND status != 'deleted' ORDER BY id",
        )
        .bind(release)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn environments_on_target(&self, target: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM environments WHERE target_id = $1 AND status != 'deleted' ORDER BY id",
        )
        .bind(target)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn create_operation(&self, new: &NewOperation, now: i64) -> Result<OperationRecord> {
        let dedupe_key = new.dedupe_key();
        for _ in 0..CREATE_ATTEMPTS {
            let mut tx = self.pool.begin().await?;
            let result = insert_operation(&mut tx, new, &dedupe_key, now).await;
            if let Some(record) = settle(tx, result).await? {
                return Ok(record);
            }
        }
        Err(StoreError::Duplicate {
            existing: String::new(),
        })
    }

    async fn get_operation(&self, id: &str) -> Result<Option<OperationRecord>> {
        let mut tx = self.snapshot().await?;
        let result = load_operation(&mut tx, id).await;
        settle(tx, result).await
    }

    async fn list_operations(
        &self,
        filter: &OperationFilter,
        page: &Page,
    ) -> Result<Listed<OperationRecord>> {
        let mut qb = QueryBuilder::new("SELECT id FROM operations WHERE 1 = 1");
        if let Some(subject) = &filter.subject {
            qb.push(" AND subject_id = ").push_bind(subject.as_str());
        }
        if let Some(status) = filter.status {
            qb.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(parent) = &filter.parent {
            qb.push(" AND parent_id = ").push_bind(parent.as_str());
        }
        push_page(&mut qb, page, true);
        let mut tx = self.snapshot().await?;
        let result: Result<Listed<OperationRecord>> = async {
            let ids: Vec<String> = qb.build_query_scalar().fetch_all(&mut *tx).await?;
            let mut items = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(record) = load_operation(&mut tx, &id).await? {
                    items.push(record);
                }
            }
            Ok(paged(items, page, |o| &o.id))
        }
        .await;
        settle(tx, result).await
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<OperationRecord>> {
        if let Some(only) = claim.only {
            return self.claim_named(only, claim).await;
        }
        for _ in 0..CLAIM_ATTEMPTS {
            let mut tx = self.pool.begin().await?;
            let result = claim_in(&mut tx, claim).await;
            match settle(tx, result).await {
                // Another worker's claim won on a unique index (the transaction was rolled
                // back): the index did its job; look again.
                Err(StoreError::Database(e)) if unique_violation(&e).is_some() => continue,
                other => return other,
            }
        }
        Ok(None)
    }

    async fn renew_lease(&self, id: &str, owner: &str, until: i64) -> Result<LeaseState> {
        let cancel: Option<bool> = sqlx::query_scalar(
            "UPDATE operations SET lease_expires_at = $1
             WHERE id = $2 AND lease_owner = $3 AND status = 'running'
             RETURNING cancel_requested",
        )
        .bind(until)
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match cancel {
            Some(cancel_requested) => LeaseState::Held { cancel_requested },
            None => LeaseState::Lost,
        })
    }

    async fn expire_all_leases(&self) -> Result<u64> {
        let done =
            sqlx::query("UPDATE operations SET lease_expires_at = 0 WHERE status = 'running'")
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    async fn start_task(&self, id: &str, owner: &str, position: i64, now: i64) -> Result<()> {
        // One statement: the lease row is locked (a takeover waits) and checked, and the task
        // starts, atomically.
        let done = sqlx::query(
            "WITH lease AS (SELECT id FROM operations
                 WHERE id = $2 AND lease_owner = $4 AND status = 'running' FOR UPDATE)
             UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = $1,
                 finished_at = NULL
             WHERE operation_id = $2 AND position = $3 AND EXISTS (SELECT 1 FROM lease)",
        )
        .bind(now)
        .bind(id)
        .bind(position)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::LeaseLost(id.into()));
        }
        Ok(())
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
        let simple = outcome.state_patch.is_none()
            && finish.is_none_or(|f| f.status != OperationStatus::Cancelled);
        if simple {
            return self
                .finish_task_at_once(id, owner, position, outcome, finish, now)
                .await;
        }
        let mut tx = self.pool.begin().await?;
        let result: Result<()> = async {
            let state = lock_lease(&mut tx, id, owner).await?;
            let started = if outcome.status == TaskStatus::Skipped {
                "NULL"
            } else {
                "started_at"
            };
            sqlx::query(&format!(
                "UPDATE tasks SET status = $1, finished_at = $2, started_at = {started}
                 WHERE operation_id = $3 AND position = $4"
            ))
            .bind(outcome.status.as_str())
            .bind(now)
            .bind(id)
            .bind(position)
            .execute(&mut *tx)
            .await?;
            if let Some(patch) = &outcome.state_patch {
                patch_state(&mut tx, id, state, patch, Some(now)).await?;
            }
            if let Some(finish) = finish {
                end_operation(&mut tx, id, owner, finish, now).await?;
            }
            Ok(())
        }
        .await;
        settle(tx, result).await
    }

    async fn begin_rollback(
        &self,
        id: &str,
        owner: &str,
        names: &[&str],
        ending: &Value,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let result: Result<()> = async {
            let state = lock_lease(&mut tx, id, owner).await?;
            patch_state(&mut tx, id, state, ending, None).await?;
            let next: i64 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(position), -1) + 1 FROM tasks WHERE operation_id = $1",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            if !names.is_empty() {
                let mut qb = QueryBuilder::<Postgres>::new(
                    "INSERT INTO tasks (operation_id, position, name, status, rollback) ",
                );
                qb.push_values(names.iter().enumerate(), |mut b, (i, name)| {
                    b.push_bind(id)
                        .push_bind(next + i as i64)
                        .push_bind(*name)
                        .push_bind("pending")
                        .push_bind(true);
                });
                qb.build().execute(&mut *tx).await?;
            }
            Ok(())
        }
        .await;
        settle(tx, result).await
    }

    async fn finish_operation(
        &self,
        id: &str,
        owner: &str,
        outcome: &OperationOutcome,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let result = end_operation(&mut tx, id, owner, outcome, now).await;
        settle(tx, result).await
    }

    async fn request_cancel(&self, id: &str, now: i64) -> Result<OperationRecord> {
        let mut tx = self.pool.begin().await?;
        let result: Result<OperationRecord> = async {
            lock_operation(&mut tx, id).await?;
            let current = must_load(&mut tx, id).await?;
            op::transition(current.status, OperationEvent::Cancel)
                .map_err(|e| StoreError::InvalidTransition(e.to_string()))?;
            if current.status == OperationStatus::Queued {
                sqlx::query(
                    "UPDATE operations SET status = 'cancelled', finished_at = $1, updated_at = $1
                     WHERE id = $2",
                )
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE tasks SET status = 'cancelled'
                     WHERE operation_id = $1 AND status = 'pending'",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
            } else {
                sqlx::query(
                    "UPDATE operations SET cancel_requested = TRUE, updated_at = $1 WHERE id = $2",
                )
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            must_load(&mut tx, id).await
        }
        .await;
        settle(tx, result).await
    }

    async fn retry_operation(
        &self,
        id: &str,
        from_start: bool,
        now: i64,
    ) -> Result<OperationRecord> {
        let mut tx = self.pool.begin().await?;
        let result: Result<OperationRecord> = async {
            lock_operation(&mut tx, id).await?;
            let current = must_load(&mut tx, id).await?;
            op::transition(current.status, OperationEvent::Retry)
                .map_err(|e| StoreError::InvalidTransition(e.to_string()))?;
            sqlx::query("DELETE FROM tasks WHERE operation_id = $1 AND rollback")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let planned: Vec<&TaskRecord> = current.tasks.iter().filter(|t| !t.rollback).collect();
            let statuses: Vec<TaskStatus> = planned.iter().map(|t| t.status).collect();
            for (task, status) in planned
                .iter()
                .zip(op::statuses_for_retry(&statuses, from_start))
            {
                if status != task.status {
                    sqlx::query(
                        "UPDATE tasks SET status = $1, started_at = NULL, finished_at = NULL
                         WHERE operation_id = $2 AND position = $3",
                    )
                    .bind(status.as_str())
                    .bind(id)
                    .bind(task.position)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            // Back to queued: the unique partial index refuses it if a duplicate is active.
            sqlx::query(&format!(
                "UPDATE operations SET status = 'queued', attempt = attempt + 1, error = NULL,
                    result = '{{}}', cancel_requested = FALSE, finished_at = NULL, queued_at = $1,
                    updated_at = $1, lease_owner = NULL, lease_expires_at = NULL{}
                 WHERE id = $2",
                if from_start { ", state = '{}'" } else { "" }
            ))
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            must_load(&mut tx, id).await
        }
        .await;
        match result {
            Err(StoreError::Database(e)) if unique_violation(&e).is_some() => {
                // The transaction is aborted: end it, then name the active duplicate.
                let _ = tx.rollback().await;
                let mut conn = self.pool.acquire().await?;
                let key: String =
                    sqlx::query_scalar("SELECT dedupe_key FROM operations WHERE id = $1")
                        .bind(id)
                        .fetch_one(&mut *conn)
                        .await?;
                Err(active_duplicate(&mut conn, &key).await?)
            }
            other => settle(tx, other).await,
        }
    }

    async fn record_progress(&self, progress: &Progress) -> ProgressMade {
        let items = progress.finishes.len() + progress.claims.len() + progress.starts.len();
        // One item goes faster alone (one statement, no BEGIN and COMMIT round trips), and a
        // cancel also marks the operation's unfinished tasks, which only the single path does.
        let cancels = progress.finishes.iter().any(|f| {
            f.finish
                .as_ref()
                .is_some_and(|o| o.status == OperationStatus::Cancelled)
        });
        if items <= 1 || cancels {
            return record_progress_one_by_one(self, progress).await;
        }
        match self.progress_at_once(progress).await {
            Ok(made) => made,
            // A statement failed (a claim lost a race to a unique index, a deadlock with
            // another process, a connection lost): the transaction changed nothing, so each
            // item is done alone and gets its own answer.
            Err(_) => record_progress_one_by_one(self, progress).await,
        }
    }

    async fn append_logs(&self, id: &str, lines: &[NewLogLine]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        // Appends to one operation are serialised and committed in `seq` order, so a reader
        // following `seq` never skips a line that commits after a later one.
        let mut tx = self.pool.begin().await?;
        let result: Result<()> = async {
            sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
                .bind(LOG_LOCK_CLASS)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            // PostgreSQL allows 65535 bound values; six per line.
            for chunk in lines.chunks(1000) {
                let mut qb = QueryBuilder::<Postgres>::new(
                    "INSERT INTO log_lines (operation_id, attempt, at, task, stream, text) ",
                );
                qb.push_values(chunk, |mut b, line| {
                    b.push_bind(id)
                        .push_bind(line.attempt)
                        .push_bind(line.at)
                        .push_bind(pg_text(&line.task))
                        .push_bind(pg_text(&line.stream))
                        .push_bind(pg_text(&line.text));
                });
                qb.build().execute(&mut *tx).await?;
            }
            Ok(())
        }
        .await;
        settle(tx, result).await
    }

    async fn read_logs(&self, id: &str, after_seq: i64, limit: u32) -> Result<Vec<LogLine>> {
        let rows = sqlx::query(
            "SELECT seq, attempt, at, task, stream, text FROM log_lines
             WHERE operation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(id)
        .bind(after_seq)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(LogLine {
                    seq: row.try_get("seq")?,
                    attempt: row.try_get("attempt")?,
                    at: row.try_get("at")?,
                    task: row.try_get("task")?,
                    stream: row.try_get("stream")?,
                    text: row.try_get("text")?,
                })
            })
            .collect()
    }

    async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn remove_state_key(&self, id: &str, key: &str) -> Result<()> {
        sqlx::query("UPDATE operations SET state = (state::jsonb - $2)::text WHERE id = $1")
            .bind(id)
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn scrub(&self) -> Result<()> {
        // Dead row versions go; what PostgreSQL's own WAL and backups hold is the database
        // administrator's to expire.
        sqlx::query("VACUUM targets, projects, environments, operations")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn replace_setting(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool> {
        let done = match expected {
            None => {
                sqlx::query(
                    "INSERT INTO settings (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO NOTHING",
                )
                .bind(key)
                .bind(value)
                .execute(&self.pool)
                .await?
            }
            Some(expected) => {
                sqlx::query("UPDATE settings SET value = $1 WHERE key = $2 AND value = $3")
                    .bind(value)
                    .bind(key)
                    .bind(expected)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected() == 1)
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, name, token_sha256, role, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.token_sha256)
        .bind(&t.role)
        .bind(t.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn token_by_hash(&self, sha256: &str) -> Result<Option<TokenRecord>> {
        let row = sqlx::query("SELECT * FROM api_tokens WHERE token_sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(TokenRecord {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                token_sha256: row.try_get("token_sha256")?,
                role: row.try_get("role")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The examples of RFC 7396, appendix A.
    #[test]
    fn merge_patch_follows_rfc_7396() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (mut target, patch, expected) in cases {
            merge_patch(&mut target, &patch);
            assert_eq!(target, expected, "patch {patch}");
        }
    }

    #[test]
    fn nul_characters_are_replaced() {
        assert_eq!(pg_text("a\0b"), "a\u{FFFD}b");
        assert!(matches!(pg_text("plain"), Cow::Borrowed("plain")));
    }
}
