//! The rules, called as the API and the worker's intake call them, on a real SQLite store.

use std::sync::Arc;

use hefring_core::operation::OperationKind;
use hefring_core::{new_id, IdKind};
use hefring_store::{BackupRecord, OperationFilter, Page, ReleaseRecord, Store, TargetRecord};
use hefring_wire as wire;
use serde_json::{json, Value};

use crate::{now_ms, App, AppError, Origin};

struct Fixture {
    app: App,
    _dir: tempfile::TempDir,
    target: String,
    /// Deployed environments of two projects, each with a ready backup.
    env_a: String,
    env_b: String,
    backup_a: String,
    backup_b: String,
}

async fn store_in(dir: &std::path::Path) -> Arc<dyn Store> {
    hefring_store::connect_unsealed(&dir.join("state.db").to_string_lossy())
        .await
        .unwrap()
}

fn target_body(name: &str) -> wire::CreateTarget {
    serde_json::from_value(json!({"name": name, "host": "local", "root": "/srv/hefring-test"}))
        .unwrap()
}

async fn deployed(app: &App, project: &str, target: &str, name: &str) -> (String, String) {
    let (mut env, _) = app
        .create_environment(wire::CreateEnvironment {
            name: name.into(),
            project: project.into(),
            target: target.into(),
            domain: format!("{name}.test"),
            aliases: vec![],
            https: None,
        })
        .await
        .unwrap();
    let now = now_ms();
    let store = app.store();
    let op = app
        .store_operation(
            OperationKind::SystemNoop,
            "system",
            json!({ "for": name }),
            &Origin::caller("test"),
        )
        .await
        .unwrap()
        .operation;
    let release = ReleaseRecord {
        id: new_id(IdKind::Release, now),
        project_id: project.into(),
        git_ref: "main".into(),
        commit: "0".repeat(40),
        status: "ready".into(),
        artifact_sha256: Some("0".repeat(64)),
        artifact_size: Some(1),
        image: None,
        build_operation_id: op.id.clone(),
        created_at: now,
        updated_at: now,
    };
    store.insert_release(&release).await.unwrap();
    env.release_id = Some(release.id.clone());
    env.status = "active".into();
    store.update_environment(&env).await.unwrap();
    let backup = BackupRecord {
        id: new_id(IdKind::Backup, now),
        environment_id: env.id.clone(),
        operation_id: op.id,
        kind: "manual".into(),
        description: String::new(),
        status: "ready".into(),
        object_key: "k".into(),
        size: Some(1),
        sha256: Some("0".repeat(64)),
        manifest: None,
        created_at: now,
        updated_at: now,
    };
    store.insert_backup(&backup).await.unwrap();
    (env.id, backup.id)
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let app = App::new(store_in(dir.path()).await, dir.path().join("data"));
    let target = app.create_target(target_body("t")).await.unwrap().id;
    let mut projects = Vec::new();
    for name in ["one", "two"] {
        let body = wire::CreateProject {
            name: name.into(),
            git_url: format!("/srv/git/{name}"),
            branch: None,
        };
        projects.push(app.create_project(body, no_key).await.unwrap().id);
    }
    let (env_a, backup_a) = deployed(&app, &projects[0], &target, "a").await;
    let (env_b, backup_b) = deployed(&app, &projects[1], &target, "b").await;
    Fixture {
        app,
        _dir: dir,
        target,
        env_a,
        env_b,
        backup_a,
        backup_b,
    }
}

/// A key that is never used: these tests fetch nothing.
fn no_key(_project: &str) -> hefring_store::DeployKey {
    hefring_store::DeployKey {
        public_key: "ssh-ed25519 AAAA test".into(),
        private_key: hefring_core::Secret::new("unused".into()),
    }
}

async fn operations(app: &App) -> Vec<(OperationKind, String)> {
    let listed = app
        .store()
        .list_operations(
            &OperationFilter::default(),
            &Page {
                limit: 500,
                cursor: None,
            },
        )
        .await
        .unwrap();
    listed
        .items
        .into_iter()
        .map(|op| (op.kind, op.id))
        .filter(|(kind, _)| *kind != OperationKind::SystemNoop)
        .collect()
}

fn field(result: Result<impl std::fmt::Debug, AppError>) -> String {
    match result {
        Ok(v) => panic!("accepted: {v:?}"),
        Err(AppError::Invalid(e)) => e.field,
        Err(other) => panic!("refused, but not as an invalid field: {other:?}"),
    }
}

#[tokio::test]
async fn a_restore_of_another_projects_backup_is_refused_by_request_and_by_message_alike() {
    let f = fixture().await;
    let origin = Origin::caller("someone");
    let refused = f
        .app
        .restore(
            &f.env_a,
            wire::RestoreBackup {
                backup: f.backup_b.clone(),
            },
            &origin,
        )
        .await;
    assert_eq!(field(refused), "backup");

    let message_id = new_id(IdKind::Operation, now_ms());
    let refused = f
        .app
        .from_message(
            "environment_restore",
            &json!({"environment": f.env_a, "backup": f.backup_b}),
            &Origin::message(&message_id, "hefring"),
        )
        .await
        .unwrap_err();
    let described = refused.describe("environment");
    assert!(described.starts_with("backup: "), "{described}");
    assert!(described.contains("another project"), "{described}");
    assert!(operations(&f.app).await.is_empty());
    assert!(f
        .app
        .store()
        .get_operation(&message_id)
        .await
        .unwrap()
        .is_none());

    // The project's own backup is restored, under the message's id and on its queue.
    let done = f
        .app
        .from_message(
            "environment_restore",
            &json!({"environment": f.env_a, "backup": f.backup_a}),
            &Origin::message(&message_id, "hefring.elsewhere"),
        )
        .await
        .unwrap();
    assert!(done.created);
    assert_eq!(done.operation.id, message_id);
    assert_eq!(done.operation.queue, "hefring.elsewhere");
    assert_eq!(done.operation.requested_by, "celery");
    assert_eq!(done.operation.inputs, json!({"backup": f.backup_a}));
    // A second restore of the environment is refused while the first is queued.
    let busy = f
        .app
        .restore(
            &f.env_a,
            wire::RestoreBackup {
                backup: f.backup_a.clone(),
            },
            &origin,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            busy,
            AppError::Duplicate {
                identical: false,
                ..
            }
        ),
        "{busy:?}"
    );
}

#[tokio::test]
async fn messages_name_the_field_they_get_wrong() {
    let f = fixture().await;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "environment_restore",
            json!({"backup": f.backup_a}),
            "environment",
        ),
        (
            "environment_restore",
            json!({"environment": 7}),
            "environment",
        ),
        (
            "environment_restore",
            json!({"environment": f.env_a}),
            "backup",
        ),
        (
            "environment_restore",
            json!({"environment": f.env_a, "backup": f.backup_a, "kind": "scheduled"}),
            "kind",
        ),
        (
            "environment_verify",
            json!({"environment": f.env_a, "x": 1}),
            "x",
        ),
        (
            "environment_backup",
            json!({"environment": f.env_a, "description": "a\nb"}),
            "description",
        ),
        (
            "environment_deploy",
            json!({"environment": f.env_b, "release": "rel_nope"}),
            "release",
        ),
        (
            "environment_sync",
            json!({"environment": f.env_a, "from": f.env_b}),
            "from",
        ),
        (
            "environment_migrate",
            json!({"environment": f.env_a, "target": f.target}),
            "target",
        ),
        (
            "environment_clone",
            json!({"environment": f.env_a, "name": "c", "domain": "c.invalid"}),
            "domain",
        ),
        ("environment_cron", json!({"environment": f.env_a}), "task"),
        ("no_such_kind", json!({}), "task"),
        ("project_verify", json!({"project": "prj_nope"}), "project"),
        (
            "environment_update",
            json!({"environment": f.env_a, "release": "x"}),
            "release",
        ),
    ];
    for (kind, kwargs, expected) in cases {
        let origin = Origin::message(&new_id(IdKind::Operation, now_ms()), "hefring");
        let refusal = f
            .app
            .from_message(kind, &kwargs, &origin)
            .await
            .unwrap_err();
        let subject = OperationKind::parse(kind)
            .map(|k| k.subject_type().as_str())
            .unwrap_or("task");
        assert_eq!(
            refusal.field(subject),
            expected,
            "{kind} {kwargs}: {refusal:?}"
        );
        assert!(
            refusal
                .describe(subject)
                .starts_with(&format!("{expected}: ")),
            "{kind}: {}",
            refusal.describe(subject)
        );
    }
    assert!(operations(&f.app).await.is_empty());
}

#[tokio::test]
async fn hostile_settings_are_refused_naming_the_field_and_nothing_is_stored() {
    let f = fixture().await;
    let app = &f.app;
    let targets = |body: Value| async move {
        let body = {
            let mut b = json!({"name": "hostile", "host": "local"});
            b.as_object_mut()
                .unwrap()
                .extend(body.as_object().unwrap().clone());
            b
        };
        app.create_target(serde_json::from_value(body).unwrap())
            .await
    };
    for (body, expected) in [
        (json!({"web_user": "root"}), "web_user"),
        (json!({"web_user": "0"}), "web_user"),
        (json!({"root": "/srv/a b"}), "root"),
        (json!({"root": "/srv/a;{b"}), "root"),
        (json!({"root": "srv/a"}), "root"),
        (json!({"root": "/srv//a"}), "root"),
        (json!({"root": "/srv/a/"}), "root"),
        (
            json!({"system_nginx": {"sites_dir": "/etc/nginx/$x"}}),
            "system_nginx.sites_dir",
        ),
        (
            json!({"mariadb": {"socket": "/run/my sql.sock"}}),
            "mariadb.socket",
        ),
    ] {
        assert_eq!(field(targets(body.clone()).await), expected, "{body}");
    }
    let data = f.app.data_dir.to_string_lossy().into_owned();
    for url in [
        "https://user:secret@example.com/x.git".to_string(),
        "https://ghp_token@example.com/x.git".to_string(),
        "ssh://git@-oProxyCommand=x/y".to_string(),
        "http://169.254.169.254/latest".to_string(),
        format!("{data}/mirrors/prj_x"),
        format!("file://{data}"),
    ] {
        let body = wire::CreateProject {
            name: "hostile".into(),
            git_url: url.clone(),
            branch: None,
        };
        assert_eq!(
            field(f.app.create_project(body, no_key).await),
            "git_url",
            "{url}"
        );
    }
    for cron in ["* * * * * *", "*/2 * * * * *"] {
        let body = wire::Schedules {
            cron: Some(cron.into()),
            backups: None,
        };
        assert_eq!(field(f.app.set_schedules(&f.env_a, body).await), "cron");
    }
    let aliases = (0..101)
        .map(|i| wire::Alias {
            domain: format!("a{i}.test"),
            redirect: false,
        })
        .collect();
    let body = wire::CreateEnvironment {
        name: "many".into(),
        project: f.app.environment(&f.env_a).await.unwrap().project_id,
        target: f.target.clone(),
        domain: "many.test".into(),
        aliases,
        https: None,
    };
    assert_eq!(field(f.app.create_environment(body).await), "aliases");
    let store = f.app.store();
    let page = Page {
        limit: 100,
        cursor: None,
    };
    assert_eq!(store.list_targets(&page).await.unwrap().items.len(), 1);
    assert_eq!(store.list_projects(&page).await.unwrap().items.len(), 2);
    let env = store.get_environment(&f.env_a).await.unwrap().unwrap();
    assert!(env.settings.get("cron").is_none(), "{}", env.settings);
}

#[tokio::test]
async fn data_stored_before_the_rules_still_reads_and_acts() {
    let f = fixture().await;
    let now = now_ms();
    let old = TargetRecord {
        id: new_id(IdKind::Target, now),
        name: "old".into(),
        kind: "server".into(),
        status: "active".into(),
        host: "local".into(),
        root: "/srv/old root:x".into(),
        http_port: 80,
        https_port: 443,
        web_user: "root".into(),
        host_key: None,
        inspection: None,
        settings: Default::default(),
        created_at: now,
        updated_at: now,
    };
    f.app.store().insert_target(&old).await.unwrap();
    let verify = f
        .app
        .verify_target(&old.id, &Origin::caller("t"))
        .await
        .unwrap();
    assert_eq!(verify.operation.kind, OperationKind::TargetVerify);
}
