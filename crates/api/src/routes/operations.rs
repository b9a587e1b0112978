use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use hefring_core::operation::OperationStatus;
use hefring_store::{LogLine, OperationFilter};
use hefring_wire::{ErrorBody, List, Operation, PageQuery, RetryOperation};
use serde::Deserialize;
use utoipa::IntoParams;

use super::page;
use crate::convert::{self, timestamp};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Body, Query};
use crate::submit::{announce, now_ms};
use crate::AppState;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OperationQuery {
    /// Only operations on this subject (a target, project, release or environment id).
    pub subject: Option<String>,
    /// Only operations in this status.
    pub status: Option<String>,
    /// Only the children of this operation.
    pub parent: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// List operations, newest first.
#[utoipa::path(get, path = "/api/v1/operations", tag = "operations", params(OperationQuery),
    responses((status = 200, body = List<Operation>), (status = 422, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<OperationQuery>,
) -> ApiResult<Json<List<Operation>>> {
    let status = match &query.status {
        Some(s) => Some(OperationStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "status",
                "must be one of queued, running, succeeded, failed, cancelled",
            )
        })?),
        None => None,
    };
    let filter = OperationFilter {
        subject: query.subject.clone(),
        status,
        parent: query.parent.clone(),
    };
    let page = page(&PageQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
    })?;
    let listed = state.store.list_operations(&filter, &page).await?;
    Ok(Json(List {
        items: listed.items.into_iter().map(convert::operation).collect(),
        next: listed.next,
    }))
}

/// One operation with its tasks.
#[utoipa::path(get, path = "/api/v1/operations/{id}", tag = "operations", params(("id" = String, Path)),
    responses((status = 200, body = Operation), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Operation>> {
    let op = state
        .store
        .get_operation(&id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(convert::operation(op)))
}

fn render_line(line: &LogLine) -> String {
    format!(
        "{} {} {} {}",
        timestamp(line.at),
        line.task,
        line.stream,
        line.text
    )
}

/// The log: plain text lines `TIMESTAMP TASK STREAM TEXT`. With `Accept: text/event-stream`
/// it replays the log as `log` events, sends a `status` event (the operation) whenever it
/// changes, and ends with an `end` event once the operation has ended.
#[utoipa::path(get, path = "/api/v1/operations/{id}/log", tag = "operations", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorBody)))]
pub async fn log(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    state
        .store
        .get_operation(&id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let wants_events = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_events {
        let after = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let stream = follow(state, id, after);
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut text = String::new();
    let mut after = 0;
    loop {
        let lines = state.store.read_logs(&id, after, 5000).await?;
        let Some(last) = lines.last() else { break };
        after = last.seq;
        for line in &lines {
            text.push_str(&render_line(line));
            text.push('\n');
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

fn follow(
    state: AppState,
    id: String,
    mut after: i64,
) -> impl Stream<Item = Result<Event, Infallible>> {
    async_stream(move |tx| async move {
        // Status events go out when the operation or any of its tasks changes.
        let mut last_seen: Option<String> = None;
        loop {
            let Ok(lines) = state.store.read_logs(&id, after, 1000).await else {
                return;
            };
            for line in &lines {
                after = line.seq;
                let event = Event::default()
                    .event("log")
                    .id(line.seq.to_string())
                    .data(render_line(line));
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            if lines.len() == 1000 {
                continue;
            }
            let Ok(Some(op)) = state.store.get_operation(&id).await else {
                return;
            };
            let fingerprint = std::iter::once(op.status.as_str())
                .chain(op.tasks.iter().map(|t| t.status.as_str()))
                .chain(std::iter::once(op.updated_at.to_string().as_str()))
                .collect::<Vec<_>>()
                .join(",");
            let terminal = op.status.is_terminal();
            let status = op.status;
            if last_seen.as_ref() != Some(&fingerprint) {
                last_seen = Some(fingerprint);
                let body = serde_json::to_string(&convert::operation(op)).unwrap_or_default();
                if tx
                    .send(Event::default().event("status").data(body))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if terminal {
                // Lines written just before the end are already committed: read them first.
                let Ok(rest) = state.store.read_logs(&id, after, 100_000).await else {
                    return;
                };
                for line in &rest {
                    let event = Event::default()
                        .event("log")
                        .id(line.seq.to_string())
                        .data(render_line(line));
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                let _ = tx
                    .send(Event::default().event("end").data(status.as_str()))
                    .await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// A stream fed by a task through a channel (without pulling in a stream-macro crate).
fn async_stream<F, Fut>(producer: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(producer(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// A new attempt of a failed or cancelled operation, resuming at the task that did not
/// finish (or from the start with `from_start`). The earlier attempt's log stays.
#[utoipa::path(post, path = "/api/v1/operations/{id}/retry", tag = "operations", params(("id" = String, Path)),
    request_body(content = Option<RetryOperation>),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Body(body): Body<RetryOperation>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let op = state
        .store
        .retry_operation(&id, body.from_start, now_ms())
        .await?;
    announce(&state, &op).await;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}

/// Cancel: a queued operation ends at once; a running one has its command killed, its
/// rollback steps run, and ends `cancelled`.
#[utoipa::path(post, path = "/api/v1/operations/{id}/cancel", tag = "operations", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let op = state.store.request_cancel(&id, now_ms()).await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}
