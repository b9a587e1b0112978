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

/// What a followed operation made, from its last line on stderr:
/// `operation op_... succeeded (backup bak_..., ...)`.
fn made(out: &Output, what: &str) -> String {
    let err = stderr(out);
    let line = err
        .lines()
        .rfind(|l| l.starts_with("operation "))
        .unwrap_or_else(|| panic!("no operation line in {err}"));
    let inside = line
        .split_once(" (")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("nothing made in {line:?}"));
    inside
        .split(", ")
        .find_map(|pair| pair.strip_prefix(what)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {what} in {line:?}"))
        .to_string()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_backs_up_downloads_restores_syncs_clones_and_removes_backups() {
    use crate::environments::{
        add_project, app_repo, build, local_target, page, site_client, target_root,
    };
    use serde_json::json;
    let server = Server::start().await;
    let root = target_root();
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let mut envs = Vec::new();
    for (name, domain) in [("live", "live.test"), ("staging", "staging.test")] {
        let env = server
            .create(
                "/environments",
                json!({"name": name, "project": project, "target": target, "domain": domain}),
            )
            .await;
        let id = env["id"].as_str().unwrap().to_string();
        let op = server
            .start_op(
                &format!("/environments/{id}/deploy"),
                Some(json!({"release": release})),
            )
            .await;
        let op = server.wait_op(op["id"].as_str().unwrap()).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        envs.push(id);
    }
    let live = envs[0].clone();
    let run = |args: &[&str]| server.command().args(args).output().unwrap();
    let client = site_client(&["live.test", "staging.test", "copy.test"], http, None);
    let site = |host: &str| {
        let client = client.clone();
        let url = format!("http://{host}:{http}/");
        async move { page(&client, &url).await.1 }
    };
    // The site's state: rows in its SQLite database and an upload.
    let add_rows = |env: &str, n: usize| {
        let file = root
            .path()
            .join(format!("environments/{env}/database/site.sqlite"));
        let out = std::process::Command::new("sqlite3")
            .arg(&file)
            .arg("INSERT INTO hits VALUES (7);".repeat(n))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let set_upload = |env: &str, text: &str| {
        std::fs::write(
            root.path()
                .join(format!("environments/{env}/files/uploads/kept.txt")),
            text,
        )
        .unwrap();
    };

    // The first version of live: one row (a first deploy runs the install commands, not the
    // deploy commands), upload "v1".
    add_rows(&live, 1);
    set_upload(&live, "v1");
    let body = site("live.test").await;
    assert!(
        body.contains("rows=1") && body.contains("upload=v1"),
        "{body}"
    );

    let out = run(&[
        "env",
        "backup",
        "live",
        "--description",
        "before the edit",
        "--follow",
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("store_archive"), "{}", stdout(&out));
    let first = made(&out, "backup");
    assert!(first.starts_with("bak_"), "{first}");

    // Listed, by environment name and by kind.
    let out = run(&["backup", "list", "--env", "live"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = stdout(&out);
    assert!(listed.starts_with("ID"), "{listed}");
    let row = listed.lines().find(|l| l.starts_with(&first)).unwrap();
    for cell in [live.as_str(), "manual", "ready", "before the edit"] {
        assert!(row.contains(cell), "{cell} in {row}");
    }
    let out = run(&["backup", "list", "--env", "staging", "--output", "json"]);
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed["items"], json!([]), "{listed}");
    let out = run(&["backup", "list", "--kind", "manual", "--output", "json"]);
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");

    // Shown, with its manifest.
    let out = run(&["backup", "show", &first, "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown["status"], "ready");
    assert_eq!(shown["manifest"]["database"]["kind"], "sqlite", "{shown}");
    let out = run(&["backup", "show", &first]);
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("sha256") && l.ends_with(shown["sha256"].as_str().unwrap())),
        "{}",
        stdout(&out)
    );

    // Downloaded into the current directory by default, or where -o says; the file is the
    // archive the backup describes, and no temporary file stays behind.
    let downloads = tempfile::tempdir().unwrap();
    let out = server
        .command()
        .current_dir(downloads.path())
        .args(["backup", "download", &first])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let name = format!("{first}.tar.zst");
    let size = shown["size"].as_u64().unwrap();
    assert_eq!(stdout(&out).trim(), format!("{name} ({size} bytes)"));
    let bytes = std::fs::read(downloads.path().join(&name)).unwrap();
    assert_eq!(bytes.len() as u64, size);
    assert_eq!(sha256_hex(&bytes), shown["sha256"].as_str().unwrap());
    let chosen = downloads.path().join("chosen.tar.zst");
    let out = run(&[
        "backup",
        "download",
        &first,
        "-o",
        chosen.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let saved: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(saved["path"], chosen.to_str().unwrap());
    assert_eq!(saved["size"], size);
    assert_eq!(
        sha256_hex(&std::fs::read(&chosen).unwrap()),
        shown["sha256"].as_str().unwrap()
    );
    let mut files: Vec<String> = std::fs::read_dir(downloads.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, [name, "chosen.tar.zst".to_string()]);

    // Edit, restore, and see the first version (plus the row the deploy command adds).
    add_rows(&live, 3);
    set_upload(&live, "v2");
    let body = site("live.test").await;
    assert!(
        body.contains("rows=4") && body.contains("upload=v2"),
        "{body}"
    );
    let out = run(&["env", "restore", "live", "--backup", &first, "-f"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let safety = made(&out, "safety_backup");
    let body = site("live.test").await;
    assert!(
        body.contains("rows=2") && body.contains("upload=v1"),
        "{body}"
    );
    let out = run(&["backup", "list", "--kind", "safety", "--output", "json"]);
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed["items"][0]["id"], safety.as_str(), "{listed}");

    // Files only from live into staging: staging keeps its database (no rows, and one from
    // the deploy commands a sync runs).
    set_upload(&live, "v3");
    let out = run(&[
        "env",
        "sync",
        "staging",
        "--from",
        "live",
        "--no-database",
        "-f",
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let body = site("staging.test").await;
    assert!(
        body.contains("rows=1") && body.contains("upload=v3"),
        "{body}"
    );

    // A clone on the target named by name.
    let out = run(&[
        "env",
        "clone",
        "live",
        "--name",
        "copy",
        "--domain",
        "copy.test",
        "--target",
        "web",
        "--follow",
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let copy = made(&out, "environment");
    let out = run(&["env", "show", "copy", "--output", "json"]);
    let shown_copy: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown_copy["id"], copy.as_str());
    assert_eq!(shown_copy["status"], "active");
    let body = site("copy.test").await;
    assert!(
        body.contains("rows=3") && body.contains("upload=v3"),
        "{body}"
    );

    // Removed: its archive leaves the store, and it is no longer shown or restorable.
    let stored = server
        .data_dir()
        .join(format!("backups/backups/{live}/{first}.tar.zst"));
    assert!(stored.is_file(), "{}", stored.display());
    let out = run(&["backup", "rm", &first, "--follow"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(!stored.exists());
    let out = run(&["backup", "show", &first]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).trim(), "error: no such resource (not_found)");

    // Bad input: one line with the API's message, exit 1, nothing started.
    let (_, before) = server.get("/operations?limit=500").await;
    let refusals: [(&[&str], &str); 11] = [
        (
            &["env", "backup", "live", "--description", "a\nb"],
            "description: at most 200 characters, without control characters (invalid_field)",
        ),
        (
            &["env", "restore", "live", "--backup", &first],
            "backup: no backup has this id (invalid_field)",
        ),
        (
            &["env", "restore", "live", "--backup", "bak_nope", "-f"],
            "backup: no backup has this id (invalid_field)",
        ),
        (
            &[
                "env",
                "clone",
                "live",
                "--name",
                "again",
                "--domain",
                "staging.test",
            ],
            "domain: staging.test is already served by environment",
        ),
        (
            &[
                "env", "clone", "live", "--name", "x", "--domain", "x.test", "--target", "nope",
            ],
            "error: no target named nope",
        ),
        (
            &["env", "sync", "live", "--from", "live"],
            "from: an environment cannot sync from itself (invalid_field)",
        ),
        (
            &[
                "env",
                "sync",
                "staging",
                "--from",
                "live",
                "--no-database",
                "--no-files",
            ],
            "database: a sync copies the database, the files or both",
        ),
        (
            &["backup", "list", "--env", "nope"],
            "error: no environment named nope",
        ),
        (
            &["backup", "show", "bak_nope"],
            "error: no such resource (not_found)",
        ),
        (
            &["backup", "download", &first, "-o", "/tmp"],
            "error: no such resource (not_found)",
        ),
        (
            &["backup", "rm", "bak_nope", "--follow"],
            "error: no such resource (not_found)",
        ),
    ];
    for (args, message) in refusals {
        let out = run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stdout(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(message),
            "{args:?}: {err}"
        );
    }
    let (_, after) = server.get("/operations?limit=500").await;
    assert_eq!(before["items"], after["items"]);
    assert!(!std::path::Path::new(&format!("/tmp/{first}.tar.zst")).exists());
}

/// The operation a followed command started, from its last line on stderr:
/// `operation op_... succeeded`.
fn followed(out: &Output) -> String {
    let err = stderr(out);
    let line = err
        .lines()
        .rfind(|l| l.starts_with("operation "))
        .unwrap_or_else(|| panic!("no operation line in {err}"));
    line.split_whitespace().nth(1).unwrap().to_string()
}

/// Bad input: one line on stderr with the API's message, exit 1, and no operation started.
async fn refused(server: &Server, refusals: &[(&[&str], &str)]) {
    let (_, before) = server.get("/operations?limit=500").await;
    for (args, message) in refusals {
        let out = server.command().args(*args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stdout(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(message),
            "{args:?}: {err}"
        );
    }
    let (_, after) = server.get("/operations?limit=500").await;
    assert_eq!(before["items"], after["items"]);
}

/// Creates an environment through the API and deploys `release` to it; answers its id.
async fn deployed(
    server: &Server,
    name: &str,
    project: &str,
    target: &str,
    domain: &str,
    release: &str,
) -> String {
    use serde_json::json;
    let env = server
        .create(
            "/environments",
            json!({"name": name, "project": project, "target": target, "domain": domain}),
        )
        .await;
    let id = env["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(
            &format!("/environments/{id}/deploy"),
            Some(json!({"release": release})),
        )
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_migrates_an_environment_to_another_target() {
    use crate::environments::{
        add_project, app_repo, build, local_target, page, site_client, target_root,
    };
    let server = Server::start().await;
    let (old_root, new_root) = (target_root(), target_root());
    let (old, _, _) = local_target(&server, "old", old_root.path()).await;
    let (new, new_http, _) = local_target(&server, "new", new_root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = deployed(&server, "live", &project, &old, "moving.test", &release).await;
    let run = |args: &[&str]| server.command().args(args).output().unwrap();

    // The target by name; --follow streams the log and exits 0 once it succeeded.
    let out = run(&["env", "migrate", "live", "--target", "new", "--follow"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("switch_target"), "{}", stdout(&out));
    let op = server.op(&followed(&out)).await;
    assert_eq!(op["kind"], "environment_migrate");
    assert_eq!(op["status"], "succeeded");

    let out = run(&["env", "show", "live"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("target ") && l.ends_with(&new)),
        "{}",
        stdout(&out)
    );
    let out = run(&["env", "show", &env, "--output", "json"]);
    let shown: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(shown["target"], new.as_str());
    assert_eq!(shown["status"], "active");
    let (_, body) = page(
        &site_client(&["moving.test"], new_http, None),
        &format!("http://moving.test:{new_http}/"),
    )
    .await;
    assert!(body.contains("release=1"), "{body}");
    assert!(!old_root.path().join(format!("environments/{env}")).exists());

    // Without --follow: the operation's id, kind and status; the target by id.
    let out = run(&["env", "migrate", "live", "--target", &old]);
    assert!(out.status.success(), "{}", stderr(&out));
    let started = stdout(&out);
    let (id, rest) = started.trim().split_once(' ').unwrap();
    assert!(id.starts_with("op_"), "{started}");
    assert!(rest.starts_with("environment_migrate "), "{started}");
    let done = server.wait_op(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    refused(
        &server,
        &[
            (
                &["env", "migrate", "live", "--target", "old", "-f"],
                "target: the environment already runs on this target (invalid_field)",
            ),
            (
                &["env", "migrate", "live", "--target", "nope"],
                "error: no target named nope",
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_updates_a_fleet_of_environments_to_a_new_release() {
    use crate::environments::{
        add_project, app_repo, build, local_target, page, site_client, target_root,
    };
    let server = Server::start().await;
    let root = target_root();
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release1 = build(&server, &project).await;
    let mut envs = Vec::new();
    for (name, domain) in [("one", "one.test"), ("two", "two.test")] {
        envs.push(deployed(&server, name, &project, &target, domain, &release1).await);
    }
    repo.commit(&[("VERSION", "2\n")]);
    let release2 = build(&server, &project).await;
    let run = |args: &[&str]| server.command().args(args).output().unwrap();

    let out = run(&[
        "release",
        "fleet-update",
        &release1,
        "--to",
        &release2,
        "--parallelism",
        "2",
        "--follow",
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let parent = followed(&out);
    let (_, children) = server
        .get(&format!("/operations?parent={parent}&limit=100"))
        .await;
    let children = children["items"].as_array().unwrap().clone();
    assert_eq!(children.len(), 2, "{children:?}");
    // One line per environment after the log: its id, how it ended, its update's id.
    let printed = stdout(&out);
    for env in &envs {
        let child = children
            .iter()
            .find(|c| c["subject"]["id"] == env.as_str())
            .unwrap_or_else(|| panic!("no update of {env}"));
        let line = printed
            .lines()
            .find(|l| l.starts_with(env.as_str()))
            .unwrap_or_else(|| panic!("no line for {env} in {printed}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells,
            [env.as_str(), "succeeded", child["id"].as_str().unwrap()],
            "{printed}"
        );
    }
    let header = printed
        .lines()
        .find(|l| l.starts_with("ENVIRONMENT"))
        .unwrap_or_else(|| panic!("no table in {printed}"));
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["ENVIRONMENT", "STATUS", "OPERATION"]
    );

    // Both run release 2 now.
    let out = run(&["env", "list", "--output", "json"]);
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    for env in listed["items"].as_array().unwrap() {
        assert_eq!(env["release"], release2.as_str(), "{env}");
    }
    let client = site_client(&["one.test", "two.test"], http, None);
    for domain in ["one.test", "two.test"] {
        let (_, body) = page(&client, &format!("http://{domain}:{http}/")).await;
        assert!(body.contains("release=2"), "{domain}: {body}");
    }

    // `op list --parent` lists the children.
    let out = run(&["op", "list", "--parent", &parent, "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let mut ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = children.iter().map(|c| c["id"].as_str().unwrap()).collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected);
    let out = run(&["op", "list", "--parent", &parent]);
    let table = stdout(&out);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(
        table
            .lines()
            .skip(1)
            .all(|l| l.contains("environment_update") && l.contains("succeeded")),
        "{table}"
    );

    // In JSON, --follow ends with the finished operation and its per-environment result.
    let out = run(&[
        "release",
        "fleet-update",
        &release2,
        "--to",
        &release1,
        "--include-older",
        "--max-failures",
        "1",
        "-f",
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let last: Value = serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(last["kind"], "release_fleet_update", "{last}");
    assert_eq!(last["inputs"]["max_failures"], 1, "{last}");
    assert_eq!(
        last["result"]["environments"].as_object().unwrap().len(),
        2,
        "{last}"
    );

    refused(
        &server,
        &[
            (
                &[
                    "release",
                    "fleet-update",
                    &release1,
                    "--to",
                    &release2,
                    "--parallelism",
                    "0",
                    "-f",
                ],
                "parallelism: must be between 1 and 50 (invalid_field)",
            ),
            (
                &["release", "fleet-update", &release1, "--to", &release1],
                "to: the release to update to is this one (invalid_field)",
            ),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_and_sets_an_environments_schedules() {
    use crate::environments::{
        add_project, app_manifest, build, local_target, target_root, APP_DEPLOY, APP_INDEX,
        APP_INSTALL,
    };
    use crate::harness::Repo;
    use serde_json::json;
    let server = Server::start_with(&["--scheduler-clock", "manual"], &[]).await;
    let root = target_root();
    let (target, _, _) = local_target(&server, "web", root.path()).await;
    let repo = Repo::new(&format!(
        "{}cron: {{schedule: \"0 * * * *\", command: php cron.php}}\n",
        app_manifest("sqlite")
    ));
    repo.commit(&[
        ("index.php", APP_INDEX),
        ("install.php", APP_INSTALL),
        ("deploy.php", APP_DEPLOY),
        ("health.php", "<?php echo 'ok';\n"),
        ("cron.php", "<?php echo \"cron ran\\n\";\n"),
        ("VERSION", "1\n"),
        ("uploads/.keep", ""),
    ]);
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = deployed(&server, "live", &project, &target, "cron.test", &release).await;
    let run = |args: &[&str]| server.command().args(args).output().unwrap();
    // The table's value for `key`.
    let field = |out: &Output, key: &str| -> String {
        let text = stdout(out);
        text.lines()
            .find_map(|l| {
                l.strip_prefix(key)
                    .filter(|rest| rest.starts_with("  "))
                    .map(|rest| rest.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no {key} in {text}"))
    };
    let json_of = |out: &Output| -> Value {
        assert!(out.status.success(), "{}", stderr(out));
        serde_json::from_str(&stdout(out)).unwrap()
    };

    // The manifest's schedule, and one cron run on the driven clock.
    for now in ["2030-01-06T00:30:00Z", "2030-01-06T01:00:00Z"] {
        let (_, pass) = server.post("/scheduler/tick", json!({ "now": now })).await;
        for op in pass["started"].as_array().unwrap() {
            server.wait_op(op["id"].as_str().unwrap()).await;
        }
    }
    let (_, status) = server.get(&format!("/environments/{env}/schedules")).await;
    let last_run = status["last_cron_run"]["id"].as_str().unwrap().to_string();
    let out = run(&["env", "schedule", "live"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(field(&out, "cron"), "0 * * * * (manifest)");
    assert_eq!(field(&out, "cron command"), "php cron.php");
    assert_eq!(field(&out, "backups"), "-");
    assert_eq!(
        field(&out, "last cron run"),
        format!("{last_run} succeeded")
    );
    assert_eq!(field(&out, "skipped runs"), "0");

    // A cron override; the backups stay as they are (none).
    let out = run(&["env", "schedule", "live", "--cron", "*/10 * * * *"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(field(&out, "cron"), "*/10 * * * * (environment)");
    assert_eq!(field(&out, "backups"), "-");

    // A backup schedule; the override stays.
    let out = run(&[
        "env",
        "schedule",
        &env,
        "--backups",
        "0 3 * * *",
        "--keep-daily",
        "2",
        "--keep-weekly",
        "3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(field(&out, "cron"), "*/10 * * * * (environment)");
    assert_eq!(field(&out, "backups"), "0 3 * * * (keep 2 daily, 3 weekly)");

    // Only the weekly retention: the rest of the backup schedule stays.
    let shown = json_of(&run(&[
        "env",
        "schedule",
        "live",
        "--keep-weekly",
        "5",
        "--output",
        "json",
    ]));
    assert_eq!(
        shown["backups"],
        json!({"schedule": "0 3 * * *", "keep_daily": 2, "keep_weekly": 5})
    );
    assert_eq!(shown["cron_source"], "environment");

    // Back to the manifest's cron; the backups stay.
    let shown = json_of(&run(&[
        "env",
        "schedule",
        "live",
        "--no-cron-override",
        "--output",
        "json",
    ]));
    assert_eq!(shown["cron"], "0 * * * *");
    assert_eq!(shown["cron_source"], "manifest");
    assert_eq!(shown["backups"]["keep_weekly"], 5);

    // No scheduled backups; the manifest's cron is not turned into an override.
    let shown = json_of(&run(&[
        "env",
        "schedule",
        "live",
        "--no-backups",
        "--output",
        "json",
    ]));
    assert!(shown["backups"].is_null(), "{shown}");
    assert_eq!(shown["cron_source"], "manifest");
    let (_, stored) = server.get(&format!("/environments/{env}/schedules")).await;
    assert_eq!(stored, shown);
    let out = run(&["env", "schedule", "live"]);
    assert_eq!(field(&out, "backups"), "-");
    assert_eq!(field(&out, "cron"), "0 * * * * (manifest)");

    // Bad input: one line, exit 1, nothing changed.
    let bad: [(&[&str], &str); 4] = [
        (
            &["env", "schedule", "live", "--cron", "61 * * * *"],
            "cron: field 1 (minute): 61 is out of range 0-59 (invalid_field)",
        ),
        (
            &["env", "schedule", "live", "--backups", "@daily"],
            "backups.keep_daily: keep at least one daily or one weekly backup (invalid_field)",
        ),
        (
            &["env", "schedule", "live", "--keep-daily", "3"],
            "error: the environment has no backup schedule to change: give --backups SCHEDULE",
        ),
        (
            &["env", "schedule", "nope"],
            "error: no environment named nope",
        ),
    ];
    refused(&server, &bad).await;
    let (_, after) = server.get(&format!("/environments/{env}/schedules")).await;
    assert_eq!(after, stored);
}
