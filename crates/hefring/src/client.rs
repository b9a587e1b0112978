//! The command-line client: every command is one or two API calls, printed as a table or
//! as the API's JSON. Exit status: 0 on success, 1 with a one-line error otherwise.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use hefring_wire::{
    Backup, BackupSchedule, Environment, ErrorBody, List, Operation, Project, Release,
    ScheduleStatus, Target,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::cli::{
    BackupCommand, ClientArgs, EnvCommand, OpCommand, Output, ProjectCommand, ReleaseCommand,
    TargetCommand,
};

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    output: Output,
}

impl Client {
    fn new(args: ClientArgs) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: args.url.trim_end_matches('/').to_string(),
            token: args.token,
            output: args.output,
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            return Err(api_error(status, &text));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<(T, Value)> {
        let value = self.send(Method::GET, path, None).await?;
        Ok((serde_json::from_value(value.clone())?, value))
    }

    /// A target or project given by id or by name.
    async fn resolve(&self, collection: &str, prefix: &str, given: &str) -> Result<String> {
        if given.starts_with(prefix) {
            return Ok(given.to_string());
        }
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/{collection}?limit=500&cursor={c}"),
                None => format!("/{collection}?limit=500"),
            };
            let (list, _): (List<Value>, _) = self.get(&path).await?;
            if let Some(found) = list.items.iter().find(|i| i["name"] == given) {
                return Ok(found["id"].as_str().unwrap_or_default().to_string());
            }
            match list.next {
                Some(next) => cursor = Some(next),
                None => bail!("no {} named {given}", collection.trim_end_matches('s')),
            }
        }
    }

    fn print(&self, value: &Value, table: impl FnOnce()) {
        match self.output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            ),
            Output::Table => table(),
        }
    }

    /// Prints a started operation, then follows it if asked.
    async fn started(&self, value: Value, follow: bool) -> Result<i32> {
        let op: Operation = serde_json::from_value(value.clone())?;
        if follow {
            return self.follow(&op.id).await;
        }
        self.print(&value, || println!("{} {} {}", op.id, op.kind, op.status));
        Ok(0)
    }

    /// Streams an operation's log until it ends; the exit code says how it ended.
    async fn follow(&self, id: &str) -> Result<i32> {
        Ok(exit_code(&self.follow_to_end(id).await?))
    }

    /// Streams an operation's log until it ends; answers the operation as it ended.
    async fn follow_to_end(&self, id: &str) -> Result<Operation> {
        let response = self
            .request(Method::GET, &format!("/operations/{id}/log"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        if response.status() != StatusCode::OK {
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error.message)
                .unwrap_or(text);
            bail!("{message}");
        }
        let progress = std::io::stderr().is_terminal() && self.output == Output::Table;
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        let mut last_op: Option<Operation> = None;
        while let Some(chunk) = body.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let mut event = "message";
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event:") {
                        event = e.trim();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push(d.strip_prefix(' ').unwrap_or(d));
                    }
                }
                let data = data.join("\n");
                match event {
                    "log" => {
                        if progress {
                            eprint!("\r\x1b[K");
                        }
                        match self.output {
                            Output::Table => println!("{data}"),
                            Output::Json => println!("{}", json!({ "log": data })),
                        }
                        if progress {
                            if let Some(op) = &last_op {
                                eprint!("{}", progress_line(op));
                            }
                        }
                    }
                    "status" => {
                        if let Ok(op) = serde_json::from_str::<Operation>(&data) {
                            if progress {
                                eprint!("\r\x1b[K{}", progress_line(&op));
                            }
                            last_op = Some(op);
                        }
                    }
                    "end" => {
                        if progress {
                            eprintln!("\r\x1b[K");
                        }
                        let op: Operation = self.get(&format!("/operations/{id}")).await?.0;
                        match self.output {
                            Output::Json => println!("{}", serde_json::to_string(&op)?),
                            Output::Table => {
                                let mut line = format!("operation {} {}", op.id, op.status);
                                if let Some(error) = &op.error {
                                    line.push_str(&format!(": {error}"));
                                }
                                // What it made: `(backup bak_...)`, `(environment env_...)`.
                                let made: Vec<String> = op
                                    .result
                                    .as_object()
                                    .into_iter()
                                    .flatten()
                                    .filter_map(|(k, v)| Some(format!("{k} {}", v.as_str()?)))
                                    .collect();
                                if !made.is_empty() {
                                    line.push_str(&format!(" ({})", made.join(", ")));
                                }
                                eprintln!("{line}");
                            }
                        }
                        return Ok(op);
                    }
                    _ => {}
                }
                let _ = std::io::stdout().flush();
            }
        }
        Err(anyhow!("the log stream ended before the operation did"))
    }
}

/// A followed operation's exit code: 0 only when it succeeded.
fn exit_code(op: &Operation) -> i32 {
    if op.status == "succeeded" {
        0
    } else {
        1
    }
}

/// The API's error (`{"error": {"message", "code"}}`) as one line.
fn api_error(status: StatusCode, text: &str) -> anyhow::Error {
    match serde_json::from_str::<ErrorBody>(text) {
        Ok(body) => anyhow!("{} ({})", body.error.message, body.error.code),
        Err(_) => anyhow!("the server answered {status}"),
    }
}

/// A value for a query string.
fn query_value(text: &str) -> String {
    let mut encoded = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                encoded.push(byte as char)
            }
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

fn progress_line(op: &Operation) -> String {
    let planned: Vec<_> = op.tasks.iter().filter(|t| !t.rollback).collect();
    let done = planned
        .iter()
        .filter(|t| matches!(t.status.as_str(), "succeeded" | "skipped"))
        .count();
    let current = op
        .tasks
        .iter()
        .find(|t| t.status == "running")
        .map(|t| t.name.as_str())
        .unwrap_or("");
    format!(
        "[{done}/{}] {} {} {current}",
        planned.len(),
        op.kind,
        op.status
    )
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row);
    }
}

fn show_fields(value: &Value) {
    if let Some(map) = value.as_object() {
        for (key, v) in map {
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            println!("{key:<12} {text}");
        }
    }
}

fn operation_table(op: &Operation) {
    println!(
        "{} {} on {} {}: {} (attempt {})",
        op.id, op.kind, op.subject.subject_type, op.subject.id, op.status, op.attempt
    );
    if let Some(error) = &op.error {
        println!("error: {error}");
    }
    table(
        &["task", "status", "attempts", "started", "finished"],
        op.tasks
            .iter()
            .map(|t| {
                vec![
                    if t.rollback {
                        format!("{} (rollback)", t.name)
                    } else {
                        t.name.clone()
                    },
                    t.status.clone(),
                    t.attempts.to_string(),
                    t.started_at.clone().unwrap_or_default(),
                    t.finished_at.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    );
}

pub async fn target(args: ClientArgs, command: TargetCommand) -> Result<i32> {
    let client = Client::new(args);
    match command {
        TargetCommand::Add {
            name,
            host,
            root,
            http_port,
            https_port,
            web_user,
            host_key,
            isolation,
        } => {
            let body = json!({ "name": name, "kind": "server", "host": host, "root": root,
                "http_port": http_port, "https_port": https_port, "web_user": web_user, "host_key": host_key,
                "isolation": isolation });
            let body = strip_nulls(body);
            let value = client.send(Method::POST, "/targets", Some(body)).await?;
            let t: Target = serde_json::from_value(value.clone())?;
            client.print(&value, || println!("{} {} {}", t.id, t.name, t.host));
        }
        TargetCommand::List => {
            let (list, value): (List<Target>, _) = client.get("/targets?limit=500").await?;
            client.print(&value, || {
                table(
                    &["id", "name", "status", "host", "root"],
                    list.items
                        .into_iter()
                        .map(|t| vec![t.id, t.name, t.status, t.host, t.root])
                        .collect(),
                )
            });
        }
        TargetCommand::Show { target } => {
            let id = client.resolve("targets", "tgt_", &target).await?;
            let value = client
                .send(Method::GET, &format!("/targets/{id}"), None)
                .await?;
            client.print(&value, || show_fields(&value));
        }
        TargetCommand::Verify { target, follow } => {
            let id = client.resolve("targets", "tgt_", &target).await?;
            let value = client
                .send(Method::POST, &format!("/targets/{id}/verify"), None)
                .await?;
            return client.started(value, follow.follow).await;
        }
        TargetCommand::Rm { target, follow } => {
            let id = client.resolve("targets", "tgt_", &target).await?;
            let value = client
                .send(Method::DELETE, &format!("/targets/{id}"), None)
                .await?;
            return client.started(value, follow.follow).await;
        }
    }
    Ok(0)
}

fn strip_nulls(mut value: Value) -> Value {
    if let Some(map) = value.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    value
}

pub async fn project(args: ClientArgs, command: ProjectCommand) -> Result<i32> {
    let client = Client::new(args);
    match command {
        ProjectCommand::Add {
            name,
            git_url,
            branch,
        } => {
            let body = strip_nulls(json!({ "name": name, "git_url": git_url, "branch": branch }));
            let value = client.send(Method::POST, "/projects", Some(body)).await?;
            let p: Project = serde_json::from_value(value.clone())?;
            client.print(&value, || {
                println!("{} {} {} ({})", p.id, p.name, p.git_url, p.branch)
            });
        }
        ProjectCommand::List => {
            let (list, value): (List<Project>, _) = client.get("/projects?limit=500").await?;
            client.print(&value, || {
                table(
                    &["id", "name", "status", "branch", "git url"],
                    list.items
                        .into_iter()
                        .map(|p| vec![p.id, p.name, p.status, p.branch, p.git_url])
                        .collect(),
                )
            });
        }
        ProjectCommand::Show { project } => {
            let id = client.resolve("projects", "prj_", &project).await?;
            let value = client
                .send(Method::GET, &format!("/projects/{id}"), None)
                .await?;
            client.print(&value, || show_fields(&value));
        }
        ProjectCommand::Verify { project, follow } => {
            let id = client.resolve("projects", "prj_", &project).await?;
            let value = client
                .send(Method::POST, &format!("/projects/{id}/verify"), None)
                .await?;
            return client.started(value, follow.follow).await;
        }
        ProjectCommand::DeployKey { project } => {
            let id = client.resolve("projects", "prj_", &project).await?;
            let value = client
                .send(Method::GET, &format!("/projects/{id}/deploy-key"), None)
                .await?;
            client.print(&value, || {
                println!("{}", value["public_key"].as_str().unwrap_or_default())
            });
        }
    }
    Ok(0)
}

pub async fn release(args: ClientArgs, command: ReleaseCommand) -> Result<i32> {
    let client = Client::new(args);
    match command {
        ReleaseCommand::Build {
            project,
            git_ref,
            follow,
        } => {
            let id = client.resolve("projects", "prj_", &project).await?;
            let value = client
                .send(
                    Method::POST,
                    &format!("/projects/{id}/releases"),
                    Some(json!({ "ref": git_ref })),
                )
                .await?;
            return client.started(value, follow.follow).await;
        }
        ReleaseCommand::List { project } => {
            let path = match project {
                Some(p) => format!(
                    "/releases?limit=500&project={}",
                    client.resolve("projects", "prj_", &p).await?
                ),
                None => "/releases?limit=500".into(),
            };
            let (list, value): (List<Release>, _) = client.get(&path).await?;
            client.print(&value, || {
                table(
                    &["id", "project", "ref", "commit", "status", "sha256"],
                    list.items
                        .into_iter()
                        .map(|r| {
                            let sha = r
                                .artifact
                                .map(|a| a.sha256[..12].to_string())
                                .unwrap_or_default();
                            vec![
                                r.id,
                                r.project,
                                r.git_ref,
                                r.commit[..12.min(r.commit.len())].to_string(),
                                r.status,
                                sha,
                            ]
                        })
                        .collect(),
                )
            });
        }
        ReleaseCommand::Show { release } => {
            let value = client
                .send(Method::GET, &format!("/releases/{release}"), None)
                .await?;
            client.print(&value, || show_fields(&value));
        }
        ReleaseCommand::FleetUpdate {
            release,
            to,
            parallelism,
            max_failures,
            include_older,
            follow,
        } => {
            let body = strip_nulls(json!({ "to": to, "parallelism": parallelism,
                "max_failures": max_failures, "include_older": include_older }));
            let value = client
                .send(
                    Method::POST,
                    &format!("/releases/{release}/fleet-update"),
                    Some(body),
                )
                .await?;
            if !follow.follow {
                return client.started(value, false).await;
            }
            let op: Operation = serde_json::from_value(value)?;
            let done = client.follow_to_end(&op.id).await?;
            if client.output == Output::Table {
                fleet_table(&done);
            }
            return Ok(exit_code(&done));
        }
    }
    Ok(0)
}

/// A fleet update's outcome, one line per environment: its id, how its update ended and the
/// child operation that updated it (`-` when none started).
fn fleet_table(op: &Operation) {
    let rows = op.result["environments"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(env, outcome)| {
            let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
            vec![
                env.clone(),
                text(&outcome["status"]),
                text(&outcome["operation"]),
            ]
        })
        .collect();
    table(&["environment", "status", "operation"], rows);
}

impl Client {
    /// An environment given by id or by name (names are unique per project only).
    async fn resolve_environment(&self, given: &str) -> Result<String> {
        self.resolve_environment_in(given, None).await
    }

    /// An environment given by id or by name, the name looked up in `project` when given.
    async fn resolve_environment_in(&self, given: &str, project: Option<&str>) -> Result<String> {
        if given.starts_with("env_") {
            return Ok(given.to_string());
        }
        let mut base = "/environments?limit=500".to_string();
        if let Some(project) = project {
            base.push_str(&format!("&project={}", query_value(project)));
        }
        let mut found = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("{base}&cursor={c}"),
                None => base.clone(),
            };
            let (list, _): (List<Environment>, _) = self.get(&path).await?;
            found.extend(list.items.into_iter().filter(|e| e.name == given));
            match list.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        match (found.as_slice(), project) {
            ([], Some(project)) => bail!("no environment named {given} in project {project}"),
            ([], None) => bail!("no environment named {given}"),
            ([one], _) => Ok(one.id.clone()),
            (many, _) => bail!(
                "{} environments are named {given}: give the id ({})",
                many.len(),
                many.iter()
                    .map(|e| e.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

pub async fn environment(args: ClientArgs, command: EnvCommand) -> Result<i32> {
    let client = Client::new(args);
    match command {
        EnvCommand::Create {
            name,
            project,
            target,
            domain,
            aliases,
            redirects,
            https,
        } => {
            let project = client.resolve("projects", "prj_", &project).await?;
            let target = client.resolve("targets", "tgt_", &target).await?;
            let aliases = alias_list(&aliases, &redirects);
            let body = strip_nulls(json!({ "name": name, "project": project, "target": target,
                "domain": domain, "aliases": aliases, "https": https }));
            let value = client
                .send(Method::POST, "/environments", Some(body))
                .await?;
            let e: Environment = serde_json::from_value(value.clone())?;
            client.print(&value, || println!("{} {} {}", e.id, e.name, e.url));
        }
        EnvCommand::List { project, target } => {
            let mut path = "/environments?limit=500".to_string();
            if let Some(p) = project {
                path.push_str(&format!(
                    "&project={}",
                    client.resolve("projects", "prj_", &p).await?
                ));
            }
            if let Some(t) = target {
                path.push_str(&format!(
                    "&target={}",
                    client.resolve("targets", "tgt_", &t).await?
                ));
            }
            let (list, value): (List<Environment>, _) = client.get(&path).await?;
            client.print(&value, || {
                table(
                    &["id", "name", "status", "url", "release"],
                    list.items
                        .into_iter()
                        .map(|e| vec![e.id, e.name, e.status, e.url, e.release.unwrap_or_default()])
                        .collect(),
                )
            });
        }
        EnvCommand::Show { environment } => {
            let id = client.resolve_environment(&environment).await?;
            let value = client
                .send(Method::GET, &format!("/environments/{id}"), None)
                .await?;
            client.print(&value, || show_fields(&value));
        }
        EnvCommand::Deploy {
            environment,
            release,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let value = client
                .send(
                    Method::POST,
                    &format!("/environments/{id}/deploy"),
                    Some(json!({ "release": release })),
                )
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::Update {
            environment,
            release,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let value = client
                .send(
                    Method::POST,
                    &format!("/environments/{id}/update"),
                    Some(json!({ "release": release })),
                )
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::Verify {
            environment,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let value = client
                .send(Method::POST, &format!("/environments/{id}/verify"), None)
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::Disable {
            environment,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let value = client
                .send(Method::POST, &format!("/environments/{id}/disable"), None)
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::Enable {
            environment,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let value = client
                .send(Method::POST, &format!("/environments/{id}/enable"), None)
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::LoginLink { environment } => {
            let id = client.resolve_environment(&environment).await?;
            let value = client
                .send(
                    Method::POST,
                    &format!("/environments/{id}/login-link"),
                    None,
                )
                .await?;
            client.print(&value, || {
                println!("{}", value["url"].as_str().unwrap_or_default())
            });
        }
        EnvCommand::Rm {
            environment,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let value = client
                .send(Method::DELETE, &format!("/environments/{id}"), None)
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::Backup {
            environment,
            description,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let body = description.map(|d| json!({ "description": d }));
            let value = client
                .send(Method::POST, &format!("/environments/{id}/backup"), body)
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::Restore {
            environment,
            backup,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let value = client
                .send(
                    Method::POST,
                    &format!("/environments/{id}/restore"),
                    Some(json!({ "backup": backup })),
                )
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::Clone {
            environment,
            name,
            domain,
            target,
            aliases,
            redirects,
            https,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let target = match target {
                Some(t) => Some(client.resolve("targets", "tgt_", &t).await?),
                None => None,
            };
            let body = strip_nulls(json!({ "name": name, "domain": domain, "target": target,
                "aliases": alias_list(&aliases, &redirects), "https": https }));
            let value = client
                .send(
                    Method::POST,
                    &format!("/environments/{id}/clone"),
                    Some(body),
                )
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::Sync {
            environment,
            from,
            no_database,
            no_files,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            // The source is of the same project: its name is looked up there.
            let (env, _): (Environment, _) = client.get(&format!("/environments/{id}")).await?;
            let from = client
                .resolve_environment_in(&from, Some(&env.project))
                .await?;
            let value = client
                .send(
                    Method::POST,
                    &format!("/environments/{id}/sync"),
                    Some(json!({ "from": from, "database": !no_database, "files": !no_files })),
                )
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::Migrate {
            environment,
            target,
            follow,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let target = client.resolve("targets", "tgt_", &target).await?;
            let value = client
                .send(
                    Method::POST,
                    &format!("/environments/{id}/migrate"),
                    Some(json!({ "target": target })),
                )
                .await?;
            return client.started(value, follow.follow).await;
        }
        EnvCommand::Schedule {
            environment,
            cron,
            no_cron_override,
            backups,
            keep_daily,
            keep_weekly,
            no_backups,
        } => {
            let id = client.resolve_environment(&environment).await?;
            let path = format!("/environments/{id}/schedules");
            let change = ScheduleChange {
                cron: match (cron, no_cron_override) {
                    (Some(schedule), _) => Change::Set(schedule),
                    (None, true) => Change::Remove,
                    (None, false) => Change::Keep,
                },
                backups: if no_backups {
                    Change::Remove
                } else if backups.is_some() || keep_daily.is_some() || keep_weekly.is_some() {
                    Change::Set(BackupsChange {
                        schedule: backups,
                        keep_daily,
                        keep_weekly,
                    })
                } else {
                    Change::Keep
                },
            };
            let value = if change.is_none() {
                client.send(Method::GET, &path, None).await?
            } else {
                // The PUT sets both fields: what no flag names is sent as it is now.
                let current = match change.is_whole() {
                    true => None,
                    false => Some(client.get::<ScheduleStatus>(&path).await?.0),
                };
                let body = change.body(current.as_ref())?;
                client.send(Method::PUT, &path, Some(body)).await?
            };
            let status: ScheduleStatus = serde_json::from_value(value.clone())?;
            client.print(&value, || schedule_table(&status));
        }
    }
    Ok(0)
}

/// What `env schedule` does to one of the two fields.
enum Change<T> {
    /// Leave it as it is.
    Keep,
    /// Drop it (`null`): for cron, the override (the manifest's schedule applies again).
    Remove,
    Set(T),
}

/// The parts of a backup schedule given; those not given are kept from the current one.
struct BackupsChange {
    schedule: Option<String>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
}

/// What `env schedule` was asked to change.
struct ScheduleChange {
    cron: Change<String>,
    backups: Change<BackupsChange>,
}

impl ScheduleChange {
    fn is_none(&self) -> bool {
        matches!((&self.cron, &self.backups), (Change::Keep, Change::Keep))
    }

    /// Whether the body follows from the flags alone, without the current schedules.
    fn is_whole(&self) -> bool {
        !matches!(self.cron, Change::Keep)
            && match &self.backups {
                Change::Keep => false,
                Change::Remove => true,
                Change::Set(b) => {
                    b.schedule.is_some() && b.keep_daily.is_some() && b.keep_weekly.is_some()
                }
            }
    }

    /// The PUT body, completed from `current` where the flags say nothing.
    fn body(&self, current: Option<&ScheduleStatus>) -> Result<Value> {
        let cron = match &self.cron {
            Change::Set(schedule) => Some(schedule.clone()),
            Change::Remove => None,
            // The effective schedule is the manifest's unless it is an override: only an
            // override is the environment's to keep.
            Change::Keep => current
                .filter(|c| c.cron_source.as_deref() == Some("environment"))
                .and_then(|c| c.cron.clone()),
        };
        let now = current.and_then(|c| c.backups.as_ref());
        let backups = match &self.backups {
            Change::Keep => now.cloned(),
            Change::Remove => None,
            Change::Set(change) => {
                let schedule = match (&change.schedule, now) {
                    (Some(s), _) => s.clone(),
                    (None, Some(now)) => now.schedule.clone(),
                    (None, None) => bail!(
                        "the environment has no backup schedule to change: give --backups SCHEDULE"
                    ),
                };
                Some(BackupSchedule {
                    schedule,
                    keep_daily: change.keep_daily.or(now.map(|n| n.keep_daily)).unwrap_or(0),
                    keep_weekly: change
                        .keep_weekly
                        .or(now.map(|n| n.keep_weekly))
                        .unwrap_or(0),
                })
            }
        };
        Ok(json!({ "cron": cron, "backups": backups }))
    }
}

fn schedule_table(s: &ScheduleStatus) {
    let cron = match (&s.cron, &s.cron_source) {
        (Some(cron), Some(source)) => format!("{cron} ({source})"),
        (Some(cron), None) => cron.clone(),
        (None, _) => "-".into(),
    };
    let backups = match &s.backups {
        Some(b) => format!(
            "{} (keep {} daily, {} weekly)",
            b.schedule, b.keep_daily, b.keep_weekly
        ),
        None => "-".into(),
    };
    let last_run = match &s.last_cron_run {
        Some(op) => format!("{} {}", op.id, op.status),
        None => "-".into(),
    };
    let skipped = match &s.last_skipped_at {
        Some(at) => format!("{} (last {at})", s.skipped_cron_runs),
        None => s.skipped_cron_runs.to_string(),
    };
    for (key, text) in [
        ("cron", cron),
        (
            "cron command",
            s.cron_command.clone().unwrap_or_else(|| "-".into()),
        ),
        ("backups", backups),
        ("last cron run", last_run),
        ("skipped runs", skipped),
    ] {
        println!("{key:<14} {text}");
    }
}

/// An environment's other host names: served ones, then redirecting ones.
fn alias_list(aliases: &[String], redirects: &[String]) -> Vec<Value> {
    aliases
        .iter()
        .map(|d| json!({ "domain": d, "redirect": false }))
        .chain(
            redirects
                .iter()
                .map(|d| json!({ "domain": d, "redirect": true })),
        )
        .collect()
}

/// `1536` -> `1.5 KiB`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut size = bytes as f64;
    let mut unit = 0;
    while size >= 1024.0 && unit < UNITS.len() - 1 {
        size /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{size:.1} {}", UNITS[unit]),
    }
}

pub async fn backup(args: ClientArgs, command: BackupCommand) -> Result<i32> {
    let client = Client::new(args);
    match command {
        BackupCommand::List { env, kind } => {
            let mut path = "/backups?limit=500".to_string();
            if let Some(e) = env {
                path.push_str(&format!(
                    "&environment={}",
                    client.resolve_environment(&e).await?
                ));
            }
            if let Some(k) = kind {
                path.push_str(&format!("&kind={}", query_value(&k)));
            }
            let (list, value): (List<Backup>, _) = client.get(&path).await?;
            client.print(&value, || {
                table(
                    &[
                        "id",
                        "environment",
                        "kind",
                        "status",
                        "size",
                        "created",
                        "description",
                    ],
                    list.items
                        .into_iter()
                        .map(|b| {
                            vec![
                                b.id,
                                b.environment,
                                b.kind,
                                b.status,
                                b.size.map(|s| human_size(s as u64)).unwrap_or_default(),
                                b.created_at,
                                b.description,
                            ]
                        })
                        .collect(),
                )
            });
        }
        BackupCommand::Show { backup } => {
            let value = client
                .send(Method::GET, &format!("/backups/{backup}"), None)
                .await?;
            client.print(&value, || show_fields(&value));
        }
        BackupCommand::Download { backup, file } => {
            let (record, _): (Backup, _) = client.get(&format!("/backups/{backup}")).await?;
            let name = format!("{}.tar.zst", record.id);
            let path = match file {
                Some(dir) if dir.is_dir() => dir.join(&name),
                Some(file) => file,
                None => PathBuf::from(&name),
            };
            let size = client
                .download(
                    &format!("/backups/{}/download", record.id),
                    &path,
                    record.size.map(|s| s as u64),
                )
                .await?;
            let value = json!({ "backup": record.id, "path": path, "size": size,
                "sha256": record.sha256 });
            client.print(&value, || println!("{} ({size} bytes)", path.display()));
        }
        BackupCommand::Rm { backup, follow } => {
            let value = client
                .send(Method::DELETE, &format!("/backups/{backup}"), None)
                .await?;
            return client.started(value, follow.follow).await;
        }
    }
    Ok(0)
}

impl Client {
    /// Streams a download into `path`, atomically: into a temporary file beside it, renamed
    /// over it once every byte (`expected`, when known) has arrived. Answers the size.
    async fn download(&self, api_path: &str, path: &Path, expected: Option<u64>) -> Result<u64> {
        let response = self
            .request(Method::GET, api_path)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(api_error(status, &text));
        }
        let name = path
            .file_name()
            .ok_or_else(|| anyhow!("{} names no file", path.display()))?;
        let temp = path.with_file_name(format!(
            ".{}.{}.part",
            name.to_string_lossy(),
            std::process::id()
        ));
        let written = save(response, &temp, expected).await;
        let renamed = match written {
            Ok(size) => std::fs::rename(&temp, path)
                .map(|_| size)
                .with_context(|| format!("cannot write {}", path.display())),
            Err(e) => Err(e),
        };
        if renamed.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        renamed
    }
}

/// Writes a response's body to `temp` (synced to disk); answers its size.
async fn save(response: reqwest::Response, temp: &Path, expected: Option<u64>) -> Result<u64> {
    let mut file = tokio::fs::File::create(temp)
        .await
        .with_context(|| format!("cannot write {}", temp.display()))?;
    let mut body = response.bytes_stream();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the download was cut short")?;
        file.write_all(&chunk)
            .await
            .with_context(|| format!("cannot write {}", temp.display()))?;
        size += chunk.len() as u64;
    }
    file.sync_all()
        .await
        .with_context(|| format!("cannot write {}", temp.display()))?;
    if let Some(expected) = expected {
        if size != expected {
            bail!("the download was cut short: {size} of {expected} bytes");
        }
    }
    Ok(size)
}

pub async fn op(args: ClientArgs, command: OpCommand) -> Result<i32> {
    let client = Client::new(args);
    match command {
        OpCommand::List {
            subject,
            status,
            parent,
            limit,
        } => {
            let mut path = format!("/operations?limit={limit}");
            if let Some(s) = subject {
                path.push_str(&format!("&subject={}", query_value(&s)));
            }
            if let Some(s) = status {
                path.push_str(&format!("&status={}", query_value(&s)));
            }
            if let Some(p) = parent {
                path.push_str(&format!("&parent={}", query_value(&p)));
            }
            let (list, value): (List<Operation>, _) = client.get(&path).await?;
            client.print(&value, || {
                table(
                    &["id", "kind", "subject", "status", "attempt", "created"],
                    list.items
                        .into_iter()
                        .map(|o| {
                            vec![
                                o.id,
                                o.kind,
                                o.subject.id,
                                o.status,
                                o.attempt.to_string(),
                                o.created_at,
                            ]
                        })
                        .collect(),
                )
            });
        }
        OpCommand::Show { operation } => {
            let (op, value): (Operation, _) =
                client.get(&format!("/operations/{operation}")).await?;
            client.print(&value, || operation_table(&op));
        }
        OpCommand::Logs { operation, follow } => {
            if follow.follow {
                return client.follow(&operation).await;
            }
            let response = client
                .request(Method::GET, &format!("/operations/{operation}/log"))
                .send()
                .await?;
            let status = response.status();
            let text = response.text().await?;
            if !status.is_success() {
                let message = serde_json::from_str::<ErrorBody>(&text)
                    .map(|b| b.error.message)
                    .unwrap_or(text);
                bail!("{message}");
            }
            print!("{text}");
        }
        OpCommand::Retry {
            operation,
            from_start,
            follow,
        } => {
            let value = client
                .send(
                    Method::POST,
                    &format!("/operations/{operation}/retry"),
                    Some(json!({ "from_start": from_start })),
                )
                .await?;
            return client.started(value, follow.follow).await;
        }
        OpCommand::Cancel { operation } => {
            let value = client
                .send(
                    Method::POST,
                    &format!("/operations/{operation}/cancel"),
                    None,
                )
                .await?;
            let op: Operation = serde_json::from_value(value.clone())?;
            client.print(&value, || {
                println!(
                    "{} {}",
                    op.id,
                    if op.status == "cancelled" {
                        "cancelled"
                    } else {
                        "cancel requested"
                    }
                )
            });
        }
    }
    Ok(0)
}
