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
