use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use hefring_core::operation::OperationKind;
use hefring_core::target::Host;
use hefring_core::{new_id, validate, IdKind};
use hefring_store::TargetRecord;
use hefring_wire::{CreateTarget, ErrorBody, List, Operation, PageQuery, Target};
use serde_json::json;

use super::page;
use crate::auth::Caller;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Query};
use crate::submit::{now_ms, submit};
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

fn check_root(root: &str) -> Result<(), ApiError> {
    let ok = root.starts_with('/')
        && root.len() <= 1024
        && !root.chars().any(|c| c.is_control())
        && root.split('/').all(|s| s != ".." && s != ".");
    ok.then_some(())
        .ok_or_else(|| ApiError::invalid("root", "must be an absolute path without '..'"))
}

fn check_web_user(user: &str) -> Result<(), ApiError> {
    let b = user.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'));
    ok.then_some(()).ok_or_else(|| {
        ApiError::invalid(
            "web_user",
            "must be a user name: lower-case letters, digits, '_' and '-'",
        )
    })
}

fn check_host_key(key: &str) -> Result<(), ApiError> {
    let parts: Vec<&str> = key.split(' ').collect();
    let ok = parts.len() == 2
        && parts[0]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'@' || b == b'.')
        && parts[1]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    ok.then_some(())
        .ok_or_else(|| ApiError::invalid("host_key", "must be 'TYPE BASE64', as in known_hosts"))
}

/// Register a target. Verify it next.
#[utoipa::path(post, path = "/api/v1/targets", tag = "targets", request_body = CreateTarget,
    responses((status = 201, body = Target), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    extract::Json(body): extract::Json<CreateTarget>,
) -> ApiResult<(StatusCode, Json<Target>)> {
    validate::name("name", &body.name)?;
    if body.kind != "server" {
        return Err(ApiError::invalid(
            "kind",
            "only 'server' targets are supported by this version",
        ));
    }
    let host = Host::parse("host", &body.host)?;
    if let Some(root) = &body.root {
        check_root(root)?;
    }
    for (field, port) in [
        ("http_port", body.http_port),
        ("https_port", body.https_port),
    ] {
        if port == Some(0) {
            return Err(ApiError::invalid(field, "must be between 1 and 65535"));
        }
    }
    if let Some(user) = &body.web_user {
        check_web_user(user)?;
    }
    if let Some(key) = &body.host_key {
        check_host_key(key)?;
    }
    let mut settings = convert::target_settings(body.mariadb, body.postgresql, body.system_nginx);
    settings.own_queue = body.own_queue;
    settings.check()?;
    let now = now_ms();
    let id = new_id(IdKind::Target, now);
    // Short: PHP-FPM's sockets live below the root, and a socket path holds 107 bytes.
    let root = body.root.unwrap_or_else(|| match host {
        Host::Local => state
            .targets_root
            .join(&body.name)
            .to_string_lossy()
            .into_owned(),
        Host::Ssh { .. } => "/var/lib/hefring".into(),
    });
    let record = TargetRecord {
        id,
        name: body.name,
        kind: body.kind,
        status: "new".into(),
        host: host.render(),
        root,
        http_port: body.http_port.unwrap_or(80),
        https_port: body.https_port.unwrap_or(443),
        web_user: body.web_user.unwrap_or_else(|| "www-data".into()),
        host_key: body.host_key,
        inspection: None,
        settings,
        created_at: now,
        updated_at: now,
    };
    state.store.insert_target(&record).await?;
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
    state
        .store
        .get_target(&id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let op = submit(
        &state,
        OperationKind::TargetVerify,
        &id,
        json!({}),
        &caller.0,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}

/// Remove a target that runs no environments.
#[utoipa::path(delete, path = "/api/v1/targets/{id}", tag = "targets", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    state
        .store
        .get_target(&id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let environments = state.store.environments_on_target(&id).await?;
    if !environments.is_empty() {
        return Err(ApiError::conflict(format!(
            "the target still runs environments: {}",
            environments.join(", ")
        )));
    }
    let op = submit(
        &state,
        OperationKind::TargetDelete,
        &id,
        json!({}),
        &caller.0,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}
