//! Starting work: store the operation with its planned tasks, then tell the workers.

use hefring_core::operation::{OperationKind, SubjectType};
use hefring_queue::Job;
use hefring_store::{NewOperation, OperationRecord, Store, StoreError, DEFAULT_QUEUE};
use serde_json::Value;

use crate::error::ApiResult;
use crate::AppState;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub async fn submit(
    state: &AppState,
    kind: OperationKind,
    subject_id: &str,
    inputs: Value,
    requested_by: &str,
) -> ApiResult<OperationRecord> {
    let now = now_ms();
    let mut new = NewOperation::planned(kind, subject_id, inputs, requested_by, now);
    new.queue = queue_for(state.store.as_ref(), kind, subject_id).await?;
    let record = state.store.create_operation(&new, now).await?;
    announce(state, &record).await;
    Ok(record)
}

/// The queue an operation goes to: its target's own queue when the target has one (for
/// operations on the target or on an environment of it), else the default.
pub async fn queue_for(
    store: &dyn Store,
    kind: OperationKind,
    subject_id: &str,
) -> Result<String, StoreError> {
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

/// Tells the workers; a lost announcement only delays the work (workers also poll).
///
/// The request does not wait for it: the operation is already committed, and a broker that is
/// down or restarting would otherwise hold the answer for its reconnection timeout.
pub async fn announce(state: &AppState, record: &OperationRecord) {
    let queue = state.queue.clone();
    let job = job_for(record);
    tokio::spawn(async move {
        if let Err(e) = queue.publish(&job).await {
            tracing::warn!(operation = %job.operation_id, error = %e, "could not announce the operation");
        }
    });
}

/// What the queue carries for an operation: its id, kind and queue, and as kwargs its inputs
/// plus its subject id under the subject's type (`{"ref": "main", "project": ID}`).
pub fn job_for(record: &OperationRecord) -> Job {
    Job {
        operation_id: record.id.clone(),
        kind: record.kind.as_str().into(),
        queue: record.queue.clone(),
        kwargs: job_kwargs(record),
    }
}

fn job_kwargs(record: &OperationRecord) -> Value {
    let mut kwargs = match &record.inputs {
        Value::Object(map) => map.clone(),
        _ => Default::default(),
    };
    kwargs.insert(
        record.subject_type.as_str().into(),
        Value::String(record.subject_id.clone()),
    );
    Value::Object(kwargs)
}
