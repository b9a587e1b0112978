//! Distributed mode: `hefring serve` publishing to RabbitMQ (a vhost of the test's own) with
//! PostgreSQL state (a database of the test's own), `hefring worker` processes running the
//! operations, and Python Celery clients starting operations and reading their results.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{attempts, create_token, Repo, Server, BIN};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A vhost of its own on the machine's RabbitMQ (started if down), deleted on drop.
pub struct Vhost(String);

impl Vhost {
    pub fn new() -> Vhost {
        if std::net::TcpStream::connect("127.0.0.1:5672").is_err() {
            let _ = Command::new("rabbitmq-server").arg("-detached").status();
            run("rabbitmqctl", &["await_startup", "--timeout", "120"]);
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "hefring-it-{}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("rabbitmqctl", &["-q", "add_vhost", &name]);
        run(
            "rabbitmqctl",
            &[
                "-q",
                "set_permissions",
                "-p",
                &name,
                "guest",
                ".*",
                ".*",
                ".*",
            ],
        );
        Vhost(name)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.0)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.0])
            .output();
    }
}

/// A PostgreSQL database of its own on the machine's server, dropped on drop.
pub struct Database(pub String);

impl Database {
    pub fn create() -> Database {
        let name = format!(
            "hefring_dist_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
                % 1_000_000_007
        );
        run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                &format!("CREATE DATABASE {name}"),
            ],
        );
        Database(name)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:5432/{}", self.0)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c"])
            .arg(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0))
            .output();
    }
}

/// A `hefring worker` process, killed (-9) on drop.
pub struct Worker(Child);

impl Worker {
    pub fn start(
        data_dir: &std::path::Path,
        database: &str,
        broker: &str,
        extra: &[&str],
    ) -> Worker {
        let mut child = Command::new(BIN)
            .args([
                "worker",
                "--database-url",
                database,
                "--broker-url",
                broker,
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .env_remove("HEFRING_FAULT_CRASH_AT")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(
            line.contains("hefring worker"),
            "the worker did not start: {line:?}"
        );
        Worker(child)
    }

    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `hefring serve` on PostgreSQL state, publishing to the vhost, running nothing itself.
pub async fn distributed_server(database: &Database, vhost: &Vhost) -> Server {
    let url = database.url();
    let server = Server::start_with(
        &[
            "--database-url",
            &url,
            "--broker-url",
            &vhost.url(),
            "--workers",
            "0",
        ],
        &[],
    )
    .await;
    let token = create_token(server.data_dir(), &["--database-url", &url]);
    server.with_token(token)
}

fn python_celery() -> &'static str {
    let ok = Command::new("python3")
        .args(["-c", "import celery"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "Python celery is missing: scripts/test installs it (pip install celery)"
    );
    "python3"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_operations_from_rabbitmq_and_python_celery_clients_get_their_results() {
    let database = Database::create();
    let vhost = Vhost::new();
    let server = distributed_server(&database, &vhost).await;
    let _worker = Worker::start(
        server.data_dir(),
        &database.url(),
        &vhost.url(),
        &["--concurrency", "2"],
    );

    // Work started through the API runs on the worker.
    let repo = Repo::new("runtime: php\nbuild: [\"echo built-by-a-worker\"]\n");
    let project = server
        .create("/projects", json!({"name": "site", "git_url": repo.url()}))
        .await;
    let project = project["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(server
        .log_text(op["id"].as_str().unwrap())
        .await
        .contains("built-by-a-worker"));

    // A Python Celery client starts an operation by name and waits for its result; its task id
    // is the operation's id. A bad subject ends in an exception naming the error.
    let script = r#"
import json, sys
from celery import Celery
app = Celery(broker=sys.argv[1], backend="rpc://")
ok = app.send_task("hefring.project_verify", kwargs={"project": sys.argv[2]}, queue="hefring")
print(json.dumps({"id": ok.id, "result": ok.get(timeout=60)}))
bad = app.send_task("hefring.project_verify", kwargs={"project": "prj_00000000000000000000000000"}, queue="hefring")
try:
    bad.get(timeout=60)
    print(json.dumps({"id": bad.id, "error": None}))
except Exception as e:
    print(json.dumps({"id": bad.id, "state": bad.state, "error": type(e).__name__ + ": " + str(e)}))
unknown = app.send_task("hefring.no_such_thing", kwargs={}, queue="hefring")
try:
    unknown.get(timeout=60)
    print(json.dumps({"error": None}))
except Exception as e:
    print(json.dumps({"error": str(e)}))
"#;
    let out = Command::new(python_celery())
        .args(["-c", script, &vhost.url(), &project])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ok = &lines[0];
    assert_eq!(ok["result"]["status"], "succeeded", "{ok}");
    assert_eq!(ok["result"]["kind"], "project_verify");
    assert_eq!(
        ok["result"]["id"], ok["id"],
        "the Celery task id is the operation id"
    );
    let (status, shown) = server
        .get(&format!("/operations/{}", ok["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{shown}");
    assert_eq!(shown["requested_by"], "celery");
    let bad = &lines[1];
    assert_eq!(bad["state"], "FAILURE", "{bad}");
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("HefringOperationFailed"),
        "{bad}"
    );
    // Refused by the same rule as the API's 404, naming the field; nothing is stored.
    assert!(
        bad["error"]
            .as_str()
            .unwrap()
            .contains("project: no project has this id"),
        "{bad}"
    );
    let (status, _) = server
        .get(&format!("/operations/{}", bad["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    assert!(
        lines[2]["error"]
            .as_str()
            .unwrap()
            .contains("no operation named no_such_thing"),
        "{}",
        lines[2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_loses_nothing_and_another_resumes_without_repeating_tasks() {
    let database = Database::create();
    let vhost = Vhost::new();
    let server = distributed_server(&database, &vhost).await;
    let lease = ["--lease-seconds", "2", "--concurrency", "1"];
    let mut first = Worker::start(server.data_dir(), &database.url(), &vhost.url(), &lease);
    let repo = Repo::new("runtime: php\nbuild: [\"echo started; sleep 4; echo finished\"]\n");
    let project = server
        .create("/projects", json!({"name": "slow", "git_url": repo.url()}))
        .await;
    let project = project["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(
            &format!("/projects/{project}/releases"),
            Some(json!({"ref": "main"})),
        )
        .await;
    let id = op["id"].as_str().unwrap().to_string();
    server
        .wait_for(&id, |op| {
            op["tasks"][2]["status"] == "running" && op["tasks"][2]["name"] == "run_build_commands"
        })
        .await;
    first.kill9();
    let started = Instant::now();
    let _second = Worker::start(server.data_dir(), &database.url(), &vhost.url(), &lease);
    let done = server.wait_op(&id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(
        attempts(&done),
        [
            ("resolve_ref".to_string(), 1),
            ("check_out".to_string(), 1),
            ("run_build_commands".to_string(), 2),
            ("pack_artifact".to_string(), 1)
        ],
        "only the task cut short ran again"
    );
    let log = server.log_text(&id).await;
    assert!(log.contains("finished"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_with_its_own_queue_is_served_only_by_workers_of_that_queue() {
    let database = Database::create();
    let vhost = Vhost::new();
    let server = distributed_server(&database, &vhost).await;
    let _general = Worker::start(server.data_dir(), &database.url(), &vhost.url(), &[]);
    let target = server
        .create(
            "/targets",
            json!({"name": "far", "host": "local", "root": "/tmp/hefring-far", "own_queue": true}),
        )
        .await;
    let id = target["id"].as_str().unwrap().to_string();
    let queue = format!("hefring.target.{id}");
    assert_eq!(target["queue"], queue.as_str());
    let op = server
        .start_op(&format!("/targets/{id}/verify"), None)
        .await;
    let op_id = op["id"].as_str().unwrap().to_string();
    // The general worker leaves it alone...
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.op(&op_id).await["status"], "queued");
    // ...a worker of the target's queue runs it.
    let _near = Worker::start(
        server.data_dir(),
        &database.url(),
        &vhost.url(),
        &["--queues", &queue],
    );
    let done = server.wait_op(&op_id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
}

/// Flower (from PyPI, installed by scripts/test) on a free port, watching the vhost; killed on
/// drop.
struct Flower {
    child: Child,
    port: u16,
}

impl Flower {
    fn start(broker: &str) -> Flower {
        let port = crate::environments::free_port();
        let child = Command::new("celery")
            .args(["--broker", broker, "flower", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .env("FLOWER_UNAUTHENTICATED_API", "true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Flower runs (scripts/test installs it: pip install flower)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "Flower did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Flower { child, port }
    }

    async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or(Value::Null)
    }
}

impl Drop for Flower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_lists_hefring_workers_and_operations_and_celery_inspect_answers() {
    let database = Database::create();
    let vhost = Vhost::new();
    let server = distributed_server(&database, &vhost).await;
    let flower = Flower::start(&vhost.url());
    let _worker = Worker::start(server.data_dir(), &database.url(), &vhost.url(), &[]);
    let repo = Repo::new("runtime: php\n");
    let project = server
        .create("/projects", json!({"name": "seen", "git_url": repo.url()}))
        .await;
    let project = project["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(&format!("/projects/{project}/verify"), None)
        .await;
    let id = op["id"].as_str().unwrap().to_string();
    assert_eq!(server.wait_op(&id).await["status"], "succeeded");

    let deadline = Instant::now() + Duration::from_secs(30);
    let (workers, task) = loop {
        let workers = flower.get("/api/workers?refresh=1").await;
        let tasks = flower.get("/api/tasks").await;
        let ours = workers
            .as_object()
            .and_then(|w| w.iter().find(|(name, _)| name.starts_with("hefring.")))
            .map(|(_, info)| info.clone());
        if let (Some(info), Some(task)) = (ours, tasks.get(&id)) {
            if task["state"] == "SUCCESS" && info.get("registered").is_some() {
                break (info, task.clone());
            }
        }
        assert!(
            Instant::now() < deadline,
            "Flower does not show the worker and the operation: {workers}\n{tasks}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        workers["registered"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "hefring.project_verify"),
        "{workers}"
    );
    assert_eq!(workers["active_queues"][0]["name"], "hefring", "{workers}");
    assert_eq!(task["name"], "hefring.project_verify", "{task}");
    assert!(
        !workers.to_string().contains("guest:guest"),
        "the broker password leaked: {workers}"
    );

    let out = Command::new("celery")
        .args([
            "--broker",
            &vhost.url(),
            "inspect",
            "ping",
            "--timeout",
            "5",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pong") && text.contains("hefring."), "{text}");
}

/// A throwaway RabbitMQ node of the test's own (never the shared one: restarting that would
/// disturb other tests), as LAB-NOTES describes; stopped and removed on drop.
struct Broker {
    dir: tempfile::TempDir,
    node: String,
    port: u16,
}

impl Broker {
    fn start() -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("hefring-rabbit-")
            .tempdir()
            .unwrap();
        let port = crate::environments::free_port();
        let dist = crate::environments::free_port();
        let node = format!("hefring{port}@localhost");
        run(
            "chown",
            &["-R", "rabbitmq:rabbitmq", &dir.path().to_string_lossy()],
        );
        std::fs::write(dir.path().join("plugins"), "[].\n").unwrap();
        // Its own configuration: the machine's names the shared node's listener (5672).
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .unwrap();
        for file in ["plugins", "rabbitmq.conf"] {
            run(
                "chown",
                &[
                    "rabbitmq:rabbitmq",
                    &dir.path().join(file).to_string_lossy(),
                ],
            );
        }
        let broker = Broker { dir, node, port };
        broker.boot(dist);
        broker
    }

    fn env(&self, dist: u16) -> Vec<(String, String)> {
        let d = self.dir.path().display();
        vec![
            ("RABBITMQ_NODENAME".into(), self.node.clone()),
            ("RABBITMQ_NODE_PORT".into(), self.port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), dist.to_string()),
            ("RABBITMQ_MNESIA_BASE".into(), format!("{d}/mnesia")),
            ("RABBITMQ_LOG_BASE".into(), format!("{d}/log")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
                format!("{d}/plugins"),
            ),
            ("RABBITMQ_CONFIG_FILE".into(), format!("{d}/rabbitmq.conf")),
        ]
    }

    fn boot(&self, dist: u16) {
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .envs(self.env(dist))
            .status()
            .unwrap();
        assert!(status.success());
        // The node registers with epmd a moment after `-detached` returns; until then
        // rabbitmqctl cannot even find it.
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the test's RabbitMQ node did not open its port; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        run(
            "rabbitmqctl",
            &["-n", &self.node, "await_startup", "--timeout", "60"],
        );
    }

    fn stop(&self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output();
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_under_load_loses_no_operation() {
    let broker = Broker::start();
    let database = Database::create();
    let url = database.url();
    let server = Server::start_with(
        &[
            "--database-url",
            &url,
            "--broker-url",
            &broker.url(),
            "--workers",
            "0",
        ],
        &[],
    )
    .await;
    let token = create_token(server.data_dir(), &["--database-url", &url]);
    let server = server.with_token(token);
    let _worker = Worker::start(
        server.data_dir(),
        &url,
        &broker.url(),
        &["--concurrency", "4"],
    );
    let repo = Repo::new("runtime: php\n");
    let mut projects = Vec::new();
    for i in 0..40 {
        let project = server
            .create(
                "/projects",
                json!({"name": format!("p{i}"), "git_url": repo.url()}),
            )
            .await;
        projects.push(project["id"].as_str().unwrap().to_string());
    }
    // Half the work is announced before the restart, half while the broker is down or
    // coming back (the API stores it and tries to announce it; workers find what was not).
    let mut ops = Vec::new();
    for project in &projects[..20] {
        ops.push(
            server
                .start_op(&format!("/projects/{project}/verify"), None)
                .await,
        );
    }
    broker.stop();
    let stopped = Instant::now();
    let more = {
        let (url, token) = (server.url.clone(), server.token.clone());
        let projects = projects[20..].to_vec();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut ids = Vec::new();
            for project in projects {
                let op: Value = client
                    .post(format!("{url}/api/v1/projects/{project}/verify"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                ids.push(op["id"].as_str().unwrap().to_string());
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.boot(crate::environments::free_port());
    eprintln!("the broker was down for {:?}", stopped.elapsed());
    let mut ids: Vec<String> = ops
        .iter()
        .map(|op| op["id"].as_str().unwrap().to_string())
        .collect();
    ids.extend(more.await.unwrap());
    assert_eq!(ids.len(), 40);
    let mut succeeded = 0;
    for id in &ids {
        let done = server.wait_op(id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        succeeded += 1;
    }
    assert_eq!(
        succeeded, 40,
        "every operation ran once the broker was back"
    );
    // The worker's presence came back too: `celery inspect ping` reaches it again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("celery")
            .args([
                "--broker",
                &broker.url(),
                "inspect",
                "ping",
                "--timeout",
                "3",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("pong") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no worker answered ping after the broker restart: {text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The message count of `queue` in the vhost (ready and unacknowledged).
#[cfg(feature = "fault-injection")]
fn queue_messages(vhost: &Vhost, queue: &str) -> u64 {
    let out = run(
        "rabbitmqctl",
        &["-q", "list_queues", "-p", &vhost.0, "name", "messages"],
    );
    out.lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_killing_workers_goes_to_the_dead_letter_queue() {
    let database = Database::create();
    let vhost = Vhost::new();
    let server = distributed_server(&database, &vhost).await;
    let repo = Repo::new("runtime: php\n");
    let project = server
        .create(
            "/projects",
            json!({"name": "poison", "git_url": repo.url()}),
        )
        .await;
    let project = project["id"].as_str().unwrap().to_string();
    let op = server
        .start_op(&format!("/projects/{project}/verify"), None)
        .await;
    let id = op["id"].as_str().unwrap().to_string();
    let options = ["--max-redeliveries", "2", "--lease-seconds", "2"];
    // Three workers in turn die at the operation's first task (injected crash).
    for _ in 0..3 {
        let mut child = Command::new(BIN)
            .args([
                "worker",
                "--database-url",
                &database.url(),
                "--broker-url",
                &vhost.url(),
                "--data-dir",
            ])
            .arg(server.data_dir())
            .args(options)
            .env("HEFRING_FAULT_CRASH_AT", "fetch_repository")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the worker did not crash");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // A healthy worker gets the message a fourth time: it is poison now.
    let _healthy = Worker::start(server.data_dir(), &database.url(), &vhost.url(), &options);
    let done = server.wait_op(&id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("dead-letter queue hefring.dead"),
        "{done}"
    );
    assert_eq!(
        attempts(&done)[0],
        ("fetch_repository".to_string(), 3),
        "it did not run a fourth time: {done}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    // (The local target's verify was in flight on the same dying workers, so its message
    // may be counted as poison too: counting redeliveries cannot tell who killed a worker.)
    while queue_messages(&vhost, "hefring.dead") < 1 {
        assert!(
            Instant::now() < deadline,
            "no message in hefring.dead: {}",
            run(
                "rabbitmqctl",
                &[
                    "-q",
                    "list_queues",
                    "-p",
                    &vhost.0,
                    "name",
                    "messages",
                    "messages_unacknowledged",
                    "consumers"
                ]
            )
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        queue_messages(&vhost, "hefring"),
        0,
        "it left its own queue"
    );
    // Other work goes on.
    let next = server
        .start_op(&format!("/projects/{project}/verify"), None)
        .await;
    assert_eq!(
        server.wait_op(next["id"].as_str().unwrap()).await["status"],
        "succeeded"
    );
}

/// A ready backup of `environment`, stored directly: the rules look at the record only, so no
/// database or files stand behind it.
async fn stored_backup(database: &Database, environment: &str) -> String {
    let store = hefring_store::connect_unsealed(&database.url())
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let id = hefring_core::new_id(hefring_core::IdKind::Backup, now);
    store
        .insert_backup(&hefring_store::BackupRecord {
            id: id.clone(),
            environment_id: environment.into(),
            operation_id: hefring_core::new_id(hefring_core::IdKind::Operation, now),
            kind: "manual".into(),
            description: String::new(),
            status: "ready".into(),
            object_key: format!("{id}.tar.zst"),
            size: Some(1),
            sha256: Some("0".repeat(64)),
            manifest: None,
            created_at: now,
            updated_at: now,
        })
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_is_held_to_the_apis_rules_and_its_refusal_names_the_field() {
    let database = Database::create();
    let vhost = Vhost::new();
    let server = distributed_server(&database, &vhost).await;
    let _worker = Worker::start(
        server.data_dir(),
        &database.url(),
        &vhost.url(),
        &["--concurrency", "1"],
    );
    let root = tempfile::tempdir().unwrap();
    let target = server
        .create(
            "/targets",
            json!({"name": "web", "host": "local", "root": root.path().join("t")}),
        )
        .await;
    let mut environments = Vec::new();
    for name in ["one", "two"] {
        let project = server
            .create(
                "/projects",
                json!({"name": name, "git_url": format!("/srv/git/{name}")}),
            )
            .await;
        let env = server
            .create(
                "/environments",
                json!({"name": name, "project": project["id"], "target": target["id"], "domain": format!("{name}.test")}),
            )
            .await;
        environments.push(env["id"].as_str().unwrap().to_string());
    }
    let own = stored_backup(&database, &environments[0]).await;
    let foreign = stored_backup(&database, &environments[1]).await;

    // The API refuses a restore of another project's backup...
    let (status, refused) = server
        .post(
            &format!("/environments/{}/restore", environments[0]),
            json!({ "backup": foreign }),
        )
        .await;
    assert_eq!(
        status,
        reqwest::StatusCode::UNPROCESSABLE_ENTITY,
        "{refused}"
    );
    assert_eq!(refused["error"]["field"], "backup");

    let (_, ops_before) = server.get("/operations").await;
    // ... and so does the worker, for the same request sent as a Celery message; the project's
    // own backup passes that rule and is refused by the next (the environment is not deployed).
    let script = r#"
import json, sys
from celery import Celery
app = Celery(broker=sys.argv[1], backend="rpc://")
for backup in sys.argv[3:]:
    result = app.send_task("hefring.environment_restore",
                           kwargs={"environment": sys.argv[2], "backup": backup}, queue="hefring")
    try:
        print(json.dumps({"id": result.id, "result": result.get(timeout=60)}))
    except Exception as e:
        print(json.dumps({"id": result.id, "state": result.state, "error": str(e)}))
"#;
    let out = Command::new(python_celery())
        .args(["-c", script, &vhost.url(), &environments[0], &foreign, &own])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let error = |line: &Value| line["error"].as_str().unwrap_or_default().to_string();
    assert_eq!(lines[0]["state"], "FAILURE", "{}", lines[0]);
    assert!(
        error(&lines[0]).contains("backup: the backup is of an environment of another project"),
        "{}",
        lines[0]
    );
    assert_eq!(lines[1]["state"], "FAILURE", "{}", lines[1]);
    assert!(
        error(&lines[1]).contains("environment: the environment is new; only a deployed"),
        "{}",
        lines[1]
    );
    // Nothing was stored for either message.
    for line in &lines {
        let (status, _) = server
            .get(&format!("/operations/{}", line["id"].as_str().unwrap()))
            .await;
        assert_eq!(status, reqwest::StatusCode::NOT_FOUND, "{line}");
    }
    let ids = |ops: &Value| -> Vec<Value> {
        let items = ops["items"].as_array().unwrap();
        items.iter().map(|op| op["id"].clone()).collect()
    };
    let (_, ops) = server.get("/operations").await;
    assert_eq!(ids(&ops), ids(&ops_before));
}
