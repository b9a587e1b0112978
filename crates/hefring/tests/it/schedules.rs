//! The scheduler on a driven clock: the manifest's cron command runs on its schedule through
//! the queue (an override too), a run due while the last still runs is skipped and recorded,
//! and scheduled backups are pruned to their retention across weeks of simulated days.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::environments::{
    add_project, build, local_target, target_root, APP_DEPLOY, APP_INDEX, APP_INSTALL,
};
use crate::harness::{Repo, Server};

/// Appends the run to `cron.log` in the persistent files; sleeps while `SLOW` is there (PHP
/// caches what it learnt of a file: the cache is cleared each time round).
const CRON: &str = r#"<?php
$files = getenv('FILES_DIR');
while (is_file("$files/SLOW")) { usleep(100000); clearstatcache(); }
file_put_contents("$files/cron.log", "ran\n", FILE_APPEND);
echo "cron ran\n";
"#;

async fn tick(server: &Server, now: &str) -> Value {
    let (status, pass) = server.post("/scheduler/tick", json!({ "now": now })).await;
    assert_eq!(status, StatusCode::OK, "{pass}");
    pass
}

/// Ticks and waits for every operation the pass started.
async fn tick_and_wait(server: &Server, now: &str) -> Vec<Value> {
    let pass = tick(server, now).await;
    let mut done = Vec::new();
    for op in pass["started"].as_array().unwrap() {
        let finished = server.wait_op(op["id"].as_str().unwrap()).await;
        assert_eq!(
            finished["status"],
            "succeeded",
            "{finished}\n{}",
            server.log_text(finished["id"].as_str().unwrap()).await
        );
        done.push(finished);
    }
    done
}

fn kinds(ops: &[Value]) -> Vec<&str> {
    ops.iter().map(|op| op["kind"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_runs_on_schedule_and_scheduled_backups_keep_their_retention() {
    let server = Server::start_with(&["--scheduler-clock", "manual"], &[]).await;
    let root = target_root();
    let (target, _, _) = local_target(&server, "web", root.path()).await;
    let repo = Repo::new(
        "database: sqlite\nwritable: [uploads]\ninstall: [php install.php]\ndeploy: [php deploy.php]\nhealth: /index.php\ncron: {schedule: \"0 * * * *\", command: php cron.php}\n",
    );
    repo.commit(&[
        ("index.php", APP_INDEX),
        ("install.php", APP_INSTALL),
        ("deploy.php", APP_DEPLOY),
        ("cron.php", CRON),
        ("VERSION", "1\n"),
        ("uploads/.keep", ""),
    ]);
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "cron.test"}),
        )
        .await;
    let env = env["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(
            &format!("/environments/{env}/deploy"),
            Some(json!({"release": release})),
        )
        .await;
    assert_eq!(
        server.wait_op(op["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    let files = root.path().join(format!("environments/{env}/files"));
    let runs = || {
        std::fs::read_to_string(files.join("cron.log"))
            .unwrap_or_default()
            .lines()
            .count()
    };

    let (_, shown) = server.get(&format!("/environments/{env}/schedules")).await;
    assert_eq!(shown["cron"], "0 * * * *", "{shown}");
    assert_eq!(shown["cron_source"], "manifest");
    assert_eq!(shown["cron_command"], "php cron.php");
    assert!(shown["last_cron_run"].is_null());

    // The first pass only starts counting; nothing is due before the hour.
    assert!(tick_and_wait(&server, "2030-01-06T00:30:00Z")
        .await
        .is_empty());
    assert!(tick_and_wait(&server, "2030-01-06T00:59:59Z")
        .await
        .is_empty());
    let ran = tick_and_wait(&server, "2030-01-06T01:00:00Z").await;
    assert_eq!(kinds(&ran), ["environment_cron"]);
    assert_eq!(
        ran[0]["inputs"]["scheduled_for"],
        "2030-01-06T01:00:00.000Z"
    );
    assert_eq!(ran[0]["requested_by"], "scheduler");
    assert_eq!(runs(), 1);
    assert!(server
        .log_text(ran[0]["id"].as_str().unwrap())
        .await
        .contains("cron ran"));
    let (_, shown) = server.get(&format!("/environments/{env}/schedules")).await;
    assert_eq!(shown["last_cron_run"]["id"], ran[0]["id"]);
    assert_eq!(shown["last_cron_run"]["status"], "succeeded");
    // A late pass runs a missed slot once, not once per missed hour.
    let ran = tick_and_wait(&server, "2030-01-06T05:30:00Z").await;
    assert_eq!(kinds(&ran), ["environment_cron"]);
    assert_eq!(runs(), 2);

    // An override: every ten minutes. A run due while the last one still runs is skipped.
    let (status, shown) = server
        .call(
            reqwest::Method::PUT,
            &format!("/environments/{env}/schedules"),
            Some(json!({"cron": "*/10 * * * *"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["cron_source"], "environment");
    std::fs::write(files.join("SLOW"), "").unwrap();
    let pass = tick(&server, "2030-01-06T05:40:00Z").await;
    let slow = pass["started"][0]["id"].as_str().unwrap().to_string();
    server.wait_for(&slow, |op| op["status"] == "running").await;
    let pass = tick(&server, "2030-01-06T05:50:00Z").await;
    assert!(pass["started"].as_array().unwrap().is_empty(), "{pass}");
    assert_eq!(pass["skipped"].as_array().unwrap().len(), 1, "{pass}");
    std::fs::remove_file(files.join("SLOW")).unwrap();
    assert_eq!(server.wait_op(&slow).await["status"], "succeeded");
    let (_, shown) = server.get(&format!("/environments/{env}/schedules")).await;
    assert_eq!(shown["skipped_cron_runs"], 1, "{shown}");
    assert_eq!(shown["last_skipped_at"], "2030-01-06T05:50:00.000Z");
    assert_eq!(runs(), 3);

    // Passes that overlap (a second `serve` on the same database, or ticks at once) fire a
    // slot once, and none of them counts the others' run as a skip: only the pass whose write
    // replaces the time it read starts the run.
    let passes =
        futures::future::join_all((0..8).map(|_| tick(&server, "2030-01-06T06:00:00Z"))).await;
    let started: Vec<&Value> = passes
        .iter()
        .flat_map(|p| p["started"].as_array().unwrap())
        .collect();
    assert_eq!(started.len(), 1, "{passes:?}");
    assert!(
        passes
            .iter()
            .all(|p| p["skipped"].as_array().unwrap().is_empty()),
        "{passes:?}"
    );
    server.wait_op(started[0]["id"].as_str().unwrap()).await;
    assert_eq!(runs(), 4);
    let (_, shown) = server.get(&format!("/environments/{env}/schedules")).await;
    assert_eq!(shown["skipped_cron_runs"], 1, "{shown}");

    // Scheduled backups, daily at 03:00, keeping 2 daily and 3 weekly; a manual backup is
    // never pruned. Back to the manifest's hourly cron.
    let manual = server
        .start_op(&format!("/environments/{env}/backup"), None)
        .await;
    let manual = server.wait_op(manual["id"].as_str().unwrap()).await;
    let manual = manual["result"]["backup"].as_str().unwrap().to_string();
    let (status, shown) = server
        .call(
            reqwest::Method::PUT,
            &format!("/environments/{env}/schedules"),
            Some(json!({"backups": {"schedule": "0 3 * * *", "keep_daily": 2, "keep_weekly": 3}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["cron_source"], "manifest");
    assert_eq!(shown["backups"]["keep_weekly"], 3);
    // Monday 7 January 2030 to Monday 21 January: fifteen days.
    tick_and_wait(&server, "2030-01-07T02:00:00Z").await;
    for day in 7..=21 {
        let ran = tick_and_wait(&server, &format!("2030-01-{day:02}T03:00:00Z")).await;
        assert_eq!(
            kinds(&ran),
            [
                "environment_cron",
                "environment_backup",
                "environment_prune_backups"
            ],
            "day {day}"
        );
    }
    let (_, listed) = server
        .get(&format!("/backups?environment={env}&kind=scheduled"))
        .await;
    let mut kept: Vec<String> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["created_at"].as_str().unwrap()[..10].to_string())
        .collect();
    kept.sort();
    // Daily: the 21st and the 20th. Weekly: this week's newest (the 21st), last week's (the
    // 20th, a Sunday) and the week before's (the 13th).
    assert_eq!(kept, ["2030-01-13", "2030-01-20", "2030-01-21"], "{listed}");
    let (status, _) = server.get(&format!("/backups/{manual}")).await;
    assert_eq!(status, StatusCode::OK, "the manual backup stays");
    let stored = std::fs::read_dir(server.data_dir().join(format!("backups/backups/{env}")))
        .unwrap()
        .count();
    assert_eq!(stored, 4, "three scheduled archives and the manual one");

    // Bad schedules are refused, naming the field, and change nothing.
    for (body, field) in [
        (json!({"cron": "61 * * * *"}), "cron"),
        (json!({"cron": "* * *"}), "cron"),
        (
            json!({"backups": {"schedule": "@daily", "keep_daily": 0, "keep_weekly": 0}}),
            "backups.keep_daily",
        ),
        (
            json!({"backups": {"schedule": "0 25 * * *", "keep_daily": 1, "keep_weekly": 0}}),
            "backups.schedule",
        ),
    ] {
        let (status, answer) = server
            .call(
                reqwest::Method::PUT,
                &format!("/environments/{env}/schedules"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{body}: {answer}");
    }
    let (_, shown) = server.get(&format!("/environments/{env}/schedules")).await;
    assert_eq!(shown["backups"]["schedule"], "0 3 * * *");
}
