//! Rows as the rest of Hefring sees them. Timestamps are milliseconds since the epoch.

use hefring_core::operation::{OperationKind, OperationStatus, SubjectType, TaskStatus};
use hefring_core::render::nginx::Alias;
use hefring_core::render::Https;
use hefring_core::target::TargetSettings;
pub use hefring_core::Secret;
use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
pub struct TargetRecord {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub status: String,
    pub host: String,
    pub root: String,
    pub http_port: u16,
    pub https_port: u16,
    pub web_user: String,
    pub host_key: Option<String>,
    pub inspection: Option<Value>,
    /// Database admin connections (with their passwords: never shown).
    pub settings: TargetSettings,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One site of a project on a target. What Hefring generated for it (`secrets`) and what it
/// created on the target (`resources`) stay in the store.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvironmentRecord {
    pub id: String,
    pub name: String,
    pub project_id: String,
    pub target_id: String,
    pub release_id: Option<String>,
    pub domain: String,
    pub aliases: Vec<Alias>,
    pub https: Https,
    pub status: String,
    /// Sealed at rest; `Debug` does not print it.
    pub secrets: Secret<Value>,
    pub resources: Value,
    /// What a user may change besides the domains: the cron schedule override and the backup
    /// schedule with its retention.
    pub settings: Value,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One archive of an environment's database and persistent files, in the backup store.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupRecord {
    pub id: String,
    pub environment_id: String,
    /// The operation that made (or is making) it.
    pub operation_id: String,
    /// `manual`, `scheduled` (pruned by the environment's retention) or `safety` (taken by a
    /// restore before it overwrote anything).
    pub kind: String,
    pub description: String,
    /// `creating`, `ready`, `failed` or `deleted`.
    pub status: String,
    /// Where the archive lives in the backup store.
    pub object_key: String,
    pub size: Option<i64>,
    pub sha256: Option<String>,
    /// The archive's manifest: environment, release, commit, parts with sizes and SHA-256,
    /// tool versions.
    pub manifest: Option<Value>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Which environments a list shows; `None` fields do not narrow it.
#[derive(Clone, Debug, Default)]
pub struct EnvironmentFilter {
    pub project: Option<String>,
    pub target: Option<String>,
    pub release: Option<String>,
    pub include_deleted: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProjectRecord {
    pub id: String,
    pub name: String,
    pub git_url: String,
    pub branch: String,
    pub status: String,
    pub manifest: Option<Value>,
    /// The key pair its fetches use (made when it is added, or on its first fetch).
    pub deploy_key: Option<DeployKey>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A project's own SSH key pair, for its repository alone.
#[derive(Clone, Debug, PartialEq)]
pub struct DeployKey {
    /// `ssh-ed25519 BASE64 COMMENT`: what the repository's host is given.
    pub public_key: String,
    /// The OpenSSH private key file's text; sealed at rest.
    pub private_key: Secret<String>,
}

/// A deploy key from its two columns (both or neither are set).
pub(crate) fn deploy_key(public: Option<String>, private: Option<String>) -> Option<DeployKey> {
    Some(DeployKey {
        public_key: public?,
        private_key: Secret::new(private?),
    })
}

#[derive(Clone, Debug, PartialEq)]
pub struct ReleaseRecord {
    pub id: String,
    pub project_id: String,
    pub git_ref: String,
    pub commit: String,
    pub status: String,
    pub artifact_sha256: Option<String>,
    pub artifact_size: Option<i64>,
    pub image: Option<String>,
    pub build_operation_id: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// An operation to queue, with the names of its planned tasks in order.
#[derive(Clone, Debug)]
pub struct NewOperation {
    pub id: String,
    pub kind: OperationKind,
    pub subject_type: SubjectType,
    pub subject_id: String,
    pub inputs: Value,
    pub requested_by: String,
    pub parent_id: Option<String>,
    pub queue: String,
    pub tasks: Vec<String>,
}

/// The queue every operation goes to unless it names a target's own queue.
pub const DEFAULT_QUEUE: &str = "hefring";

impl NewOperation {
    /// A new operation of `kind` on `subject_id`, with the kind's planned tasks, on the
    /// default queue.
    pub fn planned(
        kind: OperationKind,
        subject_id: &str,
        inputs: Value,
        requested_by: &str,
        now: i64,
    ) -> Self {
        NewOperation {
            id: hefring_core::new_id(hefring_core::IdKind::Operation, now),
            kind,
            subject_type: kind.subject_type(),
            subject_id: subject_id.to_string(),
            inputs,
            requested_by: requested_by.to_string(),
            parent_id: None,
            queue: DEFAULT_QUEUE.into(),
            tasks: kind.tasks().iter().map(|t| t.to_string()).collect(),
        }
    }

    /// What makes two requests "the same operation": kind, subject and inputs.
    pub fn dedupe_key(&self) -> String {
        format!(
            "{}|{}|{}",
            self.kind.as_str(),
            self.subject_id,
            serde_json::to_string(&self.inputs).unwrap_or_default()
        )
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct OperationRecord {
    pub id: String,
    pub kind: OperationKind,
    pub subject_type: SubjectType,
    pub subject_id: String,
    pub status: OperationStatus,
    pub attempt: i64,
    pub parent_id: Option<String>,
    pub requested_by: String,
    pub inputs: Value,
    /// What finished tasks learned, for the tasks after them (survives a crash).
    pub state: Value,
    pub result: Value,
    pub error: Option<String>,
    pub cancel_requested: bool,
    /// How many times a broker redelivered its message (workers died holding it).
    pub deliveries: i64,
    pub queue: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub updated_at: i64,
    pub tasks: Vec<TaskRecord>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TaskRecord {
    pub position: i64,
    pub name: String,
    pub status: TaskStatus,
    pub attempts: i64,
    pub rollback: bool,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewLogLine {
    pub attempt: i64,
    pub at: i64,
    pub task: String,
    pub stream: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    pub seq: i64,
    pub attempt: i64,
    pub at: i64,
    pub task: String,
    pub stream: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub token_sha256: String,
    pub role: String,
    pub created_at: i64,
}
