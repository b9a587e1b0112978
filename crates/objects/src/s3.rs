//! An S3-compatible bucket as an object store, over plain HTTP requests signed with
//! [`crate::sigv4`], addressed path-style (`ENDPOINT/BUCKET/PREFIX/KEY`), which every
//! S3-compatible server understands and needs no DNS per bucket.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use crate::key::is_valid_key;
use crate::local::{blocking, parent_of, TEMP_PREFIX};
use crate::sigv4::{self, EMPTY_PAYLOAD_SHA256};
use crate::xml;
use crate::{validate_key, validate_prefix, ObjectError, ObjectInfo, ObjectStore, ObjectStream};

/// Files up to this size go up in one PUT; bigger ones in a multipart upload.
const SINGLE_PUT_MAX: u64 = 64 * MIB;
/// The part size of multipart uploads (more for files over 10 000 parts of it, S3's limit).
const PART_SIZE: u64 = 16 * MIB;
const MAX_PARTS: u64 = 10_000;
const MIB: u64 = 1024 * 1024;

/// Credentials for an S3-compatible store. Never part of a store spec: they come from the
/// environment ([`S3Credentials::from_env`]) or the caller's secret configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// For temporary credentials (STS), sent as `x-amz-security-token`.
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl S3Credentials {
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        S3Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
        }
    }

    /// Reads `HEFRING_S3_ACCESS_KEY_ID` and `HEFRING_S3_SECRET_ACCESS_KEY` (with
    /// `HEFRING_S3_SESSION_TOKEN`), or else `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`
    /// (with `AWS_SESSION_TOKEN`). The two sets are never mixed. Empty values count as unset.
    pub fn from_env() -> Result<Self, ObjectError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ObjectError> {
        let get = |name: &str| lookup(name).filter(|value| !value.is_empty());
        for (id_var, secret_var, token_var) in [
            (
                "HEFRING_S3_ACCESS_KEY_ID",
                "HEFRING_S3_SECRET_ACCESS_KEY",
                "HEFRING_S3_SESSION_TOKEN",
            ),
            (
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
            ),
        ] {
            match (get(id_var), get(secret_var)) {
                (Some(access_key_id), Some(secret_access_key)) => {
                    return Ok(S3Credentials {
                        access_key_id,
                        secret_access_key,
                        session_token: get(token_var),
                    })
                }
                (None, None) => continue,
                (Some(_), None) => {
                    return Err(ObjectError::MissingCredentials(format!(
                        "S3 credentials: {id_var} is set but {secret_var} is not"
                    )))
                }
                (None, Some(_)) => {
                    return Err(ObjectError::MissingCredentials(format!(
                        "S3 credentials: {secret_var} is set but {id_var} is not"
                    )))
                }
            }
        }
        Err(ObjectError::MissingCredentials(
            "no S3 credentials: set HEFRING_S3_ACCESS_KEY_ID and HEFRING_S3_SECRET_ACCESS_KEY \
             (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, with AWS_SESSION_TOKEN for \
             temporary credentials) in the environment"
                .into(),
        ))
    }
}

/// Where an S3 store is, as a spec names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Keys live under `PREFIX/` when set (no leading or trailing `/`).
    pub prefix: Option<String>,
    /// `scheme://host[:port]`, without a trailing `/`.
    pub endpoint: String,
    pub region: String,
}

impl S3Config {
    /// Parses `s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]`. The endpoint defaults to
    /// `https://s3.REGION.amazonaws.com`, the region to `us-east-1` (any value for servers
    /// that ignore it, such as MinIO). PREFIX follows the key rules. Credentials have no place
    /// here; error messages never echo what might be one.
    pub fn parse(spec: &str) -> Result<Self, ObjectError> {
        let invalid = |message: String| ObjectError::InvalidSpec(message);
        let rest = spec
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("an S3 spec starts with s3://".into()))?;
        let (location, query) = match rest.split_once('?') {
            Some((location, query)) => (location, query),
            None => (rest, ""),
        };
        if location.contains('@') {
            return Err(invalid(
                "s3 spec: credentials do not belong in the spec (it shows in process lists); \
                 set HEFRING_S3_ACCESS_KEY_ID and HEFRING_S3_SECRET_ACCESS_KEY instead"
                    .into(),
            ));
        }
        let (bucket, prefix) = match location.split_once('/') {
            Some((bucket, prefix)) => (bucket, prefix.strip_suffix('/').unwrap_or(prefix)),
            None => (location, ""),
        };
        if !is_bucket_name(bucket) {
            return Err(invalid(format!(
                "s3 spec: {bucket:?} is not a bucket name (3 to 63 of a-z 0-9 . _ -, starting \
                 and ending with a letter or digit)"
            )));
        }
        let prefix = if prefix.is_empty() {
            None
        } else {
            validate_key(prefix).map_err(|error| invalid(format!("s3 spec: prefix: {error}")))?;
            Some(prefix.to_owned())
        };

        let mut endpoint = None;
        let mut region = None;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "endpoint" => endpoint = Some(parse_endpoint(value)?),
                "region" => {
                    if value.is_empty()
                        || !value
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    {
                        return Err(invalid(format!(
                            "s3 spec: {value:?} is not a region (like eu-west-1)"
                        )));
                    }
                    region = Some(value.to_owned());
                }
                // The value is not echoed: it might be a secret put in the wrong place.
                other => {
                    return Err(invalid(format!(
                        "s3 spec: unknown parameter {other:?} (known: endpoint, region)"
                    )))
                }
            }
        }
        let region = region.unwrap_or_else(|| "us-east-1".to_owned());
        let endpoint = endpoint.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        Ok(S3Config {
            bucket: bucket.to_owned(),
            prefix,
            endpoint,
            region,
        })
    }
}

fn is_bucket_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (3..=63).contains(&bytes.len())
        && bytes.iter().all(|&b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

fn parse_endpoint(value: &str) -> Result<String, ObjectError> {
    let invalid = |why: &str| {
        ObjectError::InvalidSpec(format!(
            "s3 spec: the endpoint {why} (expected http[s]://host[:port])"
        ))
    };
    let url = reqwest::Url::parse(value).map_err(|_| invalid("is not a URL"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not contain credentials"));
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("must be http or https"));
    }
    if url.host_str().is_none() {
        return Err(invalid("has no host"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("must not have a path or query"));
    }
    Ok(url.origin().ascii_serialization())
}

/// An S3-compatible bucket (optionally a prefix in it) as an [`ObjectStore`].
#[derive(Clone, Debug)]
pub struct S3 {
    config: S3Config,
    credentials: S3Credentials,
    /// The `Host` header the HTTP client sends for the endpoint, which is signed.
    host: String,
    client: reqwest::Client,
    /// For request bodies of many megabytes: reqwest's read timeout runs from the start of a
    /// request until its response, so it would also cut off an upload that is merely slow.
    upload_client: reqwest::Client,
    /// `max-keys` of each ListObjectsV2 page, when not S3's default (1000).
    page_size: Option<u32>,
}

impl S3 {
    pub fn new(config: S3Config, credentials: S3Credentials) -> Result<Self, ObjectError> {
        let url = reqwest::Url::parse(&config.endpoint)
            .map_err(|_| ObjectError::InvalidSpec("s3: the endpoint is not a URL".into()))?;
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => {
                return Err(ObjectError::InvalidSpec(
                    "s3: the endpoint has no host".into(),
                ))
            }
        };
        let builder = || {
            reqwest::Client::builder()
                .user_agent(concat!("hefring-objects/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(15))
                .tcp_keepalive(Duration::from_secs(30))
                // A redirect would need signing again, and S3's (wrong region) carry no
                // Location.
                .redirect(reqwest::redirect::Policy::none())
        };
        let build_error = |error: reqwest::Error| ObjectError::Transport {
            context: "building the HTTP client".into(),
            message: error_chain(&error),
        };
        // A stalled download or answer fails instead of hanging a worker; a slow one goes on.
        let client = builder()
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(build_error)?;
        let upload_client = builder().build().map_err(build_error)?;
        Ok(S3 {
            config,
            credentials,
            host,
            client,
            upload_client,
            page_size: None,
        })
    }

    /// Lists in pages of `keys` objects instead of S3's default (and maximum) of 1000: for
    /// servers with a lower limit, and for tests of the paging.
    pub fn with_page_size(mut self, keys: u32) -> Self {
        self.page_size = Some(keys.max(1));
        self
    }

    /// Parses a spec ([`S3Config::parse`]) and makes the store.
    pub fn from_spec(spec: &str, credentials: S3Credentials) -> Result<Self, ObjectError> {
        S3::new(S3Config::parse(spec)?, credentials)
    }

    pub fn config(&self) -> &S3Config {
        &self.config
    }

    /// Creates the bucket (for tests and first-time setup); Ok if it is already ours.
    pub async fn create_bucket(&self) -> Result<(), ObjectError> {
        let operation = format!("S3 CreateBucket {}", self.config.bucket);
        // us-east-1 is the default location and refuses to be named as a constraint.
        let body = if self.config.region == "us-east-1" {
            String::new()
        } else {
            format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                 <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                self.config.region
            )
        };
        let payload = sigv4::sha256_hex(body.as_bytes());
        let request = self
            .signed(Method::PUT, &self.bucket_path(), &[], &payload)
            .header(CONTENT_LENGTH, body.len())
            .body(body);
        let response = self.send(request, &operation).await?;
        if response.status().is_success() {
            return Ok(());
        }
        match s3_error(response, &operation).await {
            ObjectError::S3 {
                code: Some(code), ..
            } if code == "BucketAlreadyOwnedByYou" => Ok(()),
            error => Err(error),
        }
    }

    /// The key in the bucket: the store's prefix, then the key.
    fn full_key(&self, key: &str) -> String {
        match &self.config.prefix {
            Some(prefix) => format!("{prefix}/{key}"),
            None => key.to_owned(),
        }
    }

    fn bucket_path(&self) -> String {
        sigv4::encode_path([self.config.bucket.as_str()])
    }

    fn object_path(&self, key: &str) -> String {
        let full_key = self.full_key(key);
        sigv4::encode_path(std::iter::once(self.config.bucket.as_str()).chain(full_key.split('/')))
    }

    fn describe_call(&self, operation: &str, key: &str) -> String {
        format!(
            "S3 {operation} {}/{}",
            self.config.bucket,
            self.full_key(key)
        )
    }

    /// A request to `path?query`, signed now.
    fn signed(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        payload_sha256: &str,
    ) -> RequestBuilder {
        self.signed_with(&self.client, method, path, query, payload_sha256)
    }

    /// The same, for a request carrying a file.
    fn signed_upload(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        payload_sha256: &str,
    ) -> RequestBuilder {
        self.signed_with(&self.upload_client, method, path, query, payload_sha256)
    }

    fn signed_with(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
        query: &[(String, String)],
        payload_sha256: &str,
    ) -> RequestBuilder {
        let amz_date = sigv4::amz_date(OffsetDateTime::now_utc());
        let mut headers = vec![
            ("host".to_owned(), self.host.clone()),
            ("x-amz-content-sha256".to_owned(), payload_sha256.to_owned()),
            ("x-amz-date".to_owned(), amz_date.clone()),
        ];
        if let Some(token) = &self.credentials.session_token {
            headers.push(("x-amz-security-token".to_owned(), token.clone()));
        }
        let scope = sigv4::Scope {
            amz_date: &amz_date,
            region: &self.config.region,
            service: "s3",
        };
        let authorization = sigv4::authorization(
            &self.credentials,
            &scope,
            &sigv4::Request {
                method: method.as_str(),
                canonical_uri: path,
                query,
                headers: &headers,
                payload_sha256,
            },
        );
        let mut url = format!("{}{path}", self.config.endpoint);
        if !query.is_empty() {
            url.push('?');
            url.push_str(&url_query(query));
        }
        let mut request = client.request(method, url);
        // The HTTP client sends `host` itself, with the same value.
        for (name, value) in headers.into_iter().filter(|(name, _)| name != "host") {
            request = request.header(name, value);
        }
        request.header(reqwest::header::AUTHORIZATION, authorization)
    }

    async fn send(
        &self,
        request: RequestBuilder,
        operation: &str,
    ) -> Result<Response, ObjectError> {
        tracing::debug!(store = %self.describe(), "{operation}");
        request
            .send()
            .await
            .map_err(|error| ObjectError::Transport {
                context: operation.to_owned(),
                message: error_chain(&error),
            })
    }

    /// A successful GET of an object, or NotFound.
    async fn get(&self, key: &str) -> Result<Response, ObjectError> {
        validate_key(key)?;
        let operation = self.describe_call("GetObject", key);
        let request = self.signed(
            Method::GET,
            &self.object_path(key),
            &[],
            EMPTY_PAYLOAD_SHA256,
        );
        let response = self.send(request, &operation).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        match s3_error(response, &operation).await {
            // A missing bucket is a misconfiguration, not a missing object.
            ObjectError::S3 { code, .. }
                if status == StatusCode::NOT_FOUND
                    && code.as_deref().is_none_or(|code| code == "NoSuchKey") =>
            {
                Err(ObjectError::NotFound {
                    key: key.to_owned(),
                })
            }
            error => Err(error),
        }
    }

    async fn put_single(&self, key: &str, path: &Path, size: u64) -> Result<(), ObjectError> {
        let operation = self.describe_call("PutObject", key);
        // Signing the body's hash makes S3 check it: a file that changes while it is read is
        // refused instead of stored damaged.
        let payload = sha256_file_range(path, 0, size).await?;
        let request = self
            .signed_upload(Method::PUT, &self.object_path(key), &[], &payload)
            .header(CONTENT_LENGTH, size)
            .body(file_range_body(path, 0, size).await?);
        let response = self.send(request, &operation).await?;
        if !response.status().is_success() {
            return Err(s3_error(response, &operation).await);
        }
        Ok(())
    }

    async fn put_multipart(&self, key: &str, path: &Path, size: u64) -> Result<(), ObjectError> {
        let object_path = self.object_path(key);
        let operation = self.describe_call("CreateMultipartUpload", key);
        let query = [("uploads".to_owned(), String::new())];
        let request = self.signed(Method::POST, &object_path, &query, EMPTY_PAYLOAD_SHA256);
        let response = self.send(request, &operation).await?;
        if !response.status().is_success() {
            return Err(s3_error(response, &operation).await);
        }
        let body = response_text(response, &operation).await?;
        let upload_id = xml::first(&body, "UploadId")
            .filter(|id| !id.is_empty())
            .ok_or_else(|| ObjectError::Protocol {
                operation: operation.clone(),
                detail: "no UploadId in the response".into(),
            })?;

        let result = self
            .upload_parts_and_complete(key, path, size, &object_path, &upload_id)
            .await;
        if result.is_err() {
            // Otherwise the parts stay (and are billed) until a lifecycle rule removes them.
            let operation = self.describe_call("AbortMultipartUpload", key);
            let query = [("uploadId".to_owned(), upload_id.clone())];
            let request = self.signed(Method::DELETE, &object_path, &query, EMPTY_PAYLOAD_SHA256);
            match self.send(request, &operation).await {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => {
                    let error = s3_error(response, &operation).await;
                    tracing::warn!(%error, "could not abort a failed multipart upload");
                }
                Err(error) => tracing::warn!(%error, "could not abort a failed multipart upload"),
            }
        }
        result
    }

    async fn upload_parts_and_complete(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        object_path: &str,
        upload_id: &str,
    ) -> Result<(), ObjectError> {
        let part_size = PART_SIZE.max(size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB);
        let mut etags = Vec::new();
        let mut offset = 0;
        while offset < size {
            let part_number = etags.len() + 1;
            let length = part_size.min(size - offset);
            let operation = format!(
                "{} part {part_number}",
                self.describe_call("UploadPart", key)
            );
            let payload = sha256_file_range(path, offset, length).await?;
            let query = [
                ("partNumber".to_owned(), part_number.to_string()),
                ("uploadId".to_owned(), upload_id.to_owned()),
            ];
            let request = self
                .signed_upload(Method::PUT, object_path, &query, &payload)
                .header(CONTENT_LENGTH, length)
                .body(file_range_body(path, offset, length).await?);
            let response = self.send(request, &operation).await?;
            if !response.status().is_success() {
                return Err(s3_error(response, &operation).await);
            }
            let etag = response
                .headers()
                .get(ETAG)
                .and_then(|value| value.to_str().ok())
                .ok_or_else(|| ObjectError::Protocol {
                    operation: operation.clone(),
                    detail: "no ETag in the response".into(),
                })?;
            etags.push(etag.to_owned());
            offset += length;
        }

        let operation = self.describe_call("CompleteMultipartUpload", key);
        let mut body = String::from("<CompleteMultipartUpload>");
        for (index, etag) in etags.iter().enumerate() {
            body.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                index + 1,
                xml::escape(etag)
            ));
        }
        body.push_str("</CompleteMultipartUpload>");
        let query = [("uploadId".to_owned(), upload_id.to_owned())];
        let payload = sigv4::sha256_hex(body.as_bytes());
        let request = self
            .signed(Method::POST, object_path, &query, &payload)
            .header(CONTENT_TYPE, "application/xml")
            .header(CONTENT_LENGTH, body.len())
            .body(body);
        let response = self.send(request, &operation).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(s3_error(response, &operation).await);
        }
        // S3 may answer 200 and still fail, with an <Error> in the body.
        let text = response_text(response, &operation).await?;
        if text.contains("<Error>") {
            return Err(ObjectError::S3 {
                operation,
                status: status.as_u16(),
                code: xml::first(&text, "Code"),
                message: xml::first(&text, "Message"),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for S3 {
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError> {
        validate_key(key)?;
        let metadata = tokio::fs::metadata(path)
            .await
            .map_err(|e| ObjectError::io(format!("reading {}", path.display()), e))?;
        if !metadata.is_file() {
            return Err(ObjectError::io(
                format!("uploading {}", path.display()),
                std::io::Error::other("not a regular file"),
            ));
        }
        let size = metadata.len();
        if size <= SINGLE_PUT_MAX {
            self.put_single(key, path, size).await?;
        } else {
            self.put_multipart(key, path, size).await?;
        }
        Ok(size)
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError> {
        let response = self.get(key).await?;
        let operation = self.describe_call("GetObject", key);
        let expected = response.content_length();
        let dir = parent_of(path);
        let temp = {
            let dir = dir.clone();
            blocking(move || {
                tempfile::Builder::new()
                    .prefix(TEMP_PREFIX)
                    .tempfile_in(&dir)
                    .map_err(|e| {
                        ObjectError::io(
                            format!("creating a temporary file in {}", dir.display()),
                            e,
                        )
                    })
            })
            .await?
        };
        let temp_path = temp.path().to_path_buf();
        let write_error = |e| ObjectError::io(format!("writing {}", temp_path.display()), e);
        let mut file = tokio::fs::File::from_std(temp.as_file().try_clone().map_err(write_error)?);
        let mut body = response.bytes_stream();
        let mut written: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|error| ObjectError::Transport {
                context: operation.clone(),
                message: error_chain(&error),
            })?;
            file.write_all(&chunk).await.map_err(write_error)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(write_error)?;
        file.sync_all().await.map_err(write_error)?;
        drop(file);
        if let Some(expected) = expected.filter(|&expected| expected != written) {
            return Err(ObjectError::Protocol {
                operation,
                detail: format!("Content-Length was {expected} but {written} bytes came"),
            });
        }
        let destination: PathBuf = path.to_path_buf();
        blocking(move || {
            temp.persist(&destination).map_err(|e| {
                ObjectError::io(format!("renaming to {}", destination.display()), e.error)
            })?;
            Ok(())
        })
        .await?;
        Ok(written)
    }

    async fn open(&self, key: &str) -> Result<(u64, ObjectStream), ObjectError> {
        let response = self.get(key).await?;
        let size = response
            .content_length()
            .ok_or_else(|| ObjectError::Protocol {
                operation: self.describe_call("GetObject", key),
                detail: "no Content-Length".into(),
            })?;
        let stream = response
            .bytes_stream()
            .map_err(std::io::Error::other)
            .boxed();
        Ok((size, stream))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, ObjectError> {
        validate_key(key)?;
        let operation = self.describe_call("HeadObject", key);
        let request = self.signed(
            Method::HEAD,
            &self.object_path(key),
            &[],
            EMPTY_PAYLOAD_SHA256,
        );
        let response = self.send(request, &operation).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            // A HEAD answer has no body, so no S3 error code.
            return Err(s3_error(response, &operation).await);
        }
        // Read from the header: for a HEAD the body length (what `content_length()` may
        // report) is zero.
        let size = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| ObjectError::Protocol {
                operation,
                detail: "no Content-Length".into(),
            })?;
        Ok(Some(size))
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        validate_key(key)?;
        let operation = self.describe_call("DeleteObject", key);
        let request = self.signed(
            Method::DELETE,
            &self.object_path(key),
            &[],
            EMPTY_PAYLOAD_SHA256,
        );
        let response = self.send(request, &operation).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        match s3_error(response, &operation).await {
            ObjectError::S3 { code, .. }
                if status == StatusCode::NOT_FOUND
                    && code.as_deref().is_none_or(|code| code == "NoSuchKey") =>
            {
                Ok(())
            }
            error => Err(error),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ObjectError> {
        validate_prefix(prefix)?;
        let store_prefix = self
            .config
            .prefix
            .as_ref()
            .map(|prefix| format!("{prefix}/"))
            .unwrap_or_default();
        let full_prefix = format!("{store_prefix}{prefix}");
        let operation = format!("S3 ListObjectsV2 {}/{full_prefix}", self.config.bucket);
        let mut found = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut query = vec![
                ("list-type".to_owned(), "2".to_owned()),
                ("prefix".to_owned(), full_prefix.clone()),
            ];
            if let Some(page_size) = self.page_size {
                query.push(("max-keys".to_owned(), page_size.to_string()));
            }
            if let Some(token) = continuation.take() {
                query.push(("continuation-token".to_owned(), token));
            }
            let request = self.signed(
                Method::GET,
                &self.bucket_path(),
                &query,
                EMPTY_PAYLOAD_SHA256,
            );
            let response = self.send(request, &operation).await?;
            if !response.status().is_success() {
                return Err(s3_error(response, &operation).await);
            }
            let page = response_text(response, &operation).await?;
            for contents in xml::elements(&page, "Contents") {
                let key = xml::first(contents, "Key").unwrap_or_default();
                let size = xml::first(contents, "Size").and_then(|size| size.parse().ok());
                let (Some(key), Some(size)) = (key.strip_prefix(&store_prefix), size) else {
                    return Err(ObjectError::Protocol {
                        operation,
                        detail: format!(
                            "an entry without a key under the prefix or a size: {key:?}"
                        ),
                    });
                };
                if is_valid_key(key) {
                    found.push(ObjectInfo {
                        key: key.to_owned(),
                        size,
                    });
                } else {
                    // Put there by something else; this store could not address it anyway.
                    tracing::debug!(key, "skipping an S3 key that is not a valid object key");
                }
            }
            if xml::first(&page, "IsTruncated").as_deref() != Some("true") {
                break;
            }
            match xml::first(&page, "NextContinuationToken").filter(|token| !token.is_empty()) {
                Some(token) => continuation = Some(token),
                None => {
                    return Err(ObjectError::Protocol {
                        operation,
                        detail: "a truncated page without NextContinuationToken".into(),
                    })
                }
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    fn describe(&self) -> String {
        let prefix = self
            .config
            .prefix
            .as_ref()
            .map(|prefix| format!("/{prefix}"))
            .unwrap_or_default();
        format!(
            "s3://{}{prefix} at {}",
            self.config.bucket, self.config.endpoint
        )
    }
}

/// The query as sent: encoded and sorted exactly as signed, but a parameter without a value
/// goes bare (`?uploads`), as AWS's own clients send it; both sign it as `uploads=`.
fn url_query(query: &[(String, String)]) -> String {
    sigv4::query_string(query)
        .split('&')
        .map(|pair| pair.strip_suffix('=').unwrap_or(pair))
        .collect::<Vec<_>>()
        .join("&")
}

/// The error S3 answered, with the code and message from its XML body (when it has one). The
/// body is not kept: only these two fields, which never contain the secret.
async fn s3_error(response: Response, operation: &str) -> ObjectError {
    let status = response.status().as_u16();
    let body = read_capped(response, 64 * 1024).await;
    let text = String::from_utf8_lossy(&body);
    let shorten = |text: String| -> String {
        if text.chars().count() > 300 {
            format!("{}...", text.chars().take(300).collect::<String>())
        } else {
            text
        }
    };
    ObjectError::S3 {
        operation: operation.to_owned(),
        status,
        code: xml::first(&text, "Code")
            .filter(|code| !code.is_empty())
            .map(shorten),
        message: xml::first(&text, "Message")
            .filter(|m| !m.is_empty())
            .map(shorten),
    }
}

async fn read_capped(response: Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= limit {
            break;
        }
    }
    body
}

async fn response_text(response: Response, operation: &str) -> Result<String, ObjectError> {
    response
        .text()
        .await
        .map_err(|error| ObjectError::Transport {
            context: operation.to_owned(),
            message: error_chain(&error),
        })
}

/// An error with its causes: reqwest's own message alone says only "error sending request".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The hex SHA-256 of `length` bytes of a file from `offset`.
async fn sha256_file_range(path: &Path, offset: u64, length: u64) -> Result<String, ObjectError> {
    let path = path.to_path_buf();
    blocking(move || {
        use std::io::{Read, Seek, SeekFrom};
        let read_error = |e| ObjectError::io(format!("reading {}", path.display()), e);
        let mut file = std::fs::File::open(&path).map_err(read_error)?;
        file.seek(SeekFrom::Start(offset)).map_err(read_error)?;
        let mut reader = file.take(length);
        let mut hasher = Sha256::new();
        let mut buffer = vec![0; 256 * 1024];
        let mut total = 0;
        loop {
            let n = reader.read(&mut buffer).map_err(read_error)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            total += n as u64;
        }
        if total != length {
            return Err(read_error(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while it was uploaded",
            )));
        }
        Ok(hex::encode(hasher.finalize()))
    })
    .await
}

/// `length` bytes of a file from `offset`, streamed as a request body.
async fn file_range_body(
    path: &Path,
    offset: u64,
    length: u64,
) -> Result<reqwest::Body, ObjectError> {
    let read_error = |e| ObjectError::io(format!("reading {}", path.display()), e);
    let mut file = tokio::fs::File::open(path).await.map_err(read_error)?;
    file.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(read_error)?;
    let stream = ReaderStream::with_capacity(file.take(length), 256 * 1024);
    Ok(reqwest::Body::wrap_stream(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let parse = |spec: &str| S3Config::parse(spec).unwrap();
        assert_eq!(
            parse("s3://artifacts"),
            S3Config {
                bucket: "artifacts".into(),
                prefix: None,
                endpoint: "https://s3.us-east-1.amazonaws.com".into(),
                region: "us-east-1".into(),
            }
        );
        assert_eq!(
            parse("s3://artifacts/hefring/prod/?region=eu-west-1"),
            S3Config {
                bucket: "artifacts".into(),
                prefix: Some("hefring/prod".into()),
                endpoint: "https://s3.eu-west-1.amazonaws.com".into(),
                region: "eu-west-1".into(),
            }
        );
        assert_eq!(
            parse("s3://my.bucket-1/p?endpoint=http://127.0.0.1:5000/&region=garage"),
            S3Config {
                bucket: "my.bucket-1".into(),
                prefix: Some("p".into()),
                endpoint: "http://127.0.0.1:5000".into(),
                region: "garage".into(),
            }
        );
        assert_eq!(
            parse("s3://b12?endpoint=https://minio.example.com:443").endpoint,
            "https://minio.example.com"
        );
    }

    #[test]
    fn bad_specs_do_not_echo_secrets() {
        for (spec, expected) in [
            ("s3://", "not a bucket name"),
            ("s3://ab", "not a bucket name"),
            ("s3://Bucket", "not a bucket name"),
            ("s3://bucket-", "not a bucket name"),
            ("s3://bucket/a//b", "prefix"),
            ("s3://bucket/../b", "prefix"),
            ("s3://bucket?region=", "not a region"),
            ("s3://bucket?endpoint=ftp://x", "http or https"),
            ("s3://bucket?endpoint=http://h/path", "path"),
            ("s3://bucket?endpoint=nonsense", "not a URL"),
            (
                "s3://AKIDSECRET:hunter2@bucket",
                "credentials do not belong",
            ),
            (
                "s3://bucket?endpoint=http://AKID:hunter2@h",
                "must not contain credentials",
            ),
            (
                "s3://bucket?secret_access_key=hunter2",
                "unknown parameter \"secret_access_key\"",
            ),
        ] {
            let error = S3Config::parse(spec).unwrap_err().to_string();
            assert!(error.contains(expected), "{spec}: {error}");
            assert!(!error.contains("hunter2"), "{spec}: {error}");
        }
    }

    #[test]
    fn credentials_from_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let both = S3Credentials::from_lookup(env(&[
            ("HEFRING_S3_ACCESS_KEY_ID", "hid"),
            ("HEFRING_S3_SECRET_ACCESS_KEY", "hsecret"),
            ("AWS_ACCESS_KEY_ID", "aid"),
            ("AWS_SECRET_ACCESS_KEY", "asecret"),
            ("AWS_SESSION_TOKEN", "atoken"),
        ]))
        .unwrap();
        // Hefring's own variables win, and an AWS session token does not leak into them.
        assert_eq!(both, S3Credentials::new("hid", "hsecret"));

        let aws = S3Credentials::from_lookup(env(&[
            ("HEFRING_S3_ACCESS_KEY_ID", ""),
            ("AWS_ACCESS_KEY_ID", "aid"),
            ("AWS_SECRET_ACCESS_KEY", "asecret"),
            ("AWS_SESSION_TOKEN", "atoken"),
        ]))
        .unwrap();
        assert_eq!(
            aws,
            S3Credentials {
                access_key_id: "aid".into(),
                secret_access_key: "asecret".into(),
                session_token: Some("atoken".into()),
            }
        );

        let half = S3Credentials::from_lookup(env(&[("HEFRING_S3_ACCESS_KEY_ID", "hid")]));
        assert_eq!(
            half.unwrap_err().to_string(),
            "S3 credentials: HEFRING_S3_ACCESS_KEY_ID is set but HEFRING_S3_SECRET_ACCESS_KEY is not"
        );
        let none = S3Credentials::from_lookup(env(&[]))
            .unwrap_err()
            .to_string();
        assert!(none.contains("HEFRING_S3_ACCESS_KEY_ID"), "{none}");
        assert!(none.contains("AWS_ACCESS_KEY_ID"), "{none}");
    }

    #[test]
    fn debug_hides_the_secrets() {
        let mut credentials = S3Credentials::new("AKIDEXAMPLE", "s3cr3t-value");
        credentials.session_token = Some("t0ken-value".into());
        let debug = format!("{credentials:?}");
        assert!(debug.contains("AKIDEXAMPLE"), "{debug}");
        assert!(!debug.contains("s3cr3t-value"), "{debug}");
        assert!(!debug.contains("t0ken-value"), "{debug}");
        let store = S3::from_spec("s3://bucket", credentials).unwrap();
        let debug = format!("{store:?}");
        assert!(
            !debug.contains("s3cr3t-value") && !debug.contains("t0ken-value"),
            "{debug}"
        );
    }

    #[test]
    fn paths_and_queries() {
        let store = S3::from_spec(
            "s3://bucket/pre/fix?endpoint=http://127.0.0.1:5000",
            S3Credentials::new("a", "b"),
        )
        .unwrap();
        assert_eq!(store.host, "127.0.0.1:5000");
        assert_eq!(store.object_path("a/b.tar"), "/bucket/pre/fix/a/b.tar");
        assert_eq!(store.bucket_path(), "/bucket");
        assert_eq!(
            url_query(&[
                ("uploads".into(), String::new()),
                ("prefix".into(), "a/b".into()),
            ]),
            "prefix=a%2Fb&uploads"
        );
        let aws =
            S3::from_spec("s3://bucket?region=eu-west-1", S3Credentials::new("a", "b")).unwrap();
        assert_eq!(aws.host, "s3.eu-west-1.amazonaws.com");
        assert_eq!(
            aws.describe(),
            "s3://bucket at https://s3.eu-west-1.amazonaws.com"
        );
    }
}
