//! `project_verify`: is the repository reachable, and is its manifest valid?

use hefring_core::manifest::{Manifest, MANIFEST_FILE};
use hefring_store::ProjectRecord;
use serde_json::json;

use super::git;
use crate::run::{TaskContext, TaskError, TaskOutput, TaskResult};
use crate::time::now_ms;

pub async fn load_project(t: &TaskContext<'_>) -> Result<ProjectRecord, TaskError> {
    t.ctx
        .store
        .get_project(&t.op.subject_id)
        .await?
        .ok_or_else(|| TaskError::new("the project no longer exists"))
}

async fn set_status(
    t: &TaskContext<'_>,
    project: &ProjectRecord,
    status: &str,
    manifest: Option<serde_json::Value>,
) -> Result<(), TaskError> {
    let mut updated = project.clone();
    updated.status = status.into();
    if manifest.is_some() {
        updated.manifest = manifest;
    }
    updated.updated_at = now_ms();
    t.ctx.store.update_project(&updated).await?;
    Ok(())
}

pub async fn fetch_repository(t: &TaskContext<'_>) -> TaskResult {
    let mut project = load_project(t).await?;
    let mirror = git::mirror_path(t.ctx, &project.id);
    git::ensure_deploy_key(t.ctx, t.log, &mut project).await?;
    if let Err(e) = git::update_mirror(t.ctx, t.log, &project, &mirror).await {
        set_status(t, &project, "unreachable", None).await?;
        return Err(e);
    }
    let branch = format!("refs/heads/{}", project.branch);
    let Some(commit) = git::resolve(t.ctx, t.log, &mirror, &branch).await? else {
        set_status(t, &project, "invalid", None).await?;
        return Err(TaskError(format!(
            "the repository has no branch named {}",
            project.branch
        )));
    };
    t.log
        .info(format!("branch {} is at {commit}", project.branch));
    Ok(TaskOutput::with_state(json!({ "commit": commit })))
}

pub async fn read_manifest(t: &TaskContext<'_>) -> TaskResult {
    let project = load_project(t).await?;
    let commit = t.state["commit"]
        .as_str()
        .ok_or_else(|| TaskError::new("no commit was resolved"))?;
    let mirror = git::mirror_path(t.ctx, &project.id);
    let Some(text) = git::show_file(t.ctx, t.log, &mirror, commit, MANIFEST_FILE).await? else {
        set_status(t, &project, "invalid", None).await?;
        return Err(TaskError(format!(
            "{MANIFEST_FILE} is missing at the root of branch {}",
            project.branch
        )));
    };
    match Manifest::parse_new(&text) {
        Ok(manifest) => {
            t.log.info(format!(
                "{MANIFEST_FILE} is valid: runtime {}, database {}, {} build, {} install and {} deploy commands",
                serde_json::to_value(manifest.runtime).unwrap_or_default().as_str().unwrap_or("?"),
                serde_json::to_value(manifest.database).unwrap_or_default().as_str().unwrap_or("?"),
                manifest.build.len(),
                manifest.install.len(),
                manifest.deploy.len()
            ));
            let value = serde_json::to_value(&manifest).map_err(|e| TaskError(e.to_string()))?;
            set_status(t, &project, "verified", Some(value)).await?;
            Ok(TaskOutput::done())
        }
        Err(e) => {
            set_status(t, &project, "invalid", None).await?;
            Err(TaskError(e.to_string()))
        }
    }
}
