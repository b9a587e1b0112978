use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use hefring_wire::{CreateProject, ErrorBody, List, Operation, PageQuery, Project};

use super::page;
use crate::auth::Caller;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Query};
use crate::submit::accepted;
use crate::AppState;

/// List projects, newest first.
#[utoipa::path(get, path = "/api/v1/projects", tag = "projects", params(PageQuery),
    responses((status = 200, body = List<Project>), (status = 401, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<PageQuery>,
) -> ApiResult<Json<List<Project>>> {
    let listed = state.store.list_projects(&page(&query)?).await?;
    Ok(Json(List {
        items: listed.items.into_iter().map(convert::project).collect(),
        next: listed.next,
    }))
}

/// Add a project from a git URL or an absolute local path.
#[utoipa::path(post, path = "/api/v1/projects", tag = "projects", request_body = CreateProject,
    responses((status = 201, body = Project), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    extract::Json(body): extract::Json<CreateProject>,
) -> ApiResult<(StatusCode, Json<Project>)> {
    let record = state.app().create_project(body).await?;
    Ok((StatusCode::CREATED, Json(convert::project(record))))
}

/// One project, with the manifest its last verify read.
#[utoipa::path(get, path = "/api/v1/projects/{id}", tag = "projects", params(("id" = String, Path)),
    responses((status = 200, body = Project), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Project>> {
    let project = state
        .store
        .get_project(&id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(convert::project(project)))
}

/// Check that the repository is reachable and its `.hefring.yml` valid.
#[utoipa::path(post, path = "/api/v1/projects/{id}/verify", tag = "projects", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn verify(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().verify_project(&id, &caller.origin()).await,
    )
    .await
}
