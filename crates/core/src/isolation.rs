//! Who runs what on a server target: the trust model's names and numbers.
//!
//! Every environment is its own Unix user, named from its immutable id; builds run as one
//! dedicated unprivileged user. Their uids come from fixed ranges so that one rule (an
//! nftables `meta skuid` range, a check in a test) covers every site, now and later.

/// The uids of environment users: allocated upwards on each machine and never reused (a
/// high-water mark kept by root on the target), so a file left by a deleted environment never
/// becomes readable to a new one. Far above the ranges Debian gives people (1000-59999) and
/// rootless containers' subordinate ids (from 100000, 65536 a user).
pub const ENVIRONMENT_UID_MIN: u32 = 1_600_000_000;
pub const ENVIRONMENT_UID_MAX: u32 = 1_699_999_999;

/// Where root keeps, on each machine, the lock and the high-water mark of environment uids.
/// Machine-wide rather than per target root: users are machine-wide, and several
/// installations (or test servers) may share a machine.
pub const USER_STATE_DIR: &str = "/var/lib/hefring";

/// The unprivileged user build commands run as (created when missing).
pub const BUILD_USER: &str = "hefring-build";

/// The part of an id after its prefix, lower-cased.
fn id_tail(id: &str) -> String {
    id.split_once('_')
        .map(|(_, tail)| tail)
        .unwrap_or(id)
        .to_ascii_lowercase()
}

/// The Unix user (and group) of an environment: `hf-` and the id's 26 characters, 29 in all,
/// within the 32 characters `useradd` accepts.
pub fn environment_user(environment_id: &str) -> String {
    format!("hf-{}", id_tail(environment_id))
}

/// Whether a uid belongs to an environment user.
pub fn is_environment_uid(uid: u32) -> bool {
    (ENVIRONMENT_UID_MIN..=ENVIRONMENT_UID_MAX).contains(&uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_users_fit_useradd_and_come_from_the_id() {
        let user = environment_user("env_01jd3k9x7q8w2e5r6t7y8u9i0p");
        assert_eq!(user, "hf-01jd3k9x7q8w2e5r6t7y8u9i0p");
        assert!(user.len() <= 32);
        assert!(is_environment_uid(ENVIRONMENT_UID_MIN));
        assert!(!is_environment_uid(ENVIRONMENT_UID_MIN - 1));
        assert!(!is_environment_uid(ENVIRONMENT_UID_MAX + 1));
    }
}
