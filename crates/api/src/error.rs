//! Every error the API answers, with its stable code and HTTP status in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hefring_app::AppError;
use hefring_core::FieldError;
use hefring_store::StoreError;
use hefring_wire::{ErrorBody, ErrorDetail};

#[derive(Debug)]
pub enum ApiError {
    Malformed(String),
    Unauthorized,
    NotFound,
    Invalid(FieldError),
    Conflict {
        message: String,
        field: Option<String>,
    },
    DuplicateOperation {
        existing: String,
    },
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid(FieldError::new(field, message))
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::Conflict {
            message: message.into(),
            field: None,
        }
    }

    fn parts(
        &self,
    ) -> (
        StatusCode,
        &'static str,
        String,
        Option<String>,
        Option<String>,
    ) {
        match self {
            ApiError::Malformed(m) => (
                StatusCode::BAD_REQUEST,
                "malformed_request",
                m.clone(),
                None,
                None,
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API token is required (Authorization: Bearer TOKEN)".into(),
                None,
                None,
            ),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such resource".into(),
                None,
                None,
            ),
            ApiError::Invalid(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                format!("{}: {}", e.field, e.message),
                Some(e.field.clone()),
                None,
            ),
            ApiError::Conflict { message, field } => (
                StatusCode::CONFLICT,
                "conflict",
                message.clone(),
                field.clone(),
                None,
            ),
            ApiError::DuplicateOperation { existing } => (
                StatusCode::CONFLICT,
                "duplicate_operation",
                format!("an identical operation is already queued or running: {existing}"),
                None,
                Some(existing.clone()),
            ),
            ApiError::Internal(m) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                m.clone(),
                None,
                None,
            ),
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Invalid(e)
    }
}

impl From<AppError> for ApiError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::NotFound { .. } => ApiError::NotFound,
            AppError::Invalid(e) => ApiError::Invalid(e),
            AppError::Conflict { field, message } => ApiError::Conflict { message, field },
            AppError::Duplicate { existing, .. } => ApiError::DuplicateOperation { existing },
            AppError::Store(e) => ApiError::from(e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound,
            StoreError::Conflict(message) => {
                let field = message.contains("name").then(|| "name".to_string());
                ApiError::Conflict { message, field }
            }
            StoreError::Duplicate { existing } => ApiError::DuplicateOperation { existing },
            StoreError::InvalidTransition(message) => ApiError::conflict(message),
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::Internal("the server could not complete the request".into())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, field, operation) = self.parts();
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message,
                field,
                operation,
            },
        };
        (status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
