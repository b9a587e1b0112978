//! Environments: create, list, show, and the operations that deploy, update, verify and
//! delete them.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use hefring_core::environment::{check_host_names, host_names, is_environment_id};
use hefring_core::operation::{OperationKind, OperationStatus};
use hefring_core::render::nginx::Alias;
use hefring_core::render::Https;
use hefring_core::{new_id, validate, IdKind};
use hefring_store::{
    EnvironmentFilter, EnvironmentRecord, OperationFilter, Page, ReleaseRecord, Store,
};
use hefring_wire::{
    CreateEnvironment, DeployRelease, Environment, ErrorBody, List, LoginLink, Operation, PageQuery,
};
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

use super::page;
use crate::auth::Caller;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Query};
use crate::submit::{now_ms, submit};
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
    if !is_environment_id(id) {
        return Err(ApiError::NotFound);
    }
    state
        .store
        .get_environment(id)
        .await?
        .ok_or(ApiError::NotFound)
}

async fn to_wire(state: &AppState, env: EnvironmentRecord) -> ApiResult<Environment> {
    let target = state
        .store
        .get_target(&env.target_id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("target {} is missing", env.target_id)))?;
    Ok(convert::environment(env, &target))
}

/// Every host name the environments that are not deleted answer to, but `except`'s.
pub(super) async fn names_in_use(
    store: &dyn Store,
    except: Option<&str>,
) -> ApiResult<Vec<(String, String)>> {
    let mut used = Vec::new();
    let mut cursor = None;
    loop {
        let listed = store
            .list_environments(&EnvironmentFilter::default(), &Page { limit: 500, cursor })
            .await?;
        for env in listed.items {
            if Some(env.id.as_str()) == except {
                continue;
            }
            for name in host_names(&env.domain, &env.aliases) {
                used.push((name.to_string(), env.id.clone()));
            }
        }
        match listed.next {
            Some(next) => cursor = Some(next),
            None => return Ok(used),
        }
    }
}

/// Create an environment: a site of a project on a target. Deploy a release to it next.
#[utoipa::path(post, path = "/api/v1/environments", tag = "environments", request_body = CreateEnvironment,
    responses((status = 201, body = Environment), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    extract::Json(body): extract::Json<CreateEnvironment>,
) -> ApiResult<(StatusCode, Json<Environment>)> {
    let project = match IdKind::Project.matches(&body.project) {
        true => state.store.get_project(&body.project).await?,
        false => None,
    }
    .ok_or_else(|| ApiError::invalid("project", "no project has this id"))?;
    let (record, target) = new_environment(
        &state,
        NewEnvironment {
            name: body.name,
            project: project.id,
            target: body.target,
            domain: body.domain,
            aliases: body.aliases,
            https: body.https,
        },
    )
    .await?;
    state.store.insert_environment(&record).await?;
    Ok((
        StatusCode::CREATED,
        Json(convert::environment(record, &target)),
    ))
}

/// What a new environment is asked to be (by create or clone).
pub(super) struct NewEnvironment {
    pub name: String,
    pub project: String,
    pub target: String,
    pub domain: String,
    pub aliases: Vec<hefring_wire::Alias>,
    pub https: Option<String>,
}

/// Checks a new environment's fields (each error names its field) and makes its record, not
/// yet stored.
pub(super) async fn new_environment(
    state: &AppState,
    body: NewEnvironment,
) -> ApiResult<(EnvironmentRecord, hefring_store::TargetRecord)> {
    validate::name("name", &body.name)?;
    let aliases: Vec<Alias> = body
        .aliases
        .iter()
        .map(|a| Alias {
            domain: a.domain.clone(),
            redirect: a.redirect,
        })
        .collect();
    check_host_names(&body.domain, &aliases)?;
    let https = match body.https.as_deref() {
        None => Https::Off,
        Some(text) => Https::parse(text)
            .ok_or_else(|| ApiError::invalid("https", "must be one of off, on, required"))?,
    };
    let target = match IdKind::Target.matches(&body.target) {
        true => state.store.get_target(&body.target).await?,
        false => None,
    }
    .ok_or_else(|| ApiError::invalid("target", "no target has this id"))?;
    if target.kind != "server" {
        return Err(ApiError::invalid(
            "target",
            "environments run on server targets in this version",
        ));
    }
    let used = names_in_use(state.store.as_ref(), None).await?;
    for (i, name) in host_names(&body.domain, &aliases).into_iter().enumerate() {
        if let Some((_, owner)) = used.iter().find(|(n, _)| n == name) {
            let field = match i {
                0 => "domain".to_string(),
                i => format!("aliases[{}].domain", i - 1),
            };
            return Err(ApiError::invalid(
                &field,
                format!("{name} is already served by environment {owner}"),
            ));
        }
    }
    let now = now_ms();
    let record = EnvironmentRecord {
        id: new_id(IdKind::Environment, now),
        name: body.name,
        project_id: body.project,
        target_id: target.id.clone(),
        release_id: None,
        domain: body.domain,
        aliases,
        https,
        status: "new".into(),
        secrets: hefring_core::Secret::new(json!({})),
        resources: json!({}),
        settings: json!({}),
        created_at: now,
        updated_at: now,
    };
    Ok((record, target))
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

/// The release named in a deploy or update body: it must exist, be built, and belong to the
/// environment's project.
async fn deployable_release(
    state: &AppState,
    env: &EnvironmentRecord,
    id: &str,
) -> ApiResult<ReleaseRecord> {
    let release = match IdKind::Release.matches(id) {
        true => state.store.get_release(id).await?,
        false => None,
    }
    .ok_or_else(|| ApiError::invalid("release", "no release has this id"))?;
    if release.project_id != env.project_id {
        return Err(ApiError::invalid(
            "release",
            format!(
                "release {} belongs to another project than the environment's",
                release.id
            ),
        ));
    }
    if release.status != "ready" || release.artifact_sha256.is_none() {
        return Err(ApiError::invalid(
            "release",
            format!(
                "release {} is {}, not ready: wait for its build to succeed",
                release.id, release.status
            ),
        ));
    }
    Ok(release)
}

/// Refuses a deploy or update while another one of the environment is queued or running.
pub(super) async fn refuse_concurrent_change(
    state: &AppState,
    env: &EnvironmentRecord,
) -> ApiResult<()> {
    for status in [OperationStatus::Queued, OperationStatus::Running] {
        let active = state
            .store
            .list_operations(
                &OperationFilter {
                    subject: Some(env.id.clone()),
                    status: Some(status),
                    parent: None,
                },
                &Page {
                    limit: 100,
                    cursor: None,
                },
            )
            .await?;
        if let Some(op) = active.items.iter().find(|op| {
            matches!(
                op.kind,
                OperationKind::EnvironmentDeploy
                    | OperationKind::EnvironmentUpdate
                    | OperationKind::EnvironmentMigrate
                    | OperationKind::EnvironmentRestore
                    | OperationKind::EnvironmentSync
            )
        }) {
            return Err(ApiError::DuplicateOperation {
                existing: op.id.clone(),
            });
        }
    }
    Ok(())
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
    change_release(state, caller, id, body, OperationKind::EnvironmentDeploy).await
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
    change_release(state, caller, id, body, OperationKind::EnvironmentUpdate).await
}

/// Deploy (to a new environment) or update (a deployed one): the release must be deployable,
/// no other deploy or update may be queued or running, and the environment in the right state.
async fn change_release(
    state: AppState,
    caller: Caller,
    id: String,
    body: DeployRelease,
    kind: OperationKind,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let env = load(&state, &id).await?;
    let release = deployable_release(&state, &env, &body.release).await?;
    refuse_concurrent_change(&state, &env).await?;
    let refusal = match kind {
        OperationKind::EnvironmentDeploy if !matches!(env.status.as_str(), "new" | "failed") => {
            Some("deploy is for a new environment (use update to change its release)")
        }
        OperationKind::EnvironmentUpdate
            if env.release_id.is_none() || !matches!(env.status.as_str(), "active" | "failed") =>
        {
            Some("only a deployed environment can be updated (deploy it first)")
        }
        _ => None,
    };
    if let Some(refusal) = refusal {
        return Err(ApiError::conflict(format!(
            "the environment is {}; {refusal}",
            env.status
        )));
    }
    let op = submit(
        &state,
        kind,
        &env.id,
        json!({ "release": release.id }),
        &caller.0,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}

/// Check that the environment's servers run and that it answers its health check.
#[utoipa::path(post, path = "/api/v1/environments/{id}/verify", tag = "environments", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn verify(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let env = load(&state, &id).await?;
    if env.status == "deleted" {
        return Err(ApiError::conflict("the environment is deleted"));
    }
    let op = submit(
        &state,
        OperationKind::EnvironmentVerify,
        &env.id,
        json!({}),
        &caller.0,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
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
    let env = load(&state, &id).await?;
    let op = submit(
        &state,
        OperationKind::EnvironmentDelete,
        &env.id,
        json!({}),
        &caller.0,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
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
    let env = load(&state, &id).await?;
    if env.release_id.is_none() || !matches!(env.status.as_str(), "active" | "disabled") {
        return Err(ApiError::conflict(format!(
            "the environment is {}; only a deployed environment can be disabled or enabled",
            env.status
        )));
    }
    let op = submit(&state, kind, &env.id, json!({}), &caller.0).await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
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
    let env = load(&state, &id).await?;
    if env.release_id.is_none() || !matches!(env.status.as_str(), "active" | "disabled") {
        return Err(ApiError::conflict(format!(
            "the environment is {}; only a deployed environment has a login link",
            env.status
        )));
    }
    let op = submit(
        &state,
        OperationKind::EnvironmentLogin,
        &env.id,
        json!({}),
        &caller.0,
    )
    .await?;
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
