//! The worker loop and the life of one operation run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hefring_backend_server::SshKeyPair;
use hefring_core::operation::{next_task, OperationStatus, TaskStatus};
use hefring_queue::{Delivery, Queue};
use hefring_store::{
    Claim, LeaseState, NamedClaim, OperationOutcome, OperationRecord, Store, StoreError,
    TaskFinish, TaskOutcome, TaskStart,
};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::log::OperationLog;
use crate::progress::Recorder;
use crate::run::{Context, TaskContext, TaskError};
use crate::tasks;
use crate::time::now_ms;

/// What an observer hears about: a hook for benchmarks and tests, called on the worker.
#[derive(Clone, Copy, Debug)]
pub enum Observed<'a> {
    TaskStarted { operation: &'a str, task: &'a str },
    OperationEnded { operation: &'a str },
}

pub type Observer = Arc<dyn Fn(Observed<'_>) + Send + Sync>;

/// How the error of an operation failed as poison begins.
pub const POISON: &str = "poison message";

/// How a finished operation is shown to a client waiting on its result (the API's JSON).
pub type Describe = Arc<dyn Fn(&OperationRecord) -> Value + Send + Sync>;

#[derive(Clone)]
pub struct EngineConfig {
    /// Operations run at once by this process.
    pub workers: usize,
    /// How long a lease lasts without renewal (at most 15 s).
    pub lease: Duration,
    /// How often an idle worker looks at the store even without a wake-up.
    pub poll: Duration,
    /// How long one task may run before it is killed and fails.
    pub task_timeout: Duration,
    /// The queues this worker serves (empty: all).
    pub queues: Vec<String>,
    pub data_dir: PathBuf,
    pub observer: Option<Observer>,
    /// Where HTTPS certificates come from; `None`: the installation's local CA.
    pub acme: Option<crate::acme::AcmeConfig>,
    /// How results sent to waiting clients show an operation; `None`: a summary.
    pub describe: Option<Describe>,
    /// Who hears about operations starting and ending (Celery events), if anyone.
    pub events: Option<Arc<dyn hefring_queue::WorkerEvents>>,
    /// How many times a message may be redelivered (workers died holding it) before it is
    /// poison: its operation fails and the message goes to the dead-letter queue.
    pub max_redeliveries: i64,
    /// Where backups are kept; `None`: `DATA_DIR/backups`.
    pub backups: Option<Arc<dyn hefring_objects::ObjectStore>>,
    /// Where release artifacts are shared between machines; `None`: this machine only.
    pub artifacts: Option<Arc<dyn hefring_objects::ObjectStore>>,
    /// Where build trees are made; it must be outside the data directory for builds to run
    /// isolated. `None`: `DATA_DIR/builds` (builds run only where Hefring is not root).
    pub build_root: Option<PathBuf>,
    /// The nftables script that keeps sites on SSH targets from link-local and metadata
    /// addresses (`core::network`), applied on each as it is prepared; `None`: none.
    pub target_network_rules: Option<String>,
}

impl EngineConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        EngineConfig {
            workers: 4,
            lease: Duration::from_secs(15),
            poll: Duration::from_millis(500),
            task_timeout: Duration::from_secs(3600),
            queues: Vec::new(),
            data_dir,
            observer: None,
            acme: None,
            describe: None,
            events: None,
            max_redeliveries: 5,
            backups: None,
            artifacts: None,
            build_root: None,
            target_network_rules: None,
        }
    }
}

pub struct Engine {
    ctx: Context,
    recorder: Recorder,
    queue: Arc<dyn Queue>,
    config: EngineConfig,
    name: String,
}

/// What interrupted a running task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interrupt {
    None,
    Cancel,
    LeaseLost,
}

enum Ending {
    Failed(String),
    Cancelled,
}

impl Engine {
    pub async fn new(
        store: Arc<dyn Store>,
        queue: Arc<dyn Queue>,
        config: EngineConfig,
    ) -> std::io::Result<Arc<Engine>> {
        let ssh_key = SshKeyPair::ensure(&config.data_dir.join("ssh")).await?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let name = format!("{}-{}-{:04x}", host.trim(), std::process::id(), rand_u16());
        let recorder = Recorder::start(store.clone(), config.queues.clone());
        let build_root = config
            .build_root
            .clone()
            .unwrap_or_else(|| config.data_dir.join("builds"));
        let builds = crate::sandbox::Builds::prepare(build_root, &config.data_dir).await;
        Ok(Arc::new(Engine {
            ctx: Context {
                store,
                data_dir: config.data_dir.clone(),
                ssh_key,
                acme: config.acme.clone(),
                backups: match &config.backups {
                    Some(store) => store.clone(),
                    None => hefring_objects::open_store(
                        &config.data_dir.join("backups").to_string_lossy(),
                        None,
                    )
                    .map_err(std::io::Error::other)?,
                },
                queue: queue.clone(),
                artifacts: config.artifacts.clone(),
                builds,
                target_network_rules: config.target_network_rules.clone(),
            },
            recorder,
            queue,
            config,
            name,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the workers; they stop when `shutdown` becomes true.
    pub fn start(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        (0..self.config.workers.max(1))
            .map(|i| {
                let engine = self.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { engine.worker_loop(i, shutdown).await })
            })
            .collect()
    }

    async fn worker_loop(self: Arc<Self>, index: usize, mut shutdown: watch::Receiver<bool>) {
        let owner = format!("{}-{index}", self.name);
        // With a broker, a worker claims what it is handed and sweeps the store only when
        // the queue has been idle for a poll interval (claiming by id is a primary-key
        // lookup; finding the oldest claimable operation among thousands is not).
        let sweep_when_idle = self.queue.names_operations();
        let mut idle = !sweep_when_idle;
        loop {
            // Run whatever is claimable, then wait for a wake-up or the poll interval.
            // Lost hints and operations queued behind a busy subject are found here.
            let mut sweep = idle || !sweep_when_idle;
            while sweep {
                if *shutdown.borrow() {
                    return;
                }
                match self.claim_and_run(&owner, None).await {
                    Ok(true) => continue,
                    Ok(false) => sweep = false,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming work failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                }
            }
            let delivery = tokio::select! {
                d = self.queue.next(self.config.poll) => d,
                _ = shutdown.changed() => return,
            };
            idle = matches!(delivery, Ok(Delivery::Anything));
            match delivery {
                Ok(delivery) => {
                    if let Delivery::Operation {
                        id, announcement, ..
                    } = &delivery
                    {
                        match self
                            .handle_delivery(&owner, id, announcement.as_ref(), &shutdown)
                            .await
                        {
                            Ok(None) => {}
                            Ok(Some(poison)) => {
                                if let Err(e) = self.queue.dead_letter(&delivery, &poison).await {
                                    tracing::warn!(operation = %id, error = %e, "dead-lettering failed");
                                }
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!(operation = %id, error = %e, "handling a delivered operation failed");
                                // Not acked: the broker delivers it again (to this or another
                                // worker) once this channel is gone or the message is rejected.
                                continue;
                            }
                        }
                    }
                    if let Err(e) = self.queue.ack(&delivery).await {
                        tracing::warn!(error = %e, "acknowledging a delivery failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the queue failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// A message named an operation: create it if a foreign client (Python Celery) sent it,
    /// run it (or wait while its subject is busy or another worker runs it) until it ends, and
    /// send its outcome to a client waiting for it. Answers once the outcome is committed, so
    /// the message can be acked, or why it is poison (then it goes to the dead-letter queue):
    /// a redelivered message is counted, and past `max_redeliveries` the operation fails
    /// instead of running again (see [`POISON`]).
    async fn handle_delivery(
        &self,
        owner: &str,
        id: &str,
        announcement: Option<&hefring_queue::Announcement>,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Option<String>, StoreError> {
        let store = &self.ctx.store;
        // A waiting client knows the message's id, even when it names an identical active
        // operation (then followed under that operation's id).
        let message_id = id.to_string();
        let mut id = id.to_string();
        if let (Some(events), Some(a)) = (&self.config.events, announcement) {
            events.received(&id, &a.kind, &a.kwargs).await;
        }
        // The common case first: an operation stored and ready, claimed by its id.
        let redelivered = announcement.is_some_and(|a| a.redelivered);
        if redelivered {
            store.count_redelivery(&id).await?;
        }
        let waiting_client = announcement.and_then(|a| a.reply_to.as_ref()).is_some();
        if self.claim_and_run(owner, Some(&id)).await? && !waiting_client && !redelivered {
            // It ran to its end here (or its lease went to another worker, which owns it
            // now): either way this message is done with.
            return Ok(None);
        }
        if store.get_operation(&id).await?.is_none() {
            let Some(announcement) = announcement else {
                return Ok(None);
            };
            match self.create_announced(&id, announcement).await? {
                Ok(existing) => id = existing,
                Err(refusal) => {
                    tracing::warn!(operation = %id, error = %refusal, "refusing a message");
                    if let Some(reply_to) = &announcement.reply_to {
                        let outcome = hefring_queue::Outcome {
                            operation_id: id.clone(),
                            succeeded: false,
                            operation: Value::Null,
                            error: Some(refusal),
                        };
                        if let Err(e) = self.queue.reply(reply_to, &outcome).await {
                            tracing::warn!(operation = %id, error = %e, "replying failed");
                        }
                    }
                    return Ok(None);
                }
            }
        }
        let finished = loop {
            if *shutdown.borrow() {
                // Not finished here: the message stays unacked and comes back.
                return Err(StoreError::LeaseLost(id));
            }
            if !self.claim_and_run(owner, Some(&id)).await? {
                match store.get_operation(&id).await? {
                    Some(op) if op.status.is_terminal() => break op,
                    Some(_) => tokio::time::sleep(self.config.poll).await,
                    None => return Ok(None),
                }
            }
        };
        if let Some(reply_to) = announcement.and_then(|a| a.reply_to.as_ref()) {
            let outcome = hefring_queue::Outcome {
                operation_id: message_id,
                succeeded: finished.status == OperationStatus::Succeeded,
                operation: match &self.config.describe {
                    Some(describe) => describe(&finished),
                    None => {
                        json!({ "id": finished.id, "kind": finished.kind, "status": finished.status, "result": finished.result, "error": finished.error })
                    }
                },
                error: finished.error.clone(),
            };
            if let Err(e) = self.queue.reply(reply_to, &outcome).await {
                tracing::warn!(operation = %finished.id, error = %e, "replying failed");
            }
        }
        Ok(finished
            .error
            .filter(|e| finished.status == OperationStatus::Failed && e.starts_with(POISON)))
    }

    /// Stores the operation a foreign message asks for, with the message's id, through the
    /// same application-layer function as the API request of its kind (`hefring_app`), so a
    /// message is held to every rule a request is. Answers the id to follow (an identical
    /// active operation's, if there is one), or why the message is refused, naming the field;
    /// a refused message stores nothing.
    async fn create_announced(
        &self,
        id: &str,
        announcement: &hefring_queue::Announcement,
    ) -> Result<Result<String, String>, StoreError> {
        use hefring_app::AppError;
        let app = hefring_app::App::new(self.ctx.store.clone(), self.ctx.data_dir.clone());
        let origin = hefring_app::Origin::message(id, &announcement.queue);
        let subject = hefring_core::operation::OperationKind::parse(&announcement.kind)
            .map(|kind| kind.subject_type().as_str())
            .unwrap_or("task");
        match app
            .from_message(&announcement.kind, &announcement.kwargs, &origin)
            .await
        {
            Ok(submitted) => Ok(Ok(submitted.operation.id)),
            Err(AppError::Duplicate {
                existing,
                identical: true,
            }) => Ok(Ok(existing)),
            Err(AppError::Store(e)) => Err(e),
            Err(refusal) => Ok(Err(refusal.describe(subject))),
        }
    }

    /// Claims one operation and runs it to its end (or until its lease is lost).
    async fn claim_and_run(&self, owner: &str, only: Option<&str>) -> Result<bool, StoreError> {
        let now = now_ms();
        let claim = Claim {
            owner,
            now,
            lease_until: now + self.config.lease.as_millis() as i64,
            queues: &self.config.queues,
            only,
        };
        let claimed = match only {
            // Named by a broker: claimed together with what other runs record meanwhile.
            Some(id) => {
                self.recorder
                    .claim(NamedClaim {
                        operation: id.to_string(),
                        owner: owner.to_string(),
                        now,
                        lease_until: claim.lease_until,
                    })
                    .await?
            }
            None => self.ctx.store.claim(&claim).await?,
        };
        let Some(op) = claimed else {
            return Ok(false);
        };
        self.run_operation(op, owner).await;
        Ok(true)
    }

    async fn run_operation(&self, op: OperationRecord, owner: &str) {
        if let Some(events) = &self.config.events {
            events.started(&op.id, op.kind.as_str(), &op.inputs).await;
        }
        let log = OperationLog::new(self.ctx.store.clone(), &op.id, op.attempt);
        let (interrupt_tx, interrupt_rx) = watch::channel(if op.cancel_requested {
            Interrupt::Cancel
        } else {
            Interrupt::None
        });
        let keeper = self.spawn_lease_keeper(&op.id, owner, log.clone(), interrupt_tx);
        let result = self.drive(&op, owner, &log, interrupt_rx).await;
        keeper.abort();
        log.flush().await;
        if let Some(observe) = &self.config.observer {
            observe(Observed::OperationEnded { operation: &op.id });
        }
        if let Some(events) = &self.config.events {
            // How it ended is known here when this run ended it; otherwise (the lease went to
            // another worker, a write failed) the store says whether it has ended.
            let ended = match &result {
                Ok(Some(outcome)) => Some(outcome.clone()),
                _ => match self.ctx.store.get_operation(&op.id).await {
                    Ok(Some(stored)) if stored.status.is_terminal() => Some(OperationOutcome {
                        status: stored.status,
                        result: stored.result,
                        error: stored.error,
                    }),
                    _ => None,
                },
            };
            if let Some(ended) = ended {
                let error = match ended.status {
                    OperationStatus::Succeeded => None,
                    _ => Some(ended.error.unwrap_or_else(|| ended.status.to_string())),
                };
                events
                    .finished(&op.id, &ended.result, error.as_deref())
                    .await;
            }
        }
        match result {
            Ok(_) => {}
            Err(StoreError::LeaseLost(_)) => {
                tracing::info!(operation = %op.id, "lease lost; another worker owns the operation now");
            }
            Err(e) => {
                tracing::warn!(operation = %op.id, error = %e, "recording the operation failed")
            }
        }
    }

    /// Records a task's start (batched with the other runs' bookkeeping).
    async fn start_task(
        &self,
        id: &str,
        owner: &str,
        position: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        self.recorder
            .start_task(TaskStart {
                operation: id.to_string(),
                owner: owner.to_string(),
                position,
                now,
            })
            .await
    }

    /// Records a task's end, and the operation's when `finish` is given: batched with the
    /// other runs' bookkeeping unless it carries state to merge.
    async fn finish_task(
        &self,
        id: &str,
        owner: &str,
        position: i64,
        outcome: &TaskOutcome,
        finish: Option<&OperationOutcome>,
        now: i64,
    ) -> Result<(), StoreError> {
        if outcome.state_patch.is_some() {
            return self
                .ctx
                .store
                .finish_task(id, owner, position, outcome, finish, now)
                .await;
        }
        self.recorder
            .finish_task(TaskFinish {
                operation: id.to_string(),
                owner: owner.to_string(),
                position,
                status: outcome.status,
                finish: finish.cloned(),
                now,
            })
            .await
    }

    /// Renews the lease every second (telling the runner about cancel requests and lost
    /// leases) and flushes the log every 100 ms.
    fn spawn_lease_keeper(
        &self,
        id: &str,
        owner: &str,
        log: OperationLog,
        interrupt: watch::Sender<Interrupt>,
    ) -> JoinHandle<()> {
        let store = self.ctx.store.clone();
        let (id, owner) = (id.to_string(), owner.to_string());
        let lease = self.config.lease;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.tick().await;
            let mut n = 0u32;
            loop {
                tick.tick().await;
                log.flush().await;
                n += 1;
                if !n.is_multiple_of(10) {
                    continue;
                }
                let until = now_ms() + lease.as_millis() as i64;
                match store.renew_lease(&id, &owner, until).await {
                    Ok(LeaseState::Held {
                        cancel_requested: true,
                    }) => {
                        interrupt.send_if_modified(|i| {
                            let changed = *i == Interrupt::None;
                            if changed {
                                *i = Interrupt::Cancel;
                            }
                            changed
                        });
                    }
                    Ok(LeaseState::Held { .. }) => {}
                    Ok(LeaseState::Lost) => {
                        let _ = interrupt.send(Interrupt::LeaseLost);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(operation = %id, error = %e, "renewing a lease failed")
                    }
                }
            }
        })
    }

    async fn drive(
        &self,
        op: &OperationRecord,
        owner: &str,
        log: &OperationLog,
        mut interrupt: watch::Receiver<Interrupt>,
    ) -> Result<Option<OperationOutcome>, StoreError> {
        let store = &self.ctx.store;
        let mut state = op.state.clone();

        // A crash during a rollback: finish the rollback, then end as the attempt had to.
        if op.tasks.iter().any(|t| t.rollback) {
            let ending = match state["_ending"]["status"].as_str() {
                Some("cancelled") => Ending::Cancelled,
                _ => Ending::Failed(
                    state["_ending"]["error"]
                        .as_str()
                        .unwrap_or("failed")
                        .to_string(),
                ),
            };
            return self.roll_back_and_end(op, owner, log, &state, ending).await;
        }

        let planned: Vec<_> = op.tasks.iter().filter(|t| !t.rollback).collect();
        let statuses: Vec<TaskStatus> = planned.iter().map(|t| t.status).collect();
        let Some(first) = next_task(&statuses) else {
            // Every task is done (a crash between the last task and the end): just end.
            let outcome = OperationOutcome {
                status: OperationStatus::Succeeded,
                result: state.get("result").cloned().unwrap_or(json!({})),
                error: None,
            };
            store
                .finish_operation(&op.id, owner, &outcome, now_ms())
                .await?;
            return Ok(Some(outcome));
        };

        if op.deliveries > self.config.max_redeliveries {
            // Workers kept going away while running it: do not let it take another one down.
            let reason = format!(
                "{POISON}: its message was redelivered {} times (workers kept going away while running it), so it is not run again; the message goes to the dead-letter queue {}",
                op.deliveries,
                hefring_queue::amqp::DEAD_LETTER_QUEUE
            );
            if let Some(task) = planned.get(first) {
                log.set_task(&task.name);
                log.info(format!("failed: {reason}"));
                log.flush().await;
                let failed = TaskOutcome {
                    status: TaskStatus::Failed,
                    state_patch: None,
                };
                self.finish_task(&op.id, owner, task.position, &failed, None, now_ms())
                    .await?;
            }
            return self
                .roll_back_and_end(op, owner, log, &state, Ending::Failed(reason))
                .await;
        }
        for (index, task) in planned.iter().enumerate().skip(first) {
            if *interrupt.borrow() == Interrupt::Cancel {
                return self
                    .roll_back_and_end(op, owner, log, &state, Ending::Cancelled)
                    .await;
            }
            log.set_task(&task.name);
            self.start_task(&op.id, owner, task.position, now_ms())
                .await?;
            if let Some(observe) = &self.config.observer {
                observe(Observed::TaskStarted {
                    operation: &op.id,
                    task: &task.name,
                });
            }
            crash_if_asked(&task.name);
            if task.attempts > 0 {
                log.info(format!(
                    "resuming: attempt {} of this task",
                    task.attempts + 1
                ));
            }

            let context = TaskContext {
                ctx: &self.ctx,
                op,
                task: &task.name,
                state: &state,
                log,
            };
            let timeout = self.config.task_timeout;
            let outcome = tokio::select! {
                result = tokio::time::timeout(timeout, tasks::run(&context, &task.name)) => Some(match result {
                    Ok(result) => result,
                    Err(_) => Err(TaskError(format!("timed out after {} s", timeout.as_secs()))),
                }),
                _ = interrupt.wait_for(|i| *i != Interrupt::None) => None,
            };
            let now = now_ms();
            match outcome {
                Some(Ok(output)) => {
                    if let Some(patch) = &output.state_patch {
                        merge(&mut state, patch);
                    }
                    let rest = &planned[index + 1..];
                    let last = rest.is_empty() || output.skip_remaining;
                    let success = OperationOutcome {
                        status: OperationStatus::Succeeded,
                        result: state.get("result").cloned().unwrap_or(json!({})),
                        error: None,
                    };
                    log.flush().await;
                    let task_outcome = TaskOutcome {
                        status: output.status(),
                        state_patch: output.state_patch,
                    };
                    if output.skip_remaining && !rest.is_empty() {
                        self.finish_task(&op.id, owner, task.position, &task_outcome, None, now)
                            .await?;
                        let skipped = TaskOutcome {
                            status: TaskStatus::Skipped,
                            state_patch: None,
                        };
                        for (i, later) in rest.iter().enumerate() {
                            let finish = (i + 1 == rest.len()).then_some(&success);
                            self.finish_task(&op.id, owner, later.position, &skipped, finish, now)
                                .await?;
                        }
                        return Ok(Some(success));
                    }
                    self.finish_task(
                        &op.id,
                        owner,
                        task.position,
                        &task_outcome,
                        last.then_some(&success),
                        now,
                    )
                    .await?;
                    if last {
                        return Ok(Some(success));
                    }
                }
                Some(Err(error)) => {
                    log.info(format!("failed: {error}"));
                    log.flush().await;
                    let failed = TaskOutcome {
                        status: TaskStatus::Failed,
                        state_patch: None,
                    };
                    self.finish_task(&op.id, owner, task.position, &failed, None, now)
                        .await?;
                    return self
                        .roll_back_and_end(op, owner, log, &state, Ending::Failed(error.0))
                        .await;
                }
                None => {
                    if *interrupt.borrow() == Interrupt::LeaseLost {
                        return Err(StoreError::LeaseLost(op.id.clone()));
                    }
                    log.info("cancelled: the running command was stopped");
                    log.flush().await;
                    let cancelled = TaskOutcome {
                        status: TaskStatus::Cancelled,
                        state_patch: None,
                    };
                    self.finish_task(&op.id, owner, task.position, &cancelled, None, now)
                        .await?;
                    return self
                        .roll_back_and_end(op, owner, log, &state, Ending::Cancelled)
                        .await;
                }
            }
        }
        Ok(None)
    }

    /// Runs the kind's rollback tasks (appended as visible tasks), then ends the operation
    /// failed or cancelled.
    async fn roll_back_and_end(
        &self,
        op: &OperationRecord,
        owner: &str,
        log: &OperationLog,
        state: &Value,
        ending: Ending,
    ) -> Result<Option<OperationOutcome>, StoreError> {
        let store = &self.ctx.store;
        let (status, error) = match &ending {
            Ending::Failed(e) => (OperationStatus::Failed, Some(e.clone())),
            Ending::Cancelled => (OperationStatus::Cancelled, None),
        };
        let rollback = op.kind.rollback_tasks();
        let mut state = state.clone();
        let mut op = op.clone();
        if !rollback.is_empty() && !op.tasks.iter().any(|t| t.rollback) {
            // Remember how this attempt ends, in case the process dies during the rollback.
            let ending_patch = json!({ "_ending": { "status": status.as_str(), "error": error } });
            merge(&mut state, &ending_patch);
            store
                .begin_rollback(&op.id, owner, rollback, &ending_patch)
                .await?;
            op = store
                .get_operation(&op.id)
                .await?
                .ok_or(StoreError::NotFound)?;
        }
        for task in op
            .tasks
            .iter()
            .filter(|t| t.rollback && !t.status.is_done())
        {
            log.set_task(&task.name);
            self.start_task(&op.id, owner, task.position, now_ms())
                .await?;
            let context = TaskContext {
                ctx: &self.ctx,
                op: &op,
                task: &task.name,
                state: &state,
                log,
            };
            let result =
                tokio::time::timeout(self.config.task_timeout, tasks::run(&context, &task.name))
                    .await;
            let status = match result {
                Ok(Ok(_)) => TaskStatus::Succeeded,
                Ok(Err(e)) => {
                    log.info(format!("rollback step failed: {e}"));
                    TaskStatus::Failed
                }
                Err(_) => {
                    log.info("rollback step timed out");
                    TaskStatus::Failed
                }
            };
            log.flush().await;
            self.finish_task(
                &op.id,
                owner,
                task.position,
                &TaskOutcome {
                    status,
                    state_patch: None,
                },
                None,
                now_ms(),
            )
            .await?;
        }
        let context = TaskContext {
            ctx: &self.ctx,
            op: &op,
            task: "-",
            state: &state,
            log,
        };
        tasks::after_failure(&context, error.as_deref().unwrap_or("cancelled")).await;
        log.set_task("-");
        match &ending {
            Ending::Failed(e) => log.info(format!("operation failed: {e}")),
            Ending::Cancelled => log.info("operation cancelled"),
        }
        log.flush().await;
        // What it produced before it failed stays visible (a restore's safety backup, a fleet
        // update's per-environment results).
        let outcome = OperationOutcome {
            status,
            result: state.get("result").cloned().unwrap_or(json!({})),
            error,
        };
        store
            .finish_operation(&op.id, owner, &outcome, now_ms())
            .await?;
        Ok(Some(outcome))
    }
}

/// RFC 7396 merge patch, exactly what the store applies to the stored state (SQLite's
/// `json_patch`), so the state in memory and the state a resumed run reads agree.
fn merge(state: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *state = patch.clone();
        return;
    };
    if !state.is_object() {
        *state = Value::Object(Default::default());
    }
    let target = state.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms() as u64);
    h.finish() as u16
}

/// Test builds can crash the process at a named task (`HEFRING_FAULT_CRASH_AT=task`), after
/// the task is recorded as started: exactly what a power cut or `kill -9` would leave.
#[cfg(feature = "fault-injection")]
fn crash_if_asked(task: &str) {
    if std::env::var("HEFRING_FAULT_CRASH_AT").is_ok_and(|t| t == task) {
        eprintln!("fault injection: crashing at task {task}");
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-injection"))]
fn crash_if_asked(_task: &str) {}

#[cfg(test)]
mod tests {
    use super::merge;
    use serde_json::json;

    #[test]
    fn merge_is_rfc_7396() {
        let mut state = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": 4});
        merge(
            &mut state,
            &json!({"a": 5, "b": {"c": null, "x": 6}, "e": null, "f": [1]}),
        );
        assert_eq!(state, json!({"a": 5, "b": {"d": 3, "x": 6}, "f": [1]}));
    }
}
