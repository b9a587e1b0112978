//! Environments: where everything of one environment lives on its target, the names of what
//! is created for it, its URL, and the variables its commands and PHP pool see.
//!
//! Every name here derives from the environment's immutable id, never from its editable name:
//! deleting an environment must remove exactly what it created and nothing of another's.

use serde::{Deserialize, Serialize};

use crate::id::IdKind;
use crate::manifest::DatabaseKind;
use crate::render::fpm::FpmInstance;
use crate::render::nginx::{Alias, NginxInstance};
use crate::render::Https;
use crate::validate::{self, FieldError};

/// Where Hefring keeps things below a server target's `root`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub root: String,
}

impl Layout {
    pub fn new(root: impl Into<String>) -> Layout {
        Layout {
            root: root.into().trim_end_matches('/').to_string(),
        }
    }

    pub fn nginx_dir(&self) -> String {
        format!("{}/nginx", self.root)
    }

    pub fn fpm_dir(&self) -> String {
        format!("{}/php-fpm", self.root)
    }

    /// Artifacts copied to the target, by SHA-256: shared by every environment.
    pub fn artifact(&self, sha256: &str) -> String {
        format!("{}/artifacts/{sha256}.tar.zst", self.root)
    }

    pub fn artifacts_dir(&self) -> String {
        format!("{}/artifacts", self.root)
    }

    pub fn environments_dir(&self) -> String {
        format!("{}/environments", self.root)
    }

    /// Everything of one environment but its server configuration and certificates.
    pub fn environment_dir(&self, env: &str) -> String {
        format!("{}/environments/{env}", self.root)
    }

    pub fn releases_dir(&self, env: &str) -> String {
        format!("{}/releases", self.environment_dir(env))
    }

    pub fn release_dir(&self, env: &str, release: &str) -> String {
        format!("{}/releases/{release}", self.environment_dir(env))
    }

    /// The link to the release being served; switched atomically by a rename.
    pub fn current_link(&self, env: &str) -> String {
        format!("{}/current", self.environment_dir(env))
    }

    /// The link to the release an update checks through the preview server block before it
    /// switches `current`: a link, so that no nginx reload is needed during an update.
    pub fn preview_link(&self, env: &str) -> String {
        format!("{}/preview", self.environment_dir(env))
    }

    /// Persistent files (`FILES_DIR`): every `writable` path of a release links here.
    pub fn files_dir(&self, env: &str) -> String {
        format!("{}/files", self.environment_dir(env))
    }

    /// The SQLite database of an environment whose manifest asks for one.
    pub fn sqlite_dir(&self, env: &str) -> String {
        format!("{}/database", self.environment_dir(env))
    }

    pub fn sqlite_file(&self, env: &str) -> String {
        format!("{}/database/site.sqlite", self.environment_dir(env))
    }

    /// Safety dumps taken before an update's deploy commands.
    pub fn dumps_dir(&self, env: &str) -> String {
        format!("{}/dumps", self.environment_dir(env))
    }

    /// Where backups are made and restores unpacked, one directory per backup or restore
    /// (named from its id), removed when the operation ends.
    pub fn backups_dir(&self) -> String {
        format!("{}/backups", self.root)
    }

    pub fn backup_work_dir(&self, name: &str) -> String {
        format!("{}/backups/{name}", self.root)
    }

    /// The lock every target-wide step takes (starting, testing and reloading the servers,
    /// adding and removing users), whichever worker or machine runs it.
    pub fn lock_file(&self) -> String {
        format!("{}/hefring.lock", self.root)
    }

    /// The environment's own temporary directory: PHP's uploads in flight, sessions and
    /// temporary files, and the home of its commands. Owned by the environment's user.
    pub fn tmp_dir(&self, env: &str) -> String {
        format!("{}/tmp", self.environment_dir(env))
    }

    /// Where the environment's user unpacks a backup being restored (named from the
    /// operation), inside the environment's directory, which root owns.
    pub fn restore_dir(&self, env: &str, name: &str) -> String {
        format!("{}/restore-{name}", self.environment_dir(env))
    }

    pub fn tls_dir(&self, env: &str) -> String {
        format!("{}/tls/{env}", self.root)
    }

    pub fn tls_certificate(&self, env: &str) -> String {
        format!("{}/fullchain.pem", self.tls_dir(env))
    }

    pub fn tls_key(&self, env: &str) -> String {
        format!("{}/key.pem", self.tls_dir(env))
    }
}

/// What the servers on a target run as, which depends on whether Hefring is root there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accounts {
    /// `None` when Hefring is not root on the target: everything runs as Hefring's user.
    pub web_user: Option<String>,
    pub web_group: Option<String>,
}

impl Layout {
    pub fn nginx(&self, accounts: &Accounts, http_port: u16, https_port: u16) -> NginxInstance {
        NginxInstance {
            dir: self.nginx_dir(),
            user: accounts.web_user.clone(),
            group: accounts.web_group.clone(),
            http_port,
            https_port,
            worker_processes: Some(2),
        }
    }

    pub fn fpm(&self, accounts: &Accounts) -> FpmInstance {
        FpmInstance {
            dir: self.fpm_dir(),
            user: accounts.web_user.clone(),
            group: accounts.web_group.clone(),
        }
    }
}

/// The part of an id after its prefix, lower-cased: fit for database and host names.
fn id_tail(id: &str) -> String {
    id.split_once('_')
        .map(|(_, tail)| tail)
        .unwrap_or(id)
        .to_ascii_lowercase()
}

/// The database and database user of an environment: `hf_` and the id's 26 characters, which
/// fits MariaDB's 64 and PostgreSQL's 63 character limits.
pub fn database_name(env: &str) -> String {
    format!("hf_{}", id_tail(env))
}

/// The host name of the preview server block an update checks the new release through before
/// it switches. `.invalid` can never be a real domain (RFC 2606). Short (36 characters), so
/// that it fits a system nginx's default `server_names_hash_bucket_size` of 64, which holds
/// names up to 38 characters on 64-bit machines.
pub fn preview_domain(env: &str) -> String {
    format!("p-{}.invalid", id_tail(env))
}

/// The environment's address: scheme, primary domain and the port when not the default.
pub fn url(domain: &str, https: Https, http_port: u16, https_port: u16) -> String {
    match https {
        Https::Off | Https::On if http_port == 80 => format!("http://{domain}/"),
        Https::Off | Https::On => format!("http://{domain}:{http_port}/"),
        Https::Required if https_port == 443 => format!("https://{domain}/"),
        Https::Required => format!("https://{domain}:{https_port}/"),
    }
}

/// Checks the primary domain and the aliases of an environment on their own: each a valid
/// host name, none repeated. (That no other environment uses them is the caller's check.)
pub fn check_host_names(domain: &str, aliases: &[Alias]) -> Result<(), FieldError> {
    validate::domain("domain", domain)?;
    not_a_preview_host("domain", domain)?;
    if aliases.len() > MAX_ALIASES {
        return Err(FieldError::new(
            "aliases",
            format!(
                "at most {MAX_ALIASES} aliases per environment ({} given)",
                aliases.len()
            ),
        ));
    }
    for (i, alias) in aliases.iter().enumerate() {
        let field = format!("aliases[{i}].domain");
        validate::domain(&field, &alias.domain)?;
        not_a_preview_host(&field, &alias.domain)?;
        if alias.domain == domain {
            return Err(FieldError::new(
                field,
                "must differ from the primary domain",
            ));
        }
        if aliases[..i].iter().any(|a| a.domain == alias.domain) {
            return Err(FieldError::new(field, "is listed twice"));
        }
    }
    Ok(())
}

/// The most aliases an environment may have: each is a `server_name` and, with HTTPS, a name
/// on its certificate (ACME CAs allow about 100).
pub const MAX_ALIASES: usize = 100;

/// `.invalid` names are the preview hosts (`p-ID.invalid`): a domain there could take over
/// another environment's preview.
fn not_a_preview_host(field: &str, name: &str) -> Result<(), FieldError> {
    if name == "invalid" || name.ends_with(".invalid") {
        return Err(FieldError::new(
            field,
            "must not end in .invalid: those names are kept for preview hosts",
        ));
    }
    Ok(())
}

/// Every host name an environment answers to (the primary domain first).
pub fn host_names<'a>(domain: &'a str, aliases: &'a [Alias]) -> Vec<&'a str> {
    std::iter::once(domain)
        .chain(aliases.iter().map(|a| a.domain.as_str()))
        .collect()
}

/// How an environment reaches its database: what its commands and pool see as `DB_*`.
/// `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseAccess {
    pub kind: DatabaseKind,
    pub host: String,
    pub port: u16,
    pub name: String,
    pub user: String,
    pub password: String,
    /// The database file, for SQLite.
    pub path: String,
}

impl std::fmt::Debug for DatabaseAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseAccess")
            .field("kind", &self.kind)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("name", &self.name)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("path", &self.path)
            .finish()
    }
}

impl DatabaseAccess {
    /// The PDO driver name applications expect in `DB_DRIVER`.
    pub fn driver(&self) -> &'static str {
        match self.kind {
            DatabaseKind::Mariadb => "mysql",
            DatabaseKind::Postgresql => "pgsql",
            DatabaseKind::Sqlite => "sqlite",
            DatabaseKind::None => "none",
        }
    }

    /// `DATABASE_URL`. Generated names and passwords are letters and digits only, so nothing
    /// needs percent-encoding.
    pub fn url(&self) -> String {
        match self.kind {
            DatabaseKind::Mariadb => format!(
                "mysql://{}:{}@{}:{}/{}",
                self.user, self.password, self.host, self.port, self.name
            ),
            DatabaseKind::Postgresql => format!(
                "postgresql://{}:{}@{}:{}/{}",
                self.user, self.password, self.host, self.port, self.name
            ),
            DatabaseKind::Sqlite => format!("sqlite://{}", self.path),
            DatabaseKind::None => String::new(),
        }
    }
}

/// What an environment's commands and PHP pool are told about it.
pub struct EnvironmentFacts<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub release: &'a str,
    pub commit: &'a str,
    pub url: &'a str,
    pub domain: &'a str,
    pub files_dir: &'a str,
    pub database: Option<&'a DatabaseAccess>,
}

/// The variables of API.md's "Commands run for a project", in a fixed order.
pub fn variables(facts: &EnvironmentFacts<'_>) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = vec![
        ("HEFRING_ENVIRONMENT".into(), facts.name.into()),
        ("HEFRING_ENVIRONMENT_ID".into(), facts.id.into()),
        ("HEFRING_RELEASE".into(), facts.release.into()),
        ("HEFRING_COMMIT".into(), facts.commit.into()),
        ("SITE_URL".into(), facts.url.trim_end_matches('/').into()),
        ("SITE_DOMAIN".into(), facts.domain.into()),
        ("FILES_DIR".into(), facts.files_dir.into()),
    ];
    if let Some(db) = facts.database.filter(|db| db.kind != DatabaseKind::None) {
        vars.push(("DATABASE_URL".into(), db.url()));
        vars.push(("DB_DRIVER".into(), db.driver().into()));
        if db.kind == DatabaseKind::Sqlite {
            vars.push(("DB_NAME".into(), db.path.clone()));
        } else {
            vars.push(("DB_HOST".into(), db.host.clone()));
            vars.push(("DB_PORT".into(), db.port.to_string()));
            vars.push(("DB_NAME".into(), db.name.clone()));
            vars.push(("DB_USER".into(), db.user.clone()));
            vars.push(("DB_PASSWORD".into(), db.password.clone()));
        }
    }
    vars
}

/// Days from 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Reads `YYYY-MM-DD HH:MM:SSZ` (openssl's `-dateopt iso_8601`) as milliseconds since the
/// epoch.
pub fn parse_iso_ms(text: &str) -> Option<i64> {
    let text = text.trim().strip_suffix('Z')?;
    let (date, clock) = text.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut c = clock.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, sec) = (c.next()??, c.next()??, c.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || sec > 60 {
        return None;
    }
    Some(((days_from_civil(y, m, day) * 24 + h) * 60 + min) * 60_000 + sec * 1000)
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SSZ`.
pub fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Inverse of days_from_civil.
    let z = days + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Whether `id` is an environment id (the API answers 404 otherwise).
pub fn is_environment_id(id: &str) -> bool {
    IdKind::Environment.matches(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "env_01JDQ8ZV5R6W4K3M2N1P0QRSTV";

    #[test]
    fn names_derive_from_the_id() {
        assert_eq!(database_name(ENV), "hf_01jdq8zv5r6w4k3m2n1p0qrstv");
        assert!(database_name(ENV).len() <= 63);
        let preview = preview_domain(ENV);
        assert_eq!(preview, "p-01jdq8zv5r6w4k3m2n1p0qrstv.invalid");
        assert!(preview.len() <= 38);
        validate::domain("preview", &preview).unwrap();
        let layout = Layout::new("/srv/hefring/");
        assert_eq!(
            layout.current_link(ENV),
            format!("/srv/hefring/environments/{ENV}/current")
        );
        assert_eq!(
            layout.release_dir(ENV, "rel_1"),
            format!("/srv/hefring/environments/{ENV}/releases/rel_1")
        );
    }

    #[test]
    fn urls_carry_the_port_only_when_not_the_default() {
        assert_eq!(url("a.test", Https::Off, 80, 443), "http://a.test/");
        assert_eq!(url("a.test", Https::On, 8080, 8443), "http://a.test:8080/");
        assert_eq!(url("a.test", Https::Required, 80, 443), "https://a.test/");
        assert_eq!(
            url("a.test", Https::Required, 8080, 8443),
            "https://a.test:8443/"
        );
    }

    #[test]
    fn host_names_are_checked_alone() {
        let alias = |d: &str| Alias {
            domain: d.into(),
            redirect: false,
        };
        check_host_names("a.test", &[alias("www.a.test")]).unwrap();
        assert_eq!(check_host_names("A.test", &[]).unwrap_err().field, "domain");
        assert_eq!(
            check_host_names("a.test", &[alias("a.test")])
                .unwrap_err()
                .field,
            "aliases[0].domain"
        );
        assert_eq!(
            check_host_names("a.test", &[alias("b.test"), alias("b.test")])
                .unwrap_err()
                .field,
            "aliases[1].domain"
        );
        assert_eq!(
            check_host_names("a.test", &[alias("bad_name")])
                .unwrap_err()
                .field,
            "aliases[0].domain"
        );
    }

    #[test]
    fn preview_hosts_and_too_many_aliases_are_refused() {
        let alias = |d: &str| Alias {
            domain: d.into(),
            redirect: false,
        };
        assert_eq!(
            check_host_names("p-envx.invalid", &[]).unwrap_err().field,
            "domain"
        );
        assert_eq!(
            check_host_names("invalid", &[]).unwrap_err().field,
            "domain"
        );
        assert_eq!(
            check_host_names("a.test", &[alias("b.test"), alias("x.invalid")])
                .unwrap_err()
                .field,
            "aliases[1].domain"
        );
        let many: Vec<Alias> = (0..=MAX_ALIASES)
            .map(|i| alias(&format!("a{i}.test")))
            .collect();
        assert_eq!(
            check_host_names("a.test", &many).unwrap_err().field,
            "aliases"
        );
        check_host_names("a.test", &many[..MAX_ALIASES]).unwrap();
        check_host_names("invalid.test", &[]).unwrap();
    }

    #[test]
    fn certificate_dates_round_trip() {
        assert_eq!(parse_iso_ms("1970-01-01 00:00:00Z"), Some(0));
        assert_eq!(
            parse_iso_ms("2026-11-28 20:32:29Z"),
            Some(1_795_897_949_000)
        );
        assert_eq!(format_ms(1_795_897_949_000), "2026-11-28 20:32:29Z");
        assert_eq!(format_ms(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(parse_iso_ms("2000-02-29 00:00:00Z"), Some(951_782_400_000));
        assert_eq!(parse_iso_ms("2026-13-01 00:00:00Z"), None);
        assert_eq!(parse_iso_ms("yesterday"), None);
    }

    #[test]
    fn variables_follow_the_contract() {
        let db = DatabaseAccess {
            kind: DatabaseKind::Mariadb,
            host: "localhost".into(),
            port: 3306,
            name: "hf_x".into(),
            user: "hf_x".into(),
            password: "s3cret".into(),
            path: String::new(),
        };
        let vars = variables(&EnvironmentFacts {
            id: ENV,
            name: "live",
            release: "rel_1",
            commit: "abc",
            url: "http://a.test:8080/",
            domain: "a.test",
            files_dir: "/srv/files",
            database: Some(&db),
        });
        let get = |k: &str| {
            vars.iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("SITE_URL"), Some("http://a.test:8080"));
        assert_eq!(
            get("DATABASE_URL"),
            Some("mysql://hf_x:s3cret@localhost:3306/hf_x")
        );
        assert_eq!(get("DB_DRIVER"), Some("mysql"));
        assert_eq!(get("DB_PASSWORD"), Some("s3cret"));
        assert_eq!(get("FILES_DIR"), Some("/srv/files"));
        let sqlite = DatabaseAccess {
            kind: DatabaseKind::Sqlite,
            path: "/srv/db/site.sqlite".into(),
            ..db
        };
        assert_eq!(sqlite.url(), "sqlite:///srv/db/site.sqlite");
    }
}
