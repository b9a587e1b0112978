//! Hefring over HTTP: the REST API under `/api/v1`, its OpenAPI document (generated from
//! the handlers), operation logs as text or server-sent events, and token authentication.
//! Handlers parse the request, hand it to the application layer (`hefring-app`, where every
//! request rule lives), answer in HTTP terms, and never run work themselves: work is queued
//! for the engine.

mod auth;
mod convert;
mod error;
mod extract;
mod routes;
pub mod scheduler;
mod submit;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use hefring_queue::Queue;
use hefring_store::Store;

pub use auth::{hash_token, new_token};
pub use error::ApiError;
pub use hefring_store::queue_for;
pub use submit::job_for;

/// An operation as the API shows it (for results sent to Celery clients).
pub fn operation_json(op: &hefring_store::OperationRecord) -> serde_json::Value {
    serde_json::to_value(convert::operation(op.clone())).unwrap_or_default()
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    /// Absolute; where the SSH key and the CA live.
    pub data_dir: PathBuf,
    /// Where targets on this machine get their root when none is given: `ROOT/NAME`,
    /// outside the data directory.
    pub targets_root: PathBuf,
    /// Where backup archives are kept (downloads read them from there).
    pub backups: Arc<dyn hefring_objects::ObjectStore>,
    /// The scheduler's clock is driven through `POST /api/v1/scheduler/tick` (tests).
    pub manual_clock: bool,
}

impl AppState {
    /// The application layer every handler's request goes through.
    pub fn app(&self) -> hefring_app::App {
        hefring_app::App::new(self.store.clone(), self.data_dir.clone())
            .with_targets_root(self.targets_root.clone())
    }
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    routes::router(state)
}

/// The OpenAPI document, as served at `/api/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes::openapi()
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
