use axum::extract::State;
use axum::Json;
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
