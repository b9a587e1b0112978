//! Migrating an environment between two server targets: the copy on the new target serves
//! the same content, the old copy is gone; a migration that fails leaves the environment
//! serving where it was, with nothing left on the target it tried.

use reqwest::StatusCode;
use serde_json::json;

use crate::environments::{
    add_project, app_repo, build, ensure_mariadb, local_target, mariadb, page, site_client,
    target_root,
};
use crate::harness::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_moves_to_another_target_or_stays_when_the_move_fails() {
    ensure_mariadb();
    let server = Server::start().await;
    let (old_root, new_root, bad_root) = (target_root(), target_root(), target_root());
    let (old, old_http, _) = local_target(&server, "old", old_root.path()).await;
    let (new, new_http, _) = local_target(&server, "new", new_root.path()).await;
    let repo = app_repo("mariadb");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": old, "domain": "moving.test"}),
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
    let database = hefring_core::environment::database_name(&env);
    mariadb(&format!("INSERT INTO {database}.hits VALUES (1), (2);")).unwrap();
    let upload =
        |root: &std::path::Path| root.join(format!("environments/{env}/files/uploads/kept.txt"));
    std::fs::write(upload(old_root.path()), "moved").unwrap();
    let old_client = site_client(&["moving.test"], old_http, None);
    let new_client = site_client(&["moving.test"], new_http, None);
    let (_, body) = page(&old_client, &format!("http://moving.test:{old_http}/")).await;
    assert!(
        body.contains("rows=2") && body.contains("upload=moved"),
        "{body}"
    );

    let op = server
        .start_op(
            &format!("/environments/{env}/migrate"),
            Some(json!({"target": new})),
        )
        .await;
    let id = op["id"].as_str().unwrap().to_string();
    let done = server.wait_op(&id).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}",
        server.log_text(&id).await
    );
    let (_, shown) = server.get(&format!("/environments/{env}")).await;
    assert_eq!(shown["target"], new.as_str());
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["url"], format!("http://moving.test:{new_http}/"));
    // The same content on the new target (plus the row its deploy command adds).
    let (status, body) = page(&new_client, &format!("http://moving.test:{new_http}/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("rows=3") && body.contains("upload=moved"),
        "{body}"
    );
    // Nothing of it is left on the old target; both targets share this machine's MariaDB, so
    // the database stays.
    assert!(!old_root.path().join(format!("environments/{env}")).exists());
    assert!(!old_root
        .path()
        .join(format!("nginx/sites/{env}.conf"))
        .exists());
    assert!(!old_root
        .path()
        .join(format!("php-fpm/pools/{env}.conf"))
        .exists());
    let (status, _) = page(&old_client, &format!("http://moving.test:{old_http}/")).await;
    assert_ne!(status, StatusCode::OK, "the old target no longer serves it");
    assert_eq!(
        mariadb(&format!("SELECT COUNT(*) FROM {database}.hits;"))
            .unwrap()
            .trim(),
        "3"
    );

    // A target whose nginx cannot start (its port is taken): the move fails before the
    // switch, the copy there is removed, and the site goes on serving where it was.
    let (bad, bad_http, _) = local_target(&server, "bad", bad_root.path()).await;
    let _taken = std::net::TcpListener::bind(("0.0.0.0", bad_http)).unwrap();
    let op = server
        .start_op(
            &format!("/environments/{env}/migrate"),
            Some(json!({"target": bad})),
        )
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed", "{done}");
    let rollback: Vec<(&str, &str)> = done["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["rollback"] == true)
        .map(|t| (t["name"].as_str().unwrap(), t["status"].as_str().unwrap()))
        .collect();
    assert_eq!(rollback, [("remove_new_copy", "succeeded")], "{done}");
    let (_, shown) = server.get(&format!("/environments/{env}")).await;
    assert_eq!(shown["target"], new.as_str());
    assert_eq!(shown["status"], "active");
    let (status, body) = page(&new_client, &format!("http://moving.test:{new_http}/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("upload=moved"), "{body}");
    assert!(!bad_root.path().join(format!("environments/{env}")).exists());
    assert!(!bad_root
        .path()
        .join(format!("nginx/sites/{env}.conf"))
        .exists());

    // Refusals.
    for (body, field) in [
        (json!({"target": new}), "target"),
        (json!({"target": "tgt_nope"}), "target"),
    ] {
        let (status, answer) = server
            .post(&format!("/environments/{env}/migrate"), body)
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        assert_eq!(answer["error"]["field"], field);
    }
}
