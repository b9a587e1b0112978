//! The JSON Hefring's API speaks, shared by the server (which serialises it and documents
//! it in OpenAPI) and the CLI (which reads it). Only these types cross the wire.
//! Timestamps are RFC 3339 strings in UTC.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// A page of a list, newest first; pass `next` as `cursor` for the following page.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct List<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// At most this many items (1-500, default 50).
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// `malformed_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`,
    /// `operation_in_progress`, `duplicate_operation`, `invalid_field`, `internal`.
    pub code: String,
    pub message: String,
    pub field: Option<String>,
    /// The operation a 409 is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Target {
    pub id: String,
    pub name: String,
    /// `server` (or `kubernetes`, later).
    pub kind: String,
    /// `new`, `ready`, `failed` (lacks something environments need), `unreachable`.
    pub status: String,
    /// `local` or `ssh://user@host:port`.
    pub host: String,
    /// Base directory for everything Hefring puts on the target.
    pub root: String,
    pub http_port: u16,
    pub https_port: u16,
    /// The user PHP runs as.
    pub web_user: String,
    /// The SSH host key pinned on first verify (`TYPE BASE64`).
    pub host_key: Option<String>,
    /// What the last verify found: OS, tools, services, what is missing.
    pub inspection: Option<Value>,
    /// How Hefring administers the target's MariaDB (passwords are never shown).
    pub mariadb: MariadbAdmin,
    /// How Hefring administers the target's PostgreSQL (passwords are never shown).
    pub postgresql: PostgresqlAdmin,
    /// Set when a system-managed nginx serves the sites (the Aegir3 layout).
    pub system_nginx: Option<SystemNginx>,
    /// The queue its operations go to (`hefring`, or `hefring.target.<id>` with `own_queue`).
    pub queue: String,
    /// `required` (the default): each environment runs as its own Unix user, and a deploy is
    /// refused where Hefring is not root. `optional`: where Hefring is not root, every site
    /// runs as Hefring's own user (for trying Hefring out, never for hosting).
    pub isolation: String,
    pub created_at: String,
    pub updated_at: String,
}

/// A system-managed nginx that includes the directory Hefring writes server blocks into.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SystemNginx {
    /// The directory whose `*.conf` the system nginx includes in its `http` block.
    pub sites_dir: String,
    /// The command (argv) that tests its configuration; default `["nginx", "-t", "-q"]`.
    pub test_command: Option<Vec<String>>,
    /// The command (argv) that reloads it; default `["nginx", "-s", "reload"]`.
    pub reload_command: Option<Vec<String>>,
}

/// A MariaDB admin connection. Defaults: root over `/run/mysqld/mysqld.sock`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MariadbAdmin {
    /// The unix socket (sites then connect to `localhost`); `null` with `host` for TCP.
    pub socket: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    /// Write-only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// A PostgreSQL admin connection. Defaults: `postgres` on 127.0.0.1:5432.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresqlAdmin {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    /// Write-only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTarget {
    pub name: String,
    /// Only `server` for now.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// `local` or `ssh://user@host:port`.
    pub host: String,
    pub root: Option<String>,
    pub http_port: Option<u16>,
    pub https_port: Option<u16>,
    pub web_user: Option<String>,
    /// Pin this host key instead of accepting the first one seen.
    pub host_key: Option<String>,
    pub mariadb: Option<MariadbAdmin>,
    pub postgresql: Option<PostgresqlAdmin>,
    /// Serve the sites through a system-managed nginx instead of Hefring's own.
    pub system_nginx: Option<SystemNginx>,
    /// Send the operations of this target and its environments to its own queue,
    /// `hefring.target.<id>`, for workers started with `--queues hefring.target.<id>`.
    #[serde(default)]
    pub own_queue: bool,
    /// `required` (default) or `optional`: see [`Target::isolation`].
    pub isolation: Option<String>,
}

fn default_kind() -> String {
    "server".into()
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Project {
    pub id: String,
    pub name: String,
    pub git_url: String,
    pub branch: String,
    /// `new`, `verified`, `invalid` (no branch or a bad manifest), `unreachable`.
    pub status: String,
    /// The manifest read by the last successful verify.
    pub manifest: Option<Value>,
    /// The public half of the project's deploy key (`ssh-ed25519 ...`): give the
    /// repository's host this key (read-only) and its fetches use it alone.
    #[serde(default)]
    pub deploy_key: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DeployKey {
    /// Add this line as a (read-only) deploy key of the project's repository.
    pub public_key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    pub name: String,
    /// https, http, ssh, git or file URL, `user@host:path`, or an absolute path.
    pub git_url: String,
    /// Default `main`.
    pub branch: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildRelease {
    /// A branch, tag or commit.
    #[serde(rename = "ref")]
    pub git_ref: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Artifact {
    pub sha256: String,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Release {
    pub id: String,
    pub project: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The exact commit built.
    pub commit: String,
    pub artifact: Option<Artifact>,
    pub image: Option<String>,
    /// `building`, `ready`, `failed`.
    pub status: String,
    /// The operation that built it.
    pub operation: String,
    /// Environments running this release.
    pub environments: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Subject {
    #[serde(rename = "type")]
    pub subject_type: String,
    pub id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub name: String,
    /// `pending`, `running`, `succeeded`, `failed`, `skipped`, `cancelled`.
    pub status: String,
    pub attempts: u32,
    /// A step that undoes a failed or cancelled attempt.
    pub rollback: bool,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Operation {
    pub id: String,
    /// `<subject>_<action>`: `target_verify`, `project_verify`, `release_build`, ...
    pub kind: String,
    pub subject: Subject,
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled`.
    pub status: String,
    pub attempt: u32,
    pub parent: Option<String>,
    pub requested_by: String,
    /// What was asked (the request's body).
    pub inputs: Value,
    /// Ids it produced, such as `{"release": ID}`.
    pub result: Value,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub updated_at: String,
    pub tasks: Vec<Task>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryOperation {
    /// Run every task again instead of resuming at the failed one.
    #[serde(default)]
    pub from_start: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SshKey {
    /// Put this line in the target user's `authorized_keys`.
    pub public_key: String,
}

/// Another host name of an environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Alias {
    pub domain: String,
    /// Answer 301 to the primary domain instead of serving the site.
    #[serde(default)]
    pub redirect: bool,
}

/// One site of a project on a target.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Environment {
    pub id: String,
    pub name: String,
    pub project: String,
    pub target: String,
    /// Where the site answers, with the port when not the default.
    pub url: String,
    pub domain: String,
    pub aliases: Vec<Alias>,
    /// `off`, `on` or `required`.
    pub https: String,
    /// The release it runs (`null` before the first deploy).
    pub release: Option<String>,
    /// `new`, `deploying`, `active`, `updating`, `disabled`, `failed`, `deleting`, `deleted`.
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnvironment {
    pub name: String,
    /// The project's id.
    pub project: String,
    /// The target's id.
    pub target: String,
    pub domain: String,
    #[serde(default)]
    pub aliases: Vec<Alias>,
    /// `off` (default), `on` or `required`.
    pub https: Option<String>,
}

/// The body of deploy and update.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRelease {
    /// The release's id.
    pub release: String,
}

/// The PEM certificate of the local CA that signs HTTPS certificates when no ACME directory is
/// configured.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct CaCertificate {
    pub pem: String,
}

/// A one-time login link, made by the environment's `login` command.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginLink {
    pub url: String,
    /// The operation that made it (for the audit trail).
    pub operation: String,
}

/// An archive of an environment's database and persistent files, in the backup store.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Backup {
    pub id: String,
    pub environment: String,
    /// The operation that made it.
    pub operation: String,
    /// `manual`, `scheduled` (pruned by the environment's retention), `safety` (taken by a
    /// restore or sync before it overwrote anything) or `copy` (the source of a clone or sync).
    pub kind: String,
    pub description: String,
    /// `creating`, `ready` or `failed`.
    pub status: String,
    /// The archive's size in bytes, once ready.
    pub size: Option<i64>,
    /// The archive's SHA-256, once ready.
    pub sha256: Option<String>,
    /// Environment, release, commit, the parts with their sizes and SHA-256, tool versions.
    #[schema(value_type = Object)]
    pub manifest: Option<serde_json::Value>,
    pub created_at: String,
    pub updated_at: String,
}

/// The body of a backup request (it may be empty).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBackup {
    /// Why it was taken (at most 200 characters).
    #[serde(default)]
    pub description: Option<String>,
}

/// Restore a backup into this environment (the backup may be another environment's, of the
/// same project).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreBackup {
    /// The backup's id.
    pub backup: String,
}

/// Clone an environment: a new environment running the same release, with a fresh backup of
/// this one restored into it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneEnvironment {
    pub name: String,
    pub domain: String,
    /// The target's id (default: the source's target).
    pub target: Option<String>,
    #[serde(default)]
    pub aliases: Vec<Alias>,
    /// `off`, `on` or `required` (default: the source's).
    pub https: Option<String>,
}

/// Copy the database and/or files of another environment of the same project into this one,
/// then run its deploy commands.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncEnvironment {
    /// The source environment's id.
    pub from: String,
    #[serde(default = "yes")]
    pub database: bool,
    #[serde(default = "yes")]
    pub files: bool,
}

fn yes() -> bool {
    true
}

/// Update every environment running a release to another one: a canary first, alone, then the
/// rest a bounded number at a time.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetUpdate {
    /// The release to update to (of the same project, ready).
    pub to: String,
    /// Updates at once after the canary (1 to 50, default 1).
    pub parallelism: Option<u32>,
    /// Failed updates tolerated before the rest are not started (default 0).
    pub max_failures: Option<u32>,
    /// Also the project's environments on releases older than `to`.
    #[serde(default)]
    pub include_older: bool,
}

/// An environment's schedules: its cron command's and its scheduled backups'.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedules {
    /// The cron schedule: the environment's override, or else the manifest's (`null`: none).
    #[serde(default)]
    pub cron: Option<String>,
    /// Scheduled backups with their retention (`null`: none).
    #[serde(default)]
    pub backups: Option<BackupSchedule>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupSchedule {
    /// A cron schedule (`0 3 * * *`, `@daily`, ...).
    pub schedule: String,
    /// Keep the newest scheduled backup of each of the last N days that have backups.
    pub keep_daily: u32,
    /// Keep the newest scheduled backup of each of the last N ISO weeks that have backups.
    pub keep_weekly: u32,
}

/// What the scheduler knows of an environment: its schedules, where they come from, and the
/// cron command's last run.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ScheduleStatus {
    pub cron: Option<String>,
    /// `environment` (an override), `manifest`, or `null`.
    pub cron_source: Option<String>,
    /// The manifest's cron command.
    pub cron_command: Option<String>,
    pub backups: Option<BackupSchedule>,
    /// The last cron operation (its log is the command's output).
    pub last_cron_run: Option<Operation>,
    /// Runs skipped because the previous one still ran.
    pub skipped_cron_runs: u64,
    pub last_skipped_at: Option<String>,
}

/// Drive the scheduler's clock (only with `serve --scheduler-clock manual`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SchedulerTick {
    /// ISO 8601 time the scheduler takes as now.
    pub now: String,
}

/// What one pass of the scheduler did.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SchedulerPass {
    pub started: Vec<Operation>,
    /// `environment: what` for runs skipped because the previous one still ran.
    pub skipped: Vec<String>,
}

/// Move an environment to another server target.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateEnvironment {
    /// The target's id.
    pub target: String,
}
