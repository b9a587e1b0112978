//! A Hefring worker as the Celery tools see one: it publishes Celery **events** on the
//! `celeryev` topic exchange (`worker-online`, `worker-heartbeat` every 2 s, `worker-offline`,
//! `task-received/started/succeeded/failed`) and answers the **remote-control** commands of
//! `celery inspect` and Flower on its `celery.pidbox` mailbox (`ping`, `stats`,
//! `active_queues`, `registered`, `scheduled`, `active`, `reserved`, `revoked`, `conf`,
//! `enable_events`), so Flower's `/api/workers` lists Hefring workers and its `/api/tasks`
//! lists Hefring operations.
//!
//! Names and shapes follow Celery 5 (`celery/events/dispatcher.py`, `celery/worker/control.py`,
//! kombu's `pidbox.py`): events are JSON bodies routed by their type with `-` turned into `.`;
//! a command is `{"method", "arguments", "destination", "ticket", "reply_to": {"exchange",
//! "routing_key"}}` broadcast on the fanout exchange `celery.pidbox`; the reply is
//! `{HOSTNAME: result}` published to `reply_to` with the `ticket` header.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// The event exchange Celery's tools listen on.
pub const EVENT_EXCHANGE: &str = "celeryev";
/// The broadcast exchange of remote-control commands.
pub const CONTROL_EXCHANGE: &str = "celery.pidbox";
/// How often a worker says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// What this worker is doing, for `active`, `stats` and heartbeats.
#[derive(Default)]
struct Activity {
    /// Operations running now: id, task name, kwargs, start time.
    active: BTreeMap<String, (String, Value, f64)>,
    processed: u64,
    by_name: BTreeMap<String, u64>,
}

/// Publishes events and answers remote control for one worker, on its own connection.
pub struct Presence {
    hostname: String,
    queues: Vec<String>,
    task_names: Vec<String>,
    concurrency: usize,
    broker_display: String,
    url: String,
    /// The channel of the current connection; `None` while the broker is away (events are
    /// dropped then, as a Celery worker's are).
    channel: tokio::sync::RwLock<Option<Channel>>,
    clock: AtomicU64,
    activity: Mutex<Activity>,
    started: f64,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The broker URL without its password, for `conf` and `stats`.
fn masked(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            let user = credentials.split(':').next().unwrap_or("");
            format!("{}{user}:**@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn load_average() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl Presence {
    /// Connects, declares the exchanges and this worker's mailbox, and starts the heartbeat
    /// and the mailbox consumer. `hostname` is the Celery node name (`hefring@HOST`).
    pub async fn start(
        url: &str,
        hostname: String,
        queues: Vec<String>,
        task_names: Vec<String>,
        concurrency: usize,
    ) -> Result<(Arc<Presence>, Vec<JoinHandle<()>>), lapin::Error> {
        let presence = Arc::new(Presence {
            hostname,
            queues,
            task_names,
            concurrency,
            broker_display: masked(url),
            url: url.to_string(),
            channel: tokio::sync::RwLock::new(None),
            clock: AtomicU64::new(1),
            activity: Mutex::default(),
            started: now(),
        });
        // The first connection must work: a worker that cannot reach its broker says so.
        let link = presence.connect().await?;
        presence.worker_event("worker-online").await;
        let heartbeat = {
            let presence = presence.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(HEARTBEAT);
                loop {
                    tick.tick().await;
                    presence.worker_event("worker-heartbeat").await;
                }
            })
        };
        // Answers the mailbox; when the broker goes away, connects again (every second) and
        // says it is online, so Flower and `celery inspect` see it after a broker restart.
        let mailbox_task = {
            let presence = presence.clone();
            tokio::spawn(async move {
                let mut link = Some(link);
                loop {
                    if let Some((connection, mut consumer)) = link.take() {
                        while let Some(Ok(delivery)) = consumer.next().await {
                            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                            if let Ok(command) = serde_json::from_slice::<Value>(&delivery.data) {
                                presence.answer(&command).await;
                            }
                        }
                        *presence.channel.write().await = None;
                        drop(connection);
                        tracing::warn!("events and remote control lost the broker: reconnecting");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if let Ok(new) = presence.connect().await {
                        link = Some(new);
                        presence.worker_event("worker-online").await;
                    }
                }
            })
        };
        Ok((presence, vec![heartbeat, mailbox_task]))
    }

    /// Connects, declares the exchanges and this worker's mailbox, and consumes it.
    async fn connect(&self) -> Result<(Connection, lapin::Consumer), lapin::Error> {
        let connection = Connection::connect(
            &self.url,
            ConnectionProperties::default()
                .with_executor(tokio_executor_trait::Tokio::current())
                .with_reactor(tokio_reactor_trait::Tokio),
        )
        .await?;
        let channel = connection.create_channel().await?;
        // Declared as Celery declares them, so the two can share a broker.
        channel
            .exchange_declare(
                EVENT_EXCHANGE,
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                CONTROL_EXCHANGE,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mailbox = format!("{}.celery.pidbox", self.hostname);
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(10_000));
        arguments.insert("x-message-ttl".into(), AMQPValue::LongInt(300_000));
        channel
            .queue_declare(
                &mailbox,
                QueueDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                arguments,
            )
            .await?;
        channel
            .queue_bind(
                &mailbox,
                CONTROL_EXCHANGE,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                &mailbox,
                &format!("{}-pidbox", self.hostname),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        *self.channel.write().await = Some(channel);
        Ok((connection, consumer))
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    async fn publish(&self, exchange: &str, routing_key: &str, body: &Value, headers: FieldTable) {
        let properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_content_encoding(ShortString::from("utf-8"))
            .with_delivery_mode(1)
            .with_headers(headers);
        let payload = serde_json::to_vec(body).unwrap_or_default();
        let Some(channel) = self.channel.read().await.clone() else {
            return;
        };
        if let Ok(confirm) = channel
            .basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions::default(),
                &payload,
                properties,
            )
            .await
        {
            let _ = confirm.await;
        }
    }

    /// Publishes an event of `kind` with `fields` (Celery adds hostname, timestamp, clock,
    /// utcoffset and pid to every event).
    async fn event(&self, kind: &str, mut fields: serde_json::Map<String, Value>) {
        fields.insert("type".into(), json!(kind));
        fields.insert("hostname".into(), json!(self.hostname));
        fields.insert("timestamp".into(), json!(now()));
        fields.insert("clock".into(), json!(self.tick()));
        fields.insert("utcoffset".into(), json!(0));
        fields.insert("pid".into(), json!(std::process::id()));
        let mut headers = FieldTable::default();
        headers.insert(
            "hostname".into(),
            AMQPValue::LongString(LongString::from(self.hostname.clone())),
        );
        self.publish(
            EVENT_EXCHANGE,
            &kind.replace('-', "."),
            &Value::Object(fields),
            headers,
        )
        .await;
    }

    async fn worker_event(&self, kind: &str) {
        let (active, processed) = {
            let activity = self.activity.lock().unwrap();
            (activity.active.len(), activity.processed)
        };
        let mut fields = serde_json::Map::new();
        fields.insert("freq".into(), json!(HEARTBEAT.as_secs_f64()));
        fields.insert("active".into(), json!(active));
        fields.insert("processed".into(), json!(processed));
        fields.insert("loadavg".into(), json!(load_average()));
        fields.insert("sw_ident".into(), json!("hefring"));
        fields.insert("sw_ver".into(), json!(env!("CARGO_PKG_VERSION")));
        fields.insert("sw_sys".into(), json!(std::env::consts::OS));
        self.event(kind, fields).await;
    }

    /// Says the worker is going away (Flower then shows it offline at once).
    pub async fn offline(&self) {
        self.worker_event("worker-offline").await;
    }

    /// An operation was handed to this worker.
    pub async fn task_received(&self, id: &str, name: &str, kwargs: &Value) {
        let mut fields = serde_json::Map::new();
        fields.insert("uuid".into(), json!(id));
        fields.insert("name".into(), json!(name));
        fields.insert("args".into(), json!("()"));
        fields.insert("kwargs".into(), json!(kwargs.to_string()));
        fields.insert("retries".into(), json!(0));
        fields.insert("eta".into(), Value::Null);
        fields.insert("expires".into(), Value::Null);
        fields.insert("root_id".into(), json!(id));
        fields.insert("parent_id".into(), Value::Null);
        self.event("task-received", fields).await;
    }

    pub async fn task_started(&self, id: &str, name: &str, kwargs: &Value) {
        self.activity
            .lock()
            .unwrap()
            .active
            .insert(id.to_owned(), (name.to_owned(), kwargs.clone(), now()));
        let mut fields = serde_json::Map::new();
        fields.insert("uuid".into(), json!(id));
        self.event("task-started", fields).await;
    }

    /// The operation ended: `error` is `None` when it succeeded.
    pub async fn task_finished(&self, id: &str, result: &Value, error: Option<&str>) {
        let runtime = {
            let mut activity = self.activity.lock().unwrap();
            let started = activity.active.remove(id);
            activity.processed += 1;
            if let Some((name, _, _)) = &started {
                *activity.by_name.entry(name.clone()).or_default() += 1;
            }
            started.map(|(_, _, at)| now() - at).unwrap_or(0.0)
        };
        let mut fields = serde_json::Map::new();
        fields.insert("uuid".into(), json!(id));
        match error {
            None => {
                fields.insert("result".into(), json!(result.to_string()));
                fields.insert("runtime".into(), json!(runtime));
                self.event("task-succeeded", fields).await;
            }
            Some(error) => {
                fields.insert(
                    "exception".into(),
                    json!(format!("HefringOperationFailed('{error}')")),
                );
                fields.insert("traceback".into(), json!(""));
                self.event("task-failed", fields).await;
            }
        }
    }

    fn queue_info(&self) -> Value {
        Value::Array(
            self.queues
                .iter()
                .map(|q| {
                    json!({
                        "name": q,
                        "exchange": {"name": q, "type": "direct", "arguments": null,
                                     "durable": true, "passive": false, "auto_delete": false,
                                     "delivery_mode": null, "no_declare": false},
                        "routing_key": q,
                        "queue_arguments": null, "binding_arguments": null,
                        "consumer_arguments": null, "durable": true, "exclusive": false,
                        "auto_delete": false, "no_ack": false, "alias": null, "bindings": [],
                        "no_declare": null, "expires": null, "message_ttl": null,
                        "max_length": null, "max_length_bytes": null, "max_priority": null
                    })
                })
                .collect(),
        )
    }

    /// What a remote-control method answers (`None`: not a method of ours).
    fn reply_for(&self, method: &str) -> Option<Value> {
        let activity = self.activity.lock().unwrap();
        Some(match method {
            "ping" => json!({"ok": "pong"}),
            "enable_events" => json!({"ok": "task events enabled"}),
            "disable_events" => json!({"ok": "task events disabled"}),
            "registered" => json!(self.task_names),
            "active_queues" => self.queue_info(),
            "scheduled" | "reserved" | "revoked" => json!([]),
            "active" => Value::Array(
                activity
                    .active
                    .iter()
                    .map(|(id, (name, kwargs, started))| {
                        json!({"id": id, "name": name, "args": [], "kwargs": kwargs,
                               "type": name, "hostname": self.hostname, "time_start": started,
                               "acknowledged": false, "worker_pid": std::process::id(),
                               "delivery_info": {"exchange": "", "routing_key": self.queues.first(),
                                                 "priority": 0, "redelivered": false}})
                    })
                    .collect(),
            ),
            "stats" => json!({
                "total": activity.by_name,
                "pid": std::process::id(),
                "clock": self.clock.load(Ordering::Relaxed).to_string(),
                "uptime": (now() - self.started) as u64,
                "pool": {"max-concurrency": self.concurrency, "processes": [std::process::id()],
                         "implementation": "hefring (tokio)", "timeouts": [0, 0],
                         "max-tasks-per-child": "N/A", "put-guarded-by-semaphore": false,
                         "writes": {}},
                "broker": {"hostname": self.broker_display, "transport": "amqp"},
                "prefetch_count": self.concurrency,
                "rusage": {},
            }),
            "conf" => json!({
                "broker_url": self.broker_display,
                "task_acks_late": true,
                "worker_concurrency": self.concurrency,
                "task_queues": self.queues,
            }),
            _ => return None,
        })
    }

    /// Answers a command addressed to everyone or to this worker.
    async fn answer(&self, command: &Value) {
        let addressed = match &command["destination"] {
            Value::Array(names) => names.iter().any(|n| n == self.hostname.as_str()),
            _ => true,
        };
        if !addressed {
            return;
        }
        let method = command["method"].as_str().unwrap_or_default();
        let Some(result) = self.reply_for(method) else {
            return;
        };
        let (Some(exchange), Some(routing_key)) = (
            command["reply_to"]["exchange"].as_str(),
            command["reply_to"]["routing_key"].as_str(),
        ) else {
            return;
        };
        let mut headers = FieldTable::default();
        if let Some(ticket) = command["ticket"].as_str() {
            headers.insert(
                "ticket".into(),
                AMQPValue::LongString(LongString::from(ticket.to_owned())),
            );
        }
        headers.insert("clock".into(), AMQPValue::LongLongInt(self.tick() as i64));
        let body = json!({ self.hostname.clone(): result });
        self.publish(exchange, routing_key, &body, headers).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_passwords_are_masked() {
        assert_eq!(
            masked("amqp://guest:secret@127.0.0.1:5672/vh"),
            "amqp://guest:**@127.0.0.1:5672/vh"
        );
        assert_eq!(masked("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
