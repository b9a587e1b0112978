//! [`SealedStore`]: the one place where secrets are sealed on their way into the database and
//! opened on their way out, whichever backend holds the rows. Everything else passes through.
//!
//! What is sealed, and where it lives:
//! - a target's database admin passwords (`settings.mariadb.password`,
//!   `settings.postgresql.password`): [`seal_target`] / [`open_target`]. The kubeconfig of
//!   a kubernetes target (write-only, API.md) belongs in these two functions too.
//! - an environment's `secrets` (its generated database password, ...), sealed whole;
//! - a project's deploy private key;
//! - the operation state keys of [`SECRET_STATE_KEYS`] (a login link until it is answered).
//!
//! S3 keys are not stored: they come from the environment. API tokens are stored hashed.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::secrets::Sealer;
use crate::*;

/// Operation state keys that hold secrets.
pub const SECRET_STATE_KEYS: &[&str] = &["login_url"];

/// The setting naming the key every secret was last sealed with, by a full pass.
const SEALED_WITH: &str = "secrets_sealed_with";

/// A store whose secrets are sealed at rest with the installation's key.
pub struct SealedStore {
    inner: Arc<dyn Store>,
    sealer: Arc<Sealer>,
}

/// What [`SealedStore::seal_everything`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SealReport {
    /// Rows rewritten (plaintext or an older key before).
    pub resealed: u64,
    /// Login links of ended operations removed.
    pub forgotten: u64,
    /// Whether the pass ran at all (it is skipped when the last one sealed everything with
    /// the current key).
    pub ran: bool,
}

fn seal_opt(sealer: &Sealer, place: String, value: &mut Option<Secret<String>>) {
    if let Some(v) = value {
        if !Sealer::is_sealed(v.expose()) {
            *v = Secret::new(sealer.seal(&place, v.expose()));
        }
    }
}

fn open_opt(sealer: &Sealer, place: String, value: &mut Option<Secret<String>>) -> Result<()> {
    if let Some(v) = value {
        *v = Secret::new(sealer.open(&place, v.expose())?);
    }
    Ok(())
}

/// The places of a target's secrets, with a mutable reference to each.
fn target_secrets(t: &mut TargetRecord) -> [(String, &mut Option<Secret<String>>); 2] {
    [
        (
            format!("target:{}:mariadb.password", t.id),
            &mut t.settings.mariadb.password,
        ),
        (
            format!("target:{}:postgresql.password", t.id),
            &mut t.settings.postgresql.password,
        ),
    ]
}

pub fn seal_target(sealer: &Sealer, t: &TargetRecord) -> TargetRecord {
    let mut t = t.clone();
    for (place, value) in target_secrets(&mut t) {
        seal_opt(sealer, place, value);
    }
    t
}

pub fn open_target(sealer: &Sealer, mut t: TargetRecord) -> Result<TargetRecord> {
    for (place, value) in target_secrets(&mut t) {
        open_opt(sealer, place, value)?;
    }
    Ok(t)
}

fn project_place(id: &str) -> String {
    format!("project:{id}:deploy_private_key")
}

fn seal_project(sealer: &Sealer, p: &ProjectRecord) -> ProjectRecord {
    let mut p = p.clone();
    if let Some(key) = &mut p.deploy_key {
        if !Sealer::is_sealed(key.private_key.expose()) {
            key.private_key =
                Secret::new(sealer.seal(&project_place(&p.id), key.private_key.expose()));
        }
    }
    p
}

fn open_project(sealer: &Sealer, mut p: ProjectRecord) -> Result<ProjectRecord> {
    if let Some(key) = &mut p.deploy_key {
        key.private_key =
            Secret::new(sealer.open(&project_place(&p.id), key.private_key.expose())?);
    }
    Ok(p)
}

fn environment_place(id: &str) -> String {
    format!("environment:{id}:secrets")
}

/// An environment's secrets are sealed whole: the column holds one JSON string.
fn seal_environment(sealer: &Sealer, e: &EnvironmentRecord) -> EnvironmentRecord {
    let mut e = e.clone();
    let sealed = match e.secrets.expose() {
        Value::String(s) if Sealer::is_sealed(s) => return e,
        plain => sealer.seal(&environment_place(&e.id), &plain.to_string()),
    };
    e.secrets = Secret::new(Value::String(sealed));
    e
}

fn open_environment(sealer: &Sealer, mut e: EnvironmentRecord) -> Result<EnvironmentRecord> {
    if let Value::String(s) = e.secrets.expose() {
        if Sealer::is_sealed(s) {
            let text = sealer.open(&environment_place(&e.id), s)?;
            let value = serde_json::from_str(&text).map_err(|err| {
                StoreError::Corrupt(format!("the secrets of environment {}: {err}", e.id))
            })?;
            e.secrets = Secret::new(value);
        }
    }
    Ok(e)
}

fn state_place(id: &str, key: &str) -> String {
    format!("operation:{id}:state.{key}")
}

fn seal_state_patch(sealer: &Sealer, id: &str, patch: &Value) -> Value {
    let mut patch = patch.clone();
    for key in SECRET_STATE_KEYS {
        if let Some(Value::String(s)) = patch.get_mut(*key) {
            if !Sealer::is_sealed(s) {
                *s = sealer.seal(&state_place(id, key), s);
            }
        }
    }
    patch
}

fn open_operation(sealer: &Sealer, mut op: OperationRecord) -> Result<OperationRecord> {
    for key in SECRET_STATE_KEYS {
        if let Some(Value::String(s)) = op.state.get_mut(*key) {
            *s = sealer.open(&state_place(&op.id, key), s)?;
        }
    }
    Ok(op)
}

fn open_listed<T>(listed: Listed<T>, open: impl Fn(T) -> Result<T>) -> Result<Listed<T>> {
    Ok(Listed {
        items: listed.items.into_iter().map(open).collect::<Result<_>>()?,
        next: listed.next,
    })
}

impl SealedStore {
    /// Wraps `inner`; refuses a key file that is not the one the database's secrets were
    /// sealed with.
    pub async fn new(inner: Arc<dyn Store>, sealer: Arc<Sealer>) -> Result<SealedStore> {
        if let Some(id) = inner.get_setting(SEALED_WITH).await? {
            if !sealer.knows(&id) {
                return Err(StoreError::Corrupt(format!(
                    "this database's secrets are sealed with the secret key {id}, but the key \
                     file holds the key {}: give Hefring the installation's key file \
                     (--secret-key-file), or restore it from its backup",
                    sealer.current_id()
                )));
            }
        }
        Ok(SealedStore { inner, sealer })
    }

    pub fn sealer(&self) -> &Arc<Sealer> {
        &self.sealer
    }

    /// Seals every secret that is stored in plaintext (a database from before sealing) or
    /// with an older key (a rotation), and removes the login links of operations that ended.
    /// Row by row, each in its own write: a crash leaves every row readable and the next pass
    /// goes on. Skipped when the last full pass sealed everything with the current key and no
    /// older key is loaded. After plaintext was replaced, the store's files are scrubbed.
    pub async fn seal_everything(&self) -> Result<SealReport> {
        let done = self.inner.get_setting(SEALED_WITH).await?;
        if done.as_deref() == Some(self.sealer.current_id()) && !self.sealer.has_older_keys() {
            return Ok(SealReport::default());
        }
        let mut report = SealReport {
            ran: true,
            ..Default::default()
        };
        let mut plaintext_seen = false;
        let sealer = &self.sealer;
        let stale = |s: &str| !sealer.is_current(s);

        let mut page = Page {
            limit: 200,
            cursor: None,
        };
        loop {
            let listed = self.inner.list_targets(&page).await?;
            for t in listed.items {
                let mut t2 = t.clone();
                let needs = target_secrets(&mut t2)
                    .iter()
                    .any(|(_, v)| v.as_ref().is_some_and(|v| stale(v.expose())));
                if needs {
                    plaintext_seen |= target_secrets(&mut t2)
                        .iter()
                        .any(|(_, v)| v.as_ref().is_some_and(|v| !Sealer::is_sealed(v.expose())));
                    let plain = open_target(sealer, t)?;
                    self.inner
                        .update_target(&seal_target(sealer, &plain))
                        .await?;
                    report.resealed += 1;
                }
            }
            match listed.next {
                Some(next) => page.cursor = Some(next),
                None => break,
            }
        }

        page.cursor = None;
        loop {
            let listed = self.inner.list_projects(&page).await?;
            for p in listed.items {
                let Some(key) = &p.deploy_key else { continue };
                if stale(key.private_key.expose()) {
                    plaintext_seen |= !Sealer::is_sealed(key.private_key.expose());
                    let plain = open_project(sealer, p)?;
                    self.inner
                        .update_project(&seal_project(sealer, &plain))
                        .await?;
                    report.resealed += 1;
                }
            }
            match listed.next {
                Some(next) => page.cursor = Some(next),
                None => break,
            }
        }

        page.cursor = None;
        let every = EnvironmentFilter {
            include_deleted: true,
            ..Default::default()
        };
        loop {
            let listed = self.inner.list_environments(&every, &page).await?;
            for e in listed.items {
                let needs = match e.secrets.expose() {
                    Value::String(s) => stale(s),
                    Value::Object(map) => !map.is_empty(),
                    _ => false,
                };
                if needs {
                    plaintext_seen |= !matches!(e.secrets.expose(), Value::String(_));
                    let plain = open_environment(sealer, e)?;
                    self.inner
                        .update_environment(&seal_environment(sealer, &plain))
                        .await?;
                    report.resealed += 1;
                }
            }
            match listed.next {
                Some(next) => page.cursor = Some(next),
                None => break,
            }
        }

        // A login link is answered once, by the request that asked for it, which does not
        // outlive the process: whatever an operation still holds when a pass runs (at start,
        // or in a rotation with every process stopped) is forgotten, not sealed again.
        page.cursor = None;
        loop {
            let listed = self
                .inner
                .list_operations(&OperationFilter::default(), &page)
                .await?;
            for op in listed.items {
                for key in SECRET_STATE_KEYS {
                    if let Some(Value::String(s)) = op.state.get(*key) {
                        plaintext_seen |= !Sealer::is_sealed(s);
                        self.inner.remove_state_key(&op.id, key).await?;
                        report.forgotten += 1;
                    }
                }
            }
            match listed.next {
                Some(next) => page.cursor = Some(next),
                None => break,
            }
        }

        if plaintext_seen {
            self.inner.scrub().await?;
        }
        self.inner
            .set_setting(SEALED_WITH, self.sealer.current_id())
            .await?;
        Ok(report)
    }
}

#[async_trait]
impl Store for SealedStore {
    async fn insert_target(&self, target: &TargetRecord) -> Result<()> {
        self.inner
            .insert_target(&seal_target(&self.sealer, target))
            .await
    }
    async fn get_target(&self, id: &str) -> Result<Option<TargetRecord>> {
        self.inner
            .get_target(id)
            .await?
            .map(|t| open_target(&self.sealer, t))
            .transpose()
    }
    async fn target_by_name(&self, name: &str) -> Result<Option<TargetRecord>> {
        self.inner
            .target_by_name(name)
            .await?
            .map(|t| open_target(&self.sealer, t))
            .transpose()
    }
    async fn list_targets(&self, page: &Page) -> Result<Listed<TargetRecord>> {
        open_listed(self.inner.list_targets(page).await?, |t| {
            open_target(&self.sealer, t)
        })
    }
    async fn update_target(&self, target: &TargetRecord) -> Result<()> {
        self.inner
            .update_target(&seal_target(&self.sealer, target))
            .await
    }
    async fn delete_target(&self, id: &str) -> Result<()> {
        self.inner.delete_target(id).await
    }

    async fn insert_project(&self, project: &ProjectRecord) -> Result<()> {
        self.inner
            .insert_project(&seal_project(&self.sealer, project))
            .await
    }
    async fn get_project(&self, id: &str) -> Result<Option<ProjectRecord>> {
        self.inner
            .get_project(id)
            .await?
            .map(|p| open_project(&self.sealer, p))
            .transpose()
    }
    async fn list_projects(&self, page: &Page) -> Result<Listed<ProjectRecord>> {
        open_listed(self.inner.list_projects(page).await?, |p| {
            open_project(&self.sealer, p)
        })
    }
    async fn update_project(&self, project: &ProjectRecord) -> Result<()> {
        self.inner
            .update_project(&seal_project(&self.sealer, project))
            .await
    }

    async fn insert_release(&self, release: &ReleaseRecord) -> Result<()> {
        self.inner.insert_release(release).await
    }
    async fn get_release(&self, id: &str) -> Result<Option<ReleaseRecord>> {
        self.inner.get_release(id).await
    }
    async fn release_by_commit(
        &self,
        project: &str,
        commit: &str,
    ) -> Result<Option<ReleaseRecord>> {
        self.inner.release_by_commit(project, commit).await
    }
    async fn list_releases(
        &self,
        project: Option<&str>,
        page: &Page,
    ) -> Result<Listed<ReleaseRecord>> {
        self.inner.list_releases(project, page).await
    }
    async fn update_release(&self, release: &ReleaseRecord) -> Result<()> {
        self.inner.update_release(release).await
    }

    async fn insert_environment(&self, environment: &EnvironmentRecord) -> Result<()> {
        self.inner
            .insert_environment(&seal_environment(&self.sealer, environment))
            .await
    }
    async fn get_environment(&self, id: &str) -> Result<Option<EnvironmentRecord>> {
        self.inner
            .get_environment(id)
            .await?
            .map(|e| open_environment(&self.sealer, e))
            .transpose()
    }
    async fn list_environments(
        &self,
        filter: &EnvironmentFilter,
        page: &Page,
    ) -> Result<Listed<EnvironmentRecord>> {
        open_listed(self.inner.list_environments(filter, page).await?, |e| {
            open_environment(&self.sealer, e)
        })
    }
    async fn update_environment(&self, environment: &EnvironmentRecord) -> Result<()> {
        self.inner
            .update_environment(&seal_environment(&self.sealer, environment))
            .await
    }
    async fn environments_running(&self, release: &str) -> Result<Vec<String>> {
        self.inner.environments_running(release).await
    }
    async fn environments_on_target(&self, target: &str) -> Result<Vec<String>> {
        self.inner.environments_on_target(target).await
    }

    async fn insert_backup(&self, backup: &BackupRecord) -> Result<()> {
        self.inner.insert_backup(backup).await
    }
    async fn get_backup(&self, id: &str) -> Result<Option<BackupRecord>> {
        self.inner.get_backup(id).await
    }
    async fn list_backups(
        &self,
        filter: &BackupFilter,
        page: &Page,
    ) -> Result<Listed<BackupRecord>> {
        self.inner.list_backups(filter, page).await
    }
    async fn update_backup(&self, backup: &BackupRecord) -> Result<()> {
        self.inner.update_backup(backup).await
    }

    async fn create_operation(&self, new: &NewOperation, now: i64) -> Result<OperationRecord> {
        let op = self.inner.create_operation(new, now).await?;
        open_operation(&self.sealer, op)
    }
    async fn get_operation(&self, id: &str) -> Result<Option<OperationRecord>> {
        self.inner
            .get_operation(id)
            .await?
            .map(|o| open_operation(&self.sealer, o))
            .transpose()
    }
    async fn list_operations(
        &self,
        filter: &OperationFilter,
        page: &Page,
    ) -> Result<Listed<OperationRecord>> {
        open_listed(self.inner.list_operations(filter, page).await?, |o| {
            open_operation(&self.sealer, o)
        })
    }
    async fn claim(&self, claim: &Claim<'_>) -> Result<Option<OperationRecord>> {
        self.inner
            .claim(claim)
            .await?
            .map(|o| open_operation(&self.sealer, o))
            .transpose()
    }
    async fn renew_lease(&self, id: &str, owner: &str, until: i64) -> Result<LeaseState> {
        self.inner.renew_lease(id, owner, until).await
    }
    async fn expire_all_leases(&self) -> Result<u64> {
        self.inner.expire_all_leases().await
    }
    async fn start_task(&self, id: &str, owner: &str, position: i64, now: i64) -> Result<()> {
        self.inner.start_task(id, owner, position, now).await
    }
    async fn finish_task(
        &self,
        id: &str,
        owner: &str,
        position: i64,
        outcome: &TaskOutcome,
        finish: Option<&OperationOutcome>,
        now: i64,
    ) -> Result<()> {
        let outcome = TaskOutcome {
            status: outcome.status,
            state_patch: outcome
                .state_patch
                .as_ref()
                .map(|p| seal_state_patch(&self.sealer, id, p)),
        };
        self.inner
            .finish_task(id, owner, position, &outcome, finish, now)
            .await
    }
    async fn begin_rollback(
        &self,
        id: &str,
        owner: &str,
        names: &[&str],
        ending: &Value,
    ) -> Result<()> {
        self.inner.begin_rollback(id, owner, names, ending).await
    }
    async fn finish_operation(
        &self,
        id: &str,
        owner: &str,
        outcome: &OperationOutcome,
        now: i64,
    ) -> Result<()> {
        self.inner.finish_operation(id, owner, outcome, now).await
    }
    async fn count_redelivery(&self, id: &str) -> Result<Option<i64>> {
        self.inner.count_redelivery(id).await
    }
    async fn request_cancel(&self, id: &str, now: i64) -> Result<OperationRecord> {
        let op = self.inner.request_cancel(id, now).await?;
        open_operation(&self.sealer, op)
    }
    async fn retry_operation(
        &self,
        id: &str,
        from_start: bool,
        now: i64,
    ) -> Result<OperationRecord> {
        let op = self.inner.retry_operation(id, from_start, now).await?;
        open_operation(&self.sealer, op)
    }
    async fn record_progress(&self, progress: &Progress) -> ProgressMade {
        // Task ends in a batch carry no state; claims answer operations, opened here.
        let mut made = self.inner.record_progress(progress).await;
        made.claims = std::mem::take(&mut made.claims)
            .into_iter()
            .map(|claim| match claim {
                Ok(Some(op)) => open_operation(&self.sealer, op).map(Some),
                other => other,
            })
            .collect();
        made
    }
    async fn append_logs(&self, id: &str, lines: &[NewLogLine]) -> Result<()> {
        self.inner.append_logs(id, lines).await
    }
    async fn read_logs(&self, id: &str, after_seq: i64, limit: u32) -> Result<Vec<LogLine>> {
        self.inner.read_logs(id, after_seq, limit).await
    }
    async fn remove_state_key(&self, id: &str, key: &str) -> Result<()> {
        self.inner.remove_state_key(id, key).await
    }
    async fn scrub(&self) -> Result<()> {
        self.inner.scrub().await
    }

    async fn get_setting(&self, key: &str) -> Result<Option<String>> {
        self.inner.get_setting(key).await
    }
    async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.inner.set_setting(key, value).await
    }
    async fn replace_setting(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool> {
        self.inner.replace_setting(key, expected, value).await
    }

    async fn insert_token(&self, token: &TokenRecord) -> Result<()> {
        self.inner.insert_token(token).await
    }
    async fn token_by_hash(&self, sha256: &str) -> Result<Option<TokenRecord>> {
        self.inner.token_by_hash(sha256).await
    }
}
