use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use hefring_backend_server::LocalCa;
use hefring_wire::{ErrorBody, Health, SshKey};

use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// Whether the server is up. Needs no token.
#[utoipa::path(get, path = "/api/v1/health", tag = "system", security(()), responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// The installation's SSH public key, to put in a target user's `authorized_keys`.
#[utoipa::path(get, path = "/api/v1/ssh-key", tag = "system", responses((status = 200, body = SshKey), (status = 401, body = ErrorBody)))]
pub async fn ssh_key(State(state): State<AppState>) -> ApiResult<Json<SshKey>> {
    let path = state.data_dir.join("ssh").join("id_ed25519.pub");
    let public_key = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("the SSH key is not available: {e}")))?;
    Ok(Json(SshKey {
        public_key: public_key.trim().into(),
    }))
}

/// The root certificate of the installation's local CA, which signs HTTPS certificates when no
/// ACME directory is configured: import it to trust those sites. Made on first use.
#[utoipa::path(get, path = "/api/v1/ca.pem", tag = "system",
    responses((status = 200, description = "PEM certificate", content_type = "application/x-pem-file", body = String), (status = 401, body = ErrorBody)))]
pub async fn ca_certificate(State(state): State<AppState>) -> ApiResult<impl IntoResponse> {
    let pem = LocalCa::new(&state.data_dir)
        .ensure()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem))
}
