use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use hefring_wire::{BuildRelease, ErrorBody, FleetUpdate, List, Operation, PageQuery, Release};
use serde::Deserialize;
use utoipa::IntoParams;

use super::page;
use crate::auth::Caller;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Query};
use crate::submit::accepted;
use crate::AppState;

/// Build a release of a branch, tag or commit. A commit that already has a release answers
/// that release's build operation instead of building again.
#[utoipa::path(post, path = "/api/v1/projects/{id}/releases", tag = "releases", params(("id" = String, Path)),
    request_body = BuildRelease,
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn build(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    extract::Json(body): extract::Json<BuildRelease>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().build_release(&id, body, &caller.origin()).await,
    )
    .await
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReleaseQuery {
    /// Only this project's releases.
    pub project: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// List releases, newest first.
#[utoipa::path(get, path = "/api/v1/releases", tag = "releases", params(ReleaseQuery),
    responses((status = 200, body = List<Release>), (status = 401, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<ReleaseQuery>,
) -> ApiResult<Json<List<Release>>> {
    let page = page(&PageQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
    })?;
    let listed = state
        .store
        .list_releases(query.project.as_deref(), &page)
        .await?;
    let mut items = Vec::with_capacity(listed.items.len());
    for release in listed.items {
        let environments = state.store.environments_running(&release.id).await?;
        items.push(convert::release(release, environments));
    }
    Ok(Json(List {
        items,
        next: listed.next,
    }))
}

/// One release: its exact commit, artifact checksum and size, and who runs it.
#[utoipa::path(get, path = "/api/v1/releases/{id}", tag = "releases", params(("id" = String, Path)),
    responses((status = 200, body = Release), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Release>> {
    let release = state
        .store
        .get_release(&id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let environments = state.store.environments_running(&release.id).await?;
    Ok(Json(convert::release(release, environments)))
}

/// Update every environment running this release to `to`, each by a child operation: one
/// environment first, alone (a canary: its failure stops everything), then the rest at most
/// `parallelism` at a time, stopping when failures exceed `max_failures`. The parent succeeds
/// only when every child did; its result lists each environment's outcome.
#[utoipa::path(post, path = "/api/v1/releases/{id}/fleet-update", tag = "releases", params(("id" = String, Path)),
    request_body = FleetUpdate,
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn fleet_update(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    extract::Json(body): extract::Json<FleetUpdate>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().fleet_update(&id, body, &caller.origin()).await,
    )
    .await
}
