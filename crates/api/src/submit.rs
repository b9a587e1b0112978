//! Starting work: the application layer stores the operation with its planned tasks, then the
//! workers are told.

use axum::http::StatusCode;
use axum::Json;
use hefring_app::{AppResult, Origin, Submitted};
use hefring_core::operation::OperationKind;
use hefring_queue::Job;
use hefring_store::OperationRecord;
use hefring_wire::Operation;
use serde_json::Value;

use crate::error::ApiResult;
use crate::AppState;

pub use hefring_app::now_ms;

/// Stores an operation Hefring itself starts (the scheduler's runs), with no request rules,
/// and announces it.
pub async fn submit(
    state: &AppState,
    kind: OperationKind,
    subject_id: &str,
    inputs: Value,
    requested_by: &str,
) -> ApiResult<OperationRecord> {
    let submitted = state
        .app()
        .store_operation(kind, subject_id, inputs, &Origin::caller(requested_by))
        .await?;
    announce(state, &submitted.operation).await;
    Ok(submitted.operation)
}

/// The answer to a request that started work: `202` with the operation, announced when the
/// request stored it.
pub async fn accepted(
    state: &AppState,
    submitted: AppResult<Submitted>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let submitted = submitted?;
    if submitted.created {
        announce(state, &submitted.operation).await;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(crate::convert::operation(submitted.operation)),
    ))
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
