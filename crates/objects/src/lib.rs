//! Where release artifacts and backups live: a store of immutable blobs under validated keys.
//!
//! A build runs on one worker, the deploy that unpacks its artifact may run on another, and a
//! backup taken on one worker must be restorable from any other (or after the first is gone).
//! So artifacts and backups cannot live on a worker's own disk: they go to a store every worker
//! reaches, either a directory (local for a single-machine installation, or an NFS share) or
//! any S3-compatible bucket (AWS, MinIO, Ceph, Garage, ...). [`open_store`] picks the backend
//! from a spec string; see [`S3Config::parse`] for the `s3://` syntax.
//!
//! Objects are written once and read many times: an upload is atomic (readers see the whole
//! object or none: a rename in a directory, a single PUT or a completed multipart upload in S3)
//! and downloads land in a temporary file beside their destination that is renamed into place,
//! so a crash never leaves a half-written artifact where a later step would trust it.
//!
//! Keys are validated before anything touches the disk or the network ([`validate_key`]):
//! `/`-separated segments of `[A-Za-z0-9._-]`, no `.` or `..`. That keeps a key from escaping
//! a directory store, makes it mean the same thing in both backends, and needs no escaping in
//! URLs, signatures or S3's XML.
//!
//! S3 credentials never appear in the spec, because the spec is configuration that ends up in
//! process lists, logs and `describe()` output. They come from the environment
//! ([`S3Credentials::from_env`]: `HEFRING_S3_ACCESS_KEY_ID`/`HEFRING_S3_SECRET_ACCESS_KEY`, or
//! the usual `AWS_*` variables) or are passed in by the caller, and their `Debug` hides the
//! secret. Requests are signed with AWS Signature Version 4 ([`sigv4`], a pure function tested
//! against AWS's published examples).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

mod key;
mod local;
mod s3;
pub mod sigv4;
mod xml;

pub use key::{validate_key, validate_prefix, MAX_KEY_LEN};
pub use local::LocalDir;
pub use s3::{S3Config, S3Credentials, S3};

/// One object as listed: its key (relative to the store) and its size in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

/// The bytes of an object as they arrive, for streaming it onwards (an HTTP download route).
pub type ObjectStream = BoxStream<'static, Result<bytes::Bytes, std::io::Error>>;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// A key (or list prefix) that breaks the key rules; refused before any I/O.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// A store spec that names no usable store.
    #[error("invalid object store spec: {0}")]
    InvalidSpec(String),
    /// An S3 store without credentials: the message says where they are looked for.
    #[error("{0}")]
    MissingCredentials(String),
    #[error("object {key:?} not found")]
    NotFound { key: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The request did not get an answer (connection refused, TLS, timeout, cut short).
    #[error("{context}: {message}")]
    Transport { context: String, message: String },
    /// S3 answered with an error: its HTTP status and, when the response had a body, S3's
    /// error code (`NoSuchBucket`, `SignatureDoesNotMatch`, ...) and message.
    #[error("{operation} failed: HTTP {status}{}{}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default(), message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    S3 {
        operation: String,
        status: u16,
        code: Option<String>,
        message: Option<String>,
    },
    /// S3 answered with success but not with what the protocol promises.
    #[error("{operation}: unexpected response: {detail}")]
    Protocol { operation: String, detail: String },
}

impl ObjectError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ObjectError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A store of immutable blobs every worker can reach.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Copies a local file to `key`, atomically: readers see the whole object or none. An
    /// existing object under `key` is replaced. Returns the object's size.
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError>;
    /// Downloads `key` to a local path (written to a temporary file beside it, then renamed).
    /// [`ObjectError::NotFound`] if absent. Returns the object's size.
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError>;
    /// The object's size and a stream of its bytes. [`ObjectError::NotFound`] if absent.
    async fn open(&self, key: &str) -> Result<(u64, ObjectStream), ObjectError>;
    /// The object's size, or `None` if absent.
    async fn head(&self, key: &str) -> Result<Option<u64>, ObjectError>;
    /// Idempotent: deleting an absent key is Ok.
    async fn delete(&self, key: &str) -> Result<(), ObjectError>;
    /// The objects whose keys start with `prefix` (a plain string prefix, as in S3: `a/b`
    /// matches `a/b/c` and `a/bc`; `""` lists everything), all of them, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ObjectError>;
    /// A human description for logs, never containing secrets, e.g.
    /// `s3://bucket/prefix at http://127.0.0.1:5000` or `/var/lib/hefring/objects`.
    fn describe(&self) -> String;
}

/// Opens the store a spec names:
/// - an absolute path or `file:///absolute/path`: a [`LocalDir`] (created on the first put);
/// - `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]`: an [`S3`] bucket (see
///   [`S3Config::parse`]), with `credentials` or, when `None`, [`S3Credentials::from_env`].
///
/// Nothing is contacted here: a wrong endpoint or bucket shows on the first request.
pub fn open_store(
    spec: &str,
    credentials: Option<S3Credentials>,
) -> Result<Arc<dyn ObjectStore>, ObjectError> {
    if spec.starts_with("s3://") {
        let config = S3Config::parse(spec)?;
        let credentials = match credentials {
            Some(credentials) => credentials,
            None => S3Credentials::from_env()?,
        };
        Ok(Arc::new(S3::new(config, credentials)?))
    } else if let Some(path) = spec.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(ObjectError::InvalidSpec(format!(
                "{spec:?}: a file URL needs an absolute path (file:///var/lib/hefring/objects)"
            )));
        }
        Ok(Arc::new(LocalDir::new(path)?))
    } else if spec.starts_with('/') {
        Ok(Arc::new(LocalDir::new(spec)?))
    } else {
        // Only the scheme of a URL: the rest might hold credentials.
        let shown = match spec.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://..."),
            None => format!("{spec:?}"),
        };
        Err(ObjectError::InvalidSpec(format!(
            "{shown}: expected an absolute directory path, file:///path or \
             s3://bucket[/prefix][?endpoint=URL&region=REGION]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_pick_the_backend() {
        let local = open_store("/var/lib/hefring/objects", None).unwrap();
        assert_eq!(local.describe(), "/var/lib/hefring/objects");
        let local = open_store("file:///srv/objects", None).unwrap();
        assert_eq!(local.describe(), "/srv/objects");

        let creds = S3Credentials::new("AKIDEXAMPLE", "very-secret-key");
        let s3 = open_store(
            "s3://artifacts/hefring/prod?endpoint=http://127.0.0.1:9000&region=eu-west-1",
            Some(creds),
        )
        .unwrap();
        assert_eq!(
            s3.describe(),
            "s3://artifacts/hefring/prod at http://127.0.0.1:9000"
        );
        assert!(!s3.describe().contains("very-secret-key"));

        for bad in [
            "relative/dir",
            "file://relative",
            "https://AKID:hunter2@example.com/x",
            "",
        ] {
            let error = open_store(bad, None).err().unwrap();
            assert!(matches!(error, ObjectError::InvalidSpec(_)), "{bad}");
            assert!(!error.to_string().contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn s3_errors_show_status_and_code() {
        let error = ObjectError::S3 {
            operation: "S3 GetObject b/k".into(),
            status: 403,
            code: Some("SignatureDoesNotMatch".into()),
            message: Some("The request signature we calculated does not match".into()),
        };
        assert_eq!(
            error.to_string(),
            "S3 GetObject b/k failed: HTTP 403 SignatureDoesNotMatch: \
             The request signature we calculated does not match"
        );
        let error = ObjectError::S3 {
            operation: "S3 HeadObject b/k".into(),
            status: 403,
            code: None,
            message: None,
        };
        assert_eq!(error.to_string(), "S3 HeadObject b/k failed: HTTP 403");
    }
}
