//! `environment_deploy`, `environment_update`, `environment_verify` and
//! `environment_delete` on server targets.
//!
//! What each task leaves behind is recorded before it is made (the database in the
//! environment's `resources`, generated passwords in its `secrets`), so a retry reuses it and
//! a delete after a half-failed deploy removes it.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use hefring_backend_server::{CommandSpec, LocalCa};
use hefring_core::environment::{self, DatabaseAccess, EnvironmentFacts, Layout};
use hefring_core::manifest::{Command, DatabaseKind, Manifest, MANIFEST_FILE};
use hefring_core::render::fpm::{self, PhpSettings, PoolConfig};
use hefring_core::render::nginx::{self, SiteConfig, Tls};
use hefring_core::render::Https;
use hefring_store::{EnvironmentRecord, ReleaseRecord, TargetRecord};
use rand::distributions::{Alphanumeric, DistString};
use serde_json::{json, Value};

use super::server::{tool, Server};
use crate::run::{TaskContext, TaskError, TaskOutput, TaskResult};
use crate::time::now_ms;

async fn load_env(t: &TaskContext<'_>) -> Result<EnvironmentRecord, TaskError> {
    t.ctx
        .store
        .get_environment(&t.op.subject_id)
        .await?
        .ok_or_else(|| TaskError::new("the environment no longer exists"))
}

async fn load_target(
    t: &TaskContext<'_>,
    env: &EnvironmentRecord,
) -> Result<TargetRecord, TaskError> {
    load_target_id(t, &env.target_id).await
}

pub(super) async fn load_target_id(
    t: &TaskContext<'_>,
    id: &str,
) -> Result<TargetRecord, TaskError> {
    t.ctx
        .store
        .get_target(id)
        .await?
        .ok_or_else(|| TaskError(format!("target {id} no longer exists")))
}

pub(super) async fn load_release(
    t: &TaskContext<'_>,
    id: &str,
) -> Result<ReleaseRecord, TaskError> {
    t.ctx
        .store
        .get_release(id)
        .await?
        .ok_or_else(|| TaskError(format!("release {id} no longer exists")))
}

fn input_release(t: &TaskContext<'_>) -> Result<String, TaskError> {
    t.op.inputs["release"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| TaskError::new("the operation names no release"))
}

pub(super) fn manifest(t: &TaskContext<'_>) -> Result<Manifest, TaskError> {
    serde_json::from_value(t.state["manifest"].clone()).map_err(|_| {
        TaskError::new("the operation has no manifest recorded (prepare_target did not run)")
    })
}

pub(super) async fn save_env(
    t: &TaskContext<'_>,
    env: &mut EnvironmentRecord,
) -> Result<(), TaskError> {
    env.updated_at = now_ms();
    t.ctx.store.update_environment(env).await?;
    Ok(())
}

/// Everything a task needs: the environment, its target reached through the executor.
pub(super) struct Site<'a> {
    pub(super) env: EnvironmentRecord,
    pub(super) server: Server<'a>,
}

impl<'a> Site<'a> {
    /// The operation's subject, on its target (a migration's tasks run on the target it moves
    /// to, or from: `super::migrate::target_of`).
    pub(super) async fn open(t: &'a TaskContext<'_>) -> Result<Site<'a>, TaskError> {
        let env = load_env(t).await?;
        match super::migrate::target_of(t, &env) {
            Some(target) => {
                let target = load_target_id(t, &target).await?;
                let server = Server::open(t, target).await?;
                Ok(Site { env, server })
            }
            None => Site::on_target(t, env).await,
        }
    }

    /// Another environment than the operation's subject (the source of a clone or sync).
    pub(super) async fn open_other(
        t: &'a TaskContext<'_>,
        id: &str,
    ) -> Result<Site<'a>, TaskError> {
        let env = t
            .ctx
            .store
            .get_environment(id)
            .await?
            .ok_or_else(|| TaskError(format!("environment {id} no longer exists")))?;
        Site::on_target(t, env).await
    }

    async fn on_target(
        t: &'a TaskContext<'_>,
        env: EnvironmentRecord,
    ) -> Result<Site<'a>, TaskError> {
        let target = load_target(t, &env).await?;
        let server = Server::open(t, target).await?;
        Ok(Site { env, server })
    }

    pub(super) fn layout(&self) -> &Layout {
        &self.server.layout
    }

    /// The environment's own Unix user, when it has one (recorded before it was made).
    pub(super) fn own_user(&self) -> Option<&str> {
        self.env.resources["user"]["name"].as_str()
    }

    /// The account the environment's PHP, commands and files belong to: its own user (and
    /// group of the same name); for an environment deployed before isolation, until it is
    /// isolated, the target's web user; nobody in particular where Hefring is not root.
    pub(super) fn account(&self) -> Option<(String, String)> {
        if !self.server.is_root {
            return None;
        }
        match self.own_user() {
            Some(user) => Some((user.to_string(), user.to_string())),
            None => match (
                &self.server.accounts.web_user,
                &self.server.accounts.web_group,
            ) {
                (Some(u), Some(g)) => Some((u.clone(), g.clone())),
                _ => None,
            },
        }
    }

    /// Whether the environment runs as its own user.
    pub(super) fn isolated(&self) -> bool {
        self.server.is_root && self.own_user().is_some()
    }

    /// `user:group` of the environment's account.
    pub(super) fn owner(&self) -> Option<String> {
        self.account().map(|(u, g)| format!("{u}:{g}"))
    }

    /// `user:group` and the group, as script arguments: empty where Hefring is not root.
    pub(super) fn owner_and_group(&self) -> (String, String) {
        match self.account() {
            Some((user, group)) => (format!("{user}:{group}"), group),
            None => (String::new(), String::new()),
        }
    }

    /// Runs a command as the environment's account (when Hefring is root): its project's
    /// commands, and every step that reads or writes what the site can change.
    pub(super) fn as_site_user(&self, mut spec: CommandSpec) -> CommandSpec {
        if let Some((user, _)) = self.account() {
            let mut argv = vec!["runuser".to_string(), "-u".into(), user, "--".into()];
            argv.append(&mut spec.argv);
            spec.argv = argv;
            // Somewhere the site's user may stand (Hefring's own directory is not: tar, for
            // one, refuses to start where it cannot open its working directory).
            if spec.cwd.is_none() {
                spec.cwd = Some("/".into());
            }
        }
        spec
    }

    /// A fixed script run as the environment's account; answers its standard output.
    pub(super) async fn site_sh(
        &self,
        what: &str,
        script: &str,
        args: &[&str],
    ) -> Result<String, TaskError> {
        let spec = self.as_site_user(super::server::script_spec(script, args));
        self.server.output_of(what, &spec).await
    }

    /// The URL prefixes of the manifest's writable paths below its docroot.
    fn writable_locations(manifest: &Manifest) -> Vec<String> {
        manifest
            .writable
            .iter()
            .filter_map(|path| match manifest.docroot.as_str() {
                "." => Some(format!("/{path}")),
                docroot => path
                    .strip_prefix(docroot)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .map(|rest| format!("/{rest}")),
            })
            .collect()
    }

    pub(super) fn id(&self) -> &str {
        &self.env.id
    }

    fn url(&self) -> String {
        let target = &self.server.target;
        environment::url(
            &self.env.domain,
            self.env.https,
            target.http_port,
            target.https_port,
        )
    }

    /// The database the environment's manifest asks for, as its code reaches it.
    pub(super) fn database(&self, manifest: &Manifest) -> Option<DatabaseAccess> {
        let settings = &self.server.target.settings;
        let name = environment::database_name(self.id());
        let password = self.env.secrets.expose()["db_password"]
            .as_str()
            .unwrap_or_default();
        let access = |kind, host: String, port| DatabaseAccess {
            kind,
            host,
            port,
            name: name.clone(),
            user: name.clone(),
            password: password.to_string(),
            path: String::new(),
        };
        match manifest.database {
            DatabaseKind::None => None,
            DatabaseKind::Mariadb => Some(access(
                DatabaseKind::Mariadb,
                settings.mariadb.site_host(),
                settings.mariadb.port,
            )),
            DatabaseKind::Postgresql => Some(access(
                DatabaseKind::Postgresql,
                settings.postgresql.host.clone(),
                settings.postgresql.port,
            )),
            DatabaseKind::Sqlite => Some(DatabaseAccess {
                path: self.layout().sqlite_file(self.id()),
                ..access(DatabaseKind::Sqlite, String::new(), 0)
            }),
        }
    }

    /// The variables of the environment's commands, for a release.
    pub(super) fn variables(
        &self,
        manifest: &Manifest,
        release: &ReleaseRecord,
    ) -> Vec<(String, String)> {
        let url = self.url();
        let files = self.layout().files_dir(self.id());
        let database = self.database(manifest);
        environment::variables(&EnvironmentFacts {
            id: &self.env.id,
            name: &self.env.name,
            release: &release.id,
            commit: &release.commit,
            url: &url,
            domain: &self.env.domain,
            files_dir: &files,
            database: database.as_ref(),
        })
    }

    /// The server blocks for the environment serving `current`, and the preview block serving
    /// `preview`, through which an update checks a release before it switches. Both follow
    /// links, so an update changes links only and never reloads nginx (a reload closes idle
    /// keep-alive connections, which a client may be about to use).
    fn site_config(&self, manifest: &Manifest) -> Result<String, TaskError> {
        self.site_config_with(manifest, self.env.https)
    }

    fn site_config_with(&self, manifest: &Manifest, https: Https) -> Result<String, TaskError> {
        let nginx_instance = self.server.nginx();
        let fpm_instance = self.server.fpm();
        let layout = self.layout();
        let docroot = |base: String| match manifest.docroot.as_str() {
            "." => base,
            sub => format!("{base}/{sub}"),
        };
        let tls = (https != Https::Off).then(|| Tls {
            certificate: layout.tls_certificate(self.id()),
            key: layout.tls_key(self.id()),
        });
        let site = SiteConfig {
            id: self.env.id.clone(),
            domain: self.env.domain.clone(),
            aliases: self.env.aliases.clone(),
            https,
            tls,
            http_port: self.server.target.http_port,
            https_port: self.server.target.https_port,
            docroot: docroot(layout.current_link(self.id())),
            fpm_socket: fpm_instance.socket(self.id()),
            log_dir: nginx_instance.log_dir(),
            acme_dir: nginx_instance.acme_dir(),
            disabled_page: nginx_instance.disabled_page_file(self.id()),
            disabled: self.env.status == "disabled",
            writable_locations: Site::writable_locations(manifest),
            owner_checked_links: self.isolated(),
        };
        let mut text = nginx::server_blocks(&site).map_err(|e| TaskError(e.to_string()))?;
        let preview_site = SiteConfig {
            domain: environment::preview_domain(self.id()),
            aliases: Vec::new(),
            https: Https::Off,
            tls: None,
            docroot: docroot(layout.preview_link(self.id())),
            disabled: false,
            ..site
        };
        text.push_str("\n# The release an update checks before it switches.\n");
        text.push_str(&nginx::server_blocks(&preview_site).map_err(|e| TaskError(e.to_string()))?);
        Ok(text)
    }

    /// Writes the server blocks and reloads nginx; a configuration nginx refuses is taken
    /// back, so the sites it serves keep being served.
    async fn write_server_blocks(&self, manifest: &Manifest) -> Result<(), TaskError> {
        let nginx_instance = self.server.nginx();
        let file = self.server.site_file(self.id());
        let text = self.site_config(manifest)?;
        let before = self.server.read_file(&file).await?;
        self.server
            .write_file(
                &nginx_instance.disabled_page_file(self.id()),
                &nginx::disabled_page(&self.env.domain),
                "644",
                None,
            )
            .await?;
        self.server.write_file(&file, &text, "644", None).await?;
        if let Err(e) = self.server.reload_nginx().await {
            match before {
                Some(old) => self.server.write_file(&file, &old, "644", None).await?,
                None => self.server.remove(&[file]).await?,
            }
            return Err(e);
        }
        Ok(())
    }

    /// Points `current` at a release: a new link renamed over the old one, which is atomic.
    async fn switch_to(&self, release: &str) -> Result<(), TaskError> {
        self.point(&self.layout().current_link(self.id()), release)
            .await
    }

    /// Points a link (`current` or `preview`) at a release, atomically.
    async fn point(&self, link: &str, release: &str) -> Result<(), TaskError> {
        let link = link.to_string();
        let target = format!("releases/{release}");
        self.server
            .sh(
                "switching the current release",
                r#"set -e
cd "$(dirname "$1")"
[ -d "$2" ] || { echo "$2 is not unpacked" >&2; exit 1; }
ln -sfn "$2" "$1.next"
mv -T -f "$1.next" "$1""#,
                &[&link, &target],
            )
            .await?;
        let name = link.rsplit('/').next().unwrap_or_default();
        self.server.log.info(format!("{name} -> {target}"));
        Ok(())
    }

    /// The release `current` points at, if any.
    async fn current_release(&self) -> Result<Option<String>, TaskError> {
        let out = self
            .server
            .sh_output(
                "reading the current release",
                r#"readlink "$1" 2>/dev/null || true"#,
                &[&self.layout().current_link(self.id())],
            )
            .await?;
        Ok(out.trim().strip_prefix("releases/").map(str::to_string))
    }

    /// Sends a request for the health path to the target's nginx with the environment's host
    /// name; 2xx or 3xx (not followed) is healthy. Tries for a few seconds, as a server that
    /// was just reloaded may take a moment.
    async fn check_health(
        &self,
        manifest: &Manifest,
        host: &str,
        https: bool,
    ) -> Result<(), TaskError> {
        self.expect(manifest, host, https, "health", |status| {
            status.is_success() || status.is_redirection()
        })
        .await
    }

    /// Requests the health path until the answer is what `wanted` accepts (a reload takes a
    /// moment to reach every nginx worker), for a few seconds.
    async fn expect(
        &self,
        manifest: &Manifest,
        host: &str,
        https: bool,
        what: &str,
        wanted: impl Fn(reqwest::StatusCode) -> bool,
    ) -> Result<(), TaskError> {
        let target = &self.server.target;
        let address = match hefring_core::target::Host::parse("host", &target.host) {
            Ok(hefring_core::target::Host::Ssh { host, .. }) => host,
            _ => "127.0.0.1".to_string(),
        };
        let port = if https {
            target.https_port
        } else {
            target.http_port
        };
        let ip = tokio::net::lookup_host((address.as_str(), port))
            .await
            .map_err(|e| TaskError(format!("cannot resolve {address}: {e}")))?
            .next()
            .ok_or_else(|| TaskError(format!("cannot resolve {address}")))?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .resolve(host, ip)
            // The check is of the site, not of its certificate (which may come from a CA this
            // machine does not trust).
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| TaskError(format!("cannot build an HTTP client: {e}")))?;
        let scheme = if https { "https" } else { "http" };
        let url = format!("{scheme}://{host}:{port}{}", manifest.health);
        let mut last = String::new();
        for attempt in 0..20 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            match client.get(&url).send().await {
                Ok(response) if wanted(response.status()) => {
                    self.server
                        .log
                        .info(format!("{what}: GET {url} answered {}", response.status()));
                    return Ok(());
                }
                Ok(response) => last = format!("answered {}", response.status()),
                Err(e) => last = format!("failed: {e}"),
            }
        }
        Err(TaskError(format!("{what} check: GET {url} {last}")))
    }
}

/// Reads `.hefring.yml` out of a release artifact on this machine.
fn manifest_from_artifact(path: &Path) -> Result<Manifest, TaskError> {
    let file = std::fs::File::open(path)
        .map_err(|e| TaskError(format!("cannot open the artifact {}: {e}", path.display())))?;
    let decoder = zstd::Decoder::new(file).map_err(|e| TaskError(format!("artifact: {e}")))?;
    let mut archive = tar::Archive::new(decoder);
    let entries = archive
        .entries()
        .map_err(|e| TaskError(format!("artifact: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| TaskError(format!("artifact: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| TaskError(format!("artifact: {e}")))?
            .to_string_lossy()
            .into_owned();
        if path.trim_start_matches("./") == MANIFEST_FILE {
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .map_err(|e| TaskError(format!("artifact: {e}")))?;
            return Manifest::parse(&text).map_err(|e| TaskError(e.to_string()));
        }
    }
    Err(TaskError(format!("the release has no {MANIFEST_FILE}")))
}

/// The manifest of a release, read from its artifact on this machine (off the async runtime).
async fn release_manifest(
    t: &TaskContext<'_>,
    release: &ReleaseRecord,
) -> Result<Manifest, TaskError> {
    let sha = release
        .artifact_sha256
        .as_deref()
        .ok_or_else(|| TaskError(format!("release {} has no artifact", release.id)))?;
    let path = t.ctx.local_artifact(sha).await?;
    tokio::task::spawn_blocking(move || manifest_from_artifact(&path))
        .await
        .map_err(|e| TaskError(format!("reading the manifest: {e}")))?
}

/// The release the environment serves and its manifest.
pub(super) async fn served_release(
    t: &TaskContext<'_>,
    env: &EnvironmentRecord,
) -> Result<(ReleaseRecord, Manifest), TaskError> {
    let id = env
        .release_id
        .as_deref()
        .ok_or_else(|| TaskError::new("the environment is not deployed"))?;
    let release = load_release(t, id).await?;
    let manifest = release_manifest(t, &release).await?;
    Ok((release, manifest))
}

// ---------------------------------------------------------------------------------------
// Deploy and update

pub async fn prepare_target(t: &TaskContext<'_>) -> TaskResult {
    let mut site = Site::open(t).await?;
    let release = load_release(t, &input_release(t)?).await?;
    let sha = release
        .artifact_sha256
        .clone()
        .ok_or_else(|| TaskError(format!("release {} has no artifact", release.id)))?;
    let local_artifact = t.ctx.local_artifact(&sha).await?;
    let manifest = release_manifest(t, &release).await?;
    let updating = matches!(
        t.op.kind,
        hefring_core::operation::OperationKind::EnvironmentUpdate
            | hefring_core::operation::OperationKind::EnvironmentMigrate
    );
    let previous = if updating {
        site.env.release_id.clone()
    } else {
        None
    };
    site.env.status = if updating { "updating" } else { "deploying" }.into();
    save_env(t, &mut site.env).await?;

    let started = site.server.ensure_servers().await?;
    for server in started {
        t.log.info(format!("{server} was not running: started it"));
    }
    let remote = site.layout().artifact(&sha);
    let present = site
        .server
        .sh_output(
            "looking for the artifact",
            r#"[ -f "$1" ] && echo yes || echo no"#,
            &[&remote],
        )
        .await?;
    if present.trim() != "yes" {
        t.log.info(format!(
            "copying the release artifact ({} bytes)",
            release.artifact_size.unwrap_or(0)
        ));
        site.server.exec.upload(&local_artifact, &remote).await?;
    }
    ensure_account(t, &mut site).await?;
    if let Some(rules) = &t.ctx.target_network_rules {
        site.server.apply_network_rules(rules).await?;
    }
    if let Some(user) = &site.server.accounts.web_user {
        // Everything the sites read lies below the root: nginx's workers must reach it.
        let code = site
            .server
            .run(&CommandSpec::new([
                "runuser",
                "-u",
                user,
                "--",
                "test",
                "-x",
                &site.layout().environments_dir(),
            ]))
            .await?;
        if code != Some(0) {
            return Err(TaskError(format!(
                "the web user {user} cannot reach {}: every directory above it must be searchable (chmod o+x)",
                site.layout().environments_dir()
            )));
        }
    }
    let mut patch = json!({
        "manifest": manifest,
        "release_id": release.id,
        "commit": release.commit,
    });
    if updating {
        patch["previous_release"] = json!(previous);
    }
    Ok(TaskOutput::with_state(patch))
}

/// Gives a new environment its own Unix user (recorded on the environment before it is made,
/// so a retry makes the same one and a delete removes it), or makes sure the user it has
/// exists on this target (a migration's new target). An update leaves it alone: moving an
/// environment deployed before isolation to its own user is the `environment_isolate`
/// operation's work. Where Hefring is not root, the target's `isolation` setting decides
/// whether the deploy may go on with every site as Hefring's own user.
async fn ensure_account(t: &TaskContext<'_>, site: &mut Site<'_>) -> Result<(), TaskError> {
    use hefring_core::operation::OperationKind as K;
    use hefring_core::target::Isolation;
    if !site.server.is_root {
        return match site.server.target.settings.isolation {
            Isolation::Required => Err(TaskError(format!(
                "Hefring is not root on {} ({}), so it cannot give each environment its own user: \
                 isolation is impossible there. Run Hefring as root, or set the target's isolation \
                 to optional to run every site as Hefring's own user (never for hosting)",
                site.server.target.name, site.server.target.host
            ))),
            Isolation::Optional => {
                t.log.info(
                    "Hefring is not root here: the site runs as Hefring's own user, not isolated (isolation: optional)",
                );
                Ok(())
            }
        };
    }
    let new_environment = matches!(t.op.kind, K::EnvironmentDeploy | K::EnvironmentClone);
    // Test builds can deploy as Hefring did before isolation, to prove the upgrade.
    #[cfg(feature = "fault-injection")]
    if std::env::var_os("HEFRING_FAULT_SHARED_WEB_USER").is_some() {
        return Ok(());
    }
    if site.own_user().is_none() {
        if !new_environment {
            return Ok(());
        }
        let name = hefring_core::isolation::environment_user(site.id());
        site.env.resources["user"] = json!({ "name": name });
        save_env(t, &mut site.env).await?;
    } else if t.op.kind == K::EnvironmentUpdate {
        return Ok(());
    }
    let name = site.own_user().unwrap_or_default().to_string();
    let home = site.layout().tmp_dir(site.id());
    let uid = site.server.ensure_user(&name, &home).await?;
    t.log.info(format!(
        "the environment runs as its own user {name} (uid {uid})"
    ));
    Ok(())
}

/// `environment_isolate`, first step: the environment gets its own user (recorded before it
/// is made); the served release's manifest goes into the operation's state for the steps
/// that rewrite its pool and server blocks.
pub async fn create_user(t: &TaskContext<'_>) -> TaskResult {
    let mut site = Site::open(t).await?;
    if !site.server.is_root {
        return Err(TaskError(format!(
            "Hefring is not root on {}: the environment cannot have its own user",
            site.server.target.name
        )));
    }
    let (release, manifest) = served_release(t, &site.env).await?;
    if site.own_user().is_none() {
        let name = hefring_core::isolation::environment_user(site.id());
        site.env.resources["user"] = json!({ "name": name });
        save_env(t, &mut site.env).await?;
    }
    let name = site.own_user().unwrap_or_default().to_string();
    let uid = site
        .server
        .ensure_user(&name, &site.layout().tmp_dir(site.id()))
        .await?;
    t.log
        .info(format!("the environment's own user: {name} (uid {uid})"));
    Ok(TaskOutput::with_state(json!({
        "manifest": manifest,
        "release_id": release.id,
    })))
}

/// Hands what an environment deployed before isolation made over to its own user: the
/// environment's and releases' directories become root's with the environment's group, its
/// files, database and temporary directories (and the links to them) its user's. `chown -hR`
/// changes links themselves and never follows one into another tree.
const HAND_OVER: &str = r#"set -e
env=$1; user=$2; shift 2
for d in "$env" "$env/releases"; do [ -L "$d" ] && { echo "$d is a link" >&2; exit 1; }; chown -h "root:$user" "$d"; chmod 750 "$d"; done
for d in "$env/releases"/*; do
  [ -d "$d" ] && [ ! -L "$d" ] || continue
  chgrp -hR "$user" "$d"; chmod -R o-rwx,go-w "$d"
  find "$d" -type l -lname "$env/files/*" -exec chown -h "$user:$user" {} +
done
# A file hard-linked from elsewhere (every site ran as one user, so one could link another's
# files into its own) would be handed over with the rest: refused, named, nothing changed.
for d in files database; do
  [ -d "$env/$d" ] || continue
  shared=$(find "$env/$d" -xdev -type f -links +1 -print | head -n 5)
  if [ -n "$shared" ]; then
    echo "files with other hard links (shared with another file, perhaps another site's); remove them and retry:" >&2
    echo "$shared" >&2
    exit 1
  fi
done
for d in files database tmp; do
  [ -L "$env/$d" ] && { echo "$env/$d is a link" >&2; exit 1; }
  mkdir -p "$env/$d"
  chown -hR "$user:$user" "$env/$d"
done
chmod 750 "$env/files"; chmod 700 "$env/database" "$env/tmp"
if [ -d "$env/dumps" ]; then chown -h root:root "$env/dumps"; chmod 700 "$env/dumps"; fi
"#;

pub async fn hand_over_files(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let user = site
        .own_user()
        .ok_or_else(|| TaskError::new("the environment has no user yet (create_user)"))?
        .to_string();
    site.server
        .mkdirs(
            std::slice::from_ref(&site.layout().environments_dir()),
            "711",
        )
        .await?;
    site.server
        .sh(
            "handing the files to the environment's user",
            HAND_OVER,
            &[&site.layout().environment_dir(site.id()), &user],
        )
        .await?;
    t.log
        .info(format!("files, database and releases now belong to {user}"));
    Ok(TaskOutput::done())
}

pub(super) fn mariadb_admin(site: &Site<'_>) -> CommandSpec {
    let admin = &site.server.target.settings.mariadb;
    let mut argv = vec![tool(&site.server.target, "mariadb")];
    match (&admin.socket, &admin.host) {
        (Some(socket), _) => {
            argv.extend(["--protocol=socket".into(), format!("--socket={socket}")])
        }
        (None, Some(host)) => {
            argv.extend([format!("--host={host}"), format!("--port={}", admin.port)])
        }
        (None, None) => {}
    }
    argv.extend([format!("--user={}", admin.user), "--batch".into()]);
    let mut spec = CommandSpec::new(argv);
    if let Some(password) = &admin.password {
        spec = spec.env("MYSQL_PWD", password.expose());
    }
    spec
}

pub(super) fn psql_admin(site: &Site<'_>) -> CommandSpec {
    psql_admin_on(site, "postgres")
}

/// `psql` as the target's PostgreSQL admin, connected to `database`.
pub(super) fn psql_admin_on(site: &Site<'_>, database: &str) -> CommandSpec {
    let admin = &site.server.target.settings.postgresql;
    let mut spec = CommandSpec::new([
        tool(&site.server.target, "psql"),
        "-X".into(),
        "-q".into(),
        "-v".into(),
        "ON_ERROR_STOP=1".into(),
        format!("--host={}", admin.host),
        format!("--port={}", admin.port),
        format!("--username={}", admin.user),
        format!("--dbname={database}"),
    ]);
    if let Some(password) = &admin.password {
        spec = spec.env("PGPASSWORD", password.expose());
    }
    spec
}

/// The command that dumps a MariaDB or PostgreSQL database into `path`, consistently
/// (`--single-transaction`; pg_dump's snapshot), as the target's database admin. The dump
/// loads back with [`load_command`]: objects are dropped first (`--clean`) and owned by
/// whoever loads them.
pub(super) fn dump_command(site: &Site<'_>, access: &DatabaseAccess, path: &str) -> CommandSpec {
    let target = &site.server.target;
    match access.kind {
        DatabaseKind::Postgresql => {
            let admin = &target.settings.postgresql;
            let mut spec = CommandSpec::new([
                tool(target, "pg_dump"),
                format!("--host={}", admin.host),
                format!("--port={}", admin.port),
                format!("--username={}", admin.user),
                "--clean".into(),
                "--if-exists".into(),
                "--no-owner".into(),
                "--no-privileges".into(),
                format!("--file={path}"),
                access.name.clone(),
            ]);
            if let Some(password) = &admin.password {
                spec = spec.env("PGPASSWORD", password.expose());
            }
            spec
        }
        _ => {
            let mut spec = mariadb_admin(site);
            spec.argv[0] = tool(target, "mysqldump");
            spec.argv.retain(|a| a != "--batch");
            spec.argv.extend([
                "--single-transaction".into(),
                "--quick".into(),
                "--routines".into(),
                "--triggers".into(),
                "--events".into(),
                format!("--result-file={path}"),
                access.name.clone(),
            ]);
            spec
        }
    }
}

/// Who opens a dump being loaded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum DumpIn {
    /// A safety dump in root's directory, readable by root alone: root opens it and hands it
    /// to the loader on its standard input.
    RootsFile,
    /// A dump the site's user unpacked into its own directory: the site's user opens it (root
    /// never reads through a path the site controls).
    SitesFile,
}

/// The command that loads a dump made by [`dump_command`] into the environment's database,
/// as the environment's own database user and Unix user: a dump holds what the site put in
/// its database, so it runs with the site's rights, never the admin's (no `GRANT`, no other
/// database, no `\!` shell escape as root). It owns what the dump creates, as it owned what
/// was dumped.
pub(super) fn load_command(
    site: &Site<'_>,
    access: &DatabaseAccess,
    dump: &str,
    opened_by: DumpIn,
) -> CommandSpec {
    let target = &site.server.target;
    let client = match access.kind {
        DatabaseKind::Postgresql => CommandSpec::new([
            tool(target, "psql"),
            "-X".into(),
            "-q".into(),
            "-v".into(),
            "ON_ERROR_STOP=1".into(),
            format!("--host={}", access.host),
            format!("--port={}", access.port),
            format!("--username={}", access.user),
            format!("--dbname={}", access.name),
        ])
        .env("PGPASSWORD", &access.password),
        _ => {
            let admin = &target.settings.mariadb;
            let mut argv = vec![tool(target, "mariadb")];
            match (&admin.socket, &admin.host) {
                (Some(socket), _) => {
                    argv.extend(["--protocol=socket".into(), format!("--socket={socket}")])
                }
                (None, Some(host)) => {
                    argv.extend([format!("--host={host}"), format!("--port={}", admin.port)])
                }
                (None, None) => {}
            }
            argv.extend([
                format!("--user={}", access.user),
                "--batch".into(),
                access.name.clone(),
            ]);
            CommandSpec::new(argv).env("MYSQL_PWD", &access.password)
        }
    };
    // The dump is the loader's input, streamed from the file by a shell of whoever opens it.
    let from_file = |mut inner: CommandSpec| {
        let mut argv = vec![
            "sh".to_string(),
            "-c".into(),
            r#"f=$1; shift; exec "$@" < "$f""#.into(),
            "sh".into(),
            dump.to_string(),
        ];
        argv.append(&mut inner.argv);
        inner.argv = argv;
        inner
    };
    match opened_by {
        DumpIn::RootsFile => from_file(site.as_site_user(client)),
        DumpIn::SitesFile => site.as_site_user(from_file(client)),
    }
}

pub(super) async fn run_sql(
    site: &Site<'_>,
    spec: CommandSpec,
    sql: String,
    what: &str,
) -> Result<(), TaskError> {
    let code = site.server.run(&spec.stdin(sql)).await?;
    match code {
        Some(0) => Ok(()),
        other => Err(TaskError(format!("{what} failed (exit status {other:?})"))),
    }
}

pub async fn create_database(t: &TaskContext<'_>) -> TaskResult {
    let mut site = Site::open(t).await?;
    let manifest = manifest(t)?;
    if manifest.database == DatabaseKind::None {
        t.log.info("the manifest asks for no database");
        return Ok(TaskOutput {
            skipped: true,
            ..Default::default()
        });
    }
    // Recorded before anything is created: a retry reuses the password, and a delete drops
    // what a half-finished attempt made.
    if site.env.secrets.expose()["db_password"].as_str().is_none() {
        site.env.secrets.expose_mut()["db_password"] =
            json!(Alphanumeric.sample_string(&mut rand::thread_rng(), 32));
    }
    site.env.resources["database"] = json!(manifest.database);
    save_env(t, &mut site.env).await?;
    let access = site.database(&manifest).expect("a database was asked for");
    match manifest.database {
        DatabaseKind::Mariadb => {
            let remote = site.server.target.settings.mariadb.socket.is_none()
                && site.server.target.settings.mariadb.host.is_some();
            let host = if remote { "%" } else { "localhost" };
            let (name, password) = (&access.name, &access.password);
            let sql = format!(
                "CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;\n\
                 CREATE USER IF NOT EXISTS '{name}'@'{host}' IDENTIFIED BY '{password}';\n\
                 ALTER USER '{name}'@'{host}' IDENTIFIED BY '{password}';\n\
                 GRANT ALL PRIVILEGES ON `{name}`.* TO '{name}'@'{host}';\n"
            );
            run_sql(
                &site,
                mariadb_admin(&site),
                sql,
                "creating the MariaDB database",
            )
            .await?;
            t.log
                .info(format!("MariaDB database and user {name} ready"));
        }
        DatabaseKind::Postgresql => {
            let (name, password) = (&access.name, &access.password);
            let sql = format!(
                "SELECT 'CREATE ROLE {name} LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}')\\gexec\n\
                 ALTER ROLE {name} WITH LOGIN PASSWORD '{password}';\n\
                 SELECT 'CREATE DATABASE {name} OWNER {name} ENCODING ''UTF8'' TEMPLATE template0' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{name}')\\gexec\n\
                 REVOKE ALL ON DATABASE {name} FROM PUBLIC;\n"
            );
            run_sql(
                &site,
                psql_admin(&site),
                sql,
                "creating the PostgreSQL database",
            )
            .await?;
            t.log
                .info(format!("PostgreSQL database and role {name} ready"));
        }
        DatabaseKind::Sqlite => {
            let dir = site.layout().sqlite_dir(site.id());
            site.environment_dirs().await?;
            // Not even nginx's user reads it (it is in every environment's group).
            site.site_owned_dir(&dir, "700").await?;
            t.log.info(format!("SQLite database at {}", access.path));
        }
        DatabaseKind::None => unreachable!("handled above"),
    }
    Ok(TaskOutput::done())
}

pub async fn create_files_directory(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let layout = site.layout();
    let files = layout.files_dir(site.id());
    site.environment_dirs().await?;
    site.site_owned_dir(&files, "750").await?;
    site.site_owned_dir(&layout.tmp_dir(site.id()), "700")
        .await?;
    t.log.info(format!("persistent files in {files}"));
    Ok(TaskOutput::done())
}

impl Site<'_> {
    /// The environment's directory and its releases directory: root's, so that the site can
    /// change nothing in them (no link planted where root later writes), readable by the
    /// environment's group (its user and nginx's workers) and nobody else.
    pub(super) async fn environment_dirs(&self) -> Result<(), TaskError> {
        let layout = self.layout();
        self.server
            .mkdirs(std::slice::from_ref(&layout.environments_dir()), "711")
            .await?;
        let dirs = [
            layout.environment_dir(self.id()),
            layout.releases_dir(self.id()),
        ];
        match self.account() {
            Some((_, group)) => {
                let mut args = vec![group.as_str()];
                args.extend(dirs.iter().map(String::as_str));
                self.server
                    .sh(
                        "creating the environment's directories",
                        r#"set -e; group=$1; shift; for d in "$@"; do mkdir -p "$d"; chown -h "root:$group" "$d"; chmod 750 "$d"; done"#,
                        &args,
                    )
                    .await
            }
            None => self.server.mkdirs(&dirs, "755").await,
        }
    }

    /// A directory of the environment that its user owns and writes (files, database,
    /// temporary files), directly inside the environment's directory, which root owns: the
    /// site can fill it, never replace it by a link.
    pub(super) async fn site_owned_dir(&self, dir: &str, mode: &str) -> Result<(), TaskError> {
        self.server
            .sh(
                "creating a directory of the site",
                r#"set -e; dir=$1; mode=$2; owner=$3
[ -L "$dir" ] && { echo "$dir is a link" >&2; exit 1; }
mkdir -p "$dir"
if [ -n "$owner" ]; then chown -h "$owner" "$dir"; fi
chmod "$mode" "$dir""#,
                &[dir, mode, &self.owner().unwrap_or_default()],
            )
            .await
    }
}

/// Unpacks into `RELEASE.part` as root (the archive was checked: only files, directories and
/// links that stay inside, permission bits only), in a directory root owns and the site's
/// group may only read; then links every writable path into the persistent directory. The
/// first time, a writable path is seeded from the release by the environment's own user, who
/// owns the persistent directory (root never writes there: a link the site planted would
/// redirect its writes). Then the release is renamed into place.
const UNPACK: &str = r#"set -e
artifact=$1; release=$2; files=$3; user=$4; group=$5; docroot=$6; shift 6
if [ -d "$release" ]; then echo "already unpacked"; exit 0; fi
rm -rf "$release.part"
mkdir -m 700 "$release.part"
zstd -q -d -c "$artifact" | tar -x --no-same-owner --no-same-permissions -f - -C "$release.part"
# Checked on the control plane already; checked again as unpacked, before root acts on them:
# the docroot and every writable path are reached through directories of the release only.
real=$(realpath -- "$release.part")
for path in "$docroot" "$@"; do
  want="$real/$path"; [ "$path" = . ] && want=$real
  if [ "$(realpath -m -- "$release.part/$path")" != "$want" ]; then
    echo "$path passes through a link in the release" >&2
    rm -rf "$release.part"
    exit 1
  fi
done
# Data, never privileges: no setuid, setgid or sticky bit, nothing writable but by root.
chmod -R a-st,go-w "$release.part"
if [ -n "$group" ]; then chgrp -hR "$group" "$release.part"; chmod -R o-rwx "$release.part"; fi
chmod 750 "$release.part"
for path in "$@"; do
  src="$release.part/$path"
  seed='set -e; files=$1; path=$2; src=$3
if [ -e "$files/$path" ] || [ -L "$files/$path" ]; then exit 0; fi
mkdir -p "$(dirname "$files/$path")"
if [ -e "$src" ]; then cp -a "$src" "$files/$path"; else mkdir -p "$files/$path"; fi'
  if [ -n "$user" ]; then
    runuser -u "$user" -- sh -c "$seed" sh "$files" "$path" "$src"
  else
    sh -c "$seed" sh "$files" "$path" "$src"
  fi
  rm -rf "$src"
  mkdir -p "$(dirname "$src")"
  ln -s "$files/$path" "$src"
  # Owned like what it points to, so that nginx follows it (disable_symlinks if_not_owner).
  if [ -n "$user" ]; then chown -h "$user:$group" "$src"; fi
done
if [ -z "$group" ]; then chmod 755 "$release.part"; fi
mv "$release.part" "$release"
echo "unpacked"
"#;

/// Reads the entries of a release artifact on this machine and checks them against the trust
/// rules ([`hefring_core::archive::check_release`]), before anything is unpacked on a target:
/// artifacts built before these rules are checked the same way.
fn check_artifact(path: &Path, manifest: &Manifest) -> Result<(), TaskError> {
    let file = std::fs::File::open(path)
        .map_err(|e| TaskError(format!("cannot open the artifact {}: {e}", path.display())))?;
    let decoder = zstd::Decoder::new(file).map_err(|e| TaskError(format!("artifact: {e}")))?;
    let entries = archive_entries(decoder)?;
    hefring_core::archive::check_release(&entries, &manifest.docroot, &manifest.writable)
        .map_err(|e| TaskError(format!("the release is refused: {e}")))
}

/// The entries of a tar stream, as [`hefring_core::archive`] checks them, read header by
/// header the way GNU tar reads them: a GNU long name or long link (`L`, `K`) names the next
/// entry, and every extension whose reading differs between tar implementations (pax headers,
/// which GNU tar applies last-wins and the `tar` crate first-wins; sparse files; volume
/// labels) is refused, so that what is checked is exactly what `tar -x` will make.
pub(super) fn archive_entries(
    reader: impl Read,
) -> Result<Vec<hefring_core::archive::Entry>, TaskError> {
    use hefring_core::archive::{Entry, EntryKind};
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    let bad = |e: std::io::Error| TaskError(format!("the archive cannot be read: {e}"));
    let refused = |what: &str| TaskError(format!("the archive is refused: it holds {what}"));
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    for entry in archive.entries().map_err(bad)?.raw(true) {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        // A long name's data ends with NUL padding, as GNU tar writes it.
        let data = |entry: &mut tar::Entry<'_, _>| -> Result<Vec<u8>, TaskError> {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(bad)?;
            while bytes.last() == Some(&0) {
                bytes.pop();
            }
            Ok(bytes)
        };
        match kind {
            tar::EntryType::GNULongName => {
                long_name = Some(data(&mut entry)?);
                continue;
            }
            tar::EntryType::GNULongLink => {
                long_link = Some(data(&mut entry)?);
                continue;
            }
            tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => {
                return Err(refused("pax extended headers"))
            }
            tar::EntryType::GNUSparse => return Err(refused("a sparse file")),
            _ => {}
        }
        let header = entry.header();
        let path = match long_name.take() {
            Some(name) => name,
            None => header.path_bytes().into_owned(),
        };
        let path = String::from_utf8_lossy(&path).into_owned();
        let link = match long_link.take() {
            Some(link) => Some(link),
            None => header.link_name_bytes().map(|b| b.into_owned()),
        };
        let kind = match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Directory,
            tar::EntryType::Symlink => EntryKind::Symlink(
                link.map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
            ),
            tar::EntryType::Link => EntryKind::HardLink,
            tar::EntryType::Char => EntryKind::Other("character device".into()),
            tar::EntryType::Block => EntryKind::Other("block device".into()),
            tar::EntryType::Fifo => EntryKind::Other("fifo".into()),
            other => EntryKind::Other(format!("{other:?} entry")),
        };
        let mode = header.mode().map_err(bad)?;
        out.push(Entry { path, kind, mode });
    }
    if long_name.is_some() || long_link.is_some() {
        return Err(refused("a long name that names no entry"));
    }
    Ok(out)
}

pub async fn unpack_release(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let manifest = manifest(t)?;
    let release = load_release(t, &input_release(t)?).await?;
    let layout = site.layout();
    let sha = release.artifact_sha256.clone().unwrap_or_default();
    let dir = layout.release_dir(site.id(), &release.id);
    let local_artifact = t.ctx.local_artifact(&sha).await?;
    // Checked once per artifact (its manifest is inside it, so the verdict cannot change):
    // the mark lives beside it in the data directory, which only Hefring writes.
    let checked_mark = local_artifact.with_extension("checked");
    if !checked_mark.exists() {
        let manifest = manifest.clone();
        let artifact = local_artifact.clone();
        tokio::task::spawn_blocking(move || check_artifact(&artifact, &manifest))
            .await
            .map_err(|e| TaskError(format!("checking the artifact: {e}")))??;
        tokio::fs::write(&checked_mark, b"").await?;
    }
    site.environment_dirs().await?;
    let artifact = layout.artifact(&sha);
    let files = layout.files_dir(site.id());
    let (user, group) = site.account().unwrap_or_default();
    let mut args: Vec<&str> = vec![&artifact, &dir, &files, &user, &group, &manifest.docroot];
    args.extend(manifest.writable.iter().map(String::as_str));
    site.server
        .sh("unpacking the release", UNPACK, &args)
        .await?;
    t.log.info(format!("release {} in {dir}", release.id));
    Ok(TaskOutput::done())
}

pub async fn obtain_certificate(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    if site.env.https == Https::Off {
        t.log.info("https is off");
        return Ok(TaskOutput {
            skipped: true,
            ..Default::default()
        });
    }
    let names = environment::host_names(&site.env.domain, &site.env.aliases);
    let layout = site.layout();
    let (chain_pem, key_pem, issuer) = match &t.ctx.acme {
        Some(config) => {
            let manifest = manifest(t).ok();
            let issued =
                acme_certificate(&site, manifest.as_ref(), config, &names, &t.ctx.data_dir).await?;
            (issued.chain_pem, issued.key_pem, config.directory.clone())
        }
        None => {
            let issued = LocalCa::new(&t.ctx.data_dir)
                .issue(&names)
                .await
                .map_err(|e| TaskError(e.to_string()))?;
            (
                issued.chain_pem,
                issued.key_pem,
                "the local CA (GET /api/v1/ca.pem exports its root)".to_string(),
            )
        }
    };
    site.server
        .mkdirs(
            &[format!("{}/tls", layout.root), layout.tls_dir(site.id())],
            "700",
        )
        .await?;
    site.server
        .write_file(&layout.tls_key(site.id()), &key_pem, "600", None)
        .await?;
    site.server
        .write_file(&layout.tls_certificate(site.id()), &chain_pem, "644", None)
        .await?;
    let not_after = certificate_end(&chain_pem).await?;
    t.log.info(format!(
        "certificate for {} from {issuer}, valid until {}",
        names.join(", "),
        environment::format_ms(not_after)
    ));
    // What renewal looks at: when it ends and which names it covers.
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut site = site;
    site.env.resources["certificate"] = json!({ "not_after": not_after, "names": names });
    save_env(t, &mut site.env).await?;
    Ok(TaskOutput::done())
}

/// When the first certificate of a PEM chain expires, in milliseconds since the epoch.
async fn certificate_end(chain_pem: &str) -> Result<i64, TaskError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-dateopt", "iso_8601"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| TaskError(format!("openssl: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(chain_pem.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    // notAfter=2027-02-23 20:30:42Z
    text.trim()
        .strip_prefix("notAfter=")
        .and_then(environment::parse_iso_ms)
        .ok_or_else(|| {
            TaskError(format!(
                "cannot read the certificate's end: {}",
                text.trim()
            ))
        })
}

/// Disables (every path answers 503 with the "site disabled" page) or enables the site by
/// rewriting its server blocks; the release, database and files are untouched.
pub async fn set_enabled(t: &TaskContext<'_>, enabled: bool) -> TaskResult {
    let mut site = Site::open(t).await?;
    let (_, manifest) = served_release(t, &site.env).await?;
    let before = site.env.status.clone();
    site.env.status = if enabled { "active" } else { "disabled" }.into();
    site.write_server_blocks(&manifest).await?;
    let https = site.env.https == Https::Required;
    let domain = site.env.domain.clone();
    let served = if enabled {
        site.check_health(&manifest, &domain, https).await
    } else {
        site.expect(&manifest, &domain, https, "disabled", |status| {
            status == reqwest::StatusCode::SERVICE_UNAVAILABLE
        })
        .await
    };
    if let Err(e) = served {
        // Back as it was: the site serves what it served before.
        site.env.status = before;
        let _ = site.write_server_blocks(&manifest).await;
        return Err(e);
    }
    save_env(t, &mut site.env).await?;
    t.log.info(if enabled {
        "the site serves again"
    } else {
        "the site answers every path with the disabled page (503)"
    });
    Ok(TaskOutput::done())
}

/// Runs the manifest's `login` command in the release being served and keeps the one-time
/// URL it printed (its last line that is a URL or an absolute path, made absolute with the
/// site's URL) in the operation's state, where the API reads it: never in the log or the
/// operation's result, as it logs in whoever holds it.
pub async fn run_login_command(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    if !matches!(site.env.status.as_str(), "active" | "disabled") {
        return Err(TaskError(format!("the environment is {}", site.env.status)));
    }
    let (release, manifest) = served_release(t, &site.env).await?;
    let Some(login) = &manifest.login else {
        return Err(TaskError(format!(
            "the release's {MANIFEST_FILE} has no login command"
        )));
    };
    let spec = site.as_site_user(
        CommandSpec::new(login.argv())
            .cwd(site.layout().release_dir(site.id(), &release.id))
            .envs(site.variables(&manifest, &release)),
    );
    t.log.info(format!("$ {}", login.display()));
    // Its output is the link itself: captured, not logged (errors still are).
    let (code, out) = crate::run::run_captured(site.server.exec.as_ref(), &spec, t.log).await?;
    crate::run::require_success(code, "the login command")?;
    let base = site.url();
    let url = out
        .lines()
        .rev()
        .map(str::trim)
        .find_map(|line| {
            if line.starts_with("http://") || line.starts_with("https://") {
                Some(line.to_string())
            } else if line.starts_with('/') {
                Some(format!("{}{line}", base.trim_end_matches('/')))
            } else {
                None
            }
        })
        .ok_or_else(|| TaskError::new("the login command printed no URL"))?;
    t.log
        .info("the login command printed a one-time URL (not logged)");
    Ok(TaskOutput::with_state(json!({ "login_url": url })))
}

pub async fn reload_nginx(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    site.server.reload_nginx().await?;
    Ok(TaskOutput::done())
}

/// Orders a certificate over ACME; the target's nginx answers the HTTP-01 challenges from
/// its ACME directory (every server block, and the catch-all for names not served yet).
async fn acme_certificate(
    site: &Site<'_>,
    manifest: Option<&Manifest>,
    config: &crate::acme::AcmeConfig,
    names: &[&str],
    data_dir: &Path,
) -> Result<crate::acme::Certificate, TaskError> {
    let mut client = crate::acme::AcmeClient::connect(config, data_dir)
        .await
        .map_err(|e| TaskError(e.to_string()))?;
    // A site served for the first time needs its HTTP block before the ACME server can
    // reach it (a system nginx has no catch-all of Hefring's answering challenges).
    let file = site.server.site_file(site.id());
    if site.server.read_file(&file).await?.is_none() {
        if let Some(manifest) = manifest {
            let text = site.site_config_with(manifest, Https::Off)?;
            site.server.write_file(&file, &text, "644", None).await?;
            site.server.reload_nginx().await?;
        }
    }
    let acme_dir = site.server.nginx().acme_dir();
    let published = std::sync::Mutex::new(Vec::new());
    let result = client
        .issue(names, |token, key_authorization| {
            let path = format!("{acme_dir}/{token}");
            published.lock().unwrap().push(path.clone());
            let server = &site.server;
            async move {
                server
                    .write_file(&path, &key_authorization, "644", None)
                    .await
                    .map_err(|e| crate::acme::AcmeError(e.to_string()))
            }
        })
        .await;
    let published = published.into_inner().unwrap();
    if !published.is_empty() {
        site.server.remove(&published).await?;
    }
    result.map_err(|e| TaskError(e.to_string()))
}

pub async fn write_pool(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let manifest = manifest(t)?;
    // A deploy names its release; an isolation rewrites the served one's pool.
    let release = match t.state["release_id"].as_str() {
        Some(id) if t.op.inputs["release"].is_null() => id.to_string(),
        _ => input_release(t)?,
    };
    let release = load_release(t, &release).await?;
    let fpm_instance = site.server.fpm();
    // The pool carries the variables that stay the same from release to release, so an update
    // never has to restart PHP; HEFRING_RELEASE and HEFRING_COMMIT reach the commands only.
    let env: Vec<(String, String)> = site
        .variables(&manifest, &release)
        .into_iter()
        .filter(|(name, _)| name != "HEFRING_RELEASE" && name != "HEFRING_COMMIT")
        .collect();
    let account = site.account();
    let layout = site.layout();
    // Its own user reaches its own directories only; shared read-only libraries besides.
    let php = site.isolated().then(|| {
        PhpSettings::defaults(
            vec![
                format!("{}/", layout.releases_dir(site.id())),
                format!("{}/", layout.files_dir(site.id())),
                format!("{}/", layout.sqlite_dir(site.id())),
                format!("{}/", layout.tmp_dir(site.id())),
                "/usr/share/php/".to_string(),
            ],
            layout.tmp_dir(site.id()),
        )
    });
    let pool = PoolConfig {
        id: site.env.id.clone(),
        socket: fpm_instance.socket(site.id()),
        user: account.as_ref().map(|(u, _)| u.clone()),
        group: account.as_ref().map(|(_, g)| g.clone()),
        // Only nginx's workers may connect: not another site's PHP.
        listen_owner: site.server.accounts.web_user.clone(),
        listen_group: site.server.accounts.web_group.clone(),
        listen_mode: if site.isolated() { 0o600 } else { 0o660 },
        error_log: fpm_instance.php_error_log(site.id()),
        max_children: 8,
        env,
        php,
    };
    // PHP's own error log is written by the site's workers: a file of theirs, in a directory
    // of root's (so never a link they planted).
    site.server
        .sh(
            "preparing the PHP error log",
            r#"set -e; log=$1; owner=$2
[ -L "$log" ] && rm -f "$log"
touch "$log"
if [ -n "$owner" ]; then chown -h "$owner" "$log"; fi
chmod 600 "$log""#,
            &[&pool.error_log, &site.owner().unwrap_or_default()],
        )
        .await?;
    let text = fpm::pool(&pool).map_err(|e| TaskError(e.to_string()))?;
    let file = fpm_instance.pool_file(site.id());
    if site.server.read_file(&file).await?.as_deref() == Some(&text)
        && site.server.fpm_running().await?
    {
        t.log.info("the pool is unchanged");
        return Ok(TaskOutput::done());
    }
    // Readable by root alone: it holds the database password.
    site.server.write_file(&file, &text, "600", None).await?;
    if let Err(e) = site.server.reload_fpm().await {
        site.server.remove(&[file]).await?;
        return Err(e);
    }
    site.server.wait_for_socket(&pool.socket).await?;
    t.log
        .info(format!("PHP-FPM pool {} on {}", pool.id, pool.socket));
    Ok(TaskOutput::done())
}

pub async fn write_server_block(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let manifest = manifest(t)?;
    site.write_server_blocks(&manifest).await?;
    t.log.info(format!("nginx serves {}", site.url()));
    Ok(TaskOutput::done())
}

async fn run_commands(t: &TaskContext<'_>, which: &str, commands: &[Command]) -> TaskResult {
    let site = Site::open(t).await?;
    let manifest = manifest(t)?;
    if commands.is_empty() {
        t.log.info(format!("the manifest has no {which} commands"));
        return Ok(TaskOutput {
            skipped: true,
            ..Default::default()
        });
    }
    // A deploy or update names its release; a restore or sync runs the served one's commands.
    let release = match t.state["release_id"].as_str() {
        Some(id) => id.to_string(),
        None => input_release(t)?,
    };
    let release = load_release(t, &release).await?;
    let dir = site.layout().release_dir(site.id(), &release.id);
    let vars = site.variables(&manifest, &release);
    for command in commands {
        t.log.info(format!("$ {}", command.display()));
        let spec = site.as_site_user(
            CommandSpec::new(command.argv())
                .cwd(&dir)
                .envs(vars.clone()),
        );
        let code = site.server.run(&spec).await?;
        crate::run::require_success(code, &format!("{which} command `{}`", command.display()))?;
    }
    Ok(TaskOutput::done())
}

pub async fn run_install_commands(t: &TaskContext<'_>) -> TaskResult {
    let manifest = manifest(t)?;
    run_commands(t, "install", &manifest.install).await
}

pub async fn run_deploy_commands(t: &TaskContext<'_>) -> TaskResult {
    let manifest = manifest(t)?;
    run_commands(t, "deploy", &manifest.deploy).await
}

pub async fn switch_release(t: &TaskContext<'_>) -> TaskResult {
    let mut site = Site::open(t).await?;
    let release = input_release(t)?;
    site.switch_to(&release).await?;
    site.env.release_id = Some(release);
    // The scheduler reads the served release's cron command here, not from its artifact.
    site.env.resources["cron"] = json!(manifest(t)?.cron);
    save_env(t, &mut site.env).await?;
    Ok(TaskOutput::done())
}

/// Runs the served release's `cron` command in the environment (a scheduled run); its output
/// is the operation's log.
pub async fn run_cron_command(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    if !matches!(site.env.status.as_str(), "active" | "disabled") {
        t.log
            .info(format!("the environment is {}: not run", site.env.status));
        return Ok(TaskOutput {
            skipped: true,
            ..Default::default()
        });
    }
    let (release, manifest) = served_release(t, &site.env).await?;
    let Some(cron) = &manifest.cron else {
        t.log
            .info(format!("the release's {MANIFEST_FILE} has no cron command"));
        return Ok(TaskOutput {
            skipped: true,
            ..Default::default()
        });
    };
    if let Some(slot) = t.op.inputs["scheduled_for"].as_str() {
        t.log.info(format!("the run scheduled for {slot}"));
    }
    t.log.info(format!("$ {}", cron.command.display()));
    let spec = site.as_site_user(
        CommandSpec::new(cron.command.argv())
            .cwd(site.layout().release_dir(site.id(), &release.id))
            .envs(site.variables(&manifest, &release)),
    );
    let code = site.server.run(&spec).await?;
    crate::run::require_success(code, "the cron command")?;
    Ok(TaskOutput::done())
}

pub async fn check_health(t: &TaskContext<'_>) -> TaskResult {
    let mut site = Site::open(t).await?;
    let manifest = match manifest(t) {
        Ok(m) => m,
        // Verify has no manifest in its state: read the one of the release being served.
        Err(_) => match &site.env.release_id {
            Some(_) => served_release(t, &site.env).await?.1,
            None => {
                t.log.info("nothing is deployed yet");
                return Ok(TaskOutput {
                    skipped: true,
                    ..Default::default()
                });
            }
        },
    };
    let https = site.env.https == Https::Required;
    let domain = site.env.domain.clone();
    site.check_health(&manifest, &domain, https).await?;
    if site.env.status != "disabled" {
        site.env.status = "active".into();
    }
    save_env(t, &mut site.env).await?;
    Ok(TaskOutput::done())
}

pub async fn check_preview(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let manifest = manifest(t)?;
    let release = input_release(t)?;
    site.point(&site.layout().preview_link(site.id()), &release)
        .await?;
    let preview = environment::preview_domain(site.id());
    t.log
        .info(format!("checking release {release} through {preview}"));
    site.check_health(&manifest, &preview, false).await?;
    Ok(TaskOutput::done())
}

pub async fn dump_database(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let manifest = manifest(t)?;
    let Some(access) = site.database(&manifest) else {
        t.log.info("the manifest asks for no database");
        return Ok(TaskOutput {
            skipped: true,
            ..Default::default()
        });
    };
    let file = match access.kind {
        DatabaseKind::Mariadb | DatabaseKind::Postgresql => {
            // Made by the database's admin into a directory of root's.
            // Root's alone (nginx's user is in every environment's group); loaded back from
            // root's shell into the site's loader ([`DumpIn::RootsFile`]).
            let dir = site.layout().dumps_dir(site.id());
            site.server
                .sh(
                    "creating the dumps directory",
                    r#"set -e; mkdir -p "$1"; chown -h root:root "$1"; chmod 700 "$1""#,
                    &[&dir],
                )
                .await?;
            let file = format!("{dir}/before-{}.sql", t.op.id);
            let spec = dump_command(&site, &access, &format!("{file}.part"));
            let code = site.server.run(&spec).await?;
            crate::run::require_success(code, "the safety dump")?;
            site.server
                .sh("keeping the dump", r#"mv -f "$1.part" "$1""#, &[&file])
                .await?;
            file
        }
        DatabaseKind::Sqlite => {
            // The site's own file, copied by the site's own user beside it.
            let file = format!(
                "{}/before-{}.sqlite",
                site.layout().sqlite_dir(site.id()),
                t.op.id
            );
            site.site_sh(
                "the safety dump",
                r#"set -e; dump=$1; db=$2
if [ -f "$db" ]; then sqlite3 "$db" ".backup '$dump.part'"; else : > "$dump.part"; fi
mv -f "$dump.part" "$dump""#,
                &[&file, &access.path],
            )
            .await?;
            file
        }
        DatabaseKind::None => unreachable!("no access without a database"),
    };
    t.log.info(format!("safety dump in {file}"));
    Ok(TaskOutput::with_state(json!({ "dump": file })))
}

/// Keeps the release served and the one before (so a switch back needs no unpacking), and
/// the newest safety dump; removes the rest. Housekeeping: it never fails an update.
pub async fn prune_releases(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let keep: Vec<String> = [
        site.env.release_id.clone(),
        t.state["previous_release"].as_str().map(str::to_string),
    ]
    .into_iter()
    .flatten()
    .collect();
    let listing = site
        .server
        .sh_output(
            "listing releases",
            r#"ls -1 "$1" 2>/dev/null || true"#,
            &[&site.layout().releases_dir(site.id())],
        )
        .await?;
    let stale: Vec<String> = listing
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && !keep.iter().any(|k| k == name))
        .map(|name| format!("{}/{name}", site.layout().releases_dir(site.id())))
        .collect();
    // Pruning is housekeeping: a failure here must not undo a good update.
    if !stale.is_empty() {
        match site.server.remove(&stale).await {
            Ok(()) => t
                .log
                .info(format!("removed {} old release(s)", stale.len())),
            Err(e) => t.log.info(format!("could not remove old releases: {e}")),
        }
    }
    // Old SQLite safety dumps, by the site's user in its own directory, but the newest.
    if site.env.resources["database"].as_str() == Some("sqlite") {
        let _ = site
            .site_sh(
                "removing old dumps",
                r#"cd "$1" 2>/dev/null || exit 0; ls -1t | grep '^before-op_.*\.sqlite$' | tail -n +2 | while read -r f; do rm -f -- "$f"; done"#,
                &[&site.layout().sqlite_dir(site.id())],
            )
            .await;
    }
    // Old safety dumps too, but the newest.
    let dumps = site.layout().dumps_dir(site.id());
    let _ = site
        .server
        .sh(
            "removing old dumps",
            r#"cd "$1" 2>/dev/null || exit 0; ls -1t | tail -n +2 | while read -r f; do rm -f -- "$f"; done"#,
            &[&dumps],
        )
        .await;
    Ok(TaskOutput::done())
}

/// The rollback of an update: back to the release that served before (`current` and
/// `preview`), and the database restored from the safety dump if the deploy commands had run.
pub async fn switch_back(t: &TaskContext<'_>) -> TaskResult {
    let mut site = Site::open(t).await?;
    let manifest = manifest(t).ok();
    let Some(previous) = t.state["previous_release"].as_str().map(str::to_string) else {
        t.log
            .info("no release served before: nothing to switch back to");
        return Ok(TaskOutput::done());
    };
    if site.current_release().await?.as_deref() != Some(previous.as_str()) {
        site.switch_to(&previous).await?;
        t.log.info(format!("switched back to release {previous}"));
    }
    site.point(&site.layout().preview_link(site.id()), &previous)
        .await?;
    let deploy_ran =
        t.op.tasks
            .iter()
            .any(|task| task.name == "run_deploy_commands" && task.attempts > 0 && !task.rollback);
    if let (true, Some(dump), Some(manifest)) = (deploy_ran, t.state["dump"].as_str(), &manifest) {
        restore_dump(&site, manifest, dump).await?;
        t.log
            .info(format!("restored the database from the safety dump {dump}"));
    }
    site.env.release_id = Some(previous);
    site.env.status = "active".into();
    save_env(t, &mut site.env).await?;
    Ok(TaskOutput::done())
}

async fn restore_dump(site: &Site<'_>, manifest: &Manifest, dump: &str) -> Result<(), TaskError> {
    let Some(access) = site.database(manifest) else {
        return Ok(());
    };
    let spec = match access.kind {
        DatabaseKind::Mariadb | DatabaseKind::Postgresql => {
            load_command(site, &access, dump, DumpIn::RootsFile)
        }
        DatabaseKind::Sqlite => site.as_site_user(CommandSpec::new([
            "sh".to_string(),
            "-c".into(),
            r#"if [ -s "$1" ]; then sqlite3 "$2" ".restore '$1'"; fi"#.into(),
            "sh".into(),
            dump.to_string(),
            access.path.clone(),
        ])),
        DatabaseKind::None => return Ok(()),
    };
    let code = site.server.run(&spec).await?;
    crate::run::require_success(code, "restoring the safety dump")
}

// ---------------------------------------------------------------------------------------
// Verify

pub async fn check_servers(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let started = site.server.ensure_servers().await?;
    if started.is_empty() {
        t.log.info("nginx and PHP-FPM are running");
    }
    for server in started {
        t.log.info(format!("{server} was not running: started it"));
    }
    Ok(TaskOutput::done())
}

// ---------------------------------------------------------------------------------------
// Delete: each step removes what exists and succeeds when there is nothing left.

pub async fn remove_server_block(t: &TaskContext<'_>) -> TaskResult {
    let mut site = Site::open(t).await?;
    site.env.status = "deleting".into();
    save_env(t, &mut site.env).await?;
    remove_server_blocks(&site).await?;
    Ok(TaskOutput::done())
}

async fn remove_server_blocks(site: &Site<'_>) -> Result<(), TaskError> {
    let nginx_instance = site.server.nginx();
    site.server
        .remove(&[
            site.server.site_file(site.id()),
            nginx_instance.disabled_page_file(site.id()),
        ])
        .await?;
    if site.server.nginx_running().await? {
        site.server.reload_nginx().await?;
    }
    Ok(())
}

pub async fn remove_pool(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    remove_pool_of(&site).await?;
    Ok(TaskOutput::done())
}

async fn remove_pool_of(site: &Site<'_>) -> Result<(), TaskError> {
    let fpm_instance = site.server.fpm();
    let file = fpm_instance.pool_file(site.id());
    let existed = site.server.read_file(&file).await?.is_some();
    site.server.remove(&[file]).await?;
    if existed && site.server.fpm_running().await? {
        site.server.reload_fpm().await?;
    }
    site.server.remove(&[fpm_instance.socket(site.id())]).await
}

pub async fn drop_database(t: &TaskContext<'_>) -> TaskResult {
    let mut site = Site::open(t).await?;
    let kind: Option<DatabaseKind> =
        serde_json::from_value(site.env.resources["database"].clone()).ok();
    match kind {
        None | Some(DatabaseKind::None) => {
            t.log.info("the environment has no database");
            return Ok(TaskOutput {
                skipped: true,
                ..Default::default()
            });
        }
        Some(kind) => drop_database_of(&site, kind).await?,
    }
    site.env.resources = match site.env.resources {
        Value::Object(mut map) => {
            map.remove("database");
            Value::Object(map)
        }
        other => other,
    };
    save_env(t, &mut site.env).await?;
    Ok(TaskOutput::done())
}

/// Drops the environment's database and user on the site's target's database server.
pub(super) async fn drop_database_of(site: &Site<'_>, kind: DatabaseKind) -> Result<(), TaskError> {
    let name = environment::database_name(site.id());
    match kind {
        DatabaseKind::None => return Ok(()),
        DatabaseKind::Mariadb => {
            let sql = format!(
                "DROP DATABASE IF EXISTS `{name}`;\n\
                 DROP USER IF EXISTS '{name}'@'localhost';\n\
                 DROP USER IF EXISTS '{name}'@'%';\n"
            );
            run_sql(
                site,
                mariadb_admin(site),
                sql,
                "dropping the MariaDB database",
            )
            .await?;
        }
        DatabaseKind::Postgresql => {
            let sql = format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE);\n\
                 DROP ROLE IF EXISTS {name};\n"
            );
            run_sql(
                site,
                psql_admin(site),
                sql,
                "dropping the PostgreSQL database",
            )
            .await?;
        }
        // Its file lives in the environment's directory, removed with the files.
        DatabaseKind::Sqlite => return Ok(()),
    }
    site.server
        .log
        .info(format!("dropped database and user {name}"));
    Ok(())
}

pub async fn remove_files(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    // Nothing of the site runs while its files go (a cron command, a worker it forked).
    if let (true, Some(user)) = (site.server.is_root, site.own_user()) {
        site.server
            .sh(
                "stopping the environment's processes",
                r#"i=0; while pgrep -u "$1" >/dev/null 2>&1 && [ "$i" -lt 50 ]; do pkill -KILL -u "$1"; i=$((i + 1)); sleep 0.1; done; true"#,
                &[user],
            )
            .await?;
    }
    remove_files_of(&site).await?;
    // Its user goes last, once nothing of it is left; the uid is never given again.
    if let (true, Some(user)) = (site.server.is_root, site.own_user()) {
        site.server.remove_user(user).await?;
        t.log.info(format!("removed the user {user}"));
    }
    Ok(TaskOutput::done())
}

async fn remove_files_of(site: &Site<'_>) -> Result<(), TaskError> {
    let layout = site.layout();
    let nginx_instance = site.server.nginx();
    let fpm_instance = site.server.fpm();
    site.server
        .remove(&[
            layout.environment_dir(site.id()),
            layout.tls_dir(site.id()),
            // Its logs too: names derive from the id, so nothing of another's goes.
            format!("{}/{}.access.log", nginx_instance.log_dir(), site.id()),
            format!("{}/{}.error.log", nginx_instance.log_dir(), site.id()),
            fpm_instance.php_error_log(site.id()),
        ])
        .await
}

/// Removes everything of the environment from the site's target (a migration's old or
/// abandoned new copy), its database unless `keep_database` (another copy uses the same
/// database server). The record is left alone.
pub(super) async fn remove_copy(site: &Site<'_>, keep_database: bool) -> Result<(), TaskError> {
    remove_server_blocks(site).await?;
    remove_pool_of(site).await?;
    if !keep_database {
        let kind: Option<DatabaseKind> =
            serde_json::from_value(site.env.resources["database"].clone()).ok();
        if let Some(kind) = kind {
            drop_database_of(site, kind).await?;
        }
    }
    remove_files_of(site).await
}

pub async fn mark_deleted(t: &TaskContext<'_>) -> TaskResult {
    let mut env = load_env(t).await?;
    env.status = "deleted".into();
    env.secrets = hefring_core::Secret::new(json!({}));
    save_env(t, &mut env).await?;
    Ok(TaskOutput::done())
}

/// After a failed or cancelled operation (and its rollback): a first deploy that failed
/// leaves the environment `failed`; an update that was rolled back leaves it `active` on the
/// release it served before; a delete that failed leaves it `failed` (delete again).
pub async fn mark_failed(t: &TaskContext<'_>) -> Result<(), TaskError> {
    use hefring_core::operation::OperationKind as K;
    let mut env = load_env(t).await?;
    let status = match t.op.kind {
        K::EnvironmentUpdate | K::EnvironmentMigrate if env.release_id.is_some() => "active",
        K::EnvironmentVerify => return Ok(()),
        _ => "failed",
    };
    env.status = status.into();
    save_env(t, &mut env).await
}

#[cfg(test)]
mod tests {
    use super::archive_entries;
    use hefring_core::archive::EntryKind;

    fn append(builder: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        builder.append_data(&mut header, path, data).unwrap();
    }

    #[test]
    fn long_names_are_read_as_gnu_tar_reads_them() {
        let mut builder = tar::Builder::new(Vec::new());
        let long = format!("web/{}/file.php", "d".repeat(150));
        append(&mut builder, tar::EntryType::Regular, &long, b"<?php");
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        let target = format!("{}/x", "t".repeat(150));
        builder
            .append_link(&mut header, "web/link", &target)
            .unwrap();
        let bytes = builder.into_inner().unwrap();
        let entries = archive_entries(&bytes[..]).unwrap();
        assert_eq!(entries[0].path, long);
        assert_eq!(entries[1].kind, EntryKind::Symlink(target));
    }

    #[test]
    fn pax_headers_are_refused_as_tars_disagree_on_them() {
        // GNU tar applies a repeated pax key last-wins, the tar crate first-wins: what one
        // checks is not what the other makes.
        let mut builder = tar::Builder::new(Vec::new());
        let pax = b"20 path=web/ok.txt\n30 path=../../../etc/passwd\n";
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::XHeader);
        header.set_size(pax.len() as u64);
        builder
            .append_data(&mut header, "PaxHeaders/x", &pax[..])
            .unwrap();
        append(&mut builder, tar::EntryType::Regular, "web/x", b"x");
        let bytes = builder.into_inner().unwrap();
        let error = archive_entries(&bytes[..]).unwrap_err();
        assert!(error.0.contains("pax"), "{}", error.0);
    }
}
