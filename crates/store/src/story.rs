//! One storage story, written against the [`Store`] trait so that every backend runs it.

use hefring_core::operation::{OperationKind, OperationStatus, SubjectType, TaskStatus};
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
        targets_page_newest_first
    );
}
