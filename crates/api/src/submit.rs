//! Starting work: store the operation with its planned tasks, then tell the workers.

use hefring_core::operation::OperationKind;
use hefring_queue::Job;
use hefring_store::{queue_for, NewOperation, OperationRecord};
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
    Job::announce(
        &record.id,
        record.kind.as_str(),
        &record.queue,
        &record.inputs,
        record.subject_type.as_str(),
        &record.subject_id,
    )
}
