use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use hefring_store::DeployKey;
use hefring_wire::DeployKey as DeployKeyBody;
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
    let record = state.app().create_project(body, new_deploy_key).await?;
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

/// A new deploy key for the project `id`.
pub fn new_deploy_key(id: &str) -> DeployKey {
    let (private, public) = hefring_backend_server::deploy_key::generate(&format!("hefring-{id}"));
    DeployKey {
        public_key: public,
        private_key: hefring_store::Secret::new(private),
    }
}

/// The public half of the project's deploy key: give it to the repository's host, and the
/// project's fetches (verify, builds) use this key alone. Made now for a project from before
/// deploy keys.
#[utoipa::path(get, path = "/api/v1/projects/{id}/deploy-key", tag = "projects", params(("id" = String, Path)),
    responses((status = 200, body = DeployKeyBody), (status = 404, body = ErrorBody)))]
pub async fn deploy_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeployKeyBody>> {
    let mut project = state
        .store
        .get_project(&id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let key = match &project.deploy_key {
        Some(key) => key.public_key.clone(),
        None => {
            let key = new_deploy_key(&project.id);
            let public = key.public_key.clone();
            project.deploy_key = Some(key);
            state.store.update_project(&project).await?;
            public
        }
    };
    Ok(Json(DeployKeyBody { public_key: key }))
}
