//! What builds and sites may not reach on the network: Hefring's API, the broker, the state
//! database, and link-local or cloud metadata addresses. Rendered as nftables rules on the
//! socket's owner (`meta skuid`): the build user and every environment user
//! ([`ENVIRONMENT_UID_MIN`]`..=`[`ENVIRONMENT_UID_MAX`]) are refused, everyone else (root,
//! Hefring, the web server, the databases) is not. Everything else stays reachable: package
//! registries for builds, a site's own database (MariaDB's socket or port, PostgreSQL's port
//! unless it is also the state database's).
//!
//! One table per installation (`inet hefring_<installation>`), one base chain per role of the
//! process that installs it (`serve`, `worker`), so a `serve` and a `worker` of the same
//! installation on one machine each keep their own rules. The script replaces the role's
//! rules in one transaction, so installing twice is harmless.
//!
//! Pure: the edge resolves host names and runs `nft -f -` with the text.

use std::fmt::Write;
use std::net::IpAddr;

use crate::isolation::{ENVIRONMENT_UID_MAX, ENVIRONMENT_UID_MIN};

/// Link-local and metadata destinations, refused whatever the port or protocol: the cloud
/// metadata service hands out the machine's credentials.
pub const LINK_LOCAL_V4: &[&str] = &["169.254.0.0/16"];
pub const LINK_LOCAL_V6: &[&str] = &["fe80::/10", "fd00:ec2::254"];

/// A private service, by where it listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Private {
    /// One address and TCP port.
    Tcp {
        what: &'static str,
        addr: IpAddr,
        port: u16,
    },
    /// A TCP port on every address of this machine (a service listening on `0.0.0.0` or
    /// `::`).
    LocalPort { what: &'static str, port: u16 },
}

/// The table of an installation: `hefring_` and its short id (letters and digits).
pub fn table_name(installation: &str) -> String {
    let clean: String = installation
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .take(32)
        .collect();
    format!("hefring_{clean}")
}

/// The rules one process installs.
#[derive(Clone, Debug)]
pub struct Rules<'a> {
    /// [`table_name`].
    pub table: &'a str,
    /// `serve` or `worker`: the base chain this process owns in the table.
    pub role: &'a str,
    /// The build user's uid (confined with the environment users).
    pub build_uid: Option<u32>,
    pub private: &'a [Private],
}

/// The `nft -f -` script that installs (or replaces) `rules.role`'s chains in the table.
pub fn render(rules: &Rules<'_>) -> String {
    let (table, chain) = (rules.table, rules.role);
    let confined = format!("{chain}_confined");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Hefring: builds and sites must not reach the control plane's private services."
    );
    // Declared first (a no-op when they exist) so that the flushes below always apply.
    let _ = writeln!(out, "table inet {table} {{");
    let _ = writeln!(
        out,
        "\tchain {chain} {{ type filter hook output priority filter; policy accept; }}"
    );
    let _ = writeln!(out, "\tchain {confined} {{ }}");
    let _ = writeln!(out, "}}");
    let _ = writeln!(out, "flush chain inet {table} {chain}");
    let _ = writeln!(out, "flush chain inet {table} {confined}");
    let _ = writeln!(out, "table inet {table} {{");
    let _ = writeln!(out, "\tchain {chain} {{");
    let mut uids = Vec::new();
    if let Some(uid) = rules.build_uid {
        uids.push(uid.to_string());
    }
    uids.push(format!("{ENVIRONMENT_UID_MIN}-{ENVIRONMENT_UID_MAX}"));
    let _ = writeln!(
        out,
        "\t\tmeta skuid {{ {} }} jump {confined}",
        uids.join(", ")
    );
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "\tchain {confined} {{");
    let _ = writeln!(
        out,
        "\t\tip daddr {{ {} }} reject comment \"link-local and metadata\"",
        LINK_LOCAL_V4.join(", ")
    );
    let _ = writeln!(
        out,
        "\t\tip6 daddr {{ {} }} reject comment \"link-local and metadata\"",
        LINK_LOCAL_V6.join(", ")
    );
    for private in rules.private {
        match private {
            Private::Tcp { what, addr, port } => {
                let family = if addr.is_ipv4() { "ip" } else { "ip6" };
                let _ = writeln!(
                    out,
                    "\t\t{family} daddr {addr} tcp dport {port} reject with tcp reset comment \"{}\"",
                    comment(what)
                );
            }
            Private::LocalPort { what, port } => {
                let _ = writeln!(
                    out,
                    "\t\tfib daddr type local tcp dport {port} reject with tcp reset comment \"{}\"",
                    comment(what)
                );
            }
        }
    }
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
    out
}

/// The script that removes an installation's table (tests; uninstalling).
pub fn delete_table(table: &str) -> String {
    format!("delete table inet {table}\n")
}

fn comment(what: &str) -> String {
    what.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.' | ':'))
        .collect()
}

/// A service listening on `addr`: an unspecified address (`0.0.0.0`, `::`) is every address
/// of the machine.
pub fn listener(what: &'static str, addr: IpAddr, port: u16) -> Private {
    if addr.is_unspecified() {
        Private::LocalPort { what, port }
    } else {
        Private::Tcp { what, addr, port }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_serve_rules() {
        let private = [
            listener("api", "127.0.0.1".parse().unwrap(), 8080),
            listener("broker", "127.0.0.1".parse().unwrap(), 5672),
            listener("broker", "::1".parse().unwrap(), 5672),
            listener("state database", "0.0.0.0".parse().unwrap(), 5432),
        ];
        let text = render(&Rules {
            table: &table_name("k3v9x0a1b2c3"),
            role: "serve",
            build_uid: Some(998),
            private: &private,
        });
        insta::assert_snapshot!(text);
    }

    #[test]
    fn table_names_keep_only_letters_and_digits() {
        assert_eq!(table_name("AB-c;d e"), "hefring_abcde");
        assert_eq!(delete_table("hefring_x"), "delete table inet hefring_x\n");
    }

    #[test]
    fn without_a_build_user_environment_users_are_still_confined() {
        let text = render(&Rules {
            table: "hefring_t",
            role: "worker",
            build_uid: None,
            private: &[],
        });
        assert!(
            text.contains("meta skuid { 1600000000-1699999999 } jump worker_confined"),
            "{text}"
        );
        assert!(
            text.contains("ip daddr { 169.254.0.0/16 } reject"),
            "{text}"
        );
        // Only the role's own chains are flushed: another role's rules stay.
        assert!(text.contains("flush chain inet hefring_t worker\n"));
        assert!(!text.contains("serve"));
    }
}
