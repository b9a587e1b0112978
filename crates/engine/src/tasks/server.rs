//! A server target as environment tasks use it: fixed shell snippets run through the target's
//! executor (local or SSH) with paths as arguments, files written through standard input, and
//! Hefring's own nginx and PHP-FPM masters kept running and reloaded gracefully after their
//! configuration passed its test.
//!
//! No user input reaches a shell line: scripts are constants, and every value travels as a
//! positional argument (`sh -c SCRIPT sh ARG...`), through the environment or on stdin.

use std::time::Duration;

use hefring_backend_server::{CommandSpec, Executor};
use hefring_core::environment::{Accounts, Layout};
use hefring_core::render::fpm::{self, FpmInstance};
use hefring_core::render::nginx::{self, NginxInstance};
use hefring_store::TargetRecord;

use crate::log::OperationLog;
use crate::run::{run_captured, run_logged, TaskContext, TaskError};

/// Where a tool lives on the target: what the last verify found (`inspection.tools`, a map
/// of tool to path or null), else its plain name.
pub fn tool(target: &TargetRecord, name: &str) -> String {
    target
        .inspection
        .as_ref()
        .and_then(|found| found["tools"][name].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| name.to_string())
}

/// Reloads nginx (the command in the arguments after the pid file) and waits, up to 10 s,
/// until every worker that ran the old configuration has stopped accepting connections (it
/// shows "shutting down", or is gone): until then a new connection may still meet the old
/// configuration (a certificate not there yet, a site not yet disabled).
const RELOAD_AND_WAIT: &str = r#"pidfile=$1; shift
master=$(cat "$pidfile")
workers() {
  for p in $(pgrep -P "$master" 2>/dev/null); do
    case "$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null)" in
      *"shutting down"*) ;;
      *"worker process"*) echo "$p" ;;
    esac
  done
}
old=$(workers)
"$@" || exit $?
i=0
while [ "$i" -lt 200 ]; do
  left=""
  for p in $old; do
    case "$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null)" in
      *"shutting down"*) ;;
      *"worker process"*) left="$left $p" ;;
    esac
  done
  [ -z "$left" ] && exit 0
  i=$((i + 1))
  sleep 0.05
done
echo "nginx workers of the old configuration still accept connections after 10 s:$left" >&2
"#;

pub struct Server<'a> {
    pub exec: Box<dyn Executor>,
    pub target: TargetRecord,
    pub layout: Layout,
    pub accounts: Accounts,
    pub log: &'a OperationLog,
}

/// Reads a pid file and tells whether that process lives. Prints `running PID` or `stopped`.
const STATUS: &str = r#"pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "running $pid" || echo stopped"#;

/// Writes stdin to `$1` atomically with mode `$2` (and owner `$3` when given).
const WRITE_FILE: &str = r#"set -e
part="$1.part"
umask 077
cat > "$part"
chmod "$2" "$part"
if [ -n "$3" ]; then chown "$3" "$part"; fi
mv -f "$part" "$1""#;

impl<'a> Server<'a> {
    /// Connects (through the executor) and finds out whether Hefring is root there: then the
    /// sites run as the target's `web_user`; otherwise everything runs as Hefring's user.
    pub async fn open(
        t: &'a TaskContext<'_>,
        target: TargetRecord,
    ) -> Result<Server<'a>, TaskError> {
        let exec = t.ctx.executor_for(&target)?;
        let (code, out) = run_captured(
            exec.as_ref(),
            &CommandSpec::new([
                "sh",
                "-c",
                "id -u; id -gn \"$1\" 2>/dev/null || true",
                "sh",
                &target.web_user,
            ]),
            t.log,
        )
        .await?;
        if code != Some(0) {
            return Err(TaskError(format!("cannot reach {}", target.host)));
        }
        let mut lines = out.lines();
        let is_root = lines.next().map(str::trim) == Some("0");
        let accounts = if is_root {
            let group = lines
                .next()
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .ok_or_else(|| {
                    TaskError(format!(
                        "the web user {} does not exist on {}",
                        target.web_user, target.host
                    ))
                })?
                .to_string();
            Accounts {
                web_user: Some(target.web_user.clone()),
                web_group: Some(group),
            }
        } else {
            Accounts {
                web_user: None,
                web_group: None,
            }
        };
        Ok(Server {
            exec,
            layout: Layout::new(target.root.clone()),
            target,
            accounts,
            log: t.log,
        })
    }

    pub fn nginx(&self) -> NginxInstance {
        self.layout.nginx(
            &self.accounts,
            self.target.http_port,
            self.target.https_port,
        )
    }

    /// The system-managed nginx serving the sites, when the target uses one.
    fn system_nginx(&self) -> Option<&hefring_core::target::SystemNginx> {
        self.target.settings.system_nginx.as_ref()
    }

    /// Where an environment's server blocks go: Hefring's own nginx's sites directory, or
    /// the directory the system nginx includes.
    pub fn site_file(&self, environment: &str) -> String {
        match self.system_nginx() {
            Some(system) => format!(
                "{}/hefring-{environment}.conf",
                system.sites_dir.trim_end_matches('/')
            ),
            None => self.nginx().site_file(environment),
        }
    }

    pub fn fpm(&self) -> FpmInstance {
        self.layout.fpm(&self.accounts)
    }

    /// `user:group` for files the sites write, when Hefring is root.
    pub fn web_owner(&self) -> Option<String> {
        match (&self.accounts.web_user, &self.accounts.web_group) {
            (Some(u), Some(g)) => Some(format!("{u}:{g}")),
            _ => None,
        }
    }

    /// Runs a fixed script with arguments; its output goes to the log. Fails unless it exits 0.
    pub async fn sh(&self, what: &str, script: &str, args: &[&str]) -> Result<(), TaskError> {
        let code = run_logged(self.exec.as_ref(), &script_spec(script, args), self.log).await?;
        match code {
            Some(0) => Ok(()),
            other => Err(TaskError(format!(
                "{what} failed (exit status {})",
                other.map_or("none".into(), |c| c.to_string())
            ))),
        }
    }

    /// Runs a fixed script and answers its standard output (stderr goes to the log).
    pub async fn sh_output(
        &self,
        what: &str,
        script: &str,
        args: &[&str],
    ) -> Result<String, TaskError> {
        let (code, out) =
            run_captured(self.exec.as_ref(), &script_spec(script, args), self.log).await?;
        match code {
            Some(0) => Ok(out),
            other => Err(TaskError(format!(
                "{what} failed (exit status {})",
                other.map_or("none".into(), |c| c.to_string())
            ))),
        }
    }

    /// Runs a command with its output in the log and answers its exit code.
    pub async fn run(&self, spec: &CommandSpec) -> Result<Option<i32>, TaskError> {
        run_logged(self.exec.as_ref(), spec, self.log).await
    }

    /// Runs a command of the project as the web user (when Hefring is root).
    pub fn as_web_user(&self, mut spec: CommandSpec) -> CommandSpec {
        if let Some(user) = &self.accounts.web_user {
            let mut argv = vec![
                "runuser".to_string(),
                "-u".into(),
                user.clone(),
                "--".into(),
            ];
            argv.append(&mut spec.argv);
            spec.argv = argv;
        }
        spec
    }

    /// Writes a file atomically. `secret` files are readable by their owner only.
    pub async fn write_file(
        &self,
        path: &str,
        content: &str,
        mode: &str,
        owner: Option<&str>,
    ) -> Result<(), TaskError> {
        let spec = script_spec(WRITE_FILE, &[path, mode, owner.unwrap_or("")]).stdin(content);
        let code = run_logged(self.exec.as_ref(), &spec, self.log).await?;
        if code != Some(0) {
            return Err(TaskError(format!("writing {path} failed")));
        }
        Ok(())
    }

    /// The file's content, or `None` when it does not exist.
    pub async fn read_file(&self, path: &str) -> Result<Option<String>, TaskError> {
        let out = self
            .sh_output(
                &format!("reading {path}"),
                r#"if [ -f "$1" ]; then echo present; cat "$1"; else echo absent; fi"#,
                &[path],
            )
            .await?;
        Ok(out.strip_prefix("present\n").map(str::to_string))
    }

    pub async fn mkdirs(&self, dirs: &[String], mode: &str) -> Result<(), TaskError> {
        let mut args = vec![mode];
        args.extend(dirs.iter().map(String::as_str));
        self.sh(
            "creating directories",
            r#"set -e; mode=$1; shift; for d in "$@"; do mkdir -p "$d"; chmod "$mode" "$d"; done"#,
            &args,
        )
        .await
    }

    async fn running(&self, pid_file: &str) -> Result<bool, TaskError> {
        let out = self
            .sh_output("checking a pid file", STATUS, &[pid_file])
            .await?;
        Ok(out.starts_with("running"))
    }

    /// Creates the directories and main configuration of Hefring's nginx and PHP-FPM on the
    /// target and starts whichever is down. Answers what it started.
    pub async fn ensure_servers(&self) -> Result<Vec<&'static str>, TaskError> {
        let nginx = self.nginx();
        let fpm = self.fpm();
        let mut dirs = vec![
            self.layout.root.clone(),
            self.layout.environments_dir(),
            self.layout.artifacts_dir(),
        ];
        dirs.extend(nginx.directories());
        dirs.extend(fpm.directories());
        self.mkdirs(&dirs, "755").await?;
        if let Some(system) = self.system_nginx() {
            // The sites' logs, pages and ACME challenges still live below the root.
            self.mkdirs(std::slice::from_ref(&system.sites_dir), "755")
                .await?;
        }
        let nginx_conf = nginx::main_config(&nginx).map_err(|e| TaskError(e.to_string()))?;
        let fpm_conf = fpm::master_config(&fpm).map_err(|e| TaskError(e.to_string()))?;
        let nginx_changed =
            self.read_file(&nginx.config_file()).await?.as_deref() != Some(&nginx_conf);
        let fpm_changed = self.read_file(&fpm.config_file()).await?.as_deref() != Some(&fpm_conf);
        let nginx_changed = nginx_changed && self.system_nginx().is_none();
        if nginx_changed {
            self.write_file(&nginx.config_file(), &nginx_conf, "644", None)
                .await?;
        }
        if fpm_changed {
            self.write_file(&fpm.config_file(), &fpm_conf, "644", None)
                .await?;
        }
        let mut started = Vec::new();
        if !self.running(&fpm.pid_file()).await? {
            self.test_fpm().await?;
            self.log.info("starting PHP-FPM");
            let bin = tool(&self.target, "php-fpm");
            self.sh_run(&bin, &fpm.argv(&[]), "starting PHP-FPM")
                .await?;
            started.push("php-fpm");
        } else if fpm_changed {
            self.reload_fpm().await?;
        }
        if self.system_nginx().is_some() {
            // Not Hefring's to start: the system runs it.
        } else if !self.running(&nginx.pid_file()).await? {
            self.test_nginx().await?;
            self.log.info("starting nginx");
            let bin = tool(&self.target, "nginx");
            self.sh_run(&bin, &nginx.argv(&[]), "starting nginx")
                .await?;
            started.push("nginx");
        } else if nginx_changed {
            self.reload_nginx().await?;
        }
        Ok(started)
    }

    async fn sh_run(&self, bin: &str, args: &[String], what: &str) -> Result<(), TaskError> {
        let mut argv = vec![bin.to_string()];
        argv.extend(args.iter().cloned());
        let code = self.run(&CommandSpec::new(argv)).await?;
        match code {
            Some(0) => Ok(()),
            other => Err(TaskError(format!("{what} failed (exit status {other:?})"))),
        }
    }

    pub async fn test_nginx(&self) -> Result<(), TaskError> {
        if let Some(system) = self.system_nginx() {
            let code = self
                .run(&CommandSpec::new(system.test_command.clone()))
                .await?;
            return match code {
                Some(0) => Ok(()),
                other => Err(TaskError(format!(
                    "the system nginx's configuration test failed (exit status {other:?})"
                ))),
            };
        }
        let bin = tool(&self.target, "nginx");
        self.sh_run(
            &bin,
            &self.nginx().argv(&["-t", "-q"]),
            "nginx -t (the configuration test)",
        )
        .await
    }

    pub async fn test_fpm(&self) -> Result<(), TaskError> {
        let bin = tool(&self.target, "php-fpm");
        self.sh_run(
            &bin,
            &self.fpm().argv(&["-t"]),
            "php-fpm -t (the configuration test)",
        )
        .await
    }

    /// Tests the configuration, then reloads gracefully (or starts nginx if it is down).
    pub async fn reload_nginx(&self) -> Result<(), TaskError> {
        self.test_nginx().await?;
        if let Some(system) = self.system_nginx() {
            let code = self
                .run(&CommandSpec::new(system.reload_command.clone()))
                .await?;
            return match code {
                Some(0) => Ok(()),
                other => Err(TaskError(format!(
                    "reloading the system nginx failed (exit status {other:?})"
                ))),
            };
        }
        let nginx = self.nginx();
        let bin = tool(&self.target, "nginx");
        if self.running(&nginx.pid_file()).await? {
            let mut args = vec![nginx.pid_file(), bin];
            args.extend(nginx.argv(&["-s", "reload"]));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.sh("reloading nginx", RELOAD_AND_WAIT, &args).await
        } else {
            self.sh_run(&bin, &nginx.argv(&[]), "starting nginx").await
        }
    }

    /// Tests the configuration, then reloads PHP-FPM gracefully (SIGUSR2: it re-executes
    /// itself keeping its sockets) and waits until `socket` answers, if given.
    pub async fn reload_fpm(&self) -> Result<(), TaskError> {
        self.test_fpm().await?;
        let fpm = self.fpm();
        if self.running(&fpm.pid_file()).await? {
            self.sh(
                "reloading PHP-FPM",
                r#"kill -USR2 "$(cat "$1")""#,
                &[&fpm.pid_file()],
            )
            .await
        } else {
            let bin = tool(&self.target, "php-fpm");
            self.sh_run(&bin, &fpm.argv(&[]), "starting PHP-FPM").await
        }
    }

    /// Waits until a unix socket exists (a pool PHP-FPM has just been told about).
    pub async fn wait_for_socket(&self, socket: &str) -> Result<(), TaskError> {
        for _ in 0..100 {
            let out = self
                .sh_output(
                    "looking for a socket",
                    r#"[ -S "$1" ] && echo yes || echo no"#,
                    &[socket],
                )
                .await?;
            if out.trim() == "yes" {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(TaskError(format!(
            "PHP-FPM did not open {socket} within 10 s"
        )))
    }

    /// Removes paths (files or trees) if they exist.
    pub async fn remove(&self, paths: &[String]) -> Result<(), TaskError> {
        let args: Vec<&str> = paths.iter().map(String::as_str).collect();
        self.sh(
            "removing files",
            r#"set -e; for p in "$@"; do rm -rf -- "$p"; done"#,
            &args,
        )
        .await
    }

    /// Whether the nginx master runs (a deleted environment's block need not be reloaded away
    /// when nothing serves it).
    pub async fn nginx_running(&self) -> Result<bool, TaskError> {
        if self.system_nginx().is_some() {
            return Ok(true);
        }
        self.running(&self.nginx().pid_file()).await
    }

    pub async fn fpm_running(&self) -> Result<bool, TaskError> {
        self.running(&self.fpm().pid_file()).await
    }
}

pub fn script_spec(script: &str, args: &[&str]) -> CommandSpec {
    let mut argv = vec![
        "sh".to_string(),
        "-c".into(),
        script.to_string(),
        "sh".into(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    CommandSpec::new(argv)
}
