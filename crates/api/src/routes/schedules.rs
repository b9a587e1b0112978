//! Schedules: an environment's cron schedule override and scheduled backups with their
//! retention; and the scheduler's clock, when tests drive it.

use axum::extract::{Path, State};
use axum::Json;
use hefring_core::environment::parse_iso_ms;
use hefring_core::operation::OperationKind;
use hefring_core::schedule::EnvironmentSchedules;
use hefring_store::{EnvironmentRecord, OperationFilter, Page};
use hefring_wire::{self as wire, ErrorBody, ScheduleStatus, SchedulerPass, SchedulerTick};

use super::environments::load;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::extract;
use crate::scheduler;
use crate::AppState;

async fn status(state: &AppState, env: &EnvironmentRecord) -> ApiResult<ScheduleStatus> {
    let settings: EnvironmentSchedules =
        serde_json::from_value(env.settings.clone()).unwrap_or_default();
    let cron = scheduler::cron_schedule(env);
    // The newest cron operation of the environment.
    let mut last = None;
    let mut cursor = None;
    'pages: loop {
        let listed = state
            .store
            .list_operations(
                &OperationFilter {
                    subject: Some(env.id.clone()),
                    ..Default::default()
                },
                &Page { limit: 200, cursor },
            )
            .await?;
        for op in listed.items {
            if op.kind == OperationKind::EnvironmentCron {
                last = Some(op);
                break 'pages;
            }
        }
        match listed.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let (skipped, last_skipped) = scheduler::skipped(state, &env.id).await?;
    Ok(ScheduleStatus {
        cron: cron.as_ref().map(|(s, _)| s.to_string()),
        cron_source: cron.map(|(_, source)| source.to_string()),
        cron_command: env.resources["cron"]["command"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                env.resources["cron"]["command"].as_array().map(|argv| {
                    argv.iter()
                        .filter_map(|a| a.as_str())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
            }),
        backups: settings.backups.map(|b| wire::BackupSchedule {
            schedule: b.schedule.to_string(),
            keep_daily: b.keep_daily,
            keep_weekly: b.keep_weekly,
        }),
        last_cron_run: last.map(convert::operation),
        skipped_cron_runs: skipped,
        last_skipped_at: last_skipped.map(convert::timestamp),
    })
}

/// The environment's schedules and its cron command's last run.
#[utoipa::path(get, path = "/api/v1/environments/{id}/schedules", tag = "schedules", params(("id" = String, Path)),
    responses((status = 200, body = ScheduleStatus), (status = 404, body = ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<ScheduleStatus>> {
    let env = load(&state, &id).await?;
    Ok(Json(status(&state, &env).await?))
}

/// Set the environment's schedules: `cron` overrides the manifest's cron schedule (`null`: the
/// manifest's), `backups` schedules backups with their retention (`null`: none). Nothing on
/// the target changes; the scheduler reads them.
#[utoipa::path(put, path = "/api/v1/environments/{id}/schedules", tag = "schedules", params(("id" = String, Path)),
    request_body = wire::Schedules,
    responses((status = 200, body = ScheduleStatus), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn set(
    State(state): State<AppState>,
    Path(id): Path<String>,
    extract::Json(body): extract::Json<wire::Schedules>,
) -> ApiResult<Json<ScheduleStatus>> {
    let env = state.app().set_schedules(&id, body).await?;
    Ok(Json(status(&state, &env).await?))
}

/// Run one pass of the scheduler at the given time. Only when `serve` runs with
/// `--scheduler-clock manual` (for tests): otherwise 404.
#[utoipa::path(post, path = "/api/v1/scheduler/tick", tag = "schedules",
    request_body = SchedulerTick,
    responses((status = 200, body = SchedulerPass), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn tick(
    State(state): State<AppState>,
    extract::Json(body): extract::Json<SchedulerTick>,
) -> ApiResult<Json<SchedulerPass>> {
    if !state.manual_clock {
        return Err(ApiError::NotFound);
    }
    let now = parse_iso_ms(&body.now)
        .ok_or_else(|| ApiError::invalid("now", "must be an ISO 8601 time"))?;
    let pass = scheduler::pass(&state, now).await?;
    Ok(Json(SchedulerPass {
        started: pass.started.into_iter().map(convert::operation).collect(),
        skipped: pass.skipped,
    }))
}
