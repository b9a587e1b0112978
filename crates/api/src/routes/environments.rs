//! Environments: create, list, show, and the operations that deploy, update, verify and
//! delete them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use hefring_core::operation::{OperationKind, OperationStatus};
use hefring_store::{EnvironmentFilter, EnvironmentRecord};
use hefring_wire::{
    CreateEnvironment, DeployRelease, Environment, ErrorBody, List, LoginLink, Operation, PageQuery,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::page;
use crate::auth::Caller;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Query};
use crate::submit::{accepted, announce};
use crate::AppState;

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EnvironmentQuery {
    /// Only this project's environments.
    pub project: Option<String>,
    /// Only environments on this target.
    pub target: Option<String>,
    /// Only environments running this release.
    pub release: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

pub(super) async fn load(state: &AppState, id: &str) -> ApiResult<EnvironmentRecord> {
    Ok(state.app().environment(id).await?)
}

async fn to_wire(state: &AppState, env: EnvironmentRecord) -> ApiResult<Environment> {
    let target = state
        .store
        .get_target(&env.target_id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("target {} is missing", env.target_id)))?;
    Ok(convert::environment(env, &target))
}

/// Create an environment: a site of a project on a target. Deploy a release to it next.
#[utoipa::path(post, path = "/api/v1/environments", tag = "environments", request_body = CreateEnvironment,
    responses((status = 201, body = Environment), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    extract::Json(body): extract::Json<CreateEnvironment>,
) -> ApiResult<(StatusCode, Json<Environment>)> {
    let (record, target) = state.app().create_environment(body).await?;
    Ok((
        StatusCode::CREATED,
        Json(convert::environment(record, &target)),
    ))
}

/// List environments, newest first (deleted ones are left out).
#[utoipa::path(get, path = "/api/v1/environments", tag = "environments", params(EnvironmentQuery),
    responses((status = 200, body = List<Environment>), (status = 401, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<EnvironmentQuery>,
) -> ApiResult<Json<List<Environment>>> {
    let page = page(&PageQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
    })?;
    let filter = EnvironmentFilter {
        project: query.project.clone(),
        target: query.target.clone(),
        release: query.release.clone(),
        include_deleted: false,
    };
    let listed = state.store.list_environments(&filter, &page).await?;
    let mut items = Vec::with_capacity(listed.items.len());
    for env in listed.items {
        items.push(to_wire(&state, env).await?);
    }
    Ok(Json(List {
        items,
        next: listed.next,
    }))
}

/// One environment.
#[utoipa::path(get, path = "/api/v1/environments/{id}", tag = "environments", params(("id" = String, Path)),
    responses((status = 200, body = Environment), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Environment>> {
    let env = load(&state, &id).await?;
    Ok(Json(to_wire(&state, env).await?))
}

/// Deploy a release to a new environment: database, files, code, PHP pool, server block,
/// install commands, switch, health check.
#[utoipa::path(post, path = "/api/v1/environments/{id}/deploy", tag = "environments", params(("id" = String, Path)),
    request_body = DeployRelease,
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn deploy(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    extract::Json(body): extract::Json<DeployRelease>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().deploy(&id, body, &caller.origin()).await,
    )
    .await
}

/// Update a deployed environment to another release, with zero downtime: the new release is
/// checked through a preview first, and any failure switches back (restoring the database if
/// the deploy commands had run).
#[utoipa::path(post, path = "/api/v1/environments/{id}/update", tag = "environments", params(("id" = String, Path)),
    request_body = DeployRelease,
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    extract::Json(body): extract::Json<DeployRelease>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().update(&id, body, &caller.origin()).await,
    )
    .await
}

/// Check that the environment's servers run and that it answers its health check.
#[utoipa::path(post, path = "/api/v1/environments/{id}/verify", tag = "environments", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn verify(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().verify_environment(&id, &caller.origin()).await,
    )
    .await
}

/// Delete the environment and exactly what it created on its target: server block, pool,
/// database and user, files. Safe to repeat.
#[utoipa::path(delete, path = "/api/v1/environments/{id}", tag = "environments", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().delete_environment(&id, &caller.origin()).await,
    )
    .await
}

/// Disable the site: every path answers 503 with a "site disabled" page until it is enabled
/// again; nothing else changes.
#[utoipa::path(post, path = "/api/v1/environments/{id}/disable", tag = "environments", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn disable(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    toggle(state, caller, id, OperationKind::EnvironmentDisable).await
}

/// Enable a disabled site again.
#[utoipa::path(post, path = "/api/v1/environments/{id}/enable", tag = "environments", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn enable(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    toggle(state, caller, id, OperationKind::EnvironmentEnable).await
}

async fn toggle(
    state: AppState,
    caller: Caller,
    id: String,
    kind: OperationKind,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().toggle(&id, kind, &caller.origin()).await,
    )
    .await
}

/// A one-time link that logs in to the site, made by the manifest's `login` command in the
/// environment. Answered within the request, and recorded as an operation for the audit trail.
#[utoipa::path(post, path = "/api/v1/environments/{id}/login-link", tag = "environments", params(("id" = String, Path)),
    responses((status = 200, body = LoginLink), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn login_link(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<LoginLink>> {
    let op = state.app().login(&id, &caller.origin()).await?.operation;
    announce(&state, &op).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let current = state
            .store
            .get_operation(&op.id)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("operation {} vanished", op.id)))?;
        match current.status {
            OperationStatus::Succeeded => {
                let url = current.state["login_url"]
                    .as_str()
                    .ok_or_else(|| ApiError::Internal("the login link was not recorded".into()))?
                    .to_string();
                // Answered once: it logs in whoever holds it, so it is not kept.
                state.store.remove_state_key(&op.id, "login_url").await?;
                return Ok(Json(LoginLink {
                    url,
                    operation: op.id,
                }));
            }
            status if status.is_terminal() => {
                return Err(ApiError::conflict(format!(
                    "making the login link {status} (operation {}): {}",
                    op.id,
                    current.error.unwrap_or_default()
                )))
            }
            _ if std::time::Instant::now() > deadline => {
                return Err(ApiError::conflict(format!(
                    "the login link is not made yet; operation {} is {}",
                    op.id, current.status
                )))
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}
