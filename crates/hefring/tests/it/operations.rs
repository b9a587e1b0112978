//! Operations end to end: project verify, release build, retry, cancel, serialisation,
//! duplicates, and the log as text and as server-sent events.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::harness::{attempts, statuses, Repo, Server};

async fn add_project(server: &Server, name: &str, repo: &Repo) -> String {
    let project = server
        .create("/projects", json!({"name": name, "git_url": repo.url()}))
        .await;
    assert_eq!(project["branch"], "main");
    assert_eq!(project["status"], "new");
    project["id"].as_str().unwrap().to_string()
}

async fn build(server: &Server, project: &str, reference: &str) -> Value {
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": reference})),
        )
        .await;
    assert_eq!(op["kind"], "release_build");
    server.wait_op(op["id"].as_str().unwrap()).await
}

#[tokio::test]
async fn project_verify_reads_the_manifest_and_explains_what_is_wrong() {
    let server = Server::start().await;
    let repo = Repo::new("runtime: php\ndocroot: web\ndatabase: mariadb\ndeploy: [drush deploy]\n");
    let id = add_project(&server, "good", &repo).await;
    let op = server
        .start_op(&format!("/projects/{id}/verify"), None)
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(statuses(&done), ["succeeded", "succeeded"]);
    let (_, project) = server.get(&format!("/projects/{id}")).await;
    assert_eq!(project["status"], "verified");
    assert_eq!(project["manifest"]["database"], "mariadb");
    assert_eq!(project["manifest"]["docroot"], "web");

    // A typo in the manifest: the failure names the field.
    repo.commit(&[(".hefring.yml", "runtime: php\ndatabse: mariadb\n")]);
    let op = server
        .start_op(&format!("/projects/{id}/verify"), None)
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `databse`"),
        "{done}"
    );
    let (_, project) = server.get(&format!("/projects/{id}")).await;
    assert_eq!(project["status"], "invalid");

    // No manifest at all.
    repo.git(&["rm", "-q", ".hefring.yml"]);
    repo.git(&["commit", "-q", "-m", "drop manifest"]);
    let op = server
        .start_op(&format!("/projects/{id}/verify"), None)
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains(".hefring.yml is missing"),
        "{done}"
    );

    // A branch that does not exist, and a repository that does not exist.
    let other = server
        .create(
            "/projects",
            json!({"name": "nobranch", "git_url": repo.url(), "branch": "release"}),
        )
        .await;
    let op = server
        .start_op(
            &format!("/projects/{}/verify", other["id"].as_str().unwrap()),
            None,
        )
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("no branch named release"),
        "{done}"
    );
    let gone = server
        .create(
            "/projects",
            json!({"name": "gone", "git_url": "/nonexistent/repo.git"}),
        )
        .await;
    let op = server
        .start_op(
            &format!("/projects/{}/verify", gone["id"].as_str().unwrap()),
            None,
        )
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("cannot reach the repository"),
        "{done}"
    );
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert!(
        log.contains("fetch_repository stderr"),
        "git's own words are in the log: {log}"
    );
}

#[tokio::test]
async fn a_release_build_records_the_commit_and_an_immutable_artifact_reused_for_the_same_commit() {
    let server = Server::start().await;
    let repo = Repo::new(
        "runtime: php\nbuild:\n  - echo \"building $HEFRING_COMMIT\"\n  - [sh, -c, \"mkdir -p vendor && echo built > vendor/autoload.php\"]\n",
    );
    let commit = repo.git(&["rev-parse", "HEAD"]);
    repo.git(&["tag", "v1.0"]);
    let project = add_project(&server, "site", &repo).await;

    let done = build(&server, &project, "main").await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(statuses(&done), ["succeeded"; 4]);
    let release_id = done["result"]["release"]
        .as_str()
        .expect("the result names the release")
        .to_string();
    let (status, release) = server.get(&format!("/releases/{release_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(release["commit"], commit);
    assert_eq!(release["ref"], "main");
    assert_eq!(release["status"], "ready");
    assert_eq!(release["project"], project);
    assert_eq!(release["environments"], json!([]));
    assert_eq!(release["operation"], done["id"]);

    // The artifact is where its checksum says, with the built files and without .git.
    let sha = release["artifact"]["sha256"].as_str().unwrap();
    let path = server
        .data_dir()
        .join("artifacts")
        .join(format!("{sha}.tar.zst"));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&bytes)), sha);
    assert_eq!(release["artifact"]["size"], bytes.len() as u64);
    let list = std::process::Command::new("tar")
        .arg("--zstd")
        .arg("-tf")
        .arg(&path)
        .output()
        .unwrap();
    let names = String::from_utf8(list.stdout).unwrap();
    assert!(names.contains("vendor/autoload.php"), "{names}");
    assert!(names.contains("index.php"));
    assert!(!names.contains(".git/"), "{names}");
    let log = server.log_text(done["id"].as_str().unwrap()).await;
    assert!(
        log.contains(&format!("run_build_commands stdout building {commit}")),
        "{log}"
    );

    // The same commit by another name: no second build, the same release and artifact.
    let again = build(&server, &project, "v1.0").await;
    assert_eq!(again["status"], "succeeded");
    assert_eq!(again["result"]["release"], release_id.as_str());
    assert_eq!(
        statuses(&again),
        ["succeeded", "skipped", "skipped", "skipped"]
    );
    // By its full commit id, the request answers the original build at once.
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": commit})),
        )
        .await;
    assert_eq!(op["id"], done["id"]);
    let (_, releases) = server.get(&format!("/releases?project={project}")).await;
    assert_eq!(releases["items"].as_array().unwrap().len(), 1);

    // A new commit makes a new release with a different artifact.
    repo.commit(&[("index.php", "<?php echo 'v2';\n")]);
    let second = build(&server, &project, "main").await;
    let second_id = second["result"]["release"].as_str().unwrap();
    assert_ne!(second_id, release_id);
    let (_, releases) = server.get(&format!("/releases?project={project}")).await;
    assert_eq!(releases["items"][0]["id"], second_id, "newest first");
    assert_ne!(
        releases["items"][0]["artifact"]["sha256"],
        releases["items"][1]["artifact"]["sha256"]
    );
}

#[tokio::test]
async fn a_failed_build_rolls_back_and_a_retry_resumes_at_the_failed_task_keeping_the_old_log() {
    let server = Server::start().await;
    // The flag the build looks for: a port on loopback that something listens on (a build
    // sees no file outside its tree).
    let flag = crate::environments::free_port();
    let manifest = format!(
        "runtime: php\nbuild:\n  - echo step-one\n  - [bash, -c, \"(exec 3<>/dev/tcp/127.0.0.1/{flag}) 2>/dev/null || {{ echo missing flag >&2; exit 7; }}\"]\n"
    );
    let repo = Repo::new(&manifest);
    let project = add_project(&server, "flaky", &repo).await;
    let failed = build(&server, &project, "main").await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("build command 2"),
        "{failed}"
    );
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("exited with status 7"),
        "{failed}"
    );
    assert_eq!(
        statuses(&failed),
        ["succeeded", "succeeded", "failed", "pending", "succeeded"]
    );
    assert_eq!(failed["tasks"][4]["name"], "discard_build");
    assert_eq!(failed["tasks"][4]["rollback"], true);
    let (_, releases) = server.get(&format!("/releases?project={project}")).await;
    assert_eq!(releases["items"][0]["status"], "failed");
    let id = failed["id"].as_str().unwrap();

    // Retrying a failed operation while it is not failed is refused; a retry now resumes.
    let listening = std::net::TcpListener::bind(("127.0.0.1", flag)).unwrap();
    let retried = server
        .start_op(&format!("/operations/{id}/retry"), None)
        .await;
    assert_eq!(retried["attempt"], 2);
    assert_eq!(retried["status"], "queued");
    let done = server.wait_op(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        attempts(&done),
        [
            ("resolve_ref".to_string(), 1),
            ("check_out".to_string(), 1),
            ("run_build_commands".to_string(), 2),
            ("pack_artifact".to_string(), 1)
        ],
        "finished tasks did not run again; the rollback task of attempt 1 is gone"
    );
    let log = server.log_text(id).await;
    assert!(
        log.contains("run_build_commands stderr missing flag"),
        "attempt 1's log stays: {log}"
    );
    assert!(log.contains("pack_artifact hefring artifact"), "{log}");
    let (_, releases) = server.get(&format!("/releases?project={project}")).await;
    assert_eq!(releases["items"][0]["status"], "ready");
    let (status, body) = server.action(&format!("/operations/{id}/retry")).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a succeeded operation cannot be retried: {body}"
    );
    assert_eq!(body["error"]["code"], "conflict");

    // Building the same commit again, with the flag gone: the ready release is reused, so
    // the failing build command does not run at all.
    drop(listening);
    let failed = build(&server, &project, "main").await;
    assert_eq!(
        failed["status"], "succeeded",
        "the same commit is reused: {failed}"
    );
}

#[tokio::test]
async fn retry_from_start_runs_every_task_again() {
    let server = Server::start().await;
    let repo = Repo::new("runtime: php\nbuild: [\"exit 3\"]\n");
    let project = add_project(&server, "always-fails", &repo).await;
    let failed = build(&server, &project, "main").await;
    let id = failed["id"].as_str().unwrap();
    server
        .start_op(
            &format!("/operations/{id}/retry"),
            Some(json!({"from_start": true})),
        )
        .await;
    let done = server.wait_op(id).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["attempt"], 2);
    let counted: Vec<u64> = attempts(&done).into_iter().map(|(_, n)| n).collect();
    assert_eq!(counted, [2, 2, 2, 0, 1], "{done}");
}

#[tokio::test]
async fn cancel_kills_the_running_command_runs_the_rollback_and_ends_cancelled() {
    let server = Server::start().await;
    // A name no other process has in its command line.
    let marker = format!(
        "build-finished-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let repo = Repo::new(&format!(
        "runtime: php\nbuild:\n  - echo started\n  - sleep 30; touch {marker}\n"
    ));
    let project = add_project(&server, "slow", &repo).await;
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;
    let id = op["id"].as_str().unwrap();
    server
        .wait_for(id, |op| op["tasks"][2]["status"] == "running")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, cancelling) = server.action(&format!("/operations/{id}/cancel")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(cancelling["cancel_requested"], true);
    let started = std::time::Instant::now();
    let done = server.wait_op(id).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(
        statuses(&done),
        [
            "succeeded",
            "succeeded",
            "cancelled",
            "cancelled",
            "succeeded"
        ]
    );
    assert_eq!(done["tasks"][4]["name"], "discard_build");
    let tree = server.outside.path().join("builds").join(id);
    assert!(!tree.exists(), "the rollback removed the build tree");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!tree.join(&marker).exists());
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "the build command still runs: {}",
        String::from_utf8_lossy(&ps.stdout)
    );

    // Cancelling an ended operation is a conflict; a queued one ends at once.
    let (status, _) = server.action(&format!("/operations/{id}/cancel")).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn operations_on_one_subject_wait_their_turn_and_other_subjects_run_in_parallel() {
    let server = Server::start().await;
    // Each build says when it starts and ends, in its log (a build writes no file outside
    // its own tree).
    let manifest = "runtime: php\nbuild:\n  - echo \"stamp start $(date +%s%N)\"; sleep 1; echo \"stamp end $(date +%s%N)\"\n";
    let repo = Repo::new(manifest);
    repo.git(&["branch", "other"]);
    repo.commit(&[("changed.txt", "x")]);
    let a = add_project(&server, "a", &repo).await;
    let b = add_project(&server, "b", &repo).await;
    let first = server
        .start_op(
            &format!("/projects/{a}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;
    let second = server
        .start_op(
            &format!("/projects/{a}/releases"),
            Some(json!({"ref": "other"})),
        )
        .await;
    let third = server
        .start_op(
            &format!("/projects/{b}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;

    // The identical request while the first is active: 409 naming it.
    let (status, dup) = server
        .post(&format!("/projects/{a}/releases"), json!({"ref": "main"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{dup}");
    assert_eq!(dup["error"]["code"], "duplicate_operation");
    assert_eq!(dup["error"]["operation"], first["id"]);

    // While the first runs, the second on the same project is still queued.
    server
        .wait_for(first["id"].as_str().unwrap(), |op| {
            op["status"] == "running"
        })
        .await;
    let (_, queued) = server
        .get(&format!("/operations?subject={a}&status=queued"))
        .await;
    assert_eq!(queued["items"][0]["id"], second["id"], "{queued}");

    let mut logs = Vec::new();
    for op in [&first, &second, &third] {
        let id = op["id"].as_str().unwrap();
        let done = server.wait_op(id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        logs.push(server.log_text(id).await);
    }
    let interval = |text: &str| -> (u128, u128) {
        let stamp = |what: &str| -> u128 {
            text.lines()
                .find_map(|l| l.split_once(&format!("stdout stamp {what} ")))
                .unwrap_or_else(|| panic!("no {what} in {text}"))
                .1
                .trim()
                .parse()
                .unwrap()
        };
        (stamp("start"), stamp("end"))
    };
    let (a1, a2) = (interval(&logs[0]), interval(&logs[1]));
    let b1 = interval(&logs[2]);
    assert!(
        a1.1 <= a2.0 || a2.1 <= a1.0,
        "two builds of one project overlapped: {a1:?} {a2:?}"
    );
    assert!(
        a1.0 < b1.1 && b1.0 < a1.1 || a2.0 < b1.1 && b1.0 < a2.1,
        "different projects did not run in parallel"
    );
}

#[tokio::test]
async fn a_queued_operation_is_cancelled_at_once() {
    let server = Server::start().await;
    let repo = Repo::new("runtime: php\nbuild: [\"sleep 5\"]\n");
    repo.git(&["branch", "second"]);
    let project = add_project(&server, "p", &repo).await;
    let first = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;
    let waiting = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": "second"})),
        )
        .await;
    let (status, cancelled) = server
        .action(&format!(
            "/operations/{}/cancel",
            waiting["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(statuses(&cancelled).iter().all(|s| s == "cancelled"));
    server
        .action(&format!(
            "/operations/{}/cancel",
            first["id"].as_str().unwrap()
        ))
        .await;
    let done = server.wait_op(first["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "cancelled");
}

#[tokio::test]
async fn a_task_that_runs_too_long_is_killed_and_fails() {
    let server = Server::start_with(&["--task-timeout", "1"], &[]).await;
    let repo = Repo::new("runtime: php\nbuild: [\"sleep 20\"]\n");
    let project = add_project(&server, "p", &repo).await;
    let done = build(&server, &project, "main").await;
    assert_eq!(done["status"], "failed");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 1 s"),
        "{done}"
    );
}

#[tokio::test]
async fn the_log_streams_as_server_sent_events_until_the_operation_ends() {
    let server = Server::start().await;
    let repo =
        Repo::new("runtime: php\nbuild:\n  - for i in 1 2 3; do echo line-$i; sleep 0.3; done\n");
    let project = add_project(&server, "p", &repo).await;
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;
    let response = server
        .raw(
            server
                .http()
                .get(format!(
                    "{}/api/v1/operations/{}/log",
                    server.url,
                    op["id"].as_str().unwrap()
                ))
                .bearer_auth(&server.token)
                .header("accept", "text/event-stream"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = tokio::time::timeout(Duration::from_secs(60), response.text())
        .await
        .expect("the stream ends")
        .unwrap();
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events.last(), Some(&"end"), "{body}");
    assert!(events.contains(&"status"));
    let logs: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| l.contains("stdout line-"))
        .collect();
    assert_eq!(logs.len(), 3, "{body}");
    assert!(logs[0].ends_with("run_build_commands stdout line-1"));
    assert!(body.contains("data: succeeded"));
}
