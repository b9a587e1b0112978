//! Secrets at rest (issue 12, items 4, 6 and 7): every secret Hefring stores is sealed with the
//! installation's key, a data directory from before is sealed on start, the key rotates, the
//! data directory and database files are private, and each project fetches with its own
//! deploy key.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::json;

use crate::environments::{
    add_project, app_manifest, app_repo, build, ensure_mariadb, local_target, target_root,
};
use crate::harness::{Repo, Server, BIN};

fn random_word(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .elapsed()
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    format!("{prefix}{:016x}", h.finish())
}

fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            out.extend(files_below(&path));
        } else if kind.is_file() {
            out.push(path);
        }
    }
    out
}

/// Every file below `dir` (database, -wal, -shm, logs, keys, mirrors, artifacts, ...) that
/// holds `needle` as bytes.
fn files_holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    files_below(dir)
        .into_iter()
        .filter(|f| {
            let bytes = std::fs::read(f).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
        .collect()
}

fn assert_nowhere(dir: &Path, secrets: &[&str]) {
    for secret in secrets {
        let found = files_holding(dir, secret);
        assert!(
            found.is_empty(),
            "{secret} is stored in plaintext in {found:?}"
        );
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The environment's generated database password, as its pool file on the target says.
fn db_password(root: &Path) -> String {
    for file in files_below(root) {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("env[DB_PASSWORD]") {
                let value = rest.trim_start_matches([' ', '=']).trim().trim_matches('"');
                if !value.is_empty() {
                    return value.to_string();
                }
            }
        }
    }
    panic!("no DB_PASSWORD in a pool file below {}", root.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_at_rest_through_an_upgrade_and_a_key_rotation() {
    ensure_mariadb();
    let mut server = Server::start().await;
    let dir = server.data_dir().to_path_buf();
    let root = target_root();
    let (target, _, _) = local_target(&server, "web", root.path()).await;

    // A target with database admin passwords.
    let (maria_pw, pg_pw) = (random_word("mariapw"), random_word("pgpw"));
    let vault = server
        .create(
            "/targets",
            json!({"name": "vault", "host": "local", "root": "/srv/vault",
                   "mariadb": {"password": maria_pw}, "postgresql": {"password": pg_pw}}),
        )
        .await;
    let vault_id = vault["id"].as_str().unwrap().to_string();
    assert!(!vault.to_string().contains(&maria_pw), "{vault}");

    // An environment whose deploy generates a database password, with a login command.
    let login_token = random_word("logintoken");
    let repo = app_repo("mariadb");
    repo.commit(&[
        (
            ".hefring.yml",
            &format!("{}login: [php, makelogin.php]\n", app_manifest("mariadb")),
        ),
        (
            "makelogin.php",
            &format!("<?php echo \"/login.php?token={login_token}\\n\";\n"),
        ),
    ]);
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "sealed.test"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(
            &format!("/environments/{env_id}/deploy"),
            Some(json!({"release": release})),
        )
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let db_pw = db_password(root.path());
    let (status, link) = server
        .call(
            reqwest::Method::POST,
            &format!("/environments/{env_id}/login-link"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{link}");
    assert!(link["url"].as_str().unwrap().contains(&login_token));

    // Nothing the API answers holds them.
    let mut answers = String::new();
    for path in [
        format!("/targets/{vault_id}"),
        "/targets".into(),
        format!("/environments/{env_id}"),
        format!("/projects/{project}"),
        "/operations?limit=100".into(),
    ] {
        answers.push_str(&server.get(&path).await.1.to_string());
    }
    for secret in [&maria_pw, &pg_pw, &db_pw, &login_token] {
        assert!(
            !answers.contains(secret.as_str()),
            "{secret} answered: {answers}"
        );
    }

    server.kill9();
    let everything = [
        maria_pw.as_str(),
        pg_pw.as_str(),
        db_pw.as_str(),
        login_token.as_str(),
    ];
    assert_nowhere(&dir, &everything);
    // The only private key in the data directory is the installation's own file.
    let keys = files_holding(&dir, "PRIVATE KEY");
    assert!(
        keys.iter()
            .all(|k| k.ends_with("ssh/id_ed25519") || k.ends_with("ca/ca.key")),
        "{keys:?}"
    );
    // Item 4: the data directory, the database files and the key are private.
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("secret.key")), 0o600);
    for name in ["hefring.db", "hefring.db-wal", "hefring.db-shm"] {
        let file = dir.join(name);
        if file.exists() {
            assert_eq!(mode(&file), 0o600, "{name}");
        }
    }

    // An upgrade: rows as the previous version wrote them (plaintext), a data directory and
    // database that were world-readable. The next start seals and scrubs them.
    let (old_maria, old_db, old_link) = (
        random_word("oldmaria"),
        random_word("olddbpw"),
        random_word("oldlink"),
    );
    {
        let db = rusqlite::Connection::open(dir.join("hefring.db")).unwrap();
        db.execute(
            "UPDATE targets SET settings = json_set(settings, '$.mariadb.password', ?) WHERE id = ?",
            [&old_maria, &vault_id],
        )
        .unwrap();
        db.execute(
            "UPDATE environments SET secrets = json_object('db_password', ?) WHERE id = ?",
            [&old_db, &env_id],
        )
        .unwrap();
        db.execute(
            "UPDATE operations SET state = json_set(state, '$.login_url', ?) WHERE kind = 'environment_login'",
            [format!("http://sealed.test/login.php?token={old_link}")],
        )
        .unwrap();
        db.execute("DELETE FROM settings WHERE key = 'secrets_sealed_with'", [])
            .unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        dir.join("hefring.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    assert!(
        !files_holding(&dir, &old_maria).is_empty(),
        "the test wrote plaintext"
    );
    server.restart(&[]);
    let (_, shown) = server.get(&format!("/environments/{env_id}")).await;
    assert_eq!(shown["status"], "active", "{shown}");
    server.kill9();
    assert_nowhere(&dir, &[&old_maria, &old_db, &old_link]);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("hefring.db")), 0o600);
    // The upgraded rows read back as they were written.
    let read = |key_file: PathBuf| {
        let (dir, vault_id, env_id) = (dir.clone(), vault_id.clone(), env_id.clone());
        async move {
            let sealer = hefring_store::KeyFiles::new(key_file).load()?.unwrap();
            let url = format!("sqlite://{}", dir.join("hefring.db").display());
            let store = hefring_store::connect(&url, Arc::new(sealer)).await?;
            let t = hefring_store::Store::get_target(store.as_ref(), &vault_id)
                .await?
                .unwrap();
            let e = hefring_store::Store::get_environment(store.as_ref(), &env_id)
                .await?
                .unwrap();
            Ok::<_, Box<dyn std::error::Error>>((t, e))
        }
    };
    let (t, e) = read(dir.join("secret.key")).await.unwrap();
    assert_eq!(t.settings.mariadb.password.unwrap().expose(), &old_maria);
    assert_eq!(e.secrets.expose()["db_password"], old_db.as_str());

    // A rotation: a new key seals everything; the old one opens nothing after it.
    let old_key = dir.join("old.key.copy");
    std::fs::copy(dir.join("secret.key"), &old_key).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["admin", "rotate-secret-key", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(
        std::fs::read(dir.join("secret.key")).unwrap(),
        std::fs::read(&old_key).unwrap()
    );
    assert!(!dir.join("secret.key.old").exists());
    assert_eq!(mode(&dir.join("secret.key")), 0o600);
    let (t, e) = read(dir.join("secret.key")).await.unwrap();
    assert_eq!(t.settings.postgresql.password.unwrap().expose(), &pg_pw);
    assert_eq!(e.secrets.expose()["db_password"], old_db.as_str());
    let refused = read(old_key.clone())
        .await
        .expect_err("the old key is refused");
    assert!(refused.to_string().contains("secret key"), "{refused}");
    std::fs::remove_file(&old_key).unwrap();

    // The server reads them with the new key: a login link, made and answered again.
    server.restart(&[]);
    let (status, link) = server
        .call(
            reqwest::Method::POST,
            &format!("/environments/{env_id}/login-link"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{link}");
    let log = server.log();
    server.kill9();
    for secret in everything
        .iter()
        .chain([&old_maria.as_str(), &old_db.as_str()])
    {
        assert!(!log.contains(secret), "{secret} logged");
    }
    assert_nowhere(&dir, &everything);
}

/// A bare repository served over ssh:// by a private sshd that trusts one key.
fn ssh_repo(dir: &Path, repo: &Repo, authorized_key: &str) -> (crate::ssh::Sshd, String) {
    let bare = dir.join("repo.git");
    let status = std::process::Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(repo.dir.path())
        .arg(&bare)
        .status()
        .unwrap();
    assert!(status.success());
    let sshd = crate::ssh::start_sshd(dir, authorized_key, "host_git");
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into());
    let url = format!("ssh://{user}@127.0.0.1:{}{}", sshd.port, bare.display());
    (sshd, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_project_fetches_with_its_own_deploy_key() {
    let server = Server::start().await;
    let repo = Repo::new("database: none\n");
    let dir = tempfile::tempdir().unwrap();
    // sshd reads authorized_keys on each connection: it trusts project a's key once a exists.
    let (_sshd, url) = ssh_repo(dir.path(), &repo, "");
    let a = server
        .create("/projects", json!({"name": "a", "git_url": url}))
        .await;
    let a_id = a["id"].as_str().unwrap().to_string();
    let public = a["deploy_key"].as_str().unwrap().to_string();
    assert!(public.starts_with("ssh-ed25519 "), "{a}");
    std::fs::write(dir.path().join("authorized_keys"), format!("{public}\n")).unwrap();
    let (_, shown) = server.get(&format!("/projects/{a_id}/deploy-key")).await;
    assert_eq!(shown["public_key"], public.as_str());
    let cli = server
        .command()
        .args(["project", "deploy-key", "a"])
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&cli.stdout).trim(), public);
    let b = server
        .create("/projects", json!({"name": "b", "git_url": url}))
        .await;
    let b_id = b["id"].as_str().unwrap().to_string();
    assert_ne!(b["deploy_key"], a["deploy_key"]);

    let verify = |id: String| {
        let server = &server;
        async move {
            let op = server
                .start_op(&format!("/projects/{id}/verify"), None)
                .await;
            let id = op["id"].as_str().unwrap().to_string();
            (server.wait_op(&id).await, server.log_text(&id).await)
        }
    };
    let (op, log) = verify(a_id.clone()).await;
    assert_eq!(op["status"], "succeeded", "{op}\n{log}");
    build(&server, &a_id).await;
    // Another project's key (and the installation's, which sshd does not list) fetch nothing.
    let (op, log) = verify(b_id).await;
    assert_eq!(op["status"], "failed", "{op}\n{log}");
    // The key file written for a fetch is gone after it.
    let left: Vec<_> = files_below(&server.data_dir().join("ssh"))
        .into_iter()
        .filter(|f| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("deploy-")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
