//! PHP-FPM: the main configuration of Hefring's own PHP-FPM master on a target, and the pool
//! of one environment.
//!
//! How PHP-FPM reads these files (php-src `sapi/fpm/fpm/fpm_conf.c`, `fpm_env.c`, checked
//! against php-fpm 8.2 by the tests in `render/real.rs`):
//! - The file is read **line by line** and each line goes alone through PHP's INI parser
//!   (`zend_parse_ini_string`, `ZEND_INI_SCANNER_NORMAL`). A value can never span lines, even
//!   quoted.
//! - Unquoted values are INI expressions: `|`, `&`, `~`, `!`, `^`, `(`, `)` are operators and
//!   `yes`/`on`/`true` become `1`. So strings (paths, environment values) are written in double
//!   quotes, and booleans unquoted (`yes`), which is the only way PHP-FPM accepts them.
//! - Inside double quotes, `\"`, `\\` and `\$` are the only escapes (any other backslash stays
//!   as it is), and `${NAME}` is replaced by the environment variable or INI value `NAME`.
//! - After that, PHP-FPM replaces `$pool` anywhere in a string or `env[]` value by the pool's
//!   name; escaping cannot prevent it.
//! - An `env[]` value that then starts with `$` is replaced, when the master starts, by the
//!   master's own environment variable of that name (`$HOME` → the master's `HOME`).
//! - An empty `env[]` value is an error ("empty value").
//!
//! So [`env_value`] writes a value in double quotes with `\`, `"` and `$` escaped, and refuses
//! what cannot come through unchanged: empty values, values starting with `$` or containing
//! `$pool`, newlines, NUL and other control characters (tab is kept).
//!
//! Start the master with `php-fpm --fpm-config FILE` ([`FpmInstance::argv`]): it daemonizes
//! (a new session, like nginx) and writes its pid file; `-t` validates the files first.
//! `SIGUSR2` to the pid reloads it gracefully (it re-executes itself, keeping its listening
//! sockets; old workers get `process_control_timeout` to finish), `SIGQUIT` stops it
//! gracefully.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{check_account, check_environment_id, check_path, check_socket_path, RenderError};

/// Hefring's own PHP-FPM master on one target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpmInstance {
    /// The directory holding everything this PHP-FPM reads and writes, e.g. `ROOT/php-fpm`.
    pub dir: String,
    /// The account of Hefring's own idle pool (see [`master_config`]): the target's
    /// `web_user` when the master runs as root (PHP-FPM refuses to start a pool as root
    /// without one), `None` otherwise.
    pub user: Option<String>,
    pub group: Option<String>,
}

impl FpmInstance {
    pub fn config_file(&self) -> String {
        format!("{}/php-fpm.conf", self.dir)
    }
    pub fn pid_file(&self) -> String {
        format!("{}/php-fpm.pid", self.dir)
    }
    pub fn log_dir(&self) -> String {
        format!("{}/logs", self.dir)
    }
    /// The master's log; workers' stderr lands here too (`catch_workers_output`).
    pub fn error_log(&self) -> String {
        format!("{}/logs/error.log", self.dir)
    }
    /// The directory whose `*.conf` files the main configuration includes.
    pub fn pools_dir(&self) -> String {
        format!("{}/pools", self.dir)
    }
    /// Where an environment's pool goes.
    pub fn pool_file(&self, environment: &str) -> String {
        format!("{}/pools/{environment}.conf", self.dir)
    }
    pub fn socket_dir(&self) -> String {
        format!("{}/sock", self.dir)
    }
    /// An environment's socket. It must fit in 107 bytes, which bounds `dir` to 63.
    pub fn socket(&self, environment: &str) -> String {
        format!("{}/sock/{environment}.sock", self.dir)
    }
    /// The socket of Hefring's own idle pool; it answers FastCGI requests for `/ping` with
    /// `pong`.
    pub fn own_socket(&self) -> String {
        format!("{}/sock/hefring.sock", self.dir)
    }
    /// The PHP error log of an environment.
    pub fn php_error_log(&self, environment: &str) -> String {
        format!("{}/logs/{environment}.php.log", self.dir)
    }
    /// The directories to create (in this order) before PHP-FPM first starts.
    pub fn directories(&self) -> Vec<String> {
        vec![
            self.dir.clone(),
            self.log_dir(),
            self.pools_dir(),
            self.socket_dir(),
        ]
    }
    /// The arguments after the php-fpm binary: `[]` starts it, `["-t"]` tests the files.
    pub fn argv(&self, extra: &[&str]) -> Vec<String> {
        let mut argv = vec!["--fpm-config".to_string(), self.config_file()];
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv
    }

    fn check(&self) -> Result<(), RenderError> {
        check_path("fpm.dir", &self.dir)?;
        check_socket_path("fpm.dir", &self.own_socket())?;
        check_owner("fpm.user", &self.user, "fpm.group", &self.group)
    }
}

/// One environment's PHP-FPM pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolConfig {
    /// The environment's immutable id: the pool's name.
    pub id: String,
    /// [`FpmInstance::socket`].
    pub socket: String,
    /// The account PHP runs as: the target's `web_user` when Hefring runs as root, `None`
    /// otherwise (a master that is not root cannot switch users; the workers run as it).
    pub user: Option<String>,
    pub group: Option<String>,
    /// Owner and group of the socket, so that nginx's workers can connect: nginx's `user`
    /// (when root). `None` leaves them to PHP-FPM (the pool's user).
    pub listen_owner: Option<String>,
    pub listen_group: Option<String>,
    /// Permission bits of the socket, e.g. `0o660`.
    pub listen_mode: u32,
    /// [`FpmInstance::php_error_log`].
    pub error_log: String,
    /// `pm.max_children`: how many requests the environment runs at once.
    pub max_children: u32,
    /// The environment's variables, in order (`HEFRING_*`, `DATABASE_URL`, `DB_*`, ...).
    pub env: Vec<(String, String)>,
    /// What PHP may reach and use, when the pool runs as the environment's own user.
    pub php: Option<PhpSettings>,
}

/// The confinement and limits of one environment's PHP, set as `php_admin_value` so that the
/// site's code cannot raise them with `ini_set`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhpSettings {
    /// The only directories PHP opens files in (`open_basedir`): the environment's releases,
    /// files, database and temporary directories, and shared read-only libraries.
    pub open_basedir: Vec<String>,
    /// Uploads in flight, sessions and `sys_get_temp_dir()`: the environment's own.
    pub temp_dir: String,
    pub memory_mb: u32,
    pub upload_mb: u32,
    pub max_execution_seconds: u32,
}

impl PhpSettings {
    /// Safe defaults for a site (the site owner's tools will make them settable).
    pub fn defaults(open_basedir: Vec<String>, temp_dir: String) -> PhpSettings {
        PhpSettings {
            open_basedir,
            temp_dir,
            memory_mb: 256,
            upload_mb: 64,
            max_execution_seconds: 120,
        }
    }

    fn check(&self) -> Result<(), RenderError> {
        for (i, dir) in self.open_basedir.iter().enumerate() {
            let field = format!("php.open_basedir[{i}]");
            // A directory, written with its trailing '/' so that a sibling sharing its prefix
            // (`files2` beside `files`) is not let in.
            let Some(path) = dir.strip_suffix('/') else {
                return Err(RenderError::new(field, "must end with '/'"));
            };
            check_path(&field, path)?;
            if path.contains(':') {
                return Err(RenderError::new(field, "must not contain ':'"));
            }
        }
        check_path("php.temp_dir", &self.temp_dir)?;
        for (field, value) in [
            ("php.memory_mb", self.memory_mb),
            ("php.upload_mb", self.upload_mb),
            ("php.max_execution_seconds", self.max_execution_seconds),
        ] {
            if value == 0 || value > 65_536 {
                return Err(RenderError::new(field, "must be between 1 and 65536"));
            }
        }
        Ok(())
    }
}

impl PoolConfig {
    fn check(&self) -> Result<(), RenderError> {
        check_environment_id("id", &self.id)?;
        check_socket_path("socket", &self.socket)?;
        check_owner("user", &self.user, "group", &self.group)?;
        if let Some(owner) = &self.listen_owner {
            check_account("listen_owner", owner)?;
        }
        if let Some(group) = &self.listen_group {
            check_account("listen_group", group)?;
        }
        if self.listen_mode > 0o777 {
            return Err(RenderError::new(
                "listen_mode",
                "must be permission bits (at most 0777)",
            ));
        }
        check_path("error_log", &self.error_log)?;
        if let Some(php) = &self.php {
            php.check()?;
        }
        if self.max_children == 0 {
            return Err(RenderError::new("max_children", "must be at least 1"));
        }
        for (i, (name, value)) in self.env.iter().enumerate() {
            env_name(&format!("env[{i}]"), name)?;
            if self.env[..i].iter().any(|(n, _)| n == name) {
                return Err(RenderError::new(format!("env.{name}"), "is given twice"));
            }
            env_value(&format!("env.{name}"), value)?;
        }
        Ok(())
    }
}

fn check_owner(
    user_field: &str,
    user: &Option<String>,
    group_field: &str,
    group: &Option<String>,
) -> Result<(), RenderError> {
    if let Some(user) = user {
        check_account(user_field, user)?;
    }
    if let Some(group) = group {
        check_account(group_field, group)?;
        if user.is_none() {
            return Err(RenderError::new(
                group_field,
                format!("can only be given together with {user_field}"),
            ));
        }
    }
    Ok(())
}

/// An environment variable's name: a letter or `_`, then letters, digits and `_`.
pub fn env_name(field: &str, name: &str) -> Result<(), RenderError> {
    let b = name.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_');
    if valid {
        Ok(())
    } else {
        Err(RenderError::new(
            field,
            format!(
                "{name:?} is not a variable name: a letter or '_', then letters, digits or '_'"
            ),
        ))
    }
}

/// A string as PHP-FPM's INI syntax reads it back unchanged: in double quotes, with `\`, `"`
/// and `$` escaped. Refuses what PHP-FPM cannot carry through (see the module's notes).
pub fn env_value(field: &str, value: &str) -> Result<String, RenderError> {
    if value.is_empty() {
        return Err(RenderError::new(
            field,
            "is empty, and PHP-FPM refuses empty environment values",
        ));
    }
    if let Some(c) = value.chars().find(|&c| c.is_control() && c != '\t') {
        return Err(RenderError::new(
            field,
            format!(
                "contains the control character {c:?}; PHP-FPM reads its configuration line by line and cannot carry newlines, NUL or other control characters"
            ),
        ));
    }
    if value.starts_with('$') {
        return Err(RenderError::new(
            field,
            "starts with '$', which PHP-FPM would replace by the master's environment variable of that name",
        ));
    }
    if value.contains("$pool") {
        return Err(RenderError::new(
            field,
            "contains '$pool', which PHP-FPM would replace by the pool's name",
        ));
    }
    Ok(quote(value))
}

/// `value` in double quotes for PHP-FPM's INI syntax. For values already known to be safe
/// (checked paths, names): no newline, no `$pool`.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '\\' | '"' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The main configuration of Hefring's PHP-FPM on a target ([`FpmInstance::config_file`]).
///
/// Besides the global settings and the `include` of the pools directory it defines one idle
/// pool of Hefring's own (`ondemand`, so no process until asked): PHP-FPM refuses to start or
/// reload without any pool, and a target whose last environment was deleted must still
/// reload cleanly. Its socket answers `/ping`.
pub fn master_config(instance: &FpmInstance) -> Result<String, RenderError> {
    instance.check()?;
    let mut out = String::new();
    let o = &mut out;
    line(
        o,
        "; Hefring's own PHP-FPM for this target. Generated by Hefring: do not edit.",
    );
    line(o, "[global]");
    line(o, &format!("pid = {}", quote(&instance.pid_file())));
    line(o, &format!("error_log = {}", quote(&instance.error_log())));
    line(o, "log_level = notice");
    // Started by Hefring and left running (a new session, it outlives the command that
    // started it).
    line(o, "daemonize = yes");
    line(o, "emergency_restart_threshold = 10");
    line(o, "emergency_restart_interval = 1m");
    // How long workers get to finish their requests on a graceful reload (SIGUSR2) or stop
    // (SIGQUIT) before they are killed.
    line(o, "process_control_timeout = 30s");
    line(
        o,
        &format!(
            "include = {}",
            quote(&format!("{}/*.conf", instance.pools_dir()))
        ),
    );
    line(o, "");
    line(
        o,
        "; Hefring's own idle pool: PHP-FPM needs at least one pool to start.",
    );
    line(o, "[hefring]");
    if let Some(user) = &instance.user {
        line(o, &format!("user = {}", quote(user)));
    }
    if let Some(group) = &instance.group {
        line(o, &format!("group = {}", quote(group)));
    }
    line(o, &format!("listen = {}", quote(&instance.own_socket())));
    line(o, "listen.mode = 0600");
    line(o, "pm = ondemand");
    line(o, "pm.max_children = 1");
    line(o, "pm.process_idle_timeout = 10s");
    line(o, "ping.path = /ping");
    line(o, "ping.response = pong");
    Ok(out)
}

/// An environment's pool, for [`FpmInstance::pool_file`].
pub fn pool(pool: &PoolConfig) -> Result<String, RenderError> {
    pool.check()?;
    let mut out = String::new();
    let o = &mut out;
    line(
        o,
        &format!(
            "; PHP-FPM pool of Hefring environment {}. Generated by Hefring: do not edit.",
            pool.id
        ),
    );
    line(o, &format!("[{}]", pool.id));
    if let Some(user) = &pool.user {
        line(o, &format!("user = {}", quote(user)));
    }
    if let Some(group) = &pool.group {
        line(o, &format!("group = {}", quote(group)));
    }
    line(o, &format!("listen = {}", quote(&pool.socket)));
    if let Some(owner) = &pool.listen_owner {
        line(o, &format!("listen.owner = {}", quote(owner)));
    }
    if let Some(group) = &pool.listen_group {
        line(o, &format!("listen.group = {}", quote(group)));
    }
    line(o, &format!("listen.mode = {:04o}", pool.listen_mode));
    line(o, "");
    // Processes start when requests come and stop when idle: a target holds many quiet
    // environments.
    line(o, "pm = ondemand");
    line(o, &format!("pm.max_children = {}", pool.max_children));
    line(o, "pm.process_idle_timeout = 10s");
    line(o, "pm.max_requests = 500");
    line(o, "request_terminate_timeout = 300s");
    line(o, "security.limit_extensions = .php");
    line(o, "");
    line(o, "catch_workers_output = yes");
    line(o, "decorate_workers_output = no");
    line(o, "php_admin_flag[log_errors] = on");
    line(
        o,
        &format!("php_admin_value[error_log] = {}", quote(&pool.error_log)),
    );
    if let Some(php) = &pool.php {
        line(o, "");
        line(
            o,
            "; The environment's own directories only, and limits the site cannot raise.",
        );
        line(
            o,
            &format!(
                "php_admin_value[open_basedir] = {}",
                quote(&php.open_basedir.join(":"))
            ),
        );
        for key in ["upload_tmp_dir", "sys_temp_dir", "session.save_path"] {
            line(
                o,
                &format!("php_admin_value[{key}] = {}", quote(&php.temp_dir)),
            );
        }
        line(
            o,
            &format!("php_admin_value[memory_limit] = {}M", php.memory_mb),
        );
        line(
            o,
            &format!("php_admin_value[upload_max_filesize] = {}M", php.upload_mb),
        );
        line(
            o,
            &format!("php_admin_value[post_max_size] = {}M", php.upload_mb),
        );
        line(
            o,
            &format!(
                "php_admin_value[max_execution_time] = {}",
                php.max_execution_seconds
            ),
        );
    }
    line(o, "");
    // Only the variables below reach PHP, not the master's environment.
    line(o, "clear_env = yes");
    for (name, value) in &pool.env {
        // Checked in PoolConfig::check.
        let value = env_value(&format!("env.{name}"), value)?;
        line(o, &format!("env[{name}] = {value}"));
    }
    Ok(out)
}

fn line(out: &mut String, text: &str) {
    let _ = writeln!(out, "{text}");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::render::nginx::tests::{ID, ROOT};

    pub(crate) fn instance() -> FpmInstance {
        FpmInstance {
            dir: format!("{ROOT}/php-fpm"),
            user: Some("www-data".into()),
            group: Some("www-data".into()),
        }
    }

    pub(crate) fn pool_config() -> PoolConfig {
        let fpm = instance();
        PoolConfig {
            id: ID.into(),
            socket: fpm.socket(ID),
            user: Some("www-data".into()),
            group: Some("www-data".into()),
            listen_owner: Some("www-data".into()),
            listen_group: Some("www-data".into()),
            listen_mode: 0o660,
            error_log: fpm.php_error_log(ID),
            max_children: 8,
            env: vec![
                ("HEFRING_ENVIRONMENT".into(), "shop".into()),
                ("HEFRING_ENVIRONMENT_ID".into(), ID.into()),
                (
                    "DATABASE_URL".into(),
                    "mysql://u:p%40ss@127.0.0.1:3306/db".into(),
                ),
                ("DB_PASSWORD".into(), r#"a"b\c$d${HOME};#'e"#.into()),
            ],
            php: Some(PhpSettings::defaults(
                vec![
                    format!("{ROOT}/environments/{ID}/releases/"),
                    format!("{ROOT}/environments/{ID}/files/"),
                    format!("{ROOT}/environments/{ID}/tmp/"),
                ],
                format!("{ROOT}/environments/{ID}/tmp"),
            )),
        }
    }

    #[test]
    fn snapshot_master_config() {
        insta::assert_snapshot!(master_config(&instance()).unwrap());
    }

    #[test]
    fn snapshot_pool() {
        insta::assert_snapshot!(pool(&pool_config()).unwrap());
    }

    #[test]
    fn snapshot_pool_without_root() {
        let config = PoolConfig {
            user: None,
            group: None,
            listen_owner: None,
            listen_group: None,
            env: vec![],
            ..pool_config()
        };
        insta::assert_snapshot!(pool(&config).unwrap());
    }

    #[test]
    fn values_are_quoted_and_escaped() {
        assert_eq!(env_value("v", "plain").unwrap(), r#""plain""#);
        assert_eq!(
            env_value("v", r#"a"b\c$d${HOME}"#).unwrap(),
            r#""a\"b\\c\$d\${HOME}""#
        );
        assert_eq!(env_value("v", "tab\there").unwrap(), "\"tab\there\"");
        assert_eq!(
            env_value("v", ";# = [x] {y} |&~!^() é").unwrap(),
            "\";# = [x] {y} |&~!^() é\""
        );
    }

    #[test]
    fn values_php_fpm_cannot_carry_are_refused() {
        for bad in [
            "", "a\nb", "a\rb", "a\0b", "\n", "a\u{7f}", "a\u{85}", "$HOME", "$", "x$pool", "$pool",
        ] {
            let err = env_value("env.DB_PASSWORD", bad).unwrap_err();
            assert_eq!(err.field, "env.DB_PASSWORD", "{bad:?}");
        }
        // A '$' inside is fine: only a leading one means "the master's variable".
        assert!(env_value("v", "a$HOME").is_ok());
        assert!(env_value("v", "a$poo").is_ok());

        let config = PoolConfig {
            env: vec![("SECRET".into(), "line1\nline2".into())],
            ..pool_config()
        };
        let err = pool(&config).unwrap_err();
        assert_eq!(err.field, "env.SECRET");
        assert!(err.message.contains("line by line"), "{err}");
    }

    #[test]
    fn names_and_paths_are_checked() {
        for bad in ["", "1X", "A-B", "A B", "A]", "A=B", "é"] {
            let config = PoolConfig {
                env: vec![("OK".into(), "x".into()), (bad.into(), "x".into())],
                ..pool_config()
            };
            assert_eq!(pool(&config).unwrap_err().field, "env[1]", "{bad:?}");
        }
        let config = PoolConfig {
            env: vec![("A".into(), "x".into()), ("A".into(), "y".into())],
            ..pool_config()
        };
        assert_eq!(pool(&config).unwrap_err().field, "env.A");

        for (field, config) in [
            (
                "socket",
                PoolConfig {
                    socket: "/srv/x.sock\nuser = root".into(),
                    ..pool_config()
                },
            ),
            (
                "error_log",
                PoolConfig {
                    error_log: "/srv/$pool.log".into(),
                    ..pool_config()
                },
            ),
            (
                "error_log",
                PoolConfig {
                    error_log: "/srv/x\"; y".into(),
                    ..pool_config()
                },
            ),
            (
                "user",
                PoolConfig {
                    user: Some("root\nlisten = /tmp/x".into()),
                    ..pool_config()
                },
            ),
            (
                "id",
                PoolConfig {
                    id: "global".into(),
                    ..pool_config()
                },
            ),
            (
                "listen_mode",
                PoolConfig {
                    listen_mode: 0o1777,
                    ..pool_config()
                },
            ),
            (
                "max_children",
                PoolConfig {
                    max_children: 0,
                    ..pool_config()
                },
            ),
        ] {
            assert_eq!(pool(&config).unwrap_err().field, field);
        }
        for bad in ["/srv/x;", "/srv/x\n", "srv"] {
            let err = master_config(&FpmInstance {
                dir: bad.into(),
                ..instance()
            })
            .unwrap_err();
            assert_eq!(err.field, "fpm.dir", "{bad:?}");
        }
    }
}
