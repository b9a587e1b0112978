//! SSH targets against a private sshd on loopback, with the installation's key.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command};

use serde_json::json;

use crate::harness::Server;

struct Sshd {
    child: Child,
    port: u16,
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
fn start_sshd(dir: &Path, authorized_key: &str, host_key_name: &str) -> Sshd {
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
