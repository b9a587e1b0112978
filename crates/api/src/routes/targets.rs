use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use hefring_wire::{CreateTarget, ErrorBody, List, Operation, PageQuery, Target};

use super::page;
use crate::auth::Caller;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Query};
use crate::submit::accepted;
use crate::AppState;

/// List targets, newest first.
#[utoipa::path(get, path = "/api/v1/targets", tag = "targets", params(PageQuery),
    responses((status = 200, body = List<Target>), (status = 401, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<PageQuery>,
) -> ApiResult<Json<List<Target>>> {
    let listed = state.store.list_targets(&page(&query)?).await?;
    Ok(Json(List {
        items: listed.items.into_iter().map(convert::target).collect(),
        next: listed.next,
    }))
}

/// Register a target. Verify it next.
#[utoipa::path(post, path = "/api/v1/targets", tag = "targets", request_body = CreateTarget,
    responses((status = 201, body = Target), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    extract::Json(body): extract::Json<CreateTarget>,
) -> ApiResult<(StatusCode, Json<Target>)> {
    let record = state.app().create_target(body).await?;
    Ok((StatusCode::CREATED, Json(convert::target(record))))
}

/// One target, with what its last verify found.
#[utoipa::path(get, path = "/api/v1/targets/{id}", tag = "targets", params(("id" = String, Path)),
    responses((status = 200, body = Target), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Target>> {
    let target = state
        .store
        .get_target(&id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(convert::target(target)))
}

/// Check that the target can be reached and has what environments need.
#[utoipa::path(post, path = "/api/v1/targets/{id}/verify", tag = "targets", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn verify(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().verify_target(&id, &caller.origin()).await,
    )
    .await
}

/// Remove a target that runs no environments.
#[utoipa::path(delete, path = "/api/v1/targets/{id}", tag = "targets", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().delete_target(&id, &caller.origin()).await,
    )
    .await
}
