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
use hefring_core::isolation;
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
  [ -z "$left" ] && break
  i=$((i + 1))
  sleep 0.05
done
if [ -n "$left" ]; then
  echo "nginx workers of the old configuration still accept connections after 10 s:$left" >&2
  exit 1
fi
# A worker shutting down closes its idle keep-alive connections as it goes: give the old ones
# up to 3 s to be gone, so a client's next request on such a connection meets the new
# configuration (one still serving a long request keeps it, and is not waited for longer).
i=0
while [ "$i" -lt 60 ]; do
  alive=""
  for p in $old; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
  [ -z "$alive" ] && exit 0
  i=$((i + 1))
  sleep 0.05
done
"#;

/// Starts Hefring's nginx (`$2 ARGS...`, pid file `$1`) unless it runs, after its test.
const NGINX_START: &str = r#"set -e
pidfile=$1; shift
pid=$(cat "$pidfile" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && exit 0
"$@" -t -q
"$@"
echo started
"#;

/// Tests Hefring's nginx configuration, then reloads it and waits for the old workers
/// ([`RELOAD_AND_WAIT`]), or starts it when it is down.
const NGINX_RELOAD: &str = r#"set -e
wait_script=$1; pidfile=$2; shift 2
"$@" -t -q
pid=$(cat "$pidfile" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || { "$@"; exit 0; }
sh -c "$wait_script" sh "$pidfile" "$@" -s reload
"#;

/// Runs a system nginx's test command (the `$1` arguments after `$1`), then its reload
/// command (the rest). Positions only go through `eval`, never the arguments' text.
const SYSTEM_NGINX_RELOAD: &str = r#"set -e
n=$1; shift
t=""; i=1
while [ "$i" -le "$n" ]; do t="$t \"\${$i}\""; i=$((i + 1)); done
r=""
while [ "$i" -le "$#" ]; do r="$r \"\${$i}\""; i=$((i + 1)); done
eval "$t"
eval "$r"
"#;

pub struct Server<'a> {
    pub exec: Box<dyn Executor>,
    pub target: TargetRecord,
    pub layout: Layout,
    pub accounts: Accounts,
    /// Whether Hefring is root there: only then can each environment be its own user.
    pub is_root: bool,
    pub log: &'a OperationLog,
}

/// Creates an environment's user and group (`$1`) if missing, with the next uid of the
/// machine's high-water mark (never one used before, nor one taken by anyone else), home
/// `$2`, and adds the nginx workers' user `$3` (if given) to its group, so that nginx reads
/// the site's static files and nothing else does. Machine-wide lock: users are machine-wide.
/// A user half made by an attempt cut short (its group only) is completed. Prints its uid.
const ENSURE_USER: &str = r#"set -e
name=$1; home=$2; web=$3; state=$4; min=$5; max=$6
mkdir -p "$state"; chmod 700 "$state"
exec 9>>"$state/users.lock"
flock -w 120 9
if ! id -u "$name" >/dev/null 2>&1; then
  uid=$(getent group "$name" | cut -d: -f3)
  if [ -z "$uid" ]; then
    uid=$(cat "$state/next-uid" 2>/dev/null || echo "$min")
    [ "$uid" -ge "$min" ] || uid=$min
    while getent passwd "$uid" >/dev/null || getent group "$uid" >/dev/null; do uid=$((uid + 1)); done
    [ "$uid" -le "$max" ] || { echo "no environment uid is left below $max" >&2; exit 1; }
    echo $((uid + 1)) > "$state/next-uid.part"; mv -f "$state/next-uid.part" "$state/next-uid"
    groupadd -g "$uid" "$name"
  fi
  useradd -u "$uid" -g "$name" -M -d "$home" -s /usr/sbin/nologin -c "Hefring environment" "$name"
fi
if [ -n "$web" ] && ! id -nG "$web" | tr ' ' '
' | grep -qx "$name"; then
  usermod -a -G "$name" "$web"
fi
echo "uid $(id -u "$name")"
"#;

/// Removes an environment's user and group (`$1`), after stopping whatever still runs as it.
const REMOVE_USER: &str = r#"set -e
name=$1; state=$2
id -u "$name" >/dev/null 2>&1 || { getent group "$name" >/dev/null && groupdel "$name"; exit 0; }
mkdir -p "$state"; chmod 700 "$state"
exec 9>>"$state/users.lock"
flock -w 120 9
pkill -KILL -u "$name" 2>/dev/null || true
userdel -f "$name" 2>/dev/null || userdel "$name"
if getent group "$name" >/dev/null; then groupdel "$name"; fi
"#;

/// Starts PHP-FPM if it is down, or (`reload`) tests its configuration and reloads it
/// gracefully, then waits until the master says it is ready again. Run under the target's
/// lock, so that no other deploy starts or reloads the same master meanwhile (PHP-FPM fails
/// to initialise when a second start or a reload meets one half done).
const FPM_CONTROL: &str = r#"set -e
action=$1; pidfile=$2; log=$3; bin=$4; shift 4
running() { pid=$(cat "$pidfile" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }
ready() { grep -c 'ready to handle connections' "$log" 2>/dev/null || echo 0; }
if running; then
  [ "$action" = reload ] || exit 0
  "$bin" "$@" -t
  before=$(ready)
  kill -USR2 "$(cat "$pidfile")"
else
  "$bin" "$@" -t
  before=$(ready)
  "$bin" "$@"
  echo "started"
fi
i=0
while [ "$(ready)" -le "$before" ]; do
  i=$((i + 1))
  [ "$i" -lt 200 ] || { echo "PHP-FPM did not say it is ready within 10 s" >&2; exit 1; }
  sleep 0.05
done
"#;

/// Reads a pid file and tells whether that process lives. Prints `running PID` or `stopped`.
const STATUS: &str = r#"pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "running $pid" || echo stopped"#;

/// Writes stdin to `$1` atomically with mode `$2` (and owner `$3` when given).
/// The temporary name is the writer's own (`$$`): two deploys writing the same shared file at
/// once (the masters' configuration on a fresh target) must not rename each other's.
const WRITE_FILE: &str = r#"set -e
part="$1.part.$$"
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
            is_root,
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
        self.output_of(what, &script_spec(script, args)).await
    }

    /// Runs a command and answers its standard output (stderr goes to the log); fails unless
    /// it exits 0.
    pub async fn output_of(&self, what: &str, spec: &CommandSpec) -> Result<String, TaskError> {
        let (code, out) = run_captured(self.exec.as_ref(), spec, self.log).await?;
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

    /// On an SSH target where Hefring is root: the installation's nftables rules that keep
    /// the environments' users from link-local and metadata addresses (the cloud's metadata
    /// service hands out the machine's credentials). Idempotent; where `nft` is missing, said
    /// plainly and not fatal.
    pub async fn apply_network_rules(&self, script: &str) -> Result<(), TaskError> {
        if self.exec.is_local() || !self.is_root {
            return Ok(());
        }
        let spec = script_spec(
            r#"command -v nft >/dev/null 2>&1 || { echo "no nft"; exit 0; }; nft -f - && echo applied"#,
            &[],
        )
        .stdin(script);
        let (code, out) = run_captured(self.exec.as_ref(), &spec, self.log).await?;
        if code != Some(0) {
            return Err(TaskError::new(
                "installing the network rules (nft) failed on the target",
            ));
        }
        if out.contains("no nft") {
            self.log.info(
                "nftables is missing on the target: its sites can reach link-local and metadata addresses",
            );
        }
        Ok(())
    }

    /// Creates the directories and main configuration of Hefring's nginx and PHP-FPM on the
    /// target and starts whichever is down. Answers what it started.
    pub async fn ensure_servers(&self) -> Result<Vec<&'static str>, TaskError> {
        let nginx = self.nginx();
        let fpm = self.fpm();
        let mut dirs = vec![self.layout.root.clone(), self.layout.artifacts_dir()];
        dirs.extend(nginx.directories());
        dirs.extend(fpm.directories());
        self.mkdirs(&dirs, "755").await?;
        // Passable, not listable: environment ids are nobody else's business.
        self.mkdirs(std::slice::from_ref(&self.layout.environments_dir()), "711")
            .await?;
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
        if !self.running(&fpm.pid_file()).await? || fpm_changed {
            let action = if fpm_changed { "reload" } else { "ensure" };
            if self.fpm_control(action).await? {
                self.log.info("started PHP-FPM");
                started.push("php-fpm");
            }
        }
        if self.system_nginx().is_some() {
            // Not Hefring's to start: the system runs it.
        } else if !self.running(&nginx.pid_file()).await? {
            let bin = tool(&self.target, "nginx");
            let mut args = vec![nginx.pid_file(), bin];
            args.extend(nginx.argv(&[]));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = self
                .locked_output("starting nginx", NGINX_START, &args)
                .await?;
            if out.contains("started") {
                self.log.info("started nginx");
                started.push("nginx");
            }
        } else if nginx_changed {
            self.reload_nginx().await?;
        }
        Ok(started)
    }

    /// A fixed script run under the target's lock ([`Layout::lock_file`]): every step that
    /// starts, tests or reloads the shared servers, whichever worker or machine runs it.
    fn locked_spec(&self, script: &str, args: &[&str]) -> CommandSpec {
        let mut spec = script_spec(script, args);
        let mut argv = vec![
            "flock".to_string(),
            // Not inherited by what the script starts: a daemon must not keep the lock.
            "--close".into(),
            "-w".into(),
            "300".into(),
            self.layout.lock_file(),
        ];
        argv.append(&mut spec.argv);
        spec.argv = argv;
        spec
    }

    async fn locked_output(
        &self,
        what: &str,
        script: &str,
        args: &[&str],
    ) -> Result<String, TaskError> {
        self.output_of(what, &self.locked_spec(script, args)).await
    }

    /// [`FPM_CONTROL`] under the target's lock: `ensure` starts PHP-FPM if it is down, `reload`
    /// also tests and reloads it. Answers whether it started it.
    async fn fpm_control(&self, action: &str) -> Result<bool, TaskError> {
        let fpm = self.fpm();
        let bin = tool(&self.target, "php-fpm");
        let mut args = vec![action.to_string(), fpm.pid_file(), fpm.error_log(), bin];
        args.extend(fpm.argv(&[]));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let what = if action == "reload" {
            "reloading PHP-FPM"
        } else {
            "starting PHP-FPM"
        };
        let out = self.locked_output(what, FPM_CONTROL, &args).await?;
        Ok(out.contains("started"))
    }

    /// Tests the configuration, then reloads gracefully (or starts nginx if it is down), under
    /// the target's lock.
    pub async fn reload_nginx(&self) -> Result<(), TaskError> {
        if let Some(system) = self.system_nginx() {
            let mut args = vec![system.test_command.len().to_string()];
            args.extend(system.test_command.iter().cloned());
            args.extend(system.reload_command.iter().cloned());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.locked_output("reloading the system nginx", SYSTEM_NGINX_RELOAD, &args)
                .await?;
            return Ok(());
        }
        let nginx = self.nginx();
        let bin = tool(&self.target, "nginx");
        let mut args = vec![RELOAD_AND_WAIT.to_string(), nginx.pid_file(), bin];
        args.extend(nginx.argv(&[]));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.locked_output("reloading nginx", NGINX_RELOAD, &args)
            .await?;
        Ok(())
    }

    /// Tests the configuration, then reloads PHP-FPM gracefully (SIGUSR2: it re-executes
    /// itself keeping its sockets), or starts it if it is down, under the target's lock.
    pub async fn reload_fpm(&self) -> Result<(), TaskError> {
        self.fpm_control("reload").await.map(|_| ())
    }

    /// Makes sure the environment's user exists (see [`ENSURE_USER`]) and answers its uid.
    pub async fn ensure_user(&self, name: &str, home: &str) -> Result<u32, TaskError> {
        let web = self.accounts.web_user.clone().unwrap_or_default();
        let (min, max) = (
            isolation::ENVIRONMENT_UID_MIN.to_string(),
            isolation::ENVIRONMENT_UID_MAX.to_string(),
        );
        let out = self
            .sh_output(
                &format!("creating the user {name}"),
                ENSURE_USER,
                &[name, home, &web, isolation::USER_STATE_DIR, &min, &max],
            )
            .await?;
        out.lines()
            .find_map(|l| l.strip_prefix("uid "))
            .and_then(|uid| uid.trim().parse().ok())
            .ok_or_else(|| TaskError(format!("the user {name} has no uid")))
    }

    /// Removes the environment's user and group, and whatever still runs as it.
    pub async fn remove_user(&self, name: &str) -> Result<(), TaskError> {
        self.sh(
            &format!("removing the user {name}"),
            REMOVE_USER,
            &[name, isolation::USER_STATE_DIR],
        )
        .await
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
