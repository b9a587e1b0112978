//! Backups in an S3-compatible store: `hefring serve --backup-store s3://...` against moto with
//! authentication on (`tests/fixtures/moto`), the PHP fixture app on SQLite. The archive is
//! where the store's layout says, restores and downloads read it back, delete removes it, and
//! the secret key shows up in no process list, operation log or API answer.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hefring_objects::{ObjectInfo, ObjectStore, S3Credentials, S3};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::environments::{
    add_project, app_manifest, app_repo, build, local_target, page, site_client, target_root,
};
use crate::harness::Server;

/// moto's S3 from `tests/fixtures/moto/start.sh --auth`: every request's signature is checked
/// against the IAM user's key. Stopped when dropped.
struct Moto {
    endpoint: String,
    credentials: S3Credentials,
    dir: tempfile::TempDir,
}

fn fixture(script: &str) -> String {
    format!(
        "{}/../../tests/fixtures/moto/{script}",
        env!("CARGO_MANIFEST_DIR")
    )
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
            .unwrap();
        assert!(
            out.status.success(),
            "moto did not start (scripts/test installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let endpoint = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let written = std::fs::read_to_string(dir.path().join("credentials")).unwrap();
        let value = |name: &str| {
            written
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("no {name} in {}", dir.path().display()))
                .to_string()
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

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg(fixture("stop.sh"))
            .arg(self.dir.path())
            .status();
    }
}

/// Every process's command line that holds `secret`, as `PID: COMMAND`.
fn processes_showing(secret: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let command = String::from_utf8_lossy(&raw).replace('\0', " ");
        if command.contains(secret) {
            found.push(format!("{name}: {command}"));
        }
    }
    found
}

/// The pid of the `hefring serve` using `data_dir`.
fn server_pid(data_dir: &Path) -> u32 {
    let dir = data_dir.to_string_lossy();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "serve") && args.iter().any(|a| *a == dir) {
            return pid;
        }
    }
    panic!("no hefring serve for {dir}");
}

/// Starts an operation and waits for it to succeed, looking at every process's command line
/// while it runs (the commands it starts are short-lived).
async fn run_watched(server: &Server, path: &str, body: Option<Value>, secret: &str) -> Value {
    let op = server.start_op(path, body).await;
    let id = op["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let shown = processes_showing(secret);
        assert!(
            shown.is_empty(),
            "the secret is in a process list: {shown:?}"
        );
        let op = server.op(&id).await;
        match op["status"].as_str().unwrap() {
            "succeeded" => return op,
            "failed" | "cancelled" => panic!("{op}\n{}", server.log_text(&id).await),
            _ => {}
        }
        assert!(Instant::now() < deadline, "operation {id} stuck: {op}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A bucket in moto, and a `hefring serve` keeping its backups there below `installation-1`
/// (its credentials in the environment, as an installation would give them).
async fn serve_with_s3(moto: &Moto) -> (Server, S3) {
    let spec = format!(
        "s3://hefring-backups/installation-1?endpoint={}&region=us-east-1",
        moto.endpoint
    );
    S3::from_spec(&spec, moto.credentials.clone())
        .unwrap()
        .create_bucket()
        .await
        .unwrap();
    // The whole bucket, to see where Hefring's keys land.
    let bucket = S3::from_spec(
        &format!("s3://hefring-backups?endpoint={}", moto.endpoint),
        moto.credentials.clone(),
    )
    .unwrap();
    let server = Server::start_with(
        &["--backup-store", &spec, "--artifact-store", &spec],
        &[
            (
                "HEFRING_S3_ACCESS_KEY_ID",
                moto.credentials.access_key_id.as_str(),
            ),
            (
                "HEFRING_S3_SECRET_ACCESS_KEY",
                moto.credentials.secret_access_key.as_str(),
            ),
        ],
    )
    .await;
    (server, bucket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_live_in_s3_and_its_secret_stays_out_of_sight() {
    let moto = Moto::start();
    let secret = moto.credentials.secret_access_key.clone();
    let (server, bucket) = serve_with_s3(&moto).await;
    let root = target_root();
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "s3.test"}),
        )
        .await;
    let env = env["id"].as_str().unwrap().to_string();
    run_watched(
        &server,
        &format!("/environments/{env}/deploy"),
        Some(json!({"release": release})),
        &secret,
    )
    .await;
    let client = site_client(&["s3.test"], http, None);
    let url = format!("http://s3.test:{http}/");
    let database = root
        .path()
        .join(format!("environments/{env}/database/site.sqlite"));
    let add_rows = |n: usize| {
        let out = Command::new("sqlite3")
            .arg(&database)
            .arg("INSERT INTO hits VALUES (7);".repeat(n))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let upload = root
        .path()
        .join(format!("environments/{env}/files/uploads/kept.txt"));

    // The first version: two rows, an upload saying "v1"; backed up.
    add_rows(2);
    std::fs::write(&upload, "v1").unwrap();
    let (_, body) = page(&client, &url).await;
    assert!(
        body.contains("rows=2") && body.contains("upload=v1"),
        "{body}"
    );
    let op = run_watched(
        &server,
        &format!("/environments/{env}/backup"),
        None,
        &secret,
    )
    .await;
    let backup = op["result"]["backup"].as_str().unwrap().to_string();
    let (status, shown) = server.get(&format!("/backups/{backup}")).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["status"], "ready");
    let size = shown["size"].as_u64().unwrap();

    // The archive is in the bucket, below the prefix, with the size the API reports; nothing
    // went to the data directory.
    let key = format!("installation-1/backups/{env}/{backup}.tar.zst");
    assert_eq!(
        bucket.list("installation-1/backups/").await.unwrap(),
        [ObjectInfo {
            key: key.clone(),
            size
        }]
    );
    assert_eq!(bucket.head(&key).await.unwrap(), Some(size));
    assert!(!server.data_dir().join("backups").exists());

    // Changed, restored: the first version again (plus the row the deploy commands add).
    add_rows(3);
    std::fs::write(&upload, "v2").unwrap();
    let (_, body) = page(&client, &url).await;
    assert!(
        body.contains("rows=5") && body.contains("upload=v2"),
        "{body}"
    );
    let op = run_watched(
        &server,
        &format!("/environments/{env}/restore"),
        Some(json!({"backup": backup})),
        &secret,
    )
    .await;
    let (_, body) = page(&client, &url).await;
    assert!(
        body.contains("rows=3") && body.contains("upload=v1"),
        "{body}"
    );
    // The safety backup went to the bucket too.
    let safety = op["result"]["safety_backup"].as_str().unwrap();
    let safety_key = format!("installation-1/backups/{env}/{safety}.tar.zst");
    assert!(bucket.head(&safety_key).await.unwrap().is_some());

    // The download through the API is the object in the bucket, byte for byte.
    let response = server
        .raw(
            server
                .http()
                .get(format!("{}/api/v1/backups/{backup}/download", server.url))
                .bearer_auth(&server.token),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(shown["sha256"], hex::encode(Sha256::digest(&bytes)));
    let scratch = tempfile::tempdir().unwrap();
    let direct = scratch.path().join("direct.tar.zst");
    assert_eq!(bucket.get_to_file(&key, &direct).await.unwrap(), size);
    assert_eq!(std::fs::read(&direct).unwrap(), bytes);

    // Deleted: the object is gone from the bucket, the safety backup stays.
    let op = server
        .call(reqwest::Method::DELETE, &format!("/backups/{backup}"), None)
        .await;
    assert_eq!(op.0, StatusCode::ACCEPTED, "{}", op.1);
    let done = server.wait_op(op.1["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(bucket.head(&key).await.unwrap(), None);
    let left: Vec<String> = bucket
        .list("installation-1/backups/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(left, [safety_key]);
    assert_eq!(
        server.get(&format!("/backups/{backup}")).await.0,
        StatusCode::NOT_FOUND
    );

    // The secret is in no process's command line (the server's first), no operation log,
    // and no API answer; nor in the server's own log.
    let pid = server_pid(server.data_dir());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&secret));
    assert_eq!(processes_showing(&secret), Vec::<String>::new());
    let (status, operations) = server.get("/operations?limit=500").await;
    assert_eq!(status, StatusCode::OK);
    let listed = operations.to_string();
    assert!(!listed.contains(&secret), "{listed}");
    let ids: Vec<&str> = operations["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    assert!(ids.len() >= 6, "{listed}");
    for id in ids {
        let log = server.log_text(id).await;
        assert!(!log.contains(&secret), "operation {id}'s log: {log}");
        let one = server.op(id).await.to_string();
        assert!(!one.contains(&secret), "{one}");
    }
    let (_, backups) = server.get("/backups?limit=500").await;
    assert!(!backups.to_string().contains(&secret));
    assert!(!server.log().contains(&secret));
}

/// The project's own commands (build, install, deploy) run with what Hefring gives them, not
/// with `hefring serve`'s environment: a command printing its environment (as many deploy
/// scripts do) must not print the store's secret into the operation log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projects_commands_do_not_see_the_s3_secret() {
    let moto = Moto::start();
    let secret = moto.credentials.secret_access_key.clone();
    let (server, _) = serve_with_s3(&moto).await;
    let root = target_root();
    let (target, _, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let manifest = app_manifest("sqlite")
        .replace("install:\n", "build: [env]\ninstall:\n  - env\n")
        .replace(
            "  - [php, deploy.php]\n",
            "  - [php, deploy.php]\n  - env\n",
        );
    repo.commit(&[(".hefring.yml", &manifest)]);
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "env.test"}),
        )
        .await;
    let env = env["id"].as_str().unwrap().to_string();
    run_watched(
        &server,
        &format!("/environments/{env}/deploy"),
        Some(json!({"release": release})),
        &secret,
    )
    .await;
    let op = run_watched(
        &server,
        &format!("/environments/{env}/backup"),
        None,
        &secret,
    )
    .await;
    let backup = op["result"]["backup"].as_str().unwrap().to_string();
    run_watched(
        &server,
        &format!("/environments/{env}/restore"),
        Some(json!({"backup": backup})),
        &secret,
    )
    .await;
    let (_, operations) = server.get("/operations?limit=500").await;
    for kind in ["release_build", "environment_deploy", "environment_restore"] {
        let op = operations["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in {operations}"));
        let log = server.log_text(op["id"].as_str().unwrap()).await;
        assert!(
            log.contains("PATH="),
            "{kind} printed its environment: {log}"
        );
        assert!(
            !log.contains(&secret),
            "{kind} shows the secret to the project's commands: {log}"
        );
    }
}

/// Any worker can deploy what another built: the artifact is shared through the store, so a
/// machine without it (here: its copy removed) fetches it before it deploys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_built_elsewhere_is_fetched_from_the_artifact_store() {
    let moto = Moto::start();
    let (server, bucket) = serve_with_s3(&moto).await;
    let root = target_root();
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let (_, shown) = server.get(&format!("/releases/{release}")).await;
    let sha = shown["artifact"]["sha256"].as_str().unwrap().to_string();
    let key = format!("installation-1/artifacts/{sha}.tar.zst");
    assert_eq!(
        bucket.head(&key).await.unwrap(),
        shown["artifact"]["size"].as_u64(),
        "the artifact is in the store"
    );
    let local = server.data_dir().join(format!("artifacts/{sha}.tar.zst"));
    std::fs::remove_file(&local).unwrap();
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "elsewhere.test"}),
        )
        .await;
    let env = env["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(
            &format!("/environments/{env}/deploy"),
            Some(json!({"release": release})),
        )
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );
    assert!(local.is_file(), "fetched back to this machine");
    let client = site_client(&["elsewhere.test"], http, None);
    let (_, body) = page(&client, &format!("http://elsewhere.test:{http}/")).await;
    assert!(body.contains("release=1"), "{body}");
}
