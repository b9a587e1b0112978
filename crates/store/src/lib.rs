//! Hefring's persistence behind one trait, [`Store`]. SQLite is the embedded default;
//! PostgreSQL (distributed mode) implements the same trait with equivalent migrations.
//!
//! The operations table is also the embedded queue: claiming an operation means taking its
//! lease in a write transaction, and unique partial indexes make the database the arbiter of
//! "one running operation per subject" and "one active duplicate", whoever asks.

mod postgres;
mod records;
mod sealed;
pub mod secrets;
mod sqlite;
#[cfg(test)]
mod story;

pub use postgres::PostgresStore;
pub use records::*;
pub use sealed::{SealReport, SealedStore};
pub use secrets::{KeyFiles, Sealer};
pub use sqlite::SqliteStore;

use std::sync::Arc;

use async_trait::async_trait;
use hefring_core::operation::{OperationStatus, TaskStatus};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A unique name or similar constraint: the message says which.
    #[error("{0}")]
    Conflict(String),
    /// The same kind of operation with the same inputs is already queued or running.
    #[error("an identical operation is already queued or running: {existing}")]
    Duplicate { existing: String },
    /// A status change the state machine does not allow.
    #[error("{0}")]
    InvalidTransition(String),
    /// The worker's lease on the operation is gone (expired and taken over, or cancelled).
    #[error("the lease on operation {0} was lost")]
    LeaseLost(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A database URL no backend understands.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// JSON text of a value the store keeps in a TEXT column.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialise to JSON")
}

/// Opens the store a database URL names, bringing its schema up to date, with its secrets
/// sealed by `sealer` ([`SealedStore`]): `sqlite:…` or a plain path is SQLite (the file is
/// created if needed), `postgres://…` or `postgresql://…` is PostgreSQL. Any other scheme is
/// [`StoreError::Unsupported`].
pub async fn connect(url: &str, sealer: Arc<Sealer>) -> Result<Arc<SealedStore>> {
    let inner = connect_unsealed(url).await?;
    Ok(Arc::new(SealedStore::new(inner, sealer).await?))
}

/// The backend alone, without sealing: for tests that look at rows as they are stored.
pub async fn connect_unsealed(url: &str) -> Result<Arc<dyn Store>> {
    // A scheme is a letter, then letters, digits, `+`, `-` or `.`, then `:`. One letter is a
    // Windows drive, not a scheme.
    let scheme = url.split_once(':').map(|(s, _)| s).filter(|s| {
        s.len() > 1
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    match scheme.map(str::to_ascii_lowercase).as_deref() {
        None => Ok(Arc::new(SqliteStore::connect(url).await?)),
        Some("sqlite") => {
            let rest = &url["sqlite:".len()..];
            Ok(Arc::new(SqliteStore::connect(&format!("sqlite:{rest}")).await?))
        }
        Some("postgres" | "postgresql") => Ok(Arc::new(PostgresStore::connect(url).await?)),
        // Only the scheme: the rest of a URL may hold a password.
        Some(other) => Err(StoreError::Unsupported(format!(
            "unsupported database URL scheme {other:?}: use sqlite:PATH (or a plain path) or postgres://"
        ))),
    }
}

/// One page of a list: newest first, after `cursor` (an id) when given.
#[derive(Clone, Debug)]
pub struct Page {
    pub limit: u32,
    pub cursor: Option<String>,
}

/// A page of items and the cursor of the next page, if there may be one.
#[derive(Clone, Debug)]
pub struct Listed<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// Which operations to list.
#[derive(Clone, Debug, Default)]
pub struct OperationFilter {
    pub subject: Option<String>,
    pub status: Option<OperationStatus>,
    pub parent: Option<String>,
}

/// Which backups to list.
#[derive(Clone, Debug, Default)]
pub struct BackupFilter {
    pub environment: Option<String>,
    /// Made by this operation (a retried task finds what its first attempt recorded).
    pub operation: Option<String>,
    pub kind: Option<String>,
    pub status: Option<String>,
}

/// How a task ended, and what it learned for later tasks (merged into the operation's state).
#[derive(Clone, Debug)]
pub struct TaskOutcome {
    pub status: TaskStatus,
    pub state_patch: Option<serde_json::Value>,
}

/// How an operation ended.
#[derive(Clone, Debug)]
pub struct OperationOutcome {
    pub status: OperationStatus,
    pub result: serde_json::Value,
    pub error: Option<String>,
}

/// What a worker learns when it renews a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    Held { cancel_requested: bool },
    Lost,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // Targets
    async fn insert_target(&self, target: &TargetRecord) -> Result<()>;
    async fn get_target(&self, id: &str) -> Result<Option<TargetRecord>>;
    async fn target_by_name(&self, name: &str) -> Result<Option<TargetRecord>>;
    async fn list_targets(&self, page: &Page) -> Result<Listed<TargetRecord>>;
    async fn update_target(&self, target: &TargetRecord) -> Result<()>;
    async fn delete_target(&self, id: &str) -> Result<()>;

    // Projects
    async fn insert_project(&self, project: &ProjectRecord) -> Result<()>;
    async fn get_project(&self, id: &str) -> Result<Option<ProjectRecord>>;
    async fn list_projects(&self, page: &Page) -> Result<Listed<ProjectRecord>>;
    async fn update_project(&self, project: &ProjectRecord) -> Result<()>;

    // Releases
    async fn insert_release(&self, release: &ReleaseRecord) -> Result<()>;
    async fn get_release(&self, id: &str) -> Result<Option<ReleaseRecord>>;
    async fn release_by_commit(&self, project: &str, commit: &str)
        -> Result<Option<ReleaseRecord>>;
    async fn list_releases(
        &self,
        project: Option<&str>,
        page: &Page,
    ) -> Result<Listed<ReleaseRecord>>;
    async fn update_release(&self, release: &ReleaseRecord) -> Result<()>;

    // Environments
    async fn insert_environment(&self, environment: &EnvironmentRecord) -> Result<()>;
    async fn get_environment(&self, id: &str) -> Result<Option<EnvironmentRecord>>;
    /// Newest first, like every list.
    async fn list_environments(
        &self,
        filter: &EnvironmentFilter,
        page: &Page,
    ) -> Result<Listed<EnvironmentRecord>>;
    async fn update_environment(&self, environment: &EnvironmentRecord) -> Result<()>;
    async fn environments_running(&self, release: &str) -> Result<Vec<String>>;
    async fn environments_on_target(&self, target: &str) -> Result<Vec<String>>;

    // Backups
    async fn insert_backup(&self, backup: &BackupRecord) -> Result<()>;
    async fn get_backup(&self, id: &str) -> Result<Option<BackupRecord>>;
    /// Newest first; deleted backups are left out.
    async fn list_backups(
        &self,
        filter: &BackupFilter,
        page: &Page,
    ) -> Result<Listed<BackupRecord>>;
    async fn update_backup(&self, backup: &BackupRecord) -> Result<()>;

    // Operations
    /// Stores a queued operation with its planned tasks, unless an identical one is active.
    async fn create_operation(&self, new: &NewOperation, now: i64) -> Result<OperationRecord>;
    async fn get_operation(&self, id: &str) -> Result<Option<OperationRecord>>;
    async fn list_operations(
        &self,
        filter: &OperationFilter,
        page: &Page,
    ) -> Result<Listed<OperationRecord>>;
    /// Takes the lease of an operation whose lease expired, or else of the oldest queued
    /// operation whose subject has nothing running and nothing queued before it. `only`
    /// restricts the choice to one operation id (a broker delivered it).
    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<OperationRecord>>;
    /// Extends the lease; tells the worker if it was lost or a cancel was asked for.
    async fn renew_lease(&self, id: &str, owner: &str, until: i64) -> Result<LeaseState>;
    /// Marks every running lease expired: used by an embedded server that holds the data
    /// directory's lock, so no other process can own them.
    async fn expire_all_leases(&self) -> Result<u64>;
    async fn start_task(&self, id: &str, owner: &str, position: i64, now: i64) -> Result<()>;
    /// Records a task's end and, when `finish` is given, the operation's end, in one write.
    async fn finish_task(
        &self,
        id: &str,
        owner: &str,
        position: i64,
        outcome: &TaskOutcome,
        finish: Option<&OperationOutcome>,
        now: i64,
    ) -> Result<()>;
    /// Appends rollback tasks, recording in the state how the attempt is to end (so a crash
    /// during the rollback can finish it the same way).
    async fn begin_rollback(
        &self,
        id: &str,
        owner: &str,
        names: &[&str],
        ending: &serde_json::Value,
    ) -> Result<()>;
    async fn finish_operation(
        &self,
        id: &str,
        owner: &str,
        outcome: &OperationOutcome,
        now: i64,
    ) -> Result<()>;
    /// Counts one more redelivery of the operation's message; answers the count (`None`
    /// when there is no such operation).
    async fn count_redelivery(&self, id: &str) -> Result<Option<i64>>;
    /// Cancels a queued operation at once; asks the worker of a running one to stop.
    async fn request_cancel(&self, id: &str, now: i64) -> Result<OperationRecord>;
    /// A new attempt of a failed or cancelled operation.
    async fn retry_operation(
        &self,
        id: &str,
        from_start: bool,
        now: i64,
    ) -> Result<OperationRecord>;
    /// Records what several operation runs of one worker process did since the last call, in
    /// this order: task finishes, named claims, task starts. Each item's result is exactly what
    /// [`Store::finish_task`], [`Store::claim`] (with `only`) or [`Store::start_task`] would
    /// have answered alone; the items are of different operations. A store that can do them
    /// set-based in one transaction saves a statement and a commit per item (PostgreSQL);
    /// the default does them one by one.
    async fn record_progress(&self, progress: &Progress) -> ProgressMade {
        record_progress_one_by_one(self, progress).await
    }
    async fn append_logs(&self, id: &str, lines: &[NewLogLine]) -> Result<()>;
    async fn read_logs(&self, id: &str, after_seq: i64, limit: u32) -> Result<Vec<LogLine>>;

    /// Removes `key` from the operation's state (a login link, once answered).
    async fn remove_state_key(&self, id: &str, key: &str) -> Result<()>;
    /// Rewrites the store's files so that values overwritten or deleted so far leave no trace
    /// in them (SQLite: `VACUUM`, then the WAL truncated). Run after plaintext secrets were
    /// sealed in place; slow on a big database.
    async fn scrub(&self) -> Result<()>;

    // Settings
    async fn get_setting(&self, key: &str) -> Result<Option<String>>;
    async fn set_setting(&self, key: &str, value: &str) -> Result<()>;
    /// Sets `key` to `value` only if it still holds `expected` (`None`: only if it is not set
    /// yet); answers whether it did. Several processes sharing a database use it to agree on
    /// who acts on a value (the scheduler: which pass fires a job).
    async fn replace_setting(&self, key: &str, expected: Option<&str>, value: &str)
        -> Result<bool>;

    // API tokens
    async fn insert_token(&self, token: &TokenRecord) -> Result<()>;
    async fn token_by_hash(&self, sha256: &str) -> Result<Option<TokenRecord>>;
}

/// A worker's request for work.
#[derive(Clone, Debug)]
pub struct Claim<'a> {
    pub owner: &'a str,
    pub now: i64,
    pub lease_until: i64,
    pub queues: &'a [String],
    pub only: Option<&'a str>,
}

/// A task starting: one item of a [`Progress`].
#[derive(Clone, Debug)]
pub struct TaskStart {
    pub operation: String,
    pub owner: String,
    pub position: i64,
    pub now: i64,
}

/// A task ending with nothing to merge into the operation's state, and with `finish`, its
/// operation ending too: one item of a [`Progress`].
#[derive(Clone, Debug)]
pub struct TaskFinish {
    pub operation: String,
    pub owner: String,
    pub position: i64,
    pub status: TaskStatus,
    pub finish: Option<OperationOutcome>,
    pub now: i64,
}

/// A claim of one named operation (a broker delivered it): one item of a [`Progress`].
#[derive(Clone, Debug)]
pub struct NamedClaim {
    pub operation: String,
    pub owner: String,
    pub now: i64,
    pub lease_until: i64,
}

/// What a worker process's concurrent runs want recorded at once (see
/// [`Store::record_progress`]). Every claim is restricted to `queues` (empty: any).
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub finishes: Vec<TaskFinish>,
    pub claims: Vec<NamedClaim>,
    pub starts: Vec<TaskStart>,
    pub queues: Vec<String>,
}

/// The result of each item of a [`Progress`], in the same order.
#[derive(Debug, Default)]
pub struct ProgressMade {
    pub finishes: Vec<Result<()>>,
    pub claims: Vec<Result<Option<OperationRecord>>>,
    pub starts: Vec<Result<()>>,
}

/// [`Store::record_progress`] one item at a time, with the store's own single-item calls.
pub async fn record_progress_one_by_one<S: Store + ?Sized>(
    store: &S,
    progress: &Progress,
) -> ProgressMade {
    let mut made = ProgressMade::default();
    for f in &progress.finishes {
        let outcome = TaskOutcome {
            status: f.status,
            state_patch: None,
        };
        made.finishes.push(
            store
                .finish_task(
                    &f.operation,
                    &f.owner,
                    f.position,
                    &outcome,
                    f.finish.as_ref(),
                    f.now,
                )
                .await,
        );
    }
    for c in &progress.claims {
        let claim = Claim {
            owner: &c.owner,
            now: c.now,
            lease_until: c.lease_until,
            queues: &progress.queues,
            only: Some(&c.operation),
        };
        made.claims.push(store.claim(&claim).await);
    }
    for s in &progress.starts {
        made.starts.push(
            store
                .start_task(&s.operation, &s.owner, s.position, s.now)
                .await,
        );
    }
    made
}

/// The queue an operation goes to: its target's own queue when the target has one (for
/// operations on the target or on an environment of it), else the default.
pub async fn queue_for(
    store: &dyn Store,
    kind: hefring_core::operation::OperationKind,
    subject_id: &str,
) -> Result<String> {
    use hefring_core::operation::SubjectType;
    let target_id = match kind.subject_type() {
        SubjectType::Target => Some(subject_id.to_string()),
        SubjectType::Environment => store
            .get_environment(subject_id)
            .await?
            .map(|e| e.target_id),
        _ => None,
    };
    if let Some(target_id) = target_id {
        if let Some(target) = store.get_target(&target_id).await? {
            if target.settings.own_queue {
                return Ok(hefring_core::target::target_queue(&target.id));
            }
        }
    }
    Ok(DEFAULT_QUEUE.to_string())
}
