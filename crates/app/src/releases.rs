//! Releases: build, fleet update.

use hefring_core::operation::OperationKind;
use hefring_core::{validate, IdKind};
use hefring_store::ReleaseRecord;
use hefring_wire as wire;
use serde_json::json;

use crate::{App, AppError, AppResult, Origin, Submitted};

impl App {
    pub(crate) async fn release(&self, id: &str) -> AppResult<ReleaseRecord> {
        match IdKind::Release.matches(id) {
            true => self.store.get_release(id).await?,
            false => None,
        }
        .ok_or_else(|| AppError::not_found("release"))
    }

    /// Builds a release of a branch, tag or commit. A commit that already has a ready release
    /// answers that release's build operation instead of building again.
    pub async fn build_release(
        &self,
        project: &str,
        body: wire::BuildRelease,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        let project = self.project(project).await?;
        validate::git_ref("ref", &body.git_ref)?;
        if validate::is_full_commit(&body.git_ref) {
            if let Some(existing) = self
                .store
                .release_by_commit(&project.id, &body.git_ref)
                .await?
            {
                if existing.status == "ready" {
                    if let Some(operation) = self
                        .store
                        .get_operation(&existing.build_operation_id)
                        .await?
                    {
                        return Ok(Submitted {
                            operation,
                            created: false,
                        });
                    }
                }
            }
        }
        self.store_operation(
            OperationKind::ReleaseBuild,
            &project.id,
            json!({ "ref": body.git_ref }),
            origin,
        )
        .await
    }

    /// Updates every environment running release `from` to `body.to`, by child operations.
    pub async fn fleet_update(
        &self,
        from: &str,
        body: wire::FleetUpdate,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        let from = self.release(from).await?;
        let to = match IdKind::Release.matches(&body.to) {
            true => self.store.get_release(&body.to).await?,
            false => None,
        }
        .ok_or_else(|| AppError::invalid("to", "no release has this id"))?;
        if to.id == from.id {
            return Err(AppError::invalid(
                "to",
                "the release to update to is this one",
            ));
        }
        if to.project_id != from.project_id {
            return Err(AppError::invalid(
                "to",
                "the release belongs to another project",
            ));
        }
        if to.status != "ready" || to.artifact_sha256.is_none() {
            return Err(AppError::invalid(
                "to",
                format!("release {} is {}, not ready", to.id, to.status),
            ));
        }
        let parallelism = body.parallelism.unwrap_or(1);
        if !(1..=50).contains(&parallelism) {
            return Err(AppError::invalid("parallelism", "must be between 1 and 50"));
        }
        if !body.include_older && self.store.environments_running(&from.id).await?.is_empty() {
            return Err(AppError::conflict(format!(
                "no environment runs release {}",
                from.id
            )));
        }
        self.store_operation(
            OperationKind::ReleaseFleetUpdate,
            &from.id,
            json!({
                "to": to.id,
                "parallelism": parallelism,
                "max_failures": body.max_failures.unwrap_or(0),
                "include_older": body.include_older,
            }),
            origin,
        )
        .await
    }
}
