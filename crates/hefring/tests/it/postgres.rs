//! `hefring serve --database-url postgres://...`: the same system on PostgreSQL state.

use std::process::Command;

use serde_json::json;

use crate::harness::{create_token, Repo, Server};

struct Database(String);

impl Database {
    fn create() -> Database {
        let name = format!("hefring_it_{}_{}", std::process::id(), rand_suffix());
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
            ])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "PostgreSQL on 127.0.0.1:5432: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Database(name)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.0)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0))
            .output();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_007
}

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
