//! AWS Signature Version 4 for requests signed in the `Authorization` header, as pure
//! functions: <https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html>.
//!
//! The caller chooses which headers to sign (for S3 at least `host`, `x-amz-date` and
//! `x-amz-content-sha256`, plus `x-amz-security-token` with temporary credentials) and sends
//! exactly those values; the query goes into the URL as [`query_string`] writes it, so what
//! is signed is what is sent.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::S3Credentials;

/// The payload hash for a body that is not hashed (allowed by S3 only).
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// The SHA-256 of an empty body.
pub const EMPTY_PAYLOAD_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// What is signed of a request.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path, already URI-encoded (see [`encode_path`]).
    pub canonical_uri: &'a str,
    /// Query parameters, not encoded; their order does not matter.
    pub query: &'a [(String, String)],
    /// The headers to sign, with the values sent; names in any case, order does not matter.
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the body, or [`UNSIGNED_PAYLOAD`]; also sent as `x-amz-content-sha256`.
    pub payload_sha256: &'a str,
}

/// Where and when a request is signed.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// `YYYYMMDDTHHMMSSZ` (see [`amz_date`]), also sent as `x-amz-date`.
    pub amz_date: &'a str,
    pub region: &'a str,
    /// `s3`, `iam`, ...
    pub service: &'a str,
}

/// The `Authorization` header value for a request.
pub fn authorization(
    credentials: &S3Credentials,
    scope: &Scope<'_>,
    request: &Request<'_>,
) -> String {
    let (canonical, signed_headers) = canonical_request(request);
    let to_sign = string_to_sign(scope, &canonical);
    let signature = signature(&credentials.secret_access_key, scope, &to_sign);
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{}, SignedHeaders={signed_headers}, Signature={signature}",
        credentials.access_key_id,
        credential_scope(scope),
    )
}

/// The canonical request and the `SignedHeaders` list.
pub fn canonical_request(request: &Request<'_>) -> (String, String) {
    let mut headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.trim().to_ascii_lowercase(),
                normalize_header_value(value),
            )
        })
        .collect();
    headers.sort();
    // Repeated headers become one line with their values joined by commas, in order sent.
    let mut merged: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        match merged.last_mut() {
            Some((last, values)) if *last == name => {
                values.push(',');
                values.push_str(&value);
            }
            _ => merged.push((name, value)),
        }
    }
    let canonical_headers: String = merged
        .iter()
        .map(|(name, value)| format!("{name}:{value}\n"))
        .collect();
    let signed_headers = merged
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        request.method,
        request.canonical_uri,
        query_string(request.query),
        canonical_headers,
        signed_headers,
        request.payload_sha256
    );
    (canonical, signed_headers)
}

/// The canonical query string: each name and value URI-encoded, sorted by name then value.
/// Sent in the URL as it is, so the server sees exactly what was signed.
pub fn query_string(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(name, value)| (uri_encode(name, true), uri_encode(value, true)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join("&")
}

pub fn string_to_sign(scope: &Scope<'_>, canonical_request: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256\n{}\n{}\n{}",
        scope.amz_date,
        credential_scope(scope),
        sha256_hex(canonical_request.as_bytes())
    )
}

/// The hex signature of a string to sign.
pub fn signature(secret_access_key: &str, scope: &Scope<'_>, string_to_sign: &str) -> String {
    let date = &scope.amz_date[..scope.amz_date.len().min(8)];
    let key = hmac(
        format!("AWS4{secret_access_key}").as_bytes(),
        date.as_bytes(),
    );
    let key = hmac(&key, scope.region.as_bytes());
    let key = hmac(&key, scope.service.as_bytes());
    let key = hmac(&key, b"aws4_request");
    hex::encode(hmac(&key, string_to_sign.as_bytes()))
}

fn credential_scope(scope: &Scope<'_>) -> String {
    let date = &scope.amz_date[..scope.amz_date.len().min(8)];
    format!("{date}/{}/{}/aws4_request", scope.region, scope.service)
}

/// `YYYYMMDDTHHMMSSZ` in UTC.
pub fn amz_date(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// URI-encodes as SigV4 wants: everything but `A-Za-z0-9-_.~` as `%XX` (upper case), and `/`
/// kept unless `encode_slash`.
pub fn uri_encode(text: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// A path from its segments, each URI-encoded: `/seg1/seg2`.
pub fn encode_path<'a>(segments: impl IntoIterator<Item = &'a str>) -> String {
    let mut path = String::new();
    for segment in segments {
        path.push('/');
        path.push_str(&uri_encode(segment, true));
    }
    if path.is_empty() {
        path.push('/');
    }
    path
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Trims and collapses runs of spaces, as the canonical form wants.
fn normalize_header_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    // The examples in AWS's "Signature Calculations for the Authorization Header: Transferring
    // Payload in a Single Chunk" (AWS Signature Version 4), for the bucket `examplebucket` in
    // us-east-1, virtual-hosted style.
    fn example_credentials() -> S3Credentials {
        S3Credentials::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        )
    }

    const EXAMPLE_SCOPE: Scope<'static> = Scope {
        amz_date: "20130524T000000Z",
        region: "us-east-1",
        service: "s3",
    };

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn aws_example_get_object() {
        let headers = headers(&[
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("Range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_PAYLOAD_SHA256),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let request = Request {
            method: "GET",
            canonical_uri: "/test.txt",
            query: &[],
            headers: &headers,
            payload_sha256: EMPTY_PAYLOAD_SHA256,
        };
        let (canonical, signed) = canonical_request(&request);
        assert_eq!(
            canonical,
            "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n\
             x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
             x-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            string_to_sign(&EXAMPLE_SCOPE, &canonical),
            "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n\
             7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
        );
        assert_eq!(signed, "host;range;x-amz-content-sha256;x-amz-date");
        assert_eq!(
            authorization(&example_credentials(), &EXAMPLE_SCOPE, &request),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn aws_example_put_object() {
        let body = "Welcome to Amazon S3.";
        let payload = sha256_hex(body.as_bytes());
        assert_eq!(
            payload,
            "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
        );
        let headers = headers(&[
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
            ("x-amz-date", "20130524T000000Z"),
            ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
            ("x-amz-content-sha256", &payload),
        ]);
        let uri = encode_path(["test$file.text"]);
        assert_eq!(uri, "/test%24file.text");
        let request = Request {
            method: "PUT",
            canonical_uri: &uri,
            query: &[],
            headers: &headers,
            payload_sha256: &payload,
        };
        assert!(
            authorization(&example_credentials(), &EXAMPLE_SCOPE, &request).ends_with(
                "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class, \
             Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
            )
        );
    }

    #[test]
    fn aws_example_get_bucket_lifecycle() {
        let headers = headers(&[
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("x-amz-date", "20130524T000000Z"),
            ("x-amz-content-sha256", EMPTY_PAYLOAD_SHA256),
        ]);
        let query = [("lifecycle".to_string(), String::new())];
        let request = Request {
            method: "GET",
            canonical_uri: "/",
            query: &query,
            headers: &headers,
            payload_sha256: EMPTY_PAYLOAD_SHA256,
        };
        assert!(
            authorization(&example_credentials(), &EXAMPLE_SCOPE, &request).ends_with(
                "Signature=fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
            )
        );
    }

    #[test]
    fn aws_example_list_objects() {
        let headers = headers(&[
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("x-amz-date", "20130524T000000Z"),
            ("x-amz-content-sha256", EMPTY_PAYLOAD_SHA256),
        ]);
        // Given out of order: the canonical query sorts them.
        let query = [
            ("prefix".to_string(), "J".to_string()),
            ("max-keys".to_string(), "2".to_string()),
        ];
        let request = Request {
            method: "GET",
            canonical_uri: "/",
            query: &query,
            headers: &headers,
            payload_sha256: EMPTY_PAYLOAD_SHA256,
        };
        assert!(
            authorization(&example_credentials(), &EXAMPLE_SCOPE, &request).ends_with(
                "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
            )
        );
    }

    /// Path-style requests as this crate sends them, checked against botocore 1.43 (the
    /// expected values come from `botocore.auth.S3SigV4Auth.add_auth` with
    /// `get_current_datetime` fixed at 2024-02-29T23:59:59):
    ///
    /// ```python
    /// req = AWSRequest(method="GET", url="http://127.0.0.1:5000/my-bucket?continuation-token="
    ///     "1ueGcxLPRx1Tr%2FXYExHnhbYLgveDs2J%2Fwm36Hy4vbOwM%3D&list-type=2"
    ///     "&prefix=pre%2Ffix%2Fbackups%2F", headers={"x-amz-content-sha256": EMPTY})
    /// S3SigV4Auth(Credentials("AKIDEXAMPLE", SECRET, "session/token+value="), "s3",
    ///     "eu-central-1").add_auth(req)
    /// req = AWSRequest(method="PUT", url="http://127.0.0.1:5000/my-bucket/pre/fix/backups/"
    ///     "db.sql.zst?partNumber=3&uploadId=2~abc%2Bdef")
    /// req.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    /// S3SigV4Auth(Credentials("AKIDEXAMPLE", SECRET), "s3", "us-east-1").add_auth(req)
    /// ```
    #[test]
    fn matches_botocore_for_path_style_requests() {
        let mut credentials =
            S3Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
        credentials.session_token = Some("session/token+value=".into());
        let list_headers = headers(&[
            ("host", "127.0.0.1:5000"),
            ("x-amz-content-sha256", EMPTY_PAYLOAD_SHA256),
            ("x-amz-date", "20240229T235959Z"),
            ("x-amz-security-token", "session/token+value="),
        ]);
        let query = [
            ("list-type".to_string(), "2".to_string()),
            ("prefix".to_string(), "pre/fix/backups/".to_string()),
            (
                "continuation-token".to_string(),
                "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=".to_string(),
            ),
        ];
        let list = Request {
            method: "GET",
            canonical_uri: &encode_path(["my-bucket"]),
            query: &query,
            headers: &list_headers,
            payload_sha256: EMPTY_PAYLOAD_SHA256,
        };
        let scope = Scope {
            amz_date: "20240229T235959Z",
            region: "eu-central-1",
            service: "s3",
        };
        assert_eq!(
            authorization(&credentials, &scope, &list),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240229/eu-central-1/s3/aws4_request, \
             SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token, \
             Signature=0fc92451606d029afb2c95a7005c37bc300cc07dfd934553fc3f02261a8e69c2"
        );

        credentials.session_token = None;
        let part_headers = headers(&[
            ("host", "127.0.0.1:5000"),
            ("x-amz-content-sha256", UNSIGNED_PAYLOAD),
            ("x-amz-date", "20240229T235959Z"),
        ]);
        let query = [
            ("uploadId".to_string(), "2~abc+def".to_string()),
            ("partNumber".to_string(), "3".to_string()),
        ];
        let part = Request {
            method: "PUT",
            canonical_uri: &encode_path("my-bucket/pre/fix/backups/db.sql.zst".split('/')),
            query: &query,
            headers: &part_headers,
            payload_sha256: UNSIGNED_PAYLOAD,
        };
        let scope = Scope {
            region: "us-east-1",
            ..scope
        };
        assert!(authorization(&credentials, &scope, &part).ends_with(
            "SignedHeaders=host;x-amz-content-sha256;x-amz-date, \
             Signature=cf08630d76b2a4d95b396b142c9717d82d0dd0adb0c00b70a23d23437e6ebe0a"
        ));
    }

    #[test]
    fn encoding() {
        assert_eq!(uri_encode("a-Z_0.~", true), "a-Z_0.~");
        assert_eq!(uri_encode("a/b c+d=é", true), "a%2Fb%20c%2Bd%3D%C3%A9");
        assert_eq!(uri_encode("a/b", false), "a/b");
        assert_eq!(encode_path(["bucket", "a b", "c"]), "/bucket/a%20b/c");
        assert_eq!(encode_path([]), "/");
        assert_eq!(
            query_string(&[
                ("uploadId".into(), "x/y+z=".into()),
                ("partNumber".into(), "2".into()),
                ("uploads".into(), String::new()),
            ]),
            "partNumber=2&uploadId=x%2Fy%2Bz%3D&uploads="
        );
        assert_eq!(normalize_header_value("  a   b  c "), "a b c");
    }

    #[test]
    fn amz_date_is_utc() {
        let at = time::macros::datetime!(2013-05-24 02:03:04 +02:00);
        assert_eq!(amz_date(at), "20130524T000304Z");
    }
}
