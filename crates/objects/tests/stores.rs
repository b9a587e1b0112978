//! One story of what an object store must do, told against a directory and against a real
//! S3-compatible server: moto in server mode (`tests/fixtures/moto`), with IAM authentication
//! switched on, so every request's Signature Version 4 is checked by an independent
//! implementation (botocore's).

use std::io::{BufWriter, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use futures::StreamExt;
use hefring_objects::{open_store, ObjectError, ObjectInfo, ObjectStore, S3Credentials, S3};
use sha2::{Digest, Sha256};

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn local_dir_story() {
    let root = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let store = open_store(root.path().to_str().unwrap(), None).unwrap();
    assert_eq!(store.describe(), root.path().display().to_string());

    story(store.as_ref(), scratch.path(), true).await;

    // Nothing half-written stays behind, and what a crash would leave is never listed.
    assert_eq!(temp_files(root.path()), Vec::<PathBuf>::new());
    std::fs::write(root.path().join("story/list/.hefring~crashed"), b"partial").unwrap();
    let keys = keys(&store.list("story/list/").await.unwrap());
    assert_eq!(
        keys,
        ["story/list/one", "story/list/three/deep", "story/list/two"]
    );

    // `file://` names the same directory.
    let same = open_store(&format!("file://{}", root.path().display()), None).unwrap();
    assert_eq!(same.head("story/empty").await.unwrap(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_story_against_moto() {
    let moto = Moto::start();
    let credentials = moto.credentials.clone();
    let scratch = tempfile::tempdir().unwrap();

    // A store under a prefix, in us-east-1, with a 70 MiB file to go up in parts.
    let spec = format!(
        "s3://hefring-story/installation-1?endpoint={}&region=us-east-1",
        moto.endpoint
    );
    S3::from_spec(&spec, credentials.clone())
        .unwrap()
        .create_bucket()
        .await
        .unwrap();
    let store = open_store(&spec, Some(credentials.clone())).unwrap();
    assert_eq!(
        store.describe(),
        format!("s3://hefring-story/installation-1 at {}", moto.endpoint)
    );
    assert!(!store.describe().contains(&credentials.secret_access_key));
    story(store.as_ref(), scratch.path(), true).await;

    // The prefix really is a prefix in the bucket: a store on the whole bucket sees the keys
    // below it, and not the other way round.
    let whole = open_store(
        &format!("s3://hefring-story?endpoint={}", moto.endpoint),
        Some(credentials.clone()),
    )
    .unwrap();
    assert_eq!(
        whole.head("installation-1/story/empty").await.unwrap(),
        Some(0)
    );

    // Listing follows continuation tokens (S3 answers at most 1000 keys a page).
    let paged = S3::from_spec(
        &format!(
            "s3://hefring-story/installation-1?endpoint={}",
            moto.endpoint
        ),
        credentials.clone(),
    )
    .unwrap()
    .with_page_size(2);
    assert_eq!(
        paged.list("story/").await.unwrap(),
        store.list("story/").await.unwrap()
    );
    assert_eq!(
        keys(&paged.list("story/list").await.unwrap()),
        [
            "story/list/one",
            "story/list/three/deep",
            "story/list/two",
            "story/listing-elsewhere"
        ]
    );

    // Another region (a bucket created with its location constraint, requests signed for
    // eu-central-1), without a prefix; no big file this time.
    let spec = format!(
        "s3://hefring-story-eu?endpoint={}&region=eu-central-1",
        moto.endpoint
    );
    let eu = S3::from_spec(&spec, credentials.clone()).unwrap();
    eu.create_bucket().await.unwrap();
    eu.create_bucket().await.unwrap(); // already ours: fine
    let scratch = tempfile::tempdir().unwrap();
    story(&eu, scratch.path(), false).await;

    // Wrong credentials: the error names S3's code, and never the secret.
    let wrong_secret = "not-the-secret-8d0f2b6a4e";
    let wrong = open_store(
        &spec,
        Some(S3Credentials::new(
            credentials.access_key_id.clone(),
            wrong_secret,
        )),
    )
    .unwrap();
    let error = wrong.list("story/").await.unwrap_err();
    assert_s3_code(
        &error,
        403,
        "SignatureDoesNotMatch",
        &[wrong_secret, &credentials.secret_access_key],
    );
    let error = wrong
        .get_to_file("story/artifacts/a.tar", &scratch.path().join("x"))
        .await
        .unwrap_err();
    assert_s3_code(&error, 403, "SignatureDoesNotMatch", &[wrong_secret]);
    let small = scratch.path().join("small");
    std::fs::write(&small, b"tiny").unwrap();
    let error = wrong.put_file("story/tiny", &small).await.unwrap_err();
    assert_s3_code(&error, 403, "SignatureDoesNotMatch", &[wrong_secret]);
    assert_eq!(eu.head("story/tiny").await.unwrap(), None);

    let unknown = open_store(
        &spec,
        Some(S3Credentials::new("AKIAUNKNOWNKEY000000", wrong_secret)),
    )
    .unwrap();
    let error = unknown.list("").await.unwrap_err();
    assert_s3_code(&error, 403, "InvalidAccessKeyId", &[wrong_secret]);

    // A bucket that does not exist is an error, not an empty store or a missing object.
    let missing = open_store(
        &format!("s3://no-such-bucket?endpoint={}", moto.endpoint),
        Some(credentials.clone()),
    )
    .unwrap();
    let error = missing.list("").await.unwrap_err();
    assert_s3_code(&error, 404, "NoSuchBucket", &[]);
    let error = missing
        .get_to_file("a", &scratch.path().join("a"))
        .await
        .unwrap_err();
    assert_s3_code(&error, 404, "NoSuchBucket", &[]);
    let error = missing.delete("a").await.unwrap_err();
    assert_s3_code(&error, 404, "NoSuchBucket", &[]);
}

/// Invalid keys are refused before any request: against an endpoint where nothing listens,
/// they fail as InvalidKey, where a valid key fails to connect.
#[tokio::test]
async fn s3_refuses_invalid_keys_without_a_request() {
    let spec = format!("s3://bucket?endpoint=http://127.0.0.1:{}", free_port());
    let store = open_store(&spec, Some(S3Credentials::new("AKID", "secret"))).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    refuses_invalid_keys(store.as_ref(), scratch.path()).await;
    let error = store.head("valid/key").await.unwrap_err();
    assert!(matches!(error, ObjectError::Transport { .. }), "{error:?}");
}

/// The behaviour every store has. Keys go under `story/`.
async fn story(store: &dyn ObjectStore, scratch: &Path, big_file: bool) {
    refuses_invalid_keys(store, scratch).await;

    // A round trip, with the content checked three ways.
    let artifact = scratch.join("artifact.tar");
    write_pattern(&artifact, 100_003, 1);
    let key = "story/artifacts/a.tar";
    assert_eq!(store.put_file(key, &artifact).await.unwrap(), 100_003);
    assert_eq!(store.head(key).await.unwrap(), Some(100_003));
    let downloaded = scratch.join("downloads/a.tar");
    std::fs::create_dir_all(downloaded.parent().unwrap()).unwrap();
    assert_eq!(store.get_to_file(key, &downloaded).await.unwrap(), 100_003);
    assert_eq!(sha256_file(&downloaded), sha256_file(&artifact));
    let (size, mut stream) = store.open(key).await.unwrap();
    assert_eq!(size, 100_003);
    let mut hasher = Sha256::new();
    let mut streamed = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        streamed += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(streamed, 100_003);
    assert_eq!(hex::encode(hasher.finalize()), sha256_file(&artifact));
    // Only the downloaded file is there: its temporary file was renamed into place.
    assert_eq!(dir_names(&scratch.join("downloads")), ["a.tar"]);

    // A second put replaces the object; a second get replaces the file.
    write_pattern(&artifact, 4_321, 2);
    assert_eq!(store.put_file(key, &artifact).await.unwrap(), 4_321);
    assert_eq!(store.head(key).await.unwrap(), Some(4_321));
    assert_eq!(store.get_to_file(key, &downloaded).await.unwrap(), 4_321);
    assert_eq!(sha256_file(&downloaded), sha256_file(&artifact));

    // An empty object.
    let empty = scratch.join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_eq!(store.put_file("story/empty", &empty).await.unwrap(), 0);
    assert_eq!(store.head("story/empty").await.unwrap(), Some(0));
    let empty_copy = scratch.join("empty-copy");
    assert_eq!(
        store.get_to_file("story/empty", &empty_copy).await.unwrap(),
        0
    );
    assert_eq!(std::fs::read(&empty_copy).unwrap(), b"");

    // Listing: sorted, with sizes, by plain string prefix.
    for (key, size) in [
        ("story/list/two", 2),
        ("story/list/one", 1),
        ("story/list/three/deep", 3),
        ("story/listing-elsewhere", 4),
    ] {
        let file = scratch.join("listed");
        write_pattern(&file, size, 3);
        store.put_file(key, &file).await.unwrap();
    }
    assert_eq!(
        store.list("story/list/").await.unwrap(),
        [
            info("story/list/one", 1),
            info("story/list/three/deep", 3),
            info("story/list/two", 2),
        ]
    );
    assert_eq!(
        keys(&store.list("story/list").await.unwrap()),
        [
            "story/list/one",
            "story/list/three/deep",
            "story/list/two",
            "story/listing-elsewhere"
        ]
    );
    assert_eq!(
        keys(&store.list("story/list/t").await.unwrap()),
        ["story/list/three/deep", "story/list/two"]
    );
    assert_eq!(store.list("story/nothing/").await.unwrap(), []);
    assert!(keys(&store.list("").await.unwrap()).contains(&"story/empty".to_owned()));

    // A big file (over the single-PUT limit of S3 stores: a multipart upload in 16 MiB
    // parts, the last one short), each part's position checked by the content.
    if big_file {
        let big = scratch.join("big");
        let size = 70 * MIB + 3;
        write_pattern(&big, size, 4);
        assert_eq!(store.put_file("story/big.tar", &big).await.unwrap(), size);
        assert_eq!(store.head("story/big.tar").await.unwrap(), Some(size));
        let big_copy = scratch.join("big-copy");
        assert_eq!(
            store.get_to_file("story/big.tar", &big_copy).await.unwrap(),
            size
        );
        assert_eq!(sha256_file(&big_copy), sha256_file(&big));
        std::fs::remove_file(&big).unwrap();
        std::fs::remove_file(&big_copy).unwrap();
        store.delete("story/big.tar").await.unwrap();
    }

    // Missing objects.
    let nowhere = scratch.join("nowhere");
    let error = store
        .get_to_file("story/missing", &nowhere)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ObjectError::NotFound { key } if key == "story/missing"),
        "{error:?}"
    );
    assert!(!nowhere.exists());
    let error = store.open("story/missing").await.err().unwrap();
    assert!(matches!(error, ObjectError::NotFound { .. }), "{error:?}");
    assert_eq!(store.head("story/missing").await.unwrap(), None);
    // A key below an object is missing too (a directory store cannot even hold it).
    assert_eq!(store.head("story/empty/below").await.unwrap(), None);

    // Deleting is idempotent.
    store.delete(key).await.unwrap();
    store.delete(key).await.unwrap();
    store.delete("story/never-there").await.unwrap();
    assert_eq!(store.head(key).await.unwrap(), None);
    let error = store.get_to_file(key, &downloaded).await.unwrap_err();
    assert!(matches!(error, ObjectError::NotFound { .. }), "{error:?}");
    assert!(!keys(&store.list("story/").await.unwrap()).contains(&key.to_owned()));
}

async fn refuses_invalid_keys(store: &dyn ObjectStore, scratch: &Path) {
    let file = scratch.join("for-invalid-keys");
    std::fs::write(&file, b"x").unwrap();
    let long = "k".repeat(513);
    for key in [
        "",
        "/abs",
        "trailing/",
        "a//b",
        "../escape",
        "a/../../escape",
        "a/./b",
        ".",
        "with space",
        "per%cent",
        "ünicode",
        "new\nline",
        long.as_str(),
    ] {
        let is_invalid = |result: Result<(), ObjectError>| {
            assert!(
                matches!(result, Err(ObjectError::InvalidKey { .. })),
                "{key:?}: {result:?}"
            )
        };
        is_invalid(store.put_file(key, &file).await.map(drop));
        is_invalid(store.get_to_file(key, &scratch.join("out")).await.map(drop));
        is_invalid(store.open(key).await.map(drop));
        is_invalid(store.head(key).await.map(drop));
        is_invalid(store.delete(key).await);
    }
    for prefix in ["/", "../", "a//", "a b/"] {
        let result = store.list(prefix).await;
        assert!(
            matches!(result, Err(ObjectError::InvalidKey { .. })),
            "{prefix:?}: {result:?}"
        );
    }
    assert!(!scratch.join("out").exists());
}

#[track_caller]
fn assert_s3_code(error: &ObjectError, status: u16, code: &str, secrets: &[&str]) {
    match error {
        ObjectError::S3 {
            status: actual_status,
            code: Some(actual_code),
            ..
        } if *actual_status == status && actual_code == code => {}
        other => panic!("expected HTTP {status} {code}, got {other:?}"),
    }
    let shown = format!("{error} / {error:?}");
    assert!(shown.contains(code), "{shown}");
    for secret in secrets {
        assert!(!shown.contains(secret), "the error shows a secret: {shown}");
    }
}

fn info(key: &str, size: u64) -> ObjectInfo {
    ObjectInfo {
        key: key.to_owned(),
        size,
    }
}

fn keys(infos: &[ObjectInfo]) -> Vec<String> {
    infos.iter().map(|info| info.key.clone()).collect()
}

/// A file whose every 8 bytes say where they are (and which file it is), so a part sent
/// twice or out of order changes the checksum.
fn write_pattern(path: &Path, size: u64, seed: u64) {
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut written = 0;
    let mut index: u64 = 0;
    while written < size {
        let word = (index ^ (seed << 56)).to_le_bytes();
        let n = (size - written).min(8) as usize;
        out.write_all(&word[..n]).unwrap();
        written += n as u64;
        index += 1;
    }
    out.flush().unwrap();
}

fn sha256_file(path: &Path) -> String {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    hex::encode(hasher.finalize())
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(temp_files(&path));
        } else if path.to_string_lossy().contains('~') {
            found.push(path);
        }
    }
    found
}

/// A port nothing listens on (moto cannot be told to pick one itself).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// moto's S3 (and IAM) on a port of its own, from `tests/fixtures/moto/start.sh --auth`: every
/// request's signature and the user's policy are checked. Stopped when dropped.
struct Moto {
    endpoint: String,
    credentials: S3Credentials,
    dir: tempfile::TempDir,
}

impl Moto {
    fn start() -> Moto {
        let dir = tempfile::Builder::new()
            .prefix("hefring-moto-")
            .tempdir()
            .unwrap();
        let out = Command::new("sh")
            .arg(fixture("start.sh"))
            .arg("--auth")
            .arg(dir.path())
            .output()
            .expect("running tests/fixtures/moto/start.sh");
        assert!(
            out.status.success(),
            "moto did not start (scripts/test installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let endpoint = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let credentials = std::fs::read_to_string(dir.path().join("credentials")).unwrap();
        let value = |name: &str| {
            credentials
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {name} from start.sh --auth"))
                .to_owned()
        };
        let credentials = S3Credentials::new(
            value("HEFRING_S3_ACCESS_KEY_ID"),
            value("HEFRING_S3_SECRET_ACCESS_KEY"),
        );
        Moto {
            endpoint,
            credentials,
            dir,
        }
    }
}

fn fixture(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../tests/fixtures/moto/{script}"))
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg(fixture("stop.sh"))
            .arg(self.dir.path())
            .status();
    }
}
