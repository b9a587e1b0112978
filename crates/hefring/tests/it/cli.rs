//! The command-line client against a real server.

use std::process::Output;

use serde_json::Value;

use crate::harness::{Repo, Server, BIN};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn the_cli_adds_verifies_builds_and_follows_with_exit_codes() {
    let server = Server::start().await;
    let repo = Repo::new("runtime: php\nbuild: [\"echo from-the-build\"]\n");
    let run = |args: &[&str]| server.command().args(args).output().unwrap();

    let out = run(&[
        "project",
        "add",
        "shop",
        "--git-url",
        &repo.url(),
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let project: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(project["name"], "shop");

    let out = run(&["project", "verify", "shop", "--follow"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(".hefring.yml is valid"),
        "{}",
        stdout(&out)
    );

    let out = run(&["release", "build", "shop", "--ref", "main", "-f"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("run_build_commands stdout from-the-build"),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("succeeded"));

    let out = run(&["release", "list", "--project", "shop"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("ready"), "{}", stdout(&out));

    let out = run(&["op", "list", "--output", "json"]);
    let ops: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let build = ops["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "release_build")
        .unwrap()
        .clone();
    let out = run(&["op", "show", build["id"].as_str().unwrap()]);
    assert!(stdout(&out).contains("pack_artifact"), "{}", stdout(&out));
    let out = run(&["op", "logs", build["id"].as_str().unwrap()]);
    assert!(stdout(&out).contains("from-the-build"));

    // A failing build: --follow exits non-zero.
    repo.commit(&[(".hefring.yml", "runtime: php\nbuild: [\"exit 4\"]\n")]);
    let out = run(&["release", "build", "shop", "--ref", "main", "--follow"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("failed: build command 1 (exit 4) exited with status 4"),
        "{}",
        stderr(&out)
    );

    let out = run(&["target", "list"]);
    assert!(stdout(&out).starts_with("ID"), "{}", stdout(&out));
    assert!(stdout(&out).contains("local"));

    // Errors: one line, non-zero.
    let out = run(&["op", "show", "op_nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).trim(), "error: no such resource (not_found)");
    let out = run(&["project", "add", "Bad", "--git-url", "/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("name: must be"), "{}", stderr(&out));
    let out = std::process::Command::new(BIN)
        .env("HEFRING_URL", &server.url)
        .env_remove("HEFRING_TOKEN")
        .args(["target", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unauthorized"));
    let out = std::process::Command::new(BIN)
        .env("HEFRING_URL", "http://127.0.0.1:9")
        .env("HEFRING_TOKEN", "x")
        .args(["target", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: cannot reach http://127.0.0.1:9"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn settings_come_from_the_configuration_file_and_a_second_server_is_refused() {
    let server = Server::start().await;
    // A TOML file in the data directory gives the client commands their URL and token.
    let dir = server.data_dir();
    std::fs::write(
        dir.join("hefring.toml"),
        format!(
            "url = \"{}\"\ntoken = \"{}\"\noutput = \"json\"\n",
            server.url, server.token
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .env_remove("HEFRING_URL")
        .env_remove("HEFRING_TOKEN")
        .env("HEFRING_DATA_DIR", dir)
        .args(["target", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(list["items"][0]["name"], "local");

    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("another hefring serve is using the data directory"),
        "{}",
        stderr(&out)
    );
}
