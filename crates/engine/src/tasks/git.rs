//! git, through its command-line client with argument vectors. Every URL and ref reaching
//! here was validated at the API edge; options end with `--` where git allows it, and
//! transport helpers (`ext::`) are disabled for every call.

use std::path::{Path, PathBuf};

use hefring_backend_server::CommandSpec;
use hefring_store::{DeployKey, ProjectRecord, Secret};

use crate::log::OperationLog;
use crate::run::{self, require_success, run_captured, run_logged, Context, TaskError};

/// git on the mirror, offline (no key: nothing it runs here reaches a remote).
pub fn git(ctx: &Context, args: &[&str]) -> CommandSpec {
    git_with_key(ctx, None, args)
}

/// git whose SSH connections offer `key` alone (a project's deploy key), or no key at all.
fn git_with_key(ctx: &Context, key: Option<&Path>, args: &[&str]) -> CommandSpec {
    let known_hosts = ctx.data_dir.join("ssh").join("known_hosts.git");
    let identity = match key {
        Some(key) => format!(
            "-i {}",
            hefring_backend_server::ssh::shell_quote(&key.to_string_lossy())
        ),
        None => "-o IdentityFile=none".into(),
    };
    let ssh = format!(
        "ssh {identity} -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityAgent=none -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={}",
        hefring_backend_server::ssh::shell_quote(&known_hosts.to_string_lossy()),
    );
    let mut argv = vec![
        "git",
        "-c",
        "protocol.ext.allow=never",
        "-c",
        "protocol.fd.allow=never",
    ];
    argv.extend_from_slice(args);
    CommandSpec::new(argv)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", "file:git:http:https:ssh")
        .env("GIT_SSH_COMMAND", ssh)
}

/// A bare mirror of the project's repository, kept in the data directory and brought up to
/// date on every verify and build. Builds of one project are serialised, so one mirror each.
pub fn mirror_path(ctx: &Context, project_id: &str) -> PathBuf {
    ctx.data_dir.join("git").join(format!("{project_id}.git"))
}

/// Makes the project's deploy key if it has none yet (a project from before deploy keys),
/// recording it before any use, so a retry uses the same key.
pub async fn ensure_deploy_key(
    ctx: &Context,
    log: &OperationLog,
    project: &mut ProjectRecord,
) -> Result<(), TaskError> {
    if project.deploy_key.is_some() {
        return Ok(());
    }
    let (private, public) =
        hefring_backend_server::deploy_key::generate(&format!("hefring-{}", project.id));
    project.deploy_key = Some(DeployKey {
        public_key: public,
        private_key: Secret::new(private),
    });
    ctx.store.update_project(project).await?;
    // The store keeps the first key made (a concurrent request may have made one).
    if let Some(stored) = ctx.store.get_project(&project.id).await? {
        project.deploy_key = stored.deploy_key;
    }
    log.info("made the project's deploy key (`hefring project deploy-key` shows it)");
    Ok(())
}

/// The project's deploy key in a file of its own (0600, in the data directory's `ssh/`),
/// removed when dropped.
fn deploy_key_file(
    ctx: &Context,
    project: &ProjectRecord,
) -> Result<tempfile::NamedTempFile, TaskError> {
    use std::io::Write;
    let key = project
        .deploy_key
        .as_ref()
        .ok_or_else(|| TaskError::new("the project has no deploy key"))?;
    let dir = ctx.data_dir.join("ssh");
    std::fs::create_dir_all(&dir)?;
    let mut file = tempfile::Builder::new()
        .prefix("deploy-")
        .tempfile_in(&dir)?;
    file.write_all(key.private_key.expose().as_bytes())?;
    file.flush()?;
    Ok(file)
}

/// Clones or fetches the project's repository into its mirror, over SSH with the project's
/// deploy key alone.
pub async fn update_mirror(
    ctx: &Context,
    log: &OperationLog,
    project: &ProjectRecord,
    mirror: &Path,
) -> Result<(), TaskError> {
    let git_url = project.git_url.as_str();
    let key = deploy_key_file(ctx, project)?;
    let git = |_: &Context, args: &[&str]| git_with_key(ctx, Some(key.path()), args);
    let exec = run::local();
    let mirror_str = mirror.to_string_lossy().to_string();
    if mirror.join("HEAD").exists() {
        log.info(format!("fetching {git_url}"));
        let spec = git(
            ctx,
            &[
                "--git-dir",
                &mirror_str,
                "fetch",
                "--prune",
                "--quiet",
                "origin",
            ],
        );
        let code = run_logged(&exec, &spec, log).await?;
        return require_success(code, "git fetch")
            .map_err(|e| TaskError(format!("cannot fetch the repository {git_url}: {e}")));
    }
    log.info(format!("cloning {git_url}"));
    if let Some(parent) = mirror.parent() {
        tokio::fs::create_dir_all(parent).await?;
    }
    // A clone cut short by a crash leaves a directory git would refuse to clone into.
    let partial = mirror.with_extension("partial");
    let _ = tokio::fs::remove_dir_all(&partial).await;
    let partial_str = partial.to_string_lossy().to_string();
    let spec = git(
        ctx,
        &["clone", "--mirror", "--quiet", "--", git_url, &partial_str],
    );
    let code = run_logged(&exec, &spec, log).await?;
    require_success(code, "git clone")
        .map_err(|e| TaskError(format!("cannot reach the repository {git_url}: {e}")))?;
    tokio::fs::rename(&partial, mirror).await?;
    Ok(())
}

/// The commit `reference` names in the mirror, if any.
pub async fn resolve(
    ctx: &Context,
    log: &OperationLog,
    mirror: &Path,
    reference: &str,
) -> Result<Option<String>, TaskError> {
    let mirror_str = mirror.to_string_lossy().to_string();
    let rev = format!("{reference}^{{commit}}");
    let spec = git(
        ctx,
        &[
            "--git-dir",
            &mirror_str,
            "rev-parse",
            "--verify",
            "--quiet",
            &rev,
        ],
    );
    let (code, out) = run_captured(&run::local(), &spec, log).await?;
    Ok((code == Some(0)).then(|| out.trim().to_string()))
}

/// The text of `path` at `commit`, or `None` when the commit has no such file.
pub async fn show_file(
    ctx: &Context,
    log: &OperationLog,
    mirror: &Path,
    commit: &str,
    path: &str,
) -> Result<Option<String>, TaskError> {
    let mirror_str = mirror.to_string_lossy().to_string();
    let object = format!("{commit}:{path}");
    let exists = git(ctx, &["--git-dir", &mirror_str, "cat-file", "-e", &object]);
    let (code, _) = run_captured(&run::local(), &exists, log).await?;
    if code != Some(0) {
        return Ok(None);
    }
    let spec = git(ctx, &["--git-dir", &mirror_str, "show", &object]);
    let (code, out) = run_captured(&run::local(), &spec, log).await?;
    require_success(code, "git show")?;
    Ok(Some(out))
}
