//! One storage story, written against the [`Store`] trait so that every backend runs it.

use hefring_core::operation::{OperationKind, OperationStatus, SubjectType, TaskStatus};
use std::sync::Arc;

use serde_json::json;

use crate::*;

fn new_op(id: &str, subject: &str, inputs: serde_json::Value) -> NewOperation {
    let kind = OperationKind::ReleaseBuild;
    NewOperation {
        id: id.into(),
        kind,
        subject_type: SubjectType::Project,
        subject_id: subject.into(),
        inputs,
        requested_by: "test".into(),
        parent_id: None,
        queue: "hefring".into(),
        tasks: kind.tasks().iter().map(|t| t.to_string()).collect(),
    }
}

fn claim<'a>(owner: &'a str, now: i64, queues: &'a [String]) -> Claim<'a> {
    Claim {
        owner,
        now,
        lease_until: now + 15_000,
        queues,
        only: None,
    }
}

async fn claimed_id(store: &dyn Store, owner: &str, now: i64) -> Option<String> {
    store
        .claim(&claim(owner, now, &[]))
        .await
        .unwrap()
        .map(|op| op.id)
}

async fn succeed(store: &dyn Store, id: &str, owner: &str, now: i64) {
    let outcome = OperationOutcome {
        status: OperationStatus::Succeeded,
        result: json!({}),
        error: None,
    };
    store
        .finish_operation(id, owner, &outcome, now)
        .await
        .unwrap();
}

/// Operations on one subject run one at a time, in order; other subjects are not held up.
pub async fn per_subject_order(store: &dyn Store) {
    store
        .create_operation(&new_op("op_a1", "prj_a", json!({"ref": "1"})), 1)
        .await
        .unwrap();
    store
        .create_operation(&new_op("op_a2", "prj_a", json!({"ref": "2"})), 2)
        .await
        .unwrap();
    store
        .create_operation(&new_op("op_b1", "prj_b", json!({"ref": "1"})), 3)
        .await
        .unwrap();
    assert_eq!(claimed_id(store, "w1", 10).await.as_deref(), Some("op_a1"));
    assert_eq!(claimed_id(store, "w2", 10).await.as_deref(), Some("op_b1"));
    assert_eq!(
        claimed_id(store, "w3", 10).await,
        None,
        "op_a2 must wait for op_a1"
    );
    succeed(store, "op_a1", "w1", 11).await;
    assert_eq!(claimed_id(store, "w3", 12).await.as_deref(), Some("op_a2"));
    let op = store.get_operation("op_a2").await.unwrap().unwrap();
    assert_eq!(op.status, OperationStatus::Running);
    assert_eq!(op.started_at, Some(12));
}

/// A lease that is not renewed expires; another worker takes the operation over, and the
/// first worker can no longer record anything.
pub async fn expired_leases_are_taken_over(store: &dyn Store) {
    store
        .create_operation(&new_op("op_l", "prj_l", json!({})), 1)
        .await
        .unwrap();
    let op = store.claim(&claim("w1", 100, &[])).await.unwrap().unwrap();
    assert_eq!(op.id, "op_l");
    store.start_task("op_l", "w1", 0, 101).await.unwrap();
    assert_eq!(
        claimed_id(store, "w2", 200).await,
        None,
        "the lease is still valid"
    );
    assert_eq!(
        store.renew_lease("op_l", "w1", 30_000).await.unwrap(),
        LeaseState::Held {
            cancel_requested: false
        }
    );
    assert_eq!(
        claimed_id(store, "w2", 20_000).await,
        None,
        "renewed until 30 000"
    );
    let taken = store
        .claim(&claim("w2", 30_001, &[]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.id, "op_l");
    assert_eq!(taken.status, OperationStatus::Running);
    assert_eq!(taken.tasks[0].attempts, 1);
    assert!(matches!(
        store.start_task("op_l", "w1", 1, 30_002).await,
        Err(StoreError::LeaseLost(_))
    ));
    assert_eq!(
        store.renew_lease("op_l", "w1", 60_000).await.unwrap(),
        LeaseState::Lost
    );
    store.start_task("op_l", "w2", 0, 30_003).await.unwrap();
    let op = store.get_operation("op_l").await.unwrap().unwrap();
    assert_eq!(
        op.tasks[0].attempts, 2,
        "a resumed task counts its attempts"
    );

    // Expiring every lease (an embedded server restarting) frees it at once.
    assert_eq!(store.expire_all_leases().await.unwrap(), 1);
    assert_eq!(
        claimed_id(store, "w3", 30_004).await.as_deref(),
        Some("op_l")
    );
}

/// The same kind, subject and inputs while one is active: refused, naming the active one.
pub async fn duplicates_are_refused_while_active(store: &dyn Store) {
    store
        .create_operation(&new_op("op_d1", "prj_d", json!({"ref": "main"})), 1)
        .await
        .unwrap();
    match store
        .create_operation(&new_op("op_d2", "prj_d", json!({"ref": "main"})), 2)
        .await
    {
        Err(StoreError::Duplicate { existing }) => assert_eq!(existing, "op_d1"),
        other => panic!("{other:?}"),
    }
    assert!(
        store.get_operation("op_d2").await.unwrap().is_none(),
        "nothing stored"
    );
    store
        .create_operation(&new_op("op_d3", "prj_d", json!({"ref": "other"})), 3)
        .await
        .unwrap();
    store.request_cancel("op_d1", 4).await.unwrap();
    store
        .create_operation(&new_op("op_d4", "prj_d", json!({"ref": "main"})), 5)
        .await
        .unwrap();
}

/// Cancel ends a queued operation at once and flags a running one; retry resumes.
pub async fn cancel_and_retry(store: &dyn Store) {
    store
        .create_operation(&new_op("op_c", "prj_c", json!({})), 1)
        .await
        .unwrap();
    let cancelled = store.request_cancel("op_c", 2).await.unwrap();
    assert_eq!(cancelled.status, OperationStatus::Cancelled);
    assert!(cancelled
        .tasks
        .iter()
        .all(|t| t.status == TaskStatus::Cancelled));
    assert!(matches!(
        store.request_cancel("op_c", 3).await,
        Err(StoreError::InvalidTransition(_))
    ));

    let retried = store.retry_operation("op_c", false, 4).await.unwrap();
    assert_eq!(retried.status, OperationStatus::Queued);
    assert_eq!(retried.attempt, 2);
    assert!(retried
        .tasks
        .iter()
        .all(|t| t.status == TaskStatus::Pending));
    assert!(matches!(
        store.retry_operation("op_c", false, 5).await,
        Err(StoreError::InvalidTransition(_))
    ));

    // Running: the cancel is a request the worker sees when it renews its lease.
    store.claim(&claim("w", 10, &[])).await.unwrap().unwrap();
    let done = TaskOutcome {
        status: TaskStatus::Succeeded,
        state_patch: Some(json!({"commit": "abc"})),
    };
    store.start_task("op_c", "w", 0, 11).await.unwrap();
    store
        .finish_task("op_c", "w", 0, &done, None, 12)
        .await
        .unwrap();
    let flagged = store.request_cancel("op_c", 13).await.unwrap();
    assert_eq!(flagged.status, OperationStatus::Running);
    assert_eq!(
        store.renew_lease("op_c", "w", 20_000).await.unwrap(),
        LeaseState::Held {
            cancel_requested: true
        }
    );
    store
        .begin_rollback(
            "op_c",
            "w",
            &["discard_build"],
            &json!({"_ending": {"status": "cancelled"}}),
        )
        .await
        .unwrap();
    let outcome = OperationOutcome {
        status: OperationStatus::Cancelled,
        result: json!({}),
        error: None,
    };
    store
        .finish_operation("op_c", "w", &outcome, 14)
        .await
        .unwrap();
    let ended = store.get_operation("op_c").await.unwrap().unwrap();
    assert_eq!(ended.state["commit"], "abc");
    assert_eq!(ended.tasks.len(), 5);
    assert!(ended.tasks[4].rollback);

    // A retry keeps the finished task and its state, and drops the rollback step.
    let retried = store.retry_operation("op_c", false, 15).await.unwrap();
    assert_eq!(retried.attempt, 3);
    assert_eq!(retried.tasks.len(), 4);
    assert_eq!(retried.tasks[0].status, TaskStatus::Succeeded);
    assert_eq!(retried.tasks[1].status, TaskStatus::Pending);
    assert_eq!(retried.state["commit"], "abc");
    assert!(!retried.cancel_requested);
    let from_start = {
        store.request_cancel("op_c", 16).await.unwrap();
        store.retry_operation("op_c", true, 17).await.unwrap()
    };
    assert!(from_start
        .tasks
        .iter()
        .all(|t| t.status == TaskStatus::Pending));
    assert_eq!(from_start.state, json!({}));
}

/// Log lines come back in order, after a sequence number, with their attempt.
pub async fn logs_in_order(store: &dyn Store) {
    store
        .create_operation(&new_op("op_g", "prj_g", json!({})), 1)
        .await
        .unwrap();
    let lines: Vec<NewLogLine> = (0..2500)
        .map(|i| NewLogLine {
            attempt: 1 + i / 2000,
            at: i,
            task: "t".into(),
            stream: "stdout".into(),
            text: format!("line {i}"),
        })
        .collect();
    store.append_logs("op_g", &lines).await.unwrap();
    let first = store.read_logs("op_g", 0, 10).await.unwrap();
    assert_eq!(first.len(), 10);
    assert_eq!(first[0].text, "line 0");
    let rest = store.read_logs("op_g", first[9].seq, 5000).await.unwrap();
    assert_eq!(rest.len(), 2490);
    assert_eq!(rest.last().unwrap().text, "line 2499");
    assert_eq!(rest.last().unwrap().attempt, 2);
}

/// Redeliveries are counted per operation.
pub async fn redeliveries_are_counted(store: &dyn Store) {
    store
        .create_operation(&new_op("op_r", "prj_r", json!({})), 1)
        .await
        .unwrap();
    assert_eq!(store.count_redelivery("op_r").await.unwrap(), Some(1));
    assert_eq!(store.count_redelivery("op_r").await.unwrap(), Some(2));
    assert_eq!(store.count_redelivery("op_none").await.unwrap(), None);
}

/// Names are unique; lists page newest first.
pub async fn targets_page_newest_first(store: &dyn Store) {
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let target = TargetRecord {
            id: format!("tgt_{i}"),
            name: name.to_string(),
            kind: "server".into(),
            status: "new".into(),
            host: "local".into(),
            root: "/srv".into(),
            http_port: 80,
            https_port: 443,
            web_user: "www-data".into(),
            host_key: None,
            inspection: None,
            settings: Default::default(),
            created_at: i as i64,
            updated_at: i as i64,
        };
        store.insert_target(&target).await.unwrap();
    }
    let mut dup = store.get_target("tgt_0").await.unwrap().unwrap();
    dup.id = "tgt_9".into();
    assert!(matches!(
        store.insert_target(&dup).await,
        Err(StoreError::Conflict(_))
    ));
    let page = store
        .list_targets(&Page {
            limit: 2,
            cursor: None,
        })
        .await
        .unwrap();
    let names: Vec<_> = page.items.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["c", "b"]);
    let page = store
        .list_targets(&Page {
            limit: 2,
            cursor: page.next,
        })
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].name, "a");
    assert!(page.next.is_none());
}

/// Environment names are unique per project and domains across environments, among those not
/// deleted; secrets and aliases round-trip; lists filter and page.
pub async fn environments_unique_among_live(store: &dyn Store) {
    use hefring_core::render::nginx::Alias;
    use hefring_core::render::Https;
    let target = TargetRecord {
        id: "tgt_e".into(),
        name: "web".into(),
        kind: "server".into(),
        status: "ready".into(),
        host: "local".into(),
        root: "/srv".into(),
        http_port: 80,
        https_port: 443,
        web_user: "www-data".into(),
        host_key: None,
        inspection: None,
        settings: Default::default(),
        created_at: 0,
        updated_at: 0,
    };
    store.insert_target(&target).await.unwrap();
    let stored_target = store.get_target("tgt_e").await.unwrap().unwrap();
    assert_eq!(stored_target.settings.mariadb.user, "root");
    for id in ["prj_a", "prj_b"] {
        store
            .insert_project(&ProjectRecord {
                id: id.into(),
                name: id.replace('_', "-"),
                git_url: "/srv/git".into(),
                branch: "main".into(),
                status: "ready".into(),
                manifest: None,
                deploy_key: None,
                created_at: 0,
                updated_at: 0,
            })
            .await
            .unwrap();
    }
    let env = |id: &str, project: &str, name: &str, domain: &str| EnvironmentRecord {
        id: id.into(),
        name: name.into(),
        project_id: project.into(),
        target_id: "tgt_e".into(),
        release_id: None,
        domain: domain.into(),
        aliases: vec![Alias {
            domain: format!("www.{domain}"),
            redirect: true,
        }],
        https: Https::Required,
        status: "new".into(),
        secrets: Secret::new(json!({"db_password": "p"})),
        resources: json!({}),
        settings: json!({"cron": {"schedule": "*/5 * * * *"}}),
        created_at: 1,
        updated_at: 1,
    };
    let live = env("env_1", "prj_a", "live", "a.test");
    store.insert_environment(&live).await.unwrap();
    assert_eq!(store.get_environment("env_1").await.unwrap().unwrap(), live);
    let same_name = env("env_2", "prj_a", "live", "other.test");
    assert!(matches!(
        store.insert_environment(&same_name).await,
        Err(StoreError::Conflict(m)) if m.contains("name")
    ));
    let same_domain = env("env_3", "prj_b", "live", "a.test");
    assert!(matches!(
        store.insert_environment(&same_domain).await,
        Err(StoreError::Conflict(m)) if m.contains("domain")
    ));
    store
        .insert_environment(&env("env_4", "prj_b", "live", "b.test"))
        .await
        .unwrap();
    // A migration moves an environment to another target.
    store
        .insert_target(&TargetRecord {
            id: "tgt_f".into(),
            name: "web2".into(),
            ..target.clone()
        })
        .await
        .unwrap();
    let mut moved = live.clone();
    moved.target_id = "tgt_f".into();
    store.update_environment(&moved).await.unwrap();
    assert_eq!(
        store
            .get_environment("env_1")
            .await
            .unwrap()
            .unwrap()
            .target_id,
        "tgt_f"
    );
    let mut deleted = live.clone();
    deleted.status = "deleted".into();
    deleted.updated_at = 2;
    store.update_environment(&deleted).await.unwrap();
    // Both the name and the domain are free again once deleted.
    store
        .insert_environment(&env("env_5", "prj_a", "live", "a.test"))
        .await
        .unwrap();
    let page = Page {
        limit: 10,
        cursor: None,
    };
    let of_a = store
        .list_environments(
            &EnvironmentFilter {
                project: Some("prj_a".into()),
                ..Default::default()
            },
            &page,
        )
        .await
        .unwrap();
    let ids: Vec<_> = of_a.items.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["env_5"]);
    let all = store
        .list_environments(
            &EnvironmentFilter {
                include_deleted: true,
                ..Default::default()
            },
            &page,
        )
        .await
        .unwrap();
    let ids: Vec<_> = all.items.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["env_5", "env_4", "env_1"]);

    // Backups belong to an environment, list newest first, filter by kind, and leave the
    // list once deleted.
    let backup = |id: &str, env: &str, kind: &str| BackupRecord {
        id: id.into(),
        environment_id: env.into(),
        operation_id: format!("op_{id}"),
        kind: kind.into(),
        description: "before the upgrade".into(),
        status: "creating".into(),
        object_key: format!("backups/{env}/{id}.tar.zst"),
        size: None,
        sha256: None,
        manifest: None,
        created_at: 3,
        updated_at: 3,
    };
    for (id, env, kind) in [
        ("bak_1", "env_4", "manual"),
        ("bak_2", "env_4", "scheduled"),
        ("bak_3", "env_5", "manual"),
        ("bak_4", "env_4", "scheduled"),
    ] {
        store.insert_backup(&backup(id, env, kind)).await.unwrap();
    }
    let mut ready = store.get_backup("bak_2").await.unwrap().unwrap();
    assert_eq!(ready, backup("bak_2", "env_4", "scheduled"));
    ready.status = "ready".into();
    ready.size = Some(1234);
    ready.sha256 = Some("ab".repeat(32));
    ready.manifest = Some(json!({"parts": [{"name": "database.sql"}]}));
    ready.updated_at = 4;
    store.update_backup(&ready).await.unwrap();
    assert_eq!(store.get_backup("bak_2").await.unwrap().unwrap(), ready);
    let listed = |filter: BackupFilter| async move {
        let page = Page {
            limit: 10,
            cursor: None,
        };
        let items = store.list_backups(&filter, &page).await.unwrap().items;
        items.into_iter().map(|b| b.id).collect::<Vec<_>>()
    };
    let of_env_4 = BackupFilter {
        environment: Some("env_4".into()),
        ..Default::default()
    };
    assert_eq!(listed(of_env_4.clone()).await, ["bak_4", "bak_2", "bak_1"]);
    let scheduled = BackupFilter {
        kind: Some("scheduled".into()),
        ..of_env_4.clone()
    };
    assert_eq!(listed(scheduled).await, ["bak_4", "bak_2"]);
    let by_operation = BackupFilter {
        operation: Some("op_bak_3".into()),
        ..Default::default()
    };
    assert_eq!(listed(by_operation).await, ["bak_3"]);
    let mut gone = store.get_backup("bak_4").await.unwrap().unwrap();
    gone.status = "deleted".into();
    store.update_backup(&gone).await.unwrap();
    assert_eq!(listed(of_env_4).await, ["bak_2", "bak_1"]);
    assert!(store.get_backup("bak_404").await.unwrap().is_none());
    let mut missing = backup("bak_404", "env_4", "manual");
    missing.status = "ready".into();
    assert!(matches!(
        store.update_backup(&missing).await,
        Err(StoreError::NotFound)
    ));
}

/// A setting replaced only while it holds the expected value: of two writers that read the
/// same value, one wins.
pub async fn settings_compare_and_set(store: &dyn Store) {
    assert!(store.replace_setting("s.k", None, "1").await.unwrap());
    assert!(!store.replace_setting("s.k", None, "2").await.unwrap());
    assert_eq!(
        store.get_setting("s.k").await.unwrap().as_deref(),
        Some("1")
    );
    assert!(!store.replace_setting("s.k", Some("0"), "2").await.unwrap());
    assert!(store.replace_setting("s.k", Some("1"), "2").await.unwrap());
    assert!(!store.replace_setting("s.k", Some("1"), "3").await.unwrap());
    assert_eq!(
        store.get_setting("s.k").await.unwrap().as_deref(),
        Some("2")
    );
    // Writers that all read "2": the first to write wins, the rest see it changed.
    let mut won = Vec::new();
    for i in 0..4 {
        won.push(
            store
                .replace_setting("s.k", Some("2"), &format!("from-2-{i}"))
                .await
                .unwrap(),
        );
    }
    assert_eq!(won, [true, false, false, false]);
    assert_eq!(
        store.get_setting("s.k").await.unwrap().as_deref(),
        Some("from-2-0")
    );
}

/// Creates an operation and claims it for `owner` (lease until 1 000 000).
async fn running(store: &dyn Store, id: &str, subject: &str, owner: &str) -> OperationRecord {
    store
        .create_operation(&new_op(id, subject, json!({})), 1)
        .await
        .unwrap();
    let claim = Claim {
        owner,
        now: 10,
        lease_until: 1_000_000,
        queues: &[],
        only: Some(id),
    };
    store.claim(&claim).await.unwrap().expect("claimable")
}

fn finish(id: &str, owner: &str, position: i64, status: TaskStatus) -> TaskFinish {
    TaskFinish {
        operation: id.into(),
        owner: owner.into(),
        position,
        status,
        finish: None,
        now: 20_000,
    }
}

fn ended(status: OperationStatus) -> OperationOutcome {
    OperationOutcome {
        status,
        result: json!({}),
        error: None,
    }
}

fn named(id: &str, owner: &str) -> NamedClaim {
    NamedClaim {
        operation: id.into(),
        owner: owner.into(),
        now: 20_000,
        lease_until: 35_000,
    }
}

fn lease_lost<T: std::fmt::Debug>(result: &Result<T>, id: &str) -> bool {
    matches!(result, Err(StoreError::LeaseLost(lost)) if lost == id)
}

/// Several runs' finishes, claims and starts recorded at once answer each item as if it were
/// recorded alone: lost leases, busy subjects, other queues and names given twice included.
pub async fn progress_recorded_together(store: &dyn Store) {
    let ends = running(store, "op_p5", "prj_p5", "w5").await;
    store.start_task("op_p5", "w5", 0, 11).await.unwrap();
    running(store, "op_p6", "prj_p6", "w6").await;
    store.start_task("op_p6", "w6", 0, 12).await.unwrap();
    running(store, "op_p7", "prj_p7", "w7").await;
    running(store, "op_p8", "prj_p8", "w8").await;
    running(store, "op_p10", "prj_p10", "w10").await;
    // Expired at 20 000: taken over by a claim.
    store
        .create_operation(&new_op("op_p9", "prj_p9", json!({})), 1)
        .await
        .unwrap();
    let mut expiring = claim("w9", 10, &[]);
    expiring.only = Some("op_p9");
    store.claim(&expiring).await.unwrap().unwrap();
    store.start_task("op_p9", "w9", 0, 13).await.unwrap();
    // Queued: op_p3 behind op_p1 on one subject, op_p4 on another queue.
    for (id, subject, queue) in [
        ("op_p1", "prj_p1", "hefring"),
        ("op_p3", "prj_p1", "hefring"),
        ("op_p4", "prj_p4", "hefring.target.x"),
    ] {
        let mut new = new_op(id, subject, json!({ "for": id }));
        new.queue = queue.into();
        store.create_operation(&new, 2).await.unwrap();
    }

    let mut ending = finish("op_p5", "w5", 0, TaskStatus::Succeeded);
    ending.finish = Some(OperationOutcome {
        status: OperationStatus::Succeeded,
        result: json!({"n": 5}),
        error: None,
    });
    let progress = Progress {
        finishes: vec![
            ending,
            finish("op_p6", "w6", 0, TaskStatus::Succeeded),
            finish("op_p8", "someone-else", 0, TaskStatus::Succeeded),
            finish("op_p10", "w10", 0, TaskStatus::Skipped),
        ],
        claims: vec![
            named("op_p1", "c1"),
            named("op_p1", "c2"),
            named("op_p3", "c3"),
            named("op_p4", "c4"),
            named("op_p9", "c9"),
            named("op_nothing", "c0"),
        ],
        starts: vec![
            TaskStart {
                operation: "op_p7".into(),
                owner: "w7".into(),
                position: 0,
                now: 20_001,
            },
            TaskStart {
                operation: "op_p8".into(),
                owner: "w7".into(),
                position: 0,
                now: 20_001,
            },
        ],
        queues: vec!["hefring".into()],
    };
    let made = store.record_progress(&progress).await;

    assert!(made.finishes[0].is_ok() && made.finishes[1].is_ok() && made.finishes[3].is_ok());
    assert!(
        lease_lost(&made.finishes[2], "op_p8"),
        "{:?}",
        made.finishes
    );
    let claimed: Vec<Option<String>> = made
        .claims
        .iter()
        .map(|c| c.as_ref().unwrap().as_ref().map(|op| op.id.clone()))
        .collect();
    assert_eq!(
        claimed,
        [
            Some("op_p1".into()),
            None,
            None,
            None,
            Some("op_p9".into()),
            None
        ],
        "op_p1 once, op_p3 behind it, op_p4 on another queue, op_p9 taken over"
    );
    assert!(made.starts[0].is_ok());
    assert!(lease_lost(&made.starts[1], "op_p8"), "{:?}", made.starts);

    // Exactly what the single calls would have left.
    let p5 = store.get_operation("op_p5").await.unwrap().unwrap();
    assert_eq!(p5.status, OperationStatus::Succeeded);
    assert_eq!((p5.result, p5.finished_at), (json!({"n": 5}), Some(20_000)));
    assert_eq!(p5.tasks[0].status, TaskStatus::Succeeded);
    assert_eq!(p5.tasks[0].started_at, Some(11));
    assert_eq!(p5.tasks[1..], ends.tasks[1..], "later tasks untouched");
    assert_eq!(
        store.renew_lease("op_p5", "w5", 50_000).await.unwrap(),
        LeaseState::Lost,
        "an ended operation's lease is gone"
    );
    let p6 = store.get_operation("op_p6").await.unwrap().unwrap();
    assert_eq!(p6.status, OperationStatus::Running);
    assert_eq!(
        (p6.tasks[0].status, p6.tasks[0].finished_at),
        (TaskStatus::Succeeded, Some(20_000))
    );
    let p10 = store.get_operation("op_p10").await.unwrap().unwrap();
    assert_eq!(
        (p10.tasks[0].status, p10.tasks[0].started_at),
        (TaskStatus::Skipped, None)
    );
    let p8 = store.get_operation("op_p8").await.unwrap().unwrap();
    assert_eq!(
        p8.tasks[0].status,
        TaskStatus::Pending,
        "no lease, no change"
    );
    let p7 = store.get_operation("op_p7").await.unwrap().unwrap();
    assert_eq!(
        (
            p7.tasks[0].status,
            p7.tasks[0].attempts,
            p7.tasks[0].started_at
        ),
        (TaskStatus::Running, 1, Some(20_001))
    );
    let p1 = store.get_operation("op_p1").await.unwrap().unwrap();
    assert_eq!(
        Some(&p1),
        made.claims[0].as_ref().unwrap().as_ref(),
        "a claim answers the operation as stored, tasks included"
    );
    assert_eq!(
        (p1.status, p1.started_at),
        (OperationStatus::Running, Some(20_000))
    );
    assert_eq!(
        store.renew_lease("op_p1", "c1", 36_000).await.unwrap(),
        LeaseState::Held {
            cancel_requested: false
        }
    );
    assert_eq!(
        store.renew_lease("op_p9", "w9", 36_000).await.unwrap(),
        LeaseState::Lost,
        "taken over"
    );
    let p9 = store.get_operation("op_p9").await.unwrap().unwrap();
    assert_eq!(p9.tasks[0].attempts, 1);
    for queued in ["op_p3", "op_p4"] {
        let op = store.get_operation(queued).await.unwrap().unwrap();
        assert_eq!(op.status, OperationStatus::Queued, "{queued}");
    }

    // A cancel among them also marks the operation's unfinished tasks cancelled.
    let mut cancelled = finish("op_p6", "w6", 1, TaskStatus::Cancelled);
    cancelled.finish = Some(ended(OperationStatus::Cancelled));
    let made = store
        .record_progress(&Progress {
            finishes: vec![cancelled],
            starts: vec![TaskStart {
                operation: "op_p7".into(),
                owner: "w7".into(),
                position: 1,
                now: 20_002,
            }],
            ..Progress::default()
        })
        .await;
    assert!(made.finishes[0].is_ok() && made.starts[0].is_ok());
    let p6 = store.get_operation("op_p6").await.unwrap().unwrap();
    assert_eq!(p6.status, OperationStatus::Cancelled);
    assert!(p6.tasks[1..]
        .iter()
        .all(|t| t.status == TaskStatus::Cancelled));
    assert_eq!(p6.tasks[0].status, TaskStatus::Succeeded);
}

/// Secrets at rest: rows written in plaintext (a database from before sealing) are sealed by
/// the start-up pass, new writes are sealed, reads answer plaintext, a login link left in an
/// operation's state is forgotten, and a rotation leaves nothing the old key opens.
pub async fn secrets_sealed_at_rest(raw: Arc<dyn Store>) {
    use crate::secrets::{Sealer, SecretKey, SEALED_PREFIX};
    use hefring_core::render::Https;
    // Before sealing: plaintext rows, as the previous version wrote them.
    let mut target = TargetRecord {
        id: "tgt_s".into(),
        name: "sealed".into(),
        kind: "server".into(),
        status: "ready".into(),
        host: "local".into(),
        root: "/srv".into(),
        http_port: 80,
        https_port: 443,
        web_user: "www-data".into(),
        host_key: None,
        inspection: None,
        settings: Default::default(),
        created_at: 0,
        updated_at: 0,
    };
    target.settings.mariadb.password = Some(Secret::new("maria-pw-4711".into()));
    target.settings.postgresql.password = Some(Secret::new("pg-pw-4712".into()));
    raw.insert_target(&target).await.unwrap();
    let project = ProjectRecord {
        id: "prj_s".into(),
        name: "sealed".into(),
        git_url: "/srv/git".into(),
        branch: "main".into(),
        status: "ready".into(),
        manifest: None,
        deploy_key: Some(DeployKey {
            public_key: "ssh-ed25519 AAAA public".into(),
            private_key: Secret::new("PRIVATE-KEY-4713".into()),
        }),
        created_at: 0,
        updated_at: 0,
    };
    raw.insert_project(&project).await.unwrap();
    let env = EnvironmentRecord {
        id: "env_s".into(),
        name: "live".into(),
        project_id: "prj_s".into(),
        target_id: "tgt_s".into(),
        release_id: None,
        domain: "s.test".into(),
        aliases: vec![],
        https: Https::Off,
        status: "new".into(),
        secrets: Secret::new(json!({"db_password": "db-pw-4714"})),
        resources: json!({}),
        settings: json!({}),
        created_at: 1,
        updated_at: 1,
    };
    raw.insert_environment(&env).await.unwrap();
    running(raw.as_ref(), "op_s", "prj_s", "w").await;
    let link = TaskOutcome {
        status: TaskStatus::Succeeded,
        state_patch: Some(json!({"login_url": "https://s.test/login/4715", "kept": 1})),
    };
    raw.finish_task("op_s", "w", 0, &link, None, 20)
        .await
        .unwrap();

    let everything = |store: Arc<dyn Store>| async move {
        let t = store.get_target("tgt_s").await.unwrap().unwrap();
        let p = store.get_project("prj_s").await.unwrap().unwrap();
        let e = store.get_environment("env_s").await.unwrap().unwrap();
        let o = store.get_operation("op_s").await.unwrap().unwrap();
        (t, p, e, o)
    };
    let raw_text = |store: Arc<dyn Store>| async move {
        let (t, p, e, o) = everything(store).await;
        format!(
            "{:?} {:?} {} {} {}",
            t.settings.mariadb.password.map(|s| s.into_inner()),
            t.settings.postgresql.password.map(|s| s.into_inner()),
            p.deploy_key.unwrap().private_key.expose(),
            e.secrets.expose(),
            o.state
        )
    };

    let first = Arc::new(Sealer::new(SecretKey::from_bytes([7; 32]), vec![]));
    let sealed: Arc<dyn Store> =
        Arc::new(SealedStore::new(raw.clone(), first.clone()).await.unwrap());
    // Before the pass, plaintext rows read as they are.
    assert_eq!(everything(sealed.clone()).await.0, target);
    let report = SealedStore::new(raw.clone(), first.clone())
        .await
        .unwrap()
        .seal_everything()
        .await
        .unwrap();
    assert_eq!(
        report,
        SealReport {
            resealed: 3,
            forgotten: 1,
            ran: true
        }
    );
    let stored = raw_text(raw.clone()).await;
    for plain in ["4711", "4712", "4713", "4714", "4715"] {
        assert!(!stored.contains(plain), "{plain} in {stored}");
    }
    assert_eq!(stored.matches(SEALED_PREFIX).count(), 4, "{stored}");
    let (t, p, e, o) = everything(sealed.clone()).await;
    assert_eq!(t, target);
    assert_eq!(p, project);
    assert_eq!(e, env);
    assert_eq!(
        o.state,
        json!({"kept": 1}),
        "the old login link is forgotten"
    );
    // Nothing left to do: the next pass does not run.
    let again = SealedStore::new(raw.clone(), first.clone()).await.unwrap();
    assert!(!again.seal_everything().await.unwrap().ran);

    // New writes are sealed; reads answer plaintext; a login link is removed once read.
    let mut e2 = e.clone();
    e2.secrets = Secret::new(json!({"db_password": "db-pw-4716"}));
    sealed.update_environment(&e2).await.unwrap();
    assert_eq!(sealed.get_environment("env_s").await.unwrap().unwrap(), e2);
    let link = TaskOutcome {
        status: TaskStatus::Succeeded,
        state_patch: Some(json!({"login_url": "https://s.test/login/4717"})),
    };
    sealed
        .finish_task("op_s", "w", 1, &link, None, 30)
        .await
        .unwrap();
    let stored = raw_text(raw.clone()).await;
    assert!(
        !stored.contains("4716") && !stored.contains("4717"),
        "{stored}"
    );
    let o = sealed.get_operation("op_s").await.unwrap().unwrap();
    assert_eq!(o.state["login_url"], "https://s.test/login/4717");
    sealed.remove_state_key("op_s", "login_url").await.unwrap();
    let o = sealed.get_operation("op_s").await.unwrap().unwrap();
    assert_eq!(o.state, json!({"kept": 1}));

    // A rotation: sealed again with the new key, opened with either while it runs; after it,
    // the old key alone opens nothing and is refused at connect.
    let second_key = || SecretKey::from_bytes([9; 32]);
    let rotating = Arc::new(Sealer::new(
        second_key(),
        vec![SecretKey::from_bytes([7; 32])],
    ));
    let store = SealedStore::new(raw.clone(), rotating.clone())
        .await
        .unwrap();
    assert_eq!(store.seal_everything().await.unwrap().resealed, 3);
    let stored = raw_text(raw.clone()).await;
    assert_eq!(
        stored
            .matches(&format!("{SEALED_PREFIX}{}:", rotating.current_id()))
            .count(),
        4,
        "{stored}"
    );
    assert!(!stored.contains(first.current_id()), "{stored}");
    let after: Arc<dyn Store> = Arc::new(
        SealedStore::new(raw.clone(), Arc::new(Sealer::new(second_key(), vec![])))
            .await
            .unwrap(),
    );
    let (t, p, e, _) = everything(after).await;
    assert_eq!((t, p, e), (target, project, e2));
    let err = SealedStore::new(raw.clone(), first)
        .await
        .err()
        .expect("the old key is refused")
        .to_string();
    assert!(err.contains(rotating.current_id()), "{err}");
}

#[cfg(test)]
mod sqlite {
    use super::*;

    async fn fresh() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(&dir.path().join("state.db").to_string_lossy())
            .await
            .unwrap();
        (dir, store)
    }

    macro_rules! story {
        ($($name:ident),+) => {$(
            #[tokio::test]
            async fn $name() {
                let (_dir, store) = fresh().await;
                super::$name(&store).await;
            }
        )+};
    }

    story!(
        per_subject_order,
        expired_leases_are_taken_over,
        duplicates_are_refused_while_active,
        cancel_and_retry,
        logs_in_order,
        targets_page_newest_first,
        environments_unique_among_live,
        redeliveries_are_counted,
        settings_compare_and_set,
        progress_recorded_together
    );

    #[tokio::test]
    async fn secrets_sealed_at_rest() {
        let (dir, store) = fresh().await;
        super::secrets_sealed_at_rest(Arc::new(store)).await;
        // The pass scrubbed the files: no plaintext from before is left in any of them.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            for plain in ["4711", "4712", "4713", "4714", "4715", "4716", "4717"] {
                assert!(
                    !bytes.windows(plain.len()).any(|w| w == plain.as_bytes()),
                    "{plain} is left in the files"
                );
            }
        }
    }
}

#[cfg(test)]
mod postgres {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use sqlx::{Connection, PgConnection};

    use super::*;

    /// The machine's PostgreSQL, trust auth; the maintenance database creates and drops the
    /// test databases.
    const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

    /// Starts the local cluster, once, if nothing answers on 5432.
    fn ensure_server() {
        static STARTED: OnceLock<()> = OnceLock::new();
        STARTED.get_or_init(|| {
            if std::net::TcpStream::connect(("127.0.0.1", 5432)).is_ok() {
                return;
            }
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg("pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
                .status()
                .expect("cannot run pg_ctlcluster");
            assert!(status.success(), "pg_ctlcluster failed: {status}");
        });
    }

    /// The maintenance connection, waiting for a server that is starting up.
    async fn admin() -> PgConnection {
        ensure_server();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match PgConnection::connect(&format!("{SERVER}/postgres")).await {
                Ok(conn) => return conn,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for PostgreSQL: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("PostgreSQL is not reachable at {SERVER}: {e}"),
            }
        }
    }

    /// A database of its own for one test, dropped when this guard is (even if the test
    /// panicked; `WITH (FORCE)` ends the connections a store left open).
    pub(crate) struct TestDb {
        name: String,
    }

    impl TestDb {
        pub(crate) async fn create() -> TestDb {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let name = format!(
                "hefring_test_{}_{nanos}_{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let mut admin = admin().await;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .unwrap();
            admin.close().await.unwrap();
            TestDb { name }
        }

        pub(crate) fn url(&self) -> String {
            format!("{SERVER}/{}", self.name)
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let name = self.name.clone();
            // A runtime of its own on a thread of its own: this may run inside a test's runtime.
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let mut admin = PgConnection::connect(&format!("{SERVER}/postgres"))
                        .await
                        .map_err(|e| e.to_string())?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await
                        .map_err(|e| e.to_string())?;
                    admin.close().await.map_err(|e| e.to_string())
                })
            })
            .join();
            match dropped {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("could not drop test database {}: {e}", self.name),
                Err(_) => eprintln!("could not drop test database {}", self.name),
            }
        }
    }

    async fn fresh() -> (TestDb, PostgresStore) {
        let db = TestDb::create().await;
        let store = PostgresStore::connect(&db.url()).await.unwrap();
        (db, store)
    }

    macro_rules! story {
        ($($name:ident),+) => {$(
            #[tokio::test]
            async fn $name() {
                let (db, store) = fresh().await;
                super::$name(&store).await;
                store.close().await;
                drop(db);
            }
        )+};
    }

    story!(
        per_subject_order,
        expired_leases_are_taken_over,
        duplicates_are_refused_while_active,
        cancel_and_retry,
        logs_in_order,
        targets_page_newest_first,
        environments_unique_among_live,
        redeliveries_are_counted,
        settings_compare_and_set,
        progress_recorded_together
    );

    #[tokio::test]
    async fn secrets_sealed_at_rest() {
        let (db, store) = fresh().await;
        let store = Arc::new(store);
        super::secrets_sealed_at_rest(store.clone()).await;
        store.close().await;
        drop(db);
    }

    /// Operations `op_S_N` were claimed in the order of N for every subject S.
    fn assert_claimed_in_order<'a>(
        claims: impl Iterator<Item = &'a str> + Clone,
        subjects: usize,
        per_subject: usize,
    ) {
        for s in 0..subjects {
            let prefix = format!("op_{s}_");
            let order: Vec<&str> = claims
                .clone()
                .filter(|id| id.starts_with(&prefix))
                .collect();
            let expected: Vec<String> = (0..per_subject).map(|n| format!("op_{s}_{n}")).collect();
            assert_eq!(order, expected, "subject {s} out of order");
        }
    }

    /// Several worker processes recording progress in batches at once, every batch naming
    /// every operation still queued (as duplicated deliveries would): each operation is
    /// claimed exactly once, one at a time per subject and in order, and every recorded start
    /// and finish of a claimed operation succeeds. Batches that collide on rows wait for each
    /// other or fall back to one by one; none may answer wrongly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_batches_never_share_an_operation() {
        let (db, store) = fresh().await;
        const SUBJECTS: usize = 8;
        const PER_SUBJECT: usize = 4;
        let mut queued = Vec::new();
        for n in 0..PER_SUBJECT {
            for s in 0..SUBJECTS {
                let id = format!("op_{s}_{n}");
                let mut op = new_op(&id, &format!("prj_{s}"), json!({ "n": n }));
                op.tasks.truncate(1);
                store
                    .create_operation(&op, (n * SUBJECTS + s) as i64)
                    .await
                    .unwrap();
                queued.push(id);
            }
        }
        let queued = Arc::new(Mutex::new(queued));
        let claims = Arc::new(Mutex::new(Vec::<String>::new()));
        let running = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
        let mut workers = Vec::new();
        for w in 0..6 {
            let (url, queued, claims, running) =
                (db.url(), queued.clone(), claims.clone(), running.clone());
            workers.push(tokio::spawn(async move {
                let store = PostgresStore::connect(&url).await.unwrap();
                let mut idle = 0;
                while idle < 20 {
                    let names: Vec<String> = queued.lock().unwrap().clone();
                    let progress = Progress {
                        claims: names
                            .iter()
                            .enumerate()
                            .map(|(i, id)| named(id, &format!("w{w}-{}", i % 3)))
                            .collect(),
                        ..Progress::default()
                    };
                    let made = store.record_progress(&progress).await;
                    let mut mine = Vec::new();
                    for claimed in made.claims {
                        if let Some(op) = claimed.expect("a claim never fails") {
                            assert!(
                                running.lock().unwrap().insert(op.subject_id.clone()),
                                "two operations running on {}",
                                op.subject_id
                            );
                            queued.lock().unwrap().retain(|id| *id != op.id);
                            claims.lock().unwrap().push(op.id.clone());
                            let owner = progress
                                .claims
                                .iter()
                                .find(|c| c.operation == op.id)
                                .map(|c| c.owner.clone())
                                .unwrap();
                            mine.push((op, owner));
                        }
                    }
                    if mine.is_empty() {
                        idle += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    idle = 0;
                    let start = |(op, owner): &(OperationRecord, String)| TaskStart {
                        operation: op.id.clone(),
                        owner: owner.clone(),
                        position: 0,
                        now: 20_001,
                    };
                    let made = store
                        .record_progress(&Progress {
                            starts: mine.iter().map(start).collect(),
                            ..Progress::default()
                        })
                        .await;
                    assert!(made.starts.iter().all(|s| s.is_ok()), "{:?}", made.starts);
                    for (op, _) in &mine {
                        running.lock().unwrap().remove(&op.subject_id);
                    }
                    let ending = |(op, owner): &(OperationRecord, String)| {
                        let mut f = finish(&op.id, owner, 0, TaskStatus::Succeeded);
                        f.finish = Some(ended(OperationStatus::Succeeded));
                        f
                    };
                    let made = store
                        .record_progress(&Progress {
                            finishes: mine.iter().map(ending).collect(),
                            ..Progress::default()
                        })
                        .await;
                    assert!(
                        made.finishes.iter().all(|f| f.is_ok()),
                        "{:?}",
                        made.finishes
                    );
                }
                store.close().await;
            }));
        }
        for worker in workers {
            worker.await.unwrap();
        }
        let claims = claims.lock().unwrap().clone();
        assert_eq!(claims.len(), SUBJECTS * PER_SUBJECT, "{claims:?}");
        assert_claimed_in_order(claims.iter().map(String::as_str), SUBJECTS, PER_SUBJECT);
        for id in &claims {
            let op = store.get_operation(id).await.unwrap().unwrap();
            assert_eq!(op.status, OperationStatus::Succeeded, "{id}");
        }
        store.close().await;
        drop(db);
    }

    /// Several worker processes (a pool each) claiming at once: every operation is claimed
    /// exactly once, one at a time per subject and in order, and no claim fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_workers_never_share_an_operation() {
        let (db, store) = fresh().await;
        const SUBJECTS: usize = 6;
        const PER_SUBJECT: usize = 5;
        for n in 0..PER_SUBJECT {
            for s in 0..SUBJECTS {
                let id = format!("op_{s}_{n}");
                let op = new_op(&id, &format!("prj_{s}"), json!({ "n": n }));
                store
                    .create_operation(&op, (n * SUBJECTS + s) as i64)
                    .await
                    .unwrap();
            }
        }
        let claims = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
        let running = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
        let mut workers = Vec::new();
        for w in 0..8 {
            let url = db.url();
            let claims = claims.clone();
            let running = running.clone();
            workers.push(tokio::spawn(async move {
                let store = PostgresStore::connect(&url).await.unwrap();
                let owner = format!("w{w}");
                let mut idle = 0;
                while idle < 20 {
                    let Some(op) = store.claim(&claim(&owner, 1_000, &[])).await.unwrap() else {
                        idle += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    idle = 0;
                    assert!(
                        running.lock().unwrap().insert(op.subject_id.clone()),
                        "two operations running on {}",
                        op.subject_id
                    );
                    claims.lock().unwrap().push((op.id.clone(), owner.clone()));
                    store.start_task(&op.id, &owner, 0, 1_001).await.unwrap();
                    tokio::task::yield_now().await;
                    running.lock().unwrap().remove(&op.subject_id);
                    succeed(&store, &op.id, &owner, 1_002).await;
                }
                store.close().await;
            }));
        }
        for worker in workers {
            worker.await.unwrap();
        }
        let claims = claims.lock().unwrap().clone();
        assert_eq!(claims.len(), SUBJECTS * PER_SUBJECT, "{claims:?}");
        let mut seen = std::collections::HashSet::new();
        for (id, _) in &claims {
            assert!(seen.insert(id.clone()), "{id} claimed twice");
        }
        assert_claimed_in_order(
            claims.iter().map(|(id, _)| id.as_str()),
            SUBJECTS,
            PER_SUBJECT,
        );
        store.close().await;
        drop(db);
    }

    /// The same calls on both backends leave identical records, state merges included.
    #[tokio::test]
    async fn records_match_sqlite() {
        let (db, pg) = fresh().await;
        let dir = tempfile::tempdir().unwrap();
        let lite = SqliteStore::connect(&dir.path().join("state.db").to_string_lossy())
            .await
            .unwrap();
        let mut ends = Vec::new();
        for store in [&pg as &dyn Store, &lite as &dyn Store] {
            let created = store
                .create_operation(&new_op("op_m", "prj_m", json!({"ref": "main"})), 1)
                .await
                .unwrap();
            store.claim(&claim("w", 2, &[])).await.unwrap().unwrap();
            store.start_task("op_m", "w", 0, 3).await.unwrap();
            let patch = json!({"build": {"dir": "/b", "keep": 1}, "gone": "soon", "n": [1]});
            let done = TaskOutcome {
                status: TaskStatus::Succeeded,
                state_patch: Some(patch),
            };
            store
                .finish_task("op_m", "w", 0, &done, None, 4)
                .await
                .unwrap();
            let skipped = TaskOutcome {
                status: TaskStatus::Skipped,
                state_patch: Some(json!({"build": {"keep": null, "more": true}, "gone": null})),
            };
            store
                .finish_task("op_m", "w", 1, &skipped, None, 5)
                .await
                .unwrap();
            store
                .begin_rollback(
                    "op_m",
                    "w",
                    &["discard_build"],
                    &json!({"_ending": {"status": "failed", "error": null}}),
                )
                .await
                .unwrap();
            let failed = OperationOutcome {
                status: OperationStatus::Failed,
                result: json!({"why": "x"}),
                error: Some("boom".into()),
            };
            store
                .finish_operation("op_m", "w", &failed, 6)
                .await
                .unwrap();
            let ended = store.get_operation("op_m").await.unwrap().unwrap();
            assert_eq!(
                ended.state,
                json!({"build": {"dir": "/b", "more": true}, "n": [1], "_ending": {"status": "failed"}})
            );
            let retried = store.retry_operation("op_m", false, 7).await.unwrap();
            let listed = store
                .list_operations(
                    &OperationFilter {
                        subject: Some("prj_m".into()),
                        ..Default::default()
                    },
                    &Page {
                        limit: 10,
                        cursor: None,
                    },
                )
                .await
                .unwrap()
                .items;
            ends.push((created, ended, retried, listed));
        }
        assert_eq!(ends[0], ends[1]);
        pg.close().await;
        drop(db);
    }

    /// Two operations with the same key: the second is refused on create and on retry.
    #[tokio::test]
    async fn retry_into_an_active_duplicate_is_refused() {
        let (db, store) = fresh().await;
        store
            .create_operation(&new_op("op_r1", "prj_r", json!({})), 1)
            .await
            .unwrap();
        store.request_cancel("op_r1", 2).await.unwrap();
        store
            .create_operation(&new_op("op_r2", "prj_r", json!({})), 3)
            .await
            .unwrap();
        match store.retry_operation("op_r1", false, 4).await {
            Err(StoreError::Duplicate { existing }) => assert_eq!(existing, "op_r2"),
            other => panic!("{other:?}"),
        }
        let op = store.get_operation("op_r1").await.unwrap().unwrap();
        assert_eq!(op.status, OperationStatus::Cancelled, "nothing changed");
        assert_eq!(op.attempt, 1);
        match store
            .create_operation(&new_op("op_r2", "prj_other", json!({})), 5)
            .await
        {
            Err(StoreError::Conflict(msg)) => assert!(msg.contains("operations_pkey"), "{msg}"),
            other => panic!("{other:?}"),
        }
        store.close().await;
        drop(db);
    }

    /// PostgreSQL text cannot hold NUL: such a log line is kept, with U+FFFD instead.
    #[tokio::test]
    async fn log_lines_with_nul_are_kept() {
        let (db, store) = fresh().await;
        let line = NewLogLine {
            attempt: 1,
            at: 1,
            task: "t".into(),
            stream: "stdout".into(),
            text: "a\0b".into(),
        };
        store.append_logs("op_x", &[line]).await.unwrap();
        let read = store.read_logs("op_x", 0, 10).await.unwrap();
        assert_eq!(read[0].text, "a\u{FFFD}b");
        store.close().await;
        drop(db);
    }

    /// A test that fails still drops its database.
    #[tokio::test]
    async fn a_failed_test_still_drops_its_database() {
        let name = Arc::new(Mutex::new(String::new()));
        let seen = name.clone();
        let failed = tokio::spawn(async move {
            let (db, _store) = fresh().await;
            *seen.lock().unwrap() = db.name.clone();
            panic!("failing on purpose");
        })
        .await;
        assert!(failed.is_err());
        let name = name.lock().unwrap().clone();
        let mut admin = admin().await;
        let left: Option<String> =
            sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname = $1")
                .bind(&name)
                .fetch_optional(&mut admin)
                .await
                .unwrap();
        assert_eq!(left, None, "{name} was left behind");
        admin.close().await.unwrap();
    }

    /// `connect` picks the backend from the URL.
    #[tokio::test]
    async fn connect_chooses_by_scheme() {
        let db = TestDb::create().await;
        let pg = crate::connect_unsealed(&db.url()).await.unwrap();
        pg.set_setting("k", "v").await.unwrap();
        assert_eq!(pg.get_setting("k").await.unwrap().as_deref(), Some("v"));
        drop(pg);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.db");
        let lite = crate::connect_unsealed(&path.to_string_lossy())
            .await
            .unwrap();
        lite.set_setting("k", "1").await.unwrap();
        drop(lite);
        let url = format!("sqlite://{}", path.display());
        let lite = crate::connect_unsealed(&url).await.unwrap();
        assert_eq!(lite.get_setting("k").await.unwrap().as_deref(), Some("1"));

        match crate::connect_unsealed("mysql://root:secret@db/hefring").await {
            Err(StoreError::Unsupported(msg)) => {
                assert!(msg.contains("\"mysql\""), "{msg}");
                assert!(!msg.contains("secret"), "{msg}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("mysql accepted"),
        }
        drop(db);
    }
}
