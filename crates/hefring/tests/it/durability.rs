//! Nothing is lost when the process dies: operations resume from their last finished task.

use serde_json::json;

use crate::harness::{attempts, Repo, Server};

/// `kill -9` while a build command runs: after a restart the operation resumes at that task
/// (its second attempt, from a fresh checkout) and the tasks before it do not run again.
#[tokio::test]
async fn killed_mid_task_the_operation_resumes_at_that_task_after_a_restart() {
    let mut server = Server::start().await;
    // A build writes only its own tree (below the build root, named by the operation).
    let repo = Repo::new(
        "runtime: php\nbuild:\n  - touch build-started; sleep 2; mkdir -p out; echo done > out/result\n",
    );
    let project = server
        .create("/projects", json!({"name": "p", "git_url": repo.url()}))
        .await;
    let project = project["id"].as_str().unwrap();
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;
    let id = op["id"].as_str().unwrap().to_string();
    let started = server
        .outside
        .path()
        .join("builds")
        .join(&id)
        .join("build-started");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !started.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.kill9();
    server.restart(&[]);
    let done = server.wait_op(&id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", server.log());
    assert_eq!(
        attempts(&done),
        [
            ("resolve_ref".to_string(), 1),
            ("check_out".to_string(), 1),
            ("run_build_commands".to_string(), 2),
            ("pack_artifact".to_string(), 1)
        ]
    );
    assert_eq!(
        done["attempt"], 1,
        "a resumed operation is the same attempt"
    );
    let log = server.log_text(&id).await;
    assert!(log.contains("checking out afresh"), "{log}");
    assert!(log.contains("resuming: attempt 2 of this task"), "{log}");
}

/// A crash injected at each named task of a build, in turn: every time, the operation
/// resumes after a restart and no finished task runs twice.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_crash_at_any_task_resumes_without_repeating_finished_tasks() {
    let tasks = [
        "resolve_ref",
        "check_out",
        "run_build_commands",
        "pack_artifact",
    ];
    for (crash_index, crash_at) in tasks.iter().enumerate() {
        let mut server = Server::start_with(&[], &[("HEFRING_FAULT_CRASH_AT", crash_at)]).await;
        let repo = Repo::new("runtime: php\nbuild: [\"echo build\"]\n");
        let project = server
            .create("/projects", json!({"name": "p", "git_url": repo.url()}))
            .await;
        let project = project["id"].as_str().unwrap().to_string();
        // The verify of the local target runs first; then the build crashes the process.
        let op = server
            .start_op(
                &format!("/projects/{project}/releases"),
                Some(json!({"ref": "main"})),
            )
            .await;
        let id = op["id"].as_str().unwrap().to_string();
        let status = server.wait_exit();
        assert!(
            !status.success(),
            "the injected crash at {crash_at} did not happen"
        );
        server.restart(&[]);
        let done = server.wait_op(&id).await;
        assert_eq!(
            done["status"],
            "succeeded",
            "crash at {crash_at}: {done}\n{}",
            server.log()
        );
        let counted: Vec<u64> = attempts(&done).into_iter().map(|(_, n)| n).collect();
        let expected: Vec<u64> = (0..tasks.len())
            .map(|i| if i == crash_index { 2 } else { 1 })
            .collect();
        assert_eq!(counted, expected, "crash at {crash_at}: {done}");
        assert_eq!(crate::harness::statuses(&done), ["succeeded"; 4]);
        let (_, release) = server
            .get(&format!(
                "/releases/{}",
                done["result"]["release"].as_str().unwrap()
            ))
            .await;
        assert_eq!(release["status"], "ready", "crash at {crash_at}: {release}");
    }
}
