//! The command line. Every flag `--foo-bar` can also be set as `HEFRING_FOO_BAR` or as
//! `foo_bar` in the TOML configuration file (see `config.rs`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "hefring",
    version,
    about = "Hefring: a hosting control plane for PHP sites"
)]
pub struct Cli {
    /// TOML configuration file (default DATA_DIR/hefring.toml).
    #[arg(long, env = "HEFRING_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// Where Hefring keeps its state, artifacts and keys.
    #[arg(long, env = "HEFRING_DATA_DIR", default_value = "./hefring-data")]
    pub data_dir: PathBuf,
    /// The state database (default: SQLite in the data directory).
    #[arg(long, env = "HEFRING_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The installation's secret key, which seals every secret in the state database
    /// (default: DATA_DIR/secret.key, made on first start). Back it up: without it, every
    /// stored secret is lost. Every process sharing a database needs the same key.
    #[arg(long, env = "HEFRING_SECRET_KEY_FILE")]
    pub secret_key_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The Hefring server.
    #[arg(
        long,
        env = "HEFRING_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// An API token (`hefring admin create-token`).
    #[arg(long, env = "HEFRING_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// How to print results.
    #[arg(
        long,
        env = "HEFRING_OUTPUT",
        value_enum,
        default_value = "table",
        global = true
    )]
    pub output: Output,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole system in one process: API, workers, embedded queue.
    Serve(ServeArgs),
    /// Run operations announced on RabbitMQ (with `--broker-url` and a shared
    /// `--database-url`), on any number of machines.
    Worker(WorkerArgs),
    /// Administration that works on the state directly.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Targets: where sites run.
    Target {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: TargetCommand,
    },
    /// Projects: git repositories with a .hefring.yml.
    Project {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Releases: immutable builds of a project at one commit.
    Release {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: ReleaseCommand,
    },
    /// Environments: sites of a project on a target.
    Env {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: EnvCommand,
    },
    /// Backups: archives of an environment's database and files (made with `env backup`).
    Backup {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Operations: what Hefring does, with their tasks and logs.
    Op {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: OpCommand,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, env = "HEFRING_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Operations run at once in this process (0: none; `hefring worker` processes run them).
    #[arg(long, env = "HEFRING_WORKERS", default_value_t = 4)]
    pub workers: usize,
    /// The scheduler's clock (cron commands, scheduled backups): `system`, or `manual`, where
    /// only `POST /api/v1/scheduler/tick` moves it (for tests).
    #[arg(long, env = "HEFRING_SCHEDULER_CLOCK", default_value = "system", value_parser = ["system", "manual"])]
    pub scheduler_clock: String,
    /// Where targets on this machine get their root when none is given (the `local` target
    /// registered at the first start: TARGETS_ROOT/local), outside the data directory.
    /// Default, per installation: /var/lib/hefring-targets/INSTALLATION as root, else
    /// DATA_DIR/../hefring-targets/INSTALLATION.
    #[arg(long, env = "HEFRING_TARGETS_ROOT")]
    pub targets_root: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The queues to serve, comma-separated (`hefring`, `hefring.target.<id>`, ...).
    #[arg(
        long,
        env = "HEFRING_QUEUES",
        value_delimiter = ',',
        default_value = "hefring"
    )]
    pub queues: Vec<String>,
    /// Operations run at once by this worker (also its broker prefetch).
    #[arg(long, env = "HEFRING_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
}

/// How operations run, wherever they run (`serve` or `worker`).
#[derive(Args, Debug)]
pub struct EngineArgs {
    /// RabbitMQ (`amqp://user:pass@host:5672/vhost`): operations are announced there as Celery
    /// protocol 2 messages. Without it, everything runs in `serve`'s process.
    #[arg(long, env = "HEFRING_BROKER_URL", hide_env_values = true)]
    pub broker_url: Option<String>,
    /// Seconds one task may run before it is killed and fails.
    #[arg(long, env = "HEFRING_TASK_TIMEOUT", default_value_t = 3600)]
    pub task_timeout: u64,
    /// Redeliveries of a message (workers died holding it) before it is poison: its
    /// operation fails and the message goes to the queue `hefring.dead`.
    #[arg(long, env = "HEFRING_MAX_REDELIVERIES", default_value_t = 5)]
    pub max_redeliveries: i64,
    /// Seconds an operation's lease lasts without renewal (at most 15).
    #[arg(long, env = "HEFRING_LEASE_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=15))]
    pub lease_seconds: u64,
    /// An ACME directory URL for HTTPS certificates (Let's Encrypt:
    /// https://acme-v02.api.letsencrypt.org/directory). Without it, the installation's own
    /// CA signs them (`GET /api/v1/ca.pem`).
    #[arg(long, env = "HEFRING_ACME_DIRECTORY")]
    pub acme_directory: Option<String>,
    /// A PEM file of extra roots to trust for the ACME server's API (a private or test CA).
    #[arg(long, env = "HEFRING_ACME_CA_FILE")]
    pub acme_ca_file: Option<std::path::PathBuf>,
    /// The contact address of the ACME account.
    #[arg(long, env = "HEFRING_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// Where backup archives are kept: a directory (shared by every worker, e.g. over NFS) or
    /// an S3-compatible store, `s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION`, whose
    /// credentials come from HEFRING_S3_ACCESS_KEY_ID and HEFRING_S3_SECRET_ACCESS_KEY (or
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY). Default: DATA_DIR/backups.
    #[arg(long, env = "HEFRING_BACKUP_STORE")]
    pub backup_store: Option<String>,
    /// Where release artifacts are shared, so that any worker can deploy what another built:
    /// a directory every worker reaches or an S3-compatible store (same syntax and
    /// credentials as --backup-store). Default: none (each machine's DATA_DIR/artifacts).
    #[arg(long, env = "HEFRING_ARTIFACT_STORE")]
    pub artifact_store: Option<String>,
    /// Renew HTTPS certificates this many days before they end.
    #[arg(long, env = "HEFRING_CERTIFICATE_RENEW_DAYS", default_value_t = 30)]
    pub certificate_renew_days: u64,
    /// How often (seconds) to look for certificates to renew.
    #[arg(long, env = "HEFRING_CERTIFICATE_CHECK_SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub certificate_check_seconds: u64,
    /// Where build trees are made, outside the data directory (as root, build commands run
    /// there as the user hefring-build in a bubblewrap sandbox). Default, per installation:
    /// /var/lib/hefring-builds/INSTALLATION as root, else DATA_DIR/../hefring-builds/INSTALLATION.
    #[arg(long, env = "HEFRING_BUILD_ROOT")]
    pub build_root: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create an admin API token; prints it alone on the last line.
    CreateToken {
        #[command(flatten)]
        state: StateArgs,
        /// What the token is for (shown as the requester of its operations).
        #[arg(long)]
        name: String,
    },
    /// Make a new secret key and seal every stored secret with it; the previous key is kept
    /// as KEY_FILE.old until every secret is sealed again (run again to finish an
    /// interrupted rotation). Stop every `serve` and `worker` first.
    RotateSecretKey {
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(Args, Debug)]
pub struct Follow {
    /// Follow the operation's log until it ends; exit non-zero unless it succeeded.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Subcommand, Debug)]
pub enum TargetCommand {
    /// Register a server target.
    Add {
        name: String,
        /// `local` or `ssh://user@host:port`.
        #[arg(long)]
        host: String,
        #[arg(long)]
        root: Option<String>,
        #[arg(long)]
        http_port: Option<u16>,
        #[arg(long)]
        https_port: Option<u16>,
        #[arg(long)]
        web_user: Option<String>,
        /// Pin this host key (`TYPE BASE64`) instead of trusting the first one seen.
        #[arg(long)]
        host_key: Option<String>,
        /// `required` (default): each environment its own user, deploys refused where Hefring
        /// is not root; `optional`: every site as Hefring's user there (never for hosting).
        #[arg(long, value_parser = ["required", "optional"])]
        isolation: Option<String>,
    },
    List,
    Show {
        target: String,
    },
    /// Check that the target is reachable and has what sites need.
    Verify {
        target: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Remove a target that runs no environments.
    Rm {
        target: String,
        #[command(flatten)]
        follow: Follow,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProjectCommand {
    /// Add a project from a git URL or an absolute path.
    Add {
        name: String,
        #[arg(long)]
        git_url: String,
        #[arg(long)]
        branch: Option<String>,
    },
    List,
    Show {
        project: String,
    },
    /// Check that the repository is reachable and its manifest valid.
    Verify {
        project: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Print the project's deploy key (public half): add it to the repository (read-only);
    /// the project's fetches use it alone.
    DeployKey {
        project: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReleaseCommand {
    /// Build a release of a branch, tag or commit.
    Build {
        project: String,
        #[arg(long = "ref")]
        git_ref: String,
        #[command(flatten)]
        follow: Follow,
    },
    List {
        #[arg(long)]
        project: Option<String>,
    },
    Show {
        release: String,
    },
    /// Update every environment running this release to another one of the project, by
    /// child operations: one environment first (a canary), then the rest at most
    /// `--parallelism` at a time.
    FleetUpdate {
        release: String,
        /// The release to update to (ready, of the same project).
        #[arg(long, value_name = "RELEASE")]
        to: String,
        /// Updates at once after the canary (1 to 50; default 1).
        #[arg(long, value_name = "N")]
        parallelism: Option<u32>,
        /// Failed updates tolerated before the rest are not started (default 0).
        #[arg(long, value_name = "N")]
        max_failures: Option<u32>,
        /// Also the project's environments on releases older than `--to`.
        #[arg(long)]
        include_older: bool,
        #[command(flatten)]
        follow: Follow,
    },
}

#[derive(Subcommand, Debug)]
pub enum EnvCommand {
    /// Create an environment; deploy a release to it next.
    Create {
        name: String,
        /// The project (name or id).
        #[arg(long)]
        project: String,
        /// The target (name or id).
        #[arg(long)]
        target: String,
        #[arg(long)]
        domain: String,
        /// Another host name serving the site; repeat for more.
        #[arg(long = "alias")]
        aliases: Vec<String>,
        /// Another host name answering 301 to the domain; repeat for more.
        #[arg(long = "redirect")]
        redirects: Vec<String>,
        /// off, on or required.
        #[arg(long)]
        https: Option<String>,
    },
    List {
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        target: Option<String>,
    },
    Show {
        environment: String,
    },
    /// Deploy a release to a new environment.
    Deploy {
        environment: String,
        #[arg(long)]
        release: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Update a deployed environment to another release, with zero downtime.
    Update {
        environment: String,
        #[arg(long)]
        release: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Check the environment's servers and health.
    Verify {
        environment: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Answer every path with a "site disabled" page (503) until enabled again.
    Disable {
        environment: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Serve a disabled site again.
    Enable {
        environment: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Print a one-time link that logs in to the site (the manifest's `login` command).
    LoginLink {
        environment: String,
    },
    /// Delete the environment and everything it created on its target.
    Rm {
        environment: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Back up the database and the persistent files into the backup store; the operation's
    /// result names the backup.
    Backup {
        environment: String,
        /// Why it is taken (at most 200 characters).
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        follow: Follow,
    },
    /// Restore a backup of this environment, or of another of its project, into it (a safety
    /// backup of what is there is taken first).
    Restore {
        environment: String,
        /// The backup's id (`hefring backup list`).
        #[arg(long)]
        backup: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// A new environment running the same release, with a fresh backup of this one restored
    /// into it.
    Clone {
        environment: String,
        /// The new environment's name.
        #[arg(long)]
        name: String,
        #[arg(long)]
        domain: String,
        /// The target (name or id; default: this environment's).
        #[arg(long)]
        target: Option<String>,
        /// Another host name serving the site; repeat for more.
        #[arg(long = "alias")]
        aliases: Vec<String>,
        /// Another host name answering 301 to the domain; repeat for more.
        #[arg(long = "redirect")]
        redirects: Vec<String>,
        /// off, on or required (default: this environment's).
        #[arg(long)]
        https: Option<String>,
        #[command(flatten)]
        follow: Follow,
    },
    /// Copy another environment's database and files into this one (a safety backup of what
    /// is here is taken first), then run this environment's deploy commands.
    Sync {
        environment: String,
        /// The environment to copy from (name or id), of the same project.
        #[arg(long)]
        from: String,
        /// Keep this environment's database; copy the files only.
        #[arg(long)]
        no_database: bool,
        /// Keep this environment's files; copy the database only.
        #[arg(long)]
        no_files: bool,
        #[command(flatten)]
        follow: Follow,
    },
    /// Move the environment to another server target: a backup where it runs, a copy on the
    /// new target with the backup restored, then the switch and the removal of the old copy.
    Migrate {
        environment: String,
        /// The target to move to (name or id).
        #[arg(long)]
        target: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Show the environment's schedules (cron, scheduled backups, the last cron run); with
    /// flags, change them (what no flag names stays as it is).
    Schedule {
        environment: String,
        /// Run the manifest's cron command on this schedule instead of the manifest's.
        #[arg(long, value_name = "SCHEDULE")]
        cron: Option<String>,
        /// Drop the cron override: the manifest's schedule applies again.
        #[arg(long, conflicts_with = "cron")]
        no_cron_override: bool,
        /// Back up on this schedule (`0 3 * * *`, `@daily`, ...).
        #[arg(long, value_name = "SCHEDULE")]
        backups: Option<String>,
        /// Scheduled backups kept: the newest of each of the last N days (default: as now,
        /// or 0 for a new backup schedule).
        #[arg(long, value_name = "N")]
        keep_daily: Option<u32>,
        /// Scheduled backups kept: the newest of each of the last N ISO weeks (default: as
        /// now, or 0 for a new backup schedule).
        #[arg(long, value_name = "N")]
        keep_weekly: Option<u32>,
        /// No scheduled backups (the backups already taken stay).
        #[arg(long, conflicts_with_all = ["backups", "keep_daily", "keep_weekly"])]
        no_backups: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Backups, newest first.
    List {
        /// Only this environment's (name or id).
        #[arg(long)]
        env: Option<String>,
        /// Only this kind: manual, scheduled, safety or copy.
        #[arg(long)]
        kind: Option<String>,
    },
    /// One backup, with its manifest.
    Show { backup: String },
    /// Save the backup's archive (tar.zst) to a file.
    Download {
        backup: String,
        /// Where to save it (an existing directory: ID.tar.zst in it). Default: ID.tar.zst in
        /// the current directory.
        #[arg(short = 'o', long = "file", value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Delete the backup: its archive leaves the store.
    Rm {
        backup: String,
        #[command(flatten)]
        follow: Follow,
    },
}

#[derive(Subcommand, Debug)]
pub enum OpCommand {
    List {
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        status: Option<String>,
        /// Only the children of this operation (a fleet update's environment updates).
        #[arg(long, value_name = "OPERATION")]
        parent: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    Show {
        operation: String,
    },
    /// Print the log; with --follow, stream it live until the operation ends.
    Logs {
        operation: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// A new attempt of a failed or cancelled operation.
    Retry {
        operation: String,
        /// Run every task again instead of resuming at the failed one.
        #[arg(long)]
        from_start: bool,
        #[command(flatten)]
        follow: Follow,
    },
    Cancel {
        operation: String,
    },
}
