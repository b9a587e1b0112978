//! The REST contract: auth, status codes, envelopes, errors and validation (API.md).

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{Repo, Server};

#[tokio::test]
async fn health_and_openapi_are_public_and_everything_else_needs_a_token() {
    let server = Server::start().await;
    let http = server.http();
    let health = http
        .get(format!("{}/api/v1/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "ok");

    let doc: Value = http
        .get(format!("{}/api/v1/openapi.json", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/api/v1/targets",
        "/api/v1/targets/{id}",
        "/api/v1/targets/{id}/verify",
        "/api/v1/projects",
        "/api/v1/projects/{id}",
        "/api/v1/projects/{id}/verify",
        "/api/v1/projects/{id}/releases",
        "/api/v1/releases",
        "/api/v1/releases/{id}",
        "/api/v1/operations",
        "/api/v1/operations/{id}",
        "/api/v1/operations/{id}/log",
        "/api/v1/operations/{id}/retry",
        "/api/v1/operations/{id}/cancel",
        "/api/v1/ssh-key",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }

    for (method, path) in [
        ("GET", "/targets"),
        ("POST", "/targets"),
        ("GET", "/projects"),
        ("GET", "/operations"),
        ("GET", "/releases"),
        ("GET", "/ssh-key"),
        ("POST", "/projects/prj_x/verify"),
    ] {
        let request = http.request(
            method.parse().unwrap(),
            format!("{}/api/v1{path}", server.url),
        );
        let response = request.try_clone().unwrap().send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path}"
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
        let wrong = request.bearer_auth("hft_wrong").send().await.unwrap();
        assert_eq!(
            wrong.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path} with a wrong token"
        );
    }
}

#[tokio::test]
async fn a_fresh_install_registers_the_local_machine_once_and_shows_its_ssh_key() {
    let mut server = Server::start().await;
    let (status, list) = server.get("/targets").await;
    assert_eq!(status, StatusCode::OK);
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{list}");
    assert_eq!(items[0]["name"], "local");
    assert_eq!(items[0]["kind"], "server");
    assert_eq!(items[0]["host"], "local");
    assert!(list["next"].is_null());
    let (_, ops) = server
        .get(&format!(
            "/operations?subject={}",
            items[0]["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        ops["items"][0]["kind"], "target_verify",
        "the local target is verified on registration"
    );

    // Deleting it and restarting does not bring it back: it was registered once.
    let local = items[0]["id"].as_str().unwrap().to_string();
    let (status, deletion) = server
        .call(reqwest::Method::DELETE, &format!("/targets/{local}"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{deletion}");
    assert_eq!(deletion["kind"], "target_delete");
    let deletion = server.wait_op(deletion["id"].as_str().unwrap()).await;
    assert_eq!(deletion["status"], "succeeded", "{deletion}");
    server.restart(&[]);
    let (_, list) = server.get("/targets").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");

    let (status, key) = server.get("/ssh-key").await;
    assert_eq!(status, StatusCode::OK);
    assert!(key["public_key"]
        .as_str()
        .unwrap()
        .starts_with("ssh-ed25519 "));
}

async fn error(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = server
        .http()
        .request(method, format!("{}/api/v1{path}", server.url))
        .bearer_auth(&server.token);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named_and_nothing_is_stored() {
    let server = Server::start().await;
    let (_, before_targets) = server.get("/targets").await;
    let (_, before_ops) = server.get("/operations").await;
    use reqwest::Method as M;
    /// Method, path, body, expected status, error code and field.
    type Case<'a> = (M, &'a str, &'a str, StatusCode, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            M::POST,
            "/targets",
            "{",
            StatusCode::BAD_REQUEST,
            "malformed_request",
            None,
        ),
        (
            M::POST,
            "/targets",
            "",
            StatusCode::BAD_REQUEST,
            "malformed_request",
            None,
        ),
        (
            M::POST,
            "/targets",
            "[1,2]",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("body"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"host":"local"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("name"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"Bad_Name","host":"local"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("name"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"a","host":"ssh://u@-oProxyCommand=x:22"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("host"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"a","host":"local","kind":"mainframe"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("kind"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"a","host":"local","root":"relative/dir"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("root"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"a","host":"local","root":"/srv/../etc"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("root"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"a","host":"local","http_port":0}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("http_port"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"a","host":"local","http_port":70000}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("http_port"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"a","host":"local","web_user":"www data"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("web_user"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"a","host":"local","host_key":"x y z"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("host_key"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"a","host":"local","surprise":1}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("surprise"),
        ),
        (
            M::POST,
            "/targets",
            r#"{"name":"local","host":"local"}"#,
            StatusCode::CONFLICT,
            "conflict",
            Some("name"),
        ),
        (
            M::POST,
            "/projects",
            r#"{"name":"p","git_url":"ext::sh -c touch% /tmp/pwned"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("git_url"),
        ),
        (
            M::POST,
            "/projects",
            r#"{"name":"p","git_url":"--upload-pack=touch /tmp/pwned"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("git_url"),
        ),
        (
            M::POST,
            "/projects",
            r#"{"name":"p","git_url":"relative/path"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("git_url"),
        ),
        (
            M::POST,
            "/projects",
            r#"{"name":"p","git_url":"/srv/x","branch":"--all"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("branch"),
        ),
        (
            M::POST,
            "/projects",
            r#"{"name":"p"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("git_url"),
        ),
        (
            M::GET,
            "/targets?limit=0",
            "",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("limit"),
        ),
        (
            M::GET,
            "/targets?limit=abc",
            "",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("limit"),
        ),
        (
            M::GET,
            "/operations?status=sleeping",
            "",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("status"),
        ),
        (
            M::GET,
            "/targets/tgt_00000000000000000000000000",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::GET,
            "/targets/not-an-id",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::GET,
            "/projects/../../etc/passwd",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::GET,
            "/releases/rel_nope",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::GET,
            "/operations/op_nope",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::GET,
            "/operations/op_nope/log",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::POST,
            "/operations/op_nope/retry",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::POST,
            "/operations/op_nope/cancel",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::POST,
            "/targets/tgt_nope/verify",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::DELETE,
            "/targets/tgt_nope",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::POST,
            "/projects/prj_nope/verify",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::POST,
            "/projects/prj_nope/releases",
            r#"{"ref":"main"}"#,
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
        (
            M::GET,
            "/no/such/route",
            "",
            StatusCode::NOT_FOUND,
            "not_found",
            None,
        ),
    ];
    for (method, path, body, status, code, field) in cases {
        let body = (!body.is_empty()).then_some(body);
        let (got, value) = error(&server, method.clone(), path, body).await;
        assert_eq!(got, status, "{method} {path} {body:?}: {value}");
        assert_eq!(
            value["error"]["code"], code,
            "{method} {path} {body:?}: {value}"
        );
        assert!(!value["error"]["message"].as_str().unwrap().is_empty());
        assert_eq!(
            value["error"]["field"].as_str(),
            field,
            "{method} {path} {body:?}: {value}"
        );
    }
    let (_, after_targets) = server.get("/targets").await;
    let (_, after_ops) = server.get("/operations").await;
    assert_eq!(
        before_targets, after_targets,
        "a refused request stored a target"
    );
    assert_eq!(
        before_ops["items"].as_array().unwrap().len(),
        after_ops["items"].as_array().unwrap().len()
    );
    let (_, projects) = server.get("/projects").await;
    assert_eq!(
        projects["items"],
        json!([]),
        "a refused request stored a project"
    );
}

#[tokio::test]
async fn bad_refs_are_refused_before_any_operation_exists() {
    let server = Server::start().await;
    let repo = Repo::new("runtime: php\n");
    let project = server
        .create("/projects", json!({"name": "p", "git_url": repo.url()}))
        .await;
    let id = project["id"].as_str().unwrap();
    for bad in ["--output=/tmp/x", "a..b", "main@{1}", "x y", ""] {
        let (status, body) = server
            .post(&format!("/projects/{id}/releases"), json!({"ref": bad}))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert_eq!(body["error"]["field"], "ref");
    }
    let (_, ops) = server.get(&format!("/operations?subject={id}")).await;
    assert_eq!(ops["items"], json!([]));
}

#[tokio::test]
async fn targets_can_be_added_listed_shown_verified_and_removed() {
    let server = Server::start().await;
    let created = server
        .create(
            "/targets",
            json!({"name": "web-1", "host": "ssh://deploy@127.0.0.1:1", "root": "/srv/hefring", "http_port": 8081, "web_user": "deploy"}),
        )
        .await;
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("tgt_"));
    assert_eq!(created["status"], "new");
    assert_eq!(created["host"], "ssh://deploy@127.0.0.1:1");
    assert_eq!(created["https_port"], 443);
    let (status, shown) = server.get(&format!("/targets/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["name"], "web-1");
    assert_eq!(shown["root"], "/srv/hefring");

    // Nothing listens on port 1: the verify fails at connect, and says so.
    let op = server
        .start_op(&format!("/targets/{id}/verify"), None)
        .await;
    assert_eq!(op["kind"], "target_verify");
    assert_eq!(op["subject"], json!({"type": "target", "id": id}));
    assert_eq!(op["status"], "queued");
    assert_eq!(op["attempt"], 1);
    assert_eq!(op["requested_by"], "token:tests");
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(
        done["error"].as_str().unwrap().contains("cannot reach"),
        "{done}"
    );
    assert_eq!(done["tasks"][0]["status"], "failed");
    assert_eq!(done["tasks"][1]["status"], "pending");
    let (_, shown) = server.get(&format!("/targets/{id}")).await;
    assert_eq!(shown["status"], "unreachable");

    // Pagination: newest first, with a cursor.
    server
        .create("/targets", json!({"name": "web-2", "host": "local"}))
        .await;
    let (_, page1) = server.get("/targets?limit=2").await;
    assert_eq!(page1["items"][0]["name"], "web-2");
    assert_eq!(page1["items"][1]["name"], "web-1");
    let cursor = page1["next"].as_str().expect("a next cursor");
    let (_, page2) = server
        .get(&format!("/targets?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(page2["items"][0]["name"], "local");
    assert!(page2["next"].is_null());

    let (status, op) = server
        .call(reqwest::Method::DELETE, &format!("/targets/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{op}");
    let deletion = server.wait_op(op["id"].as_str().unwrap()).await;
    assert_eq!(deletion["status"], "succeeded", "{deletion}");
    let (status, _) = server.get(&format!("/targets/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_local_target_verify_reports_the_tools_and_fails_only_for_what_sites_need() {
    let server = Server::start().await;
    let (_, list) = server.get("/targets").await;
    let id = list["items"][0]["id"].as_str().unwrap().to_string();
    // The verify queued at registration: asking again while it is active is a duplicate.
    let (_, ops) = server.get(&format!("/operations?subject={id}")).await;
    let registration = ops["items"][0]["id"].as_str().unwrap().to_string();
    let (status, body) = server.action(&format!("/targets/{id}/verify")).await;
    if status == StatusCode::CONFLICT {
        assert_eq!(body["error"]["code"], "duplicate_operation");
        assert_eq!(body["error"]["operation"], registration.as_str());
    }
    server.wait_op(&registration).await;
    let op = server
        .start_op(&format!("/targets/{id}/verify"), None)
        .await;
    let done = server.wait_op(op["id"].as_str().unwrap()).await;
    let have = |names: &[&str]| {
        names.iter().any(|n| {
            std::process::Command::new("sh")
                .args(["-c", &format!("PATH=$PATH:/usr/sbin:/sbin command -v {n}")])
                .output()
                .unwrap()
                .status
                .success()
        })
    };
    let complete = have(&["nginx"])
        && have(&["php-fpm", "php-fpm8.2", "php-fpm8.3", "php-fpm8.4"])
        && have(&["php"]);
    let (_, target) = server.get(&format!("/targets/{id}")).await;
    let inspection = &target["inspection"];
    assert!(inspection["os"].as_str().unwrap().len() > 2, "{target}");
    assert!(inspection["tools"]["sh"].is_string(), "{target}");
    assert!(inspection["services"]["mariadb"].is_boolean(), "{target}");
    let log = server.log_text(op["id"].as_str().unwrap()).await;
    assert!(log.contains("inspect_system hefring found sh at"), "{log}");
    if complete {
        assert_eq!(done["status"], "succeeded", "{done}\n{log}");
        assert_eq!(target["status"], "ready");
    } else {
        assert_eq!(done["status"], "failed", "{done}");
        assert!(done["error"]
            .as_str()
            .unwrap()
            .contains("lacks what environments need"));
        assert_eq!(target["status"], "failed");
    }
}

#[tokio::test]
async fn hostile_settings_are_refused_at_the_edge_naming_the_field_and_nothing_is_stored() {
    let server = Server::start().await;
    let root = tempfile::tempdir().unwrap();
    let target = server
        .create(
            "/targets",
            json!({"name": "web", "host": "local", "root": root.path().join("t")}),
        )
        .await;
    let project = server
        .create(
            "/projects",
            json!({"name": "site", "git_url": "/srv/git/site"}),
        )
        .await;
    let env = server
        .create(
            "/environments",
            json!({"name": "live", "project": project["id"], "target": target["id"], "domain": "live.test"}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap();
    // The local target's verify, queued at start, changes the lists as it runs: it ends first.
    let (_, started) = server.get("/operations").await;
    for op in started["items"].as_array().unwrap() {
        server.wait_op(op["id"].as_str().unwrap()).await;
    }
    let lists = ["/targets", "/projects", "/environments", "/operations"];
    let mut before = Vec::new();
    for list in lists {
        before.push(server.get(list).await.1);
    }
    let schedules = format!("/environments/{env_id}/schedules");
    let (_, schedules_before) = server.get(&schedules).await;

    let data = server.data_dir().to_string_lossy().into_owned();
    let target_with = |extra: Value| {
        let mut body = json!({"name": "hostile", "host": "local"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ("/targets", reqwest::Method::POST, body)
    };
    let project_at = |url: &str| {
        (
            "/projects",
            reqwest::Method::POST,
            json!({"name": "p", "git_url": url}),
        )
    };
    let environment_with = |extra: Value| {
        let mut body = json!({"name": "e", "project": project["id"], "target": target["id"], "domain": "e.test"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ("/environments", reqwest::Method::POST, body)
    };
    let schedule = |body: Value| (schedules.as_str(), reqwest::Method::PUT, body);
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"domain": format!("a{i}.test")}))
        .collect();
    // Each request, the field its refusal must name, and a word the message must hold.
    let cases = vec![
        (target_with(json!({"web_user": "root"})), "web_user", "root"),
        (target_with(json!({"web_user": "0"})), "web_user", "uid 0"),
        (target_with(json!({"root": "/srv/a b"})), "root", "letters"),
        (
            target_with(json!({"root": "/srv/a;{b}"})),
            "root",
            "letters",
        ),
        (target_with(json!({"root": "/srv/$x"})), "root", "letters"),
        (target_with(json!({"root": "srv/a"})), "root", "absolute"),
        (
            target_with(json!({"root": "/srv//a"})),
            "root",
            "normalised",
        ),
        (
            target_with(json!({"root": "/srv/./a"})),
            "root",
            "normalised",
        ),
        (
            target_with(json!({"root": "/srv/a/"})),
            "root",
            "normalised",
        ),
        (
            target_with(json!({"system_nginx": {"sites_dir": "/etc/nginx/sites enabled"}})),
            "system_nginx.sites_dir",
            "letters",
        ),
        (
            target_with(json!({"system_nginx": {"sites_dir": "/etc/nginx/../x"}})),
            "system_nginx.sites_dir",
            "normalised",
        ),
        (
            project_at("https://user:secret@example.com/x.git"),
            "git_url",
            "deploy key",
        ),
        (
            project_at("https://ghp_token@example.com/x.git"),
            "git_url",
            "deploy key",
        ),
        (
            project_at("ssh://git:secret@example.com/x.git"),
            "git_url",
            "deploy key",
        ),
        (
            project_at("ssh://-oProxyCommand=x@example.com/x"),
            "git_url",
            "'-'",
        ),
        (project_at("ssh://git@-oProxyCommand=x/y"), "git_url", "'-'"),
        (
            project_at("-oProxyCommand=x@example.com:x"),
            "git_url",
            "'-'",
        ),
        (
            project_at("http://169.254.169.254/latest/meta-data"),
            "git_url",
            "metadata",
        ),
        (project_at("http://0xa9fea9fe/x"), "git_url", "metadata"),
        (
            project_at("http://metadata.google.internal/x"),
            "git_url",
            "metadata",
        ),
        (
            project_at("http://100.100.100.200/x"),
            "git_url",
            "metadata",
        ),
        (
            project_at(&format!("{data}/ssh")),
            "git_url",
            "data directory",
        ),
        (
            project_at(&format!("file://{data}/state.db")),
            "git_url",
            "data directory",
        ),
        (
            environment_with(json!({"domain": "p-x.invalid"})),
            "domain",
            ".invalid",
        ),
        (
            environment_with(json!({"aliases": [{"domain": "ok.test"}, {"domain": "x.invalid"}]})),
            "aliases[1].domain",
            ".invalid",
        ),
        (environment_with(json!({"aliases": many})), "aliases", "100"),
        (
            schedule(json!({"cron": "* * * * * *"})),
            "cron",
            "once a minute",
        ),
        (
            schedule(json!({"cron": "*/30 * * * * *"})),
            "cron",
            "once a minute",
        ),
        (
            schedule(
                json!({"backups": {"schedule": "0,1 * * * * *", "keep_daily": 1, "keep_weekly": 0}}),
            ),
            "backups.schedule",
            "once a minute",
        ),
    ];
    for ((path, method, body), field, word) in cases {
        let (status, value) = error(&server, method.clone(), path, Some(&body.to_string())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {value}");
        assert_eq!(value["error"]["code"], "invalid_field", "{body}: {value}");
        assert_eq!(value["error"]["field"], field, "{body}: {value}");
        let message = value["error"]["message"].as_str().unwrap();
        assert!(message.contains(word), "{body}: {message}");
        assert!(
            !message.contains("secret"),
            "a refusal repeats a credential: {message}"
        );
    }
    for (list, before) in lists.iter().zip(before) {
        assert_eq!(
            server.get(list).await.1,
            before,
            "a refused request changed {list}"
        );
    }
    assert_eq!(server.get(&schedules).await.1, schedules_before);
}
