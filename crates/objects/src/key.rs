//! The key rules, as pure functions.

use crate::ObjectError;

/// The longest key accepted, in bytes (S3 allows 1024; a store prefix comes on top).
pub const MAX_KEY_LEN: usize = 512;

/// Checks an object key: non-empty, at most [`MAX_KEY_LEN`] bytes, `/`-separated segments
/// each of `[A-Za-z0-9._-]+`, no `.` or `..` segment, no leading or trailing `/`.
pub fn validate_key(key: &str) -> Result<(), ObjectError> {
    match key_problem(key) {
        None => Ok(()),
        Some(reason) => Err(invalid(key, reason)),
    }
}

/// Checks a list prefix: empty (everything), or a valid key optionally followed by one `/`.
pub fn validate_prefix(prefix: &str) -> Result<(), ObjectError> {
    if prefix.is_empty() {
        return Ok(());
    }
    let stem = prefix.strip_suffix('/').unwrap_or(prefix);
    match key_problem(stem) {
        None => Ok(()),
        Some(reason) => Err(invalid(prefix, reason)),
    }
}

pub(crate) fn is_valid_key(key: &str) -> bool {
    key_problem(key).is_none()
}

fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        return Some("it is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return Some("it is longer than 512 bytes");
    }
    if key.starts_with('/') {
        return Some("it starts with /");
    }
    if key.ends_with('/') {
        return Some("it ends with /");
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return Some("it has an empty segment (//)");
        }
        if segment == "." || segment == ".." {
            return Some("it has a . or .. segment");
        }
        if !segment.bytes().all(is_key_byte) {
            return Some("segments may only contain A-Z a-z 0-9 . _ -");
        }
    }
    None
}

fn is_key_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-')
}

fn invalid(key: &str, reason: &'static str) -> ObjectError {
    // A refused key may be anything a caller passed: keep error messages short.
    let key = if key.len() > 80 {
        let mut end = 80;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &key[..end])
    } else {
        key.to_owned()
    };
    ObjectError::InvalidKey { key, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(key: &str, expected: Result<(), &str>) {
        let actual = validate_key(key).map_err(|error| match error {
            ObjectError::InvalidKey { reason, .. } => reason,
            other => panic!("{other}"),
        });
        assert_eq!(actual, expected, "{key:?}");
    }

    #[test]
    fn good_keys() {
        for key in [
            "a",
            "artifacts/01J9ZK3Q7Y/release.tar.zst",
            "backups/env-1/2024-05-01T00-00-00Z.sql.zst",
            "A_b-C.d",
            "...",
            "a/.hidden/b",
            "x..y/z",
            &"k".repeat(512),
        ] {
            check(key, Ok(()));
        }
    }

    #[test]
    fn bad_keys() {
        let dots = "segments may only contain A-Z a-z 0-9 . _ -";
        for (key, reason) in [
            ("", "it is empty"),
            (&"k".repeat(513), "it is longer than 512 bytes"),
            ("/a", "it starts with /"),
            ("a/", "it ends with /"),
            ("/", "it starts with /"),
            ("a//b", "it has an empty segment (//)"),
            (".", "it has a . or .. segment"),
            ("..", "it has a . or .. segment"),
            ("a/../b", "it has a . or .. segment"),
            ("a/./b", "it has a . or .. segment"),
            ("../etc/passwd", "it has a . or .. segment"),
            ("a b", dots),
            ("a\\b", dots),
            ("a\0b", dots),
            ("a~b", dots),
            ("a?b", dots),
            ("a%2Fb", dots),
            ("a+b", dots),
            ("é", dots),
            ("a\nb", dots),
        ] {
            check(key, Err(reason));
        }
    }

    #[test]
    fn long_keys_are_shortened_in_errors() {
        let error = validate_key(&"é".repeat(300)).unwrap_err();
        let ObjectError::InvalidKey { key, .. } = error else {
            panic!()
        };
        assert!(key.len() <= 83 && key.ends_with("..."), "{key}");
    }

    #[test]
    fn prefixes() {
        for prefix in [
            "",
            "a",
            "a/",
            "a/b",
            "backups/env-1/",
            "backups/env-1/2024-",
        ] {
            assert!(validate_prefix(prefix).is_ok(), "{prefix:?}");
        }
        for prefix in ["/", "a//", "../", "a/../", "a b/", "a//b/"] {
            assert!(
                matches!(validate_prefix(prefix), Err(ObjectError::InvalidKey { .. })),
                "{prefix:?}"
            );
        }
    }
}
