//! The SQLite store: one writer connection (SQLite allows one writer at a time anyway, and a
//! single connection never sees SQLITE_BUSY from itself) and a small pool of readers, in WAL
//! mode so readers never block the writer.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use hefring_core::operation::{
    self as op, OperationEvent, OperationKind, OperationStatus, SubjectType, TaskStatus,
};
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection};

use crate::*;

pub struct SqliteStore {
    write: SqlitePool,
    read: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH` or a plain path) and
    /// brings its schema up to date.
    pub async fn connect(url: &str) -> Result<SqliteStore> {
        let url = if url.starts_with("sqlite:") {
            url.to_string()
        } else {
            format!("sqlite://{url}")
        };
        let options = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(SqliteStore { write, read })
    }
}

fn unique_violation(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => Some(db.message().to_string()),
        _ => None,
    }
}

fn conflict_on_name(e: sqlx::Error, what: &str) -> StoreError {
    match unique_violation(&e) {
        Some(msg) if msg.contains(".name") => {
            StoreError::Conflict(format!("a {what} with this name already exists"))
        }
        Some(msg) => StoreError::Conflict(msg),
        None => StoreError::Database(e),
    }
}

fn json_col(row: &SqliteRow, col: &str) -> Result<Value> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn opt_json_col(row: &SqliteRow, col: &str) -> Result<Option<Value>> {
    let text: Option<String> = row.try_get(col)?;
    text.map(|t| serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("{col}: {e}"))))
        .transpose()
}

fn parse_enum<T>(row: &SqliteRow, col: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    let text: String = row.try_get(col)?;
    parse(&text).ok_or_else(|| StoreError::Corrupt(format!("{col}: unknown value {text:?}")))
}

fn target_from_row(row: &SqliteRow) -> Result<TargetRecord> {
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
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn project_from_row(row: &SqliteRow) -> Result<ProjectRecord> {
    Ok(ProjectRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        git_url: row.try_get("git_url")?,
        branch: row.try_get("branch")?,
        status: row.try_get("status")?,
        manifest: opt_json_col(row, "manifest")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn release_from_row(row: &SqliteRow) -> Result<ReleaseRecord> {
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

fn operation_from_row(row: &SqliteRow, tasks: Vec<TaskRecord>) -> Result<OperationRecord> {
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
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        queue: row.try_get("queue")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        updated_at: row.try_get("updated_at")?,
        tasks,
    })
}

fn task_from_row(row: &SqliteRow) -> Result<TaskRecord> {
    Ok(TaskRecord {
        position: row.try_get("position")?,
        name: row.try_get("name")?,
        status: parse_enum(row, "status", TaskStatus::parse)?,
        attempts: row.try_get("attempts")?,
        rollback: row.try_get::<i64, _>("rollback")? != 0,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

async fn load_operation(conn: &mut SqliteConnection, id: &str) -> Result<Option<OperationRecord>> {
    let Some(row) = sqlx::query("SELECT * FROM operations WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let tasks = sqlx::query("SELECT * FROM tasks WHERE operation_id = ? ORDER BY position")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(task_from_row)
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(operation_from_row(&row, tasks)?))
}

async fn must_load(conn: &mut SqliteConnection, id: &str) -> Result<OperationRecord> {
    load_operation(conn, id).await?.ok_or(StoreError::NotFound)
}

/// The active operation sharing `dedupe_key`, to name it in a 409.
async fn active_duplicate(conn: &mut SqliteConnection, dedupe_key: &str) -> Result<StoreError> {
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT id FROM operations WHERE dedupe_key = ? AND status IN ('queued', 'running')",
    )
    .bind(dedupe_key)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(StoreError::Duplicate {
        existing: existing.unwrap_or_default(),
    })
}

async fn check_lease(conn: &mut SqliteConnection, id: &str, owner: &str) -> Result<()> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT 1 FROM operations WHERE id = ? AND lease_owner = ? AND status = 'running'",
    )
    .bind(id)
    .bind(owner)
    .fetch_optional(&mut *conn)
    .await?;
    held.map(|_| ())
        .ok_or_else(|| StoreError::LeaseLost(id.into()))
}

async fn end_operation(
    conn: &mut SqliteConnection,
    id: &str,
    owner: &str,
    outcome: &OperationOutcome,
    now: i64,
) -> Result<()> {
    let done = sqlx::query(
        "UPDATE operations SET status = ?, result = ?, error = ?, finished_at = ?, updated_at = ?,
                lease_owner = NULL, lease_expires_at = NULL, cancel_requested = 0
         WHERE id = ? AND lease_owner = ? AND status = 'running'",
    )
    .bind(outcome.status.as_str())
    .bind(outcome.result.to_string())
    .bind(&outcome.error)
    .bind(now)
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
            "UPDATE tasks SET status = 'cancelled', finished_at = COALESCE(finished_at, ?)
             WHERE operation_id = ? AND status IN ('pending', 'running')",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

fn push_page<'a>(qb: &mut QueryBuilder<'a, Sqlite>, page: &'a Page, has_where: bool) {
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

#[async_trait]
impl Store for SqliteStore {
    async fn insert_target(&self, t: &TargetRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO targets (id, name, kind, status, host, root, http_port, https_port,
                web_user, host_key, inspection, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(t.created_at)
        .bind(t.updated_at)
        .execute(&self.write)
        .await
        .map_err(|e| conflict_on_name(e, "target"))?;
        Ok(())
    }

    async fn get_target(&self, id: &str) -> Result<Option<TargetRecord>> {
        sqlx::query("SELECT * FROM targets WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.read)
            .await?
            .as_ref()
            .map(target_from_row)
            .transpose()
    }

    async fn target_by_name(&self, name: &str) -> Result<Option<TargetRecord>> {
        sqlx::query("SELECT * FROM targets WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.read)
            .await?
            .as_ref()
            .map(target_from_row)
            .transpose()
    }

    async fn list_targets(&self, page: &Page) -> Result<Listed<TargetRecord>> {
        let mut qb = QueryBuilder::new("SELECT * FROM targets");
        push_page(&mut qb, page, false);
        let rows = qb.build().fetch_all(&self.read).await?;
        let items = rows
            .iter()
            .map(target_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(paged(items, page, |t| &t.id))
    }

    async fn update_target(&self, t: &TargetRecord) -> Result<()> {
        let done = sqlx::query(
            "UPDATE targets SET status = ?, host_key = ?, inspection = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&t.status)
        .bind(&t.host_key)
        .bind(t.inspection.as_ref().map(Value::to_string))
        .bind(t.updated_at)
        .bind(&t.id)
        .execute(&self.write)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn delete_target(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM targets WHERE id = ?")
            .bind(id)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn insert_project(&self, p: &ProjectRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO projects (id, name, git_url, branch, status, manifest, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&p.id)
        .bind(&p.name)
        .bind(&p.git_url)
        .bind(&p.branch)
        .bind(&p.status)
        .bind(p.manifest.as_ref().map(Value::to_string))
        .bind(p.created_at)
        .bind(p.updated_at)
        .execute(&self.write)
        .await
        .map_err(|e| conflict_on_name(e, "project"))?;
        Ok(())
    }

    async fn get_project(&self, id: &str) -> Result<Option<ProjectRecord>> {
        sqlx::query("SELECT * FROM projects WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.read)
            .await?
            .as_ref()
            .map(project_from_row)
            .transpose()
    }

    async fn list_projects(&self, page: &Page) -> Result<Listed<ProjectRecord>> {
        let mut qb = QueryBuilder::new("SELECT * FROM projects");
        push_page(&mut qb, page, false);
        let rows = qb.build().fetch_all(&self.read).await?;
        let items = rows
            .iter()
            .map(project_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(paged(items, page, |p| &p.id))
    }

    async fn update_project(&self, p: &ProjectRecord) -> Result<()> {
        sqlx::query("UPDATE projects SET status = ?, manifest = ?, updated_at = ? WHERE id = ?")
            .bind(&p.status)
            .bind(p.manifest.as_ref().map(Value::to_string))
            .bind(p.updated_at)
            .bind(&p.id)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn insert_release(&self, r: &ReleaseRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO releases (id, project_id, git_ref, commit_sha, status, artifact_sha256,
                artifact_size, image, build_operation_id, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .execute(&self.write)
        .await
        .map_err(|e| match unique_violation(&e) {
            Some(_) => StoreError::Conflict("a release of this commit already exists".into()),
            None => StoreError::Database(e),
        })?;
        Ok(())
    }

    async fn get_release(&self, id: &str) -> Result<Option<ReleaseRecord>> {
        sqlx::query("SELECT * FROM releases WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.read)
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
        sqlx::query("SELECT * FROM releases WHERE project_id = ? AND commit_sha = ?")
            .bind(project)
            .bind(commit)
            .fetch_optional(&self.read)
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
        let rows = qb.build().fetch_all(&self.read).await?;
        let items = rows
            .iter()
            .map(release_from_row)
            .collect::<Result<Vec<_>>>()?;
        Ok(paged(items, page, |r| &r.id))
    }

    async fn update_release(&self, r: &ReleaseRecord) -> Result<()> {
        sqlx::query(
            "UPDATE releases SET status = ?, artifact_sha256 = ?, artifact_size = ?, image = ?,
                build_operation_id = ?, updated_at = ? WHERE id = ?",
        )
        .bind(&r.status)
        .bind(&r.artifact_sha256)
        .bind(r.artifact_size)
        .bind(&r.image)
        .bind(&r.build_operation_id)
        .bind(r.updated_at)
        .bind(&r.id)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn environments_running(&self, release: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM environments WHERE release_id = ? AND status != 'deleted' ORDER BY id",
        )
        .bind(release)
        .fetch_all(&self.read)
        .await?)
    }

    async fn environments_on_target(&self, target: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM environments WHERE target_id = ? AND status != 'deleted' ORDER BY id",
        )
        .bind(target)
        .fetch_all(&self.read)
        .await?)
    }

    async fn create_operation(&self, new: &NewOperation, now: i64) -> Result<OperationRecord> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let dedupe_key = new.dedupe_key();
        let inserted = sqlx::query(
            "INSERT INTO operations (id, kind, subject_type, subject_id, status, attempt, parent_id,
                requested_by, inputs, dedupe_key, state, result, queue, created_at, queued_at, updated_at)
             VALUES (?, ?, ?, ?, 'queued', 1, ?, ?, ?, ?, '{}', '{}', ?, ?, ?, ?)",
        )
        .bind(&new.id)
        .bind(new.kind.as_str())
        .bind(new.subject_type.as_str())
        .bind(&new.subject_id)
        .bind(&new.parent_id)
        .bind(&new.requested_by)
        .bind(new.inputs.to_string())
        .bind(&dedupe_key)
        .bind(&new.queue)
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            if unique_violation(&e).is_some() {
                return Err(active_duplicate(&mut tx, &dedupe_key).await?);
            }
            return Err(e.into());
        }
        let mut qb = QueryBuilder::new("INSERT INTO tasks (operation_id, position, name, status) ");
        qb.push_values(new.tasks.iter().enumerate(), |mut b, (i, name)| {
            b.push_bind(&new.id)
                .push_bind(i as i64)
                .push_bind(name)
                .push_bind("pending");
        });
        qb.build().execute(&mut *tx).await?;
        let record = must_load(&mut tx, &new.id).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn get_operation(&self, id: &str) -> Result<Option<OperationRecord>> {
        let mut conn = self.read.acquire().await?;
        load_operation(&mut conn, id).await
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
        let mut conn = self.read.acquire().await?;
        let ids: Vec<String> = qb.build_query_scalar().fetch_all(&mut *conn).await?;
        let mut items = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(record) = load_operation(&mut conn, &id).await? {
                items.push(record);
            }
        }
        Ok(paged(items, page, |o| &o.id))
    }

    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<OperationRecord>> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let narrow = |qb: &mut QueryBuilder<'_, Sqlite>, alias: &str| {
            if let Some(only) = claim.only {
                qb.push(format!(" AND {alias}.id = "))
                    .push_bind(only.to_string());
            }
            if !claim.queues.is_empty() {
                qb.push(format!(" AND {alias}.queue IN ("));
                let mut list = qb.separated(", ");
                for q in claim.queues {
                    list.push_bind(q.clone());
                }
                qb.push(")");
            }
        };

        // A lease that expired belongs to a worker that died: take the operation over.
        let mut qb = QueryBuilder::new("UPDATE operations SET lease_owner = ");
        qb.push_bind(claim.owner)
            .push(", lease_expires_at = ")
            .push_bind(claim.lease_until)
            .push(", updated_at = ")
            .push_bind(claim.now)
            .push(" WHERE id = (SELECT o.id FROM operations o WHERE o.status = 'running' AND o.lease_expires_at < ")
            .push_bind(claim.now);
        narrow(&mut qb, "o");
        qb.push(" ORDER BY o.lease_expires_at LIMIT 1) RETURNING id");
        let mut claimed: Option<String> = qb.build_query_scalar().fetch_optional(&mut *tx).await?;

        if claimed.is_none() {
            let mut qb =
                QueryBuilder::new("UPDATE operations SET status = 'running', lease_owner = ");
            qb.push_bind(claim.owner)
                .push(", lease_expires_at = ")
                .push_bind(claim.lease_until)
                .push(", started_at = COALESCE(started_at, ")
                .push_bind(claim.now)
                .push("), updated_at = ")
                .push_bind(claim.now)
                .push(
                    " WHERE id = (SELECT o.id FROM operations o WHERE o.status = 'queued'
                       AND NOT EXISTS (SELECT 1 FROM operations r
                           WHERE r.subject_id = o.subject_id AND r.status = 'running')
                       AND NOT EXISTS (SELECT 1 FROM operations q
                           WHERE q.subject_id = o.subject_id AND q.status = 'queued'
                             AND (q.queued_at < o.queued_at OR (q.queued_at = o.queued_at AND q.id < o.id)))",
                );
            narrow(&mut qb, "o");
            qb.push(" ORDER BY o.queued_at, o.id LIMIT 1) RETURNING id");
            claimed = qb.build_query_scalar().fetch_optional(&mut *tx).await?;
        }

        let record = match claimed {
            Some(id) => Some(must_load(&mut tx, &id).await?),
            None => None,
        };
        tx.commit().await?;
        Ok(record)
    }

    async fn renew_lease(&self, id: &str, owner: &str, until: i64) -> Result<LeaseState> {
        let cancel: Option<i64> = sqlx::query_scalar(
            "UPDATE operations SET lease_expires_at = ?
             WHERE id = ? AND lease_owner = ? AND status = 'running' RETURNING cancel_requested",
        )
        .bind(until)
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.write)
        .await?;
        Ok(match cancel {
            Some(flag) => LeaseState::Held {
                cancel_requested: flag != 0,
            },
            None => LeaseState::Lost,
        })
    }

    async fn expire_all_leases(&self) -> Result<u64> {
        let done =
            sqlx::query("UPDATE operations SET lease_expires_at = 0 WHERE status = 'running'")
                .execute(&self.write)
                .await?;
        Ok(done.rows_affected())
    }

    async fn start_task(&self, id: &str, owner: &str, position: i64, now: i64) -> Result<()> {
        let done = sqlx::query(
            "UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = ?, finished_at = NULL
             WHERE operation_id = ? AND position = ?
               AND EXISTS (SELECT 1 FROM operations
                           WHERE id = ? AND lease_owner = ? AND status = 'running')",
        )
        .bind(now)
        .bind(id)
        .bind(position)
        .bind(id)
        .bind(owner)
        .execute(&self.write)
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
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        check_lease(&mut tx, id, owner).await?;
        let started = if outcome.status == TaskStatus::Skipped {
            "NULL"
        } else {
            "started_at"
        };
        sqlx::query(&format!(
            "UPDATE tasks SET status = ?, finished_at = ?, started_at = {started}
             WHERE operation_id = ? AND position = ?"
        ))
        .bind(outcome.status.as_str())
        .bind(now)
        .bind(id)
        .bind(position)
        .execute(&mut *tx)
        .await?;
        if let Some(patch) = &outcome.state_patch {
            sqlx::query(
                "UPDATE operations SET state = json_patch(state, ?), updated_at = ? WHERE id = ?",
            )
            .bind(patch.to_string())
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(finish) = finish {
            end_operation(&mut tx, id, owner, finish, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn begin_rollback(
        &self,
        id: &str,
        owner: &str,
        names: &[&str],
        ending: &Value,
    ) -> Result<()> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        check_lease(&mut tx, id, owner).await?;
        sqlx::query("UPDATE operations SET state = json_patch(state, ?) WHERE id = ?")
            .bind(ending.to_string())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let next: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(position), -1) + 1 FROM tasks WHERE operation_id = ?",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let mut qb = QueryBuilder::new(
            "INSERT INTO tasks (operation_id, position, name, status, rollback) ",
        );
        qb.push_values(names.iter().enumerate(), |mut b, (i, name)| {
            b.push_bind(id)
                .push_bind(next + i as i64)
                .push_bind(*name)
                .push_bind("pending")
                .push_bind(1i64);
        });
        qb.build().execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn finish_operation(
        &self,
        id: &str,
        owner: &str,
        outcome: &OperationOutcome,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        end_operation(&mut tx, id, owner, outcome, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn request_cancel(&self, id: &str, now: i64) -> Result<OperationRecord> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let current = must_load(&mut tx, id).await?;
        op::transition(current.status, OperationEvent::Cancel)
            .map_err(|e| StoreError::InvalidTransition(e.to_string()))?;
        if current.status == OperationStatus::Queued {
            sqlx::query(
                "UPDATE operations SET status = 'cancelled', finished_at = ?, updated_at = ?
                 WHERE id = ?",
            )
            .bind(now)
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE tasks SET status = 'cancelled' WHERE operation_id = ? AND status = 'pending'",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query("UPDATE operations SET cancel_requested = 1, updated_at = ? WHERE id = ?")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let record = must_load(&mut tx, id).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn retry_operation(
        &self,
        id: &str,
        from_start: bool,
        now: i64,
    ) -> Result<OperationRecord> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let current = must_load(&mut tx, id).await?;
        op::transition(current.status, OperationEvent::Retry)
            .map_err(|e| StoreError::InvalidTransition(e.to_string()))?;
        sqlx::query("DELETE FROM tasks WHERE operation_id = ? AND rollback = 1")
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
                    "UPDATE tasks SET status = ?, started_at = NULL, finished_at = NULL
                     WHERE operation_id = ? AND position = ?",
                )
                .bind(status.as_str())
                .bind(id)
                .bind(task.position)
                .execute(&mut *tx)
                .await?;
            }
        }
        let requeued = sqlx::query(&format!(
            "UPDATE operations SET status = 'queued', attempt = attempt + 1, error = NULL,
                result = '{{}}', cancel_requested = 0, finished_at = NULL, queued_at = ?,
                updated_at = ?, lease_owner = NULL, lease_expires_at = NULL{}
             WHERE id = ?",
            if from_start { ", state = '{}'" } else { "" }
        ))
        .bind(now)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await;
        if let Err(e) = requeued {
            if unique_violation(&e).is_some() {
                let key: String =
                    sqlx::query_scalar("SELECT dedupe_key FROM operations WHERE id = ?")
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await?;
                return Err(active_duplicate(&mut tx, &key).await?);
            }
            return Err(e.into());
        }
        let record = must_load(&mut tx, id).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn append_logs(&self, id: &str, lines: &[NewLogLine]) -> Result<()> {
        // SQLite allows 32766 bound values; six per line.
        for chunk in lines.chunks(1000) {
            let mut qb = QueryBuilder::new(
                "INSERT INTO log_lines (operation_id, attempt, at, task, stream, text) ",
            );
            qb.push_values(chunk, |mut b, line| {
                b.push_bind(id)
                    .push_bind(line.attempt)
                    .push_bind(line.at)
                    .push_bind(&line.task)
                    .push_bind(&line.stream)
                    .push_bind(&line.text);
            });
            qb.build().execute(&self.write).await?;
        }
        Ok(())
    }

    async fn read_logs(&self, id: &str, after_seq: i64, limit: u32) -> Result<Vec<LogLine>> {
        let rows = sqlx::query(
            "SELECT seq, attempt, at, task, stream, text FROM log_lines
             WHERE operation_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(id)
        .bind(after_seq)
        .bind(limit as i64)
        .fetch_all(&self.read)
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
            sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.read)
                .await?,
        )
    }

    async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES (?, ?)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn insert_token(&self, t: &TokenRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, name, token_sha256, role, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.name)
        .bind(&t.token_sha256)
        .bind(&t.role)
        .bind(t.created_at)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn token_by_hash(&self, sha256: &str) -> Result<Option<TokenRecord>> {
        let row = sqlx::query("SELECT * FROM api_tokens WHERE token_sha256 = ?")
            .bind(sha256)
            .fetch_optional(&self.read)
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
