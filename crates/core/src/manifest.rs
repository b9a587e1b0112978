//! `.hefring.yml`: how a project is built, installed, deployed, logged into and kept alive.

use serde::{Deserialize, Serialize};

use crate::validate::{self, FieldError};

/// The file Hefring reads at the root of a project's repository.
pub const MANIFEST_FILE: &str = ".hefring.yml";

/// A command written by the project owner: a string runs through `sh -c`, a list runs as argv.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Command {
    Shell(String),
    Argv(Vec<String>),
}

impl Command {
    /// The argv to execute: `["sh", "-c", s]` for a string, the list itself otherwise.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell(s) => vec!["sh".into(), "-c".into(), s.clone()],
            Command::Argv(v) => v.clone(),
        }
    }

    /// How the command reads in a log line.
    pub fn display(&self) -> String {
        match self {
            Command::Shell(s) => s.clone(),
            Command::Argv(v) => v.join(" "),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    #[default]
    Php,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseKind {
    Mariadb,
    Postgresql,
    Sqlite,
    #[default]
    None,
}

impl DatabaseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DatabaseKind::Mariadb => "mariadb",
            DatabaseKind::Postgresql => "postgresql",
            DatabaseKind::Sqlite => "sqlite",
            DatabaseKind::None => "none",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cron {
    pub schedule: String,
    pub command: Command,
}

/// A parsed and validated manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default = "default_docroot")]
    pub docroot: String,
    #[serde(default)]
    pub writable: Vec<String>,
    #[serde(default)]
    pub database: DatabaseKind,
    #[serde(default)]
    pub build: Vec<Command>,
    #[serde(default)]
    pub install: Vec<Command>,
    #[serde(default)]
    pub deploy: Vec<Command>,
    #[serde(default)]
    pub login: Option<Command>,
    #[serde(default)]
    pub cron: Option<Cron>,
    #[serde(default = "default_health")]
    pub health: String,
}

fn default_docroot() -> String {
    ".".into()
}

/// Paths of the tree that reach nginx's configuration (as `location` prefixes) and the
/// target's shell scripts: letters, digits, `.`, `_`, `-`, `+`, `@` and `/` only.
fn plain_path(field: &str, path: &str) -> Result<(), FieldError> {
    match path
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '@' | '/')))
    {
        None => Ok(()),
        Some(c) => Err(FieldError::new(
            field,
            format!(
                "holds {c:?}: only letters, digits, '.', '_', '-', '+', '@' and '/' are allowed"
            ),
        )),
    }
}

fn default_health() -> String {
    "/".into()
}

/// Why a manifest was refused, in words a project owner can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{MANIFEST_FILE} is not valid YAML for a manifest: {0}")]
    Syntax(String),
    #[error("{MANIFEST_FILE}: {0}")]
    Invalid(FieldError),
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        if text.trim().is_empty() {
            return Err(ManifestError::Syntax("the file is empty".into()));
        }
        let manifest: Manifest =
            serde_yaml_ng::from_str(text).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        manifest.check().map_err(ManifestError::Invalid)?;
        Ok(manifest)
    }

    fn check(&self) -> Result<(), FieldError> {
        validate::relative_path("docroot", &self.docroot)?;
        plain_path("docroot", &self.docroot)?;
        let within = |path: &str, dir: &str| path == dir || path.starts_with(&format!("{dir}/"));
        for (i, path) in self.writable.iter().enumerate() {
            let field = format!("writable[{i}]");
            validate::relative_path(&field, path)?;
            plain_path(&field, path)?;
            if path == "." {
                return Err(FieldError::new(
                    field,
                    "must name a directory inside the tree",
                ));
            }
            // The site writes there: serving the docroot from it would let PHP run uploads.
            if within(&self.docroot, path) {
                return Err(FieldError::new(
                    field,
                    "holds the docroot: the code the site serves must not be writable",
                ));
            }
            if let Some(other) = self.writable[..i]
                .iter()
                .find(|o| within(path, o) || within(o, path))
            {
                return Err(FieldError::new(
                    field,
                    format!("overlaps the writable path {other:?}: each must stand alone"),
                ));
            }
        }
        if !self.health.starts_with('/') || self.health.chars().any(|c| c.is_control() || c == ' ')
        {
            return Err(FieldError::new(
                "health",
                "must be a path starting with '/'",
            ));
        }
        let lists = [
            ("build", &self.build),
            ("install", &self.install),
            ("deploy", &self.deploy),
        ];
        for (name, commands) in lists {
            for (i, command) in commands.iter().enumerate() {
                check_command(&format!("{name}[{i}]"), command)?;
            }
        }
        if let Some(login) = &self.login {
            check_command("login", login)?;
        }
        if let Some(cron) = &self.cron {
            check_command("cron.command", &cron.command)?;
            check_schedule("cron.schedule", &cron.schedule)?;
        }
        Ok(())
    }
}

fn check_command(field: &str, command: &Command) -> Result<(), FieldError> {
    let empty = match command {
        Command::Shell(s) => s.trim().is_empty(),
        Command::Argv(v) => v.is_empty() || v[0].is_empty(),
    };
    if empty {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if command.argv().iter().any(|a| a.contains('\0')) {
        return Err(FieldError::new(field, "must not contain NUL characters"));
    }
    Ok(())
}

impl Manifest {
    /// Parses a manifest read for a new release or a project's verify: [`Manifest::parse`]
    /// plus the rules added since releases were first built (a cron schedule fires at most
    /// once a minute). Manifests of existing releases are read with [`Manifest::parse`], so
    /// they keep deploying.
    pub fn parse_new(text: &str) -> Result<Manifest, ManifestError> {
        let manifest = Manifest::parse(text)?;
        if let Some(cron) = &manifest.cron {
            crate::validate::cron_schedule("cron.schedule", &cron.schedule)
                .map_err(ManifestError::Invalid)?;
        }
        Ok(manifest)
    }
}

/// A cron schedule (`crate::schedule`): five fields (minute hour day month weekday), or six
/// with seconds first, or a macro such as `@daily`.
pub fn check_schedule(field: &str, schedule: &str) -> Result<(), FieldError> {
    crate::schedule::Schedule::parse(schedule)
        .map(|_| ())
        .map_err(|e| FieldError::new(field, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_manifest_may_not_run_cron_more_than_once_a_minute() {
        let every_second = "runtime: php\ncron: {schedule: '* * * * * *', command: x}\n";
        // Releases built before the rule still deploy.
        assert!(Manifest::parse(every_second).is_ok());
        let refused = Manifest::parse_new(every_second).unwrap_err().to_string();
        assert!(refused.contains("cron.schedule"), "{refused}");
        assert!(refused.contains("once a minute"), "{refused}");
        let at_second_30 = "runtime: php\ncron: {schedule: '30 */5 * * * *', command: x}\n";
        assert!(Manifest::parse_new(at_second_30).is_ok());
    }

    #[test]
    fn a_drupal_manifest_parses() {
        let m = Manifest::parse(
            r#"
runtime: php
docroot: web
writable: [web/sites/default/files]
database: mariadb
build:
  - composer install --no-dev
install:
  - [drush, site:install, -y]
deploy: [drush deploy]
login: drush uli --uri=$SITE_URL
cron: {schedule: "*/15 * * * *", command: drush cron}
health: /user/login
"#,
        )
        .unwrap();
        assert_eq!(m.docroot, "web");
        assert_eq!(m.database, DatabaseKind::Mariadb);
        assert_eq!(m.build[0].argv(), ["sh", "-c", "composer install --no-dev"]);
        assert_eq!(m.install[0].argv(), ["drush", "site:install", "-y"]);
        assert_eq!(m.cron.unwrap().schedule, "*/15 * * * *");
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let m = Manifest::parse("runtime: php\n").unwrap();
        assert_eq!(m.docroot, ".");
        assert_eq!(m.health, "/");
        assert_eq!(m.database, DatabaseKind::None);
        assert!(m.build.is_empty());
    }

    fn refusal(text: &str) -> String {
        Manifest::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        assert!(refusal("").contains("empty"));
        assert!(refusal("docroot: [").contains("not valid YAML"));
        assert!(refusal("databse: mariadb").contains("unknown field `databse`"));
        assert!(refusal("database: oracle").contains("unknown variant `oracle`"));
        assert!(refusal("docroot: ../etc").contains("docroot"));
        assert!(refusal("docroot: web\nwritable: [web]").contains("holds the docroot"));
        assert!(refusal("writable: [a, a/b]").contains("overlaps"));
        assert!(refusal("writable: [\"a b\"]").contains("only letters"));
        assert!(refusal("docroot: \"w;eb\"").contains("docroot"));
        assert!(refusal("writable: [/var]").contains("writable[0]"));
        assert!(refusal("health: nope").contains("health"));
        assert!(refusal("build: ['']").contains("build[0]"));
        assert!(refusal("cron: {schedule: '* *', command: x}").contains("cron.schedule"));
    }
}
