//! What a task handler gets and gives back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hefring_backend_server::{
    CommandSpec, ExecError, Executor, LocalExecutor, SshExecutor, SshKeyPair, Stream,
};
use hefring_core::operation::TaskStatus;
use hefring_core::target::Host;
use hefring_store::{OperationRecord, Store, StoreError, TargetRecord};
use serde_json::Value;

use crate::log::OperationLog;

/// What every task can reach.
pub struct Context {
    pub store: Arc<dyn Store>,
    pub data_dir: PathBuf,
    pub ssh_key: SshKeyPair,
    /// Where HTTPS certificates come from; `None`: the installation's local CA.
    pub acme: Option<crate::acme::AcmeConfig>,
    /// Where backup archives are kept: a directory or an S3-compatible store.
    pub backups: Arc<dyn hefring_objects::ObjectStore>,
    /// Where operations that tasks start (a fleet update's children) are announced.
    pub queue: Arc<dyn hefring_queue::Queue>,
    /// Where release artifacts are shared between machines (`--artifact-store`); `None`:
    /// only this machine's `DATA_DIR/artifacts` (shared, if at all, as a directory).
    pub artifacts: Option<Arc<dyn hefring_objects::ObjectStore>>,
    /// Where build commands run and as whom.
    pub builds: crate::sandbox::Builds,
    /// The nftables script applied on SSH targets (`EngineConfig::target_network_rules`).
    pub target_network_rules: Option<String>,
}

/// An artifact's key in the artifact store.
pub fn artifact_key(sha256: &str) -> String {
    format!("artifacts/{sha256}.tar.zst")
}

/// One task's view of its operation.
pub struct TaskContext<'a> {
    pub ctx: &'a Context,
    pub op: &'a OperationRecord,
    /// The task being run (`-` after the tasks, when a failure is recorded).
    pub task: &'a str,
    /// What earlier tasks of this operation learned.
    pub state: &'a Value,
    pub log: &'a OperationLog,
}

/// A task that ended well.
#[derive(Debug, Default)]
pub struct TaskOutput {
    pub skipped: bool,
    pub state_patch: Option<Value>,
    /// Nothing after this task needs to run (for example, a build found its artifact).
    pub skip_remaining: bool,
}

impl TaskOutput {
    pub fn done() -> Self {
        TaskOutput::default()
    }

    pub fn with_state(patch: Value) -> Self {
        TaskOutput {
            state_patch: Some(patch),
            ..Default::default()
        }
    }

    pub fn status(&self) -> TaskStatus {
        if self.skipped {
            TaskStatus::Skipped
        } else {
            TaskStatus::Succeeded
        }
    }
}

/// A task that failed, with the sentence that tells the user why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TaskError(pub String);

impl TaskError {
    pub fn new(message: impl Into<String>) -> Self {
        TaskError(message.into())
    }
}

impl From<StoreError> for TaskError {
    fn from(e: StoreError) -> Self {
        TaskError(format!("store: {e}"))
    }
}

impl From<ExecError> for TaskError {
    fn from(e: ExecError) -> Self {
        TaskError(e.to_string())
    }
}

impl From<std::io::Error> for TaskError {
    fn from(e: std::io::Error) -> Self {
        TaskError(format!("i/o error: {e}"))
    }
}

pub type TaskResult = Result<TaskOutput, TaskError>;

impl Context {
    pub fn artifact_path(&self, sha256: &str) -> PathBuf {
        self.data_dir
            .join("artifacts")
            .join(format!("{sha256}.tar.zst"))
    }

    /// The artifact on this machine, fetched from the artifact store when another machine
    /// built it.
    pub async fn local_artifact(&self, sha256: &str) -> Result<PathBuf, TaskError> {
        let path = self.artifact_path(sha256);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let Some(store) = &self.artifacts else {
            return Err(TaskError(format!(
                "the artifact {} is not on this machine (give every worker the same --artifact-store, or share DATA_DIR/artifacts)",
                path.display()
            )));
        };
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        store
            .get_to_file(&artifact_key(sha256), &path)
            .await
            .map_err(|e| {
                TaskError(format!(
                    "fetching the artifact from {}: {e}",
                    store.describe()
                ))
            })?;
        Ok(path)
    }

    /// How to run commands on `target`.
    pub fn executor_for(&self, target: &TargetRecord) -> Result<Box<dyn Executor>, TaskError> {
        match Host::parse("host", &target.host).map_err(|e| TaskError(e.to_string()))? {
            Host::Local => Ok(Box::new(LocalExecutor)),
            Host::Ssh { user, host, port } => Ok(Box::new(SshExecutor {
                user,
                host,
                port,
                key: self.ssh_key.clone(),
                known_hosts: self
                    .data_dir
                    .join("ssh")
                    .join("known_hosts.d")
                    .join(&target.id),
                pinned_host_key: target.host_key.clone(),
            })),
        }
    }
}

/// Runs a command with its output in the operation's log; answers its exit code.
pub async fn run_logged(
    exec: &dyn Executor,
    spec: &CommandSpec,
    log: &OperationLog,
) -> Result<Option<i32>, TaskError> {
    let sink = |stream: Stream, line: String| log.line(stream.as_str(), line);
    Ok(exec.run(spec, &sink).await?)
}

/// Runs a command and answers its exit code and output, logging only its stderr.
pub async fn run_captured(
    exec: &dyn Executor,
    spec: &CommandSpec,
    log: &OperationLog,
) -> Result<(Option<i32>, String), TaskError> {
    let stdout = Mutex::new(String::new());
    let sink = |stream: Stream, line: String| match stream {
        Stream::Stdout => {
            let mut out = stdout.lock().unwrap();
            out.push_str(&line);
            out.push('\n');
        }
        Stream::Stderr => log.line("stderr", line),
    };
    let code = exec.run(spec, &sink).await?;
    Ok((code, stdout.into_inner().unwrap()))
}

/// Fails unless the command exited 0.
pub fn require_success(code: Option<i32>, what: &str) -> Result<(), TaskError> {
    match code {
        Some(0) => Ok(()),
        Some(code) => Err(TaskError(format!("{what} exited with status {code}"))),
        None => Err(TaskError(format!("{what} was killed by a signal"))),
    }
}

pub(crate) fn local() -> LocalExecutor {
    LocalExecutor
}
