//! Where build commands run on this machine, and as whom.
//!
//! As root, every build command runs as the unprivileged build user inside bubblewrap
//! (`hefring_core::sandbox` renders the command), in a tree below the build root, outside the
//! data directory. Where Hefring is not root it cannot switch users: builds run as Hefring's
//! own user, as before, and every build log says so.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hefring_core::isolation::BUILD_USER;
use hefring_core::sandbox::{RootEntry, ROOT_PROGRAM_DIRS};

/// How this machine runs builds.
#[derive(Clone, Debug)]
pub struct Builds {
    /// Where build trees are made: `ROOT/<operation id>`.
    pub root: PathBuf,
    pub mode: BuildMode,
}

#[derive(Clone, Debug)]
pub enum BuildMode {
    /// As [`BUILD_USER`] in bubblewrap.
    Isolated(BuildUser),
    /// Hefring is not root: builds run as its own user, unconfined.
    NotRoot { uid: u32 },
    /// Hefring is root but cannot confine builds (no bubblewrap, no build user): builds fail
    /// with this reason rather than run as root.
    Unavailable(String),
}

#[derive(Clone, Debug)]
pub struct BuildUser {
    pub uid: u32,
    pub gid: u32,
    /// What `/bin`, `/lib`... are on this machine (links into `/usr` or directories).
    pub root_entries: Vec<RootEntry>,
}

impl Builds {
    /// Builds in `root` (created when missing), isolated when Hefring is root. `data_dir` is
    /// the data directory, which the build root must not be inside.
    pub async fn prepare(root: PathBuf, data_dir: &Path) -> Builds {
        let data_dir = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || Builds::prepare_blocking(root, &data_dir))
            .await
            .expect("preparing the build root panicked")
    }

    fn prepare_blocking(root: PathBuf, data_dir: &Path) -> Builds {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if uid != 0 {
            if let Err(e) = std::fs::create_dir_all(&root) {
                tracing::warn!(root = %root.display(), error = %e, "cannot create the build root");
            }
            tracing::warn!(
                "builds are NOT isolated: Hefring runs as uid {uid}, not root, so build commands run as its own user and can read everything it can (its data directory included)"
            );
            return Builds {
                root,
                mode: BuildMode::NotRoot { uid },
            };
        }
        let mode = match isolate(&root, data_dir) {
            Ok(user) => {
                tracing::info!(
                    root = %root.display(),
                    uid = user.uid,
                    "builds run as {BUILD_USER} in a bubblewrap sandbox"
                );
                BuildMode::Isolated(user)
            }
            Err(reason) => {
                tracing::error!("builds cannot run: {reason}");
                BuildMode::Unavailable(reason)
            }
        };
        Builds { root, mode }
    }

    /// The tree of one build.
    pub fn dir(&self, operation: &str) -> PathBuf {
        self.root.join(operation)
    }
}

fn isolate(root: &Path, data_dir: &Path) -> Result<BuildUser, String> {
    let root_str = root.to_string_lossy();
    hefring_core::sandbox::check_build_dir("the build root", &root_str)
        .map_err(|e| e.to_string())?;
    if root.starts_with(data_dir) {
        return Err(format!(
            "the build root {} is inside the data directory {}: give --build-root a directory outside it",
            root.display(),
            data_dir.display()
        ));
    }
    if which("bwrap").is_none() {
        return Err(
            "bubblewrap (bwrap) is not installed: install it (Debian: apt-get install bubblewrap) so that builds run confined".into(),
        );
    }
    if which("runuser").is_none() {
        return Err("runuser (util-linux) is not installed".into());
    }
    let (uid, gid) = ensure_build_user()?;
    std::fs::create_dir_all(root)
        .map_err(|e| format!("cannot create the build root {}: {e}", root.display()))?;
    // Root's own: the build user may pass through it to its tree, not list or change it.
    std::os::unix::fs::chown(root, Some(0), Some(0))
        .and_then(|_| std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)))
        .map_err(|e| format!("cannot secure the build root {}: {e}", root.display()))?;
    for ancestor in root.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)
            .map_err(|e| format!("cannot read {}: {e}", ancestor.display()))?;
        if meta.mode() & 0o001 == 0 && meta.uid() != uid {
            return Err(format!(
                "the build user cannot reach the build root {}: {} is not searchable by others (mode {:o})",
                root.display(),
                ancestor.display(),
                meta.mode() & 0o7777
            ));
        }
    }
    Ok(BuildUser {
        uid,
        gid,
        root_entries: root_entries(),
    })
}

/// What the top-level program directories are on this machine.
fn root_entries() -> Vec<RootEntry> {
    ROOT_PROGRAM_DIRS
        .iter()
        .filter_map(|path| {
            let meta = std::fs::symlink_metadata(path).ok()?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(path).ok()?;
                Some(RootEntry::Link {
                    path: path.to_string(),
                    target: target.to_string_lossy().into_owned(),
                })
            } else if meta.is_dir() {
                Some(RootEntry::Dir {
                    path: path.to_string(),
                })
            } else {
                None
            }
        })
        .collect()
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| candidate.is_file());
    found
}

/// The uid and gid of `user` in `/etc/passwd`.
fn passwd_entry(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
    })
}

/// Creates the build user when missing: a system user with no home and no login shell. Safe
/// when several Hefring processes on one machine (parallel test servers) do it at once:
/// `useradd` locks `/etc/passwd`, a loser finds the user made or the lock taken and looks
/// again.
pub fn ensure_build_user() -> Result<(u32, u32), String> {
    let mut last_error = String::new();
    for attempt in 0..100 {
        if let Some(ids) = passwd_entry(BUILD_USER) {
            return Ok(ids);
        }
        let out = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                BUILD_USER,
            ])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .map_err(|e| format!("cannot run useradd: {e}"))?;
        if out.status.success() {
            continue;
        }
        last_error = String::from_utf8_lossy(&out.stderr).trim().to_string();
        // Exit 9: the name exists (made by another process in between); 10: the password
        // files were locked by one.
        std::thread::sleep(Duration::from_millis(20 + 10 * attempt.min(10)));
    }
    Err(format!(
        "cannot create the build user {BUILD_USER}: {last_error}"
    ))
}

/// Gives the tree at `dir` (made by Hefring, never yet touched by a build) to the build user,
/// without following links.
pub fn give_to(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            give_to(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
