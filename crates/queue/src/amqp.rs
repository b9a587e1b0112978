//! The AMQP queue: hints travel through RabbitMQ as Celery protocol 2 task messages, so a Python
//! Celery client can start an operation (`send_task("hefring.<kind>", kwargs=..., queue=...)`)
//! and Hefring's messages are valid Celery tasks.
//!
//! - **Queues** are declared exactly as Celery declares `Queue(name)`: durable, not exclusive,
//!   not auto-delete, no arguments. RabbitMQ refuses (`PRECONDITION_FAILED`) a redeclaration
//!   whose properties or arguments differ, so anything more (a dead-letter exchange, a queue
//!   type, a max priority) must come from a broker *policy*, never from the declaration.
//! - **Publishing** goes to the default exchange with the queue name as routing key (as Celery
//!   does), persistent, `mandatory`, on a channel in confirm mode: [`Queue::publish`] answers
//!   only once the broker has confirmed; a nack or a returned message is an error. The task id
//!   is the operation id, so a redelivered or republished hint names the same operation.
//! - **Consuming** never auto-acks: a delivery is acknowledged by [`Queue::ack`] only, after
//!   the engine has committed the operation's outcome, so a worker killed mid-task has its
//!   message redelivered. The prefetch (`basic.qos`) bounds what a worker holds. A message that
//!   is not a Celery protocol 2 task is rejected without requeue (and logged).
//! - **Reconnection**: lapin 2 does not reconnect by itself. Publishing opens a new connection
//!   when the old one is gone and retries for at most [`AmqpOptions::reconnect_timeout`];
//!   the consumer runs in its own task on its own connection and opens a new one whenever its
//!   consumers end. Deliveries of a lost channel that were never acked are redelivered by the
//!   broker; acking one of them later is logged and ignored.
//! - A [`Delivery::Operation`]'s `tag` is this queue's own number for the delivery (unique
//!   across reconnections), not the channel's delivery tag, which restarts at 1 on every
//!   channel.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::acker::Acker;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::protocol::AMQPErrorKind;
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::celery::{self, EncodedMessage, Properties, TaskMessage};
use crate::{Announcement, Delivery, Job, Outcome, Queue, QueueError};

/// Celery task names of operations are `hefring.<operation kind>`.
pub const TASK_PREFIX: &str = "hefring.";

/// Where poison messages go: messages redelivered too often (workers kept dying on them).
pub const DEAD_LETTER_QUEUE: &str = "hefring.dead";

/// The queue operations go to unless routed elsewhere (a target's `hefring.target.<id>`).
pub const DEFAULT_QUEUE: &str = "hefring";

/// How long an ack may wait for a channel that is going away.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest pause between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct AmqpOptions {
    /// The queues this process consumes; empty: it only publishes.
    pub queues: Vec<String>,
    /// How many unacknowledged deliveries the broker gives each consumer at most.
    pub prefetch: u16,
    /// The queue declared at connection (and published to by callers that have no other).
    pub default_queue: String,
    /// How long `publish` keeps trying to reconnect before it answers an error.
    pub reconnect_timeout: Duration,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        AmqpOptions {
            queues: Vec::new(),
            prefetch: 8,
            default_queue: DEFAULT_QUEUE.to_owned(),
            reconnect_timeout: Duration::from_secs(30),
        }
    }
}

impl AmqpOptions {
    /// Options for a worker consuming `queues`.
    pub fn consuming<I, S>(queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        AmqpOptions {
            queues: queues.into_iter().map(Into::into).collect(),
            ..AmqpOptions::default()
        }
    }
}

/// The Celery task message announcing `job`: task `hefring.<kind>`, task id = operation id,
/// kwargs = the job's kwargs, no args, persistent.
pub fn task_message(job: &Job) -> Result<TaskMessage, QueueError> {
    let mut message = TaskMessage::new(&job.operation_id, format!("hefring.{}", job.kind));
    message.kwargs = match &job.kwargs {
        Value::Object(kwargs) => kwargs.clone(),
        Value::Null => Map::new(),
        other => {
            return Err(QueueError(format!(
                "the kwargs of operation {} must be a JSON object, not {other}",
                job.operation_id
            )))
        }
    };
    Ok(message)
}

/// A RabbitMQ connection to one broker, with the queue's own bookkeeping.
pub struct AmqpQueue {
    shared: Arc<Shared>,
    /// Deliveries forwarded by the consumer task; `None` when publishing only.
    deliveries: Option<Mutex<mpsc::Receiver<lapin::message::Delivery>>>,
    consumer: Option<JoinHandle<()>>,
}

struct Shared {
    url: String,
    options: AmqpOptions,
    publisher: Mutex<Option<Arc<Publisher>>>,
    /// Deliveries handed out and not yet acked, by their [`Delivery::Operation`] tag.
    pending: SyncMutex<HashMap<u64, Acker>>,
    /// The queue each delivery handed out came from and whether it was redelivered, until
    /// [`Queue::next`] reads it.
    routing_keys: SyncMutex<HashMap<u64, (String, bool)>>,
    next_tag: AtomicU64,
}

/// The publishing connection: one channel in confirm mode.
struct Publisher {
    connection: Connection,
    channel: Channel,
    declared: SyncMutex<HashSet<String>>,
}

/// The consuming connection and its consumers.
struct Session {
    _connection: Connection,
    _channel: Channel,
    consumers: Vec<lapin::Consumer>,
}

/// Why one publish attempt failed.
enum Failure {
    /// The connection or channel is gone: reconnect and try again.
    Retry(lapin::Error),
    /// The broker refused the message: trying again would not help.
    Fatal(String),
}

impl From<lapin::Error> for Failure {
    fn from(error: lapin::Error) -> Self {
        match &error {
            // A channel-level error (a refused declaration, an access refusal...) is an answer.
            lapin::Error::ProtocolError(e) if matches!(e.kind(), AMQPErrorKind::Soft(_)) => {
                Failure::Fatal(error.to_string())
            }
            _ => Failure::Retry(error),
        }
    }
}

fn queue_error(what: &str, error: impl std::fmt::Display) -> QueueError {
    QueueError(format!("{what}: {error}"))
}

async fn open_connection(url: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!(
            "hefring pid {}",
            std::process::id()
        )))
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    Connection::connect(url, properties).await
}

/// Declares `queue` as Celery declares `Queue(queue)`: durable, no arguments.
async fn declare(channel: &Channel, queue: &str) -> Result<(), lapin::Error> {
    let options = QueueDeclareOptions {
        durable: true,
        exclusive: false,
        auto_delete: false,
        passive: false,
        nowait: false,
    };
    channel
        .queue_declare(queue, options, FieldTable::default())
        .await
        .map(drop)
}

impl Publisher {
    async fn open(url: &str, default_queue: &str) -> Result<Publisher, lapin::Error> {
        let connection = open_connection(url).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare(&channel, default_queue).await?;
        Ok(Publisher {
            connection,
            channel,
            declared: SyncMutex::new(HashSet::from([default_queue.to_owned()])),
        })
    }

    fn usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    async fn publish(&self, queue: &str, message: &EncodedMessage) -> Result<(), Failure> {
        let known = self.declared.lock().expect("lock").contains(queue);
        if !known {
            declare(&self.channel, queue).await?;
            self.declared.lock().expect("lock").insert(queue.to_owned());
        }
        self.publish_to(queue, message).await
    }

    /// Publishes to a queue someone else declared (a client's reply queue), confirmed.
    async fn publish_to(&self, queue: &str, message: &EncodedMessage) -> Result<(), Failure> {
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let confirmation = self
            .channel
            .basic_publish("", queue, options, &message.body, amqp_properties(message))
            .await?
            .await?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(Failure::Fatal(format!(
                "the broker returned the message to queue {queue:?}: {} {}",
                returned.reply_code, returned.reply_text
            ))),
            Confirmation::Nack(_) => Err(Failure::Fatal(format!(
                "the broker refused (nack) the message to queue {queue:?}"
            ))),
            Confirmation::NotRequested => Err(Failure::Fatal(
                "the publishing channel is not in confirm mode".to_owned(),
            )),
        }
    }
}

impl Session {
    async fn open(url: &str, options: &AmqpOptions) -> Result<Session, lapin::Error> {
        let connection = open_connection(url).await?;
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(options.prefetch, BasicQosOptions::default())
            .await?;
        let mut consumers = Vec::new();
        for (index, queue) in options.queues.iter().enumerate() {
            declare(&channel, queue).await?;
            let tag = format!("hefring-{}-{index}-{queue}", std::process::id());
            let consume = BasicConsumeOptions {
                no_ack: false,
                ..BasicConsumeOptions::default()
            };
            consumers.push(
                channel
                    .basic_consume(queue, &tag, consume, FieldTable::default())
                    .await?,
            );
        }
        Ok(Session {
            _connection: connection,
            _channel: channel,
            consumers,
        })
    }
}

impl Shared {
    /// The publisher, reconnected if its connection is gone.
    async fn publisher(&self) -> Result<Arc<Publisher>, lapin::Error> {
        let mut current = self.publisher.lock().await;
        if let Some(publisher) = current.as_ref().filter(|p| p.usable()) {
            return Ok(publisher.clone());
        }
        if current.take().is_some() {
            eprintln!("hefring-queue: the AMQP publishing connection was lost; reconnecting");
        }
        let publisher = Arc::new(Publisher::open(&self.url, &self.options.default_queue).await?);
        *current = Some(publisher.clone());
        Ok(publisher)
    }

    fn remember(&self, acker: Acker) -> u64 {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        self.pending.lock().expect("lock").insert(tag, acker);
        tag
    }
}

/// Forwards deliveries to `sender` for as long as the queue lives, reconnecting when the
/// consumers end (connection lost, channel closed, consumer cancelled by the broker).
async fn consume(
    shared: Arc<Shared>,
    sender: mpsc::Sender<lapin::message::Delivery>,
    first: Session,
) {
    let mut session = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let current = match session.take() {
            Some(current) => current,
            None => match Session::open(&shared.url, &shared.options).await {
                Ok(current) => {
                    eprintln!("hefring-queue: AMQP consumer reconnected");
                    backoff = Duration::from_millis(100);
                    current
                }
                Err(error) => {
                    eprintln!("hefring-queue: AMQP consumer cannot reconnect yet: {error}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        // Each consumer's stream ends with a `None` marker, so that the end of any one of them
        // (a broker-side cancel) also leads to a reconnection.
        let streams = current.consumers.iter().cloned().map(|consumer| {
            consumer
                .map(Some)
                .chain(futures::stream::once(async { None }))
                .boxed()
        });
        let mut deliveries = futures::stream::select_all(streams);
        while let Some(item) = deliveries.next().await {
            match item {
                Some(Ok(delivery)) => {
                    if sender.send(delivery).await.is_err() {
                        return; // the queue was dropped
                    }
                }
                Some(Err(error)) => {
                    eprintln!("hefring-queue: AMQP consumer stopped: {error}; reconnecting");
                    break;
                }
                None => {
                    eprintln!("hefring-queue: an AMQP consumer was cancelled; reconnecting");
                    break;
                }
            }
        }
        drop(deliveries);
        drop(current);
        if sender.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
    }
}

impl AmqpQueue {
    /// Connects to the broker at `url` (`amqp://user:password@host:port/vhost`), declares the
    /// default queue and the consumed ones, and starts consuming when `options.queues` is not
    /// empty. Fails if the broker cannot be reached now; later losses are reconnected.
    pub async fn connect(url: &str, options: AmqpOptions) -> Result<AmqpQueue, QueueError> {
        let publisher = Publisher::open(url, &options.default_queue)
            .await
            .map_err(|e| queue_error("cannot connect to the AMQP broker", e))?;
        let shared = Arc::new(Shared {
            url: url.to_owned(),
            options,
            publisher: Mutex::new(Some(Arc::new(publisher))),
            pending: SyncMutex::new(HashMap::new()),
            routing_keys: SyncMutex::new(HashMap::new()),
            next_tag: AtomicU64::new(1),
        });
        if shared.options.queues.is_empty() {
            return Ok(AmqpQueue {
                shared,
                deliveries: None,
                consumer: None,
            });
        }
        let session = Session::open(url, &shared.options)
            .await
            .map_err(|e| queue_error("cannot start consuming", e))?;
        let (sender, receiver) = mpsc::channel(1);
        let consumer = tokio::spawn(consume(shared.clone(), sender, session));
        Ok(AmqpQueue {
            shared,
            deliveries: Some(Mutex::new(receiver)),
            consumer: Some(consumer),
        })
    }

    /// Publishes one message, confirmed, without retrying: to a queue of ours (`declare`), or
    /// to one a client declared (a reply queue).
    async fn publish_once(
        &self,
        queue: &str,
        message: &EncodedMessage,
        declare: bool,
        what: &str,
    ) -> Result<(), QueueError> {
        let publisher = self
            .shared
            .publisher()
            .await
            .map_err(|e| queue_error(what, e))?;
        let published = if declare {
            publisher.publish(queue, message).await
        } else {
            publisher.publish_to(queue, message).await
        };
        published.map_err(|e| match e {
            Failure::Fatal(e) => QueueError(e),
            Failure::Retry(e) => queue_error(what, e),
        })
    }

    pub fn options(&self) -> &AmqpOptions {
        &self.shared.options
    }

    /// Waits at most `poll` for the next task message, and answers it with the tag to ack it
    /// with ([`Queue::ack`] of a [`Delivery::Operation`] with this tag). A message that is not
    /// a Celery protocol 2 task is rejected without requeue, logged, and skipped.
    pub async fn next_message(
        &self,
        poll: Duration,
    ) -> Result<Option<(TaskMessage, u64)>, QueueError> {
        let Some(deliveries) = &self.deliveries else {
            tokio::time::sleep(poll).await;
            return Ok(None);
        };
        let deadline = Instant::now() + poll;
        let Ok(mut deliveries) = tokio::time::timeout_at(deadline, deliveries.lock()).await else {
            return Ok(None);
        };
        loop {
            let delivery = match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err(QueueError("the AMQP consumer has stopped".to_owned())),
                Ok(Some(delivery)) => delivery,
            };
            match decode_delivery(&delivery) {
                Ok(message) => {
                    let tag = self.shared.remember(delivery.acker);
                    self.shared.routing_keys.lock().expect("lock").insert(
                        tag,
                        (
                            delivery.routing_key.as_str().to_owned(),
                            delivery.redelivered,
                        ),
                    );
                    return Ok(Some((message, tag)));
                }
                Err(error) => {
                    eprintln!(
                        "hefring-queue: rejecting a message on queue {:?} that is not a Celery \
                         protocol 2 task: {error}",
                        delivery.routing_key.as_str()
                    );
                    let reject = delivery.acker.reject(BasicRejectOptions { requeue: false });
                    match tokio::time::timeout(ACK_TIMEOUT, reject).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => eprintln!("hefring-queue: the reject failed: {e}"),
                        Err(_) => eprintln!("hefring-queue: the reject timed out"),
                    }
                }
            }
        }
    }

    /// Closes the connections (dropping the queue does too, without waiting).
    pub async fn close(mut self) {
        if let Some(consumer) = self.consumer.take() {
            consumer.abort();
            let _ = consumer.await;
        }
        if let Some(publisher) = self.shared.publisher.lock().await.take() {
            let _ = publisher.connection.close(200, "bye").await;
        }
    }
}

impl Drop for AmqpQueue {
    fn drop(&mut self) {
        // The consumer task holds the consuming connection: ending it closes that connection,
        // and the broker requeues every delivery that was not acked.
        if let Some(consumer) = self.consumer.take() {
            consumer.abort();
        }
    }
}

#[async_trait]
impl Queue for AmqpQueue {
    async fn publish(&self, job: &Job) -> Result<(), QueueError> {
        let message = celery::encode(&task_message(job)?);
        let timeout = self.shared.options.reconnect_timeout;
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = async {
                let publisher = self.shared.publisher().await?;
                let result = publisher.publish(&job.queue, &message).await;
                if let Err(Failure::Fatal(_)) = &result {
                    // A refused declaration closes the channel: open a fresh one next time.
                    if !publisher.usable() {
                        self.shared.publisher.lock().await.take();
                    }
                }
                result
            };
            let error = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(Failure::Fatal(error))) => {
                    return Err(QueueError(format!(
                        "publishing operation {} failed: {error}",
                        job.operation_id
                    )))
                }
                Ok(Err(Failure::Retry(error))) => error.to_string(),
                Err(_) => "timed out".to_owned(),
            };
            if Instant::now() + backoff >= deadline {
                return Err(QueueError(format!(
                    "publishing operation {} failed: no AMQP broker after {timeout:?} ({error})",
                    job.operation_id
                )));
            }
            eprintln!(
                "hefring-queue: publishing operation {} failed ({error}); retrying",
                job.operation_id
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn next(&self, poll: Duration) -> Result<Delivery, QueueError> {
        Ok(match self.next_message(poll).await? {
            Some((message, tag)) => {
                let (queue, redelivered) = self
                    .shared
                    .routing_keys
                    .lock()
                    .expect("lock")
                    .remove(&tag)
                    .unwrap_or_else(|| (self.shared.options.default_queue.clone(), false));
                let announcement = Announcement {
                    kind: message
                        .task
                        .strip_prefix(TASK_PREFIX)
                        .unwrap_or(&message.task)
                        .to_owned(),
                    kwargs: Value::Object(message.kwargs.clone()),
                    queue,
                    reply_to: message.reply_to.clone(),
                    redelivered,
                };
                Delivery::Operation {
                    id: message.id,
                    tag,
                    announcement: Some(announcement),
                }
            }
            None => Delivery::Anything,
        })
    }

    fn names_operations(&self) -> bool {
        true
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), QueueError> {
        let Delivery::Operation {
            id,
            announcement: Some(announcement),
            ..
        } = delivery
        else {
            return self.ack(delivery).await;
        };
        let mut message = task_message(&Job {
            operation_id: id.clone(),
            kind: announcement.kind.clone(),
            queue: DEAD_LETTER_QUEUE.to_owned(),
            kwargs: announcement.kwargs.clone(),
        })?;
        message.extra_headers.insert(
            "x-hefring-dead-reason".to_owned(),
            Value::String(reason.to_owned()),
        );
        message.extra_headers.insert(
            "x-hefring-queue".to_owned(),
            Value::String(announcement.queue.clone()),
        );
        let encoded = celery::encode(&message);
        self.publish_once(
            DEAD_LETTER_QUEUE,
            &encoded,
            true,
            "dead-lettering a message",
        )
        .await?;
        // Only once it is safely in the dead-letter queue does it leave its own.
        self.ack(delivery).await
    }

    async fn reply(&self, reply_to: &str, outcome: &Outcome) -> Result<(), QueueError> {
        let result = if outcome.succeeded {
            celery::ResultMessage::success(&outcome.operation_id, outcome.operation.clone())
        } else {
            celery::ResultMessage::failure(
                &outcome.operation_id,
                "HefringOperationFailed",
                outcome
                    .error
                    .clone()
                    .unwrap_or_else(|| "the operation failed".to_owned()),
            )
        };
        let message = celery::encode_result(&result);
        self.publish_once(reply_to, &message, false, "publishing a result")
            .await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), QueueError> {
        let Delivery::Operation { id, tag, .. } = delivery else {
            return Ok(());
        };
        let Some(acker) = self.shared.pending.lock().expect("lock").remove(tag) else {
            eprintln!("hefring-queue: ack of unknown delivery {tag} (operation {id}) ignored");
            return Ok(());
        };
        match tokio::time::timeout(ACK_TIMEOUT, acker.ack(BasicAckOptions::default())).await {
            Ok(Ok(())) => {}
            // The channel it came on is gone: the broker redelivers the message elsewhere.
            Ok(Err(e)) => eprintln!(
                "hefring-queue: ack of operation {id} ignored, its channel is gone (the broker \
                 redelivers it): {e}"
            ),
            Err(_) => eprintln!("hefring-queue: ack of operation {id} timed out; ignored"),
        }
        Ok(())
    }
}

fn decode_delivery(delivery: &lapin::message::Delivery) -> Result<TaskMessage, String> {
    let amqp = &delivery.properties;
    let text = |value: &Option<ShortString>| value.as_ref().map(|v| v.as_str().to_owned());
    let properties = Properties {
        correlation_id: text(amqp.correlation_id()),
        reply_to: text(amqp.reply_to()),
        content_type: text(amqp.content_type()),
        content_encoding: text(amqp.content_encoding()),
        delivery_mode: *amqp.delivery_mode(),
        priority: *amqp.priority(),
        expiration: text(amqp.expiration()),
    };
    let headers: BTreeMap<String, Value> = amqp
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), to_json(value)))
                .collect()
        })
        .unwrap_or_default();
    celery::decode(&headers, &properties, &delivery.data).map_err(|e| e.to_string())
}

fn amqp_properties(message: &EncodedMessage) -> BasicProperties {
    let p = &message.properties;
    let mut properties = BasicProperties::default().with_headers(to_table(&message.headers));
    let short = |value: &String| ShortString::from(value.as_str());
    if let Some(v) = &p.correlation_id {
        properties = properties.with_correlation_id(short(v));
    }
    if let Some(v) = &p.reply_to {
        properties = properties.with_reply_to(short(v));
    }
    if let Some(v) = &p.content_type {
        properties = properties.with_content_type(short(v));
    }
    if let Some(v) = &p.content_encoding {
        properties = properties.with_content_encoding(short(v));
    }
    if let Some(v) = p.delivery_mode {
        properties = properties.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        properties = properties.with_priority(v);
    }
    if let Some(v) = &p.expiration {
        properties = properties.with_expiration(short(v));
    }
    properties
}

fn to_table(map: &BTreeMap<String, Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in map {
        table.insert(ShortString::from(name.as_str()), to_amqp(value));
    }
    table
}

/// A JSON value as py-amqp would send the same Python value (RabbitMQ's field types: `t`, `l`,
/// `d`, `S`, `A`, `F`, `V`).
fn to_amqp(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::LongString(LongString::from(n.to_string())),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(to_amqp).collect::<Vec<_>>(),
        )),
        Value::Object(members) => {
            let mut table = FieldTable::default();
            for (name, value) in members {
                table.insert(ShortString::from(name.as_str()), to_amqp(value));
            }
            AMQPValue::FieldTable(table)
        }
    }
}

fn to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number)
        }
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            let value = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(to_json).collect())
        }
        AMQPValue::FieldTable(table) => Value::Object(
            table
                .inner()
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), to_json(value)))
                .collect(),
        ),
        AMQPValue::Void => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    //! Against the real RabbitMQ on 127.0.0.1:5672 (guest/guest), one vhost per test, and
    //! Python Celery (installed with pip when missing).

    use super::*;
    use std::process::{Command, Stdio};
    use std::sync::OnceLock;

    fn run(program: &str, args: &[&str]) -> String {
        let output = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts the shared RabbitMQ if it is down (once per process).
    fn rabbitmq() {
        static STARTED: OnceLock<()> = OnceLock::new();
        STARTED.get_or_init(|| {
            if std::net::TcpStream::connect("127.0.0.1:5672").is_err() {
                let _ = Command::new("rabbitmq-server").arg("-detached").status();
                run("rabbitmqctl", &["await_startup", "--timeout", "120"]);
            }
        });
    }

    /// A vhost of its own, deleted on drop.
    struct Vhost {
        name: String,
    }

    impl Vhost {
        fn new() -> Vhost {
            rabbitmq();
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            let name = format!(
                "hefring-test-{}-{nanos:x}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            run("rabbitmqctl", &["-q", "add_vhost", &name]);
            run(
                "rabbitmqctl",
                &[
                    "-q",
                    "set_permissions",
                    "-p",
                    &name,
                    "guest",
                    ".*",
                    ".*",
                    ".*",
                ],
            );
            Vhost { name }
        }

        fn url(&self) -> String {
            format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
        }

        /// `(messages ready, messages unacknowledged)` of `queue`.
        fn counts(&self, queue: &str) -> (u64, u64) {
            let out = run(
                "rabbitmqctl",
                &[
                    "-q",
                    "list_queues",
                    "-p",
                    &self.name,
                    "--no-table-headers",
                    "name",
                    "messages_ready",
                    "messages_unacknowledged",
                ],
            );
            for line in out.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.first() == Some(&queue) {
                    return (fields[1].parse().unwrap(), fields[2].parse().unwrap());
                }
            }
            panic!("no queue {queue} in {out}");
        }

        /// Waits until `queue` holds no message at all (the broker's counters lag a little).
        async fn assert_empty(&self, queue: &str) {
            let mut counts = self.counts(queue);
            for _ in 0..50 {
                if counts == (0, 0) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                counts = self.counts(queue);
            }
            panic!("queue {queue} still holds (ready, unacked) = {counts:?}");
        }
    }

    impl Drop for Vhost {
        fn drop(&mut self) {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "delete_vhost", &self.name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    fn job(id: &str) -> Job {
        Job {
            operation_id: id.to_owned(),
            kind: "system_noop".to_owned(),
            queue: DEFAULT_QUEUE.to_owned(),
            kwargs: serde_json::json!({"n": id}),
        }
    }

    async fn worker(vhost: &Vhost) -> AmqpQueue {
        AmqpQueue::connect(&vhost.url(), AmqpOptions::consuming([DEFAULT_QUEUE]))
            .await
            .unwrap()
    }

    async fn next_operation(queue: &AmqpQueue) -> (String, u64) {
        match queue.next(Duration::from_secs(10)).await.unwrap() {
            Delivery::Operation { id, tag, .. } => (id, tag),
            Delivery::Anything => panic!("nothing delivered within 10 s"),
        }
    }

    fn python() -> &'static str {
        static READY: OnceLock<()> = OnceLock::new();
        READY.get_or_init(|| {
            let present = Command::new("python3")
                .args(["-c", "import celery"])
                .status()
                .is_ok_and(|s| s.success());
            if !present {
                run("python3", &["-m", "pip", "install", "--quiet", "celery"]);
            }
        });
        "python3"
    }

    #[tokio::test]
    async fn published_jobs_arrive_once_in_order_and_acked_leave_the_queue() {
        let vhost = Vhost::new();
        let publisher = AmqpQueue::connect(&vhost.url(), AmqpOptions::default())
            .await
            .unwrap();
        let ids: Vec<String> = (0..20).map(|i| format!("op_{i:03}")).collect();
        for id in &ids {
            publisher.publish(&job(id)).await.unwrap();
        }
        assert_eq!(vhost.counts(DEFAULT_QUEUE), (20, 0));

        let worker = worker(&vhost).await;
        let mut received = Vec::new();
        for _ in 0..ids.len() {
            let (id, tag) = next_operation(&worker).await;
            received.push(id.clone());
            worker
                .ack(&Delivery::Operation {
                    id,
                    tag,
                    announcement: None,
                })
                .await
                .unwrap();
        }
        assert_eq!(received, ids);
        assert!(matches!(
            worker.next(Duration::from_millis(300)).await.unwrap(),
            Delivery::Anything
        ));
        vhost.assert_empty(DEFAULT_QUEUE).await;
        // Acking `Anything` is a no-op; acking twice is ignored.
        worker.ack(&Delivery::Anything).await.unwrap();
        worker
            .ack(&Delivery::Operation {
                id: "op_000".into(),
                tag: 1,
                announcement: None,
            })
            .await
            .unwrap();
        worker.close().await;
        publisher.close().await;
    }

    #[tokio::test]
    async fn deliveries_never_acked_are_redelivered_after_the_consumer_goes() {
        let vhost = Vhost::new();
        let first = worker(&vhost).await;
        let ids = ["op_a", "op_b", "op_c"];
        for id in ids {
            first.publish(&job(id)).await.unwrap();
        }
        let mut got = Vec::new();
        for _ in ids {
            got.push(next_operation(&first).await.0);
        }
        assert_eq!(got, ids);
        assert_eq!(
            vhost.counts(DEFAULT_QUEUE).1,
            3,
            "held unacked by the first"
        );
        drop(first);

        let second = worker(&vhost).await;
        let mut again = Vec::new();
        for _ in ids {
            let (id, tag) = next_operation(&second).await;
            again.push(id.clone());
            second
                .ack(&Delivery::Operation {
                    id,
                    tag,
                    announcement: None,
                })
                .await
                .unwrap();
        }
        again.sort();
        assert_eq!(again, ids);
        vhost.assert_empty(DEFAULT_QUEUE).await;
    }

    #[tokio::test]
    async fn a_python_celery_client_starts_an_operation_and_a_python_worker_runs_ours() {
        let vhost = Vhost::new();
        // Our declaration comes first; Celery then redeclares the queue its own way, which
        // RabbitMQ refuses (PRECONDITION_FAILED) unless both are identical.
        let worker = worker(&vhost).await;
        let script = r#"
import sys
from celery import Celery
app = Celery(broker=sys.argv[1])
result = app.send_task("hefring.project_verify", kwargs={"project": "prj_x"}, queue="hefring")
print(result.id)
"#;
        let output = Command::new(python())
            .args(["-c", script, &vhost.url()])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let task_id = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        assert!(!task_id.is_empty());

        let (message, tag) = worker
            .next_message(Duration::from_secs(10))
            .await
            .unwrap()
            .expect("Celery's message arrives");
        assert_eq!(message.id, task_id);
        assert_eq!(message.task, "hefring.project_verify");
        assert_eq!(
            Value::Object(message.kwargs.clone()),
            serde_json::json!({"project": "prj_x"})
        );
        assert!(message.args.is_empty());
        worker
            .ack(&Delivery::Operation {
                id: message.id,
                tag,
                announcement: None,
            })
            .await
            .unwrap();
        vhost.assert_empty(DEFAULT_QUEUE).await;
        drop(worker);

        // A Python worker runs a task Hefring published.
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("ran.json");
        std::fs::write(
            dir.path().join("hefringcheck.py"),
            r#"
import json, os
from celery import Celery
app = Celery("hefringcheck", broker=os.environ["HEFRING_BROKER"])
@app.task(name="hefring.system_noop", bind=True)
def noop(self, **kwargs):
    with open(os.environ["HEFRING_MARK"], "w") as f:
        json.dump({"id": self.request.id, "kwargs": kwargs}, f)
"#,
        )
        .unwrap();
        let publisher = AmqpQueue::connect(&vhost.url(), AmqpOptions::default())
            .await
            .unwrap();
        publisher.publish(&job("op_from_rust")).await.unwrap();

        python();
        struct Killed(std::process::Child);
        impl Drop for Killed {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
        let _celery = Killed(
            Command::new("celery")
                .args([
                    "-A",
                    "hefringcheck",
                    "worker",
                    "-Q",
                    "hefring",
                    "--pool",
                    "solo",
                    "-c",
                    "1",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--loglevel",
                    "info",
                ])
                .current_dir(dir.path())
                .env("PYTHONPATH", dir.path())
                .env("HEFRING_BROKER", vhost.url())
                .env("HEFRING_MARK", &mark)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("the celery command (pip install celery)"),
        );
        let started = std::time::Instant::now();
        while !mark.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the Celery worker did not run the task; its log:\n{}",
                std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ran: Value = serde_json::from_str(&std::fs::read_to_string(&mark).unwrap()).unwrap();
        assert_eq!(
            ran,
            serde_json::json!({"id": "op_from_rust", "kwargs": {"n": "op_from_rust"}})
        );
    }

    #[tokio::test]
    async fn a_poison_message_is_rejected_and_does_not_block_the_next() {
        let vhost = Vhost::new();
        let worker = worker(&vhost).await;
        {
            let connection = open_connection(&vhost.url()).await.unwrap();
            let channel = connection.create_channel().await.unwrap();
            channel
                .basic_publish(
                    "",
                    DEFAULT_QUEUE,
                    BasicPublishOptions::default(),
                    b"this is not a Celery task",
                    BasicProperties::default().with_content_type("text/plain".into()),
                )
                .await
                .unwrap();
            connection.close(200, "bye").await.unwrap();
        }
        worker.publish(&job("op_after_poison")).await.unwrap();
        let (id, tag) = next_operation(&worker).await;
        assert_eq!(id, "op_after_poison");
        worker
            .ack(&Delivery::Operation {
                id,
                tag,
                announcement: None,
            })
            .await
            .unwrap();
        vhost.assert_empty(DEFAULT_QUEUE).await;
    }

    #[tokio::test]
    async fn publishing_and_consuming_resume_after_the_broker_closes_the_connections() {
        let vhost = Vhost::new();
        let worker = worker(&vhost).await;
        worker.publish(&job("op_before")).await.unwrap();
        let (id, tag) = next_operation(&worker).await;
        assert_eq!(id, "op_before");

        // What a broker restart does to a client: CONNECTION_FORCED on every connection (of
        // this vhost only: the shared broker is never restarted under other tests).
        run(
            "rabbitmqctl",
            &["-q", "close_all_connections", "-p", &vhost.name, "test"],
        );
        tokio::time::sleep(Duration::from_millis(200)).await;

        // The stale delivery's ack is ignored; the broker redelivers it.
        worker
            .ack(&Delivery::Operation {
                id,
                tag,
                announcement: None,
            })
            .await
            .unwrap();
        worker.publish(&job("op_after")).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            let (id, tag) = next_operation(&worker).await;
            got.push(id.clone());
            worker
                .ack(&Delivery::Operation {
                    id,
                    tag,
                    announcement: None,
                })
                .await
                .unwrap();
        }
        got.sort();
        assert_eq!(got, ["op_after", "op_before"]);
        vhost.assert_empty(DEFAULT_QUEUE).await;
    }

    #[tokio::test]
    async fn publishing_gives_up_after_the_reconnect_timeout_without_a_broker() {
        let vhost = Vhost::new();
        let options = AmqpOptions {
            reconnect_timeout: Duration::from_secs(2),
            ..AmqpOptions::default()
        };
        let queue = AmqpQueue::connect(&vhost.url(), options).await.unwrap();
        queue.publish(&job("op_ok")).await.unwrap();
        // Deleting the vhost closes its connections and refuses new ones, as a broker that
        // stays down would.
        run("rabbitmqctl", &["-q", "delete_vhost", &vhost.name]);
        let started = std::time::Instant::now();
        let error = queue.publish(&job("op_lost")).await.unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
            "gave up after {waited:?}: {error}"
        );
        assert!(error.to_string().contains("op_lost"), "{error}");
    }

    #[test]
    fn a_job_becomes_a_celery_task_named_after_its_kind() {
        let message = task_message(&job("op_1")).unwrap();
        assert_eq!(message.id, "op_1");
        assert_eq!(message.task, "hefring.system_noop");
        assert_eq!(message.correlation_id, "op_1");
        assert_eq!(message.delivery_mode, celery::PERSISTENT);
        let encoded = celery::encode(&message);
        let table = to_table(&encoded.headers);
        let back: BTreeMap<String, Value> = table
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
            .collect();
        assert_eq!(back, encoded.headers);
        let mut bad = job("op_2");
        bad.kwargs = serde_json::json!([1]);
        assert!(task_message(&bad).is_err());
    }
}
