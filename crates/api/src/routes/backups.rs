//! Backups and what is made of them: back up, restore (into the same or another environment
//! of the project), clone, sync; list, show, download and delete backups.

use axum::body::Body as HttpBody;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hefring_store::{BackupFilter, BackupRecord};
use hefring_wire::{
    Backup, CloneEnvironment, CreateBackup, ErrorBody, List, MigrateEnvironment, Operation,
    PageQuery, RestoreBackup, SyncEnvironment,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::page;
use crate::auth::Caller;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Body, Query};
use crate::submit::accepted;
use crate::AppState;

async fn load_backup(state: &AppState, id: &str) -> ApiResult<BackupRecord> {
    Ok(state.app().backup_record(id).await?)
}

/// Back up the environment: a consistent database dump checked against its catalog and the
/// persistent files, in one `tar.zst` with a manifest of SHA-256, into the backup store. The
/// operation's result names the backup.
#[utoipa::path(post, path = "/api/v1/environments/{id}/backup", tag = "backups", params(("id" = String, Path)),
    request_body = CreateBackup,
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn backup(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Body(body): Body<CreateBackup>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().backup(&id, body, &caller.origin()).await,
    )
    .await
}

/// Restore a backup into the environment: a safety backup of what is there first, then the
/// database and the files, then the environment's deploy commands. The backup may be another
/// environment's of the same project (production into staging).
#[utoipa::path(post, path = "/api/v1/environments/{id}/restore", tag = "backups", params(("id" = String, Path)),
    request_body = RestoreBackup,
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn restore(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    extract::Json(body): extract::Json<RestoreBackup>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().restore(&id, body, &caller.origin()).await,
    )
    .await
}

/// Clone the environment: a new environment (on the same target or another) running the same
/// release, with a fresh backup of this one restored into it. The operation's subject is the
/// new environment, and its result names it.
#[utoipa::path(post, path = "/api/v1/environments/{id}/clone", tag = "backups", params(("id" = String, Path)),
    request_body = CloneEnvironment,
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn clone(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    extract::Json(body): extract::Json<CloneEnvironment>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state
            .app()
            .clone_environment(&id, body, &caller.origin())
            .await,
    )
    .await
}

/// Copy another environment's database and/or files into this one (a safety backup of what is
/// here first), then run this environment's deploy commands.
#[utoipa::path(post, path = "/api/v1/environments/{id}/sync", tag = "backups", params(("id" = String, Path)),
    request_body = SyncEnvironment,
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn sync(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    extract::Json(body): extract::Json<SyncEnvironment>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(&state, state.app().sync(&id, body, &caller.origin()).await).await
}

/// Move the environment to another server target: a backup where it runs, a copy deployed on
/// the new target with the backup restored and its health checked, then the switch and the
/// removal of the old copy. Any failure before the switch removes the new copy, and the
/// environment goes on serving where it was.
#[utoipa::path(post, path = "/api/v1/environments/{id}/migrate", tag = "backups", params(("id" = String, Path)),
    request_body = MigrateEnvironment,
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn migrate(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    extract::Json(body): extract::Json<MigrateEnvironment>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().migrate(&id, body, &caller.origin()).await,
    )
    .await
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BackupQuery {
    /// Only this environment's backups.
    pub environment: Option<String>,
    /// Only backups of this kind (`manual`, `scheduled`, `safety`, `copy`).
    pub kind: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// List backups, newest first.
#[utoipa::path(get, path = "/api/v1/backups", tag = "backups", params(BackupQuery),
    responses((status = 200, body = List<Backup>), (status = 422, body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Query(query): Query<BackupQuery>,
) -> ApiResult<Json<List<Backup>>> {
    let page = page(&PageQuery {
        limit: query.limit,
        cursor: query.cursor.clone(),
    })?;
    if let Some(kind) = &query.kind {
        if !["manual", "scheduled", "safety", "copy"].contains(&kind.as_str()) {
            return Err(ApiError::invalid(
                "kind",
                "must be one of manual, scheduled, safety, copy",
            ));
        }
    }
    let filter = BackupFilter {
        environment: query.environment.clone(),
        kind: query.kind.clone(),
        ..Default::default()
    };
    let listed = state.store.list_backups(&filter, &page).await?;
    Ok(Json(List {
        items: listed.items.into_iter().map(convert::backup).collect(),
        next: listed.next,
    }))
}

/// One backup, with its manifest.
#[utoipa::path(get, path = "/api/v1/backups/{id}", tag = "backups", params(("id" = String, Path)),
    responses((status = 200, body = Backup), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Backup>> {
    Ok(Json(convert::backup(load_backup(&state, &id).await?)))
}

/// The backup's archive (`application/zstd`, a tar inside).
#[utoipa::path(get, path = "/api/v1/backups/{id}/download", tag = "backups", params(("id" = String, Path)),
    responses((status = 200, content_type = "application/zstd", body = Vec<u8>), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn download(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let backup = load_backup(&state, &id).await?;
    if backup.status != "ready" {
        return Err(ApiError::conflict(format!(
            "backup {} is {}; only a ready backup can be downloaded",
            backup.id, backup.status
        )));
    }
    let (size, stream) = state
        .backups
        .open(&backup.object_key)
        .await
        .map_err(|e| ApiError::Internal(format!("the backup store: {e}")))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/zstd".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}.tar.zst\"", backup.id),
            ),
        ],
        HttpBody::from_stream(stream),
    )
        .into_response())
}

/// Delete a backup: its archive leaves the store (an operation).
#[utoipa::path(delete, path = "/api/v1/backups/{id}", tag = "backups", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    accepted(
        &state,
        state.app().delete_backup(&id, &caller.origin()).await,
    )
    .await
}
