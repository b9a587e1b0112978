//! `environment_migrate`: an environment moves to another server target. A backup of it is
//! taken where it runs, the deploy steps make a copy on the new target (same id, so the same
//! names there), the backup is restored into it and its deploy commands run; once it answers
//! its health check the environment's record switches to the new target and the old copy is
//! removed. Any failure before the switch removes the new copy (`remove_new_copy`), and the
//! environment goes on serving where it was.
//!
//! Two targets may share a database server (two roots on one machine, or one TCP server):
//! then both copies use the one database, which the restore reloads from the backup and no
//! removal drops.

use hefring_core::target::{Host, TargetSettings};
use hefring_store::{EnvironmentRecord, TargetRecord};
use serde_json::json;

use super::backup::make_full_backup;
use super::environment::{load_target_id, remove_copy, save_env, Site};
use crate::run::{TaskContext, TaskError, TaskOutput, TaskResult};

fn new_target(t: &TaskContext<'_>) -> Result<String, TaskError> {
    t.op.inputs["target"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| TaskError::new("the operation names no target to move to"))
}

/// The target a migration's task works on, when it is not the one the record names: the new
/// one for the deploy and restore steps (and their rollback), the old one for the removal
/// after the switch. `None` for every other kind of operation.
pub fn target_of(t: &TaskContext<'_>, env: &EnvironmentRecord) -> Option<String> {
    if t.op.kind != hefring_core::operation::OperationKind::EnvironmentMigrate {
        return None;
    }
    match t.task {
        // Before the switch the record names the old target; after it, the new one.
        "take_backup" | "switch_target" | "-" => None,
        "remove_old_copy" => t.state["old_target"].as_str().map(str::to_string),
        _ => t.op.inputs["target"]
            .as_str()
            .filter(|new| *new != env.target_id)
            .map(str::to_string),
    }
}

/// Whether two targets reach the same database server for `kind`: then the database is one,
/// shared by both copies.
fn same_database_server(a: &TargetRecord, b: &TargetRecord, kind: &str) -> bool {
    fn is_loopback(host: &str) -> bool {
        matches!(host, "localhost" | "127.0.0.1" | "::1")
    }
    let same_machine = a.host == b.host
        || matches!(
            (Host::parse("host", &a.host), Host::parse("host", &b.host)),
            (Ok(Host::Local), Ok(Host::Local))
        );
    let (sa, sb): (&TargetSettings, &TargetSettings) = (&a.settings, &b.settings);
    match kind {
        "mariadb" => match (&sa.mariadb.host, &sb.mariadb.host) {
            (Some(ha), Some(hb)) if sa.mariadb.socket.is_none() && sb.mariadb.socket.is_none() => {
                ha == hb && sa.mariadb.port == sb.mariadb.port && (same_machine || !is_loopback(ha))
            }
            _ => same_machine && sa.mariadb.socket == sb.mariadb.socket,
        },
        "postgresql" => {
            let (ha, hb) = (&sa.postgresql.host, &sb.postgresql.host);
            ha == hb
                && sa.postgresql.port == sb.postgresql.port
                && (same_machine || !is_loopback(ha))
        }
        // SQLite lives in the environment's directory, on its target.
        _ => false,
    }
}

async fn shared_database(
    t: &TaskContext<'_>,
    env: &EnvironmentRecord,
    old: &str,
    new: &str,
) -> Result<bool, TaskError> {
    let kind = env.resources["database"].as_str().unwrap_or("none");
    let (old, new) = (load_target_id(t, old).await?, load_target_id(t, new).await?);
    Ok(same_database_server(&old, &new, kind))
}

pub async fn take_backup(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let new = new_target(t)?;
    if new == site.env.target_id {
        return Err(TaskError::new(
            "the environment already runs on this target",
        ));
    }
    let record = make_full_backup(t, &site, "copy", &format!("moved to target {new}")).await?;
    Ok(TaskOutput::with_state(json!({
        "old_target": site.env.target_id,
        "restore_from": record.id,
        "release_id": site.env.release_id,
        "result": { "backup": record.id },
    })))
}

/// From here on the environment is the copy on the new target.
pub async fn switch_target(t: &TaskContext<'_>) -> TaskResult {
    let mut site = Site::open(t).await?;
    let new = new_target(t)?;
    if site.env.target_id != new {
        site.env.target_id = new.clone();
        save_env(t, &mut site.env).await?;
    }
    t.log
        .info(format!("the environment now runs on target {new}"));
    Ok(TaskOutput::with_state(json!({ "switched": true })))
}

pub async fn remove_old_copy(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let old = t.state["old_target"]
        .as_str()
        .ok_or_else(|| TaskError::new("the operation has no old target recorded"))?;
    let keep = shared_database(t, &site.env, old, &new_target(t)?).await?;
    if keep {
        t.log
            .info("both targets use the same database server: the database stays");
    }
    remove_copy(&site, keep).await?;
    t.log.info(format!("removed the copy on target {old}"));
    Ok(TaskOutput::done())
}

/// The rollback: the copy made on the new target goes, unless the environment already moved
/// there (then it is the one that serves: retry to finish the removal of the old copy).
pub async fn remove_new_copy(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let new = new_target(t)?;
    let stored = t
        .ctx
        .store
        .get_environment(&site.env.id)
        .await?
        .ok_or_else(|| TaskError::new("the environment no longer exists"))?;
    if stored.target_id == new {
        t.log
            .info("the environment already runs on the new target: nothing to undo");
        return Ok(TaskOutput::done());
    }
    let keep = shared_database(t, &site.env, &stored.target_id, &new).await?;
    remove_copy(&site, keep).await?;
    super::backup::clean_up_restore(t).await?;
    t.log.info(format!("removed the copy made on target {new}"));
    Ok(TaskOutput::done())
}
