//! Backups and what is made of them: back up, restore, clone, sync, migrate; delete a backup.

use hefring_core::operation::{OperationKind, OperationStatus};
use hefring_core::IdKind;
use hefring_store::{BackupRecord, EnvironmentRecord, OperationFilter, Page};
use hefring_wire as wire;
use serde_json::json;

use crate::environments::NewEnvironment;
use crate::{App, AppError, AppResult, Origin, Submitted};

/// Backups, restores, clones, syncs and migrations need a deployed environment.
fn require_deployed(env: &EnvironmentRecord, what: &str) -> AppResult<()> {
    if env.release_id.is_none() || !matches!(env.status.as_str(), "active" | "disabled") {
        return Err(AppError::conflict(format!(
            "the environment is {}; only a deployed environment can {what}",
            env.status
        )));
    }
    Ok(())
}

impl App {
    /// A backup by id; deleted ones are gone.
    pub async fn backup_record(&self, id: &str) -> AppResult<BackupRecord> {
        if !IdKind::Backup.matches(id) {
            return Err(AppError::not_found("backup"));
        }
        match self.store.get_backup(id).await? {
            Some(b) if b.status != "deleted" => Ok(b),
            _ => Err(AppError::not_found("backup")),
        }
    }

    /// The environment named as the source of a sync: of the same project, deployed, not
    /// this one.
    async fn source_environment(
        &self,
        env: &EnvironmentRecord,
        id: &str,
    ) -> AppResult<EnvironmentRecord> {
        let source = match IdKind::Environment.matches(id) {
            true => self.store.get_environment(id).await?,
            false => None,
        }
        .filter(|s| s.status != "deleted")
        .ok_or_else(|| AppError::invalid("from", "no environment has this id"))?;
        if source.id == env.id {
            return Err(AppError::invalid(
                "from",
                "an environment cannot sync from itself",
            ));
        }
        if source.project_id != env.project_id {
            return Err(AppError::invalid(
                "from",
                "the source belongs to another project than the environment's",
            ));
        }
        if source.release_id.is_none() || !matches!(source.status.as_str(), "active" | "disabled") {
            return Err(AppError::invalid(
                "from",
                format!("the source environment is {}, not deployed", source.status),
            ));
        }
        Ok(source)
    }

    /// Backs up a deployed environment.
    pub async fn backup(
        &self,
        env: &str,
        body: wire::CreateBackup,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        let env = self.environment(env).await?;
        let description = body.description.unwrap_or_default();
        if description.chars().count() > 200 || description.chars().any(char::is_control) {
            return Err(AppError::invalid(
                "description",
                "at most 200 characters, without control characters",
            ));
        }
        require_deployed(&env, "be backed up")?;
        self.store_operation(
            OperationKind::EnvironmentBackup,
            &env.id,
            json!({ "description": description }),
            origin,
        )
        .await
    }

    /// Restores a backup of an environment of the same project into a deployed environment.
    pub async fn restore(
        &self,
        env: &str,
        body: wire::RestoreBackup,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        let env = self.environment(env).await?;
        let backup = self
            .backup_record(&body.backup)
            .await
            .map_err(|e| match e {
                AppError::NotFound { .. } => AppError::invalid("backup", "no backup has this id"),
                other => other,
            })?;
        if backup.status != "ready" {
            return Err(AppError::invalid(
                "backup",
                format!("backup {} is {}, not ready", backup.id, backup.status),
            ));
        }
        let owner = self.store.get_environment(&backup.environment_id).await?;
        if owner.as_ref().map(|o| o.project_id.as_str()) != Some(env.project_id.as_str()) {
            return Err(AppError::invalid(
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
                return Err(AppError::invalid(
                    "backup",
                    format!("the backup holds a {held} database, the environment uses {used}"),
                ));
            }
        }
        require_deployed(&env, "be restored into")?;
        self.refuse_concurrent_change(&env).await?;
        self.store_operation(
            OperationKind::EnvironmentRestore,
            &env.id,
            json!({ "backup": backup.id }),
            origin,
        )
        .await
    }

    /// Clones a deployed environment into a new one (the operation's subject), which is
    /// stored with the operation; when the operation cannot be stored it is marked deleted.
    pub async fn clone_environment(
        &self,
        source: &str,
        body: wire::CloneEnvironment,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        let source = self.environment(source).await?;
        require_deployed(&source, "be cloned")?;
        // Its backup must not be taken while a deploy, update, restore or migration changes it.
        self.refuse_concurrent_change(&source).await?;
        let release = source.release_id.clone().expect("a deployed environment");
        let (record, _) = self
            .new_environment(NewEnvironment {
                name: body.name,
                project: source.project_id.clone(),
                target: body.target.unwrap_or_else(|| source.target_id.clone()),
                domain: body.domain,
                aliases: body.aliases,
                https: Some(
                    body.https
                        .unwrap_or_else(|| source.https.as_str().to_string()),
                ),
            })
            .await?;
        self.store.insert_environment(&record).await?;
        match self
            .store_operation(
                OperationKind::EnvironmentClone,
                &record.id,
                json!({ "from": source.id, "release": release }),
                origin,
            )
            .await
        {
            Ok(submitted) => Ok(submitted),
            Err(e) => {
                // Nothing stays when a request is refused: the new environment goes too.
                let mut gone = record;
                gone.status = "deleted".into();
                let _ = self.store.update_environment(&gone).await;
                Err(e)
            }
        }
    }

    /// Copies another environment's database and/or files into this one.
    pub async fn sync(
        &self,
        env: &str,
        body: wire::SyncEnvironment,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        let env = self.environment(env).await?;
        let source = self.source_environment(&env, &body.from).await?;
        if !body.database && !body.files {
            return Err(AppError::invalid(
                "database",
                "a sync copies the database, the files or both: at least one must be true",
            ));
        }
        if body.database && source.resources["database"] != env.resources["database"] {
            return Err(AppError::invalid(
                "from",
                "the source uses another kind of database than the environment",
            ));
        }
        require_deployed(&env, "be synced")?;
        self.refuse_concurrent_change(&env).await?;
        self.refuse_concurrent_change(&source).await?;
        self.store_operation(
            OperationKind::EnvironmentSync,
            &env.id,
            json!({ "from": source.id, "database": body.database, "files": body.files }),
            origin,
        )
        .await
    }

    /// Moves a deployed environment to another server target.
    pub async fn migrate(
        &self,
        env: &str,
        body: wire::MigrateEnvironment,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        let env = self.environment(env).await?;
        let target = self.server_target(&body.target).await?;
        if target.id == env.target_id {
            return Err(AppError::invalid(
                "target",
                "the environment already runs on this target",
            ));
        }
        require_deployed(&env, "be migrated")?;
        self.refuse_concurrent_change(&env).await?;
        self.store_operation(
            OperationKind::EnvironmentMigrate,
            &env.id,
            json!({ "target": target.id, "release": env.release_id }),
            origin,
        )
        .await
    }

    /// A queued or running restore of the backup, if any.
    async fn restore_using(&self, backup: &str) -> AppResult<Option<String>> {
        for status in [OperationStatus::Queued, OperationStatus::Running] {
            let mut cursor = None;
            loop {
                let listed = self
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

    /// Deletes a backup that is neither being made nor restored.
    pub async fn delete_backup(&self, id: &str, origin: &Origin) -> AppResult<Submitted> {
        let backup = self.backup_record(id).await?;
        if backup.status == "creating" {
            return Err(AppError::conflict(format!(
                "backup {} is still being made (operation {})",
                backup.id, backup.operation_id
            )));
        }
        if let Some(restore) = self.restore_using(&backup.id).await? {
            return Err(AppError::conflict(format!(
                "backup {} is being restored (operation {restore})",
                backup.id
            )));
        }
        self.store_operation(OperationKind::BackupDelete, &backup.id, json!({}), origin)
            .await
    }
}
