//! A real `hefring serve` on 127.0.0.1:0 with its own data directory, driven over HTTP.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_hefring");

pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub token: String,
    pub dir: tempfile::TempDir,
    /// The installation's directories outside its data directory (build trees, the `local`
    /// target), as `/var/lib/hefring/...` would be: searchable by others, not listable.
    pub outside: tempfile::TempDir,
    args: Vec<String>,
    http: reqwest::Client,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(&[], &[]).await
    }

    /// Starts a server with extra `serve` flags and environment.
    pub async fn start_with(args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("hefring-it-")
            .tempdir()
            .unwrap();
        let token = create_token(dir.path(), &[]);
        let outside = tempfile::Builder::new()
            .prefix("hefring-out-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let mut server = Server {
            child: None,
            url: String::new(),
            token,
            dir,
            outside,
            args: args.iter().map(|s| s.to_string()).collect(),
            http: reqwest::Client::new(),
        };
        server.spawn(env);
        server
    }

    /// The same server, called with another token.
    pub fn with_token(mut self, token: String) -> Server {
        self.token = token;
        self
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self, env: &[(&str, &str)]) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(self.dir.path())
            .args(&self.args)
            .env_remove("HEFRING_FAULT_CRASH_AT")
            .env("HEFRING_BUILD_ROOT", self.outside.path().join("builds"))
            .env("HEFRING_TARGETS_ROOT", self.outside.path().join("targets"))
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}; log: {}", self.log()))
            .to_string();
        self.url = url;
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// `kill -9`, as a power cut would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Waits for the process to exit on its own (after an injected crash).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn restart(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        self.spawn(env);
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(BIN);
        command
            .env("HEFRING_URL", &self.url)
            .env("HEFRING_TOKEN", &self.token);
        command
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}/api/v1{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// POST with no body and no Content-Type, as action routes allow.
    pub async fn action(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, None).await
    }

    pub async fn raw(&self, request: reqwest::RequestBuilder) -> reqwest::Response {
        request.send().await.unwrap()
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub async fn create(&self, path: &str, body: Value) -> Value {
        let (status, value) = self.post(path, body).await;
        assert_eq!(status, StatusCode::CREATED, "{value}");
        value
    }

    /// Starts work and answers the operation (asserting 202).
    pub async fn start_op(&self, path: &str, body: Option<Value>) -> Value {
        let (status, op) = self.call(reqwest::Method::POST, path, body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{op}");
        op
    }

    pub async fn op(&self, id: &str) -> Value {
        let (status, op) = self.get(&format!("/operations/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{op}");
        op
    }

    /// Polls until the operation ends.
    pub async fn wait_op(&self, id: &str) -> Value {
        self.wait_for(id, |op| {
            ["succeeded", "failed", "cancelled"].contains(&op["status"].as_str().unwrap())
        })
        .await
    }

    pub async fn wait_for(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let op = self.op(id).await;
            if done(&op) {
                return op;
            }
            assert!(
                Instant::now() < deadline,
                "operation {id} stuck: {op}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn log_text(&self, id: &str) -> String {
        let response = self
            .http
            .get(format!("{}/api/v1/operations/{id}/log", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        // The server's network rules outlive it (they are the machine's): remove its table.
        for table in nft_tables(&self.log()) {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", &table])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The nftables tables a server's log says it installed rules in.
pub fn nft_tables(log: &str) -> Vec<String> {
    let mut tables: Vec<String> = log
        .split("nftables table inet ")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            name.starts_with("hefring_").then_some(name)
        })
        .collect();
    tables.sort();
    tables.dedup();
    tables
}

/// `hefring admin create-token` for the state in `data_dir` (or the `--database-url` in
/// `extra`): the token it prints on its last line.
pub fn create_token(data_dir: &Path, extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["admin", "create-token", "--name", "tests"])
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "create-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string()
}

/// The attempts of each task, by name.
pub fn attempts(op: &Value) -> Vec<(String, u64)> {
    op["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["attempts"].as_u64().unwrap(),
            )
        })
        .collect()
}

pub fn statuses(op: &Value) -> Vec<String> {
    op["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap().to_string())
        .collect()
}

/// A git repository with `.hefring.yml` and the given files, committed on `main`.
pub struct Repo {
    pub dir: tempfile::TempDir,
}

impl Repo {
    pub fn new(manifest: &str) -> Repo {
        let dir = tempfile::Builder::new()
            .prefix("hefring-repo-")
            .tempdir()
            .unwrap();
        let repo = Repo { dir };
        repo.git(&["init", "-q", "-b", "main"]);
        repo.commit(&[
            (".hefring.yml", manifest),
            ("index.php", "<?php echo 'hello';\n"),
        ]);
        repo
    }

    pub fn url(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }

    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "user.email=t@example.com", "-c", "user.name=t", "-C"])
            .arg(self.dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Writes files and commits them; answers the commit.
    pub fn commit(&self, files: &[(&str, &str)]) -> String {
        for (name, content) in files {
            let path = self.dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", "change"]);
        self.git(&["rev-parse", "HEAD"])
    }
}
