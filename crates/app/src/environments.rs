//! Environments: create, deploy, update, verify, delete, disable, enable, login link,
//! certificate renewal.

use hefring_core::environment::{check_host_names, host_names, is_environment_id};
use hefring_core::operation::{OperationKind, OperationStatus};
use hefring_core::render::nginx::Alias;
use hefring_core::render::Https;
use hefring_core::{new_id, validate, IdKind};
use hefring_store::{
    EnvironmentFilter, EnvironmentRecord, OperationFilter, Page, ReleaseRecord, TargetRecord,
};
use hefring_wire as wire;
use serde_json::json;

use crate::{now_ms, App, AppError, AppResult, Origin, Submitted};

/// What a new environment is asked to be (by create or clone).
pub struct NewEnvironment {
    pub name: String,
    pub project: String,
    pub target: String,
    pub domain: String,
    pub aliases: Vec<wire::Alias>,
    pub https: Option<String>,
}

impl App {
    /// An environment by id (deleted ones too: they can be shown).
    pub async fn environment(&self, id: &str) -> AppResult<EnvironmentRecord> {
        if !is_environment_id(id) {
            return Err(AppError::not_found("environment"));
        }
        self.store
            .get_environment(id)
            .await?
            .ok_or_else(|| AppError::not_found("environment"))
    }

    /// Every host name the environments that are not deleted answer to, but `except`'s.
    async fn names_in_use(&self, except: Option<&str>) -> AppResult<Vec<(String, String)>> {
        let mut used = Vec::new();
        let mut cursor = None;
        loop {
            let listed = self
                .store
                .list_environments(&EnvironmentFilter::default(), &Page { limit: 500, cursor })
                .await?;
            for env in listed.items {
                if Some(env.id.as_str()) == except {
                    continue;
                }
                for name in host_names(&env.domain, &env.aliases) {
                    used.push((name.to_string(), env.id.clone()));
                }
            }
            match listed.next {
                Some(next) => cursor = Some(next),
                None => return Ok(used),
            }
        }
    }

    /// Checks a new environment's fields (each error names its field) and makes its record,
    /// not yet stored.
    pub(crate) async fn new_environment(
        &self,
        body: NewEnvironment,
    ) -> AppResult<(EnvironmentRecord, TargetRecord)> {
        validate::name("name", &body.name)?;
        let aliases: Vec<Alias> = body
            .aliases
            .iter()
            .map(|a| Alias {
                domain: a.domain.clone(),
                redirect: a.redirect,
            })
            .collect();
        check_host_names(&body.domain, &aliases)?;
        let https = match body.https.as_deref() {
            None => Https::Off,
            Some(text) => Https::parse(text)
                .ok_or_else(|| AppError::invalid("https", "must be one of off, on, required"))?,
        };
        let target = self.server_target(&body.target).await?;
        let used = self.names_in_use(None).await?;
        for (i, name) in host_names(&body.domain, &aliases).into_iter().enumerate() {
            if let Some((_, owner)) = used.iter().find(|(n, _)| n == name) {
                let field = match i {
                    0 => "domain".to_string(),
                    i => format!("aliases[{}].domain", i - 1),
                };
                return Err(AppError::invalid(
                    &field,
                    format!("{name} is already served by environment {owner}"),
                ));
            }
        }
        let now = now_ms();
        let record = EnvironmentRecord {
            id: new_id(IdKind::Environment, now),
            name: body.name,
            project_id: body.project,
            target_id: target.id.clone(),
            release_id: None,
            domain: body.domain,
            aliases,
            https,
            status: "new".into(),
            secrets: hefring_core::Secret::new(json!({})),
            resources: json!({}),
            settings: json!({}),
            created_at: now,
            updated_at: now,
        };
        Ok((record, target))
    }

    /// The target named in a body (field `target`): it must exist and be a server.
    pub(crate) async fn server_target(&self, id: &str) -> AppResult<TargetRecord> {
        let target = match IdKind::Target.matches(id) {
            true => self.store.get_target(id).await?,
            false => None,
        }
        .ok_or_else(|| AppError::invalid("target", "no target has this id"))?;
        if target.kind != "server" {
            return Err(AppError::invalid(
                "target",
                "environments run on server targets in this version",
            ));
        }
        Ok(target)
    }

    /// Creates an environment: a site of a project on a target (deploy a release to it next).
    pub async fn create_environment(
        &self,
        body: wire::CreateEnvironment,
    ) -> AppResult<(EnvironmentRecord, TargetRecord)> {
        let project = match IdKind::Project.matches(&body.project) {
            true => self.store.get_project(&body.project).await?,
            false => None,
        }
        .ok_or_else(|| AppError::invalid("project", "no project has this id"))?;
        let (record, target) = self
            .new_environment(NewEnvironment {
                name: body.name,
                project: project.id,
                target: body.target,
                domain: body.domain,
                aliases: body.aliases,
                https: body.https,
            })
            .await?;
        self.store.insert_environment(&record).await?;
        Ok((record, target))
    }

    /// The release named in a deploy or update body: it must exist, be built, and belong to
    /// the environment's project.
    async fn deployable_release(
        &self,
        env: &EnvironmentRecord,
        id: &str,
    ) -> AppResult<ReleaseRecord> {
        let release = match IdKind::Release.matches(id) {
            true => self.store.get_release(id).await?,
            false => None,
        }
        .ok_or_else(|| AppError::invalid("release", "no release has this id"))?;
        if release.project_id != env.project_id {
            return Err(AppError::invalid(
                "release",
                format!(
                    "release {} belongs to another project than the environment's",
                    release.id
                ),
            ));
        }
        if release.status != "ready" || release.artifact_sha256.is_none() {
            return Err(AppError::invalid(
                "release",
                format!(
                    "release {} is {}, not ready: wait for its build to succeed",
                    release.id, release.status
                ),
            ));
        }
        Ok(release)
    }

    /// Refuses while a deploy, update, migration, restore or sync of the environment is
    /// queued or running.
    pub(crate) async fn refuse_concurrent_change(&self, env: &EnvironmentRecord) -> AppResult<()> {
        for status in [OperationStatus::Queued, OperationStatus::Running] {
            let active = self
                .store
                .list_operations(
                    &OperationFilter {
                        subject: Some(env.id.clone()),
                        status: Some(status),
                        parent: None,
                    },
                    &Page {
                        limit: 100,
                        cursor: None,
                    },
                )
                .await?;
            if let Some(op) = active.items.iter().find(|op| {
                matches!(
                    op.kind,
                    OperationKind::EnvironmentDeploy
                        | OperationKind::EnvironmentUpdate
                        | OperationKind::EnvironmentMigrate
                        | OperationKind::EnvironmentRestore
                        | OperationKind::EnvironmentSync
                )
            }) {
                return Err(AppError::Duplicate {
                    existing: op.id.clone(),
                    identical: false,
                });
            }
        }
        Ok(())
    }

    /// Deploys a release to a new (or failed) environment.
    pub async fn deploy(
        &self,
        env: &str,
        body: wire::DeployRelease,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        self.change_release(env, body, OperationKind::EnvironmentDeploy, origin)
            .await
    }

    /// Updates a deployed environment to another release.
    pub async fn update(
        &self,
        env: &str,
        body: wire::DeployRelease,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        self.change_release(env, body, OperationKind::EnvironmentUpdate, origin)
            .await
    }

    async fn change_release(
        &self,
        env: &str,
        body: wire::DeployRelease,
        kind: OperationKind,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        let env = self.environment(env).await?;
        let release = self.deployable_release(&env, &body.release).await?;
        self.refuse_concurrent_change(&env).await?;
        let refusal = match kind {
            OperationKind::EnvironmentDeploy
                if !matches!(env.status.as_str(), "new" | "failed") =>
            {
                Some("deploy is for a new environment (use update to change its release)")
            }
            OperationKind::EnvironmentUpdate
                if env.release_id.is_none()
                    || !matches!(env.status.as_str(), "active" | "failed") =>
            {
                Some("only a deployed environment can be updated (deploy it first)")
            }
            _ => None,
        };
        if let Some(refusal) = refusal {
            return Err(AppError::conflict(format!(
                "the environment is {}; {refusal}",
                env.status
            )));
        }
        self.store_operation(kind, &env.id, json!({ "release": release.id }), origin)
            .await
    }

    /// Checks that the environment's servers run and that it answers its health check.
    pub async fn verify_environment(&self, env: &str, origin: &Origin) -> AppResult<Submitted> {
        let env = self.environment(env).await?;
        if env.status == "deleted" {
            return Err(AppError::conflict("the environment is deleted"));
        }
        self.store_operation(OperationKind::EnvironmentVerify, &env.id, json!({}), origin)
            .await
    }

    /// Deletes the environment and exactly what it created on its target.
    pub async fn delete_environment(&self, env: &str, origin: &Origin) -> AppResult<Submitted> {
        let env = self.environment(env).await?;
        self.store_operation(OperationKind::EnvironmentDelete, &env.id, json!({}), origin)
            .await
    }

    /// Disables or enables a deployed site (`kind` is one of the two).
    pub async fn toggle(
        &self,
        env: &str,
        kind: OperationKind,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        debug_assert!(matches!(
            kind,
            OperationKind::EnvironmentDisable | OperationKind::EnvironmentEnable
        ));
        let env = self.environment(env).await?;
        if env.release_id.is_none() || !matches!(env.status.as_str(), "active" | "disabled") {
            return Err(AppError::conflict(format!(
                "the environment is {}; only a deployed environment can be disabled or enabled",
                env.status
            )));
        }
        self.store_operation(kind, &env.id, json!({}), origin).await
    }

    /// Makes a one-time login link (the operation records it in its state).
    pub async fn login(&self, env: &str, origin: &Origin) -> AppResult<Submitted> {
        let env = self.environment(env).await?;
        if env.release_id.is_none() || !matches!(env.status.as_str(), "active" | "disabled") {
            return Err(AppError::conflict(format!(
                "the environment is {}; only a deployed environment has a login link",
                env.status
            )));
        }
        self.store_operation(OperationKind::EnvironmentLogin, &env.id, json!({}), origin)
            .await
    }

    /// Renews the HTTPS certificate of a deployed environment that serves HTTPS.
    pub async fn renew_certificate(&self, env: &str, origin: &Origin) -> AppResult<Submitted> {
        let env = self.environment(env).await?;
        if env.release_id.is_none() || !matches!(env.status.as_str(), "active" | "disabled") {
            return Err(AppError::conflict(format!(
                "the environment is {}; only a deployed environment has a certificate",
                env.status
            )));
        }
        if env.https == Https::Off {
            return Err(AppError::conflict(
                "the environment does not serve HTTPS (https is off)",
            ));
        }
        self.store_operation(
            OperationKind::EnvironmentRenewCertificate,
            &env.id,
            json!({}),
            origin,
        )
        .await
    }
}
