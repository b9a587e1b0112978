//! Builds cannot reach the control plane (issue 12, items 4 and 5), attacked for real as root:
//! a hostile build tries to read Hefring's data directory, keys, another project's mirror and
//! root's files, to write outside its tree, and to connect to the API, the broker, the state
//! database and the metadata address; an environment user (a uid in the environment range)
//! tries the same connections.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use reqwest::StatusCode;
use serde_json::json;

use crate::distributed::Vhost;
use crate::environments::add_project;
use crate::harness::{create_token, Repo, Server};
use crate::scram::{random_hex, ScramCluster};

/// The uid of the build user (made by the server when missing).
fn build_uid() -> u32 {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields[0] == hefring_core::isolation::BUILD_USER).then(|| fields[2].parse().unwrap())
        })
        .expect("the server made the build user")
}

/// Verifies a project (its mirror is made then), whether or not one was queued at creation.
async fn verify_project(server: &Server, project: &str) {
    let (status, body) = server.action(&format!("/projects/{project}/verify")).await;
    let id = match status {
        StatusCode::ACCEPTED => body["id"].as_str().unwrap().to_string(),
        StatusCode::CONFLICT => body["error"]["operation"].as_str().unwrap().to_string(),
        other => panic!("verify answered {other}: {body}"),
    };
    let op = server.wait_op(&id).await;
    assert_eq!(op["status"], "succeeded", "{op}");
}

/// Builds `project` at `main`; answers the operation once it ended.
async fn build_op(server: &Server, project: &str) -> serde_json::Value {
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;
    server.wait_op(op["id"].as_str().unwrap()).await
}

/// A line of a PEM file's body: content, not a header that any PEM file shares.
fn pem_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .max_by_key(|l| l.len())
        .unwrap();
    assert!(line.len() >= 40, "{path:?}: {line}");
    line.to_string()
}

#[tokio::test]
async fn a_hostile_build_reads_and_writes_nothing_outside_its_tree() {
    let server = Server::start().await;
    let data = server.data_dir().to_path_buf();
    // Today's modes in production (a data directory others may enter, a database they may
    // read): only the build user and its sandbox stand between a build and them.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("hefring.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (status, _) = server.get("/ca.pem").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the CA is made when first asked for"
    );

    // Another project, with a secret in its repository, mirrored in the data directory.
    let other_secret = format!("other-project-secret-{}", random_hex(16));
    let other = Repo::new("runtime: php\n");
    other.commit(&[("secret.txt", &other_secret)]);
    let other_id = add_project(&server, "other", &other).await;
    verify_project(&server, &other_id).await;
    let mirror = data.join("git").join(format!("{other_id}.git"));
    assert!(mirror.join("HEAD").exists(), "{mirror:?}");

    // Root's files outside the data directory: one only root may read, one anyone may (the
    // sandbox does not show its directory at all).
    let canaries = tempfile::Builder::new()
        .prefix("hefring-canary-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(canaries.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (closed, open) = (canaries.path().join("closed"), canaries.path().join("open"));
    let closed_secret = format!("closed-canary-{}", random_hex(16));
    let open_secret = format!("open-canary-{}", random_hex(16));
    std::fs::write(&closed, &closed_secret).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&open, &open_secret).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();

    let ssh_key = data.join("ssh").join("id_ed25519");
    let ca_key = data.join("ca").join("ca-key.pem");
    let db = data.join("hefring.db");
    // What must never come out: each file's content (the database holds the other project's
    // repository path; the hostile repository never names it).
    let secrets = [
        ("another project's repository", other_secret.clone()),
        ("root's 0600 file", closed_secret.clone()),
        ("root's 0644 file", open_secret.clone()),
        ("the SSH private key", pem_line(&ssh_key)),
        ("the CA key", pem_line(&ca_key)),
        ("the state database", other.url()),
    ];

    let d = data.display();
    let reads = [
        db.clone(),
        data.join("hefring.db-wal"),
        ssh_key.clone(),
        ca_key.clone(),
        mirror.join("HEAD"),
        mirror.join("config"),
        closed.clone(),
        open.clone(),
        "/etc/shadow".into(),
        "/proc/1/environ".into(),
    ];
    let mut script = String::from("set +e\necho \"uid=$(id -u) user=$(id -un)\"\n");
    for path in &reads {
        script.push_str(&format!(
            "echo '== {}'; cat '{}' 2>&1\n",
            path.display(),
            path.display()
        ));
    }
    script.push_str(&format!(
        "git --git-dir='{}' show HEAD:secret.txt 2>&1\n",
        mirror.display()
    ));
    script.push_str(&format!(
        "ls -la / '{d}' '{}' 2>&1\n",
        canaries.path().display()
    ));
    let usr_pwned = std::path::PathBuf::from(format!("/usr/pwned-{}", random_hex(8)));
    for path in [
        usr_pwned.clone(),
        data.join("pwned"),
        canaries.path().join("pwned"),
        closed.clone(),
    ] {
        script.push_str(&format!(
            "echo pwned > '{0}' 2>&1 && echo 'wrote {0}'\n",
            path.display()
        ));
    }
    script.push_str(&format!(
        "chmod 0666 '{0}' 2>&1; chown \"$(id -u)\" '{0}' 2>&1; rm -f '{0}' 2>&1\n",
        closed.display()
    ));
    script.push_str("echo 'hostile build done'\nexit 0\n");

    let hostile = Repo::new("runtime: php\nbuild:\n  - \"bash hostile.sh 2>&1 | tee loot.txt\"\n");
    hostile.commit(&[("hostile.sh", &script)]);
    let project = add_project(&server, "hostile", &hostile).await;
    let op = build_op(&server, &project).await;
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}\n{log}");
    assert!(log.contains("hostile build done"), "{log}");
    let uid = build_uid();
    assert_ne!(uid, 0);
    assert!(
        log.contains(&format!("uid={uid} user=hefring-build")),
        "the build runs as the build user: {log}"
    );
    assert!(
        log.contains(&format!("== {}", db.display())),
        "the reads were tried: {log}"
    );

    // Nothing it read came out, in the log or in the artifact it packed.
    let (_, release) = server
        .get(&format!(
            "/releases/{}",
            op["result"]["release"].as_str().unwrap()
        ))
        .await;
    let sha = release["artifact"]["sha256"].as_str().unwrap();
    let artifact = data.join("artifacts").join(format!("{sha}.tar.zst"));
    let tar = Command::new("zstd")
        .args(["-dcq"])
        .arg(&artifact)
        .output()
        .unwrap();
    assert!(tar.status.success());
    let tar = String::from_utf8_lossy(&tar.stdout);
    assert!(
        tar.contains("hostile build done"),
        "the loot is in the artifact"
    );
    for (what, secret) in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "{what} leaked into the log:\n{log}"
        );
        assert!(
            !tar.contains(secret.as_str()),
            "{what} leaked into the artifact"
        );
    }

    // Nothing it wrote landed outside its tree; root's file is as it was.
    assert!(!log.contains("wrote "), "{log}");
    for path in [usr_pwned, data.join("pwned"), canaries.path().join("pwned")] {
        assert!(!path.exists(), "{path:?} was written");
    }
    assert_eq!(std::fs::read_to_string(&closed).unwrap(), closed_secret);
    let meta = std::fs::metadata(&closed).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert_eq!(meta.mode() & 0o7777, 0o600);

    // The tree lived outside the data directory, and is gone.
    assert!(!data.join("builds").exists());
    let builds = server.outside.path().join("builds");
    assert_eq!(std::fs::read_dir(&builds).unwrap().count(), 0, "{builds:?}");
}

/// The probe a build or an environment user runs: one line per destination, `open`, or
/// `failed` with the error (a refusal is immediate: "Connection refused").
fn probe_script(destinations: &[(String, String)]) -> String {
    let mut script = String::from("set +e\n");
    for (name, address) in destinations {
        let (host, port) = address.rsplit_once(':').unwrap();
        script.push_str(&format!(
            "if out=$(timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}' 2>&1); then echo 'probe {name} open'; else echo \"probe {name} failed: $out\"; fi\n"
        ));
    }
    script
}

fn assert_probes(output: &str, destinations: &[(String, String)], who: &str) {
    for (name, _) in destinations {
        let prefix = format!("probe {name} ");
        let line = output
            .lines()
            .find_map(|l| l.find(&prefix).map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("{who}: no probe of {name}:\n{output}"));
        if name == "allowed" {
            assert!(line.ends_with(" open"), "{who}: {line}\n{output}");
        } else {
            assert!(
                line.contains("failed") && line.contains("Connection refused"),
                "{who}: {name} should be refused: {line}\n{output}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_and_environment_users_cannot_reach_the_control_planes_private_services() {
    // The state database on a PostgreSQL of its own (its port refused to builds and sites
    // while this runs: the machine's shared 5432 stays open to other tests' sites).
    let cluster = ScramCluster::start();
    let database_url = format!(
        "postgres://postgres:{}@127.0.0.1:{}/postgres",
        cluster.password, cluster.port
    );
    let vhost = Vhost::new();
    let server = Server::start_with(
        &["--broker-url", &vhost.url()],
        &[("HEFRING_DATABASE_URL", &database_url)],
    )
    .await;
    let token = create_token(server.data_dir(), &["--database-url", &database_url]);
    let server = server.with_token(token);
    let server_log = server.log();
    let tables = crate::harness::nft_tables(&server_log);
    assert_eq!(tables.len(), 1, "{server_log}");

    // A port of the machine that is not private: reachable.
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    std::thread::spawn(move || for _ in allowed.incoming() {});

    let api_port = server.url.rsplit(':').next().unwrap().to_string();
    let destinations = vec![
        ("api".to_string(), format!("127.0.0.1:{api_port}")),
        ("broker".to_string(), "127.0.0.1:5672".to_string()),
        (
            "state-database".to_string(),
            format!("127.0.0.1:{}", cluster.port),
        ),
        ("metadata".to_string(), "169.254.169.254:80".to_string()),
        ("allowed".to_string(), format!("127.0.0.1:{allowed_port}")),
    ];
    let script = probe_script(&destinations);

    // A build.
    let repo = Repo::new("runtime: php\nbuild:\n  - \"bash probe.sh\"\n");
    repo.commit(&[("probe.sh", &script)]);
    let project = add_project(&server, "prober", &repo).await;
    let op = build_op(&server, &project).await;
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}\n{log}");
    assert_probes(&log, &destinations, "the build");

    // Root (Hefring itself) still reaches its own services.
    let mine: Vec<_> = destinations
        .iter()
        .filter(|(name, _)| name != "metadata")
        .cloned()
        .collect();
    let as_root = Command::new("bash")
        .arg("-c")
        .arg(probe_script(&mine))
        .output()
        .unwrap();
    let as_root = String::from_utf8_lossy(&as_root.stdout);
    for (name, _) in &mine {
        assert!(
            as_root.contains(&format!("probe {name} open")),
            "root: {as_root}"
        );
    }

    // An environment user: a throwaway user with a uid at the top of the range (the real
    // ones are allocated from its bottom).
    let offset: u32 = u32::from_str_radix(&random_hex(2), 16).unwrap() % 50_000;
    let uid = hefring_core::isolation::ENVIRONMENT_UID_MAX - offset;
    let user = format!("hft-{}", random_hex(4));
    let mut made = false;
    for _ in 0..100 {
        let out = Command::new("useradd")
            .args(["-u", &uid.to_string(), "-N", "-g", "nogroup", "-M", "-s"])
            .args(["/usr/sbin/nologin", &user])
            .output()
            .unwrap();
        if out.status.success() {
            made = true;
            break;
        }
        // 10: another process holds the password files' lock.
        assert_eq!(
            out.status.code(),
            Some(10),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(made, "useradd kept failing");
    let site = Command::new("runuser")
        .args(["-u", &user, "--", "bash", "-c", &script])
        .current_dir("/")
        .output()
        .unwrap();
    for _ in 0..100 {
        let out = Command::new("userdel").arg(&user).output().unwrap();
        if out.status.code() != Some(10) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let site = String::from_utf8_lossy(&site.stdout);
    assert_probes(&site, &destinations, "an environment user");

    // The rules live in this server's own table, which goes with it.
    drop(server);
    let listed = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(!listed.contains(&tables[0]), "{listed}");
}

#[tokio::test]
async fn a_manifest_that_is_a_link_is_refused_not_read_as_root() {
    let server = Server::start().await;
    let repo = Repo::new("runtime: php\n");
    let manifest = repo.dir.path().join(".hefring.yml");
    std::fs::remove_file(&manifest).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", &manifest).unwrap();
    repo.git(&["add", "-A"]);
    repo.git(&["commit", "-q", "-m", "link"]);
    let project = add_project(&server, "linked", &repo).await;
    let op = build_op(&server, &project).await;
    assert_eq!(op["status"], "failed", "{op}");
    assert!(
        op["error"]
            .as_str()
            .unwrap()
            .contains("must be a regular file"),
        "{op}"
    );
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert!(!log.contains("root:"), "{log}");
}
