//! `hefring serve --database-url postgres://...`: the same system on PostgreSQL state.

use std::process::Command;

use serde_json::json;

use crate::distributed::Database;
use crate::harness::{create_token, Repo, Server};

#[tokio::test]
async fn the_whole_system_runs_on_postgresql_state() {
    let database = Database::create();
    let url = database.url();
    let server =
        Server::start_with(&["--database-url", &url], &[("HEFRING_DATABASE_URL", &url)]).await;
    // The token was created in the data directory's SQLite by the harness: make one in
    // PostgreSQL too, through the same flag.
    let token = create_token(server.data_dir(), &["--database-url", &url]);
    let server = server.with_token(token);

    let (_, targets) = server.get("/targets").await;
    assert_eq!(targets["items"][0]["name"], "local", "{targets}");
    let repo = Repo::new("runtime: php\nbuild: [\"echo on-postgres\"]\n");
    let project = server
        .create(
            "/projects",
            json!({"name": "pg-site", "git_url": repo.url()}),
        )
        .await;
    let op = server
        .start_op(
            &format!("/projects/{}/releases", project["id"].as_str().unwrap()),
            Some(json!({"ref": "main"})),
        )
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert!(log.contains("stdout on-postgres"), "{log}");
    let count = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            &database.0,
            "-tAc",
            "SELECT count(*) FROM releases",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&count.stdout).trim(),
        "1",
        "the release is in PostgreSQL"
    );
}
