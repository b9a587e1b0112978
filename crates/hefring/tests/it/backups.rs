//! Backups, restores, clones and syncs of the PHP fixture app on real MariaDB, nginx and
//! PHP-FPM; and backups that must fail because they would be incomplete.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use hefring_core::environment::database_name;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::environments::{
    add_project, app_repo, build, ensure_mariadb, local_target, mariadb, page, site_client,
    target_root,
};
use crate::harness::Server;

async fn new_env(server: &Server, project: &str, target: &str, name: &str, domain: &str) -> String {
    let env = server
        .create(
            "/environments",
            json!({"name": name, "project": project, "target": target, "domain": domain}),
        )
        .await;
    env["id"].as_str().unwrap().to_string()
}

/// Starts an operation and waits for it; fails the test with its log unless it succeeded.
async fn run_ok(server: &Server, path: &str, body: Option<Value>) -> Value {
    let op = server.start_op(path, body).await;
    let id = op["id"].as_str().unwrap().to_string();
    let done = server.wait_op(&id).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}",
        server.log_text(&id).await
    );
    done
}

fn set_upload(root: &std::path::Path, env: &str, text: &str) {
    std::fs::write(
        root.join(format!("environments/{env}/files/uploads/kept.txt")),
        text,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_restore_into_the_same_and_another_environment_clone_and_sync() {
    ensure_mariadb();
    let server = Server::start().await;
    let root = target_root();
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("mariadb");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let live = new_env(&server, &project, &target, "live", "live.test").await;
    let staging = new_env(&server, &project, &target, "staging", "staging.test").await;
    for env in [&live, &staging] {
        run_ok(
            &server,
            &format!("/environments/{env}/deploy"),
            Some(json!({"release": release})),
        )
        .await;
    }
    let client = site_client(&["live.test", "staging.test", "copy.test"], http, None);
    let at = |host: &str| format!("http://{host}:{http}/");

    // The first version of live: two rows, an upload saying "v1".
    mariadb(&format!(
        "INSERT INTO {}.hits VALUES (1), (2);",
        database_name(&live)
    ))
    .unwrap();
    set_upload(root.path(), &live, "v1");
    let (_, body) = page(&client, &at("live.test")).await;
    assert!(
        body.contains("rows=2") && body.contains("upload=v1"),
        "{body}"
    );

    let op = run_ok(
        &server,
        &format!("/environments/{live}/backup"),
        Some(json!({"description": "before the edit"})),
    )
    .await;
    let tasks: Vec<&str> = op["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(tasks, ["dump_database", "pack_archive", "store_archive"]);
    let first = op["result"]["backup"].as_str().unwrap().to_string();
    let (status, listed) = server.get(&format!("/backups?environment={live}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    let shown = &listed["items"][0];
    assert_eq!(shown["id"], first.as_str());
    assert_eq!(shown["status"], "ready");
    assert_eq!(shown["kind"], "manual");
    assert_eq!(shown["description"], "before the edit");
    let manifest = &shown["manifest"];
    assert_eq!(manifest["environment"], live.as_str());
    assert_eq!(manifest["release"], release.as_str());
    assert_eq!(manifest["database"]["kind"], "mariadb");
    assert_eq!(manifest["database"]["tables"], 1);
    assert!(
        manifest["files"]["count"].as_u64().unwrap() >= 2,
        "{manifest}"
    );
    assert!(manifest["tools"]["mysqldump"].is_string(), "{manifest}");

    // The download is the archive the record describes, with the parts the manifest lists.
    let response = server
        .raw(
            server
                .http()
                .get(format!("{}/api/v1/backups/{first}/download", server.url))
                .bearer_auth(&server.token),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.bytes().await.unwrap();
    assert_eq!(shown["size"], bytes.len() as u64);
    assert_eq!(shown["sha256"], hex::encode(Sha256::digest(&bytes)));
    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("a.tar.zst");
    std::fs::write(&archive, &bytes).unwrap();
    let listing = Command::new("sh")
        .arg("-c")
        .arg(r#"zstd -q -d -c "$1" | tar -t -f -"#)
        .arg("sh")
        .arg(&archive)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for part in [
        "manifest.json",
        "database.sql",
        "files.sha256",
        "files/uploads/kept.txt",
    ] {
        assert!(listing.lines().any(|l| l == part), "{part} in {listing}");
    }

    // Edit again, restore, and see the first version (plus the row the deploy command adds).
    mariadb(&format!(
        "INSERT INTO {}.hits VALUES (3), (4), (5);",
        database_name(&live)
    ))
    .unwrap();
    set_upload(root.path(), &live, "v2");
    let (_, body) = page(&client, &at("live.test")).await;
    assert!(
        body.contains("rows=5") && body.contains("upload=v2"),
        "{body}"
    );
    let op = run_ok(
        &server,
        &format!("/environments/{live}/restore"),
        Some(json!({"backup": first})),
    )
    .await;
    let safety = op["result"]["safety_backup"].as_str().unwrap().to_string();
    let (_, body) = page(&client, &at("live.test")).await;
    assert!(
        body.contains("rows=3") && body.contains("upload=v1"),
        "{body}"
    );
    // The safety backup holds what the restore replaced.
    let (_, shown) = server.get(&format!("/backups/{safety}")).await;
    assert_eq!(shown["kind"], "safety");
    assert_eq!(shown["status"], "ready");
    assert_eq!(shown["manifest"]["database"]["kind"], "mariadb");

    // Production's backup into staging.
    run_ok(
        &server,
        &format!("/environments/{staging}/restore"),
        Some(json!({"backup": first})),
    )
    .await;
    let (_, body) = page(&client, &at("staging.test")).await;
    assert!(
        body.contains("rows=3") && body.contains("upload=v1"),
        "{body}"
    );

    // A clone to a new domain shows the same content (plus its deploy command's row).
    let op = run_ok(
        &server,
        &format!("/environments/{live}/clone"),
        Some(json!({"name": "copy", "domain": "copy.test"})),
    )
    .await;
    let copy = op["result"]["environment"].as_str().unwrap().to_string();
    assert_eq!(op["subject"]["id"], copy.as_str());
    let (_, shown) = server.get(&format!("/environments/{copy}")).await;
    assert_eq!(shown["status"], "active", "{shown}");
    assert_eq!(shown["release"], release.as_str());
    let (status, body) = page(&client, &at("copy.test")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("rows=4") && body.contains("upload=v1"),
        "{body}"
    );
    assert_ne!(database_name(&copy), database_name(&live));
    // The backup that carried the data across has left the store (and the API, as a
    // deleted backup does).
    let carried = op["result"]["backup"].as_str().unwrap().to_string();
    let (status, record) = server.get(&format!("/backups/{carried}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{record}");
    assert!(!server
        .data_dir()
        .join(format!("backups/backups/{live}/{carried}.tar.zst"))
        .exists());

    // Sync the files only: staging gets live's upload, keeps its own database.
    mariadb(&format!(
        "INSERT INTO {}.hits VALUES (6), (7), (8), (9), (10);",
        database_name(&live)
    ))
    .unwrap();
    set_upload(root.path(), &live, "v3");
    let op = run_ok(
        &server,
        &format!("/environments/{staging}/sync"),
        Some(json!({"from": live, "database": false})),
    )
    .await;
    let restored: Vec<(&str, &str)> = op["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["status"].as_str().unwrap()))
        .collect();
    assert!(
        restored.contains(&("restore_database", "skipped")),
        "{restored:?}"
    );
    assert!(
        restored.contains(&("restore_files", "succeeded")),
        "{restored:?}"
    );
    let (_, body) = page(&client, &at("staging.test")).await;
    assert!(
        body.contains("rows=4") && body.contains("upload=v3"),
        "{body}"
    );
    // No copy is left behind by the sync either; the other backups of live are still there.
    let (_, copies) = server
        .get(&format!("/backups?environment={live}&kind=copy"))
        .await;
    assert_eq!(copies["items"], json!([]), "{copies}");
    let (_, kept) = server.get(&format!("/backups?environment={live}")).await;
    assert!(!kept["items"].as_array().unwrap().is_empty(), "{kept}");

    // Deleting a backup removes its archive from the store.
    let stored = server
        .data_dir()
        .join(format!("backups/backups/{live}/{first}.tar.zst"));
    assert!(stored.is_file(), "{}", stored.display());
    let op = server
        .call(reqwest::Method::DELETE, &format!("/backups/{first}"), None)
        .await;
    assert_eq!(op.0, StatusCode::ACCEPTED, "{}", op.1);
    let done = server.wait_op(op.1["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(!stored.exists());
    assert_eq!(
        server.get(&format!("/backups/{first}")).await.0,
        StatusCode::NOT_FOUND
    );

    // Bad requests are refused, naming the field, and start nothing.
    let refusals = [
        (
            format!("/environments/{live}/restore"),
            json!({"backup": "bak_nope"}),
            "backup",
        ),
        (format!("/environments/{live}/restore"), json!({}), "backup"),
        (
            format!("/environments/{live}/sync"),
            json!({"from": live}),
            "from",
        ),
        (
            format!("/environments/{live}/sync"),
            json!({"from": staging, "database": false, "files": false}),
            "database",
        ),
        (
            format!("/environments/{live}/clone"),
            json!({"name": "again", "domain": "staging.test"}),
            "domain",
        ),
        (
            format!("/environments/{live}/clone"),
            json!({"name": "Bad Name", "domain": "fine.test"}),
            "name",
        ),
        (
            format!("/environments/{live}/backup"),
            json!({"description": "a\nb"}),
            "description",
        ),
    ];
    let (_, before) = server.get("/operations?limit=500").await;
    for (path, body, field) in refusals {
        let (status, answer) = server.post(&path, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path} {body}: {answer}"
        );
        assert_eq!(answer["error"]["field"], field, "{path} {body}: {answer}");
    }
    let (_, after) = server.get("/operations?limit=500").await;
    assert_eq!(
        before["items"].as_array().unwrap().len(),
        after["items"].as_array().unwrap().len()
    );
    let (_, envs) = server.get("/environments").await;
    assert_eq!(
        envs["items"].as_array().unwrap().len(),
        3,
        "no environment was made"
    );
    // A new environment has nothing to back up.
    let fresh = new_env(&server, &project, &target, "fresh", "fresh.test").await;
    let (status, answer) = server
        .action(&format!("/environments/{fresh}/backup"))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_dump_or_an_unreadable_file_fails_the_backup() {
    ensure_mariadb();
    // A mysqldump that exits 0 but leaves its dump cut short, as a full disk or a killed
    // process would.
    let tools = tempfile::tempdir().unwrap();
    // Target verify looks for mariadb-dump first, then mysqldump.
    let wrapper = tools.path().join("mariadb-dump");
    std::fs::write(
        &wrapper,
        r#"#!/bin/sh
# Told to, it cuts the dump short (its --result-file, or its standard output) and says all
# went well.
if [ -f "$(dirname "$0")/truncate" ]; then
  out=""
  for a in "$@"; do case $a in --result-file=*) out=${a#--result-file=} ;; esac; done
  if [ -z "$out" ]; then /usr/bin/mariadb-dump "$@" | head -n 20; exit 0; fi
  /usr/bin/mariadb-dump "$@" || exit
  head -n 20 "$out" > "$out.cut" && mv "$out.cut" "$out"
  exit 0
fi
exec /usr/bin/mariadb-dump "$@"
"#,
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let flag = tools.path().join("truncate");
    let path = format!(
        "{}:{}",
        tools.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let server = Server::start_with(&[], &[("PATH", path.as_str())]).await;
    let root = target_root();
    let (target, _, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("mariadb");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = new_env(&server, &project, &target, "live", "cut.test").await;
    run_ok(
        &server,
        &format!("/environments/{env}/deploy"),
        Some(json!({"release": release})),
    )
    .await;
    // A whole backup works through the wrapper.
    run_ok(&server, &format!("/environments/{env}/backup"), None).await;

    std::fs::write(&flag, "").unwrap();
    let op = server
        .start_op(&format!("/environments/{env}/backup"), None)
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("incomplete"),
        "{done}"
    );
    std::fs::remove_file(&flag).unwrap();

    // A persistent file the site cannot read.
    let secret = root
        .path()
        .join(format!("environments/{env}/files/uploads/secret.txt"));
    std::fs::write(&secret, "hidden").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    let op = server
        .start_op(&format!("/environments/{env}/backup"), None)
        .await;
    let id = op["id"].as_str().unwrap().to_string();
    let done = server.wait_op(&id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("cannot be read"),
        "{done}"
    );
    let log = server.log_text(&id).await;
    assert!(log.contains("secret.txt"), "the log names the file: {log}");

    // Only the good backup is listed as ready; the failed ones say so and left no archive
    // and no working files.
    let (_, listed) = server.get(&format!("/backups?environment={env}")).await;
    let statuses: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["failed", "failed", "ready"], "{listed}");
    let stored: Vec<_> =
        std::fs::read_dir(server.data_dir().join(format!("backups/backups/{env}")))
            .unwrap()
            .collect();
    assert_eq!(stored.len(), 1);
    let work: Vec<_> = std::fs::read_dir(root.path().join("backups"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(work.is_empty(), "{work:?}");

    // A damaged archive is refused before anything is replaced: one byte changed in the store.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::remove_file(&secret).unwrap();
    let good = listed["items"][2]["id"].as_str().unwrap().to_string();
    let stored = stored[0].as_ref().unwrap().path();
    let mut bytes = std::fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();
    let upload = root
        .path()
        .join(format!("environments/{env}/files/uploads/kept.txt"));
    std::fs::write(&upload, "after the backup").unwrap();
    let op = server
        .start_op(
            &format!("/environments/{env}/restore"),
            Some(json!({"backup": good})),
        )
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("damaged"),
        "{done}"
    );
    assert_eq!(
        std::fs::read_to_string(&upload).unwrap(),
        "after the backup"
    );
    let work: Vec<_> = std::fs::read_dir(root.path().join("backups"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        work.is_empty(),
        "the unpacked archive was removed: {work:?}"
    );
}

/// The process dies at each task of a backup, then of a restore, in turn: after a restart
/// each operation resumes at that task, finishes, and leaves one backup record, ready, and no
/// working files.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_and_restores_resume_after_a_crash_at_any_task() {
    use crate::harness::attempts;
    let backup_tasks = ["dump_database", "pack_archive", "store_archive"];
    let restore_tasks = [
        "take_safety_backup",
        "fetch_backup",
        "restore_database",
        "restore_files",
        "run_deploy_commands",
    ];
    let root = target_root();
    let mut server = Server::start().await;
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = new_env(&server, &project, &target, "live", "crash.test").await;
    run_ok(
        &server,
        &format!("/environments/{env}/deploy"),
        Some(json!({"release": release})),
    )
    .await;
    let client = site_client(&["crash.test"], http, None);
    let mut first = None;
    for (kind, tasks) in [
        ("backup", &backup_tasks[..]),
        ("restore", &restore_tasks[..]),
    ] {
        for (index, crash_at) in tasks.iter().enumerate() {
            set_upload(root.path(), &env, &format!("{kind}-{crash_at}"));
            server.kill9();
            server.restart(&[("HEFRING_FAULT_CRASH_AT", crash_at)]);
            let body = match (kind, &first) {
                ("restore", Some(backup)) => Some(json!({"backup": backup})),
                _ => None,
            };
            let op = server
                .start_op(&format!("/environments/{env}/{kind}"), body)
                .await;
            let id = op["id"].as_str().unwrap().to_string();
            assert!(
                !server.wait_exit().success(),
                "the injected crash at {crash_at} did not happen"
            );
            server.restart(&[]);
            let done = server.wait_op(&id).await;
            assert_eq!(
                done["status"],
                "succeeded",
                "{kind}, crash at {crash_at}: {done}\n{}",
                server.log_text(&id).await
            );
            let counted: Vec<u64> = attempts(&done).into_iter().map(|(_, n)| n).collect();
            let expected: Vec<u64> = (0..tasks.len())
                .map(|i| if i == index { 2 } else { 1 })
                .collect();
            assert_eq!(counted, expected, "{kind}, crash at {crash_at}: {done}");
            if kind == "backup" {
                first.get_or_insert(done["result"]["backup"].as_str().unwrap().to_string());
            } else {
                // The first backup's upload is back.
                let (_, body) = page(&client, &format!("http://crash.test:{http}/")).await;
                assert!(body.contains("upload=backup-dump_database"), "{body}");
            }
        }
    }
    // One backup per backup operation and one safety backup per restore, all ready.
    let (_, listed) = server.get(&format!("/backups?environment={env}")).await;
    let items = listed["items"].as_array().unwrap();
    assert_eq!(
        items.len(),
        backup_tasks.len() + restore_tasks.len(),
        "{listed}"
    );
    assert!(items.iter().all(|b| b["status"] == "ready"), "{listed}");
    let stored = std::fs::read_dir(server.data_dir().join(format!("backups/backups/{env}")))
        .unwrap()
        .count();
    assert_eq!(stored, items.len());
    let work: Vec<_> = std::fs::read_dir(root.path().join("backups"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(work.is_empty(), "{work:?}");
}
