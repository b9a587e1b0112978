//! `release_fleet_update`: every environment running a release (and, asked for, those on older
//! releases of its project) updated to a newer one, each by a child `environment_update`
//! operation (its `parent` set). First one environment alone, the canary, whose failure stops
//! everything; then the rest, at most `parallelism` at a time, stopping once failures exceed
//! `max_failures`. Environments whose update never started are reported `cancelled`.
//!
//! The children live in the store, so a resumed attempt finds the ones it started (by parent)
//! and waits for them instead of starting them twice. The parent holds a worker slot while it
//! waits: fleet updates need at least two (`--workers`, default 4).

use std::collections::BTreeMap;
use std::time::Duration;

use hefring_core::operation::{OperationKind, OperationStatus};
use hefring_queue::Job;
use hefring_store::{
    queue_for, EnvironmentFilter, NewOperation, OperationFilter, OperationRecord, Page, StoreError,
};
use serde_json::json;

use crate::run::{TaskContext, TaskError, TaskOutput, TaskResult};
use crate::time::now_ms;

/// How often the parent looks at its children.
const POLL: Duration = Duration::from_millis(200);

struct Plan {
    to: String,
    parallelism: usize,
    max_failures: usize,
}

fn plan(t: &TaskContext<'_>) -> Result<Plan, TaskError> {
    let inputs = &t.op.inputs;
    Ok(Plan {
        to: inputs["to"]
            .as_str()
            .ok_or_else(|| TaskError::new("the operation names no release to update to"))?
            .to_string(),
        parallelism: inputs["parallelism"].as_u64().unwrap_or(1).max(1) as usize,
        max_failures: inputs["max_failures"].as_u64().unwrap_or(0) as usize,
    })
}

/// The environments to update, in a stable order: those running the release, then (with
/// `include_older`) those of the project on a release older than the new one.
async fn fleet(t: &TaskContext<'_>, to: &str) -> Result<Vec<String>, TaskError> {
    let store = &t.ctx.store;
    let from = &t.op.subject_id;
    let mut envs = store.environments_running(from).await?;
    if t.op.inputs["include_older"].as_bool().unwrap_or(false) {
        let target = store
            .get_release(to)
            .await?
            .ok_or_else(|| TaskError(format!("release {to} no longer exists")))?;
        let mut cursor = None;
        loop {
            let listed = store
                .list_environments(
                    &EnvironmentFilter {
                        project: Some(target.project_id.clone()),
                        ..Default::default()
                    },
                    &Page { limit: 500, cursor },
                )
                .await?;
            for env in listed.items {
                let Some(running) = &env.release_id else {
                    continue;
                };
                if running == to || envs.contains(&env.id) {
                    continue;
                }
                if let Some(release) = store.get_release(running).await? {
                    if release.created_at < target.created_at {
                        envs.push(env.id);
                    }
                }
            }
            match listed.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
    }
    envs.sort();
    Ok(envs)
}

/// The children started so far, by environment.
async fn children(t: &TaskContext<'_>) -> Result<BTreeMap<String, OperationRecord>, TaskError> {
    let mut found = BTreeMap::new();
    let mut cursor = None;
    loop {
        let listed = t
            .ctx
            .store
            .list_operations(
                &OperationFilter {
                    parent: Some(t.op.id.clone()),
                    ..Default::default()
                },
                &Page { limit: 500, cursor },
            )
            .await?;
        for op in listed.items {
            // Newest first: a retried parent's latest child of an environment wins.
            found.entry(op.subject_id.clone()).or_insert(op);
        }
        match listed.next {
            Some(next) => cursor = Some(next),
            None => return Ok(found),
        }
    }
}

/// Starts the update of one environment as a child operation and announces it. An update that
/// cannot be queued (another deploy or update of it is active) counts as failed.
async fn start_child(
    t: &TaskContext<'_>,
    env: &str,
    to: &str,
) -> Result<Option<String>, TaskError> {
    let now = now_ms();
    let mut new = NewOperation::planned(
        OperationKind::EnvironmentUpdate,
        env,
        json!({ "release": to }),
        &t.op.requested_by,
        now,
    );
    new.parent_id = Some(t.op.id.clone());
    new.queue = queue_for(t.ctx.store.as_ref(), new.kind, env).await?;
    match t.ctx.store.create_operation(&new, now).await {
        Ok(record) => {
            let job = Job::announce(
                &record.id,
                record.kind.as_str(),
                &record.queue,
                &record.inputs,
                record.subject_type.as_str(),
                &record.subject_id,
            );
            if let Err(e) = t.ctx.queue.publish(&job).await {
                // Workers also look at the store when idle: the child is only delayed.
                t.log
                    .info(format!("could not announce the update of {env}: {e}"));
            }
            t.log.info(format!("{env}: update {} started", record.id));
            Ok(Some(record.id))
        }
        Err(StoreError::Duplicate { existing }) => {
            t.log.info(format!(
                "{env}: not updated, operation {existing} already updates it"
            ));
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// What became of each environment of the fleet.
#[derive(Default)]
struct Progress {
    status: BTreeMap<String, String>,
    operations: BTreeMap<String, String>,
    failures: usize,
}

impl Progress {
    fn record(&mut self, t: &TaskContext<'_>, env: &str, op: &OperationRecord) {
        if self.status.get(env).map(String::as_str) == Some(op.status.as_str()) {
            return;
        }
        self.status
            .insert(env.to_string(), op.status.as_str().into());
        self.operations.insert(env.to_string(), op.id.clone());
        if op.status.is_terminal() {
            if op.status != OperationStatus::Succeeded {
                self.failures += 1;
            }
            let error = op.error.as_deref().unwrap_or_default();
            t.log.info(
                format!("{env}: {} {}", op.status, error)
                    .trim_end()
                    .to_string(),
            );
        }
    }

    fn result(&self, fleet: &[String]) -> serde_json::Value {
        let mut environments = serde_json::Map::new();
        for env in fleet {
            let status = self.status.get(env).map_or("cancelled", String::as_str);
            environments.insert(
                env.clone(),
                json!({ "status": status, "operation": self.operations.get(env) }),
            );
        }
        json!({ "environments": environments })
    }
}

/// Runs the updates of `wanted` (skipping those already succeeded), at most `parallelism` at a
/// time, until all are done or failures exceed `max_failures`. Answers whether it stopped.
async fn drive(
    t: &TaskContext<'_>,
    wanted: &[String],
    plan: &Plan,
    progress: &mut Progress,
) -> Result<bool, TaskError> {
    let mut started = children(t).await?;
    let mut queue: Vec<&String> = wanted.iter().collect();
    queue.reverse();
    let mut running: Vec<(String, String)> = Vec::new();
    // Children an earlier attempt started: finished ones count, active ones are waited for.
    queue.retain(|env| match started.remove(*env) {
        Some(op) if op.status.is_terminal() => {
            progress.record(t, env, &op);
            false
        }
        Some(op) => {
            running.push(((*env).clone(), op.id.clone()));
            false
        }
        None => true,
    });
    let mut stopped = false;
    loop {
        stopped |= progress.failures > plan.max_failures;
        while !stopped && running.len() < plan.parallelism {
            let Some(env) = queue.pop() else { break };
            match start_child(t, env, &plan.to).await? {
                Some(id) => running.push((env.clone(), id)),
                None => {
                    progress.status.insert(env.clone(), "failed".into());
                    progress.failures += 1;
                    stopped |= progress.failures > plan.max_failures;
                }
            }
        }
        if running.is_empty() {
            return Ok(stopped);
        }
        tokio::time::sleep(POLL).await;
        let mut still = Vec::new();
        for (env, id) in running {
            match t.ctx.store.get_operation(&id).await? {
                Some(op) if op.status.is_terminal() => progress.record(t, &env, &op),
                Some(op) => {
                    progress.record(t, &env, &op);
                    still.push((env, id));
                }
                None => return Err(TaskError(format!("operation {id} vanished"))),
            }
        }
        running = still;
    }
}

pub async fn update_canary(t: &TaskContext<'_>) -> TaskResult {
    let plan = plan(t)?;
    let fleet = fleet(t, &plan.to).await?;
    let Some(canary) = fleet.first().cloned() else {
        t.log.info("no environment runs the release");
        return Ok(TaskOutput::with_state(json!({
            "fleet": [],
            "result": { "environments": {} },
        })));
    };
    t.log.info(format!(
        "{} environment(s) to update to {}; {canary} first, alone",
        fleet.len(),
        plan.to
    ));
    let mut progress = Progress::default();
    let alone = Plan {
        parallelism: 1,
        max_failures: 0,
        ..plan
    };
    let stopped = drive(t, std::slice::from_ref(&canary), &alone, &mut progress).await?;
    let mut state = json!({
        "fleet": fleet,
        "result": progress.result(&fleet),
    });
    if stopped {
        // Recorded, not failed here: a failed task keeps no state, and the per-environment
        // results must stay on the operation. `report_results` fails it.
        state["stop"] = json!(format!(
            "the canary {canary} failed to update: nothing else was updated"
        ));
    }
    Ok(TaskOutput::with_state(state))
}

pub async fn update_rest(t: &TaskContext<'_>) -> TaskResult {
    if t.state["stop"].is_string() {
        return Ok(TaskOutput {
            skipped: true,
            ..Default::default()
        });
    }
    let plan = plan(t)?;
    let fleet: Vec<String> = serde_json::from_value(t.state["fleet"].clone()).map_err(|_| {
        TaskError::new("the operation has no fleet recorded (update_canary did not run)")
    })?;
    let mut progress = Progress::default();
    let stopped = drive(t, &fleet, &plan, &mut progress).await?;
    let mut state = json!({ "result": progress.result(&fleet) });
    if stopped {
        state["stop"] = json!(format!(
            "{} update(s) failed, more than max_failures {}: the rest were not started",
            progress.failures, plan.max_failures
        ));
    } else if progress.failures > 0 {
        state["stop"] = json!(format!(
            "{} update(s) failed (within max_failures {})",
            progress.failures, plan.max_failures
        ));
    } else {
        t.log
            .info(format!("{} environment(s) updated", fleet.len()));
    }
    Ok(TaskOutput::with_state(state))
}

/// The fleet update succeeds only when every environment's update did.
pub async fn report_results(t: &TaskContext<'_>) -> TaskResult {
    match t.state["stop"].as_str() {
        Some(stop) => Err(TaskError(stop.to_string())),
        None => Ok(TaskOutput::done()),
    }
}

/// The rollback of a failed or cancelled fleet update: children still queued or running are
/// cancelled (a running update rolls itself back).
pub async fn cancel_children(t: &TaskContext<'_>) -> TaskResult {
    for (env, op) in children(t).await? {
        if op.status.is_active() {
            t.ctx.store.request_cancel(&op.id, now_ms()).await?;
            t.log.info(format!("{env}: cancelled {}", op.id));
        }
    }
    Ok(TaskOutput::done())
}
