//! The distributed path, like for like with a Celery worker: operation and task rows in
//! PostgreSQL, announcements as Celery protocol 2 messages on RabbitMQ (persistent, publisher
//! confirms), a worker consuming with a bounded prefetch, claiming by lease, starting and
//! finishing the task, ending the operation, flushing its log, and acking only after that
//! is committed. Each operation is a `system_noop` with one no-op task, on its own subject.
//!
//!     cargo bench -p hefring-engine --bench distributed_queue [-- OPERATIONS CONCURRENCY [events]]
//!
//! Needs PostgreSQL on 127.0.0.1:5432 (trust, as on these machines) and RabbitMQ on
//! 127.0.0.1:5672 (guest/guest); makes a database and a vhost of its own and removes them.
//! Prints: what the broker alone drains (the same number of messages delivered and acked,
//! no store: the ceiling the store and the worker share the rest of the machine under), drain
//! throughput (operations queued and announced beforehand, drained from the worker's start)
//! and dispatch latency (announce to task start) p50/p99/max with an idle worker. Compare
//! with `benches/celery_drain.sh` in the same run.

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hefring_core::operation::OperationKind;
use hefring_core::{new_id, IdKind};
use hefring_engine::{time::now_ms, Engine, EngineConfig, Observed};
use hefring_queue::amqp::{AmqpOptions, AmqpQueue};
use hefring_queue::{Job, Queue};
use hefring_store::{NewOperation, PostgresStore, Store};
use tokio::sync::{watch, Notify};

fn noop() -> NewOperation {
    let now = now_ms();
    let subject = new_id(IdKind::Subject, now);
    NewOperation::planned(
        OperationKind::SystemNoop,
        &subject,
        serde_json::json!({}),
        "bench",
        now,
    )
}

fn job(op: &hefring_store::OperationRecord) -> Job {
    Job {
        operation_id: op.id.clone(),
        kind: op.kind.as_str().into(),
        queue: op.queue.clone(),
        kwargs: serde_json::json!({ "system": op.subject_id }),
    }
}

struct Probe {
    started: Mutex<HashMap<String, Instant>>,
    ended: Mutex<usize>,
    changed: Notify,
}

/// CPU seconds this process has used (user and system), from /proc/self/stat.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line: 11 and 12 counted from 0 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds the whole machine has been busy (every core, everything but idle and iowait),
/// from /proc/stat: with [`own_cpu_seconds`], what PostgreSQL and RabbitMQ took.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let ticks: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = ticks
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy / 100.0
}

/// The CPU a measured stretch took: this process's own, and the rest of the machine's.
struct CpuMeter {
    own: f64,
    machine: f64,
}

impl CpuMeter {
    fn start() -> Self {
        CpuMeter {
            own: own_cpu_seconds(),
            machine: machine_busy_seconds(),
        }
    }

    /// Microseconds of CPU for each of `count` items: this process's, and everything else's.
    fn per_item_us(&self, count: usize) -> (f64, f64) {
        let own = own_cpu_seconds() - self.own;
        let others = machine_busy_seconds() - self.machine - own;
        (own * 1e6 / count as f64, others * 1e6 / count as f64)
    }
}

/// Runs `work(n)` for every n below `count`, 16 at a time.
async fn sixteen_at_a_time<F, Fut>(count: usize, work: F)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let work = work.clone();
            tokio::spawn(async move {
                for n in (i..count).step_by(16) {
                    work(n).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn wait_ended(probe: &Probe, count: usize) {
    loop {
        let notified = probe.changed.notified();
        if *probe.ended.lock().unwrap() >= count {
            return;
        }
        notified.await;
    }
}

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Resources {
    database: String,
    vhost: String,
}

impl Drop for Resources {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.vhost])
            .output();
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.database
            ))
            .output();
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let operations = args.first().copied().unwrap_or(20_000);
    // The best setting measured here on 2 cores (`hefring worker --concurrency 128`): enough
    // operations at once for the worker's group commit to gather large batches.
    let concurrency = args.get(1).copied().unwrap_or(128);
    let with_events = std::env::args().any(|a| a == "events");
    let suffix = std::process::id();
    let resources = Resources {
        database: format!("hefring_bench_{suffix}"),
        vhost: format!("hefring-bench-{suffix}"),
    };
    sh(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            &format!("CREATE DATABASE {}", resources.database),
        ],
    );
    sh("rabbitmqctl", &["-q", "add_vhost", &resources.vhost]);
    sh(
        "rabbitmqctl",
        &[
            "-q",
            "set_permissions",
            "-p",
            &resources.vhost,
            "guest",
            ".*",
            ".*",
            ".*",
        ],
    );
    let database = format!("postgres://postgres@127.0.0.1:5432/{}", resources.database);
    let broker = format!("amqp://guest:guest@127.0.0.1:5672/{}", resources.vhost);
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(&database).await.unwrap());
    let publisher = AmqpQueue::connect(&broker, AmqpOptions::default())
        .await
        .unwrap();

    // Queue and announce everything first (as the API does), with no worker running: 16
    // requests at a time (not measured; only quicker to set up than one at a time).
    let queued = Instant::now();
    let publisher = Arc::new(publisher);
    let (into, announcer) = (store.clone(), publisher.clone());
    sixteen_at_a_time(operations, move |_| {
        let (store, publisher) = (into.clone(), announcer.clone());
        async move {
            let op = store.create_operation(&noop(), now_ms()).await.unwrap();
            publisher.publish(&job(&op)).await.unwrap();
        }
    })
    .await;
    println!(
        "queued and announced {operations} operations in {:.2} s (16 at a time)",
        queued.elapsed().as_secs_f64()
    );

    // The broker alone, for reference: the same number of messages on a queue of their own,
    // delivered to a consumer with the same prefetch and acked one by one, no store at all.
    // What is left of the machine for the store and the worker is what this does not take.
    let broker_queue = "bench.broker-only";
    let announcer = publisher.clone();
    sixteen_at_a_time(operations, move |n| {
        let publisher = announcer.clone();
        async move {
            let job = Job {
                operation_id: format!("op_broker_only_{n}"),
                kind: "system_noop".into(),
                queue: broker_queue.into(),
                kwargs: serde_json::json!({}),
            };
            publisher.publish(&job).await.unwrap();
        }
    })
    .await;
    let begun = Instant::now();
    let cpu = CpuMeter::start();
    let consumer = Arc::new(
        AmqpQueue::connect(
            &broker,
            AmqpOptions {
                prefetch: concurrency as u16,
                ..AmqpOptions::consuming([broker_queue])
            },
        )
        .await
        .unwrap(),
    );
    let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let last_ack = Arc::new(Mutex::new(begun));
    let drainers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (consumer, acked, last_ack) = (consumer.clone(), acked.clone(), last_ack.clone());
            tokio::spawn(async move {
                while acked.load(std::sync::atomic::Ordering::SeqCst) < operations {
                    let delivery = consumer.next(Duration::from_millis(100)).await.unwrap();
                    if matches!(delivery, hefring_queue::Delivery::Operation { .. }) {
                        consumer.ack(&delivery).await.unwrap();
                        acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        *last_ack.lock().unwrap() = Instant::now();
                    }
                }
            })
        })
        .collect();
    for drainer in drainers {
        drainer.await.unwrap();
    }
    let elapsed = *last_ack.lock().unwrap() - begun;
    let (own, others) = cpu.per_item_us(operations);
    println!(
        "broker only (reference: deliver and ack, no store): {operations} messages, prefetch {concurrency}: {:.2} s, {:.0} messages/s; CPU a message: the consumer {own:.0} us, the rest of the machine (RabbitMQ, the kernel) {others:.0} us",
        elapsed.as_secs_f64(),
        operations as f64 / elapsed.as_secs_f64(),
    );
    drop(consumer);

    let probe = Arc::new(Probe {
        started: Mutex::default(),
        ended: Mutex::new(0),
        changed: Notify::new(),
    });
    let dir = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::new(dir.path().to_path_buf());
    config.workers = concurrency;
    config.queues = vec!["hefring".into()];
    let observer_probe = probe.clone();
    config.observer = Some(Arc::new(move |event| match event {
        Observed::TaskStarted { operation, .. } => {
            observer_probe
                .started
                .lock()
                .unwrap()
                .insert(operation.to_string(), Instant::now());
        }
        Observed::OperationEnded { .. } => {
            *observer_probe.ended.lock().unwrap() += 1;
            observer_probe.changed.notify_waiters();
        }
    }));
    // `events`: as `hefring worker` runs, announcing itself to Celery's tools and sending
    // task events (received, started, succeeded) for every operation; without it, as a Celery
    // worker without `-E`.
    let _presence = if with_events {
        let (presence, tasks) = hefring_queue::control::Presence::start(
            &broker,
            format!("hefring.bench-{suffix}@localhost"),
            vec!["hefring".into()],
            vec!["hefring.system_noop".into()],
            concurrency,
        )
        .await
        .unwrap();
        config.events = Some(presence.clone() as Arc<dyn hefring_queue::WorkerEvents>);
        Some((presence, tasks))
    } else {
        None
    };
    let begun = Instant::now();
    let cpu = CpuMeter::start();
    let consumer = AmqpQueue::connect(
        &broker,
        AmqpOptions {
            prefetch: concurrency as u16,
            ..AmqpOptions::consuming(["hefring"])
        },
    )
    .await
    .unwrap();
    let engine = Engine::new(store.clone(), Arc::new(consumer) as Arc<dyn Queue>, config)
        .await
        .unwrap();
    let (_stop, stopped) = watch::channel(false);
    let _workers = engine.start(stopped);
    wait_ended(&probe, operations).await;
    let elapsed = begun.elapsed();
    let (own, others) = cpu.per_item_us(operations);
    println!(
        "drain: {operations} operations, concurrency {concurrency}{}: {:.2} s, {:.0} operations/s; CPU an operation: the worker {own:.0} us, the rest of the machine (PostgreSQL, RabbitMQ, the kernel) {others:.0} us",
        if with_events { ", with task events" } else { "" },
        elapsed.as_secs_f64(),
        operations as f64 / elapsed.as_secs_f64(),
    );

    // Dispatch latency with an idle worker: announce to task start, one at a time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::new();
    for i in 0..500 {
        let op = store.create_operation(&noop(), now_ms()).await.unwrap();
        let at = Instant::now();
        publisher.publish(&job(&op)).await.unwrap();
        wait_ended(&probe, operations + i + 1).await;
        latencies.push(probe.started.lock().unwrap()[&op.id] - at);
    }
    latencies.sort();
    println!(
        "dispatch latency (publish -> task started), idle worker: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3
    );
    drop(resources);
}
