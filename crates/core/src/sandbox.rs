//! The build sandbox: how a project's build command is started on the control plane so that it
//! sees its own tree and the system's programs, and nothing of Hefring.
//!
//! The command runs as the unprivileged [`BUILD_USER`](crate::isolation::BUILD_USER) **before**
//! it enters bubblewrap (`runuser -u hefring-build -- bwrap ...`): started as root, a user
//! namespace would still map to root's files. bubblewrap then builds a private view of the
//! files from an allow-list (`/usr` read-only, the few files of `/etc` that DNS, TLS and
//! common tools need, the merged-usr links, a fresh `/tmp`, `/proc` and `/dev`, and the build
//! directory read-write), never `/`. The data directory, its database and keys, other
//! projects' mirrors and trees simply do not exist inside. The network stays (package
//! registries); what builds may not reach there is `crate::network`'s business.
//!
//! Pure: the edge (the engine) finds out what the machine's `/` holds and runs the argv.

use crate::validate::{self, FieldError};

/// `PATH` inside the sandbox: the system's programs, never Hefring's own `PATH` (it may name
/// directories the sandbox does not have).
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `HOME` inside the sandbox: the fresh `/tmp`, so caches never end up in the artifact.
pub const SANDBOX_HOME: &str = "/tmp";

/// What of `/etc` a build sees, read-only, when it exists: name resolution and DNS, TLS
/// certificates, users and groups (so `id` and tools can name the build user), the dynamic
/// linker's cache, Debian's alternatives (`/usr/bin/php` is a link through them), the time
/// zone, MIME types and PHP's CLI settings. No secret lives in any of them (`shadow` is not
/// here).
pub const ETC_ALLOW_LIST: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/passwd",
    "/etc/group",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/mime.types",
    "/etc/php",
];

/// The top-level entries of `/` that hold programs and libraries besides `/usr`: links into
/// `/usr` on a merged-usr system (Debian 12), directories on an older one.
pub const ROOT_PROGRAM_DIRS: &[&str] = &["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// What one of [`ROOT_PROGRAM_DIRS`] is on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootEntry {
    /// A symbolic link (`/bin -> usr/bin`): made again inside as the same link.
    Link { path: String, target: String },
    /// A real directory: bound read-only.
    Dir { path: String },
}

/// One build command in the sandbox.
#[derive(Clone, Debug)]
pub struct Sandbox<'a> {
    /// The user the command runs as (it must not be root).
    pub user: &'a str,
    /// The build's tree: the working directory, the only place it can write that outlives it.
    pub build_dir: &'a str,
    /// What [`ROOT_PROGRAM_DIRS`] are on this machine (those that exist).
    pub root_entries: &'a [RootEntry],
    /// The whole environment of the command (nothing of Hefring's own is inherited).
    pub env: &'a [(String, String)],
    /// The command itself (a manifest command: `sh -c STRING` or an argv).
    pub command: &'a [String],
}

/// Why a build directory cannot be sandboxed.
pub fn check_build_dir(field: &str, dir: &str) -> Result<(), FieldError> {
    validate::config_path(field, dir)?;
    // Binding one of these read-write would lend the build the system (or be hidden by the
    // sandbox's own mounts).
    for system in [
        "/usr", "/etc", "/proc", "/dev", "/bin", "/sbin", "/lib", "/lib64",
    ] {
        if dir == system || dir.starts_with(&format!("{system}/")) {
            return Err(FieldError::new(
                field,
                format!("must not be inside {system}"),
            ));
        }
    }
    if dir == "/" || dir == "/tmp" {
        return Err(FieldError::new(field, "must be a directory of its own"));
    }
    Ok(())
}

/// The argv that runs `sandbox.command` as `sandbox.user` inside bubblewrap.
pub fn argv(sandbox: &Sandbox<'_>) -> Vec<String> {
    let mut argv: Vec<String> = ["runuser", "-u", sandbox.user, "--", "bwrap"]
        .map(String::from)
        .to_vec();
    let mut push = |items: &[&str]| argv.extend(items.iter().map(|s| s.to_string()));
    // New user, pid, ipc, uts, cgroup and mount namespaces; the host's network (registries).
    push(&["--unshare-all", "--share-net"]);
    // Killed with its parent (a cancel or timeout kills the whole process group); its own
    // session, so it cannot push input into a terminal Hefring may hold (TIOCSTI).
    push(&["--die-with-parent", "--new-session"]);
    push(&["--ro-bind", "/usr", "/usr"]);
    for entry in sandbox.root_entries {
        match entry {
            RootEntry::Link { path, target } => push(&["--symlink", target, path]),
            RootEntry::Dir { path } => push(&["--ro-bind", path, path]),
        }
    }
    for path in ETC_ALLOW_LIST {
        push(&["--ro-bind-try", path, path]);
    }
    push(&["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]);
    // After /tmp: a build directory below /tmp is bound over the fresh tmpfs.
    push(&["--bind", sandbox.build_dir, sandbox.build_dir]);
    push(&["--chdir", sandbox.build_dir]);
    push(&["--clearenv"]);
    for (name, value) in sandbox.env {
        push(&["--setenv", name, value]);
    }
    push(&["--"]);
    argv.extend(sandbox.command.iter().cloned());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged_usr() -> Vec<RootEntry> {
        ["bin", "sbin", "lib", "lib64"]
            .iter()
            .map(|d| RootEntry::Link {
                path: format!("/{d}"),
                target: format!("usr/{d}"),
            })
            .collect()
    }

    #[test]
    fn snapshot_build_command() {
        let argv = argv(&Sandbox {
            user: "hefring-build",
            build_dir: "/var/lib/hefring-builds/abc/op_01",
            root_entries: &merged_usr(),
            env: &[
                ("PATH".into(), SANDBOX_PATH.into()),
                ("HOME".into(), SANDBOX_HOME.into()),
                ("HEFRING_COMMIT".into(), "0123abcd".into()),
            ],
            command: &["sh".into(), "-c".into(), "make && echo 'done'".into()],
        });
        insta::assert_snapshot!(argv.join("\n"));
    }

    #[test]
    fn the_user_switch_comes_before_bubblewrap_and_root_is_never_bound() {
        let argv = argv(&Sandbox {
            user: "hefring-build",
            build_dir: "/srv/builds/op_1",
            root_entries: &[RootEntry::Dir {
                path: "/lib".into(),
            }],
            env: &[],
            command: &["true".into()],
        });
        assert_eq!(
            &argv[..5],
            ["runuser", "-u", "hefring-build", "--", "bwrap"]
        );
        let binds: Vec<&[String]> = argv.windows(3).filter(|w| w[0].contains("bind")).collect();
        assert!(
            binds.iter().all(|w| w[1] != "/" && w[2] != "/"),
            "{binds:?}"
        );
        let writable: Vec<_> = binds.iter().filter(|w| w[0] == "--bind").collect();
        assert_eq!(writable.len(), 1, "only the build directory is writable");
        assert_eq!(writable[0][1], "/srv/builds/op_1");
        assert!(binds.iter().any(|w| w[0] == "--ro-bind" && w[1] == "/lib"));
        assert!(!argv.iter().any(|a| a == "/etc/shadow" || a == "/etc"));
        // The environment is cleared before anything is set.
        let clear = argv.iter().position(|a| a == "--clearenv").unwrap();
        assert!(argv
            .iter()
            .position(|a| a == "--setenv")
            .is_none_or(|s| s > clear));
        assert_eq!(argv.last().unwrap(), "true");
    }

    #[test]
    fn build_directories_that_would_lend_the_system_are_refused() {
        for ok in ["/var/lib/hefring-builds/x", "/tmp/hefring-out-1/builds"] {
            check_build_dir("build_root", ok).unwrap();
        }
        for bad in [
            "/",
            "/tmp",
            "/usr/local/builds",
            "/etc/hefring",
            "/proc/1",
            "relative",
            "/srv/../etc",
            "/srv/a b",
        ] {
            assert!(check_build_dir("build_root", bad).is_err(), "{bad}");
        }
    }
}
