//! `hefring serve` and `hefring admin`: wiring the store, the queue, the engine and the API.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hefring_core::operation::OperationKind;
use hefring_core::{new_id, IdKind};
use hefring_engine::{time::now_ms, Engine, EngineConfig};
use hefring_queue::amqp::{AmqpOptions, AmqpQueue};
use hefring_queue::{EmbeddedQueue, Queue};
use hefring_store::{NewOperation, SealedStore, Store, TargetRecord, TokenRecord};

use crate::cli::{EngineArgs, ServeArgs, StateArgs, WorkerArgs};
use crate::isolation;

/// The data directory, created if needed, as an absolute path. It holds the state, the keys
/// and every project's mirror: its owner alone may enter it (0700, made so if it was not).
fn data_dir(state: &StateArgs) -> Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&state.data_dir)
        .with_context(|| {
            format!(
                "cannot create the data directory {}",
                state.data_dir.display()
            )
        })?;
    let dir = std::fs::canonicalize(&state.data_dir)?;
    owner_only(&dir, 0o700)?;
    Ok(dir)
}

/// Sets `path`'s mode to `mode` (owner only) unless it is already.
fn owner_only(path: &Path, mode: u32) -> Result<()> {
    let current = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if current != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot make {} private", path.display()))?;
    }
    Ok(())
}

/// The key file: `--secret-key-file`, by default `DATA_DIR/secret.key`.
fn key_files(state: &StateArgs, data_dir: &Path) -> hefring_store::KeyFiles {
    hefring_store::KeyFiles::new(
        state
            .secret_key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("secret.key")),
    )
}

/// The state database: `--database-url` (SQLite or PostgreSQL), by default SQLite in the
/// data directory (its files 0600), its secrets sealed with the installation's key (made on
/// first start). Answers whether it is the embedded default.
pub async fn open_store(state: &StateArgs, data_dir: &Path) -> Result<(Arc<SealedStore>, bool)> {
    let keys = key_files(state, data_dir);
    let sealer = keys
        .load_or_create()
        .with_context(|| format!("cannot read or make the secret key {}", keys.path.display()))?;
    open_store_with(state, data_dir, Arc::new(sealer)).await
}

async fn open_store_with(
    state: &StateArgs,
    data_dir: &Path,
    sealer: Arc<hefring_store::Sealer>,
) -> Result<(Arc<SealedStore>, bool)> {
    let (url, embedded) = match &state.database_url {
        Some(url) => (url.clone(), false),
        None => {
            let db = data_dir.join("hefring.db");
            // SQLite gives its -wal and -shm files the database file's mode.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&db)
                .with_context(|| format!("cannot create {}", db.display()))?;
            for suffix in ["", "-wal", "-shm"] {
                let file = data_dir.join(format!("hefring.db{suffix}"));
                if file.exists() {
                    owner_only(&file, 0o600)?;
                }
            }
            (format!("sqlite://{}", db.display()), true)
        }
    };
    let store = hefring_store::connect(&url, sealer)
        .await
        .context("cannot open the state database")?;
    Ok((store, embedded))
}

/// An exclusive lock on the data directory: one embedded server per state, so at start-up
/// every lease still marked running belongs to a process that is gone.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("hefring.lock"))?;
    // SAFETY: flock on a file descriptor we own.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        bail!(
            "another hefring serve is using the data directory {}",
            dir.display()
        );
    }
    Ok(file)
}

/// Aegir3 registers its own host as a server; so does a fresh Hefring, once.
async fn register_local_target(
    store: &Arc<dyn Store>,
    queue: &Arc<dyn Queue>,
    root: &Path,
) -> Result<()> {
    if store
        .get_setting("local_target_registered")
        .await?
        .is_some()
    {
        return Ok(());
    }
    let now = now_ms();
    let id = new_id(IdKind::Target, now);
    let target = TargetRecord {
        id: id.clone(),
        name: "local".into(),
        kind: "server".into(),
        status: "new".into(),
        host: "local".into(),
        // Outside the data directory, so no site on it comes near Hefring's secrets. Short:
        // PHP-FPM's sockets live below the root, and a socket path holds 107 bytes.
        root: root.to_string_lossy().into_owned(),
        http_port: 80,
        https_port: 443,
        web_user: "www-data".into(),
        host_key: None,
        inspection: None,
        settings: Default::default(),
        created_at: now,
        updated_at: now,
    };
    if store.target_by_name("local").await?.is_none() {
        store.insert_target(&target).await?;
        let op = NewOperation::planned(
            OperationKind::TargetVerify,
            &id,
            serde_json::json!({}),
            "hefring",
            now,
        );
        let op = store.create_operation(&op, now).await?;
        let _ = queue.publish(&hefring_api::job_for(&op)).await;
    }
    store.set_setting("local_target_registered", "1").await?;
    Ok(())
}

/// Environments deployed before isolation (no user of their own) on targets that require it
/// each get one `environment_isolate` operation, queued when an upgraded Hefring starts; one
/// already queued or running is left alone (the duplicate guard).
async fn queue_isolation(store: &Arc<dyn Store>, queue: &Arc<dyn Queue>) -> Result<()> {
    use hefring_core::target::Isolation;
    let mut page = hefring_store::Page {
        limit: 200,
        cursor: None,
    };
    let mut requiring = std::collections::HashMap::new();
    loop {
        let listed = store.list_environments(&Default::default(), &page).await?;
        for env in &listed.items {
            let settled = matches!(env.status.as_str(), "active" | "disabled");
            if !settled || !env.resources["user"].is_null() {
                continue;
            }
            // Targets are few and environments many: each target is read once.
            let requires = match requiring.get(&env.target_id) {
                Some(known) => *known,
                None => {
                    let requires = store.get_target(&env.target_id).await?.is_some_and(|t| {
                        t.kind == "server" && t.settings.isolation == Isolation::Required
                    });
                    requiring.insert(env.target_id.clone(), requires);
                    requires
                }
            };
            if !requires {
                continue;
            }
            let now = now_ms();
            let mut op = NewOperation::planned(
                OperationKind::EnvironmentIsolate,
                &env.id,
                serde_json::json!({}),
                "hefring",
                now,
            );
            op.queue = hefring_store::queue_for(
                store.as_ref(),
                OperationKind::EnvironmentIsolate,
                &env.id,
            )
            .await?;
            match store.create_operation(&op, now).await {
                Ok(op) => {
                    tracing::info!(environment = %env.id, operation = %op.id, "queued the move of an environment to its own user");
                    let _ = queue.publish(&hefring_api::job_for(&op)).await;
                }
                Err(hefring_store::StoreError::Duplicate { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match listed.next {
            Some(next) => page.cursor = Some(next),
            None => return Ok(()),
        }
    }
}

/// The backup store `--backup-store` names (default: `DATA_DIR/backups`).
fn backup_store(args: &EngineArgs, dir: &Path) -> Result<Arc<dyn hefring_objects::ObjectStore>> {
    let spec = match &args.backup_store {
        Some(spec) => spec.clone(),
        None => dir.join("backups").to_string_lossy().into_owned(),
    };
    hefring_objects::open_store(&spec, None).context("--backup-store")
}

/// The artifact store `--artifact-store` names, if any.
fn artifact_store(args: &EngineArgs) -> Result<Option<Arc<dyn hefring_objects::ObjectStore>>> {
    args.artifact_store
        .as_deref()
        .map(|spec| hefring_objects::open_store(spec, None).context("--artifact-store"))
        .transpose()
}

/// The engine's settings from the command line.
fn engine_config(
    args: &EngineArgs,
    dir: &Path,
    installation: &str,
    workers: usize,
    queues: Vec<String>,
    backups: Arc<dyn hefring_objects::ObjectStore>,
    artifacts: Option<Arc<dyn hefring_objects::ObjectStore>>,
) -> EngineConfig {
    let mut config = EngineConfig::new(dir.to_path_buf());
    config.backups = Some(backups);
    config.artifacts = artifacts;
    config.build_root = Some(args.build_root.clone().unwrap_or_else(|| {
        isolation::machine_dir("builds", dir, installation, isolation::is_root())
    }));
    config.workers = workers;
    config.queues = queues;
    config.task_timeout = Duration::from_secs(args.task_timeout);
    config.lease = Duration::from_secs(args.lease_seconds);
    config.max_redeliveries = args.max_redeliveries;
    config.acme = args
        .acme_directory
        .clone()
        .map(|directory| hefring_engine::acme::AcmeConfig {
            directory,
            ca_file: args.acme_ca_file.clone(),
            email: args.acme_email.clone(),
        });
    config.describe = Some(Arc::new(hefring_api::operation_json));
    // On an SSH target the control plane's own addresses mean nothing (its loopback is the
    // target's): its sites are kept from link-local and metadata addresses only.
    config.target_network_rules = Some(hefring_core::network::render(
        &hefring_core::network::Rules {
            table: &hefring_core::network::table_name(installation),
            role: "target",
            build_uid: None,
            private: &[],
        },
    ));
    config
}

/// RabbitMQ, consuming `queues` (none: publish only).
async fn broker(url: &str, queues: Vec<String>, prefetch: u16) -> Result<Arc<dyn Queue>> {
    let options = AmqpOptions {
        queues,
        prefetch: prefetch.max(1),
        ..AmqpOptions::default()
    };
    let queue = AmqpQueue::connect(url, options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the broker: {e}"))?;
    Ok(Arc::new(queue))
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
async fn stop_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn serve(args: ServeArgs) -> Result<()> {
    let dir = data_dir(&args.state)?;
    let _lock = lock_data_dir(&dir)?;
    let (sealed, embedded) = open_store(&args.state, &dir).await?;
    let report = sealed
        .seal_everything()
        .await
        .context("cannot seal the stored secrets")?;
    if report.ran {
        tracing::info!(
            key = sealed.sealer().current_id(),
            rows = report.resealed,
            login_links_forgotten = report.forgotten,
            "stored secrets sealed with the installation's key"
        );
    }
    if sealed.sealer().has_older_keys() {
        tracing::warn!("a secret key rotation was interrupted: run `hefring admin rotate-secret-key` again to finish it");
    }
    let store: Arc<dyn Store> = sealed;
    if embedded {
        // We hold the data directory's lock, so every running lease is a dead process's.
        // (A shared PostgreSQL database waits for leases to expire instead.)
        let reclaimed = store.expire_all_leases().await?;
        if reclaimed > 0 {
            tracing::info!(
                count = reclaimed,
                "resuming operations left running by the previous process"
            );
        }
    }
    let queue: Arc<dyn Queue> = match &args.engine.broker_url {
        Some(url) => {
            let consumed = if args.workers > 0 {
                vec![hefring_queue::amqp::DEFAULT_QUEUE.to_string()]
            } else {
                Vec::new()
            };
            broker(url, consumed, args.workers as u16).await?
        }
        None => Arc::new(EmbeddedQueue::new()),
    };
    let installation = isolation::installation_id(&store).await?;
    let targets_root = args.targets_root.clone().unwrap_or_else(|| {
        isolation::machine_dir("targets", &dir, &installation, isolation::is_root())
    });
    register_local_target(&store, &queue, &targets_root.join("local")).await?;
    queue_isolation(&store, &queue).await?;
    // Said plainly at start: on this machine, sites cannot be kept apart without root.
    if !isolation::is_root() {
        tracing::warn!(
            "Hefring is not running as root: environments on this machine's targets cannot each have their own user (isolation is impossible here); deploys to a target that requires isolation (the default) are refused. Run as root to host sites, or set isolation: optional on a target only to try Hefring out"
        );
        eprintln!("warning: Hefring is not root here, so it cannot isolate sites from one another: deploys to targets that require isolation (the default) will be refused");
    }
    let backups = backup_store(&args.engine, &dir)?;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let renewals = tokio::spawn(crate::renewal::run(
        store.clone(),
        queue.clone(),
        Duration::from_secs(args.engine.certificate_check_seconds),
        Duration::from_secs(args.engine.certificate_renew_days * 86_400),
        stopped.clone(),
    ));
    let workers = if args.workers > 0 {
        // With a broker, this process serves the default queue like any worker.
        let queues = match &args.engine.broker_url {
            Some(_) => vec![hefring_queue::amqp::DEFAULT_QUEUE.to_string()],
            None => Vec::new(),
        };
        let config = engine_config(
            &args.engine,
            &dir,
            &installation,
            args.workers,
            queues,
            backups.clone(),
            artifact_store(&args.engine)?,
        );
        let engine = Engine::new(store.clone(), queue.clone(), config)
            .await
            .context("cannot start the workers")?;
        engine.start(stopped)
    } else {
        Vec::new()
    };

    let state = hefring_api::AppState {
        store,
        queue,
        data_dir: dir.clone(),
        targets_root,
        backups,
        manual_clock: args.scheduler_clock == "manual",
    };
    let scheduler = (!state.manual_clock).then(|| tokio::spawn(schedule(state.clone())));
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    isolation::install_network_rules(
        "serve",
        &installation,
        &state.store,
        isolation::Services {
            api: Some(address),
            broker_url: args.engine.broker_url.as_deref(),
            database_url: args.state.database_url.as_deref(),
        },
    )
    .await;
    println!(
        "hefring listening on http://{address} (data in {})",
        dir.display()
    );
    hefring_api::serve(listener, state, stop_signal()).await?;
    let _ = stop.send(true);
    // Running operations keep their leases; the next start resumes them.
    for worker in workers {
        worker.abort();
    }
    renewals.abort();
    if let Some(scheduler) = scheduler {
        scheduler.abort();
    }
    Ok(())
}

/// Runs the scheduler on the system clock, once a second (schedules may name seconds).
async fn schedule(state: hefring_api::AppState) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        if let Err(e) = hefring_api::scheduler::pass(&state, now).await {
            tracing::warn!(error = ?e, "a scheduler pass failed");
        }
    }
}

/// `hefring worker`: runs the operations announced on the broker's `--queues`, against the
/// shared state database. Any number of workers, on any machines, can serve the same queues:
/// the store's leases decide who runs what.
pub async fn worker(args: WorkerArgs) -> Result<()> {
    let dir = data_dir(&args.state)?;
    let Some(url) = &args.engine.broker_url else {
        bail!("hefring worker needs --broker-url (HEFRING_BROKER_URL): it takes its work from RabbitMQ");
    };
    for queue in &args.queues {
        let ok = !queue.is_empty()
            && queue.len() <= 255
            && queue
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            bail!("--queues: {queue:?} is not a queue name (letters, digits, '.', '_', '-')");
        }
    }
    let (store, _) = open_store(&args.state, &dir).await?;
    let store: Arc<dyn Store> = store;
    let queue = broker(url, args.queues.clone(), args.concurrency).await?;
    let installation = isolation::installation_id(&store).await?;
    // The API's address is not known here: a `serve` on this machine confines its own.
    isolation::install_network_rules(
        "worker",
        &installation,
        &store,
        isolation::Services {
            api: None,
            broker_url: Some(url),
            database_url: args.state.database_url.as_deref(),
        },
    )
    .await;
    let mut config = engine_config(
        &args.engine,
        &dir,
        &installation,
        args.concurrency as usize,
        args.queues.clone(),
        backup_store(&args.engine, &dir)?,
        artifact_store(&args.engine)?,
    );
    // Seen by Celery's tools as a Celery worker: events for Flower, answers to `celery inspect`.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let task_names = hefring_core::operation::OperationKind::ALL
        .iter()
        .map(|k| format!("{}{}", hefring_queue::amqp::TASK_PREFIX, k.as_str()))
        .collect();
    let (presence, presence_tasks) = hefring_queue::control::Presence::start(
        url,
        format!("hefring.{}@{host}", std::process::id()),
        args.queues.clone(),
        task_names,
        args.concurrency as usize,
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot announce the worker on the broker: {e}"))?;
    config.events = Some(presence.clone());
    let engine = Engine::new(store, queue, config)
        .await
        .context("cannot start the workers")?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers = engine.start(stopped);
    println!(
        "hefring worker {} serving {} with {} at once",
        engine.name(),
        args.queues.join(","),
        args.concurrency
    );
    stop_signal().await;
    let _ = stop.send(true);
    presence.offline().await;
    // Unacked deliveries go back to the broker with the connection; leases expire and any
    // worker resumes the operations.
    for worker in workers.into_iter().chain(presence_tasks) {
        worker.abort();
    }
    Ok(())
}

pub async fn create_token(state: StateArgs, name: String) -> Result<()> {
    hefring_core::validate::name("name", &name).map_err(|e| anyhow::anyhow!("--{e}"))?;
    let dir = data_dir(&state)?;
    let (store, _) = open_store(&state, &dir).await?;
    let token = hefring_api::new_token();
    let now = now_ms();
    store
        .insert_token(&TokenRecord {
            id: new_id(IdKind::Token, now),
            name: name.clone(),
            token_sha256: hefring_api::hash_token(&token),
            role: "admin".into(),
            created_at: now,
        })
        .await?;
    eprintln!("created admin token {name:?}; it is shown once:");
    println!("{token}");
    Ok(())
}

/// `hefring admin rotate-secret-key`: a new key, every secret sealed again with it, then the
/// previous key removed. Each step can be cut short and the command run again.
pub async fn rotate_secret_key(state: StateArgs) -> Result<()> {
    let dir = data_dir(&state)?;
    // No embedded server may run meanwhile (it would write with the previous key).
    let _lock = lock_data_dir(&dir)?;
    let keys = key_files(&state, &dir);
    let sealer = keys
        .begin_rotation()
        .with_context(|| format!("cannot rotate the secret key {}", keys.path.display()))?;
    let (store, _) = open_store_with(&state, &dir, Arc::new(sealer)).await?;
    let report = store
        .seal_everything()
        .await
        .context("cannot seal the stored secrets with the new key")?;
    let id = store.sealer().current_id().to_string();
    drop(store);
    keys.finish_rotation()
        .with_context(|| format!("cannot remove {}", keys.old_path().display()))?;
    eprintln!(
        "every stored secret ({} rows) is sealed with the new key {id} in {}; back that file up \
         now (the previous key is gone), and give it to every process sharing the database",
        report.resealed,
        keys.path.display()
    );
    Ok(())
}
