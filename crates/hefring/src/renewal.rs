//! Certificate renewal through the queue: a periodic look at every environment served over
//! HTTPS, queueing `environment_renew_certificate` for those whose certificate ends within the
//! renewal window (or that have none). A renewal already queued or running is not queued
//! twice (the store refuses the duplicate).

use std::sync::Arc;
use std::time::Duration;

use hefring_core::operation::OperationKind;
use hefring_core::render::Https;
use hefring_engine::time::now_ms;
use hefring_queue::Queue;
use hefring_store::{EnvironmentFilter, EnvironmentRecord, NewOperation, Page, Store, StoreError};

/// Whether an environment's certificate is due for renewal at `now`.
pub fn due(env: &EnvironmentRecord, now: i64, window: Duration) -> bool {
    if env.https == Https::Off || !matches!(env.status.as_str(), "active" | "disabled") {
        return false;
    }
    match env.resources["certificate"]["not_after"].as_i64() {
        Some(not_after) => not_after - now <= window.as_millis() as i64,
        None => true,
    }
}

/// Queues the renewals due now; answers how many were queued.
pub async fn queue_due(
    store: &Arc<dyn Store>,
    queue: &Arc<dyn Queue>,
    window: Duration,
) -> Result<usize, StoreError> {
    let now = now_ms();
    let mut queued = 0;
    let mut cursor = None;
    loop {
        let listed = store
            .list_environments(&EnvironmentFilter::default(), &Page { limit: 500, cursor })
            .await?;
        for env in listed.items.iter().filter(|e| due(e, now, window)) {
            let kind = OperationKind::EnvironmentRenewCertificate;
            let mut op =
                NewOperation::planned(kind, &env.id, serde_json::json!({}), "hefring", now);
            op.queue = hefring_api::queue_for(store.as_ref(), kind, &env.id).await?;
            match store.create_operation(&op, now).await {
                Ok(op) => {
                    let _ = queue.publish(&hefring_api::job_for(&op)).await;
                    queued += 1;
                }
                Err(StoreError::Duplicate { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        match listed.next {
            Some(next) => cursor = Some(next),
            None => return Ok(queued),
        }
    }
}

/// Runs [`queue_due`] every `every` until `stopped` turns true.
pub async fn run(
    store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    every: Duration,
    window: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match queue_due(&store, &queue, window).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(count = n, "queued certificate renewals"),
            Err(e) => tracing::warn!(error = %e, "could not look for certificates to renew"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(https: Https, status: &str, not_after: Option<i64>) -> EnvironmentRecord {
        EnvironmentRecord {
            id: "env_1".into(),
            name: "live".into(),
            project_id: "prj_1".into(),
            target_id: "tgt_1".into(),
            release_id: Some("rel_1".into()),
            domain: "a.test".into(),
            aliases: vec![],
            https,
            status: status.into(),
            secrets: hefring_core::Secret::new(json!({})),
            settings: json!({}),
            resources: match not_after {
                Some(t) => json!({"certificate": {"not_after": t}}),
                None => json!({}),
            },
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn renewal_is_due_inside_the_window_only() {
        let day = 86_400_000;
        let window = Duration::from_secs(30 * 86_400);
        assert!(!due(&env(Https::On, "active", Some(60 * day)), 0, window));
        assert!(due(&env(Https::On, "active", Some(29 * day)), 0, window));
        assert!(due(&env(Https::Required, "active", None), 0, window));
        assert!(!due(&env(Https::Off, "active", None), 0, window));
        assert!(!due(&env(Https::On, "deploying", None), 0, window));
        assert!(!due(&env(Https::On, "deleted", Some(0)), 0, window));
    }
}
