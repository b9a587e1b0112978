//! Configuration files for Hefring's own nginx and PHP-FPM on a server target, rendered from
//! plain data. Pure: every function takes values and returns text or a [`RenderError`]; writing
//! the files, testing them (`nginx -t`, `php-fpm -t`) and reloading belong to the engine.
//!
//! Every value that reaches a file is either checked so it cannot be read as syntax (paths by
//! [`validate::config_path`], domains by [`validate::domain`], ids by their shape, user names
//! below) or escaped for the file's syntax (PHP-FPM environment values, HTML). Names of files,
//! sockets, pools and logs derive from the environment's immutable id, never from its name.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::IdKind;
use crate::validate::{self, FieldError};

pub mod fpm;
pub mod nginx;

#[cfg(test)]
mod real;

/// Why a configuration was not rendered: the field at fault and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct RenderError {
    pub field: String,
    pub message: String,
}

impl RenderError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        RenderError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for RenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl From<FieldError> for RenderError {
    fn from(e: FieldError) -> Self {
        RenderError {
            field: e.field,
            message: e.message,
        }
    }
}

/// Whether and how an environment answers over HTTPS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Https {
    /// HTTP only.
    #[default]
    Off,
    /// HTTP and HTTPS both serve the site.
    On,
    /// HTTPS serves the site; HTTP answers 301 to HTTPS (except ACME challenges).
    Required,
}

impl Https {
    pub fn as_str(self) -> &'static str {
        match self {
            Https::Off => "off",
            Https::On => "on",
            Https::Required => "required",
        }
    }

    pub fn parse(s: &str) -> Option<Https> {
        match s {
            "off" => Some(Https::Off),
            "on" => Some(Https::On),
            "required" => Some(Https::Required),
            _ => None,
        }
    }
}

/// The longest path a unix socket can have on Linux (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

pub(crate) fn check_path(field: &str, value: &str) -> Result<(), RenderError> {
    validate::config_path(field, value).map_err(RenderError::from)
}

pub(crate) fn check_socket_path(field: &str, value: &str) -> Result<(), RenderError> {
    check_path(field, value)?;
    // On a graceful reload (SIGUSR2) PHP-FPM hands its listening sockets to its new self in
    // the variable FPM_SOCKETS=path=fd,path=fd: a path with ',' or '=' is cut there, the
    // socket is not recognised as inherited, and the reload fails with "Another FPM instance
    // seems to already listen on ...".
    if let Some(c) = value.chars().find(|&c| c == ',' || c == '=') {
        return Err(RenderError::new(
            field,
            format!("must not contain {c:?}: PHP-FPM cannot reload with such a socket path"),
        ));
    }
    if value.len() > MAX_SOCKET_PATH {
        return Err(RenderError::new(
            field,
            format!(
                "is {} bytes long; a unix socket path holds at most {MAX_SOCKET_PATH} (choose a shorter target root)",
                value.len()
            ),
        ));
    }
    Ok(())
}

pub(crate) fn check_environment_id(field: &str, value: &str) -> Result<(), RenderError> {
    if IdKind::Environment.matches(value) {
        Ok(())
    } else {
        Err(RenderError::new(
            field,
            "must be an environment id (env_...)",
        ))
    }
}

/// A user or group name as `useradd` accepts it: letters, digits, `_`, `-` and `.`, not
/// starting with `-` or `.`, at most 32 characters.
pub(crate) fn check_account(field: &str, value: &str) -> Result<(), RenderError> {
    let b = value.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= 32
        && b[0] != b'-'
        && b[0] != b'.'
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(RenderError::new(
            field,
            "must be a user or group name: 1-32 letters, digits, '_', '-' or '.', not starting with '-' or '.'",
        ))
    }
}

pub(crate) fn check_port(field: &str, value: u16) -> Result<(), RenderError> {
    if value == 0 {
        Err(RenderError::new(field, "must be a port from 1 to 65535"))
    } else {
        Ok(())
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            html_escape(r#"<a href="x">Tom & 'Jerry'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn accounts() {
        for ok in ["www-data", "nobody", "_php", "web.user", "u1"] {
            assert!(check_account("web_user", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a b", "a;b", "a$", &"a".repeat(33), "é"] {
            assert_eq!(
                check_account("web_user", bad).unwrap_err().field,
                "web_user",
                "{bad}"
            );
        }
    }

    #[test]
    fn socket_paths_fit_in_sun_path() {
        let ok = format!("/{}", "s".repeat(MAX_SOCKET_PATH - 1));
        assert!(check_socket_path("socket", &ok).is_ok());
        let long = format!("/{}", "s".repeat(MAX_SOCKET_PATH));
        let err = check_socket_path("socket", &long).unwrap_err();
        assert_eq!(err.field, "socket");
        assert!(err.message.contains("107"), "{err}");
        for bad in ["/srv/a,b/x.sock", "/srv/a=b/x.sock", "/srv/a;b/x.sock"] {
            assert_eq!(
                check_socket_path("socket", bad).unwrap_err().field,
                "socket"
            );
        }
    }
}
