//! Hefring's application layer: every rule about what may be asked (a release or backup
//! belongs to the environment's project, refs and descriptions are valid, the state allows
//! the action, no conflicting operation is queued or running, edge validation of settings),
//! and the planning and storing of what is asked, in one place below every way in:
//! the API's handlers, the worker's intake of foreign Celery messages ([`App::from_message`])
//! and the web UI call the same function for the same request.
//!
//! Errors are data ([`AppError`], naming the field); the API turns them into HTTP statuses,
//! the intake into a Celery `FAILURE`. Nothing is stored when a request is refused. Storing an
//! operation does not announce it: the API announces what it stored, a message is its own
//! announcement.

mod backups;
mod environments;
mod error;
mod message;
mod projects;
mod releases;
mod schedules;
mod targets;

use std::path::PathBuf;
use std::sync::Arc;

use hefring_core::operation::OperationKind;
use hefring_store::{queue_for, NewOperation, OperationRecord, Store};
use serde_json::Value;

pub use environments::NewEnvironment;
pub use error::{AppError, AppResult};
pub use message::{field_of, from_value};

/// The application: the store it keeps things in and where Hefring's data directory is.
#[derive(Clone)]
pub struct App {
    store: Arc<dyn Store>,
    /// Absolute: Hefring's data directory; no repository may live inside.
    data_dir: PathBuf,
    /// Where targets on this machine get their root when none is given (`ROOT/NAME`).
    targets_root: PathBuf,
}

/// Who asks, and how the operation is to be stored.
#[derive(Clone, Debug)]
pub struct Origin {
    /// Recorded on the operation (`requested_by`).
    pub requested_by: String,
    /// The operation's id when the request brings one (a Celery message's task id).
    pub id: Option<String>,
    /// The queue when the request came on one (a Celery message); otherwise the subject's.
    pub queue: Option<String>,
}

impl Origin {
    /// A request of an API caller (or a UI user).
    pub fn caller(name: &str) -> Origin {
        Origin {
            requested_by: name.to_string(),
            id: None,
            queue: None,
        }
    }

    /// A foreign message: the operation takes the message's id and stays on its queue.
    pub fn message(id: &str, queue: &str) -> Origin {
        Origin {
            requested_by: "celery".into(),
            id: Some(id.to_string()),
            queue: Some(queue.to_string()),
        }
    }
}

/// An operation a request stored, or the existing one it stands for (a release build of a
/// commit that already has a release answers that build).
#[derive(Clone, Debug)]
pub struct Submitted {
    pub operation: OperationRecord,
    /// Stored by this request, so still to be announced.
    pub created: bool,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl App {
    /// The application over `store`; local targets get their default root below
    /// `DATA_DIR/targets` unless [`App::with_targets_root`] says otherwise.
    pub fn new(store: Arc<dyn Store>, data_dir: PathBuf) -> App {
        App {
            targets_root: data_dir.join("targets"),
            store,
            data_dir,
        }
    }

    /// Where targets on this machine get their root when none is given.
    pub fn with_targets_root(mut self, targets_root: PathBuf) -> App {
        self.targets_root = targets_root;
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Stores an operation with its planned tasks, on the queue of its subject (or the
    /// origin's). No rule is checked here: every caller outside this crate is Hefring itself
    /// (the scheduler's runs); requests go through the function of their kind.
    pub async fn store_operation(
        &self,
        kind: OperationKind,
        subject_id: &str,
        inputs: Value,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        let now = now_ms();
        let mut new = NewOperation::planned(kind, subject_id, inputs, &origin.requested_by, now);
        if let Some(id) = &origin.id {
            new.id = id.clone();
        }
        new.queue = match &origin.queue {
            Some(queue) => queue.clone(),
            None => queue_for(self.store.as_ref(), kind, subject_id).await?,
        };
        let operation = self.store.create_operation(&new, now).await?;
        Ok(Submitted {
            operation,
            created: true,
        })
    }
}

#[cfg(test)]
mod tests;
