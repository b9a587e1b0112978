//! The scheduler: each environment's cron command and its scheduled backups (with the pruning
//! of old ones), queued as operations when due. It only reads the store and queues work, like
//! a request does.
//!
//! A pass takes `now` from its caller: `serve` calls it every second with the system clock, or
//! (with `--scheduler-clock manual`) `POST /api/v1/scheduler/tick` does, so tests prove
//! schedules and retention without waiting for real days.
//!
//! What it remembers lives in the store's settings: per environment and job, the time of the
//! pass that last ran it, or first saw it (a job is due when a slot of its schedule lies
//! after that, up to now).
//! A scheduler that was down runs a due job once, not once per missed slot. The first pass
//! that sees a job only starts counting. Of passes that overlap, one fires a due job: the one
//! whose compare-and-set of that time wins.

use hefring_core::operation::{OperationKind, OperationStatus};
use hefring_core::schedule::{EnvironmentSchedules, Schedule};
use hefring_store::{
    EnvironmentFilter, EnvironmentRecord, OperationFilter, OperationRecord, Page, StoreError,
};
use serde_json::json;

use crate::submit::submit;
use crate::AppState;

/// What a pass did.
#[derive(Debug, Default)]
pub struct Pass {
    pub started: Vec<OperationRecord>,
    pub skipped: Vec<String>,
}

/// The schedule of the environment's cron command and whether it is an override.
pub fn cron_schedule(env: &EnvironmentRecord) -> Option<(Schedule, &'static str)> {
    let settings: EnvironmentSchedules =
        serde_json::from_value(env.settings.clone()).unwrap_or_default();
    // No cron command in the served release: nothing to run, whatever the override says.
    let manifest = env.resources["cron"]["schedule"].as_str()?;
    match settings.cron {
        Some(own) => Some((own, "environment")),
        None => Schedule::parse(manifest).ok().map(|s| (s, "manifest")),
    }
}

fn key(job: &str, env: &str) -> String {
    format!("scheduler.{job}.{env}")
}

/// Whether the job is due at `now`, remembering that this pass looked. Answers the slot.
///
/// Passes may overlap (two `serve` processes on one PostgreSQL, or ticks at once): the time a
/// pass read is replaced only if no other pass replaced it meanwhile, and only the pass whose
/// write wins fires the job (the others would queue a duplicate, or count the winner's run as
/// a skipped one).
async fn due(
    state: &AppState,
    job: &str,
    env: &str,
    schedule: &Schedule,
    now: i64,
) -> Result<Option<i64>, StoreError> {
    let key = key(job, env);
    let seen = state.store.get_setting(&key).await?;
    let Some(last) = seen.as_deref().and_then(|v| v.parse::<i64>().ok()) else {
        state
            .store
            .replace_setting(&key, seen.as_deref(), &now.to_string())
            .await?;
        return Ok(None);
    };
    // Remembered only when the job fires: a pass that finds nothing due writes nothing (it
    // runs every second, for every environment).
    let Some(slot) = schedule.next_after(last).filter(|slot| *slot <= now) else {
        return Ok(None);
    };
    let won = state
        .store
        .replace_setting(&key, seen.as_deref(), &now.to_string())
        .await?;
    Ok(won.then_some(slot))
}

async fn cron_running(state: &AppState, env: &str) -> Result<Option<String>, StoreError> {
    for status in [OperationStatus::Queued, OperationStatus::Running] {
        let listed = state
            .store
            .list_operations(
                &OperationFilter {
                    subject: Some(env.to_string()),
                    status: Some(status),
                    parent: None,
                },
                &Page {
                    limit: 100,
                    cursor: None,
                },
            )
            .await?;
        if let Some(op) = listed
            .items
            .into_iter()
            .find(|op| op.kind == OperationKind::EnvironmentCron)
        {
            return Ok(Some(op.id));
        }
    }
    Ok(None)
}

/// Records a cron run skipped because the last one still ran.
async fn record_skip(state: &AppState, env: &str, now: i64) -> Result<(), StoreError> {
    let key = key("cron_skipped", env);
    let mut record: serde_json::Value = state
        .store
        .get_setting(&key)
        .await?
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_else(|| json!({"count": 0}));
    record["count"] = json!(record["count"].as_u64().unwrap_or(0) + 1);
    record["last_at"] = json!(now);
    state.store.set_setting(&key, &record.to_string()).await
}

/// The runs skipped so far and when the last one was.
pub async fn skipped(state: &AppState, env: &str) -> Result<(u64, Option<i64>), StoreError> {
    let record: serde_json::Value = state
        .store
        .get_setting(&key("cron_skipped", env))
        .await?
        .and_then(|v| serde_json::from_str(&v).ok())
        .unwrap_or_default();
    Ok((
        record["count"].as_u64().unwrap_or(0),
        record["last_at"].as_i64(),
    ))
}

async fn pass_environment(
    state: &AppState,
    env: &EnvironmentRecord,
    now: i64,
    pass: &mut Pass,
) -> crate::error::ApiResult<()> {
    if env.release_id.is_none() || !matches!(env.status.as_str(), "active" | "disabled") {
        return Ok(());
    }
    if let Some((schedule, _)) = cron_schedule(env) {
        if let Some(slot) = due(state, "cron", &env.id, &schedule, now).await? {
            match cron_running(state, &env.id).await? {
                Some(running) => {
                    record_skip(state, &env.id, now).await?;
                    tracing::info!(environment = %env.id, %running, "cron run skipped: the last one still runs");
                    pass.skipped
                        .push(format!("{}: cron (operation {running} still runs)", env.id));
                }
                None => {
                    let op = submit(
                        state,
                        OperationKind::EnvironmentCron,
                        &env.id,
                        json!({ "scheduled_for": crate::convert::timestamp(slot) }),
                        "scheduler",
                    )
                    .await?;
                    pass.started.push(op);
                }
            }
        }
    }
    let settings: EnvironmentSchedules =
        serde_json::from_value(env.settings.clone()).unwrap_or_default();
    if let Some(backups) = settings.backups {
        if let Some(slot) = due(state, "backups", &env.id, &backups.schedule, now).await? {
            let backup = submit(
                state,
                OperationKind::EnvironmentBackup,
                &env.id,
                json!({ "kind": "scheduled", "description": "scheduled", "scheduled_for": slot }),
                "scheduler",
            )
            .await?;
            pass.started.push(backup);
            // Queued after the backup on the same subject, so it runs once the backup ended.
            let prune = submit(
                state,
                OperationKind::EnvironmentPruneBackups,
                &env.id,
                json!({ "retention": backups.retention(), "now": now }),
                "scheduler",
            )
            .await?;
            pass.started.push(prune);
        }
    }
    Ok(())
}

/// One pass over every environment at `now`.
pub async fn pass(state: &AppState, now: i64) -> crate::error::ApiResult<Pass> {
    let mut pass = Pass::default();
    let mut cursor = None;
    loop {
        let listed = state
            .store
            .list_environments(&EnvironmentFilter::default(), &Page { limit: 500, cursor })
            .await?;
        for env in &listed.items {
            if let Err(e) = pass_environment(state, env, now, &mut pass).await {
                // One environment's trouble must not stop the others' schedules.
                tracing::warn!(environment = %env.id, error = ?e, "scheduling failed");
            }
        }
        match listed.next {
            Some(next) => cursor = Some(next),
            None => return Ok(pass),
        }
    }
}
