//! MediaWiki 1.39 from Debian, hosted as a real application on a local server target: real
//! nginx, PHP-FPM and MariaDB; deployed with HTTP and HTTPS, updated, two failed updates
//! rolled back (one fails its preview check, one its deploy command) while the site keeps
//! serving, then deleted without leftovers.
//!
//! The project repository comes from `tests/fixtures/mediawiki/make-repo.sh` (cached in
//! /tmp across runs); each test commits to its own bare clone of it, without a work tree.
//!
//! MediaWiki is 23,000 files (280 MB). On the test VMs' ext4, creating them takes 10-20 s
//! each time and varies widely (a build's checkout, and each deploy's unpack), against about
//! 1 s on tmpfs; the whole test took 80-110 s on disk and 20 s on tmpfs. So the target root
//! and the server's build tree and artifacts live on tmpfs (/dev/shm) when there is one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::environments::{ensure_mariadb, local_target, mariadb, page, site_client};
use crate::harness::Server;

/// Where make-repo.sh keeps the fixture repository (it rebuilds it when its inputs change,
/// and is safe to run from several processes at once).
const FIXTURE_CACHE: &str = "/tmp/hefring-mediawiki-repo";

/// What hefring/install.sh writes on Main_Page.
const FIXTURE_PAGE: &str = "Hefring fixture page";
const FIXTURE_TEXT: &str = "This wiki was installed by hefring/install.sh.";

/// The cached fixture repository, made at most once per test binary.
fn fixture_repo() -> &'static Path {
    static REPO: OnceLock<PathBuf> = OnceLock::new();
    REPO.get_or_init(|| {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/mediawiki/make-repo.sh"
        );
        let started = Instant::now();
        let out = Command::new("sh")
            .arg(script)
            .arg(FIXTURE_CACHE)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "make-repo.sh failed (scripts/test installs mediawiki): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "mediawiki fixture repository ready in {:.1?}",
            started.elapsed()
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// A bare clone of the fixture (its pack is hard-linked, so this is cheap) that the test
/// commits to with git's plumbing: no 350 MB work tree.
struct WikiRepo {
    dir: tempfile::TempDir,
}

impl WikiRepo {
    fn clone_fixture() -> WikiRepo {
        let dir = tempfile::Builder::new()
            .prefix("hefring-mw-repo-")
            .tempdir()
            .unwrap();
        let out = Command::new("git")
            .args(["clone", "--quiet", "--bare", "--"])
            .arg(fixture_repo())
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git clone: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        WikiRepo { dir }
    }

    fn url(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }

    fn git(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new("git")
            .args(["-c", "user.email=t@example.com", "-c", "user.name=t"])
            .arg("--git-dir")
            .arg(self.dir.path())
            .args(args)
            .env("GIT_INDEX_FILE", self.dir.path().join("hefring-test-index"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A file's content at a commit.
    fn show(&self, commit: &str, path: &str) -> String {
        self.git(&["cat-file", "blob", &format!("{commit}:{path}")], None)
    }

    /// Commits `files` (path, content) on top of `parent` and points the branch `branch` at
    /// the new commit; answers it.
    fn commit(&self, branch: &str, parent: &str, files: &[(&str, &str)]) -> String {
        self.git(&["read-tree", parent], None);
        for (path, content) in files {
            let blob = self.git(&["hash-object", "-w", "--stdin"], Some(content));
            self.git(
                &[
                    "update-index",
                    "--add",
                    "--cacheinfo",
                    &format!("100644,{blob},{path}"),
                ],
                None,
            );
        }
        let tree = self.git(&["write-tree"], None);
        let commit = self.git(
            &[
                "commit-tree",
                &tree,
                "-p",
                parent,
                "-m",
                &format!("test: {branch}"),
            ],
            None,
        );
        self.git(
            &["update-ref", &format!("refs/heads/{branch}"), &commit],
            None,
        );
        commit
    }
}

async fn start_build(server: &Server, project: &str, reference: &str) -> String {
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({ "ref": reference })),
        )
        .await;
    op["id"].as_str().unwrap().to_string()
}

/// Waits for a build; answers its release.
async fn built(server: &Server, op: &str) -> String {
    let op = server.wait_op(op).await;
    assert_eq!(
        op["status"],
        "succeeded",
        "{op}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );
    op["result"]["release"].as_str().unwrap().to_string()
}

/// Runs `deploy` or `update` of a release to its end; answers the operation and its log.
async fn run_env_op(server: &Server, env: &str, action: &str, release: &str) -> (Value, String) {
    let op = server
        .start_op(
            &format!("/environments/{env}/{action}"),
            Some(json!({ "release": release })),
        )
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    (op, log)
}

fn task_status<'a>(op: &'a Value, name: &str) -> &'a str {
    op["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name && t["rollback"] != true)
        .or_else(|| {
            op["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == name)
        })
        .and_then(|t| t["status"].as_str())
        .unwrap_or("absent")
}

/// Seconds between two of the API's RFC 3339 timestamps (same day), for the timing report.
fn seconds_between(start: &Value, end: &Value) -> f64 {
    let secs = |v: &Value| -> f64 {
        let text = v.as_str().unwrap_or_default();
        let time = text.split('T').nth(1).unwrap_or_default();
        let time = time.trim_end_matches('Z');
        let time = time.split(['+', '-']).next().unwrap_or_default();
        let mut parts = time.split(':');
        let h: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
        let m: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
        let s: f64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0.0);
        h * 3600.0 + m * 60.0 + s
    };
    (secs(end) - secs(start)).rem_euclid(86_400.0)
}

/// One line per operation and its tasks, with their durations.
async fn timing(server: &Server, op_id: &str) -> String {
    let op = server.op(op_id).await;
    let mut line = format!(
        "{} {:.1}s:",
        op["kind"].as_str().unwrap_or_default(),
        seconds_between(&op["started_at"], &op["finished_at"])
    );
    for task in op["tasks"].as_array().unwrap() {
        if task["started_at"].is_string() {
            line.push_str(&format!(
                " {}={:.1}s",
                task["name"].as_str().unwrap_or_default(),
                seconds_between(&task["started_at"], &task["finished_at"])
            ));
        }
    }
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mediawiki_from_debian_is_deployed_over_http_and_https_updated_rolled_back_and_deleted() {
    let started = Instant::now();
    ensure_mariadb();
    let repo = WikiRepo::clone_fixture();
    let fixture_ready = started.elapsed();

    // Four commits, each on its own branch: r1 is the fixture; r2 a harmless change (a
    // marker file and the site's name); r3 (on r2) an index.php that answers 500; r4 (on r2)
    // a deploy command that fails after update.php ran.
    let c1 = repo.git(&["rev-parse", "main"], None);
    repo.git(&["update-ref", "refs/heads/r1", &c1], None);
    let settings = repo.show(&c1, "LocalSettings.php");
    let manifest = repo.show(&c1, ".hefring.yml");
    let named = |name: &str| {
        let text = settings.replace(
            "$wgSitename = 'Hefring Wiki';",
            &format!("$wgSitename = 'Hefring Wiki {name}';"),
        );
        assert_ne!(text, settings, "LocalSettings.php sets $wgSitename");
        text
    };
    let c2 = repo.commit(
        "r2",
        &c1,
        &[
            ("hefring-release.txt", "r2\n"),
            ("LocalSettings.php", &named("r2")),
        ],
    );
    repo.commit(
        "r3",
        &c2,
        &[
            ("hefring-release.txt", "r3\n"),
            ("LocalSettings.php", &named("r3")),
            (
                "index.php",
                "<?php\nhttp_response_code(500);\necho \"broken on purpose\\n\";\n",
            ),
        ],
    );
    let failing_deploy = manifest.replace(
        "deploy:\n  - \"php maintenance/update.php --quick\"\n",
        "deploy:\n  - \"php maintenance/update.php --quick\"\n  - \"false\"\n",
    );
    assert_ne!(
        failing_deploy, manifest,
        "the fixture's deploy commands changed"
    );
    repo.commit(
        "r4",
        &c2,
        &[
            ("hefring-release.txt", "r4\n"),
            ("LocalSettings.php", &named("r4")),
            (".hefring.yml", &failing_deploy),
        ],
    );

    let server = Server::start().await;
    let _scratch = FastScratch::for_server(&server);
    let root = crate::environments::target_root_in(&fast_dir());
    let (target, http, https) = local_target(&server, "web", root.path()).await;
    let project = server
        .create("/projects", json!({"name": "wiki", "git_url": repo.url()}))
        .await;
    let project = project["id"].as_str().unwrap().to_string();

    // The builds queue one after another on the project; r2..r4 build while r1 deploys.
    let build_started = Instant::now();
    let mut builds = Vec::new();
    for branch in ["r1", "r2", "r3", "r4"] {
        builds.push(start_build(&server, &project, branch).await);
    }
    let release1 = built(&server, &builds[0]).await;
    let first_build = build_started.elapsed();

    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target,
                   "domain": "wiki.test", "https": "on"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    let db_name = hefring_core::environment::database_name(&env_id);

    let deploy_started = Instant::now();
    let (op, log) = run_env_op(&server, &env_id, "deploy", &release1).await;
    let deploy_took = deploy_started.elapsed();
    assert_eq!(op["status"], "succeeded", "{op}\n{log}");
    assert!(
        log.contains("hefring/install.sh: MediaWiki installed"),
        "{log}"
    );
    let deploy_timing = timing(&server, op["id"].as_str().unwrap()).await;
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["status"], "active", "{shown}");
    assert_eq!(shown["release"], release1.as_str(), "{shown}");

    // The main page, through nginx over HTTP and over HTTPS (the local CA signed it).
    let main_page = "/index.php?title=Main_Page";
    let plain = site_client(&["wiki.test"], http, None);
    let ca = server
        .http()
        .get(format!("{}/api/v1/ca.pem", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    let secure = site_client(&["wiki.test"], https, Some(&ca));
    let http_url = format!("http://wiki.test:{http}{main_page}");
    let https_url = format!("https://wiki.test:{https}{main_page}");
    for url in [&http_url, &https_url] {
        let (status, body) = page(
            if url.starts_with("https") {
                &secure
            } else {
                &plain
            },
            url,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{url}: {body:.2000}");
        assert!(body.contains(FIXTURE_PAGE), "{url}: {body:.2000}");
        assert!(body.contains(FIXTURE_TEXT), "{url}: {body:.2000}");
        assert!(body.contains("Hefring Wiki"), "{url}: {body:.2000}");
    }
    // Uploads live in the environment's persistent directory.
    let images = root
        .path()
        .join(format!("environments/{env_id}/current/images"));
    assert_eq!(
        std::fs::read_link(&images).unwrap(),
        root.path()
            .join(format!("environments/{env_id}/files/images")),
    );

    // Update to r2: served over both schemes, the wiki's content kept.
    let release2 = built(&server, &builds[1]).await;
    let update_started = Instant::now();
    let (op, log) = run_env_op(&server, &env_id, "update", &release2).await;
    let update_took = update_started.elapsed();
    assert_eq!(op["status"], "succeeded", "{op}\n{log}");
    let update_timing = timing(&server, op["id"].as_str().unwrap()).await;
    let serves_r2 = |context: &'static str| {
        let (plain, secure, http_url, https_url) = (&plain, &secure, &http_url, &https_url);
        async move {
            for (client, url) in [(plain, http_url), (secure, https_url)] {
                let (status, body) = page(client, url).await;
                assert_eq!(status, StatusCode::OK, "{context}: {url}: {body:.2000}");
                assert!(
                    body.contains(FIXTURE_PAGE) && body.contains("Hefring Wiki r2"),
                    "{context}: {url} does not serve r2 with its content: {body:.2000}"
                );
            }
            let marker = url_of(http_url, "/hefring-release.txt");
            let (status, body) = page(plain, &marker).await;
            assert_eq!(status, StatusCode::OK, "{context}: {body:.500}");
            assert_eq!(body, "r2\n", "{context}");
        }
    };
    serves_r2("after the update to r2").await;
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["release"], release2.as_str(), "{shown}");

    // r3's index.php answers 500: the preview check fails before anything is switched.
    let release3 = built(&server, &builds[2]).await;
    let (op, log) = run_env_op(&server, &env_id, "update", &release3).await;
    assert_eq!(op["status"], "failed", "{op}\n{log}");
    assert_eq!(task_status(&op, "check_preview"), "failed", "{op}\n{log}");
    assert!(
        !["running", "succeeded", "failed"].contains(&task_status(&op, "switch_release")),
        "r3 was never switched to: {op}\n{log}"
    );
    assert_eq!(task_status(&op, "switch_back"), "succeeded", "{op}\n{log}");
    assert!(log.contains("answered 500"), "{log}");
    serves_r2("after r3 failed its preview check").await;
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["status"], "active", "{shown}");
    assert_eq!(shown["release"], release2.as_str(), "{shown}");

    // r4's deploy commands fail after update.php ran: back to r2, database restored.
    let release4 = built(&server, &builds[3]).await;
    let (op, log) = run_env_op(&server, &env_id, "update", &release4).await;
    assert_eq!(op["status"], "failed", "{op}\n{log}");
    assert_eq!(
        task_status(&op, "check_preview"),
        "succeeded",
        "{op}\n{log}"
    );
    assert_eq!(
        task_status(&op, "run_deploy_commands"),
        "failed",
        "{op}\n{log}"
    );
    assert_eq!(task_status(&op, "switch_back"), "succeeded", "{op}\n{log}");
    assert!(
        log.contains("$ php maintenance/update.php --quick")
            && log.contains("deploy command `false` exited with status 1"),
        "update.php ran, then `false` failed: {op}\n{log}"
    );
    assert!(
        log.contains("restored the database from the safety dump"),
        "{log}"
    );
    serves_r2("after r4's deploy command failed").await;
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["status"], "active", "{shown}");
    assert_eq!(shown["release"], release2.as_str(), "{shown}");

    // Delete: nothing of the environment is left on the target or in MariaDB.
    assert_eq!(
        mariadb(&format!("SHOW DATABASES LIKE '{db_name}'"))
            .unwrap()
            .trim(),
        db_name,
        "the database existed before the delete"
    );
    let (status, op) = server
        .call(
            reqwest::Method::DELETE,
            &format!("/environments/{env_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(
        op["status"],
        "succeeded",
        "{op}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );
    assert_eq!(
        mariadb(&format!("SHOW DATABASES LIKE '{db_name}'"))
            .unwrap()
            .trim(),
        "",
        "the database is gone"
    );
    assert_eq!(
        mariadb(&format!(
            "SELECT COUNT(*) FROM mysql.user WHERE user = '{db_name}'"
        ))
        .unwrap()
        .trim(),
        "0",
        "the user is gone"
    );
    for leftover in [
        format!("php-fpm/pools/{env_id}.conf"),
        format!("php-fpm/sock/{env_id}.sock"),
        format!("nginx/sites/{env_id}.conf"),
        format!("nginx/pages/{env_id}.disabled.html"),
        format!("tls/{env_id}"),
        format!("environments/{env_id}"),
    ] {
        assert!(
            !root.path().join(&leftover).exists(),
            "{leftover} was left behind"
        );
    }
    // Nothing else names the environment either, its logs included.
    let named: Vec<String> = walk(root.path())
        .into_iter()
        .filter(|p| p.contains(&env_id))
        .collect();
    assert!(named.is_empty(), "left behind: {named:?}");
    for (client, url) in [(&plain, &http_url), (&secure, &https_url)] {
        match client.get(url.as_str()).send().await {
            Ok(response) => assert_ne!(
                response.status(),
                StatusCode::OK,
                "{url} is still served after the delete"
            ),
            // Over HTTPS the handshake fails once no certificate names the domain.
            Err(e) => assert!(url.starts_with("https"), "{url}: {e}"),
        }
    }
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["status"], "deleted", "{shown}");

    eprintln!(
        "mediawiki timings: fixture clone {:.1?}; first build {:.1?}; deploy {:.1?}; update {:.1?}; whole test {:.1?}",
        fixture_ready,
        first_build,
        deploy_took,
        update_took,
        started.elapsed()
    );
    for op in &builds {
        eprintln!("  {}", timing(&server, op).await);
    }
    eprintln!("  {deploy_timing}\n  {update_timing}");
}

/// Saves Main_Page's wikitext as an anonymous editor, through MediaWiki's action API.
async fn edit_main_page(client: &reqwest::Client, base: &str, text: &str) {
    let response = client
        .post(format!("{base}/api.php"))
        .form(&[
            ("action", "edit"),
            ("title", "Main_Page"),
            ("text", text),
            ("summary", "hefring test"),
            ("token", "+\\"),
            ("format", "json"),
        ])
        .send()
        .await
        .unwrap();
    let body = response.text().await.unwrap();
    assert!(
        body.contains("\"result\":\"Success\""),
        "editing Main_Page: {body:.2000}"
    );
}

/// Main_Page's wikitext as MediaWiki serves it.
async fn main_page_text(client: &reqwest::Client, base: &str) -> String {
    let (status, body) = page(
        client,
        &format!("{base}/index.php?title=Main_Page&action=raw"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body:.2000}");
    body
}

async fn run_ok(server: &Server, path: &str, body: Option<Value>) -> Value {
    let op = server.start_op(path, body).await;
    let id = op["id"].as_str().unwrap().to_string();
    let done = server.wait_op(&id).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}",
        server.log_text(&id).await
    );
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mediawiki_pages_are_backed_up_restored_cloned_synced_and_disabled() {
    ensure_mariadb();
    let repo = WikiRepo::clone_fixture();
    let server = Server::start().await;
    let _scratch = FastScratch::for_server(&server);
    let root = crate::environments::target_root_in(&fast_dir());
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let project = server
        .create("/projects", json!({"name": "wiki", "git_url": repo.url()}))
        .await;
    let project = project["id"].as_str().unwrap().to_string();
    let release = built(&server, &start_build(&server, &project, "main").await).await;
    let mut envs = Vec::new();
    for (name, domain) in [("live", "wiki-live.test"), ("staging", "wiki-staging.test")] {
        let env = server
            .create(
                "/environments",
                json!({"name": name, "project": project, "target": target, "domain": domain}),
            )
            .await;
        let id = env["id"].as_str().unwrap().to_string();
        let (op, log) = run_env_op(&server, &id, "deploy", &release).await;
        assert_eq!(op["status"], "succeeded", "{op}\n{log}");
        envs.push(id);
    }
    let (live, staging) = (envs[0].clone(), envs[1].clone());
    let client = site_client(
        &["wiki-live.test", "wiki-staging.test", "wiki-copy.test"],
        http,
        None,
    );
    let base = |host: &str| format!("http://{host}:{http}");
    let (live_url, staging_url) = (base("wiki-live.test"), base("wiki-staging.test"));

    // Edit, back up, edit again, restore: the first edit is back.
    edit_main_page(&client, &live_url, "First version, before the backup.").await;
    assert_eq!(
        main_page_text(&client, &live_url).await,
        "First version, before the backup."
    );
    let op = run_ok(
        &server,
        &format!("/environments/{live}/backup"),
        Some(json!({"description": "first"})),
    )
    .await;
    let first = op["result"]["backup"].as_str().unwrap().to_string();
    let (_, backup) = server.get(&format!("/backups/{first}")).await;
    assert!(
        backup["manifest"]["database"]["tables"].as_u64().unwrap() > 50,
        "{backup}"
    );
    edit_main_page(&client, &live_url, "Second version, after the backup.").await;
    assert_eq!(
        main_page_text(&client, &live_url).await,
        "Second version, after the backup."
    );
    run_ok(
        &server,
        &format!("/environments/{live}/restore"),
        Some(json!({"backup": first})),
    )
    .await;
    assert_eq!(
        main_page_text(&client, &live_url).await,
        "First version, before the backup."
    );

    // Production's backup into staging.
    assert!(main_page_text(&client, &staging_url)
        .await
        .contains(FIXTURE_TEXT));
    run_ok(
        &server,
        &format!("/environments/{staging}/restore"),
        Some(json!({"backup": first})),
    )
    .await;
    assert_eq!(
        main_page_text(&client, &staging_url).await,
        "First version, before the backup."
    );

    // A clone on a new domain shows the same content there.
    let op = run_ok(
        &server,
        &format!("/environments/{live}/clone"),
        Some(json!({"name": "copy", "domain": "wiki-copy.test"})),
    )
    .await;
    let copy = op["result"]["environment"].as_str().unwrap().to_string();
    let copy_database = hefring_core::environment::database_name(&copy);
    assert_eq!(
        mariadb(&format!("SHOW DATABASES LIKE '{copy_database}'"))
            .unwrap()
            .trim(),
        copy_database,
        "the clone has a database of its own"
    );
    let copy_url = base("wiki-copy.test");
    assert_eq!(
        main_page_text(&client, &copy_url).await,
        "First version, before the backup."
    );
    let (status, body) = page(&client, &format!("{copy_url}/index.php?title=Main_Page")).await;
    assert_eq!(status, StatusCode::OK, "{body:.2000}");
    assert!(
        body.contains("First version, before the backup."),
        "{body:.2000}"
    );

    // Sync the files only: staging gets live's upload and keeps its own pages.
    edit_main_page(&client, &staging_url, "Staging's own version.").await;
    let upload = root
        .path()
        .join(format!("environments/{live}/files/images/hefring-sync.txt"));
    std::fs::write(&upload, "uploaded on live\n").unwrap();
    let op = run_ok(
        &server,
        &format!("/environments/{staging}/sync"),
        Some(json!({"from": live, "database": false, "files": true})),
    )
    .await;
    assert_eq!(task_status(&op, "restore_database"), "skipped", "{op}");
    let (status, body) = page(&client, &format!("{staging_url}/images/hefring-sync.txt")).await;
    assert_eq!(status, StatusCode::OK, "{body:.500}");
    assert_eq!(body, "uploaded on live\n");
    assert_eq!(
        main_page_text(&client, &staging_url).await,
        "Staging's own version."
    );

    // Disabled: every path answers 503; enabled: the page again. A new connection per request:
    // an idle keep-alive connection may belong to an nginx worker of the configuration before
    // (it closes such connections as it shuts down, but a request can cross that close).
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .resolve(
            "wiki-live.test",
            std::net::SocketAddr::from(([127, 0, 0, 1], http)),
        )
        .build()
        .unwrap();
    run_ok(&server, &format!("/environments/{live}/disable"), None).await;
    for path in [
        "/",
        "/index.php?title=Main_Page",
        "/api.php",
        "/images/hefring-sync.txt",
        "/no/such/page",
    ] {
        let (status, body) = page(&client, &format!("{live_url}{path}")).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {body:.500}"
        );
    }
    run_ok(&server, &format!("/environments/{live}/enable"), None).await;
    assert_eq!(
        main_page_text(&client, &live_url).await,
        "First version, before the backup."
    );
}

/// tmpfs when the machine has one, else the temporary directory.
fn fast_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let writable = tempfile::Builder::new()
        .prefix("hefring-probe-")
        .tempdir_in(shm)
        .is_ok();
    if writable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The server's build trees (`DATA_DIR/builds`) and artifacts (`DATA_DIR/artifacts`) moved
/// to tmpfs, through links made before the first build; removed when dropped.
struct FastScratch {
    _dir: tempfile::TempDir,
}

impl FastScratch {
    fn for_server(server: &Server) -> FastScratch {
        let dir = tempfile::Builder::new()
            .prefix("hefring-it-scratch-")
            .tempdir_in(fast_dir())
            .unwrap();
        for name in ["builds", "artifacts"] {
            let link = server.data_dir().join(name);
            assert!(!link.exists(), "{} exists before any build", link.display());
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::os::unix::fs::symlink(dir.path().join(name), link).unwrap();
        }
        FastScratch { _dir: dir }
    }
}

/// Replaces the path (and query) of `url`.
fn url_of(url: &str, path: &str) -> String {
    let scheme_end = url.find("://").unwrap() + 3;
    let host_end = url[scheme_end..].find('/').unwrap() + scheme_end;
    format!("{}{path}", &url[..host_end])
}

/// Every path under `dir` (not following links).
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(path.to_string_lossy().into_owned());
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            }
        }
    }
    out
}
