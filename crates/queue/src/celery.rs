//! Celery message protocol 2, as JSON: task messages and the `rpc://` backend's result
//! messages. A pure codec (no AMQP here): the AMQP backend maps [`EncodedMessage`] to and from
//! a broker delivery (headers table, basic properties, body).
//!
//! The reference is Celery's `docs/internals/protocol.rst` (version 2), checked against what
//! Celery 5.7.0 with kombu 5.7.0 actually sends: `tests/fixtures/capture.py` captures real
//! messages through kombu's in-memory transport, and `tests/fixtures/check.py` has Celery's own
//! worker and result-backend code read what this module encodes (see the tests below).
//!
//! What the wire looks like, including what surprised us:
//!
//! - **Task messages.** The metadata is in the AMQP headers (`task`, `id`, `root_id`, ...), the
//!   body is the JSON array `[args, kwargs, embed]`, and the properties are `correlation_id`
//!   (the task id), `reply_to`, `content_type: application/json`, `content_encoding: utf-8`,
//!   `delivery_mode: 2` and `priority` (kombu sends `0` when none was asked for).
//! - **`timelimit` is `[hard, soft]`** in Celery's code (`app/amqp.py`, `worker/request.py`)
//!   although `protocol.rst` says `(soft, hard)`. [`TimeLimit`] names the two fields.
//! - Celery sends **every header, `null` when unset** (an AMQP void value), and also
//!   `group_index`, `replaced_task_nesting`, `stamped_headers` and `stamps`, which this module
//!   keeps in [`TaskMessage::extra_headers`]. A worker needs only `task` and `id`: it reads all
//!   the others with defaults, so [`decode`] defaults them too. [`encode`] sends `null` like
//!   Celery, except for `argsrepr` and `kwargsrepr`, which it leaves out when unset: a worker
//!   reads a missing one as `""` but a `null` one as `None`, printed as "None" in its logs.
//! - **`ignore_result` has three values**: `null` (or absent) means "the task's own setting",
//!   which is what `send_task` sends by default; hence `Option<bool>`.
//! - **`root_id` is the task's own id** for a task that has no parent (Celery fills it in).
//! - **`embed` may be `null`**: `protocol.rst`'s own example sends `(args, kwargs, None)`. Most
//!   of the worker copes, but `Request.chord` and `Request.errbacks` call `.get` on it, so
//!   [`encode`] always sends an object (with `null` members, like Celery) and [`decode`] accepts
//!   `null` or a missing third element.
//! - **`embed.chain` is stored last task first**: after a task succeeds, the worker sends
//!   `chain[-1]` with the result prepended to its args and the rest of the list as its chain.
//!   Link callbacks (`embed.callbacks`) are sent before the chain's next task.
//! - **`expires` is also an AMQP `expiration`** (per-message TTL, milliseconds as a decimal
//!   string, computed when sending): Celery 5.7 sets both, so a queued expired task is dropped
//!   by RabbitMQ before a worker ever revokes it. `eta` and `expires` are ISO 8601 with an
//!   offset (`2030-01-02T03:04:05.678901+00:00`); a worker reads a naive time in its app's
//!   `timezone` setting (UTC by default).
//! - `reply_to` is `""` in a message built by `as_task_v2` without a reply queue; `send_task`
//!   sets it to the client's reply queue even when no result is awaited. [`decode`] reads `""`
//!   as no reply queue.
//! - **Content type**: a worker accepts only the content types it is configured for (exactly
//!   `application/json` by default) and reads a message without one as raw bytes, which it
//!   cannot unpack; `content_encoding` defaults to utf-8. [`encode`] always sets both;
//!   [`decode`] ignores case and parameters (`; charset=utf-8`) but refuses anything other than
//!   JSON in UTF-8, and compressed bodies (a `compression` header).
//! - kombu's JSON has `", "` and `": "` separators and escapes non-ASCII (`"\u00fc"`), serde_json
//!   writes compact UTF-8: the texts differ, the JSON values are equal (what the tests compare).
//! - **Protocol 1** (`task_protocol = 1`) has no headers and a body object
//!   `{"task", "id", "args", "kwargs", ...}`: [`decode`] says so rather than "missing header".
//! - **Results over `rpc://`** go to the client's `reply_to` queue through the default exchange
//!   with `correlation_id` = task id (the client reads the property before the body) and
//!   `delivery_mode: 1` (`result_persistent` is off by default). The body is
//!   `{"task_id", "status", "result", "traceback", "children", "date_done"}`, plus `group_id`
//!   and `parent_id` when the task has them (kept in [`ResultMessage::extra`]). `date_done` is
//!   set only for ready states, as Python's `isoformat()` of an aware UTC time. A child is
//!   `[[id, parent], null]`.
//! - **Exceptions** travel as `{"exc_type", "exc_message": [args...], "exc_module"}`, for
//!   `FAILURE` and also for `RETRY` and `REVOKED`. A Python client
//!   (`Backend.exception_to_python`) raises the class `exc_module.exc_type` if that module is
//!   imported and has it; a new `Exception` subclass named `exc_type` if the module or name is
//!   unknown or `exc_module` is `null`; and refuses (`SecurityError`) a name that exists but is
//!   not an exception class. So [`ExceptionInfo::new`] names `builtins` only for builtin
//!   exception classes that take one message, and `null` for anything else.
//! - Numbers: a float that is a whole number is sent as an integer in `timelimit`, like Python
//!   writes `300`. serde_json (without its `float_roundtrip` feature) may read a float in args
//!   one unit in the last place off; values that matter should be integers or strings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The only content type this codec speaks (kombu's `json` serializer).
pub const CONTENT_TYPE: &str = "application/json";
/// The content encoding of [`CONTENT_TYPE`] bodies.
pub const CONTENT_ENCODING: &str = "utf-8";
/// AMQP `delivery_mode` of a message the broker keeps on disk (Celery's task messages).
pub const PERSISTENT: u8 = 2;
/// AMQP `delivery_mode` of a message the broker may keep in memory only (`rpc://` results).
pub const TRANSIENT: u8 = 1;

/// The headers a task message's fields are read from; any other header is kept as it is in
/// [`TaskMessage::extra_headers`].
pub const TASK_HEADERS: &[&str] = &[
    "lang",
    "task",
    "id",
    "root_id",
    "parent_id",
    "group",
    "retries",
    "eta",
    "expires",
    "timelimit",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "shadow",
    "ignore_result",
];

const EMBED_FIELDS: [&str; 4] = ["callbacks", "errbacks", "chain", "chord"];
const RESULT_FIELDS: [&str; 6] = [
    "task_id",
    "status",
    "result",
    "traceback",
    "children",
    "date_done",
];

/// The AMQP basic properties a Celery message uses. All are optional in AMQP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_mode: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Per-message TTL in milliseconds, as a decimal string (AMQP `expiration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration: Option<String>,
}

/// A message ready for the broker: the AMQP headers table (as JSON values: `null` is an AMQP
/// void), the basic properties, and the body bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedMessage {
    pub headers: BTreeMap<String, Value>,
    pub properties: Properties,
    pub body: Vec<u8>,
}

/// The `timelimit` header, in seconds. On the wire it is `[hard, soft]`; a limit that is not
/// finite is sent as `null` (no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TimeLimit {
    /// The worker kills the task's process after this long.
    pub hard: Option<f64>,
    /// The task gets `SoftTimeLimitExceeded` raised inside it after this long.
    pub soft: Option<f64>,
}

/// The third element of a task body: what to do after the task.
///
/// Each signature is Celery's dict form (see [`signature`]). A member Celery sent as `null`
/// is `None`; an empty list stays an empty list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Embed {
    /// Signatures applied to the task's result when it succeeds (`link`).
    pub callbacks: Option<Vec<Value>>,
    /// Signatures applied when it fails (`link_error`).
    pub errbacks: Option<Vec<Value>>,
    /// The rest of a chain, **last task first**: the worker sends the last element next.
    pub chain: Option<Vec<Value>>,
    /// The chord body to call once the task's group is complete. `Some(Value::Null)` is sent
    /// as `null` and so comes back as `None`.
    pub chord: Option<Value>,
    /// Members of `embed` this module does not know, kept as they are.
    pub extra: BTreeMap<String, Value>,
}

/// A Celery task message (protocol 2). In Hefring, `id` is the operation id.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskMessage {
    /// The task id (`id` header). Hefring uses the operation id.
    pub id: String,
    /// The registered task name (`task` header), e.g. `hefring.project_verify`.
    pub task: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub embed: Embed,
    /// The language of the task (`"py"` for Celery; the default when the header is missing).
    pub lang: String,
    /// The first task of the workflow this task belongs to (its own id if it has no parent).
    pub root_id: Option<String>,
    /// The task that sent this one.
    pub parent_id: Option<String>,
    /// The group this task is a member of.
    pub group: Option<String>,
    /// How many times this task has been retried.
    pub retries: u32,
    /// Run no earlier than this (ISO 8601, with an offset).
    pub eta: Option<String>,
    /// Revoke rather than run after this (ISO 8601, with an offset).
    pub expires: Option<String>,
    pub timelimit: TimeLimit,
    /// How the args are shown in logs and events (Python's `repr`).
    pub argsrepr: Option<String>,
    pub kwargsrepr: Option<String>,
    /// The node that sent the message, `pid@hostname` for Celery.
    pub origin: Option<String>,
    /// The name to show in logs and events instead of `task`.
    pub shadow: Option<String>,
    /// Whether the worker stores no result; `None` leaves it to the task's own setting.
    pub ignore_result: Option<bool>,
    /// Any other header, kept as it is (Celery's `group_index`, `stamps`, ...). An entry named
    /// like one of [`TASK_HEADERS`] is ignored by [`encode`]: the field wins.
    pub extra_headers: BTreeMap<String, Value>,
    /// The `correlation_id` property: the task id in every message Celery sends, and what a
    /// worker copies into its `rpc://` reply.
    pub correlation_id: String,
    /// The queue the `rpc://` result goes to (the `reply_to` property).
    pub reply_to: Option<String>,
    /// The `priority` property (0-255; a RabbitMQ queue honours it up to its `x-max-priority`).
    pub priority: Option<u8>,
    /// The `delivery_mode` property: [`PERSISTENT`] or [`TRANSIENT`]. A message without one
    /// is transient to the broker, so [`decode`] reads a missing one as [`TRANSIENT`].
    pub delivery_mode: u8,
    /// The `expiration` property: per-message TTL in milliseconds, as a decimal string.
    pub expiration: Option<String>,
}

impl TaskMessage {
    /// A message for `task` with task id `id`, no arguments, and Celery's defaults: language
    /// `py`, its own root, persistent, the task's own `ignore_result`.
    pub fn new(id: impl Into<String>, task: impl Into<String>) -> Self {
        let id = id.into();
        TaskMessage {
            task: task.into(),
            args: Vec::new(),
            kwargs: Map::new(),
            embed: Embed::default(),
            lang: "py".to_owned(),
            root_id: Some(id.clone()),
            parent_id: None,
            group: None,
            retries: 0,
            eta: None,
            expires: None,
            timelimit: TimeLimit::default(),
            argsrepr: None,
            kwargsrepr: None,
            origin: None,
            shadow: None,
            ignore_result: None,
            extra_headers: BTreeMap::new(),
            correlation_id: id.clone(),
            reply_to: None,
            priority: None,
            delivery_mode: PERSISTENT,
            expiration: None,
            id,
        }
    }
}

/// Celery's dict form of a signature (`Signature.__dict__`), for `embed` members.
pub fn signature(task: &str, args: Vec<Value>, kwargs: Map<String, Value>) -> Value {
    serde_json::json!({
        "task": task,
        "args": args,
        "kwargs": kwargs,
        "options": {},
        "subtask_type": null,
        "immutable": false,
    })
}

/// Why a message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CeleryError {
    #[error(
        "unsupported content type {}: only application/json is supported (Celery's `json` serializer)",
        shown(.0)
    )]
    UnsupportedContentType(Option<String>),
    #[error("unsupported content encoding {0:?}: only utf-8 is supported")]
    UnsupportedContentEncoding(String),
    #[error("compressed messages are not supported (compression: {0})")]
    Compressed(String),
    #[error(
        "Celery message protocol 1 is not supported: the task name and id are in the body, not \
         in the headers (send with task_protocol = 2, the default since Celery 4)"
    )]
    ProtocolV1,
    #[error("missing {0:?} header")]
    MissingHeader(&'static str),
    #[error("header {name:?} must be {expected}, found {found}")]
    InvalidHeader {
        name: String,
        expected: &'static str,
        found: String,
    },
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("body must be the array [args, kwargs, embed], found {0}")]
    BodyShape(String),
    #[error("task args (the body's first element) must be an array, found {0}")]
    ArgsNotArray(String),
    #[error("task kwargs (the body's second element) must be an object, found {0}")]
    KwargsNotObject(String),
    #[error("embed{} must be {expected}, found {found}", member(.field))]
    InvalidEmbed {
        field: Option<String>,
        expected: &'static str,
        found: String,
    },
    #[error("a result body must be a JSON object, found {0}")]
    ResultShape(String),
    #[error("result has no {0:?}")]
    MissingResultField(&'static str),
    #[error("result field {name:?} must be {expected}, found {found}")]
    InvalidResultField {
        name: String,
        expected: &'static str,
        found: String,
    },
}

fn shown(value: &Option<String>) -> String {
    match value {
        Some(value) => format!("{value:?}"),
        None => "(none given)".to_owned(),
    }
}

fn member(field: &Option<String>) -> String {
    match field {
        Some(field) => format!(".{field}"),
        None => String::new(),
    }
}

/// What a JSON value is, for error messages.
fn kind(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(_) => "a boolean".to_owned(),
        Value::Number(_) => "a number".to_owned(),
        Value::String(_) => "a string".to_owned(),
        Value::Array(items) => format!("an array of {} elements", items.len()),
        Value::Object(_) => "an object".to_owned(),
    }
}

fn json_text(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("a serde_json::Value always serialises")
}

fn or_null<T: Into<Value>>(value: Option<T>) -> Value {
    value.map_or(Value::Null, Into::into)
}

/// Seconds as Python writes them: a whole number as an integer (`300`, not `300.0`).
fn seconds(value: Option<f64>) -> Value {
    match value {
        Some(s) if s.fract() == 0.0 && s.abs() < 9_007_199_254_740_992.0 => Value::from(s as i64),
        Some(s) => serde_json::Number::from_f64(s).map_or(Value::Null, Value::Number),
        None => Value::Null,
    }
}

/// Checks that the body is JSON in UTF-8, as [`encode`] writes it.
fn check_content(properties: &Properties) -> Result<(), CeleryError> {
    let content_type = properties.content_type.as_deref().map(|t| {
        // Be lenient about parameters and case ("application/json; charset=utf-8").
        t.split(';').next().unwrap_or_default().trim()
    });
    match content_type {
        Some(t) if t.eq_ignore_ascii_case(CONTENT_TYPE) => {}
        _ => {
            return Err(CeleryError::UnsupportedContentType(
                properties.content_type.clone(),
            ))
        }
    }
    match properties.content_encoding.as_deref() {
        // kombu reads a missing encoding as utf-8.
        None => Ok(()),
        Some(e) if e.eq_ignore_ascii_case("utf-8") || e.eq_ignore_ascii_case("utf8") => Ok(()),
        Some(e) => Err(CeleryError::UnsupportedContentEncoding(e.to_owned())),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, CeleryError> {
    serde_json::from_slice(body).map_err(|e| CeleryError::InvalidJson(e.to_string()))
}

/// Encodes a task message as Celery 5 would send it.
pub fn encode(message: &TaskMessage) -> EncodedMessage {
    let mut headers = message.extra_headers.clone();
    headers.retain(|name, _| !TASK_HEADERS.contains(&name.as_str()));
    // A worker reads a missing argsrepr as "" but a null one as None (shown as "None" in its
    // logs and events), so these two are left out rather than sent as null.
    let reprs = [
        ("argsrepr", &message.argsrepr),
        ("kwargsrepr", &message.kwargsrepr),
    ];
    for (name, repr) in reprs {
        if let Some(repr) = repr {
            headers.insert(name.to_owned(), repr.clone().into());
        }
    }
    let fields: [(&str, Value); 13] = [
        ("lang", message.lang.clone().into()),
        ("task", message.task.clone().into()),
        ("id", message.id.clone().into()),
        ("root_id", or_null(message.root_id.clone())),
        ("parent_id", or_null(message.parent_id.clone())),
        ("group", or_null(message.group.clone())),
        ("retries", message.retries.into()),
        ("eta", or_null(message.eta.clone())),
        ("expires", or_null(message.expires.clone())),
        (
            "timelimit",
            Value::Array(vec![
                seconds(message.timelimit.hard),
                seconds(message.timelimit.soft),
            ]),
        ),
        ("origin", or_null(message.origin.clone())),
        ("shadow", or_null(message.shadow.clone())),
        ("ignore_result", or_null(message.ignore_result)),
    ];
    for (name, value) in fields {
        headers.insert(name.to_owned(), value);
    }

    let body = Value::Array(vec![
        Value::Array(message.args.clone()),
        Value::Object(message.kwargs.clone()),
        encode_embed(&message.embed),
    ]);

    EncodedMessage {
        headers,
        properties: Properties {
            correlation_id: Some(message.correlation_id.clone()),
            reply_to: message.reply_to.clone(),
            content_type: Some(CONTENT_TYPE.to_owned()),
            content_encoding: Some(CONTENT_ENCODING.to_owned()),
            delivery_mode: Some(message.delivery_mode),
            priority: message.priority,
            expiration: message.expiration.clone(),
        },
        body: json_text(&body),
    }
}

fn encode_embed(embed: &Embed) -> Value {
    let mut map: Map<String, Value> = embed
        .extra
        .iter()
        .filter(|(name, _)| !EMBED_FIELDS.contains(&name.as_str()))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    map.insert("callbacks".into(), or_null(embed.callbacks.clone()));
    map.insert("errbacks".into(), or_null(embed.errbacks.clone()));
    map.insert("chain".into(), or_null(embed.chain.clone()));
    map.insert("chord".into(), embed.chord.clone().unwrap_or(Value::Null));
    Value::Object(map)
}

/// Decodes a task message from its AMQP headers, properties and body.
///
/// Liberal where Celery is: only the `task` and `id` headers are required, every other header
/// may be missing or `null`, and the body's `embed` may be `null`. A body of just
/// `[args, kwargs]` is accepted too, although a Python worker would refuse it ([`encode`]
/// always writes all three).
pub fn decode(
    headers: &BTreeMap<String, Value>,
    properties: &Properties,
    body: &[u8],
) -> Result<TaskMessage, CeleryError> {
    check_content(properties)?;
    if let Some(compression) = headers.get("compression").filter(|v| !v.is_null()) {
        return Err(CeleryError::Compressed(compression.to_string()));
    }
    let body = parse_body(body)?;
    let looks_like_protocol_1 = body
        .as_object()
        .is_some_and(|b| b.contains_key("task") || b.contains_key("args"));

    let header = Headers(headers);
    let task = match header.string("task") {
        Err(CeleryError::MissingHeader(_)) if looks_like_protocol_1 => {
            return Err(CeleryError::ProtocolV1)
        }
        other => other?,
    };
    let id = header.string("id")?;

    let mut parts = match body {
        Value::Array(parts) if parts.len() == 2 || parts.len() == 3 => parts.into_iter(),
        _ if looks_like_protocol_1 => return Err(CeleryError::ProtocolV1),
        other => return Err(CeleryError::BodyShape(kind(&other))),
    };
    let args = match parts.next() {
        Some(Value::Array(args)) => args,
        other => return Err(CeleryError::ArgsNotArray(kind(&other.unwrap_or_default()))),
    };
    let kwargs = match parts.next() {
        Some(Value::Object(kwargs)) => kwargs,
        other => {
            return Err(CeleryError::KwargsNotObject(kind(
                &other.unwrap_or_default(),
            )))
        }
    };
    let embed = decode_embed(parts.next().unwrap_or_default())?;

    let non_empty = |value: &Option<String>| value.clone().filter(|v| !v.is_empty());
    Ok(TaskMessage {
        lang: header
            .optional_string("lang")?
            .unwrap_or_else(|| "py".into()),
        root_id: header.optional_string("root_id")?,
        parent_id: header.optional_string("parent_id")?,
        group: header.optional_string("group")?,
        retries: header.retries()?,
        eta: header.optional_string("eta")?,
        expires: header.optional_string("expires")?,
        timelimit: header.timelimit()?,
        argsrepr: header.optional_string("argsrepr")?,
        kwargsrepr: header.optional_string("kwargsrepr")?,
        origin: header.optional_string("origin")?,
        shadow: header.optional_string("shadow")?,
        ignore_result: header.optional_bool("ignore_result")?,
        extra_headers: headers
            .iter()
            .filter(|(name, _)| !TASK_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        correlation_id: non_empty(&properties.correlation_id).unwrap_or_else(|| id.clone()),
        reply_to: non_empty(&properties.reply_to),
        priority: properties.priority,
        delivery_mode: properties.delivery_mode.unwrap_or(TRANSIENT),
        expiration: properties.expiration.clone(),
        task,
        id,
        args,
        kwargs,
        embed,
    })
}

/// Typed reads of the headers table.
struct Headers<'a>(&'a BTreeMap<String, Value>);

impl Headers<'_> {
    /// The value, with `null` read as missing.
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn invalid(name: &str, expected: &'static str, found: &Value) -> CeleryError {
        CeleryError::InvalidHeader {
            name: name.to_owned(),
            expected,
            found: kind(found),
        }
    }

    fn string(&self, name: &'static str) -> Result<String, CeleryError> {
        match self.get(name) {
            None => Err(CeleryError::MissingHeader(name)),
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(other) => Err(Self::invalid(name, "a non-empty string", other)),
        }
    }

    fn optional_string(&self, name: &str) -> Result<Option<String>, CeleryError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(Self::invalid(name, "a string or null", other)),
        }
    }

    fn optional_bool(&self, name: &str) -> Result<Option<bool>, CeleryError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Self::invalid(name, "a boolean or null", other)),
        }
    }

    fn retries(&self) -> Result<u32, CeleryError> {
        match self.get("retries") {
            None => Ok(0),
            Some(value) => value
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| Self::invalid("retries", "a non-negative integer", value)),
        }
    }

    fn timelimit(&self) -> Result<TimeLimit, CeleryError> {
        const EXPECTED: &str = "[hard, soft] (numbers or nulls)";
        let limit = |value: &Value| match value {
            Value::Null => Ok(None),
            Value::Number(n) => Ok(n.as_f64()),
            other => Err(Self::invalid("timelimit", EXPECTED, other)),
        };
        match self.get("timelimit") {
            None => Ok(TimeLimit::default()),
            // Celery tests the header for truth: an empty list means no limits.
            Some(Value::Array(pair)) if pair.is_empty() => Ok(TimeLimit::default()),
            Some(Value::Array(pair)) if pair.len() == 2 => Ok(TimeLimit {
                hard: limit(&pair[0])?,
                soft: limit(&pair[1])?,
            }),
            Some(other) => Err(Self::invalid("timelimit", EXPECTED, other)),
        }
    }
}

fn decode_embed(embed: Value) -> Result<Embed, CeleryError> {
    let mut map = match embed {
        Value::Null => return Ok(Embed::default()),
        Value::Object(map) => map,
        other => {
            return Err(CeleryError::InvalidEmbed {
                field: None,
                expected: "an object or null",
                found: kind(&other),
            })
        }
    };
    let mut signatures = |field: &str| match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(other) => Err(CeleryError::InvalidEmbed {
            field: Some(field.to_owned()),
            expected: "an array of signatures or null",
            found: kind(&other),
        }),
    };
    let callbacks = signatures("callbacks")?;
    let errbacks = signatures("errbacks")?;
    let chain = signatures("chain")?;
    let chord = map.remove("chord").filter(|v| !v.is_null());
    Ok(Embed {
        callbacks,
        errbacks,
        chain,
        chord,
        extra: map.into_iter().collect(),
    })
}

/// A task state, as in `celery.states`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TaskState {
    Pending,
    Received,
    Started,
    Success,
    Failure,
    Retry,
    Revoked,
    /// Any other state, such as one a task sets with `update_state` (`"PROGRESS"`). Never one
    /// of the names above: [`TaskState::from_name`] maps those to their variant.
    Other(String),
}

impl TaskState {
    pub fn from_name(name: &str) -> Self {
        match name {
            "PENDING" => TaskState::Pending,
            "RECEIVED" => TaskState::Received,
            "STARTED" => TaskState::Started,
            "SUCCESS" => TaskState::Success,
            "FAILURE" => TaskState::Failure,
            "RETRY" => TaskState::Retry,
            "REVOKED" => TaskState::Revoked,
            other => TaskState::Other(other.to_owned()),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            TaskState::Pending => "PENDING",
            TaskState::Received => "RECEIVED",
            TaskState::Started => "STARTED",
            TaskState::Success => "SUCCESS",
            TaskState::Failure => "FAILURE",
            TaskState::Retry => "RETRY",
            TaskState::Revoked => "REVOKED",
            TaskState::Other(name) => name,
        }
    }

    /// The task is over (`celery.states.READY_STATES`): a client stops waiting.
    pub fn is_ready(&self) -> bool {
        matches!(
            self,
            TaskState::Success | TaskState::Failure | TaskState::Revoked
        )
    }

    /// The result is an exception (`celery.states.EXCEPTION_STATES`).
    pub fn is_exception(&self) -> bool {
        matches!(
            self,
            TaskState::Failure | TaskState::Retry | TaskState::Revoked
        )
    }
}

/// Builtin Python exception classes that take a single message. [`ExceptionInfo::new`] names
/// these with `exc_module: "builtins"`, so a Python client raises the real class (the Python
/// cross-check test verifies each one). `BaseException`-only classes (`SystemExit`,
/// `KeyboardInterrupt`, `GeneratorExit`), the iteration-protocol ones, and those whose
/// constructor wants more than a message (`UnicodeDecodeError`, `ExceptionGroup`) are left out
/// on purpose: they are recreated as plain exceptions of that name.
pub const PYTHON_BUILTIN_EXCEPTIONS: &[&str] = &[
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "BlockingIOError",
    "BrokenPipeError",
    "BufferError",
    "BytesWarning",
    "ChildProcessError",
    "ConnectionAbortedError",
    "ConnectionError",
    "ConnectionRefusedError",
    "ConnectionResetError",
    "DeprecationWarning",
    "EOFError",
    "EncodingWarning",
    "EnvironmentError",
    "Exception",
    "FileExistsError",
    "FileNotFoundError",
    "FloatingPointError",
    "FutureWarning",
    "IOError",
    "ImportError",
    "ImportWarning",
    "IndentationError",
    "IndexError",
    "InterruptedError",
    "IsADirectoryError",
    "KeyError",
    "LookupError",
    "MemoryError",
    "ModuleNotFoundError",
    "NameError",
    "NotADirectoryError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "PendingDeprecationWarning",
    "PermissionError",
    "ProcessLookupError",
    "RecursionError",
    "ReferenceError",
    "ResourceWarning",
    "RuntimeError",
    "RuntimeWarning",
    "SyntaxError",
    "SyntaxWarning",
    "SystemError",
    "TabError",
    "TimeoutError",
    "TypeError",
    "UnboundLocalError",
    "UnicodeError",
    "UnicodeWarning",
    "UserWarning",
    "ValueError",
];

/// An exception as Celery's JSON result encodes it.
#[derive(Clone, Debug, PartialEq)]
pub struct ExceptionInfo {
    /// The class name (`__qualname__`), e.g. `RuntimeError`.
    pub exc_type: String,
    /// The exception's `args`.
    pub exc_message: Vec<Value>,
    /// The module of the class, e.g. `builtins`; `None` makes Python recreate the class.
    pub exc_module: Option<String>,
}

impl ExceptionInfo {
    /// An exception of type `exc_type` with one message. A Python client raises the builtin
    /// class if `exc_type` is one of [`PYTHON_BUILTIN_EXCEPTIONS`] (`RuntimeError`, ...), and
    /// otherwise a new `Exception` subclass named `exc_type` (e.g. `HefringTaskFailed`).
    pub fn new(exc_type: impl Into<String>, message: impl Into<String>) -> Self {
        let exc_type = exc_type.into();
        let exc_module = PYTHON_BUILTIN_EXCEPTIONS
            .contains(&exc_type.as_str())
            .then(|| "builtins".to_owned());
        ExceptionInfo {
            exc_type,
            exc_message: vec![Value::String(message.into())],
            exc_module,
        }
    }

    pub fn to_value(&self) -> Value {
        serde_json::json!({
            "exc_type": self.exc_type,
            "exc_message": self.exc_message,
            "exc_module": self.exc_module,
        })
    }

    /// Reads an encoded exception; an `exc_message` that is not a list (older Celery) is
    /// taken as the only argument.
    pub fn from_value(value: &Value) -> Option<Self> {
        let exc_type = value.get("exc_type")?.as_str()?.to_owned();
        let exc_message = match value.get("exc_message") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(args)) => args.clone(),
            Some(other) => vec![other.clone()],
        };
        let exc_module = value
            .get("exc_module")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Some(ExceptionInfo {
            exc_type,
            exc_message,
            exc_module,
        })
    }
}

/// A task's state as the `rpc://` result backend sends it to the client's `reply_to` queue.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultMessage {
    pub task_id: String,
    pub status: TaskState,
    /// The return value for `SUCCESS`, an [`ExceptionInfo`] for the exception states, or
    /// whatever the task's own state carries (`STARTED`: `{"pid", "hostname"}`).
    pub result: Value,
    pub traceback: Option<String>,
    /// Results of the tasks this task sent, each `[[id, parent], null]`.
    pub children: Vec<Value>,
    /// When the task finished (ready states only), ISO 8601 in UTC like Python writes it.
    pub date_done: Option<String>,
    /// Any other member, kept as it is (`group_id`, `parent_id`, extended result fields).
    pub extra: BTreeMap<String, Value>,
}

impl ResultMessage {
    /// A task's state without a result and not done.
    pub fn new(task_id: impl Into<String>, status: TaskState, result: Value) -> Self {
        ResultMessage {
            task_id: task_id.into(),
            status,
            result,
            traceback: None,
            children: Vec::new(),
            date_done: None,
            extra: BTreeMap::new(),
        }
    }

    /// The task returned `result`; done now.
    pub fn success(task_id: impl Into<String>, result: Value) -> Self {
        ResultMessage {
            date_done: Some(now_iso8601()),
            ..ResultMessage::new(task_id, TaskState::Success, result)
        }
    }

    /// The task failed with an exception of type `exc_type` and `message`; done now. A Python
    /// `AsyncResult.get()` raises it: see [`ExceptionInfo::new`] for which class.
    pub fn failure(
        task_id: impl Into<String>,
        exc_type: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        let exception = ExceptionInfo::new(exc_type, message);
        ResultMessage {
            date_done: Some(now_iso8601()),
            ..ResultMessage::new(task_id, TaskState::Failure, exception.to_value())
        }
    }

    /// The exception of an exception state, if the result is one.
    pub fn exception(&self) -> Option<ExceptionInfo> {
        if self.status.is_exception() {
            ExceptionInfo::from_value(&self.result)
        } else {
            None
        }
    }
}

/// Now, as Python's `datetime.now(timezone.utc).isoformat()` writes it.
fn now_iso8601() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]+00:00"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .expect("a UTC time always formats")
}

/// Encodes a result as Celery's `rpc://` backend publishes it (to the task's `reply_to`).
pub fn encode_result(message: &ResultMessage) -> EncodedMessage {
    let mut body: Map<String, Value> = message
        .extra
        .iter()
        .filter(|(name, _)| !RESULT_FIELDS.contains(&name.as_str()))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    body.insert("task_id".into(), message.task_id.clone().into());
    body.insert("status".into(), message.status.name().into());
    body.insert("result".into(), message.result.clone());
    body.insert("traceback".into(), or_null(message.traceback.clone()));
    body.insert("children".into(), Value::Array(message.children.clone()));
    body.insert("date_done".into(), or_null(message.date_done.clone()));
    EncodedMessage {
        headers: BTreeMap::new(),
        properties: Properties {
            correlation_id: Some(message.task_id.clone()),
            content_type: Some(CONTENT_TYPE.to_owned()),
            content_encoding: Some(CONTENT_ENCODING.to_owned()),
            delivery_mode: Some(TRANSIENT),
            ..Properties::default()
        },
        body: json_text(&Value::Object(body)),
    }
}

/// Decodes a result message. The task id is the body's `task_id`, or else the
/// `correlation_id` property (the two are equal in every result Celery sends; its client
/// looks at the property first).
pub fn decode_result(properties: &Properties, body: &[u8]) -> Result<ResultMessage, CeleryError> {
    check_content(properties)?;
    let mut body = match parse_body(body)? {
        Value::Object(body) => body,
        other => return Err(CeleryError::ResultShape(kind(&other))),
    };
    let invalid =
        |name: &str, expected: &'static str, found: &Value| CeleryError::InvalidResultField {
            name: name.to_owned(),
            expected,
            found: kind(found),
        };
    let mut optional_string = |name: &str| match body.remove(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(name, "a string or null", &other)),
    };
    let status = optional_string("status")?.ok_or(CeleryError::MissingResultField("status"))?;
    let task_id = optional_string("task_id")?
        .or_else(|| properties.correlation_id.clone())
        .filter(|id| !id.is_empty())
        .ok_or(CeleryError::MissingResultField("task_id"))?;
    let traceback = optional_string("traceback")?;
    let date_done = optional_string("date_done")?;
    let children = match body.remove("children") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(children)) => children,
        Some(other) => return Err(invalid("children", "an array or null", &other)),
    };
    let result = body.remove("result").unwrap_or_default();
    Ok(ResultMessage {
        task_id,
        status: TaskState::from_name(&status),
        result,
        traceback,
        children,
        date_done,
        extra: body.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// A message captured from Python Celery by `tests/fixtures/capture.py`.
    #[derive(Deserialize)]
    struct Fixture {
        #[serde(default)]
        headers: BTreeMap<String, Value>,
        properties: Properties,
        /// The body exactly as kombu serialised it.
        body: String,
        produced_by: BTreeMap<String, String>,
    }

    fn fixture(text: &str) -> Fixture {
        let fixture: Fixture = serde_json::from_str(text).expect("fixture parses");
        assert!(
            fixture.produced_by["celery"].starts_with("5."),
            "{:?}",
            fixture.produced_by
        );
        fixture
    }

    macro_rules! fixture {
        ($name:literal) => {
            fixture(include_str!(concat!("../tests/fixtures/", $name)))
        };
    }

    fn decode_fixture(fixture: &Fixture) -> TaskMessage {
        decode(
            &fixture.headers,
            &fixture.properties,
            fixture.body.as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn parsed(body: &[u8]) -> Value {
        serde_json::from_slice(body).unwrap()
    }

    /// Re-encoding a decoded Celery message gives Celery's headers and body back, as JSON.
    fn assert_round_trips(fixture: &Fixture) {
        let encoded = encode(&decode_fixture(fixture));
        assert_eq!(encoded.headers, fixture.headers);
        assert_eq!(parsed(&encoded.body), parsed(fixture.body.as_bytes()));
    }

    /// ... and, for a published message, its properties (Celery's empty reply_to aside).
    fn assert_properties_round_trip(fixture: &Fixture) {
        let encoded = encode(&decode_fixture(fixture));
        let mut expected = fixture.properties.clone();
        expected.reply_to = expected.reply_to.filter(|r| !r.is_empty());
        assert_eq!(encoded.properties, expected);
    }

    #[test]
    fn decodes_send_task_with_kwargs_from_python_celery() {
        let fixture = fixture!("send_task_kwargs.json");
        let message = decode_fixture(&fixture);
        assert_eq!(message.id, "op_01JD3K6Z0000000000000000");
        assert_eq!(message.task, "hefring.project_verify");
        assert_eq!(message.args, Vec::<Value>::new());
        assert_eq!(
            Value::Object(message.kwargs.clone()),
            json!({"operation_id": "op_01JD3K6Z0000000000000000", "attempt": 1, "dry_run": false})
        );
        assert_eq!(message.embed, Embed::default());
        assert_eq!(message.lang, "py");
        assert_eq!(message.root_id.as_deref(), Some(message.id.as_str()));
        assert_eq!(message.parent_id, None);
        assert_eq!(message.group, None);
        assert_eq!(message.retries, 0);
        assert_eq!((message.eta.clone(), message.expires.clone()), (None, None));
        assert_eq!(message.timelimit, TimeLimit::default());
        assert_eq!(message.argsrepr.as_deref(), Some("()"));
        assert_eq!(
            message.kwargsrepr.as_deref(),
            Some("{'operation_id': 'op_01JD3K6Z0000000000000000', 'attempt': 1, 'dry_run': False}")
        );
        assert!(message.origin.as_deref().unwrap().starts_with("gen"));
        assert_eq!(message.shadow, None);
        assert_eq!(
            message.ignore_result, None,
            "send_task leaves it to the task"
        );
        assert_eq!(
            message.extra_headers.keys().collect::<Vec<_>>(),
            [
                "group_index",
                "replaced_task_nesting",
                "stamped_headers",
                "stamps"
            ]
        );
        assert_eq!(message.correlation_id, message.id);
        assert!(
            message.reply_to.is_some(),
            "send_task sets the client's reply queue"
        );
        assert_eq!(
            message.priority,
            Some(0),
            "kombu sends priority 0 by default"
        );
        assert_eq!(message.delivery_mode, PERSISTENT);
        assert_eq!(message.expiration, None);
        assert_round_trips(&fixture);
        assert_properties_round_trip(&fixture);
    }

    #[test]
    fn decodes_eta_expires_and_time_limits_from_python_celery() {
        let fixture = fixture!("with_eta_and_timelimit.json");
        let message = decode_fixture(&fixture);
        assert_eq!(message.task, "hefring.release_build");
        assert_eq!(
            message.args,
            vec![
                json!("op_01JD3K70000000000000000000"),
                json!(3.5),
                Value::Null,
                json!(["a", "ü"])
            ]
        );
        assert_eq!(
            Value::Object(message.kwargs.clone()),
            json!({"nested": {"list": [1, 2.25, true]}})
        );
        assert_eq!(
            message.eta.as_deref(),
            Some("2030-01-02T03:04:05.678901+00:00")
        );
        assert_eq!(
            message.expires.as_deref(),
            Some("2030-01-03T00:00:00+00:00")
        );
        // Celery's order is [hard, soft], whatever protocol.rst says.
        assert_eq!(
            message.timelimit,
            TimeLimit {
                hard: Some(300.0),
                soft: Some(240.5)
            }
        );
        assert_eq!(message.retries, 2);
        assert_eq!(
            message.shadow.as_deref(),
            Some("hefring.release_build(prj_1)")
        );
        assert_eq!(message.ignore_result, Some(true));
        assert_eq!(message.root_id.as_deref(), Some("op_root"));
        assert_eq!(message.parent_id.as_deref(), Some("op_parent"));
        assert_eq!(message.group.as_deref(), Some("grp_1"));
        assert_eq!(message.extra_headers["group_index"], json!(4));
        assert_eq!(message.priority, Some(7));
        let ttl: u64 = message.expiration.as_deref().unwrap().parse().unwrap();
        assert!(ttl > 0, "expires also becomes an AMQP TTL in milliseconds");
        assert_round_trips(&fixture);
        assert_properties_round_trip(&fixture);
    }

    #[test]
    fn decodes_a_chain_with_link_and_link_error_from_python_celery() {
        let fixture = fixture!("chain_embed.json");
        let message = decode_fixture(&fixture);
        assert_eq!(message.task, "hefring.step_one");
        assert_eq!(message.args, vec![json!(1)]);
        let chain = message.embed.chain.as_ref().unwrap();
        let names: Vec<_> = chain.iter().map(|s| s["task"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["hefring.step_three", "hefring.step_two"],
            "the chain travels last task first"
        );
        assert_eq!(chain[0]["kwargs"], json!({"k": "v"}));
        assert_eq!(chain[0]["options"]["link"][0]["task"], "hefring.on_success");
        assert_eq!(
            message.embed.callbacks, None,
            "link belongs to the chain's last task"
        );
        let errbacks = message.embed.errbacks.as_ref().unwrap();
        assert_eq!(errbacks[0]["task"], "hefring.on_error");
        assert_eq!(message.embed.chord, None);
        assert_round_trips(&fixture);
        assert_properties_round_trip(&fixture);
    }

    #[test]
    fn decodes_a_group_member_from_python_celery() {
        let fixture = fixture!("group_member.json");
        let message = decode_fixture(&fixture);
        assert_eq!(message.id, "op_member_1");
        assert!(message.group.is_some());
        assert_eq!(message.extra_headers["group_index"], json!(1));
        assert_eq!(message.argsrepr.as_deref(), Some("(1,)"));
        assert_round_trips(&fixture);
        assert_properties_round_trip(&fixture);
    }

    #[test]
    fn decodes_as_task_v2_output() {
        let fixture = fixture!("as_task_v2.json");
        let message = decode_fixture(&fixture);
        assert_eq!(message.id, "op_01JD3K71000000000000000000");
        assert_eq!(message.task, "hefring.target_verify");
        assert_eq!(message.args, vec![json!(1), json!(1)]);
        assert_eq!(message.retries, 1);
        assert_eq!(
            message.timelimit,
            TimeLimit {
                hard: Some(60.0),
                soft: None
            }
        );
        assert_eq!(message.ignore_result, Some(false));
        assert_eq!(message.origin.as_deref(), Some("gen42@hefring-test"));
        assert_eq!(
            message.reply_to, None,
            "as_task_v2 writes \"\" for no reply queue"
        );
        assert_eq!(
            message.delivery_mode, TRANSIENT,
            "not published: no delivery mode"
        );
        assert_round_trips(&fixture);
    }

    #[test]
    fn a_protocol_1_message_is_refused_with_a_clear_error() {
        let fixture = fixture!("protocol1.json");
        let error = decode(
            &fixture.headers,
            &fixture.properties,
            fixture.body.as_bytes(),
        )
        .unwrap_err();
        assert_eq!(error, CeleryError::ProtocolV1);
        assert!(error.to_string().contains("protocol 1 is not supported"));
    }

    fn result_fixture(fixture: &Fixture) -> ResultMessage {
        assert!(
            fixture.headers.is_empty(),
            "rpc:// results carry no headers"
        );
        assert_eq!(fixture.properties.delivery_mode, Some(TRANSIENT));
        let result = decode_result(&fixture.properties, fixture.body.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            fixture.properties.correlation_id.as_deref(),
            Some(result.task_id.as_str())
        );
        // Re-encoded: the same body as JSON, and the same properties (kombu's priority aside).
        let encoded = encode_result(&result);
        assert_eq!(parsed(&encoded.body), parsed(fixture.body.as_bytes()));
        let mut expected = fixture.properties.clone();
        expected.priority = None;
        assert_eq!(encoded.properties, expected);
        result
    }

    fn assert_python_time(date_done: &str) {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond]+00:00"
        );
        time::PrimitiveDateTime::parse(date_done, &format)
            .unwrap_or_else(|e| panic!("{date_done}: {e}"));
    }

    #[test]
    fn decodes_a_success_result_from_python_celery() {
        let result = result_fixture(&fixture!("result_success.json"));
        assert_eq!(result.task_id, "op_result_ok");
        assert_eq!(result.status, TaskState::Success);
        assert_eq!(result.result, json!({"verdict": "ok", "checks": [1, 2, 3]}));
        assert_eq!(result.traceback, None);
        assert_eq!(result.children, vec![json!([["op_child_1", null], null])]);
        assert_python_time(result.date_done.as_deref().unwrap());
        assert_eq!(result.exception(), None);
        assert!(result.extra.is_empty());
    }

    #[test]
    fn decodes_a_failure_result_from_python_celery() {
        let result = result_fixture(&fixture!("result_failure.json"));
        assert_eq!(result.status, TaskState::Failure);
        assert_eq!(
            result.exception(),
            Some(ExceptionInfo {
                exc_type: "RuntimeError".into(),
                exc_message: vec![json!("target unreachable: ssh exited 255")],
                exc_module: Some("builtins".into()),
            })
        );
        assert!(result
            .traceback
            .as_deref()
            .unwrap()
            .ends_with("RuntimeError: target unreachable: ssh exited 255\n"));
        assert_python_time(result.date_done.as_deref().unwrap());
    }

    #[test]
    fn failure_encodes_what_python_celery_sends_for_the_same_exception() {
        let fixture = fixture!("result_failure.json");
        let python = decode_result(&fixture.properties, fixture.body.as_bytes()).unwrap();
        let rust = ResultMessage::failure(
            "op_result_failed",
            "RuntimeError",
            "target unreachable: ssh exited 255",
        );
        assert_eq!(rust.result, python.result);
        assert_eq!(
            ResultMessage {
                traceback: python.traceback.clone(),
                date_done: python.date_done.clone(),
                ..rust.clone()
            },
            python
        );
        assert_eq!(encode_result(&rust).properties, {
            let mut properties = fixture.properties.clone();
            properties.priority = None;
            properties
        });
        assert_python_time(rust.date_done.as_deref().unwrap());
    }

    #[test]
    fn decodes_a_failure_with_a_custom_exception_and_parent_from_python_celery() {
        let result = result_fixture(&fixture!("result_failure_custom.json"));
        let exception = result.exception().unwrap();
        assert_eq!(exception.exc_type, "HefringCaptureError");
        assert_eq!(exception.exc_message, vec![json!("custom"), json!(42)]);
        assert_eq!(exception.exc_module.as_deref(), Some("__main__"));
        assert_eq!(result.extra["group_id"], json!("grp_1"));
        assert_eq!(result.extra["parent_id"], json!("op_parent"));
    }

    #[test]
    fn decodes_started_and_retry_results_from_python_celery() {
        let started = result_fixture(&fixture!("result_started.json"));
        assert_eq!(started.status, TaskState::Started);
        assert_eq!(
            started.result,
            json!({"pid": 4242, "hostname": "celery@hefring-test"})
        );
        assert_eq!(started.date_done, None, "only ready states are dated");
        assert!(!started.status.is_ready());

        let retry = result_fixture(&fixture!("result_retry.json"));
        assert_eq!(retry.status, TaskState::Retry);
        assert_eq!(retry.exception().unwrap().exc_type, "ValueError");
        assert!(!retry.status.is_ready() && retry.status.is_exception());
    }

    #[test]
    fn failure_names_builtins_only_for_builtin_exception_classes() {
        let builtin = ExceptionInfo::new("ValueError", "bad");
        assert_eq!(builtin.exc_module.as_deref(), Some("builtins"));
        assert_eq!(builtin.exc_message, vec![json!("bad")]);
        for name in ["HefringTaskFailed", "SystemExit", "print", "eval"] {
            assert_eq!(ExceptionInfo::new(name, "m").exc_module, None, "{name}");
        }
        assert_eq!(
            ExceptionInfo::new("TimeoutError", "slow").to_value(),
            json!({"exc_type": "TimeoutError", "exc_message": ["slow"], "exc_module": "builtins"})
        );
    }

    // --- What Rust encodes ------------------------------------------------------------------

    fn headers(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.clone()))
            .collect()
    }

    fn json_properties() -> Properties {
        Properties {
            content_type: Some(CONTENT_TYPE.into()),
            content_encoding: Some(CONTENT_ENCODING.into()),
            ..Properties::default()
        }
    }

    #[test]
    fn encodes_every_header_like_celery_does() {
        let message = TaskMessage {
            args: vec![json!(1), json!(1)],
            ..TaskMessage::new("op_1", "hefring.system_noop")
        };
        let encoded = encode(&message);
        assert_eq!(
            Value::Object(encoded.headers.clone().into_iter().collect()),
            json!({
                "lang": "py", "task": "hefring.system_noop", "id": "op_1", "root_id": "op_1",
                "parent_id": null, "group": null, "retries": 0, "eta": null, "expires": null,
                "timelimit": [null, null], "origin": null, "shadow": null,
                "ignore_result": null,
            })
        );
        assert_eq!(
            parsed(&encoded.body),
            json!([[1, 1], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}])
        );
        assert_eq!(
            encoded.properties,
            Properties {
                correlation_id: Some("op_1".into()),
                reply_to: None,
                delivery_mode: Some(PERSISTENT),
                priority: None,
                expiration: None,
                ..json_properties()
            }
        );
    }

    #[test]
    fn whole_second_time_limits_are_written_as_integers() {
        let message = TaskMessage {
            timelimit: TimeLimit {
                hard: Some(300.0),
                soft: Some(0.5),
            },
            ..TaskMessage::new("op_1", "t")
        };
        assert_eq!(encode(&message).headers["timelimit"], json!([300, 0.5]));
    }

    #[test]
    fn typed_fields_win_over_extra_headers_and_embed_members_of_the_same_name() {
        let mut message = TaskMessage::new("op_1", "t");
        message
            .extra_headers
            .insert("task".into(), json!("something else"));
        message.extra_headers.insert("x-kept".into(), json!(1));
        message.embed.extra.insert("chain".into(), json!("no"));
        let encoded = encode(&message);
        assert_eq!(encoded.headers["task"], json!("t"));
        assert_eq!(encoded.headers["x-kept"], json!(1));
        assert_eq!(parsed(&encoded.body)[2]["chain"], Value::Null);
    }

    #[test]
    fn a_minimal_message_decodes_with_defaults() {
        // What the lab notes found a Python worker runs: only task and id, embed empty.
        let message = decode(
            &headers(&[("task", json!("hefring.noop")), ("id", json!("op_1"))]),
            &json_properties(),
            b"[[1,1],{},{}]",
        )
        .unwrap();
        assert_eq!(
            message,
            TaskMessage {
                args: vec![json!(1), json!(1)],
                root_id: None,
                delivery_mode: TRANSIENT,
                ..TaskMessage::new("op_1", "hefring.noop")
            }
        );
        // protocol.rst's own example: embed null; and no embed at all.
        for body in [&b"[[1,1],{},null]"[..], b"[[1,1],{}]"] {
            let message = decode(
                &headers(&[("task", json!("t")), ("id", json!("op_1"))]),
                &json_properties(),
                body,
            )
            .unwrap();
            assert_eq!(message.embed, Embed::default());
        }
        // Null headers are missing headers, and a missing content encoding is utf-8.
        let message = decode(
            &headers(&[
                ("task", json!("t")),
                ("id", json!("op_1")),
                ("lang", Value::Null),
                ("retries", Value::Null),
                ("timelimit", json!([])),
            ]),
            &Properties {
                content_encoding: None,
                correlation_id: Some(String::new()),
                reply_to: Some(String::new()),
                ..json_properties()
            },
            b"[[],{},{}]",
        )
        .unwrap();
        assert_eq!(message.lang, "py");
        assert_eq!(message.retries, 0);
        assert_eq!(message.timelimit, TimeLimit::default());
        assert_eq!(message.correlation_id, "op_1");
        assert_eq!(message.reply_to, None);
    }

    #[test]
    fn content_type_and_encoding_are_checked() {
        let ok_headers = headers(&[("task", json!("t")), ("id", json!("op_1"))]);
        let body = b"[[],{},{}]";
        let with = |content_type: Option<&str>, content_encoding: Option<&str>| {
            decode(
                &ok_headers,
                &Properties {
                    content_type: content_type.map(Into::into),
                    content_encoding: content_encoding.map(Into::into),
                    ..Properties::default()
                },
                body,
            )
        };
        assert!(with(Some("application/json"), Some("utf-8")).is_ok());
        assert!(with(Some("Application/JSON; charset=utf-8"), Some("UTF8")).is_ok());
        assert_eq!(
            with(Some("application/x-python-serialize"), Some("binary")).unwrap_err(),
            CeleryError::UnsupportedContentType(Some("application/x-python-serialize".into()))
        );
        let missing = with(None, None).unwrap_err();
        assert_eq!(missing, CeleryError::UnsupportedContentType(None));
        assert!(missing.to_string().contains("(none given)"), "{missing}");
        assert_eq!(
            with(Some("application/json"), Some("latin-1")).unwrap_err(),
            CeleryError::UnsupportedContentEncoding("latin-1".into())
        );
    }

    fn invalid_header(name: &str, expected: &'static str, found: &str) -> CeleryError {
        CeleryError::InvalidHeader {
            name: name.into(),
            expected,
            found: found.into(),
        }
    }

    #[test]
    fn each_decode_error_is_specific() {
        let error_for = |headers: Value, body: &str| {
            let headers = serde_json::from_value(headers).unwrap();
            decode(&headers, &json_properties(), body.as_bytes()).unwrap_err()
        };
        let ok = || json!({"task": "t", "id": "op_1"});
        let with = |name: &str, value: Value| {
            let mut headers = ok();
            headers[name] = value;
            headers
        };
        let body = "[[],{},{}]";
        let cases = [
            (
                json!({"id": "op_1"}),
                body,
                CeleryError::MissingHeader("task"),
            ),
            (json!({"task": "t"}), body, CeleryError::MissingHeader("id")),
            (
                with("id", Value::Null),
                body,
                CeleryError::MissingHeader("id"),
            ),
            (
                with("task", json!(7)),
                body,
                invalid_header("task", "a non-empty string", "a number"),
            ),
            (
                with("id", json!("")),
                body,
                invalid_header("id", "a non-empty string", "a string"),
            ),
            (
                // What task_protocol = 1 sends: no headers, everything in the body.
                json!({}),
                r#"{"task": "t", "id": "op_1", "args": [], "kwargs": {}}"#,
                CeleryError::ProtocolV1,
            ),
            (
                // A hybrid: protocol 2 headers with a protocol 1 body.
                ok(),
                r#"{"args": [], "kwargs": {}}"#,
                CeleryError::ProtocolV1,
            ),
            (ok(), "{}", CeleryError::BodyShape("an object".into())),
            (
                ok(),
                "[[]]",
                CeleryError::BodyShape("an array of 1 elements".into()),
            ),
            (
                ok(),
                "[[], {}, {}, {}]",
                CeleryError::BodyShape("an array of 4 elements".into()),
            ),
            (
                ok(),
                "[{}, {}, {}]",
                CeleryError::ArgsNotArray("an object".into()),
            ),
            (
                ok(),
                "[[], [], {}]",
                CeleryError::KwargsNotObject("an array of 0 elements".into()),
            ),
            (
                ok(),
                "[[], {}, []]",
                CeleryError::InvalidEmbed {
                    field: None,
                    expected: "an object or null",
                    found: "an array of 0 elements".into(),
                },
            ),
            (
                ok(),
                r#"[[], {}, {"chain": "next"}]"#,
                CeleryError::InvalidEmbed {
                    field: Some("chain".into()),
                    expected: "an array of signatures or null",
                    found: "a string".into(),
                },
            ),
            (
                with("retries", json!(-1)),
                body,
                invalid_header("retries", "a non-negative integer", "a number"),
            ),
            (
                with("timelimit", json!([1, 2, 3])),
                body,
                invalid_header(
                    "timelimit",
                    "[hard, soft] (numbers or nulls)",
                    "an array of 3 elements",
                ),
            ),
            (
                with("timelimit", json!(["1", null])),
                body,
                invalid_header("timelimit", "[hard, soft] (numbers or nulls)", "a string"),
            ),
            (
                with("eta", json!(1)),
                body,
                invalid_header("eta", "a string or null", "a number"),
            ),
            (
                with("ignore_result", json!("yes")),
                body,
                invalid_header("ignore_result", "a boolean or null", "a string"),
            ),
            (
                with("compression", json!("application/x-gzip")),
                "not JSON: compressed",
                CeleryError::Compressed("\"application/x-gzip\"".into()),
            ),
        ];
        for (headers, body, expected) in cases {
            assert_eq!(
                error_for(headers.clone(), body),
                expected,
                "{headers} {body}"
            );
        }
        assert!(matches!(
            error_for(ok(), "[[], {}"),
            CeleryError::InvalidJson(_)
        ));
        assert_eq!(
            error_for(ok(), "[{}, {}, {}]").to_string(),
            "task args (the body's first element) must be an array, found an object"
        );
        assert_eq!(
            error_for(ok(), r#"[[], {}, {"chain": 1}]"#).to_string(),
            "embed.chain must be an array of signatures or null, found a number"
        );
        assert_eq!(
            error_for(with("retries", json!(1.5)), body).to_string(),
            "header \"retries\" must be a non-negative integer, found a number"
        );
    }

    #[test]
    fn each_result_decode_error_is_specific() {
        let props = json_properties();
        let cases = [
            (
                "[]",
                CeleryError::ResultShape("an array of 0 elements".into()),
            ),
            (
                r#"{"task_id": "x"}"#,
                CeleryError::MissingResultField("status"),
            ),
            (
                r#"{"status": "SUCCESS"}"#,
                CeleryError::MissingResultField("task_id"),
            ),
            (
                r#"{"status": "SUCCESS", "task_id": "x", "children": {}}"#,
                CeleryError::InvalidResultField {
                    name: "children".into(),
                    expected: "an array or null",
                    found: "an object".into(),
                },
            ),
            (
                r#"{"status": 1, "task_id": "x"}"#,
                CeleryError::InvalidResultField {
                    name: "status".into(),
                    expected: "a string or null",
                    found: "a number".into(),
                },
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(
                decode_result(&props, body.as_bytes()).unwrap_err(),
                expected,
                "{body}"
            );
        }
        assert_eq!(
            decode_result(&Properties::default(), b"{}").unwrap_err(),
            CeleryError::UnsupportedContentType(None)
        );
        // The task id may come from the correlation id alone; missing members default.
        let result = decode_result(
            &Properties {
                correlation_id: Some("op_9".into()),
                ..json_properties()
            },
            br#"{"status": "PROGRESS", "result": {"done": 3}, "children": null}"#,
        )
        .unwrap();
        assert_eq!(result.task_id, "op_9");
        assert_eq!(result.status, TaskState::Other("PROGRESS".into()));
        assert_eq!(result.children, Vec::<Value>::new());
        assert_eq!((result.traceback, result.date_done), (None, None));
    }

    // --- Property tests ---------------------------------------------------------------------

    /// Floats that parse back exactly without serde_json's `float_roundtrip` (see the module
    /// documentation): few significant digits.
    fn float() -> impl Strategy<Value = f64> {
        (any::<i16>(), 0..7i32).prop_map(|(m, e)| f64::from(m) / f64::from(2i32.pow(e as u32)))
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            float().prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn text() -> impl Strategy<Value = String> {
        ".{1,12}"
    }

    fn signatures() -> impl Strategy<Value = Option<Vec<Value>>> {
        prop::option::of(prop::collection::vec(json_value(), 0..3))
    }

    fn embed() -> impl Strategy<Value = Embed> {
        (
            signatures(),
            signatures(),
            signatures(),
            prop::option::of(json_value().prop_filter("null is no chord", |v| !v.is_null())),
            prop::collection::btree_map("x-[a-z]{1,6}", json_value(), 0..2),
        )
            .prop_map(|(callbacks, errbacks, chain, chord, extra)| Embed {
                callbacks,
                errbacks,
                chain,
                chord,
                extra,
            })
    }

    fn task_message() -> impl Strategy<Value = TaskMessage> {
        let identity = (
            text(),
            text(),
            text(),
            text(),
            prop::option::of(text()),
            prop::option::of(text()),
            prop::option::of(text()),
        );
        let payload = (
            prop::collection::vec(json_value(), 0..4),
            prop::collection::btree_map(".{0,8}", json_value(), 0..4),
            embed(),
            prop::collection::btree_map("x-[a-z]{1,8}", json_value(), 0..3),
        );
        let scheduling = (
            any::<u32>(),
            prop::option::of(text()),
            prop::option::of(text()),
            prop::option::of(float().prop_map(f64::abs)),
            prop::option::of(float().prop_map(f64::abs)),
            prop::option::of(any::<bool>()),
        );
        let descriptive = (
            prop::option::of(".{0,12}"),
            prop::option::of(".{0,12}"),
            prop::option::of(text()),
            prop::option::of(text()),
        );
        let properties = (
            prop::option::of(text()),
            prop::option::of(any::<u8>()),
            1..=2u8,
            prop::option::of("[0-9]{1,9}"),
        );
        (identity, payload, scheduling, descriptive, properties).prop_map(
            |(
                (id, task, lang, correlation_id, root_id, parent_id, group),
                (args, kwargs, embed, extra_headers),
                (retries, eta, expires, hard, soft, ignore_result),
                (argsrepr, kwargsrepr, origin, shadow),
                (reply_to, priority, delivery_mode, expiration),
            )| TaskMessage {
                id,
                task,
                args,
                kwargs: kwargs.into_iter().collect(),
                embed,
                lang,
                root_id,
                parent_id,
                group,
                retries,
                eta,
                expires,
                timelimit: TimeLimit { hard, soft },
                argsrepr,
                kwargsrepr,
                origin,
                shadow,
                ignore_result,
                extra_headers,
                correlation_id,
                reply_to,
                priority,
                delivery_mode,
                expiration,
            },
        )
    }

    fn task_state() -> impl Strategy<Value = TaskState> {
        prop_oneof![
            Just(TaskState::Pending),
            Just(TaskState::Received),
            Just(TaskState::Started),
            Just(TaskState::Success),
            Just(TaskState::Failure),
            Just(TaskState::Retry),
            Just(TaskState::Revoked),
            "[A-Z_]{1,10}".prop_map(|name| TaskState::from_name(&name)),
        ]
    }

    fn result_message() -> impl Strategy<Value = ResultMessage> {
        (
            text(),
            task_state(),
            json_value(),
            prop::option::of(".{0,40}"),
            prop::collection::vec(json_value(), 0..3),
            prop::option::of(text()),
            prop::collection::btree_map("x-[a-z]{1,8}", json_value(), 0..3),
        )
            .prop_map(
                |(task_id, status, result, traceback, children, date_done, extra)| ResultMessage {
                    task_id,
                    status,
                    result,
                    traceback,
                    children,
                    date_done,
                    extra,
                },
            )
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(message in task_message()) {
            let encoded = encode(&message);
            let decoded = decode(&encoded.headers, &encoded.properties, &encoded.body);
            prop_assert_eq!(decoded, Ok(message));
        }

        #[test]
        fn encode_inverts_decode_for_what_encode_writes(message in task_message()) {
            let encoded = encode(&message);
            let decoded = decode(&encoded.headers, &encoded.properties, &encoded.body).unwrap();
            prop_assert_eq!(encode(&decoded), encoded);
        }

        #[test]
        fn decode_result_inverts_encode_result(message in result_message()) {
            let encoded = encode_result(&message);
            prop_assert!(encoded.headers.is_empty());
            prop_assert_eq!(
                encoded.properties.correlation_id.as_deref(),
                Some(message.task_id.as_str())
            );
            prop_assert_eq!(decode_result(&encoded.properties, &encoded.body), Ok(message));
        }

        #[test]
        fn task_states_round_trip_through_their_names(state in task_state()) {
            prop_assert_eq!(TaskState::from_name(state.name()), state);
        }

        #[test]
        fn decode_never_panics_on_arbitrary_input(
            headers in prop::collection::btree_map(
                prop_oneof![Just("task".to_owned()), Just("id".to_owned()), ".{0,6}"],
                json_value(),
                0..6,
            ),
            body in prop_oneof![
                json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
                prop::collection::vec(any::<u8>(), 0..32),
            ],
        ) {
            let _ = decode(&headers, &json_properties(), &body);
            let _ = decode_result(&json_properties(), &body);
        }
    }

    // --- Python Celery reads what Rust writes -------------------------------------------------

    /// Python with Celery installed, once per test process (pip works on these machines).
    fn python_with_celery() {
        static READY: std::sync::Once = std::sync::Once::new();
        READY.call_once(|| {
            let has_celery = std::process::Command::new("python3")
                .args(["-c", "import celery"])
                .status()
                .expect("python3 must be installed to cross-check the Celery codec")
                .success();
            if !has_celery {
                let status = std::process::Command::new("python3")
                    .args(["-m", "pip", "install", "-q", "celery"])
                    .status()
                    .expect("pip runs");
                assert!(status.success(), "pip install celery failed");
            }
        });
    }

    fn task_case(name: &str, encoded: &EncodedMessage, message: &TaskMessage) -> Value {
        json!({
            "name": name,
            "headers": encoded.headers,
            "properties": encoded.properties,
            "body": String::from_utf8(encoded.body.clone()).unwrap(),
            "expect": task_expectations(message),
        })
    }

    /// What Python should see, from the message's fields (not from the encoding).
    fn task_expectations(message: &TaskMessage) -> Value {
        let limit = |s: Option<f64>| s.map_or(Value::Null, Value::from);
        json!({
            "id": message.id,
            "task": message.task,
            "shadow": message.shadow,
            "args": message.args,
            "kwargs": message.kwargs,
            "root_id": message.root_id,
            "parent_id": message.parent_id,
            "group": message.group,
            "retries": message.retries,
            "eta": message.eta,
            "expires": message.expires,
            "time_limits": [limit(message.timelimit.hard), limit(message.timelimit.soft)],
            "argsrepr": message.argsrepr,
            "kwargsrepr": message.kwargsrepr,
            "origin": message.origin,
            "ignore_result": message.ignore_result,
            "reply_to": message.reply_to,
            "correlation_id": message.correlation_id,
            "priority": message.priority,
            "callbacks": message.embed.callbacks,
            "errbacks": message.embed.errbacks,
            "chain": message.embed.chain,
            "chord": message.embed.chord,
            "extra_headers": message.extra_headers,
        })
    }

    fn result_case(name: &str, message: &ResultMessage) -> Value {
        let encoded = encode_result(message);
        let mut expect = json!({
            "task_id": message.task_id,
            "status": message.status.name(),
            "traceback": message.traceback,
            "children": message.children,
            "date_done": message.date_done,
        });
        match message.exception() {
            Some(exception) => {
                expect["exception"] = json!({
                    "type": exception.exc_type,
                    "args": exception.exc_message,
                    "builtin": exception.exc_module.as_deref() == Some("builtins"),
                })
            }
            None => expect["result"] = message.result.clone(),
        }
        json!({
            "name": name,
            "headers": encoded.headers,
            "properties": encoded.properties,
            "body": String::from_utf8(encoded.body).unwrap(),
            "expect": expect,
        })
    }

    fn kwargs(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("kwargs must be an object"),
        }
    }

    #[test]
    fn python_celery_accepts_what_rust_encodes() {
        python_with_celery();
        let mut tasks = Vec::new();

        // The lab notes' minimal message: only the task and id headers, as Rust decodes it.
        let minimal = EncodedMessage {
            headers: headers(&[("task", json!("hefring.noop")), ("id", json!("op_minimal"))]),
            properties: json_properties(),
            body: b"[[1,1],{},{}]".to_vec(),
        };
        let decoded = decode(&minimal.headers, &minimal.properties, &minimal.body).unwrap();
        tasks.push(task_case("minimal (task and id only)", &minimal, &decoded));

        let plain = TaskMessage {
            args: vec![json!(1), json!(1)],
            ..TaskMessage::new("op_plain", "hefring.system_noop")
        };
        tasks.push(task_case("TaskMessage::new", &encode(&plain), &plain));

        let mut full = TaskMessage {
            args: vec![
                json!("op_full"),
                json!(3.5),
                Value::Null,
                json!(["ü", {"k": [1]}]),
            ],
            kwargs: kwargs(json!({"operation_id": "op_full", "dry_run": false, "n": 7})),
            root_id: Some("op_root".into()),
            parent_id: Some("op_parent".into()),
            group: Some("grp_1".into()),
            retries: 2,
            eta: Some("2030-01-02T03:04:05.678901+00:00".into()),
            expires: Some("2099-01-03T00:00:00+00:00".into()),
            timelimit: TimeLimit {
                hard: Some(300.0),
                soft: Some(240.5),
            },
            argsrepr: Some("['op_full', 3.5, None, ['ü', {'k': [1]}]]".into()),
            kwargsrepr: Some("{'operation_id': 'op_full'}".into()),
            origin: Some("hefring@test".into()),
            shadow: Some("hefring.project_verify(prj_1)".into()),
            ignore_result: Some(false),
            reply_to: Some("hefring.reply.1".into()),
            priority: Some(5),
            expiration: Some("60000".into()),
            ..TaskMessage::new("op_full", "hefring.project_verify")
        };
        full.extra_headers
            .insert("x-hefring-attempt".into(), json!(3));
        tasks.push(task_case("every field", &encode(&full), &full));

        // A chain (last task first) with a link callback: the worker sends the callback,
        // then the chain's next task with the rest of the chain.
        let step_three = signature("hefring.step_three", vec![], kwargs(json!({"k": "v"})));
        let step_two = signature("hefring.step_two", vec![json!(2)], Map::new());
        let on_success = signature("hefring.on_success", vec![], Map::new());
        let mut chained = TaskMessage {
            args: vec![json!(1)],
            ..TaskMessage::new("op_chain_1", "hefring.step_one")
        };
        chained.embed = Embed {
            callbacks: Some(vec![on_success]),
            errbacks: Some(vec![signature("hefring.on_error", vec![], Map::new())]),
            chain: Some(vec![step_three.clone(), step_two]),
            ..Embed::default()
        };
        let mut case = task_case("chain and link", &encode(&chained), &chained);
        case["expect"]["next"] = json!([
            {"task": "hefring.on_success", "args": [], "chain": null},
            {"task": "hefring.step_two", "args": [2], "chain": [step_three]},
        ]);
        tasks.push(case);

        let mut traceback = ResultMessage::failure("op_f_tb", "ValueError", "bad ref");
        traceback.traceback =
            Some("Traceback (most recent call last):\nValueError: bad ref\n".into());
        let results = vec![
            result_case(
                "success",
                &ResultMessage {
                    children: vec![json!([["op_child", null], null])],
                    ..ResultMessage::success("op_ok", json!({"verdict": "ok", "n": [1, 2.5]}))
                },
            ),
            result_case(
                "failure with a builtin class",
                &ResultMessage::failure("op_f_builtin", "RuntimeError", "ssh exited 255"),
            ),
            result_case(
                "failure with a Hefring class",
                &ResultMessage::failure("op_f_custom", "HefringTaskFailed", "build failed: ü"),
            ),
            result_case(
                "failure named like a non-Exception builtin",
                &ResultMessage::failure("op_f_exit", "SystemExit", "not an exit"),
            ),
            result_case("failure with a traceback", &traceback),
            result_case(
                "started",
                &ResultMessage::new(
                    "op_started",
                    TaskState::Started,
                    json!({"pid": 1, "hostname": "hefring@test"}),
                ),
            ),
            result_case(
                "retry",
                &ResultMessage::new(
                    "op_retry",
                    TaskState::Retry,
                    ExceptionInfo::new("TimeoutError", "again").to_value(),
                ),
            ),
            result_case(
                "custom state",
                &ResultMessage::new(
                    "op_progress",
                    TaskState::Other("PROGRESS".into()),
                    json!({"done": 3}),
                ),
            ),
        ];

        let cases = json!({
            "tasks": tasks,
            "results": results,
            "builtin_exceptions": PYTHON_BUILTIN_EXCEPTIONS,
        });
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("rust-encoded.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&cases).unwrap()).unwrap();
        let check = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/check.py");
        let output = std::process::Command::new("python3")
            .arg(check)
            .arg(&file)
            .output()
            .expect("python3 runs");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        println!("{report}");
        assert!(output.status.success(), "check.py failed:\n{report}");
        assert!(report.contains(" 0 failed"), "{report}");
    }
}
