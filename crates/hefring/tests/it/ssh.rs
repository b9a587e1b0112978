//! SSH targets against a private sshd on loopback, with the installation's key.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command};

use serde_json::json;

use crate::harness::Server;

pub struct Sshd {
    child: Child,
    pub port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sshd_binary() -> Option<&'static str> {
    ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private sshd accepting `authorized_key`, with a host key of its own in `dir`.
pub fn start_sshd(dir: &Path, authorized_key: &str, host_key_name: &str) -> Sshd {
    let sshd = sshd_binary().expect("sshd is installed by scripts/test (openssh-server)");
    std::fs::create_dir_all("/run/sshd").unwrap();
    let host_key = dir.join(host_key_name);
    if !host_key.exists() {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let authorized = dir.join("authorized_keys");
    std::fs::write(&authorized, format!("{authorized_key}\n")).unwrap();
    let port = free_port();
    let child = Command::new(sshd)
        .arg("-D")
        .arg("-e")
        .args(["-p", &port.to_string()])
        .arg("-h")
        .arg(&host_key)
        .args([
            "-o",
            "ListenAddress=127.0.0.1",
            "-o",
            "StrictModes=no",
            "-o",
            "PasswordAuthentication=no",
        ])
        .args(["-o", "PermitRootLogin=prohibit-password", "-o", "UsePAM=no"])
        .arg("-o")
        .arg(format!("AuthorizedKeysFile={}", authorized.display()))
        .arg("-o")
        .arg(format!(
            "PidFile={}",
            dir.join(format!("{host_key_name}.pid")).display()
        ))
        .stderr(std::fs::File::create(dir.join(format!("{host_key_name}.log"))).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "sshd did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Sshd { child, port }
}

#[tokio::test]
async fn an_ssh_target_is_verified_with_the_installation_key_and_its_host_key_is_pinned() {
    let server = Server::start().await;
    let (_, key) = server.get("/ssh-key").await;
    let public_key = key["public_key"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into());
    let sshd = start_sshd(dir.path(), public_key, "host_a");

    let target = server
        .create("/targets", json!({"name": "ssh-1", "host": format!("ssh://{user}@127.0.0.1:{}", sshd.port), "root": dir.path().join("root")}))
        .await;
    let id = target["id"].as_str().unwrap();
    let op = server
        .start_op(&format!("/targets/{id}/verify"), None)
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(
        done["tasks"][0]["status"],
        "succeeded",
        "connect: {done}\n{}",
        server.log_text(op["id"].as_str().unwrap()).await
    );
    assert_eq!(done["tasks"][1]["status"], done["status"], "{done}");
    let (_, shown) = server.get(&format!("/targets/{id}")).await;
    let pinned = shown["host_key"]
        .as_str()
        .expect("the host key is pinned")
        .to_string();
    let expected = std::fs::read_to_string(dir.path().join("host_a.pub")).unwrap();
    assert!(
        expected.starts_with(&pinned),
        "pinned {pinned}, sshd has {expected}"
    );
    assert!(shown["inspection"]["kernel"]
        .as_str()
        .unwrap()
        .starts_with("Linux"));
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert!(log.contains(&format!("connected as {user}")), "{log}");

    // The same address now presents another host key: refused, nothing else runs.
    drop(sshd);
    let impostor = start_sshd(dir.path(), public_key, "host_b");
    let moved = server
        .create("/targets", json!({"name": "ssh-2", "host": format!("ssh://{user}@127.0.0.1:{}", impostor.port), "host_key": pinned}))
        .await;
    let op = server
        .start_op(
            &format!("/targets/{}/verify", moved["id"].as_str().unwrap()),
            None,
        )
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(statuses(&done), ["failed", "pending"]);
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert!(
        log.to_lowercase().contains("host key"),
        "ssh says why: {log}"
    );
}

use crate::harness::statuses;

/// The same environment operations against an SSH target on loopback, with its own root and
/// ports: files travel over SSH, commands run there, the site answers on its ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_is_deployed_updated_and_deleted_on_an_ssh_target() {
    use crate::environments::{add_project, app_repo, build, page, site_client, target_root};
    let server = Server::start().await;
    let (_, key) = server.get("/ssh-key").await;
    let dir = tempfile::tempdir().unwrap();
    let sshd = start_sshd(dir.path(), key["public_key"].as_str().unwrap(), "host_env");
    let root = target_root();
    let (http, https) = (free_port(), free_port());
    let target = server
        .create(
            "/targets",
            json!({"name": "remote", "host": format!("ssh://root@127.0.0.1:{}", sshd.port),
                   "root": root.path(), "http_port": http, "https_port": https}),
        )
        .await;
    let target = target["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(&format!("/targets/{target}/verify"), None)
        .await;
    let op = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");

    let repo = app_repo("sqlite");
    let project = add_project(&server, "app", &repo).await;
    let first = build(&server, &project).await;
    repo.commit(&[("VERSION", "2\n")]);
    let second = build(&server, &project).await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project, "target": target, "domain": "ssh.test", "https": "on"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_string();
    for (action, release) in [("deploy", &first), ("update", &second)] {
        let op = server
            .start_op(
                &format!("/environments/{env_id}/{action}"),
                Some(json!({"release": release})),
            )
            .await;
        let done = server.wait_op(op["id"].as_str().unwrap()).await;
        assert_eq!(
            done["status"],
            "succeeded",
            "{action}: {done}\n{}",
            server.log_text(op["id"].as_str().unwrap()).await
        );
    }
    // The target got the installation's rules keeping its sites from metadata addresses (the
    // sshd here is this machine, so the table is the one `serve` installed, with a `target`
    // chain of its own).
    let tables = crate::harness::nft_tables(&server.log());
    let listed = std::process::Command::new("nft")
        .args(["list", "chain", "inet", &tables[0], "target_confined"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("169.254.0.0/16"), "{listed}");
    let client = site_client(&["ssh.test"], http, None);
    let (_, body) = page(&client, &format!("http://ssh.test:{http}/")).await;
    assert!(
        body.contains("release=2") && body.contains("upload=from-install"),
        "{body}"
    );
    // The artifact was copied over SSH into the target's root.
    let artifacts = std::fs::read_dir(root.path().join("artifacts"))
        .unwrap()
        .count();
    assert_eq!(artifacts, 2, "one artifact per release");

    let op = server
        .call(
            reqwest::Method::DELETE,
            &format!("/environments/{env_id}"),
            None,
        )
        .await
        .1;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(!root.path().join(format!("environments/{env_id}")).exists());
    assert!(!root
        .path()
        .join(format!("nginx/sites/{env_id}.conf"))
        .exists());
}
