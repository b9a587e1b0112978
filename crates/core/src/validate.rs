//! Validation of user input at the edge. Every rule refuses; nothing is silently normalised.

use std::fmt;

/// Why a field was refused. The API answers it as 422 `invalid_field` naming `field`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 63 {
        return false;
    }
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    ok(b[0]) && ok(b[b.len() - 1]) && b.iter().all(|&c| ok(c) || c == b'-')
}

/// Names of targets, projects and environments: `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`.
pub fn name(field: &str, value: &str) -> Result<(), FieldError> {
    if is_label(value) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be 1-63 lower-case letters, digits or '-', starting and ending with a letter or digit",
        ))
    }
}

/// Lower-case RFC 1123 host names; each label as a name; at most 253 characters.
pub fn domain(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() || value.len() > 253 {
        return Err(FieldError::new(field, "must be 1-253 characters long"));
    }
    if value.split('.').all(is_label) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be a lower-case host name: labels of letters, digits and '-', separated by '.'",
        ))
    }
}

/// git URLs: `https://`, `http://`, `ssh://`, `git://`, `file://`, scp-like `user@host:path`, or
/// an absolute local path. Transport helpers (`ext::`, `fd::`), options (`-...`) and control
/// characters are refused, because git would execute or interpret them.
pub fn git_url(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > 2048 {
        return Err(FieldError::new(field, "must be at most 2048 characters"));
    }
    if value.starts_with('-') {
        return Err(FieldError::new(field, "must not start with '-'"));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(FieldError::new(
            field,
            "must not contain whitespace or control characters",
        ));
    }
    if value.contains("::") {
        return Err(FieldError::new(
            field,
            "transport helpers such as ext:: are not allowed",
        ));
    }
    const SCHEMES: [&str; 5] = ["https://", "http://", "ssh://", "git://", "file://"];
    if let Some(scheme) = SCHEMES.iter().find(|s| value.starts_with(*s)) {
        if value.len() == scheme.len() {
            return Err(FieldError::new(field, "has nothing after the scheme"));
        }
        return Ok(());
    }
    if value.starts_with('/') {
        return Ok(());
    }
    if value.contains("://") {
        return Err(FieldError::new(
            field,
            "scheme must be one of https, http, ssh, git, file",
        ));
    }
    // scp-like: user@host:path, where the part before ':' has no '/'.
    if let Some((user_host, path)) = value.split_once(':') {
        if let Some((user, host)) = user_host.split_once('@') {
            if !user.is_empty() && !host.is_empty() && !user_host.contains('/') && !path.is_empty()
            {
                return Ok(());
            }
        }
    }
    Err(FieldError::new(
        field,
        "must be an https://, http://, ssh://, git:// or file:// URL, user@host:path, or an absolute path",
    ))
}

/// A branch, tag or commit as given to `git`: refused if git could read it as an option or a
/// revision expression.
pub fn git_ref(field: &str, value: &str) -> Result<(), FieldError> {
    let valid = !value.is_empty()
        && value.len() <= 255
        && !value.starts_with('-')
        && !value.starts_with('/')
        && !value.ends_with('/')
        && !value.ends_with(".lock")
        && !value.ends_with('.')
        && !value.contains("..")
        && !value.contains("//")
        && !value.contains("@{")
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if valid {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be a branch, tag or commit: letters, digits, '.', '_', '-' and '/', not starting with '-'",
        ))
    }
}

/// Whether `value` is a full, lower-case SHA-1 commit id.
pub fn is_full_commit(value: &str) -> bool {
    value.len() == 40
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A path inside a release tree: relative, without `..`, `.` segments or control characters.
pub fn relative_path(field: &str, value: &str) -> Result<(), FieldError> {
    let valid = !value.is_empty()
        && !value.starts_with('/')
        && !value.chars().any(|c| c.is_control())
        && value
            .split('/')
            .all(|seg| !seg.is_empty() && seg != ".." && seg != ".");
    if valid || value == "." {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            "must be a relative path inside the repository, without '..'",
        ))
    }
}

/// An absolute path that Hefring writes into an nginx or PHP-FPM configuration file:
/// refused unless it starts with '/', and refused if it holds anything a configuration parser
/// could read as syntax (whitespace, quotes, `;`, `{`, `}`, `$`, `#`, `\`, control characters),
/// glob characters (`*`, `?`, `[`, `]`: nginx and PHP-FPM expand `include` patterns with
/// glob(3)), or a `.`/`..` segment, `//` or a trailing `/`. At most 1024 bytes.
pub fn config_path(field: &str, value: &str) -> Result<(), FieldError> {
    if !value.starts_with('/') {
        return Err(FieldError::new(field, "must be an absolute path"));
    }
    if value.len() > 1024 {
        return Err(FieldError::new(field, "must be at most 1024 bytes"));
    }
    if let Some(c) = value.chars().find(|&c| {
        c.is_control()
            || c.is_whitespace()
            || matches!(
                c,
                '"' | '\'' | '`' | ';' | '{' | '}' | '$' | '#' | '\\' | '*' | '?' | '[' | ']'
            )
    }) {
        return Err(FieldError::new(
            field,
            format!(
                "must not contain whitespace, quotes, ';', '{{', '}}', '$', '#', '\\', '*', '?', '[', ']' or control characters (found {c:?})"
            ),
        ));
    }
    let segments_ok = value == "/"
        || value[1..]
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if !segments_ok {
        return Err(FieldError::new(
            field,
            "must not contain '.' or '..' segments, '//' or a trailing '/'",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        for ok in ["a", "site-1", "0", &"a".repeat(63)] {
            assert!(name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64), "é"] {
            assert_eq!(name("name", bad).unwrap_err().field, "name", "{bad}");
        }
    }

    #[test]
    fn domains() {
        for ok in [
            "example.com",
            "a.test",
            "x.localhost",
            "localhost",
            "a-b.c-d.e",
        ] {
            assert!(domain("domain", ok).is_ok(), "{ok}");
        }
        let long = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        for bad in [
            "",
            "Example.com",
            "a..b",
            ".a",
            "a.",
            "a_b.c",
            "-a.b",
            &long,
            "a b",
        ] {
            assert!(domain("domain", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn git_urls() {
        for ok in [
            "https://example.com/x.git",
            "http://h/x",
            "ssh://git@h:22/x.git",
            "git://h/x",
            "file:///srv/x.git",
            "git@github.com:org/repo.git",
            "/srv/git/repo",
        ] {
            assert!(git_url("git_url", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-uhttps://x",
            "--upload-pack=touch /tmp/x",
            "ext::sh -c touch% /tmp/pwned",
            "fd::17",
            "https://x\n",
            "ftp://x/y",
            "relative/path",
            "https://",
            "foo:bar",
        ] {
            assert!(git_url("git_url", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn git_refs() {
        for ok in ["main", "v1.2.3", "feature/x", "0123abc", "release-2024_1"] {
            assert!(git_ref("ref", ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-x", "--all", "a..b", "HEAD@{1}", "a b", "a~1", "a^", "x.lock", "/a", "a/",
        ] {
            assert!(git_ref("ref", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relative_paths() {
        for ok in [".", "web", "sites/default/files"] {
            assert!(relative_path("docroot", ok).is_ok(), "{ok}");
        }
        for bad in ["", "/etc", "../x", "a/../b", "a//b", "a/./b"] {
            assert!(relative_path("docroot", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_paths() {
        for ok in [
            "/",
            "/srv/hefring",
            "/srv/hefring/envs/env_x/current/web",
            "/a-b_c.d/e@f+g=h,i:j%k",
        ] {
            assert!(config_path("root", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "relative",
            "/a b",
            "/a\tb",
            "/a\nb",
            "/a;b",
            "/a{b",
            "/a}b",
            "/a$b",
            "/a#b",
            "/a\"b",
            "/a'b",
            "/a*b",
            "/a?b",
            "/a[b]",
            "/a\\b",
            "/a\0b",
            "/a\u{85}b",
            "/a/../b",
            "/a/./b",
            "/a//b",
            "/a/",
            &format!("/{}", "a".repeat(1024)),
        ] {
            assert_eq!(
                config_path("root", bad).unwrap_err().field,
                "root",
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn accepted_names_match_the_documented_regex(s in "\\PC{0,70}") {
            let re_like = {
                let b = s.as_bytes();
                let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
                !b.is_empty() && b.len() <= 63 && ok(b[0]) && ok(b[b.len()-1])
                    && b.iter().all(|&c| ok(c) || c == b'-')
            };
            prop_assert_eq!(name("n", &s).is_ok(), re_like);
        }

        #[test]
        fn accepted_git_urls_never_start_with_a_dash_or_hold_controls(s in "\\PC{0,40}|-[a-z]{0,10}|ext::[a-z ]{0,10}") {
            if git_url("u", &s).is_ok() {
                prop_assert!(!s.starts_with('-'));
                prop_assert!(!s.contains("::"));
                prop_assert!(!s.chars().any(char::is_control));
            }
        }

        #[test]
        fn accepted_config_paths_hold_no_syntax(s in "/[a-z/.;{}$# \"'\\\\*?\\[\\]\n\t-]{0,20}") {
            if config_path("p", &s).is_ok() {
                let syntax = ";{}$#\"'\\*?[]";
                let bad = |c: char| c.is_whitespace() || c.is_control() || syntax.contains(c);
                prop_assert!(s.starts_with('/'));
                prop_assert!(!s.split('/').any(|seg| seg == ".." || seg == "."));
                prop_assert!(!s.chars().any(bad));
            }
        }

        #[test]
        fn accepted_refs_are_never_options(s in "[-a-z./@{}~^ ]{0,12}") {
            if git_ref("r", &s).is_ok() {
                prop_assert!(!s.starts_with('-'));
                prop_assert!(!s.contains(".."));
            }
        }
    }
}
