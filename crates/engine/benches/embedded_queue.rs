//! The embedded queue, through the normal durable path: operation and task rows in SQLite
//! (WAL), claim by lease, task start and finish, operation end. Each operation is a
//! `system_noop` with one no-op task, on its own subject.
//!
//!     cargo bench -p hefring-engine --bench embedded_queue [-- OPERATIONS WORKERS]
//!
//! Prints: drain throughput (operations queued beforehand, drained from worker start), and
//! enqueue-to-start latency p50/p99/max (one operation at a time while workers idle, plus a
//! paced stream at 1,000/s).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hefring_core::operation::OperationKind;
use hefring_core::{new_id, IdKind};
use hefring_engine::{time::now_ms, Engine, EngineConfig, Observed};
use hefring_queue::{EmbeddedQueue, Job, Queue};
use hefring_store::{NewOperation, SqliteStore, Store};
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

struct Probe {
    started: Mutex<HashMap<String, Instant>>,
    ended: Mutex<usize>,
    changed: Notify,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn enqueue(store: &Arc<dyn Store>, queue: &EmbeddedQueue) -> (String, Instant) {
    let op = noop();
    let at = Instant::now();
    let created = store.create_operation(&op, now_ms()).await.unwrap();
    queue
        .publish(&Job {
            operation_id: created.id.clone(),
            kind: "system_noop".into(),
            queue: created.queue,
            kwargs: serde_json::json!({ "system": created.subject_id }),
        })
        .await
        .unwrap();
    (created.id, at)
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

fn report(name: &str, mut latencies: Vec<Duration>) {
    latencies.sort();
    println!(
        "{name}: n={} p50={:.2} ms p99={:.2} ms max={:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let operations = args.first().copied().unwrap_or(10_000);
    let workers = args.get(1).copied().unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::connect(&dir.path().join("bench.db").to_string_lossy())
            .await
            .unwrap(),
    );
    let queue = EmbeddedQueue::new();
    let probe = Arc::new(Probe {
        started: Mutex::default(),
        ended: Mutex::new(0),
        changed: Notify::new(),
    });

    // Drain: queue everything first, then start the workers and time until all have ended.
    for _ in 0..operations {
        store.create_operation(&noop(), now_ms()).await.unwrap();
    }
    let mut config = EngineConfig::new(dir.path().to_path_buf());
    config.workers = workers;
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
    let engine = Engine::new(
        store.clone(),
        Arc::new(queue.clone()) as Arc<dyn Queue>,
        config,
    )
    .await
    .unwrap();
    let (_stop, stopped) = watch::channel(false);
    let begun = Instant::now();
    let _workers = engine.start(stopped);
    wait_ended(&probe, operations).await;
    let elapsed = begun.elapsed();
    println!(
        "drain: {operations} operations, {workers} workers: {:.2} s, {:.0} operations/s",
        elapsed.as_secs_f64(),
        operations as f64 / elapsed.as_secs_f64()
    );

    // Latency, one at a time with idle workers.
    let mut latencies = Vec::new();
    for i in 0..1000 {
        let (id, at) = enqueue(&store, &queue).await;
        wait_ended(&probe, operations + i + 1).await;
        latencies.push(probe.started.lock().unwrap()[&id] - at);
    }
    report("enqueue-to-start, idle workers", latencies);

    // Latency under a steady stream of 1,000 operations/s.
    let mut sent = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for _ in 0..3000 {
        tick.tick().await;
        sent.push(enqueue(&store, &queue).await);
    }
    wait_ended(&probe, operations + 1000 + 3000).await;
    let started = probe.started.lock().unwrap();
    report(
        "enqueue-to-start, 1,000/s stream",
        sent.iter().map(|(id, at)| started[id] - *at).collect(),
    );
}
