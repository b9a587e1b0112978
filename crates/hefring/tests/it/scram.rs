//! Generated database passwords, proven against a private PostgreSQL cluster that enforces
//! `scram-sha-256` (the machine's shared cluster trusts everyone, so it proves nothing): the
//! site connects with its generated password, a wrong one is refused, the admin password
//! never shows in a log or in the API, and delete drops the role and the database.

use std::process::{Command, Output};
use std::time::Instant;

use reqwest::StatusCode;
use serde_json::json;

use crate::environments::{
    add_project, app_repo, build, free_port, page, site_client, target_root,
};
use crate::harness::Server;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Random hex from the kernel: passwords nobody could guess or find by accident.
pub(crate) fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    hex::encode(buf)
}

fn as_postgres(program: &str) -> Command {
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--", program]);
    command
}

fn check(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A private PostgreSQL 15 cluster on 127.0.0.1:`port` whose every connection needs a
/// scram-sha-256 password; stopped and removed when dropped.
pub(crate) struct ScramCluster {
    dir: tempfile::TempDir,
    pub(crate) port: u16,
    pub(crate) password: String,
}

impl ScramCluster {
    pub(crate) fn start() -> ScramCluster {
        let dir = tempfile::Builder::new()
            .prefix("hefring-pg-")
            .tempdir_in("/tmp")
            .unwrap();
        check(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .output()
                .unwrap(),
            "chown",
        );
        let cluster = ScramCluster {
            port: free_port(),
            password: format!("adm-{}", random_hex(16)),
            dir,
        };
        // The superuser's password reaches initdb in a file only postgres can read.
        let pwfile = cluster.dir.path().join("pwfile");
        check(
            as_postgres("sh")
                .args(["-c", "umask 077; cat > \"$1\"", "sh"])
                .arg(&pwfile)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write;
                    child
                        .stdin
                        .take()
                        .unwrap()
                        .write_all(cluster.password.as_bytes())?;
                    child.wait_with_output()
                })
                .unwrap(),
            "writing the password file",
        );
        let started = Instant::now();
        check(
            as_postgres(&format!("{PG_BIN}/initdb"))
                .arg("-D")
                .arg(cluster.data())
                .args([
                    "--auth=scram-sha-256",
                    "--username=postgres",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .output()
                .unwrap(),
            "initdb",
        );
        std::fs::remove_file(&pwfile).unwrap();
        check(
            as_postgres(&format!("{PG_BIN}/pg_ctl"))
                .arg("-D")
                .arg(cluster.data())
                .arg("-l")
                .arg(cluster.dir.path().join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1",
                    cluster.port,
                    cluster.dir.path().display()
                ))
                .args(["-w", "-t", "30", "start"])
                .output()
                .unwrap(),
            "pg_ctl start",
        );
        eprintln!(
            "scram cluster on port {} ready in {:.1?}",
            cluster.port,
            started.elapsed()
        );
        cluster
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// `psql` over TCP as `user` with `password` (in the environment, never in argv); answers
    /// its output, unaligned and without headers.
    fn psql(&self, user: &str, password: &str, database: &str, sql: &str) -> Output {
        Command::new("psql")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-w",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                database,
                "-c",
                sql,
            ])
            .env_remove("PGPASSFILE")
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap()
    }

    /// SQL as the superuser; answers the trimmed output.
    fn admin(&self, sql: &str) -> String {
        let out = self.psql("postgres", &self.password, "postgres", sql);
        check(out, sql).trim().to_string()
    }
}

impl Drop for ScramCluster {
    fn drop(&mut self) {
        let _ = as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_postgresql_passwords_work_under_scram_and_no_admin_secret_leaks() {
    let started = Instant::now();
    let cluster = ScramCluster::start();
    // The cluster really asks for passwords: no password and a wrong one are refused.
    assert!(!cluster
        .psql("postgres", "", "postgres", "SELECT 1")
        .status
        .success());
    let wrong = cluster.psql("postgres", "not-the-password", "postgres", "SELECT 1");
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    assert_eq!(cluster.admin("SHOW password_encryption"), "scram-sha-256");

    let server = Server::start().await;
    let root = target_root();
    let (http, https) = (free_port(), free_port());
    let target = server
        .create(
            "/targets",
            json!({"name": "web", "host": "local", "root": root.path(),
                   "http_port": http, "https_port": https,
                   "postgresql": {"host": "127.0.0.1", "port": cluster.port,
                                  "user": "postgres", "password": cluster.password}}),
        )
        .await;
    let target = target["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(&format!("/targets/{target}/verify"), None)
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let (_, shown_target) = server.get(&format!("/targets/{target}")).await;
    assert_eq!(
        shown_target["postgresql"]["port"], cluster.port,
        "{shown_target}"
    );

    let repo = app_repo("postgresql");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "pg.test"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    let name = hefring_core::environment::database_name(&env_id);
    let op = server
        .start_op(
            &format!("/environments/{env_id}/deploy"),
            Some(json!({"release": release})),
        )
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(
        op["status"],
        "succeeded",
        "{op}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );

    // The site connected through scram with the password it was given, and its install
    // command made its table.
    let client = site_client(&["pg.test"], http, None);
    let (status, body) = page(&client, &format!("http://pg.test:{http}/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("release=1") && body.contains("rows=0"),
        "{body}"
    );

    // The generated password opens the database and a wrong one does not; PostgreSQL keeps
    // a SCRAM verifier of it.
    let pool =
        std::fs::read_to_string(root.path().join(format!("php-fpm/pools/{env_id}.conf"))).unwrap();
    let password = pool
        .lines()
        .find_map(|l| l.strip_prefix("env[DB_PASSWORD] = \""))
        .map(|l| l.trim_end_matches('"').to_string())
        .expect("the pool carries DB_PASSWORD");
    assert_eq!(password.len(), 32, "{password}");
    let out = cluster.psql(
        &name,
        &password,
        &name,
        "SELECT current_user, current_database()",
    );
    assert_eq!(
        check(out, "login with the generated password").trim(),
        format!("{name}|{name}")
    );
    let out = cluster.psql(&name, &format!("{password}x"), &name, "SELECT 1");
    assert!(!out.status.success(), "a wrong password must be refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        cluster.admin(&format!(
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = '{name}'"
        )),
        "t"
    );
    assert_eq!(
        cluster.admin(&format!(
            "SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{name}'"
        )),
        name,
        "the database belongs to the environment's role"
    );
    let out = cluster.psql(
        "postgres",
        &cluster.password,
        &name,
        "SELECT pg_catalog.pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'hits'",
    );
    assert_eq!(
        check(out, "the install command's table").trim(),
        name,
        "the site's install command made its table as the environment's role"
    );

    // Back up (pg_dump, checked against the catalog), change the data, restore: the rows are
    // as they were (plus the one the deploy command adds), and the restored table still
    // belongs to the environment's role.
    let op = server
        .start_op(&format!("/environments/{env_id}/backup"), None)
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(
        op["status"],
        "succeeded",
        "{op}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );
    let backup = op["result"]["backup"].as_str().unwrap().to_string();
    let (_, shown) = server.get(&format!("/backups/{backup}")).await;
    assert_eq!(
        shown["manifest"]["database"]["kind"], "postgresql",
        "{shown}"
    );
    assert_eq!(shown["manifest"]["database"]["tables"], 1, "{shown}");
    let out = cluster.psql(
        &name,
        &password,
        &name,
        "INSERT INTO hits VALUES (1), (2), (3)",
    );
    check(out, "inserting rows as the site");
    let (_, body) = page(&client, &format!("http://pg.test:{http}/")).await;
    assert!(body.contains("rows=3"), "{body}");
    let op = server
        .start_op(
            &format!("/environments/{env_id}/restore"),
            Some(json!({"backup": backup})),
        )
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(
        op["status"],
        "succeeded",
        "{op}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );
    let (_, body) = page(&client, &format!("http://pg.test:{http}/")).await;
    assert!(body.contains("rows=1"), "{body}");
    let out = cluster.psql(
        "postgres",
        &cluster.password,
        &name,
        "SELECT pg_catalog.pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'hits'",
    );
    assert_eq!(check(out, "the restored table").trim(), name);

    // An update whose deploy command fails after it changed the database is rolled back
    // from its safety dump: loaded as the environment's role, so the site can still read
    // its table (as the postgres admin, it would own it and the site would get errors).
    repo.commit(&[("VERSION", "2\n"), ("FAIL_DEPLOY", "")]);
    let release2 = build(&server, &project).await;
    let op = server
        .start_op(
            &format!("/environments/{env_id}/update"),
            Some(json!({"release": release2})),
        )
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "failed", "{op}\n{log}");
    assert!(
        log.contains("restored the database from the safety dump"),
        "{log}"
    );
    let (status, body) = page(&client, &format!("http://pg.test:{http}/")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("release=1") && body.contains("rows=1"),
        "{body}"
    );

    // Delete: the role and the database are gone from the cluster.
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
        cluster.admin(&format!(
            "SELECT COUNT(*) FROM pg_roles WHERE rolname = '{name}'"
        )),
        "0",
        "the role is gone"
    );
    assert_eq!(
        cluster.admin(&format!(
            "SELECT COUNT(*) FROM pg_database WHERE datname = '{name}'"
        )),
        "0",
        "the database is gone"
    );
    let out = cluster.psql(&name, &password, "postgres", "SELECT 1");
    assert!(!out.status.success(), "the role can no longer log in");

    // Neither the admin password nor the generated one appears in any operation's log, in
    // the target as the API shows it, or in the server's own log.
    let (_, ops) = server.get("/operations?limit=100").await;
    let ops = ops["items"]
        .as_array()
        .expect("a list of operations")
        .clone();
    assert!(
        ops.len() >= 5,
        "target verify, build, deploy, delete: {ops:?}"
    );
    let mut seen_kinds = Vec::new();
    for op in &ops {
        let id = op["id"].as_str().unwrap();
        let log = server.log_text(id).await;
        assert!(
            !log.contains(&cluster.password),
            "the admin password leaked into the log of {id}"
        );
        assert!(
            !log.contains(&password),
            "the generated password leaked into the log of {id}"
        );
        seen_kinds.push(op["kind"].as_str().unwrap_or_default().to_string());
    }
    for kind in [
        "environment_deploy",
        "environment_backup",
        "environment_restore",
        "environment_delete",
        "target_verify",
    ] {
        assert!(
            seen_kinds.iter().any(|k| k == kind),
            "{kind} in {seen_kinds:?}"
        );
    }
    for path in [format!("/targets/{target}"), "/targets".to_string()] {
        let (status, shown) = server.get(&path).await;
        assert_eq!(status, StatusCode::OK);
        let text = shown.to_string();
        assert!(
            !text.contains(&cluster.password),
            "GET {path} shows the admin password: {text}"
        );
        assert!(
            !text.contains(&password),
            "GET {path} shows the site's password"
        );
    }
    let (_, shown_env) = server.get(&format!("/environments/{env_id}")).await;
    assert!(!shown_env.to_string().contains(&password), "{shown_env}");
    assert!(
        !server.log().contains(&cluster.password),
        "the server log has the admin password"
    );
    eprintln!("scram test took {:.1?}", started.elapsed());
}
