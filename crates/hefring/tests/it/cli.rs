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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_creates_deploys_shows_and_removes_an_environment() {
    use crate::environments::{
        add_project, app_repo, build, local_target, page, site_client, target_root,
    };
    let server = Server::start().await;
    let root = target_root();
    let (_, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    add_project(&server, "app", &repo).await;
    let project = server.get("/projects").await.1["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let release = build(&server, &project).await;
    let run = |args: &[&str]| server.command().args(args).output().unwrap();

    let out = run(&[
        "env",
        "create",
        "live",
        "--project",
        "app",
        "--target",
        "web",
        "--domain",
        "cli.test",
        "--redirect",
        "www.cli.test",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let env: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(env["aliases"][0]["redirect"], true);

    let out = run(&["env", "deploy", "live", "--release", &release, "--follow"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("check_health"), "{}", stdout(&out));

    let out = run(&["env", "list"]);
    assert!(stdout(&out).contains("active"), "{}", stdout(&out));
    let out = run(&["env", "show", "live"]);
    assert!(
        stdout(&out).contains(&format!("http://cli.test:{http}/")),
        "{}",
        stdout(&out)
    );
    let (_, body) = page(
        &site_client(&["cli.test"], http, None),
        &format!("http://cli.test:{http}/"),
    )
    .await;
    assert!(body.contains("release=1"), "{body}");

    // A deploy of an active environment is refused with one clear line.
    let out = run(&["env", "deploy", "live", "--release", &release]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("use update"), "{}", stderr(&out));

    let out = run(&["env", "rm", "live", "-f"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["env", "show", "live"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a deleted environment is not listed by name"
    );
}
