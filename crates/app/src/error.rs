//! Why a request was refused, as data: the API turns it into a status and a code, the worker's
//! intake into a Celery `FAILURE` naming the field.

use hefring_core::FieldError;
use hefring_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The entity the request is about does not exist (the API's 404); `field` is its name in
    /// a message's kwargs (`environment`, `project`, ...).
    #[error("{field}: no {field} has this id")]
    NotFound { field: String },
    /// A field's value is refused (the API's 422 `invalid_field`).
    #[error("{0}")]
    Invalid(FieldError),
    /// The entity's state does not allow the request (the API's 409 `conflict`).
    #[error("{message}")]
    Conflict {
        field: Option<String>,
        message: String,
    },
    /// Another operation is queued or running: `identical` when it is the same kind with the
    /// same inputs (a client may follow it), otherwise one that excludes this one.
    #[error("operation {existing} is already queued or running")]
    Duplicate { existing: String, identical: bool },
    /// The store failed; nothing about the request itself.
    #[error("the store: {0}")]
    Store(StoreError),
}

pub type AppResult<T> = Result<T, AppError>;

impl AppError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        AppError::Invalid(FieldError::new(field, message))
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        AppError::Conflict {
            field: None,
            message: message.into(),
        }
    }

    pub(crate) fn not_found(field: &str) -> Self {
        AppError::NotFound {
            field: field.to_string(),
        }
    }

    /// The field the refusal is about; `subject` (the kwargs key of the request's subject)
    /// when it is about the subject's state.
    pub fn field<'a>(&'a self, subject: &'a str) -> &'a str {
        match self {
            AppError::NotFound { field } => field,
            AppError::Invalid(e) => &e.field,
            AppError::Conflict { field, .. } => field.as_deref().unwrap_or(subject),
            AppError::Duplicate { .. } | AppError::Store(_) => subject,
        }
    }

    /// The refusal in words that name the field, `FIELD: why`, for a client without HTTP
    /// status codes (a Celery `FAILURE`).
    pub fn describe(&self, subject: &str) -> String {
        match self {
            AppError::Invalid(e) => e.to_string(),
            AppError::NotFound { .. } => self.to_string(),
            other => format!("{}: {other}", other.field(subject)),
        }
    }
}

impl From<FieldError> for AppError {
    fn from(e: FieldError) -> Self {
        AppError::Invalid(e)
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => AppError::not_found("id"),
            StoreError::Conflict(message) => AppError::Conflict {
                field: message.contains("name").then(|| "name".to_string()),
                message,
            },
            StoreError::Duplicate { existing } => AppError::Duplicate {
                existing,
                identical: true,
            },
            StoreError::InvalidTransition(message) => AppError::conflict(message),
            other => AppError::Store(other),
        }
    }
}
