//! `release_build`: resolve a ref to a commit, check it out, run the build commands, and pack
//! an immutable `tar.zst` artifact named by its SHA-256.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hefring_backend_server::CommandSpec;
use hefring_core::isolation::BUILD_USER;
use hefring_core::manifest::{Manifest, MANIFEST_FILE};
use hefring_core::sandbox;
use hefring_core::{new_id, IdKind};
use hefring_store::ReleaseRecord;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::git;
use super::project::load_project;
use crate::run::{
    self, require_success, run_captured, run_logged, TaskContext, TaskError, TaskOutput, TaskResult,
};
use crate::sandbox::{BuildMode, BuildUser};
use crate::time::now_ms;

/// The build's tree, below the build root (outside the data directory).
fn build_dir(t: &TaskContext<'_>) -> PathBuf {
    t.ctx.builds.dir(&t.op.id)
}

fn state_str<'a>(t: &'a TaskContext<'_>, key: &str) -> Result<&'a str, TaskError> {
    t.state[key]
        .as_str()
        .ok_or_else(|| TaskError(format!("the operation has no {key} recorded")))
}

async fn load_release(t: &TaskContext<'_>) -> Result<ReleaseRecord, TaskError> {
    let id = state_str(t, "release")?;
    t.ctx
        .store
        .get_release(id)
        .await?
        .ok_or_else(|| TaskError(format!("release {id} no longer exists")))
}

pub async fn resolve_ref(t: &TaskContext<'_>) -> TaskResult {
    let mut project = load_project(t).await?;
    let reference = t.op.inputs["ref"]
        .as_str()
        .ok_or_else(|| TaskError::new("the operation has no ref"))?
        .to_string();
    let mirror = git::mirror_path(t.ctx, &project.id);
    git::ensure_deploy_key(t.ctx, t.log, &mut project).await?;
    git::update_mirror(t.ctx, t.log, &project, &mirror).await?;
    let commit = git::resolve(t.ctx, t.log, &mirror, &reference)
        .await?
        .ok_or_else(|| {
            TaskError(format!(
                "{reference} is not a branch, tag or commit of the repository"
            ))
        })?;
    t.log.info(format!("{reference} is commit {commit}"));

    let now = now_ms();
    let release = match t.ctx.store.release_by_commit(&project.id, &commit).await? {
        Some(existing) if existing.status == "ready" => {
            t.log.info(format!(
                "commit {commit} is already built as release {}: reusing its artifact",
                existing.id
            ));
            return Ok(TaskOutput {
                state_patch: Some(
                    json!({ "commit": commit, "release": existing.id, "result": { "release": existing.id } }),
                ),
                skip_remaining: true,
                ..Default::default()
            });
        }
        Some(mut earlier) => {
            // An earlier build of this commit failed or was cut short: build it again here.
            earlier.status = "building".into();
            earlier.build_operation_id = t.op.id.clone();
            earlier.updated_at = now;
            t.ctx.store.update_release(&earlier).await?;
            earlier
        }
        None => {
            let release = ReleaseRecord {
                id: new_id(IdKind::Release, now),
                project_id: project.id.clone(),
                git_ref: reference.clone(),
                commit: commit.clone(),
                status: "building".into(),
                artifact_sha256: None,
                artifact_size: None,
                image: None,
                build_operation_id: t.op.id.clone(),
                created_at: now,
                updated_at: now,
            };
            t.ctx.store.insert_release(&release).await?;
            release
        }
    };
    t.log.info(format!("building release {}", release.id));
    Ok(TaskOutput::with_state(
        json!({ "commit": commit, "release": release.id }),
    ))
}

/// Checks `commit` out afresh into the build's tree, outside the data directory: the tree of
/// the commit (`git archive` from the mirror, which Hefring reads; the build user never sees
/// the mirror or its objects), given to the build user when builds are isolated.
async fn fresh_checkout(t: &TaskContext<'_>, commit: &str) -> Result<PathBuf, TaskError> {
    let dir = build_dir(t);
    // Never follows a link a build left: std's remove_dir_all does not.
    let _ = tokio::fs::remove_dir_all(&dir).await;
    tokio::fs::create_dir_all(&t.ctx.builds.root).await?;
    let mirror = git::mirror_path(t.ctx, &t.op.subject_id);
    // The tree exactly as committed, as a checkout gives it: the commit's own
    // `.gitattributes` may not drop files (`export-ignore`) or rewrite them (`export-subst`).
    // Attributes in the mirror's info/ win over the commit's.
    tokio::fs::create_dir_all(mirror.join("info")).await?;
    tokio::fs::write(
        mirror.join("info").join("attributes"),
        "* -export-ignore -export-subst\n",
    )
    .await?;
    let archive = dir.with_extension("tar");
    let (mirror_s, archive_s) = (
        mirror.to_string_lossy().to_string(),
        archive.to_string_lossy().to_string(),
    );
    let spec = git::git(
        t.ctx,
        &[
            "-c",
            "tar.umask=0022",
            "--git-dir",
            &mirror_s,
            "archive",
            "--format=tar",
            "-o",
            &archive_s,
            commit,
        ],
    );
    require_success(
        run_logged(&run::local(), &spec, t.log).await?,
        "git archive",
    )?;
    let owner = match &t.ctx.builds.mode {
        BuildMode::Isolated(user) => Some((user.uid, user.gid)),
        _ => None,
    };
    let unpacked = {
        let (dir, archive) = (dir.clone(), archive.clone());
        tokio::task::spawn_blocking(move || unpack_tree(&archive, &dir, owner))
            .await
            .map_err(|e| TaskError(format!("unpacking the commit panicked: {e}")))?
    };
    let _ = tokio::fs::remove_file(&archive).await;
    unpacked.map_err(|e| TaskError(format!("checking out {commit}: {e}")))?;
    Ok(dir)
}

/// Unpacks the commit's tree into a new directory `dir` (only the owner may enter it) and
/// gives it to `owner`, before any build command has run in it.
fn unpack_tree(archive: &Path, dir: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let mut tar = tar::Archive::new(std::fs::File::open(archive)?);
    tar.set_preserve_permissions(true);
    tar.set_unpack_xattrs(false);
    tar.set_overwrite(false);
    tar.unpack(dir)?;
    if let Some((uid, gid)) = owner {
        crate::sandbox::give_to(dir, uid, gid)?;
    }
    Ok(())
}

fn read_manifest(dir: &Path) -> Result<Manifest, TaskError> {
    let path = dir.join(MANIFEST_FILE);
    // Hefring reads it as root: a link committed in its place (to /etc/shadow) is refused.
    if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
        return Err(TaskError(format!(
            "{MANIFEST_FILE} must be a regular file, not a link or a directory"
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|_| {
        TaskError(format!(
            "{MANIFEST_FILE} is missing at the root of the commit"
        ))
    })?;
    Manifest::parse_new(&text).map_err(|e| TaskError(e.to_string()))
}

pub async fn check_out(t: &TaskContext<'_>) -> TaskResult {
    let commit = state_str(t, "commit")?;
    let dir = fresh_checkout(t, commit).await?;
    let manifest = read_manifest(&dir)?;
    t.log.info(format!(
        "checked out {commit}; {} build commands",
        manifest.build.len()
    ));
    Ok(TaskOutput::done())
}

pub async fn run_build_commands(t: &TaskContext<'_>) -> TaskResult {
    let commit = state_str(t, "commit")?;
    let release = state_str(t, "release")?;
    let builds = &t.ctx.builds;
    match &builds.mode {
        BuildMode::Unavailable(reason) => {
            return Err(TaskError(format!(
                "builds cannot run confined on this machine: {reason}"
            )))
        }
        BuildMode::NotRoot { uid } => t.log.info(format!(
            "builds are NOT isolated here: Hefring runs as uid {uid}, not root, so build commands run as its own user and can read what it can"
        )),
        BuildMode::Isolated(_) => {}
    }
    let dir = build_dir(t);
    // A build cut short may have left the tree half-built: start again from the commit.
    let marker = dir.with_extension("started");
    if marker.exists() || !dir.exists() {
        t.log
            .info("an earlier build attempt did not finish: checking out afresh");
        fresh_checkout(t, commit).await?;
    }
    tokio::fs::write(&marker, b"").await?;
    let manifest = read_manifest(&dir)?;
    let exec = run::local();
    let vars = [
        ("HEFRING_RELEASE", release),
        ("HEFRING_COMMIT", commit),
        ("HEFRING_PROJECT", &t.op.subject_id),
        ("HEFRING_OPERATION", &t.op.id),
    ];
    for (i, command) in manifest.build.iter().enumerate() {
        t.log.info(format!("$ {}", command.display()));
        let spec = match &builds.mode {
            BuildMode::Isolated(user) => sandboxed(user, &dir, &vars, command.argv()),
            _ => CommandSpec::new(command.argv())
                .cwd(&dir)
                .envs(vars.iter().map(|(k, v)| (k.to_string(), v.to_string()))),
        };
        let code = run_logged(&exec, &spec, t.log).await?;
        require_success(
            code,
            &format!("build command {} ({})", i + 1, command.display()),
        )?;
    }
    tokio::fs::remove_file(&marker).await?;
    Ok(TaskOutput::done())
}

/// A build command as the build user in bubblewrap, with only its own environment: the
/// build's variables, a system `PATH`, `HOME` in the sandbox's fresh `/tmp`, and the locale,
/// time zone and proxies Hefring itself was given (registries may only be reachable through
/// a proxy; its URL then shows in the sandbox's argv).
fn sandboxed(
    user: &BuildUser,
    dir: &Path,
    vars: &[(&str, &str)],
    argv: Vec<String>,
) -> CommandSpec {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), sandbox::SANDBOX_PATH.into()),
        ("HOME".into(), sandbox::SANDBOX_HOME.into()),
        ("USER".into(), BUILD_USER.into()),
        ("LOGNAME".into(), BUILD_USER.into()),
    ];
    for name in [
        "LANG",
        "LC_ALL",
        "TZ",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
    ] {
        if let Ok(value) = std::env::var(name) {
            env.push((name.into(), value));
        }
    }
    if !env.iter().any(|(k, _)| k == "LANG") {
        env.push(("LANG".into(), "C.UTF-8".into()));
    }
    env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let dir_s = dir.to_string_lossy();
    let argv = sandbox::argv(&sandbox::Sandbox {
        user: BUILD_USER,
        build_dir: &dir_s,
        root_entries: &user.root_entries,
        env: &env,
        command: &argv,
    });
    CommandSpec::new(argv).cwd(dir)
}

pub async fn pack_artifact(t: &TaskContext<'_>) -> TaskResult {
    let mut release = load_release(t).await?;
    let dir = build_dir(t);
    let commit = state_str(t, "commit")?.to_string();
    let mirror = git::mirror_path(t.ctx, &t.op.subject_id)
        .to_string_lossy()
        .to_string();
    let spec = git::git(
        t.ctx,
        &["--git-dir", &mirror, "show", "-s", "--format=%ct", &commit],
    );
    let (code, out) = run_captured(&run::local(), &spec, t.log).await?;
    require_success(code, "git show")?;
    let mtime: u64 = out.trim().parse().unwrap_or(0);

    let artifacts = t.ctx.data_dir.join("artifacts");
    tokio::fs::create_dir_all(&artifacts).await?;
    let partial = artifacts.join(format!("{}.partial", t.op.id));
    let (sha256, size) = {
        let (dir, partial) = (dir.clone(), partial.clone());
        tokio::task::spawn_blocking(move || pack(&dir, &partial, mtime))
            .await
            .map_err(|e| TaskError(format!("packing panicked: {e}")))??
    };
    let path = t.ctx.artifact_path(&sha256);
    tokio::fs::rename(&partial, &path).await?;
    t.log.info(format!(
        "artifact {} ({size} bytes, sha256 {sha256})",
        path.display()
    ));
    // Shared before the release is ready: any worker may deploy it next.
    if let Some(store) = &t.ctx.artifacts {
        store
            .put_file(&crate::run::artifact_key(&sha256), &path)
            .await
            .map_err(|e| TaskError(format!("storing the artifact in {}: {e}", store.describe())))?;
        t.log
            .info(format!("artifact shared in {}", store.describe()));
    }
    release.status = "ready".into();
    release.artifact_sha256 = Some(sha256);
    release.artifact_size = Some(size as i64);
    release.updated_at = now_ms();
    t.ctx.store.update_release(&release).await?;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    Ok(TaskOutput::with_state(
        json!({ "result": { "release": release.id } }),
    ))
}

/// Packs `dir` (without `.git`) into a deterministic tar.zst: sorted entries, one mtime,
/// owner root. Answers the archive's SHA-256 and size.
fn pack(dir: &Path, out: &Path, mtime: u64) -> Result<(String, u64), TaskError> {
    let file = std::fs::File::create(out)?;
    let hashing = HashingWriter {
        inner: file,
        hash: Sha256::new(),
        size: 0,
    };
    let encoder = zstd::Encoder::new(hashing, 3)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    append_dir(&mut builder, dir, Path::new(""), mtime)?;
    let encoder = builder.into_inner()?;
    let mut hashing = encoder.finish()?;
    hashing.flush()?;
    hashing.inner.sync_all()?;
    Ok((hex::encode(hashing.hash.finalize()), hashing.size))
}

fn append_dir<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    relative: &Path,
    mtime: u64,
) -> Result<(), TaskError> {
    let mut entries: Vec<_> = std::fs::read_dir(root.join(relative))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        if relative.as_os_str().is_empty() && name == ".git" {
            continue;
        }
        let rel = relative.join(&name);
        let meta = std::fs::symlink_metadata(entry.path())?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        header.set_mtime(mtime);
        // Permission bits only: a setuid bit a build command set must not reach a target.
        header.set_mode(meta.mode() & 0o777);
        header.set_uid(0);
        header.set_gid(0);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            builder.append_link(&mut header, &rel, target)?;
        } else if meta.is_dir() {
            header.set_size(0);
            builder.append_data(&mut header, &rel, std::io::empty())?;
            append_dir(builder, root, &rel, mtime)?;
        } else if meta.is_file() {
            let file = std::fs::File::open(entry.path())?;
            builder.append_data(&mut header, &rel, file)?;
        }
    }
    Ok(())
}

struct HashingWriter {
    inner: std::fs::File,
    hash: Sha256,
    size: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Rollback: remove the build tree and any partial artifact.
pub async fn discard_build(t: &TaskContext<'_>) -> TaskResult {
    let dir = build_dir(t);
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let _ = tokio::fs::remove_file(dir.with_extension("started")).await;
    let _ = tokio::fs::remove_file(dir.with_extension("tar")).await;
    let _ = tokio::fs::remove_file(
        t.ctx
            .data_dir
            .join("artifacts")
            .join(format!("{}.partial", t.op.id)),
    )
    .await;
    t.log.info("removed the build tree");
    Ok(TaskOutput::done())
}

pub async fn mark_failed(t: &TaskContext<'_>) -> Result<(), TaskError> {
    if let Ok(mut release) = load_release(t).await {
        if release.status != "ready" && release.build_operation_id == t.op.id {
            release.status = "failed".into();
            release.updated_at = now_ms();
            t.ctx.store.update_release(&release).await?;
        }
    }
    Ok(())
}
