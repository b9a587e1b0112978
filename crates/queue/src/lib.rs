//! Who gets told that an operation is ready to run.
//!
//! The store is the source of truth and the arbiter of leases; a queue only carries hints
//! ("operation X is ready on queue Q") from whoever created the operation to the workers.
//! So a lost hint delays work but never loses it (workers also poll), and a duplicated hint is
//! harmless (claiming is atomic in the store). This trait knows nothing of Celery or AMQP;
//! [`celery`] is the Celery message protocol 2 codec a later AMQP queue builds on.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

pub mod amqp;
pub mod celery;
pub mod control;

/// An operation that is ready, as announced to workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub operation_id: String,
    pub kind: String,
    pub queue: String,
    /// The request's inputs plus the subject id under its type (`{"project": ID, ...}`):
    /// what a Celery message carries as kwargs.
    pub kwargs: serde_json::Value,
}

impl Job {
    /// The announcement of an operation: its inputs plus its subject's id under the subject's
    /// type as kwargs (`{"ref": "main", "project": ID}`).
    pub fn announce(
        operation_id: &str,
        kind: &str,
        queue: &str,
        inputs: &serde_json::Value,
        subject_type: &str,
        subject_id: &str,
    ) -> Job {
        let mut kwargs = match inputs {
            serde_json::Value::Object(map) => map.clone(),
            _ => Default::default(),
        };
        kwargs.insert(
            subject_type.to_string(),
            serde_json::Value::String(subject_id.to_string()),
        );
        Job {
            operation_id: operation_id.to_string(),
            kind: kind.to_string(),
            queue: queue.to_string(),
            kwargs: serde_json::Value::Object(kwargs),
        }
    }
}

/// What a message said about the operation it names, beyond its id: enough to create the
/// operation when a foreign client (a Python Celery `send_task`) sent it, and where to send
/// its result.
#[derive(Clone, Debug, PartialEq)]
pub struct Announcement {
    /// The operation kind (the Celery task name without its `hefring.` prefix).
    pub kind: String,
    /// The request's inputs plus the subject id under its type.
    pub kwargs: serde_json::Value,
    /// The queue it came from.
    pub queue: String,
    /// Where the client waits for the result (Celery's `rpc://` backend), if it does.
    pub reply_to: Option<String>,
    /// The broker delivered it before (a worker went away holding it).
    pub redelivered: bool,
}

/// How an operation ended, for a client waiting on its result.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub operation_id: String,
    pub succeeded: bool,
    /// The operation as the API shows it.
    pub operation: serde_json::Value,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
}

/// What a worker got from the queue.
#[derive(Debug)]
pub enum Delivery {
    /// A specific operation to try to claim; `tag` identifies the broker delivery to ack.
    Operation {
        id: String,
        tag: u64,
        announcement: Option<Announcement>,
    },
    /// Something may be ready (or the poll interval passed): claim whatever is claimable.
    Anything,
}

#[derive(Debug, thiserror::Error)]
#[error("queue error: {0}")]
pub struct QueueError(pub String);

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Announces a job whose operation is already committed to the store.
    async fn publish(&self, job: &Job) -> Result<(), QueueError>;
    /// Waits for the next delivery, at most `poll` long (then answers `Anything`).
    async fn next(&self, poll: Duration) -> Result<Delivery, QueueError>;
    /// The delivery was handled (its outcome is committed to the store).
    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError>;
    /// Moves a delivery that keeps failing to the dead-letter queue (and acks it there).
    async fn dead_letter(&self, delivery: &Delivery, _reason: &str) -> Result<(), QueueError> {
        self.ack(delivery).await
    }

    /// Whether deliveries name the operation to run (a broker holding one message per
    /// operation). Workers then claim exactly what they are handed, and look through the
    /// store for claimable work only when the queue is idle (a lost message, an operation
    /// queued while its subject was busy); otherwise they look through the store after every
    /// wake-up.
    fn names_operations(&self) -> bool {
        false
    }

    /// Sends an operation's outcome to a client waiting at `reply_to`.
    async fn reply(&self, _reply_to: &str, _outcome: &Outcome) -> Result<(), QueueError> {
        Ok(())
    }
}

/// What a worker tells the world about the operations it runs (Celery task events, for
/// Flower and `celery events`).
#[async_trait]
pub trait WorkerEvents: Send + Sync + 'static {
    /// A message named the operation and this worker took it.
    async fn received(&self, id: &str, kind: &str, kwargs: &serde_json::Value);
    async fn started(&self, id: &str, kind: &str, kwargs: &serde_json::Value);
    /// It ended; `error` is `None` when it succeeded.
    async fn finished(&self, id: &str, result: &serde_json::Value, error: Option<&str>);
}

#[async_trait]
impl WorkerEvents for control::Presence {
    async fn received(&self, id: &str, kind: &str, kwargs: &serde_json::Value) {
        self.task_received(id, &format!("{}{kind}", amqp::TASK_PREFIX), kwargs)
            .await
    }

    async fn started(&self, id: &str, kind: &str, kwargs: &serde_json::Value) {
        self.task_started(id, &format!("{}{kind}", amqp::TASK_PREFIX), kwargs)
            .await
    }

    async fn finished(&self, id: &str, result: &serde_json::Value, error: Option<&str>) {
        self.task_finished(id, result, error).await
    }
}

/// The embedded queue: workers live in the same process, so a wake-up is all they need.
#[derive(Clone, Default)]
pub struct EmbeddedQueue {
    ready: Arc<Notify>,
}

impl EmbeddedQueue {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Queue for EmbeddedQueue {
    async fn publish(&self, _job: &Job) -> Result<(), QueueError> {
        self.ready.notify_one();
        Ok(())
    }

    async fn next(&self, poll: Duration) -> Result<Delivery, QueueError> {
        let _ = tokio::time::timeout(poll, self.ready.notified()).await;
        Ok(Delivery::Anything)
    }

    async fn ack(&self, _delivery: &Delivery) -> Result<(), QueueError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_publish_wakes_a_waiting_worker_before_the_poll_interval() {
        let queue = EmbeddedQueue::new();
        let waiter = {
            let queue = queue.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                queue.next(Duration::from_secs(30)).await.unwrap();
                started.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let job = Job {
            operation_id: "op_x".into(),
            kind: "system_noop".into(),
            queue: "hefring".into(),
            kwargs: serde_json::json!({}),
        };
        queue.publish(&job).await.unwrap();
        let waited = waiter.await.unwrap();
        assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
    }
}
