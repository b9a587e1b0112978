//! Environments on a local server target, end to end: real nginx, PHP-FPM and MariaDB (or
//! SQLite), a small PHP fixture app of our own, deploy, update, rollback, HTTPS and delete.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hefring_core::environment::database_name;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{Repo, Server};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A target root the web user can traverse, short enough for PHP-FPM's socket paths. When
/// dropped, it stops the nginx and PHP-FPM that Hefring started there, and drops the MariaDB
/// database and user of every environment that lived there (a test rarely deletes its
/// environments, and the machine's MariaDB outlives the test).
pub struct TargetRoot(tempfile::TempDir);

impl TargetRoot {
    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for TargetRoot {
    fn drop(&mut self) {
        for pid_file in ["nginx/nginx.pid", "php-fpm/php-fpm.pid"] {
            if let Ok(pid) = std::fs::read_to_string(self.path().join(pid_file)) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    let _ = Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .status();
                }
            }
        }
        let Ok(environments) = std::fs::read_dir(self.path().join("environments")) else {
            return;
        };
        let mut sql = String::new();
        for entry in environments.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if id.starts_with("env_") && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                let name = database_name(&id);
                sql.push_str(&format!(
                    "DROP DATABASE IF EXISTS `{name}`; DROP USER IF EXISTS '{name}'@'localhost'; DROP USER IF EXISTS '{name}'@'%';"
                ));
            }
        }
        if !sql.is_empty() {
            let _ = mariadb(&sql);
        }
        // And the Unix user of each (a test rarely deletes its environments).
        if let Ok(environments) = std::fs::read_dir(self.path().join("environments")) {
            for entry in environments.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if id.starts_with("env_") {
                    let user = hefring_core::isolation::environment_user(&id);
                    let _ = Command::new("pkill").args(["-KILL", "-u", &user]).status();
                    let _ = Command::new("userdel").args(["-f", &user]).output();
                    let _ = Command::new("groupdel").arg(&user).output();
                }
            }
        }
    }
}

pub fn target_root() -> TargetRoot {
    target_root_in(std::path::Path::new("/tmp"))
}

/// [`target_root`] below another directory (tmpfs, for a big application).
pub fn target_root_in(parent: &std::path::Path) -> TargetRoot {
    let dir = tempfile::Builder::new()
        .prefix("hft-")
        .tempdir_in(parent)
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    TargetRoot(dir)
}

/// Starts the machine's MariaDB if it is down (the same command LAB-NOTES gives).
pub fn ensure_mariadb() {
    if std::path::Path::new("/run/mysqld/mysqld.sock").exists() && mariadb("SELECT 1").is_ok() {
        return;
    }
    let _ = Command::new("start-stop-daemon")
        .args([
            "--start",
            "--oknodo",
            "--background",
            "--exec",
            "/usr/sbin/mariadbd",
        ])
        .status();
    for _ in 0..100 {
        if mariadb("SELECT 1").is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("MariaDB is not running and could not be started");
}

/// Runs SQL as MariaDB's root over its socket; answers the output.
pub fn mariadb(sql: &str) -> Result<String, String> {
    let out = Command::new("mariadb")
        .args([
            "--protocol=socket",
            "--socket=/run/mysqld/mysqld.sock",
            "-u",
            "root",
            "-N",
            "-B",
            "-e",
            sql,
        ])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A server target on this machine with its own root and free ports, verified.
pub async fn local_target(
    server: &Server,
    name: &str,
    root: &std::path::Path,
) -> (String, u16, u16) {
    let (http, https) = (free_port(), free_port());
    let target = server
        .create(
            "/targets",
            json!({"name": name, "host": "local", "root": root, "http_port": http, "https_port": https}),
        )
        .await;
    let id = target["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(&format!("/targets/{id}/verify"), None)
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    (id, http, https)
}

/// The fixture app: its page shows the release marker and the rows of its table.
pub const APP_INDEX: &str = r#"<?php
$driver = getenv('DB_DRIVER');
if ($driver === 'sqlite') {
    $pdo = new PDO('sqlite:' . getenv('DB_NAME'));
} else {
    $dsn = $driver . ':host=' . getenv('DB_HOST') . ';port=' . getenv('DB_PORT') . ';dbname=' . getenv('DB_NAME');
    $pdo = new PDO($dsn, getenv('DB_USER'), getenv('DB_PASSWORD'));
}
echo 'release=' . trim(file_get_contents(__DIR__ . '/VERSION')) . "\n";
echo 'rows=' . $pdo->query('SELECT COUNT(*) FROM hits')->fetchColumn() . "\n";
echo 'upload=' . (is_file(__DIR__ . '/uploads/kept.txt') ? trim(file_get_contents(__DIR__ . '/uploads/kept.txt')) : 'none') . "\n";
"#;

pub const APP_INSTALL: &str = r#"<?php
$driver = getenv('DB_DRIVER');
if ($driver === 'sqlite') {
    $pdo = new PDO('sqlite:' . getenv('DB_NAME'));
} else {
    $dsn = $driver . ':host=' . getenv('DB_HOST') . ';port=' . getenv('DB_PORT') . ';dbname=' . getenv('DB_NAME');
    $pdo = new PDO($dsn, getenv('DB_USER'), getenv('DB_PASSWORD'));
}
$pdo->exec('CREATE TABLE IF NOT EXISTS hits (id INTEGER)');
file_put_contents(getenv('FILES_DIR') . '/uploads/kept.txt', 'from-install');
echo "installed\n";
"#;

/// Inserts a row; exits 1 afterwards when the release says so (a deploy command that fails
/// after it changed the database).
pub const APP_DEPLOY: &str = r#"<?php
$driver = getenv('DB_DRIVER');
if ($driver === 'sqlite') {
    $pdo = new PDO('sqlite:' . getenv('DB_NAME'));
} else {
    $dsn = $driver . ':host=' . getenv('DB_HOST') . ';port=' . getenv('DB_PORT') . ';dbname=' . getenv('DB_NAME');
    $pdo = new PDO($dsn, getenv('DB_USER'), getenv('DB_PASSWORD'));
}
$pdo->exec('INSERT INTO hits (id) VALUES (1)');
echo "deployed " . getenv('HEFRING_RELEASE') . "\n";
if (is_file(__DIR__ . '/FAIL_DEPLOY')) { fwrite(STDERR, "deploy failed on purpose\n"); exit(1); }
"#;

pub fn app_manifest(database: &str) -> String {
    format!(
        "database: {database}\nwritable: [uploads]\ninstall:\n  - php install.php\ndeploy:\n  - [php, deploy.php]\nhealth: /health.php\n"
    )
}

/// The fixture app's repository at its first version.
pub fn app_repo(database: &str) -> Repo {
    let repo = Repo::new(&app_manifest(database));
    repo.commit(&[
        ("index.php", APP_INDEX),
        ("install.php", APP_INSTALL),
        ("deploy.php", APP_DEPLOY),
        ("health.php", "<?php echo 'ok';\n"),
        ("VERSION", "1\n"),
        ("uploads/.keep", ""),
    ]);
    repo
}

/// Builds a release of the repository's HEAD; answers its id.
pub async fn build(server: &Server, project: &str) -> String {
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    op["result"]["release"].as_str().unwrap().to_string()
}

pub async fn add_project(server: &Server, name: &str, repo: &Repo) -> String {
    let project = server
        .create("/projects", json!({"name": name, "git_url": repo.url()}))
        .await;
    project["id"].as_str().unwrap().to_string()
}

/// A client that sends every request for `domain` to 127.0.0.1:`port`, not following
/// redirects.
pub fn site_client(domains: &[&str], port: u16, ca: Option<&str>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30));
    for domain in domains {
        builder = builder.resolve(domain, SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Some(pem) = ca {
        builder =
            builder.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

pub async fn page(client: &reqwest::Client, url: &str) -> (StatusCode, String) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status();
    (status, response.text().await.unwrap())
}

pub async fn deploy(server: &Server, env: &str, release: &str, action: &str) -> Value {
    let op = server
        .start_op(
            &format!("/environments/{env}/{action}"),
            Some(json!({"release": release})),
        )
        .await;
    server.wait_op(op["id"].as_str().unwrap()).await
}

fn task_status<'a>(op: &'a Value, name: &str) -> &'a str {
    op["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .and_then(|t| t["status"].as_str())
        .unwrap_or("absent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_php_site_on_mariadb_is_deployed_updated_rolled_back_and_deleted() {
    ensure_mariadb();
    let server = Server::start().await;
    let root = target_root();
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("mariadb");
    let project = add_project(&server, "app", &repo).await;
    let release1 = build(&server, &project).await;

    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "app.test",
                   "aliases": [{"domain": "www.app.test", "redirect": true}, {"domain": "app2.test"}]}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    assert_eq!(env["status"], "new");
    assert_eq!(env["url"], format!("http://app.test:{http}/"));

    let op = deploy(&server, &env_id, &release1, "deploy").await;
    assert_eq!(
        op["status"],
        "succeeded",
        "{op}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["status"], "active");
    assert_eq!(shown["release"], release1.as_str());

    // The target's verify reports Hefring's own servers.
    let op = server
        .start_op(&format!("/targets/{target}/verify"), None)
        .await;
    assert_eq!(
        server.wait_op(op["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    let (_, shown_target) = server.get(&format!("/targets/{target}")).await;
    assert_eq!(
        shown_target["inspection"]["servers"]["nginx"], "running",
        "{shown_target}"
    );
    assert_eq!(
        shown_target["inspection"]["servers"]["php-fpm"], "running",
        "{shown_target}"
    );

    let client = site_client(&["app.test", "www.app.test", "app2.test"], http, None);
    let (status, body) = page(&client, &format!("http://app.test:{http}/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("release=1") && body.contains("rows=0"),
        "{body}"
    );
    assert!(body.contains("upload=from-install"), "{body}");
    let (status, body) = page(&client, &format!("http://app2.test:{http}/")).await;
    assert_eq!(status, StatusCode::OK, "an alias serves the site: {body}");
    let response = client
        .get(format!("http://www.app.test:{http}/x?y=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        response.headers()["location"],
        format!("http://app.test:{http}/x?y=1").as_str()
    );

    // The generated password is real: the database refuses a wrong one and takes the right
    // one, and it appears in no log.
    let name = database_name(&env_id);
    let pool =
        std::fs::read_to_string(root.path().join(format!("php-fpm/pools/{env_id}.conf"))).unwrap();
    let password = pool
        .lines()
        .find_map(|l| l.strip_prefix("env[DB_PASSWORD] = \""))
        .map(|l| l.trim_end_matches('"').to_string())
        .expect("the pool carries DB_PASSWORD");
    assert_eq!(password.len(), 32);
    assert!(!log.contains(&password), "the password leaked into the log");
    assert!(
        !server.log().contains(&password),
        "the password leaked into the server log"
    );
    let (_, shown_target) = server.get(&format!("/targets/{target}")).await;
    assert!(!shown_target.to_string().contains(&password));
    let login = |pw: &str| {
        Command::new("mariadb")
            .args([
                "--protocol=socket",
                "--socket=/run/mysqld/mysqld.sock",
                "-u",
                &name,
                &name,
                "-e",
                "SELECT 1",
            ])
            .env("MYSQL_PWD", pw)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        login(&password),
        "the generated password must open the database"
    );
    assert!(!login("wrong-password"), "a wrong password must be refused");

    // Update to release 2: the deploy command adds a row.
    repo.commit(&[("VERSION", "2\n")]);
    let release2 = build(&server, &project).await;
    let op = deploy(&server, &env_id, &release2, "update").await;
    assert_eq!(
        op["status"],
        "succeeded",
        "{op}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );
    let (_, body) = page(&client, &format!("http://app.test:{http}/")).await;
    assert!(
        body.contains("release=2") && body.contains("rows=1"),
        "{body}"
    );
    assert!(
        body.contains("upload=from-install"),
        "persistent files stay: {body}"
    );

    // Release 3 fails its health check in the preview: nothing the site serves changes.
    repo.commit(&[
        ("VERSION", "3\n"),
        (
            "health.php",
            "<?php http_response_code(500); echo 'broken';\n",
        ),
    ]);
    let release3 = build(&server, &project).await;
    let op = deploy(&server, &env_id, &release3, "update").await;
    assert_eq!(op["status"], "failed", "{op}");
    assert_eq!(task_status(&op, "check_preview"), "failed", "{op}");
    assert_eq!(task_status(&op, "switch_back"), "succeeded", "{op}");
    let (_, body) = page(&client, &format!("http://app.test:{http}/")).await;
    assert!(
        body.contains("release=2") && body.contains("rows=1"),
        "{body}"
    );

    // Release 4's deploy command changes the database, then fails: back to release 2 with
    // the database as it was.
    repo.commit(&[
        ("VERSION", "4\n"),
        ("health.php", "<?php echo 'ok';\n"),
        ("FAIL_DEPLOY", "yes\n"),
    ]);
    let release4 = build(&server, &project).await;
    let op = deploy(&server, &env_id, &release4, "update").await;
    assert_eq!(op["status"], "failed", "{op}");
    assert_eq!(task_status(&op, "run_deploy_commands"), "failed", "{op}");
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert!(
        log.contains("restored the database from the safety dump"),
        "{log}"
    );
    let (_, body) = page(&client, &format!("http://app.test:{http}/")).await;
    assert!(
        body.contains("release=2") && body.contains("rows=1"),
        "{body}"
    );
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["status"], "active", "{shown}");
    assert_eq!(shown["release"], release2.as_str(), "{shown}");

    // Delete removes exactly what the environment made, and is idempotent.
    for _ in 0..2 {
        let op = server
            .call(
                reqwest::Method::DELETE,
                &format!("/environments/{env_id}"),
                None,
            )
            .await
            .1;
        let op = server.wait_op(op["id"].as_str().unwrap()).await;
        assert_eq!(op["status"], "succeeded", "{op}");
    }
    assert_eq!(
        mariadb(&format!("SHOW DATABASES LIKE '{name}'"))
            .unwrap()
            .trim(),
        ""
    );
    assert_eq!(
        mariadb(&format!(
            "SELECT COUNT(*) FROM mysql.user WHERE user = '{name}'"
        ))
        .unwrap()
        .trim(),
        "0"
    );
    for leftover in [
        format!("php-fpm/pools/{env_id}.conf"),
        format!("php-fpm/sock/{env_id}.sock"),
        format!("nginx/sites/{env_id}.conf"),
        format!("environments/{env_id}"),
    ] {
        assert!(
            !root.path().join(&leftover).exists(),
            "{leftover} was left behind"
        );
    }
    let (status, _) = page(&client, &format!("http://app.test:{http}/")).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "nginx no longer serves the domain"
    );
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["status"], "deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_environment_requests_are_refused_and_change_nothing() {
    let server = Server::start().await;
    let root = target_root();
    let (target, _, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let other_repo = app_repo("sqlite");
    let other_project = add_project(&server, "other", &other_repo).await;
    let other_release = build(&server, &other_project).await;
    let base = json!({"name": "live", "project": project, "target": target, "domain": "one.test"});
    let with = |patch: Value| {
        let mut body = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for (body, field) in [
        (with(json!({"domain": "Not A Domain"})), "domain"),
        (with(json!({"name": "Bad Name"})), "name"),
        (with(json!({"https": "sometimes"})), "https"),
        (
            with(json!({"project": "prj_00000000000000000000000000"})),
            "project",
        ),
        (with(json!({"target": "nope"})), "target"),
        (
            with(json!({"aliases": [{"domain": "one.test"}]})),
            "aliases[0].domain",
        ),
    ] {
        let (status, error) = server.post("/environments", body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
        assert_eq!(error["error"]["field"], field, "{error}");
    }
    let env = server.create("/environments", base.clone()).await;
    let env_id = env["id"].as_str().unwrap();
    // Another environment may not take a name in use, as domain or as alias.
    let (status, error) = server
        .post("/environments", with(json!({"name": "second", "domain": "two.test", "aliases": [{"domain": "one.test"}]})))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["error"]["field"], "aliases[0].domain");
    let (status, error) = server
        .post("/environments", with(json!({"domain": "three.test"})))
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "same name in the project: {error}"
    );
    let (_, list) = server.get("/environments").await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        1,
        "nothing else was stored: {list}"
    );

    let (status, error) = server
        .post(
            &format!("/environments/{env_id}/deploy"),
            json!({"release": "rel_00000000000000000000000000"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["error"]["field"], "release");
    let (status, error) = server
        .post(
            &format!("/environments/{env_id}/deploy"),
            json!({"release": other_release}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another project"),
        "{error}"
    );
    let (status, _) = server
        .post(
            &format!("/environments/{env_id}/update"),
            json!({"release": other_release}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = server.get("/environments/env_nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, ops) = server.get(&format!("/operations?subject={env_id}")).await;
    assert_eq!(
        ops["items"].as_array().unwrap().len(),
        0,
        "no operation was started: {ops}"
    );

    // Deploying twice at once: the second is refused, naming the first.
    let release = build(&server, &project).await;
    let first = server
        .start_op(
            &format!("/environments/{env_id}/deploy"),
            Some(json!({"release": release})),
        )
        .await;
    let (status, error) = server
        .post(
            &format!("/environments/{env_id}/deploy"),
            json!({"release": release}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{error}");
    assert_eq!(error["error"]["code"], "duplicate_operation");
    assert_eq!(error["error"]["operation"], first["id"]);
    let done = server.wait_op(first["id"].as_str().unwrap()).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}",
        server.log_text(done["id"].as_str().unwrap()).await
    );
}

/// Requests served while the site is updated again and again; answers (served, failed).
async fn hammer(
    client: reqwest::Client,
    url: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    served: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Relaxed) {
        let outcome = match client.get(&url).send().await {
            Ok(r) if r.status() == StatusCode::OK => match r.text().await {
                Ok(text) if text.starts_with("release=") => Ok(()),
                Ok(text) => Err(format!("unexpected page: {text:.200}")),
                Err(e) => Err(format!("reading the body: {e}")),
            },
            Ok(r) => Err(format!("status {}", r.status())),
            Err(e) => Err(format!("request: {e:?}")),
        };
        match outcome {
            Ok(()) => {
                served.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("failed request: {e}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_is_served_through_twenty_updates_and_https_works() {
    let server = Server::start().await;
    let root = target_root();
    let (target, http, https) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release_a = build(&server, &project).await;
    repo.commit(&[("VERSION", "2\n")]);
    let release_b = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "fast.test", "https": "required"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    assert_eq!(env["url"], format!("https://fast.test:{https}/"));
    let op = deploy(&server, &env_id, &release_a, "deploy").await;
    assert_eq!(
        op["status"],
        "succeeded",
        "{op}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );

    // HTTPS with the local CA's root: the certificate verifies for the domain, and HTTP
    // answers 301 to HTTPS.
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
    let secure = site_client(&["fast.test"], https, Some(&ca));
    let (status, body) = page(&secure, &format!("https://fast.test:{https}/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("release=1"), "{body}");
    let plain = site_client(&["fast.test"], http, None);
    let response = plain
        .get(format!("http://fast.test:{http}/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        response.headers()["location"],
        format!("https://fast.test:{https}/a").as_str()
    );

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        load.push(tokio::spawn(hammer(
            secure.clone(),
            format!("https://fast.test:{https}/"),
            stop.clone(),
            served.clone(),
            failed.clone(),
        )));
    }
    for i in 0..20 {
        let release = if i % 2 == 0 { &release_b } else { &release_a };
        let op = deploy(&server, &env_id, release, "update").await;
        assert_eq!(op["status"], "succeeded", "update {i}: {op}");
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let (served, failed) = (
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!("during 20 updates: {served} requests served, {failed} failed");
    assert!(served > 100, "the load generator ran: {served}");
    assert_eq!(failed, 0, "requests failed during updates");
    let (_, body) = page(&secure, &format!("https://fast.test:{https}/")).await;
    assert!(
        body.contains("release=1"),
        "the last update went to release A: {body}"
    );
}

/// A private pebble (ACME test CA) validating HTTP-01 for real against the target's nginx;
/// stopped when dropped.
struct Pebble {
    dir: tempfile::TempDir,
    info: Value,
}

impl Pebble {
    fn start(http_port: u16) -> Pebble {
        let dir = tempfile::Builder::new()
            .prefix("hefring-pebble-")
            .tempdir()
            .unwrap();
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/pebble/start.sh"
        );
        let out = Command::new("sh")
            .arg(script)
            .arg(dir.path())
            .arg(http_port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pebble did not start (scripts/test installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout);
        let info: Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
        Pebble { dir, info }
    }

    /// The root that signs what pebble issues (pebble makes a new one at each start).
    async fn root(&self) -> String {
        let api_ca = std::fs::read(self.info["api_ca"].as_str().unwrap()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&api_ca).unwrap())
            .build()
            .unwrap();
        client
            .get(self.info["roots"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/pebble/stop.sh"
        );
        let _ = Command::new("sh").arg(script).arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_certificates_come_from_an_acme_server_that_validates_http_01() {
    let http = free_port();
    let pebble = Pebble::start(http);
    let directory = pebble.info["directory"].as_str().unwrap().to_string();
    let api_ca = pebble.info["api_ca"].as_str().unwrap().to_string();
    let server = Server::start_with(
        &["--acme-directory", &directory, "--acme-ca-file", &api_ca],
        &[],
    )
    .await;
    let root = target_root();
    let https = free_port();
    let target = server
        .create(
            "/targets",
            json!({"name": "web", "host": "local", "root": root.path(), "http_port": http, "https_port": https}),
        )
        .await;
    let target = target["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(&format!("/targets/{target}/verify"), None)
        .await;
    assert_eq!(
        server.wait_op(op["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "acme.test",
                   "aliases": [{"domain": "www.acme.test", "redirect": true}], "https": "on"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    let op = deploy(&server, &env_id, &release, "deploy").await;
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}\n{log}");
    assert!(log.contains(&format!("from {directory}")), "{log}");

    let pebble_root = pebble.root().await;
    let secure = site_client(&["acme.test", "www.acme.test"], https, Some(&pebble_root));
    let (status, body) = page(&secure, &format!("https://acme.test:{https}/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("release=1"), "{body}");
    // The alias is on the certificate too (it redirects over HTTPS).
    let response = secure
        .get(format!("https://www.acme.test:{https}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    // With `on`, HTTP serves the site as well.
    let plain = site_client(&["acme.test"], http, None);
    let (status, body) = page(&plain, &format!("http://acme.test:{http}/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The local CA did not sign it: a client trusting only the local CA refuses it.
    let local_ca = server
        .http()
        .get(format!("{}/api/v1/ca.pem", server.url))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let wrong = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(local_ca.as_bytes()).unwrap())
        .resolve("acme.test", SocketAddr::from(([127, 0, 0, 1], https)))
        .build()
        .unwrap();
    assert!(wrong
        .get(format!("https://acme.test:{https}/"))
        .send()
        .await
        .is_err());
}

/// The serial number of the certificate nginx presents for `domain` on `port`.
fn served_serial(domain: &str, port: u16) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"openssl s_client -connect "127.0.0.1:$1" -servername "$2" </dev/null 2>/dev/null | openssl x509 -noout -serial"#)
        .arg("sh")
        .arg(port.to_string())
        .arg(domain)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_through_the_queue_before_they_end() {
    // Local CA certificates last 90 days: a 100-day window makes every one due at once.
    let server = Server::start_with(
        &[
            "--certificate-renew-days",
            "100",
            "--certificate-check-seconds",
            "1",
        ],
        &[],
    )
    .await;
    let root = target_root();
    let (target, _, https) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "renew.test", "https": "on"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    let op = deploy(&server, &env_id, &release, "deploy").await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let first = served_serial("renew.test", https);
    assert!(first.starts_with("serial="), "{first}");

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let renewal = loop {
        let (_, ops) = server
            .get(&format!("/operations?subject={env_id}&status=succeeded"))
            .await;
        if let Some(op) = ops["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|op| op["kind"] == "environment_renew_certificate")
        {
            break op.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no renewal ran: {ops}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(renewal["requested_by"], "hefring");
    // A graceful reload reaches every nginx worker within a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let renewed = served_serial("renew.test", https);
        assert!(renewed.starts_with("serial="), "{renewed}");
        if renewed != first {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nginx still serves the old certificate {first}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A "system" nginx of the test's own, run the way a distribution runs it: its own main
/// configuration including a sites directory, workers as www-data.
struct SystemNginx {
    dir: tempfile::TempDir,
}

impl SystemNginx {
    fn start() -> SystemNginx {
        let dir = tempfile::Builder::new()
            .prefix("hfsys-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path().display();
        std::fs::create_dir_all(dir.path().join("sites.d")).unwrap();
        std::fs::create_dir_all(dir.path().join("temp")).unwrap();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "user www-data;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/temp/body;\n\
                 fastcgi_temp_path {d}/temp/fastcgi;\n  proxy_temp_path {d}/temp/proxy;\n\
                 uwsgi_temp_path {d}/temp/uwsgi;\n  scgi_temp_path {d}/temp/scgi;\n\
                 include {d}/sites.d/*.conf;\n}}\n"
            ),
        )
        .unwrap();
        let nginx = SystemNginx { dir };
        let status = Command::new("nginx")
            .args(nginx.args(&[]))
            .status()
            .unwrap();
        assert!(status.success(), "the test's system nginx did not start");
        nginx
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let d = self.dir.path().display();
        let mut args = vec![
            "-p".to_string(),
            format!("{d}/"),
            "-c".into(),
            format!("{d}/nginx.conf"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }
}

impl Drop for SystemNginx {
    fn drop(&mut self) {
        let _ = Command::new("nginx")
            .args(self.args(&["-s", "stop"]))
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_nginx_can_serve_the_sites_in_the_aegir3_layout() {
    let server = Server::start().await;
    let system = SystemNginx::start();
    let root = target_root();
    let (http, https) = (free_port(), free_port());
    let sites = system.dir.path().join("sites.d");
    let command = |extra: &[&str]| {
        let mut argv = vec!["nginx".to_string()];
        argv.extend(system.args(extra));
        argv
    };
    let target = server
        .create(
            "/targets",
            json!({"name": "aegir", "host": "local", "root": root.path(), "http_port": http, "https_port": https,
                   "system_nginx": {"sites_dir": sites, "test_command": command(&["-t", "-q"]),
                                    "reload_command": command(&["-s", "reload"])}}),
        )
        .await;
    assert_eq!(
        target["system_nginx"]["sites_dir"],
        sites.to_string_lossy().as_ref()
    );
    let target = target["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(&format!("/targets/{target}/verify"), None)
        .await;
    assert_eq!(
        server.wait_op(op["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "aegir.test"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    let op = deploy(&server, &env_id, &release, "deploy").await;
    assert_eq!(
        op["status"],
        "succeeded",
        "{op}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );
    let block = sites.join(format!("hefring-{env_id}.conf"));
    assert!(
        block.exists(),
        "the server block goes where the system nginx reads it"
    );
    assert!(
        !root.path().join("nginx/nginx.pid").exists(),
        "Hefring started no nginx of its own"
    );
    let (status, body) = page(
        &site_client(&["aegir.test"], http, None),
        &format!("http://aegir.test:{http}/"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("release=1"), "{body}");

    let op = server
        .call(
            reqwest::Method::DELETE,
            &format!("/environments/{env_id}"),
            None,
        )
        .await
        .1;
    assert_eq!(
        server.wait_op(op["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    assert!(!block.exists());
    // Its only server block gone, the system nginx no longer listens there, or answers
    // something else than the site.
    let served = site_client(&["aegir.test"], http, None)
        .get(format!("http://aegir.test:{http}/"))
        .send()
        .await
        .map(|r| r.status() == StatusCode::OK)
        .unwrap_or(false);
    assert!(!served, "the system nginx no longer serves it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_site_answers_every_path_with_503_until_enabled() {
    let server = Server::start().await;
    let root = target_root();
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "off.test"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    assert_eq!(
        deploy(&server, &env_id, &release, "deploy").await["status"],
        "succeeded"
    );
    let client = site_client(&["off.test"], http, None);

    let op = server
        .start_op(&format!("/environments/{env_id}/disable"), None)
        .await;
    assert_eq!(
        server.wait_op(op["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["status"], "disabled");
    for path in [
        "/",
        "/index.php",
        "/health.php",
        "/no/such/page",
        "/uploads/kept.txt",
    ] {
        let (status, body) = page(&client, &format!("http://off.test:{http}{path}")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert!(
            body.contains("off.test"),
            "{path}: the disabled page names the site: {body}"
        );
    }
    // Nothing else changed: the release and the data are as they were.
    assert_eq!(shown["release"], release.as_str());

    let op = server
        .start_op(&format!("/environments/{env_id}/enable"), None)
        .await;
    assert_eq!(
        server.wait_op(op["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
    // What an enable promises is for new connections: one kept alive from before may still be
    // answered by a worker of the old configuration until that worker lets it go (seen under
    // a loaded full run). A new client makes a new connection.
    let client = site_client(&["off.test"], http, None);
    let (status, body) = page(&client, &format!("http://off.test:{http}/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("release=1") && body.contains("upload=from-install"),
        "{body}"
    );
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["status"], "active");

    // Verify starts Hefring's nginx again when it is down, and checks the site's health.
    // (Our kept-alive connections go first: a stopping nginx waits for its open ones.)
    drop(client);
    let pid = std::fs::read_to_string(root.path().join("nginx/nginx.pid")).unwrap();
    // A fast stop (TERM): a graceful one waits up to worker_shutdown_timeout for connections.
    let status = Command::new("kill")
        .args(["-TERM", pid.trim()])
        .status()
        .unwrap();
    assert!(status.success());
    // Down means the master is gone, not only its port closed (a master finishing its
    // workers' connections still counts as running).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Command::new("kill")
        .args(["-0", pid.trim()])
        .status()
        .unwrap()
        .success()
    {
        assert!(std::time::Instant::now() < deadline, "nginx did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let op = server
        .start_op(&format!("/environments/{env_id}/verify"), None)
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert!(log.contains("nginx was not running: started it"), "{log}");
    let client = site_client(&["off.test"], http, None);
    let (status, _) = page(&client, &format!("http://off.test:{http}/")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_link_logs_in_once_and_stays_out_of_logs() {
    let server = Server::start().await;
    let root = target_root();
    let (target, http, _) = local_target(&server, "web", root.path()).await;
    let repo = app_repo("sqlite");
    repo.commit(&[
        (
            ".hefring.yml",
            &format!("{}login: [php, makelogin.php]\n", app_manifest("sqlite")),
        ),
        // A one-time token in the persistent files; the page accepts it once.
        (
            "makelogin.php",
            "<?php $t = bin2hex(random_bytes(16)); file_put_contents(getenv('FILES_DIR') . '/uploads/login-' . $t, '1'); echo \"one-time link:\\n/login.php?token=$t\\n\";\n",
        ),
        (
            "login.php",
            "<?php $t = preg_replace('/[^0-9a-f]/', '', $_GET['token'] ?? ''); $f = __DIR__ . '/uploads/login-' . $t;\nif ($t !== '' && is_file($f) && unlink($f)) { echo 'welcome, admin'; } else { http_response_code(403); echo 'link used or unknown'; }\n",
        ),
    ]);
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "in.test"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    assert_eq!(
        deploy(&server, &env_id, &release, "deploy").await["status"],
        "succeeded"
    );

    let (status, link) = server
        .call(
            reqwest::Method::POST,
            &format!("/environments/{env_id}/login-link"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{link}");
    let url = link["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("http://in.test:{http}/login.php?token=")),
        "{url}"
    );
    let client = site_client(&["in.test"], http, None);
    let (status, body) = page(&client, url).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "welcome, admin"));
    let (status, _) = page(&client, url).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the link works once");

    // Recorded as an operation, without the link in its log or result.
    let op = server.op(link["operation"].as_str().unwrap()).await;
    assert_eq!(op["kind"], "environment_login");
    assert_eq!(op["status"], "succeeded");
    assert!(!op.to_string().contains("token="), "{op}");
    let log = server.log_text(link["operation"].as_str().unwrap()).await;
    assert!(!log.contains("token="), "{log}");
}
