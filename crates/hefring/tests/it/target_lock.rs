//! Target-wide steps (starting, testing and reloading the shared nginx and PHP-FPM masters,
//! adding users) are serialised by a lock that lives on the target, whichever worker runs them.

use std::process::{Child, Command};
use std::time::Duration;

use serde_json::json;

use crate::environments::{add_project, build, local_target, page, site_client, target_root};
use crate::harness::{Repo, Server};

/// Holds the target's lock, as a deploy on another worker or machine would, until dropped.
struct LockHolder(Child);

impl LockHolder {
    fn take(lock: &std::path::Path) -> LockHolder {
        // Held by the guard from the start, so that it is killed and waited for whatever
        // happens next.
        let holder = LockHolder(
            Command::new("flock")
                .arg(lock)
                .args(["sleep", "600"])
                .spawn()
                .unwrap(),
        );
        // flock has the lock once `sleep` runs under it.
        for _ in 0..100 {
            let held = Command::new("flock")
                .args(["-n", "-E", "99"])
                .arg(lock)
                .arg("true")
                .status()
                .unwrap();
            if held.code() == Some(99) {
                return holder;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("could not take the target's lock");
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-P", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn small_site() -> Repo {
    let repo = Repo::new("database: none\nhealth: /health.php\n");
    repo.commit(&[("health.php", "<?php echo 'ok';\n"), ("VERSION", "1\n")]);
    repo
}

async fn create_env(server: &Server, name: &str, project: &str, target: &str) -> String {
    let env = server
        .create(
            "/environments",
            json!({"name": name, "project": project, "target": target, "domain": format!("{name}.lock.test")}),
        )
        .await;
    env["id"].as_str().unwrap().to_string()
}

/// Two deploys meet the masters' first start while the lock is held elsewhere: neither starts
/// or reloads anything until it is released, then both go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_wait_for_the_target_lock_before_they_touch_the_masters() {
    let server = Server::start().await;
    let root = target_root();
    let repo = small_site();
    let project = add_project(&server, "small", &repo).await;
    let release = build(&server, &project).await;
    // The target's verify starts nothing; its root exists.
    let (target, http, _) = local_target(&server, "locked", root.path()).await;
    std::fs::create_dir_all(root.path()).unwrap();
    let holder = LockHolder::take(&root.path().join("hefring.lock"));
    let mut ops = Vec::new();
    for name in ["one", "two"] {
        let env = create_env(&server, name, &project, &target).await;
        let op = server
            .start_op(
                &format!("/environments/{env}/deploy"),
                Some(json!({"release": release})),
            )
            .await;
        ops.push(op["id"].as_str().unwrap().to_string());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &ops {
        let op = server.op(id).await;
        assert_eq!(op["status"], "running", "{op}");
        assert_eq!(op["tasks"][0]["name"], "prepare_target");
        assert_eq!(op["tasks"][0]["status"], "running", "{op}");
    }
    assert!(
        !root.path().join("php-fpm/php-fpm.pid").exists(),
        "PHP-FPM was started while another held the target's lock"
    );
    drop(holder);
    for id in &ops {
        let op = server.wait_op(id).await;
        assert_eq!(op["status"], "succeeded", "{op}");
    }
    let client = site_client(&["one.lock.test", "two.lock.test"], http, None);
    for name in ["one", "two"] {
        let (status, body) = page(
            &client,
            &format!("http://{name}.lock.test:{http}/health.php"),
        )
        .await;
        assert!(status.is_success(), "{status} {body}");
    }
}

/// A hundred deploys started at once on one target all become active (before the lock, about
/// one in three hundred failed starting or reloading PHP-FPM), and a fleet update of them all
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_deploys_at_once_on_one_target_all_succeed_and_update_together() {
    let server = Server::start_with(&["--workers", "16"], &[]).await;
    let root = target_root();
    let repo = small_site();
    let project = add_project(&server, "many", &repo).await;
    let release1 = build(&server, &project).await;
    repo.commit(&[("VERSION", "2\n")]);
    let release2 = build(&server, &project).await;
    let (target, http, _) = local_target(&server, "busy", root.path()).await;
    let mut envs = Vec::new();
    for i in 0..100 {
        envs.push(create_env(&server, &format!("s{i}"), &project, &target).await);
    }
    let mut ops = Vec::new();
    for env in &envs {
        let op = server
            .start_op(
                &format!("/environments/{env}/deploy"),
                Some(json!({"release": release1})),
            )
            .await;
        ops.push(op["id"].as_str().unwrap().to_string());
    }
    for id in &ops {
        let op = server
            .wait_for(id, |op| {
                ["succeeded", "failed", "cancelled"].contains(&op["status"].as_str().unwrap())
            })
            .await;
        assert_eq!(op["status"], "succeeded", "{op}");
    }
    let op = server
        .start_op(
            &format!("/releases/{release1}/fleet-update"),
            Some(json!({"to": release2, "parallelism": 8})),
        )
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let client = site_client(&["s0.lock.test", "s99.lock.test"], http, None);
    for name in ["s0", "s99"] {
        let (status, body) =
            page(&client, &format!("http://{name}.lock.test:{http}/VERSION")).await;
        assert!(status.is_success(), "{status} {body}");
        assert_eq!(body.trim(), "2");
    }
}
