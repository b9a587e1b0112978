//! Projects: add, verify.

use hefring_core::operation::OperationKind;
use hefring_core::{new_id, validate, IdKind};
use hefring_store::{DeployKey, ProjectRecord};
use hefring_wire as wire;
use serde_json::json;

use crate::{now_ms, App, AppError, AppResult, Origin, Submitted};

impl App {
    pub(crate) async fn project(&self, id: &str) -> AppResult<ProjectRecord> {
        match IdKind::Project.matches(id) {
            true => self.store.get_project(id).await?,
            false => None,
        }
        .ok_or_else(|| AppError::not_found("project"))
    }

    /// A repository URL: valid for git, and not a local path inside the data directory,
    /// compared by text and, when both exist, after resolving symbolic links.
    fn check_git_url(&self, url: &str) -> AppResult<()> {
        validate::git_url("git_url", url)?;
        let data_dir = self.data_dir.to_string_lossy();
        validate::repository_outside("git_url", url, &data_dir)?;
        let local = url.strip_prefix("file://").unwrap_or(url);
        if local.starts_with('/') {
            if let (Ok(path), Ok(dir)) = (
                std::fs::canonicalize(local),
                std::fs::canonicalize(&self.data_dir),
            ) {
                validate::repository_outside(
                    "git_url",
                    &path.to_string_lossy(),
                    &dir.to_string_lossy(),
                )?;
            }
        }
        Ok(())
    }

    /// Adds a project from a git URL or an absolute local path, with a deploy key made by
    /// `deploy_key` (given the project's id) once the request is accepted.
    pub async fn create_project(
        &self,
        body: wire::CreateProject,
        deploy_key: impl FnOnce(&str) -> DeployKey,
    ) -> AppResult<ProjectRecord> {
        validate::name("name", &body.name)?;
        self.check_git_url(&body.git_url)?;
        let branch = body.branch.unwrap_or_else(|| "main".into());
        validate::git_ref("branch", &branch)?;
        let now = now_ms();
        let id = new_id(IdKind::Project, now);
        let record = ProjectRecord {
            deploy_key: Some(deploy_key(&id)),
            id,
            name: body.name,
            git_url: body.git_url,
            branch,
            status: "new".into(),
            manifest: None,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_project(&record).await?;
        Ok(record)
    }

    /// Checks that the repository is reachable and its `.hefring.yml` valid.
    pub async fn verify_project(&self, id: &str, origin: &Origin) -> AppResult<Submitted> {
        let project = self.project(id).await?;
        self.store_operation(OperationKind::ProjectVerify, &project.id, json!({}), origin)
            .await
    }
}
