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
        if *scheme != "file://" {
            let rest = &value[scheme.len()..];
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            let (userinfo, host_port) = match authority.rsplit_once('@') {
                Some((userinfo, host_port)) => (Some(userinfo), host_port),
                None => (None, authority),
            };
            if let Some(userinfo) = userinfo {
                // Over http(s) any user part is a credential (a token or user:password); over
                // ssh and git a user is fine, a password is not.
                let http = scheme.starts_with("http");
                if http || userinfo.contains(':') {
                    return Err(FieldError::new(field, CREDENTIALS));
                }
                url_user(field, userinfo)?;
            }
            url_host(field, strip_port(host_port))?;
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
                url_user(field, user)?;
                url_host(field, host)?;
                return Ok(());
            }
        }
    }
    Err(FieldError::new(
        field,
        "must be an https://, http://, ssh://, git:// or file:// URL, user@host:path, or an absolute path",
    ))
}

const CREDENTIALS: &str = "must not carry credentials (a user, token or password before '@'): \
     they would be stored, logged and shown with the project; give the project's deploy key \
     read access to the repository and use its ssh:// or user@host:path URL instead";

/// The user part of a git URL: never something ssh or git could read as an option.
fn url_user(field: &str, user: &str) -> Result<(), FieldError> {
    if user.is_empty() || user.starts_with('-') {
        return Err(FieldError::new(
            field,
            "the user before '@' must not be empty or start with '-'",
        ));
    }
    Ok(())
}

/// `host:port` or `[v6]:port` without the port.
fn strip_port(host_port: &str) -> &str {
    if host_port.starts_with('[') {
        return match host_port.find(']') {
            Some(end) => &host_port[..=end],
            None => host_port,
        };
    }
    match host_port.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => host_port,
    }
}

/// Host names of cloud metadata services (lower case, without a trailing dot).
const METADATA_NAMES: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.tencentyun.com",
];

/// The host of a git URL: not empty, not an option (`-oProxyCommand=...`), no percent-escapes,
/// and not a link-local or cloud metadata address, however spelled (`169.254.169.254`,
/// `0xa9fea9fe`, `[fe80::1]`, `[::ffff:169.254.169.254]`, `metadata.google.internal.`).
fn url_host(field: &str, host: &str) -> Result<(), FieldError> {
    if host.is_empty() {
        return Err(FieldError::new(field, "has no host"));
    }
    if host.starts_with('-') {
        return Err(FieldError::new(field, "the host must not start with '-'"));
    }
    if host.contains('%') {
        return Err(FieldError::new(
            field,
            "the host must not contain '%' escapes or zone ids",
        ));
    }
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    let bracketed = name
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .map(|h| h.parse::<std::net::Ipv6Addr>());
    let forbidden = match bracketed {
        Some(Ok(v6)) => is_forbidden_v6(v6),
        Some(Err(_)) => return Err(FieldError::new(field, "has an invalid IPv6 address")),
        None => {
            METADATA_NAMES.contains(&name.as_str())
                || parse_inet_aton(&name).is_some_and(is_forbidden_v4)
        }
    };
    if forbidden {
        return Err(FieldError::new(
            field,
            "points at a link-local or cloud metadata address (169.254.0.0/16, fe80::/10, \
             metadata.google.internal, ...): Hefring never fetches from those",
        ));
    }
    Ok(())
}

fn is_forbidden_v4(ip: std::net::Ipv4Addr) -> bool {
    let o = ip.octets();
    // Link-local (AWS, GCP, Azure, OpenStack metadata live here); Alibaba's and Oracle's
    // metadata services.
    (o[0] == 169 && o[1] == 254) || o == [100, 100, 100, 200] || o == [192, 0, 0, 192]
}

fn is_forbidden_v6(ip: std::net::Ipv6Addr) -> bool {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_forbidden_v4(v4);
    }
    // NAT64 (64:ff9b::/96) reaches IPv4 addresses too.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return is_forbidden_v4(std::net::Ipv4Addr::new(a, b, c, d));
    }
    (s[0] & 0xffc0) == 0xfe80 || ip == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
}

/// An IPv4 address as `inet_aton(3)` (and so curl and git) reads it: one to four parts,
/// each decimal, octal (`0...`) or hex (`0x...`), the last filling the remaining bytes.
fn parse_inet_aton(text: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(4);
    for part in &parts {
        let (digits, radix) =
            if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
                (hex, 16)
            } else if part.len() > 1 && part.starts_with('0') {
                (&part[1..], 8)
            } else {
                (*part, 10)
            };
        if digits.is_empty() && radix != 16 {
            return None;
        }
        let value = if digits.is_empty() {
            0
        } else {
            u64::from_str_radix(digits, radix).ok()?
        };
        values.push(value);
    }
    let (last, leading) = values.split_last()?;
    if leading.iter().any(|&v| v > 255) {
        return None;
    }
    let last_bytes = 4 - leading.len();
    if *last >= 1u64 << (8 * last_bytes) {
        return None;
    }
    let mut address: u64 = 0;
    for (i, &v) in leading.iter().enumerate() {
        address |= v << (8 * (3 - i));
    }
    address |= last;
    Some(std::net::Ipv4Addr::from(address as u32))
}

/// A local repository path (an absolute path or a `file://` URL) that lies inside `data_dir`,
/// Hefring's own data directory (its database, keys and every project's mirror), compared
/// after resolving `.`, `..` and repeated `/` by their text. Callers that can also compare
/// the resolved paths (symbolic links) do so.
pub fn repository_outside(field: &str, value: &str, data_dir: &str) -> Result<(), FieldError> {
    let path = match value.strip_prefix("file://") {
        Some(rest) if rest.starts_with('/') => rest,
        // file://host/path
        Some(rest) => rest.find('/').map(|i| &rest[i..]).unwrap_or("/"),
        None if value.starts_with('/') => value,
        None => return Ok(()),
    };
    let inside = |dir: &str| {
        let (path, dir) = (normalise(path), normalise(dir));
        dir.is_empty() || path == dir || path.starts_with(&format!("{dir}/"))
    };
    if inside(data_dir) {
        return Err(FieldError::new(
            field,
            "is inside Hefring's own data directory (its database and keys): \
             point at a repository elsewhere",
        ));
    }
    Ok(())
}

/// An absolute path with `.`, `..` and empty segments resolved by their text; "" for `/`.
pub fn normalise(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    segments.iter().map(|s| format!("/{s}")).collect()
}

/// The user nginx's workers run as on a target: a user name (lower-case letters, digits, `_`,
/// `-`), never `root` and never a number (which tools would read as a uid, and `0` is root).
pub fn web_user(field: &str, value: &str) -> Result<(), FieldError> {
    let b = value.as_bytes();
    if b.iter().all(u8::is_ascii_digit) && !b.is_empty() {
        return Err(FieldError::new(
            field,
            "must be a user name, not a number (uid 0 is root)",
        ));
    }
    let ok = !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'));
    if !ok {
        return Err(FieldError::new(
            field,
            "must be a user name: lower-case letters, digits, '_' and '-'",
        ));
    }
    if value == "root" {
        return Err(FieldError::new(
            field,
            "must not be root (uid 0): the web server's workers would run with every power \
             on the machine",
        ));
    }
    Ok(())
}

/// A directory setting of a target (its root, a system nginx's `sites_dir`, a socket): an
/// absolute, normalised path (no `//`, `.` or `..` segments, no trailing `/`, not `/` itself)
/// of letters, digits and `. _ / - + @` only. Those paths end up in shell arguments, nginx
/// and PHP-FPM configuration, `open_basedir` (where `:` separates paths) and sudo or systemd
/// rules, so everything any of them reads as syntax (spaces, quotes, `;`, `{`, `$`, `:`, `%`,
/// `=`, `,`, globs) is refused rather than escaped; `+` and `@` mean nothing to any of them
/// and appear in real directory names (`php8.2+`, `user@host`). At most 1024 bytes.
pub fn setting_path(field: &str, value: &str) -> Result<(), FieldError> {
    if !value.starts_with('/') {
        return Err(FieldError::new(field, "must be an absolute path"));
    }
    if value.len() > 1024 {
        return Err(FieldError::new(field, "must be at most 1024 bytes"));
    }
    if let Some(c) = value
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-' | '+' | '@')))
    {
        return Err(FieldError::new(
            field,
            format!(
                "must hold only letters, digits and '.', '_', '/', '-', '+', '@' (found {c:?})"
            ),
        ));
    }
    if value == "/" {
        return Err(FieldError::new(field, "must not be / itself"));
    }
    if !value[1..]
        .split('/')
        .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
    {
        return Err(FieldError::new(
            field,
            "must be normalised: no '.' or '..' segments, '//' or trailing '/'",
        ));
    }
    Ok(())
}

/// A cron schedule given for a new manifest or an environment's override: it parses, and it
/// fires at most once a minute (a seconds field, when present, is a single value).
pub fn cron_schedule(field: &str, value: &str) -> Result<crate::schedule::Schedule, FieldError> {
    let schedule = crate::schedule::Schedule::parse(value)
        .map_err(|e| FieldError::new(field, e.to_string()))?;
    if !schedule.fires_at_most_once_a_minute() {
        return Err(FieldError::new(
            field,
            "fires more than once a minute: a seconds field, when present, must be a single \
             value (such as 0)",
        ));
    }
    Ok(schedule)
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
    fn hostile_git_urls_are_refused_with_the_reason() {
        let refusal = |url: &str| match git_url("git_url", url) {
            Ok(()) => panic!("{url} was accepted"),
            Err(e) => {
                assert_eq!(e.field, "git_url");
                e.message
            }
        };
        for url in [
            "https://user:pass@example.com/x.git",
            "https://ghp_token@example.com/x.git",
            "http://a@b@example.com/x",
            "ssh://git:secret@example.com/x.git",
        ] {
            assert!(refusal(url).contains("deploy key"), "{url}");
        }
        for url in [
            "ssh://-oProxyCommand=touch@example.com/x",
            "-oProxyCommand=x@h:path",
            "ssh://git@-oProxyCommand=x/y",
            "https://-x/y",
            "-x@h:y",
        ] {
            let message = refusal(url);
            assert!(message.contains("'-'"), "{url}: {message}");
        }
        assert!(refusal("git@-oProxyCommand=x:y").contains("'-'"));
        for url in [
            "http://169.254.169.254/latest/meta-data",
            "https://169.254.0.1/x",
            "http://169.254.169.254:80/x",
            "http://2852039166/x",
            "http://0xa9fea9fe/x",
            "http://0251.0376.0251.0376/x",
            "http://169.254.43518/x",
            "http://[fe80:0:0:0:0:0:0:1]/x",
            "http://[febf:0:0:0:0:0:0:1]/x",
            "http://[fd00:ec2:0:0:0:0:0:254]/x",
            "http://[0:0:0:0:0:ffff:a9fe:a9fe]/x",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://METADATA.google.internal./x",
            "http://100.100.100.200/latest/meta-data",
            "git://169.254.169.254/x",
            "git@169.254.169.254:x.git",
        ] {
            assert!(refusal(url).contains("metadata"), "{url}");
        }
        assert!(refusal("http://%31%36%39.254.169.254/x").contains('%'));
        for ok in [
            "git@github.com:org/repo.git",
            "ssh://git@example.com:2222/x.git",
            "https://example.com:8443/x.git",
            "http://169.253.1.1/x",
            "http://[fec0:0:0:0:0:0:0:1]/x",
            "https://0day.example.com/x",
            "http://10.0.0.1/x",
        ] {
            assert!(git_url("git_url", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn inet_aton_reads_every_spelling_of_an_address() {
        let metadata = Some(std::net::Ipv4Addr::new(169, 254, 169, 254));
        for text in [
            "169.254.169.254",
            "2852039166",
            "0xa9fea9fe",
            "0xA9.0xFE.0xA9.0xFE",
            "0251.0376.0251.0376",
            "169.254.43518",
            "169.16689662",
        ] {
            assert_eq!(parse_inet_aton(text), metadata, "{text}");
        }
        for text in [
            "",
            "1.2.3.4.5",
            "256.1.1.1",
            "1.2.3.256",
            "a.b",
            "08.1.1.1",
            "example.com",
        ] {
            assert_eq!(parse_inet_aton(text), None, "{text}");
        }
    }

    #[test]
    fn repositories_inside_the_data_directory_are_refused() {
        let data = "/var/lib/hefring";
        for bad in [
            "/var/lib/hefring",
            "/var/lib/hefring/mirrors/prj_x",
            "/var/lib/./hefring/x",
            "/srv/../var/lib/hefring/x",
            "//var//lib/hefring/",
            "file:///var/lib/hefring/x",
            "file://localhost/var/lib/hefring/x",
        ] {
            assert_eq!(
                repository_outside("git_url", bad, data).unwrap_err().field,
                "git_url",
                "{bad}"
            );
        }
        for ok in [
            "/var/lib/hefring-other/x",
            "/srv/git/x",
            "file:///srv/x",
            "https://example.com/var/lib/hefring/x",
            "git@h:/var/lib/hefring/x",
        ] {
            assert!(repository_outside("git_url", ok, data).is_ok(), "{ok}");
        }
    }

    #[test]
    fn web_users() {
        for ok in ["www-data", "nginx", "_www", "hf-web", "u0"] {
            assert!(web_user("web_user", ok).is_ok(), "{ok}");
        }
        for bad in [
            "root",
            "0",
            "00",
            "1000",
            "",
            "Root",
            "-x",
            "a b",
            "a;b",
            &"a".repeat(33),
        ] {
            assert_eq!(
                web_user("web_user", bad).unwrap_err().field,
                "web_user",
                "{bad}"
            );
        }
        assert!(web_user("web_user", "root")
            .unwrap_err()
            .message
            .contains("uid 0"));
    }

    #[test]
    fn setting_paths() {
        for ok in [
            "/srv/hefring",
            "/etc/nginx/sites-enabled",
            "/a/php8.2+/u@h",
            "/a_b-c.d",
        ] {
            assert!(setting_path("root", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/",
            "relative/x",
            "/a b",
            "/a;b",
            "/a{b}",
            "/a$b",
            "/a:b",
            "/a%b",
            "/a=b",
            "/a,b",
            "/a*",
            "/a'b",
            "/a\nb",
            "/a//b",
            "/a/./b",
            "/a/../b",
            "/a/.",
            "/a/",
            "/é",
            &format!("/{}", "a".repeat(1024)),
        ] {
            assert_eq!(
                setting_path("root", bad).unwrap_err().field,
                "root",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn cron_schedules_fire_at_most_once_a_minute() {
        for ok in [
            "*/15 * * * *",
            "@hourly",
            "30 * * * * *",
            "0 */5 * * * *",
            "*/60 * * * * *",
        ] {
            assert!(cron_schedule("cron", ok).is_ok(), "{ok}");
        }
        for bad in [
            "* * * * * *",
            "0,30 * * * * *",
            "*/10 * * * * *",
            "0-1 * * * * *",
            "x",
        ] {
            assert_eq!(
                cron_schedule("cron", bad).unwrap_err().field,
                "cron",
                "{bad}"
            );
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
        fn accepted_setting_paths_hold_only_the_allowed_characters(s in "/[a-z/.;{}$#: @+%=-]{0,20}") {
            if setting_path("p", &s).is_ok() {
                prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || "._/-+@".contains(c)));
                prop_assert!(!s.ends_with('/'));
                prop_assert!(!s[1..].split('/').any(|seg| seg.is_empty() || seg == "." || seg == ".."));
            }
        }

        #[test]
        fn accepted_http_urls_carry_no_credentials(user in "[a-z:]{0,6}", host in "[a-z0-9.-]{1,12}") {
            let url = format!("https://{user}@{host}/x");
            prop_assert!(git_url("u", &url).is_err());
        }

        #[test]
        fn every_link_local_address_is_refused(c in 0u8..=255, d in 0u8..=255) {
            let dotted = format!("http://169.254.{c}.{d}/x");
            let decimal = format!("http://{}/x", u32::from(std::net::Ipv4Addr::new(169, 254, c, d)));
            prop_assert!(git_url("u", &dotted).is_err());
            prop_assert!(git_url("u", &decimal).is_err());
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
