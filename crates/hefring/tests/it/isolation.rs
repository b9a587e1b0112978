//! Isolation on a server target, attacked for real: two environments of different projects
//! on one target (Hefring as root), one of them hostile. Canary files carry random content;
//! the tests prove it appears in nothing the attacker can see, and that root-owned canaries
//! keep their content, owner and mode.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::environments::{
    add_project, app_repo, build, local_target, page, site_client, target_root, TargetRoot,
};
use crate::harness::{Repo, Server};

fn random_text(label: &str) -> String {
    format!("{label}-{}", crate::scram::random_hex(16))
}

/// A root-owned 0600 file with random content outside everything Hefring manages.
struct RootCanary {
    _dir: tempfile::TempDir,
    path: PathBuf,
    content: String,
}

impl RootCanary {
    fn new() -> RootCanary {
        let dir = tempfile::Builder::new()
            .prefix("hf-canary-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("secret");
        let content = random_text("root-canary");
        std::fs::write(&path, &content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        RootCanary {
            _dir: dir,
            path,
            content,
        }
    }

    /// Still root's, 0600, with its content, and not a link.
    fn assert_untouched(&self) {
        let meta = std::fs::symlink_metadata(&self.path).unwrap();
        assert!(meta.file_type().is_file(), "the canary was replaced");
        assert_eq!(meta.uid(), 0, "the canary changed owner");
        assert_eq!(meta.mode() & 0o7777, 0o600, "the canary changed mode");
        assert_eq!(std::fs::read_to_string(&self.path).unwrap(), self.content);
    }
}

async fn environment(server: &Server, name: &str, project: &str, target: &str) -> String {
    let env = server
        .create(
            "/environments",
            json!({"name": name, "project": project, "target": target, "domain": format!("{name}.iso.test")}),
        )
        .await;
    env["id"].as_str().unwrap().to_string()
}

async fn deploy(server: &Server, env: &str, release: &str) -> Value {
    crate::environments::deploy(server, env, release, "deploy").await
}

fn owner_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().uid()
}

fn user_of(env: &str) -> String {
    hefring_core::isolation::environment_user(env)
}

fn uid_of(user: &str) -> u32 {
    let out = Command::new("id").args(["-u", user]).output().unwrap();
    assert!(out.status.success(), "no user {user}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// What the hostile site's PHP tries: read its neighbour's files, database, pool file and
/// the root canary (through PHP and through a shell, which open_basedir does not cover), every
/// process's environment, connect to the neighbour's pool socket; then write a PHP file and a
/// link to /etc/passwd into its own files.
const ATTACK_PHP: &str = r#"<?php
$v = $_GET['victim']; $root = $_GET['root']; $canary = $_GET['canary'];
$out = ['user=' . trim(shell_exec('id -un'))];
$paths = ["$root/environments/$v/files/uploads/secret.txt", "$root/php-fpm/pools/$v.conf",
          $canary, "$root/environments/$v/database/site.sqlite"];
foreach ($paths as $p) {
    $out[] = "read $p: " . var_export(@file_get_contents($p), true);
    $out[] = "cat $p: " . shell_exec('cat ' . escapeshellarg($p) . ' 2>&1');
}
$out[] = 'environ: ' . shell_exec('cat /proc/[0-9]*/environ 2>/dev/null | tr "\0" "\n"');
$s = @stream_socket_client("unix://$root/php-fpm/sock/$v.sock", $e, $es, 1);
$out[] = 'socket=' . ($s ? 'connected' : 'refused');
$api = @stream_socket_client('tcp://127.0.0.1:' . $_GET['api'], $e, $es, 2);
$out[] = 'api=' . ($api ? 'connected' : 'refused');
$meta = @stream_socket_client('tcp://169.254.169.254:80', $e, $es, 2);
$out[] = 'metadata=' . ($meta ? 'connected' : 'refused');
$out[] = 'state: ' . shell_exec('cat ' . escapeshellarg($_GET['db']) . ' 2>&1 | head -c 200');
file_put_contents(getenv('FILES_DIR') . '/uploads/x.php', '<?php echo "EXECUTED-" . (6 * 7);');
@symlink('/etc/passwd', getenv('FILES_DIR') . '/uploads/pw.txt');
echo implode("\n", $out), "\n";
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_site_reads_nothing_of_its_neighbour_and_root_keeps_its_files() {
    let server = Server::start().await;
    let root: TargetRoot = target_root();
    let (target, http, _) = local_target(&server, "shared", root.path()).await;
    let canary = RootCanary::new();

    // The victim: the fixture app on SQLite, with a secret in its persistent files.
    let victim_repo = app_repo("sqlite");
    let victim_project = add_project(&server, "victim", &victim_repo).await;
    let victim_release = build(&server, &victim_project).await;
    let victim = environment(&server, "victim", &victim_project, &target).await;
    let op = deploy(&server, &victim, &victim_release).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let env_dir = root.path().join("environments").join(&victim);
    let secret = random_text("victim-secret");
    let secret_file = env_dir.join("files/uploads/secret.txt");
    std::fs::write(&secret_file, &secret).unwrap();
    let victim_uid = uid_of(&user_of(&victim));
    std::os::unix::fs::lchown(&secret_file, Some(victim_uid), Some(victim_uid)).unwrap();
    let db_secret = random_text("victim-row");
    let sqlite = env_dir.join("database/site.sqlite");
    let sql = Command::new("sqlite3")
        .arg(&sqlite)
        .arg(format!(
            "CREATE TABLE notes (t TEXT); INSERT INTO notes VALUES ('{db_secret}');"
        ))
        .status()
        .unwrap();
    assert!(sql.success());

    // Each environment is its own user, above the range people get; its tree is root's.
    assert!(hefring_core::isolation::is_environment_uid(victim_uid));
    assert_eq!(owner_of(&env_dir), 0);
    assert_eq!(owner_of(&env_dir.join("releases")), 0);
    assert_eq!(owner_of(&env_dir.join("files")), victim_uid);
    assert_eq!(
        std::fs::metadata(&env_dir).unwrap().mode() & 0o007,
        0,
        "others may not enter an environment's directory"
    );

    // The attacker: a build command that sets a setuid bit, PHP that attacks at request time.
    let attacker_repo = Repo::new(
        "database: sqlite\nwritable: [uploads]\nbuild:\n  - cp /bin/sh rootsh && chmod 4755 rootsh\nhealth: /health.php\n",
    );
    attacker_repo.commit(&[
        ("health.php", "<?php echo 'ok';\n"),
        ("attack.php", ATTACK_PHP),
        ("uploads/.keep", ""),
    ]);
    let attacker_project = add_project(&server, "attacker", &attacker_repo).await;
    let attacker_release = build(&server, &attacker_project).await;
    let attacker = environment(&server, "attacker", &attacker_project, &target).await;
    let op = deploy(&server, &attacker, &attacker_release).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    assert_ne!(uid_of(&user_of(&attacker)), victim_uid);
    let rootsh = root
        .path()
        .join("environments")
        .join(&attacker)
        .join("releases")
        .join(&attacker_release)
        .join("rootsh");
    let mode = std::fs::metadata(&rootsh).unwrap().mode();
    assert_eq!(mode & 0o7000, 0, "the setuid bit survived: {mode:o}");
    assert_eq!(owner_of(&rootsh), 0);

    // The victim's PHP is running (its environment holds its variables) while the attack runs.
    let client = site_client(&["victim.iso.test", "attacker.iso.test"], http, None);
    let (status, _) = page(&client, &format!("http://victim.iso.test:{http}/")).await;
    assert!(status.is_success());
    let api_port = server.url.rsplit(':').next().unwrap().trim_end_matches('/');
    let url = format!(
        "http://attacker.iso.test:{http}/attack.php?victim={victim}&root={}&canary={}&api={api_port}&db={}",
        root.path().display(),
        canary.path.display(),
        server.data_dir().join("hefring.db").display()
    );
    let (status, report) = page(&client, &url).await;
    assert!(status.is_success(), "{status} {report}");
    assert!(
        report.starts_with(&format!("user={}", user_of(&attacker))),
        "{report}"
    );
    for leaked in [&secret, &db_secret, &canary.content] {
        assert!(
            !report.contains(leaked.as_str()),
            "leaked {leaked}: {report}"
        );
    }
    assert!(report.contains("socket=refused"), "{report}");
    // Nor Hefring's API, its state or a metadata service (nftables on the site's uid, the
    // data directory 0700).
    assert!(report.contains("api=refused"), "{report}");
    assert!(report.contains("metadata=refused"), "{report}");
    assert!(!report.contains("SQLite format"), "{report}");

    // What the site wrote is never run as PHP, and a link it made to a file it does not own is
    // never served.
    let (status, body) = page(
        &client,
        &format!("http://attacker.iso.test:{http}/uploads/x.php"),
    )
    .await;
    assert!(!body.contains("EXECUTED-42"), "{status} {body}");
    let (status, body) = page(
        &client,
        &format!("http://attacker.iso.test:{http}/uploads/pw.txt"),
    )
    .await;
    assert!(!body.contains("root:x:0:0"), "{status} {body}");

    // A backup after the site planted links in its database and files directories: made by
    // the site's own user, it holds nothing the site could not read already.
    let attacker_dir = root.path().join("environments").join(&attacker);
    let planted_db = attacker_dir.join("database/site.sqlite");
    let _ = std::fs::remove_file(&planted_db);
    std::os::unix::fs::symlink(&sqlite, &planted_db).unwrap();
    let planted_file = attacker_dir.join("files/uploads/stolen");
    std::os::unix::fs::symlink(&canary.path, &planted_file).unwrap();
    let attacker_uid = uid_of(&user_of(&attacker));
    for link in [&planted_db, &planted_file] {
        std::os::unix::fs::lchown(link, Some(attacker_uid), Some(attacker_uid)).unwrap();
    }
    let op = server
        .start_op(&format!("/environments/{attacker}/backup"), None)
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    for leaked in [&secret, &db_secret, &canary.content] {
        assert!(
            !log.contains(leaked.as_str()),
            "leaked {leaked} into the log: {log}"
        );
    }
    if op["status"] == "succeeded" {
        let backup = op["result"]["backup"].as_str().unwrap();
        let response = server
            .raw(
                server
                    .http()
                    .get(format!("{}/api/v1/backups/{backup}/download", server.url))
                    .bearer_auth(&server.token),
            )
            .await;
        assert!(response.status().is_success());
        let archive = response.bytes().await.unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &archive).unwrap();
        let raw = Command::new("zstd")
            .arg("-dcq")
            .arg(file.path())
            .output()
            .unwrap();
        assert!(raw.status.success());
        let text = String::from_utf8_lossy(&raw.stdout);
        for leaked in [&secret, &db_secret, &canary.content] {
            assert!(
                !text.contains(leaked.as_str()),
                "leaked {leaked} into the backup"
            );
        }
    }
    canary.assert_untouched();
    // The victim still serves, untouched.
    let (status, body) = page(&client, &format!("http://victim.iso.test:{http}/")).await;
    assert!(
        status.is_success() && body.contains("release=1"),
        "{status} {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_releases_are_refused_before_anything_is_unpacked() {
    let server = Server::start().await;
    let root = target_root();
    let (target, _, _) = local_target(&server, "shared", root.path()).await;
    let canary = RootCanary::new();
    let canary_dir = canary.path.parent().unwrap().to_path_buf();

    // `leak -> DIR` committed, `leak/secret` named writable: root would have copied the
    // root-only file into the site's files, given it to the site and replaced the original
    // with a link the site owns.
    let leak = Repo::new("database: none\nwritable: [leak/secret]\n");
    std::os::unix::fs::symlink(&canary_dir, Path::new(&leak.url()).join("leak")).unwrap();
    leak.git(&["add", "-A"]);
    leak.git(&["commit", "-q", "-m", "leak"]);
    // A docroot link to a system file, served as a page.
    let passwd = Repo::new("database: none\n");
    std::os::unix::fs::symlink("/etc/passwd", Path::new(&passwd.url()).join("passwd.txt")).unwrap();
    passwd.git(&["add", "-A"]);
    passwd.git(&["commit", "-q", "-m", "passwd"]);

    for (name, repo, expected) in [
        ("leak", &leak, "leak: is a link on the way"),
        ("passwd", &passwd, "passwd.txt: points outside the tree"),
    ] {
        let project = add_project(&server, name, repo).await;
        let release = build(&server, &project).await;
        let env = environment(&server, name, &project, &target).await;
        let op = deploy(&server, &env, &release).await;
        assert_eq!(op["status"], "failed", "{op}");
        assert!(
            op["error"].as_str().unwrap_or_default().contains(expected),
            "{}",
            op["error"]
        );
        let releases = root
            .path()
            .join("environments")
            .join(&env)
            .join("releases")
            .join(&release);
        assert!(!releases.exists(), "the refused release was unpacked");
    }
    canary.assert_untouched();

    // `..` in the manifest's paths is refused when the release is built.
    let dots = Repo::new("database: none\nwritable: [../../etc]\n");
    let project = add_project(&server, "dots", &dots).await;
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "failed", "{op}");
}

/// An environment deployed before isolation (test builds can still deploy that way) moves to
/// its own user through one `environment_isolate` operation queued when Hefring starts again,
/// and keeps serving its data.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_deployed_before_isolation_moves_to_its_own_user_at_upgrade() {
    let mut server = Server::start_with(&[], &[("HEFRING_FAULT_SHARED_WEB_USER", "1")]).await;
    let root = target_root();
    let (target, http, _) = local_target(&server, "old", root.path()).await;
    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let release = build(&server, &project).await;
    let env = environment(&server, "legacy", &project, &target).await;
    let op = deploy(&server, &env, &release).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let files = root.path().join("environments").join(&env).join("files");
    let www = uid_of("www-data");
    assert_eq!(owner_of(&files), www, "deployed as before isolation");
    let client = site_client(&["legacy.iso.test"], http, None);
    let url = format!("http://legacy.iso.test:{http}/");
    let (_, before) = page(&client, &url).await;
    assert!(before.contains("upload=from-install"), "{before}");

    server.restart(&[]);
    let isolate = loop {
        let (_, ops) = server
            .get(&format!("/operations?subject={env}&limit=50"))
            .await;
        if let Some(op) = ops["items"]
            .as_array()
            .and_then(|items| items.iter().find(|o| o["kind"] == "environment_isolate"))
        {
            break op["id"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let op = server.wait_op(&isolate).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let uid = uid_of(&user_of(&env));
    assert!(hefring_core::isolation::is_environment_uid(uid));
    assert_eq!(owner_of(&files), uid);
    assert_eq!(owner_of(&files.join("uploads/kept.txt")), uid);
    let (status, after) = page(&client, &url).await;
    assert!(status.is_success(), "{status} {after}");
    assert!(after.contains("upload=from-install"), "{after}");
    // One operation per environment: a second start queues no other.
    server.restart(&[]);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (_, ops) = server
        .get(&format!("/operations?subject={env}&limit=50"))
        .await;
    let count = ops["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "environment_isolate")
        .count();
    assert_eq!(count, 1);
}

/// A target requires isolation unless told otherwise; the setting is shown and checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_requires_isolation_by_default_and_says_whether_it_is_possible() {
    let server = Server::start().await;
    let root = target_root();
    let (target, _, _) = local_target(&server, "plain", root.path()).await;
    let (_, shown) = server.get(&format!("/targets/{target}")).await;
    assert_eq!(shown["isolation"], "required", "{shown}");
    // Hefring is root here: its verify found isolation possible.
    assert_eq!(shown["inspection"]["isolation"], "possible", "{shown}");
    let optional = server
        .create(
            "/targets",
            json!({"name": "trial", "host": "local", "root": "/tmp/hefring-trial", "isolation": "optional"}),
        )
        .await;
    assert_eq!(optional["isolation"], "optional", "{optional}");
    let (status, refused) = server
        .post(
            "/targets",
            json!({"name": "odd", "host": "local", "root": "/tmp/hefring-odd", "isolation": "sometimes"}),
        )
        .await;
    assert_eq!(status.as_u16(), 422, "{refused}");
    assert_eq!(refused["error"]["field"], "isolation", "{refused}");
}
