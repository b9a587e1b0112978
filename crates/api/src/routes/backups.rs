//! Backups and what is made of them: back up, restore (into the same or another environment
//! of the project), clone, sync; list, show, download and delete backups.

use axum::body::Body as HttpBody;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hefring_core::operation::{OperationKind, OperationStatus};
use hefring_core::IdKind;
use hefring_store::{BackupFilter, BackupRecord, EnvironmentRecord, OperationFilter, Page};
use hefring_wire::{
    Backup, CloneEnvironment, CreateBackup, ErrorBody, List, MigrateEnvironment, Operation,
    PageQuery, RestoreBackup, SyncEnvironment,
};
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

use super::environments::{load, new_environment, refuse_concurrent_change, NewEnvironment};
use super::page;
use crate::auth::Caller;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract::{self, Body, Query};
use crate::submit::submit;
use crate::AppState;

async fn load_backup(state: &AppState, id: &str) -> ApiResult<BackupRecord> {
    if !IdKind::Backup.matches(id) {
        return Err(ApiError::NotFound);
    }
    match state.store.get_backup(id).await? {
        Some(b) if b.status != "deleted" => Ok(b),
        _ => Err(ApiError::NotFound),
    }
}

/// Backups, restores, clones and syncs need a deployed environment.
fn require_deployed(env: &EnvironmentRecord, what: &str) -> ApiResult<()> {
    if env.release_id.is_none() || !matches!(env.status.as_str(), "active" | "disabled") {
        return Err(ApiError::conflict(format!(
            "the environment is {}; only a deployed environment can {what}",
            env.status
        )));
    }
    Ok(())
}

/// The environment named as the source of a sync: of the same project, deployed, not this one.
async fn source_environment(
    state: &AppState,
    env: &EnvironmentRecord,
    id: &str,
) -> ApiResult<EnvironmentRecord> {
    let source = match IdKind::Environment.matches(id) {
        true => state.store.get_environment(id).await?,
        false => None,
    }
    .filter(|s| s.status != "deleted")
    .ok_or_else(|| ApiError::invalid("from", "no environment has this id"))?;
    if source.id == env.id {
        return Err(ApiError::invalid(
            "from",
            "an environment cannot sync from itself",
        ));
    }
    if source.project_id != env.project_id {
        return Err(ApiError::invalid(
            "from",
            "the source belongs to another project than the environment's",
        ));
    }
    if source.release_id.is_none() || !matches!(source.status.as_str(), "active" | "disabled") {
        return Err(ApiError::invalid(
            "from",
            format!("the source environment is {}, not deployed", source.status),
        ));
    }
    Ok(source)
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
    let env = load(&state, &id).await?;
    let description = body.description.unwrap_or_default();
    if description.chars().count() > 200 || description.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "description",
            "at most 200 characters, without control characters",
        ));
    }
    require_deployed(&env, "be backed up")?;
    let op = submit(
        &state,
        OperationKind::EnvironmentBackup,
        &env.id,
        json!({ "description": description }),
        &caller.0,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
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
    let env = load(&state, &id).await?;
    let backup = load_backup(&state, &body.backup)
        .await
        .map_err(|e| match e {
            ApiError::NotFound => ApiError::invalid("backup", "no backup has this id"),
            other => other,
        })?;
    if backup.status != "ready" {
        return Err(ApiError::invalid(
            "backup",
            format!("backup {} is {}, not ready", backup.id, backup.status),
        ));
    }
    let owner = state.store.get_environment(&backup.environment_id).await?;
    if owner.as_ref().map(|o| o.project_id.as_str()) != Some(env.project_id.as_str()) {
        return Err(ApiError::invalid(
            "backup",
            "the backup is of an environment of another project",
        ));
    }
    if let (Some(held), Some(used)) = (
        backup
            .manifest
            .as_ref()
            .and_then(|m| m["database"]["kind"].as_str()),
        env.resources["database"].as_str(),
    ) {
        if held != used {
            return Err(ApiError::invalid(
                "backup",
                format!("the backup holds a {held} database, the environment uses {used}"),
            ));
        }
    }
    require_deployed(&env, "be restored into")?;
    refuse_concurrent_change(&state, &env).await?;
    let op = submit(
        &state,
        OperationKind::EnvironmentRestore,
        &env.id,
        json!({ "backup": backup.id }),
        &caller.0,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
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
    let source = load(&state, &id).await?;
    require_deployed(&source, "be cloned")?;
    // Its backup must not be taken while a deploy, update, restore or migration changes it.
    refuse_concurrent_change(&state, &source).await?;
    let release = source.release_id.clone().expect("a deployed environment");
    let (record, _) = new_environment(
        &state,
        NewEnvironment {
            name: body.name,
            project: source.project_id.clone(),
            target: body.target.unwrap_or_else(|| source.target_id.clone()),
            domain: body.domain,
            aliases: body.aliases,
            https: Some(
                body.https
                    .unwrap_or_else(|| source.https.as_str().to_string()),
            ),
        },
    )
    .await?;
    state.store.insert_environment(&record).await?;
    match submit(
        &state,
        OperationKind::EnvironmentClone,
        &record.id,
        json!({ "from": source.id, "release": release }),
        &caller.0,
    )
    .await
    {
        Ok(op) => Ok((StatusCode::ACCEPTED, Json(convert::operation(op)))),
        Err(e) => {
            // Nothing stays when an error is answered: the new environment goes too.
            let mut gone = record;
            gone.status = "deleted".into();
            let _ = state.store.update_environment(&gone).await;
            Err(e)
        }
    }
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
    let env = load(&state, &id).await?;
    let source = source_environment(&state, &env, &body.from).await?;
    if !body.database && !body.files {
        return Err(ApiError::invalid(
            "database",
            "a sync copies the database, the files or both: at least one must be true",
        ));
    }
    if body.database && source.resources["database"] != env.resources["database"] {
        return Err(ApiError::invalid(
            "from",
            "the source uses another kind of database than the environment",
        ));
    }
    require_deployed(&env, "be synced")?;
    refuse_concurrent_change(&state, &env).await?;
    refuse_concurrent_change(&state, &source).await?;
    let op = submit(
        &state,
        OperationKind::EnvironmentSync,
        &env.id,
        json!({ "from": source.id, "database": body.database, "files": body.files }),
        &caller.0,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
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
    let env = load(&state, &id).await?;
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
    if target.id == env.target_id {
        return Err(ApiError::invalid(
            "target",
            "the environment already runs on this target",
        ));
    }
    require_deployed(&env, "be migrated")?;
    refuse_concurrent_change(&state, &env).await?;
    let op = submit(
        &state,
        OperationKind::EnvironmentMigrate,
        &env.id,
        json!({ "target": target.id, "release": env.release_id }),
        &caller.0,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
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

/// A queued or running restore of the backup, if any.
async fn restore_using(state: &AppState, backup: &str) -> ApiResult<Option<String>> {
    for status in [OperationStatus::Queued, OperationStatus::Running] {
        let mut cursor = None;
        loop {
            let listed = state
                .store
                .list_operations(
                    &OperationFilter {
                        status: Some(status),
                        ..Default::default()
                    },
                    &Page { limit: 500, cursor },
                )
                .await?;
            if let Some(op) = listed.items.iter().find(|op| {
                op.kind == OperationKind::EnvironmentRestore && op.inputs["backup"] == backup
            }) {
                return Ok(Some(op.id.clone()));
            }
            match listed.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
    }
    Ok(None)
}

/// Delete a backup: its archive leaves the store (an operation).
#[utoipa::path(delete, path = "/api/v1/backups/{id}", tag = "backups", params(("id" = String, Path)),
    responses((status = 202, body = Operation), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Operation>)> {
    let backup = load_backup(&state, &id).await?;
    if backup.status == "creating" {
        return Err(ApiError::conflict(format!(
            "backup {} is still being made (operation {})",
            backup.id, backup.operation_id
        )));
    }
    if let Some(restore) = restore_using(&state, &backup.id).await? {
        return Err(ApiError::conflict(format!(
            "backup {} is being restored (operation {restore})",
            backup.id
        )));
    }
    let op = submit(
        &state,
        OperationKind::BackupDelete,
        &backup.id,
        json!({}),
        &caller.0,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(convert::operation(op))))
}
