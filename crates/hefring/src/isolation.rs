//! The installation on this machine: its id, the directories it keeps outside the data
//! directory (build trees, local targets), and the nftables rules that keep builds and sites
//! away from the control plane's private services (`hefring_core::network` renders them;
//! this applies them with `nft -f -`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use hefring_core::network::{self, Private};
use hefring_store::{Page, Store};
use tokio::io::AsyncWriteExt;

const INSTALLATION_SETTING: &str = "installation_id";

/// The installation's id, made once and kept in the state database, so every process of one
/// installation (a `serve`, its workers) agrees on it.
pub async fn installation_id(store: &Arc<dyn Store>) -> Result<String> {
    if let Some(id) = store.get_setting(INSTALLATION_SETTING).await? {
        return Ok(id);
    }
    let id = hefring_core::id::new_installation_id();
    // Two processes starting at once: the first write wins and both read it.
    store
        .replace_setting(INSTALLATION_SETTING, None, &id)
        .await?;
    store
        .get_setting(INSTALLATION_SETTING)
        .await?
        .context("the installation id was not stored")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A directory of this installation outside its data directory (`kind`: `builds`,
/// `targets`): `/var/lib/hefring-KIND/INSTALLATION` as root, else
/// `DATA_DIR/../hefring-KIND/INSTALLATION`. Per installation, so that several on one machine
/// (parallel test servers) never share one. Not below `/var/lib/hefring`, which is root's
/// alone (0700: the environment users' uid high-water mark): the build user must pass
/// through to its trees, and nginx's workers to the `local` target's sites.
pub fn machine_dir(kind: &str, data_dir: &Path, installation: &str, root: bool) -> PathBuf {
    if root {
        Path::new("/var/lib")
            .join(format!("hefring-{kind}"))
            .join(installation)
    } else {
        data_dir
            .parent()
            .unwrap_or(Path::new("/"))
            .join(format!("hefring-{kind}"))
            .join(installation)
    }
}

/// The private services this process knows of, by address.
pub struct Services<'a> {
    /// The API's listening address (`serve` only).
    pub api: Option<SocketAddr>,
    pub broker_url: Option<&'a str>,
    pub database_url: Option<&'a str>,
}

/// Host and port of a URL (`default_port` when it names none); `None` with the reason when it
/// names no TCP endpoint.
fn endpoint(url: &str, default_port: u16) -> Result<(String, u16), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("unreadable URL: {e}"))?;
    let host = match parsed.host_str() {
        Some(host) if !host.is_empty() => host.trim_start_matches('[').trim_end_matches(']'),
        _ => return Err("no host: a unix socket, which nftables cannot filter".into()),
    };
    if parsed
        .query_pairs()
        .any(|(k, v)| k == "host" && v.starts_with('/'))
    {
        return Err("a unix socket, which nftables cannot filter".into());
    }
    Ok((host.to_string(), parsed.port().unwrap_or(default_port)))
}

async fn resolve(host: &str, port: u16) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = match tokio::net::lookup_host((host, port)).await {
        Ok(found) => found.map(|a| a.ip()).collect(),
        Err(e) => {
            tracing::warn!(host, error = %e, "cannot resolve: not confined");
            Vec::new()
        }
    };
    addrs.sort();
    addrs.dedup();
    addrs
}

/// The private services as nftables sees them.
async fn private_services(services: &Services<'_>) -> Vec<Private> {
    let mut private = Vec::new();
    if let Some(api) = services.api {
        private.push(network::listener("api", api.ip(), api.port()));
    }
    let urls = [
        ("broker", services.broker_url, 5672),
        ("state database", services.database_url, 5432),
    ];
    for (what, url, default_port) in urls {
        let Some(url) = url else { continue };
        if url.starts_with("sqlite:") {
            continue;
        }
        let default_port = if url.starts_with("amqps:") {
            5671
        } else {
            default_port
        };
        match endpoint(url, default_port) {
            Ok((host, port)) => {
                for addr in resolve(&host, port).await {
                    private.push(network::listener(what, addr, port));
                }
            }
            Err(reason) => {
                tracing::warn!("the {what} is not confined by nftables: {reason}")
            }
        }
    }
    private
}

/// Installs (or replaces) this process's rules in the installation's table, where it can:
/// as root, with `nft`. Answers the table's name when installed. Everything else is logged
/// plainly: builds and sites then reach what the rules would have refused.
pub async fn install_network_rules(
    role: &str,
    installation: &str,
    store: &Arc<dyn Store>,
    services: Services<'_>,
) -> Option<String> {
    if !is_root() {
        tracing::warn!(
            "network rules NOT installed: Hefring is not root, so builds and sites can reach its API, broker, state database and metadata addresses"
        );
        return None;
    }
    let build_uid =
        match tokio::task::spawn_blocking(hefring_engine::sandbox::ensure_build_user).await {
            Ok(Ok((uid, _))) => Some(uid),
            Ok(Err(e)) => {
                tracing::warn!("{e}");
                None
            }
            Err(_) => None,
        };
    let private = private_services(&services).await;
    warn_about_shared_postgresql(store, &private).await;
    let table = network::table_name(installation);
    let script = network::render(&network::Rules {
        table: &table,
        role,
        build_uid,
        private: &private,
    });
    match nft(&script).await {
        Ok(()) => {
            tracing::info!(
                "network rules installed in nftables table inet {table} (chain {role}): builds and sites cannot reach {}",
                describe(&private)
            );
            Some(table)
        }
        Err(e) => {
            tracing::warn!(
                "network rules NOT installed ({e}): builds and sites can reach Hefring's API, broker, state database and metadata addresses"
            );
            None
        }
    }
}

fn describe(private: &[Private]) -> String {
    let mut parts: Vec<String> = private
        .iter()
        .map(|p| match p {
            Private::Tcp { what, addr, port } => {
                format!("the {what} at {}", SocketAddr::new(*addr, *port))
            }
            Private::LocalPort { what, port } => format!("the {what} on port {port}"),
        })
        .collect();
    parts.push("link-local and metadata addresses".into());
    parts.join(", ")
}

/// Refusing the state database's port also refuses sites whose PostgreSQL is that same
/// server: say so, since only a database of its own (or its own port) keeps both.
async fn warn_about_shared_postgresql(store: &Arc<dyn Store>, private: &[Private]) {
    let state_db: Vec<(IpAddr, u16)> = private
        .iter()
        .filter_map(|p| match p {
            Private::Tcp {
                what: "state database",
                addr,
                port,
            } => Some((*addr, *port)),
            _ => None,
        })
        .collect();
    if state_db.is_empty() {
        return;
    }
    let Ok(targets) = store
        .list_targets(&Page {
            limit: 1000,
            cursor: None,
        })
        .await
    else {
        return;
    };
    for target in targets.items.iter().filter(|t| t.host == "local") {
        let pg = &target.settings.postgresql;
        for addr in resolve(&pg.host, pg.port).await {
            if state_db.contains(&(addr, pg.port)) {
                tracing::warn!(
                    "the state database's PostgreSQL ({addr}:{}) is also the one sites on the target {} use: the network rules refuse it to them too, so their PostgreSQL databases are unreachable; give the state database a PostgreSQL server (or port) of its own",
                    pg.port,
                    target.name
                );
            }
        }
    }
}

/// Runs `nft -f -` with `script`.
pub async fn nft(script: &str) -> Result<()> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run nft (Debian: apt-get install nftables)")?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        anyhow::bail!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_directories_are_per_installation_and_outside_the_data_directory() {
        let data = Path::new("/srv/hefring/data");
        let as_root = machine_dir("builds", data, "abc123", true);
        assert_eq!(as_root, Path::new("/var/lib/hefring-builds/abc123"));
        let as_user = machine_dir("targets", data, "abc123", false);
        assert_eq!(as_user, Path::new("/srv/hefring/hefring-targets/abc123"));
        assert!(!as_user.starts_with(data) && !as_root.starts_with(data));
    }

    #[test]
    fn endpoints_come_from_urls() {
        assert_eq!(
            endpoint("amqp://guest:guest@127.0.0.1:5673/vh", 5672).unwrap(),
            ("127.0.0.1".into(), 5673)
        );
        assert_eq!(
            endpoint("postgres://u@db.example:6543/x", 5432).unwrap(),
            ("db.example".into(), 6543)
        );
        assert_eq!(
            endpoint("postgresql://[::1]/x", 5432).unwrap(),
            ("::1".into(), 5432)
        );
        assert!(endpoint("postgresql:///x?host=/run/postgresql", 5432).is_err());
    }
}
