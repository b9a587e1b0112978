//! Targets: where environments run. Parsing of the `host` field, and the verdict of a verify
//! from what the probe found on the machine.

use serde::{Deserialize, Serialize};

use crate::validate::FieldError;

/// How a server target is reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "lowercase")]
pub enum Host {
    Local,
    Ssh {
        user: String,
        host: String,
        port: u16,
    },
}

impl Host {
    /// Parses `local` or `ssh://user@host[:port]`.
    pub fn parse(field: &str, value: &str) -> Result<Host, FieldError> {
        if value == "local" {
            return Ok(Host::Local);
        }
        let refuse = || {
            FieldError::new(
                field,
                "must be 'local' or 'ssh://user@host:port' (user and host of letters, digits, '.', '_' and '-')",
            )
        };
        let rest = value.strip_prefix("ssh://").ok_or_else(refuse)?;
        let (user, host_port) = rest.split_once('@').ok_or_else(refuse)?;
        let (host, port) = match host_port.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| refuse())?),
            None => (host_port, 22),
        };
        let word = |s: &str| {
            !s.is_empty()
                && !s.starts_with('-')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        if !word(user) || !word(host) || port == 0 {
            return Err(refuse());
        }
        Ok(Host::Ssh {
            user: user.into(),
            host: host.into(),
            port,
        })
    }

    pub fn render(&self) -> String {
        match self {
            Host::Local => "local".into(),
            Host::Ssh { user, host, port } => format!("ssh://{user}@{host}:{port}"),
        }
    }
}

/// How Hefring reaches a server target's database servers as an administrator, to create and
/// drop each environment's database and user. Passwords here never leave the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetSettings {
    pub mariadb: MariadbAdmin,
    pub postgresql: PostgresqlAdmin,
    /// `None`: Hefring runs its own nginx on the target. Set: the Aegir3 layout, where a
    /// system-managed nginx includes the directory Hefring writes server blocks into.
    pub system_nginx: Option<SystemNginx>,
    /// Operations on the target and its environments go to the queue
    /// `hefring.target.<id>` ([`target_queue`]), served by workers started with
    /// `--queues hefring.target.<id>` (next to the target's network), instead of `hefring`.
    pub own_queue: bool,
    /// Whether each environment must run as its own Unix user (which needs Hefring to be
    /// root on the target). `required`, the default, refuses to deploy where it cannot be.
    pub isolation: Isolation,
}

/// Whether a target must isolate its environments from one another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Every environment runs as its own user; a deploy is refused where Hefring is not root.
    #[default]
    Required,
    /// Where Hefring is not root (a developer's machine), every site runs as Hefring's own
    /// user and can read the others': for trying Hefring out, never for hosting.
    Optional,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Required => "required",
            Isolation::Optional => "optional",
        }
    }
}

/// The queue of a target that has its own.
pub fn target_queue(target_id: &str) -> String {
    format!("hefring.target.{target_id}")
}

/// A system-managed nginx that serves Hefring's server blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemNginx {
    /// The directory whose `*.conf` the system nginx includes in its `http` block.
    pub sites_dir: String,
    /// The command (argv) that tests its configuration.
    #[serde(default = "default_nginx_test")]
    pub test_command: Vec<String>,
    /// The command (argv) that reloads it gracefully.
    #[serde(default = "default_nginx_reload")]
    pub reload_command: Vec<String>,
}

fn default_nginx_test() -> Vec<String> {
    vec!["nginx".into(), "-t".into(), "-q".into()]
}

fn default_nginx_reload() -> Vec<String> {
    vec!["nginx".into(), "-s".into(), "reload".into()]
}

impl SystemNginx {
    pub fn new(sites_dir: String, test: Option<Vec<String>>, reload: Option<Vec<String>>) -> Self {
        SystemNginx {
            sites_dir,
            test_command: test.unwrap_or_else(default_nginx_test),
            reload_command: reload.unwrap_or_else(default_nginx_reload),
        }
    }
}

/// MariaDB (or MySQL) administration: by default root over the unix socket, as Debian sets up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MariadbAdmin {
    /// The unix socket; when set, `host` is not used and sites connect to `localhost`.
    pub socket: Option<String>,
    pub host: Option<String>,
    pub port: u16,
    pub user: String,
    pub password: Option<crate::Secret<String>>,
}

impl Default for MariadbAdmin {
    fn default() -> Self {
        MariadbAdmin {
            socket: Some("/run/mysqld/mysqld.sock".into()),
            host: None,
            port: 3306,
            user: "root".into(),
            password: None,
        }
    }
}

impl MariadbAdmin {
    /// The host name sites use: `localhost` (the socket) or the configured host.
    pub fn site_host(&self) -> String {
        match (&self.socket, &self.host) {
            (Some(_), _) | (None, None) => "localhost".into(),
            (None, Some(host)) => host.clone(),
        }
    }
}

/// PostgreSQL administration: by default `postgres` on 127.0.0.1:5432.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresqlAdmin {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<crate::Secret<String>>,
}

impl Default for PostgresqlAdmin {
    fn default() -> Self {
        PostgresqlAdmin {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
        }
    }
}

impl TargetSettings {
    /// Refuses values that could be read as options or that no server accepts.
    pub fn check(&self) -> Result<(), FieldError> {
        let word = |field: &str, value: &str| {
            let ok = !value.is_empty()
                && value.len() <= 255
                && !value.starts_with('-')
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
            if ok {
                Ok(())
            } else {
                Err(FieldError::new(
                    field,
                    "must be letters, digits, '.', '_', '-' or ':', not starting with '-'",
                ))
            }
        };
        let secret = |field: &str, value: &str| {
            if value.is_empty() || value.chars().any(|c| c.is_control()) {
                Err(FieldError::new(
                    field,
                    "must be non-empty, without control characters",
                ))
            } else {
                Ok(())
            }
        };
        if let Some(nginx) = &self.system_nginx {
            crate::validate::setting_path("system_nginx.sites_dir", &nginx.sites_dir)?;
        }
        if let Some(socket) = &self.mariadb.socket {
            crate::validate::setting_path("mariadb.socket", socket)?;
        }
        if let Some(host) = &self.mariadb.host {
            word("mariadb.host", host)?;
        }
        word("mariadb.user", &self.mariadb.user)?;
        if let Some(p) = &self.mariadb.password {
            secret("mariadb.password", p.expose())?;
        }
        if self.mariadb.port == 0 {
            return Err(FieldError::new(
                "mariadb.port",
                "must be a port from 1 to 65535",
            ));
        }
        word("postgresql.host", &self.postgresql.host)?;
        word("postgresql.user", &self.postgresql.user)?;
        if let Some(p) = &self.postgresql.password {
            secret("postgresql.password", p.expose())?;
        }
        if self.postgresql.port == 0 {
            return Err(FieldError::new(
                "postgresql.port",
                "must be a port from 1 to 65535",
            ));
        }
        Ok(())
    }
}

/// Tools an environment on a server target cannot do without.
pub const REQUIRED_TOOLS: &[&str] = &["sh", "tar", "nginx", "php-fpm", "php"];
/// Tools reported when present; an environment that needs one fails its own checks.
pub const OPTIONAL_TOOLS: &[&str] = &[
    "git",
    "zstd",
    "mariadb",
    "mysqldump",
    "psql",
    "pg_dump",
    "sqlite3",
    "openssl",
];

/// What the probe found: the OS, and which tools and services are there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    pub os: String,
    pub kernel: String,
    /// Tool name and the path it was found at (`None` when missing).
    pub tools: Vec<(String, Option<String>)>,
    /// Service name and whether it answered.
    pub services: Vec<(String, bool)>,
}

/// The verdict of a verify: the target fails only when it lacks something every environment
/// on it needs.
pub fn missing_requirements(found: &Inspection) -> Vec<String> {
    REQUIRED_TOOLS
        .iter()
        .filter(|tool| {
            !found
                .tools
                .iter()
                .any(|(name, path)| name == *tool && path.is_some())
        })
        .map(|t| t.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(Host::parse("host", "local").unwrap(), Host::Local);
        assert_eq!(
            Host::parse("host", "ssh://deploy@web1.example.com:2222").unwrap(),
            Host::Ssh {
                user: "deploy".into(),
                host: "web1.example.com".into(),
                port: 2222
            }
        );
        assert_eq!(
            Host::parse("host", "ssh://root@10.0.0.1").unwrap().render(),
            "ssh://root@10.0.0.1:22"
        );
        for bad in [
            "",
            "remote",
            "ssh://host",
            "ssh://@h",
            "ssh://u@-oProxyCommand=x",
            "ssh://u@h:0",
            "ssh://u@h:99999",
            "ssh://u@h;rm",
            "ssh://u@h x",
        ] {
            assert_eq!(Host::parse("host", bad).unwrap_err().field, "host", "{bad}");
        }
    }

    #[test]
    fn verdict_names_what_is_missing() {
        let mut found = Inspection::default();
        for tool in REQUIRED_TOOLS {
            found
                .tools
                .push((tool.to_string(), Some(format!("/usr/bin/{tool}"))));
        }
        assert!(missing_requirements(&found).is_empty());
        found.tools.retain(|(n, _)| n != "nginx");
        found.tools.push(("php-fpm".into(), None));
        assert_eq!(missing_requirements(&found), ["nginx"]);
        found.tools.retain(|(n, _)| n != "php-fpm");
        assert_eq!(missing_requirements(&found), ["nginx", "php-fpm"]);
    }
}
