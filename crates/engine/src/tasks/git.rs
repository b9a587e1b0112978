//! git, through its command-line client with argument vectors. Every URL and ref reaching
//! here was validated at the API edge; options end with `--` where git allows it, and
//! transport helpers (`ext::`) are disabled for every call.

use std::path::{Path, PathBuf};

use hefring_backend_server::CommandSpec;

use crate::log::OperationLog;
use crate::run::{self, require_success, run_captured, run_logged, Context, TaskError};

pub fn git(ctx: &Context, args: &[&str]) -> CommandSpec {
    let known_hosts = ctx.data_dir.join("ssh").join("known_hosts.git");
    let ssh = format!(
        "ssh -i {} -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={}",
        hefring_backend_server::ssh::shell_quote(&ctx.ssh_key.private_key.to_string_lossy()),
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

pub async fn update_mirror(
    ctx: &Context,
    log: &OperationLog,
    git_url: &str,
    mirror: &Path,
) -> Result<(), TaskError> {
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
