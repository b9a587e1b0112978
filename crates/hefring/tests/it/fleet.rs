//! Fleet updates: every environment on a release updated to a newer one by child operations,
//! a canary first, then bounded parallelism, stopping on failures.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::environments::{
    add_project, app_repo, build, local_target, page, site_client, target_root, APP_DEPLOY,
};
use crate::harness::Server;

/// Release 2's deploy command fails in an environment whose files hold `FAIL_HERE`.
const DEPLOY_THAT_CAN_FAIL: &str = r#"<?php
if (is_file(getenv('FILES_DIR') . '/FAIL_HERE')) { fwrite(STDERR, "told to fail here\n"); exit(1); }
"#;

fn environments_of(op: &Value) -> Vec<(String, String)> {
    op["result"]["environments"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(env, v)| (env.clone(), v["status"].as_str().unwrap().to_string()))
        .collect()
}

async fn children(server: &Server, parent: &str) -> Vec<Value> {
    let (status, listed) = server
        .get(&format!("/operations?parent={parent}&limit=100"))
        .await;
    assert_eq!(status, StatusCode::OK);
    listed["items"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_update_goes_canary_first_then_in_bounded_parallel_and_stops_on_failures() {
    let server = Server::start().await;
    let root = target_root();
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release1 = build(&server, &project).await;
    let mut envs = Vec::new();
    let mut domains = Vec::new();
    for i in 0..5 {
        let domain = format!("site{i}.test");
        let env = server
            .create(
                "/environments",
                json!({"name": format!("site{i}"), "project": project, "target": target, "domain": domain}),
            )
            .await;
        let id = env["id"].as_str().unwrap().to_string();
        let op = server
            .start_op(
                &format!("/environments/{id}/deploy"),
                Some(json!({"release": release1})),
            )
            .await;
        let done = server.wait_op(op["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        envs.push(id);
        domains.push(domain);
    }
    // Ids are time-ordered: the first environment is the canary.
    let mut sorted = envs.clone();
    sorted.sort();
    assert_eq!(sorted, envs);
    repo.commit(&[
        ("VERSION", "2\n"),
        (
            "deploy.php",
            &format!("{DEPLOY_THAT_CAN_FAIL}?>{APP_DEPLOY}"),
        ),
    ]);
    let release2 = build(&server, &project).await;
    let marker = |env: &str| {
        root.path()
            .join(format!("environments/{env}/files/FAIL_HERE"))
    };

    // The canary fails: nothing else is touched.
    std::fs::write(marker(&envs[0]), "").unwrap();
    let op = server
        .start_op(
            &format!("/releases/{release1}/fleet-update"),
            Some(json!({"to": release2, "parallelism": 2})),
        )
        .await;
    let parent = op["id"].as_str().unwrap().to_string();
    let done = server.wait_op(&parent).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(done["error"].as_str().unwrap().contains("canary"), "{done}");
    let outcome = environments_of(&done);
    assert_eq!(outcome[0], (envs[0].clone(), "failed".to_string()));
    for (env, status) in &outcome[1..] {
        assert_eq!(status, "cancelled", "{env}");
    }
    let started = children(&server, &parent).await;
    assert_eq!(started.len(), 1, "only the canary started");
    assert_eq!(started[0]["subject"]["id"], envs[0].as_str());
    assert_eq!(started[0]["parent"], parent.as_str());
    let client = site_client(
        &domains.iter().map(String::as_str).collect::<Vec<_>>(),
        http,
        None,
    );
    for domain in &domains {
        let (_, body) = page(&client, &format!("http://{domain}:{http}/")).await;
        assert!(body.contains("release=1"), "{domain}: {body}");
    }

    // Then with one failure tolerated and two at a time: the canary passes, site2 fails, the
    // rest are updated, and the parent fails because not every child succeeded.
    std::fs::remove_file(marker(&envs[0])).unwrap();
    std::fs::write(marker(&envs[2]), "").unwrap();
    let op = server
        .start_op(
            &format!("/releases/{release1}/fleet-update"),
            Some(json!({"to": release2, "parallelism": 2, "max_failures": 1})),
        )
        .await;
    let parent = op["id"].as_str().unwrap().to_string();
    let done = server.wait_op(&parent).await;
    assert_eq!(done["status"], "failed", "{done}");
    let outcome = environments_of(&done);
    let expected: Vec<(String, String)> = envs
        .iter()
        .enumerate()
        .map(|(i, env)| {
            (
                env.clone(),
                if i == 2 { "failed" } else { "succeeded" }.to_string(),
            )
        })
        .collect();
    assert_eq!(outcome, expected, "{done}");
    let started = children(&server, &parent).await;
    assert_eq!(started.len(), 5);
    // Never more than two updates at once, and the canary alone before them.
    let spans: Vec<(String, String, String)> = started
        .iter()
        .map(|c| {
            (
                c["subject"]["id"].as_str().unwrap().to_string(),
                c["started_at"].as_str().unwrap().to_string(),
                c["finished_at"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let canary = spans.iter().find(|s| s.0 == envs[0]).unwrap();
    for span in spans.iter().filter(|s| s.0 != envs[0]) {
        assert!(
            span.1 >= canary.2,
            "{span:?} started before the canary ended {canary:?}"
        );
    }
    for span in &spans {
        let overlapping = spans
            .iter()
            .filter(|o| o.1 <= span.1 && span.1 < o.2)
            .count();
        assert!(
            overlapping <= 2,
            "{overlapping} updates at once at {}",
            span.1
        );
    }
    for (i, domain) in domains.iter().enumerate() {
        let (_, body) = page(&client, &format!("http://{domain}:{http}/")).await;
        let want = if i == 2 { "release=1" } else { "release=2" };
        assert!(body.contains(want), "{domain}: {body}");
    }

    // Refusals: another project's release, parallelism out of range, nothing to update.
    let (status, answer) = server
        .post(
            &format!("/releases/{release1}/fleet-update"),
            json!({"to": release2, "parallelism": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["field"], "parallelism");
    let (status, answer) = server
        .post(
            &format!("/releases/{release1}/fleet-update"),
            json!({"to": release1}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["field"], "to");
    repo.commit(&[("VERSION", "3\n")]);
    let release3 = build(&server, &project).await;
    let (status, answer) = server
        .post(
            &format!("/releases/{release3}/fleet-update"),
            json!({"to": release2}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "nothing runs release 3: {answer}"
    );
    let (status, _) = server
        .post("/releases/rel_nope/fleet-update", json!({"to": release2}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The scheduler's clock is the system's unless `serve --scheduler-clock manual`.
    let (status, _) = server
        .post("/scheduler/tick", json!({"now": "2030-01-01T00:00:00Z"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
