//! A foreign Celery message (`send_task("hefring.KIND", kwargs={...})`) as a request: its
//! kwargs are the API request's path id under the subject's name plus the request's body
//! (`{"environment": ID, "backup": ID}` is `POST /environments/ID/restore {"backup": ID}`),
//! and they go through the same function as the API request of that kind.

use hefring_core::operation::OperationKind;
use hefring_core::FieldError;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{App, AppError, AppResult, Origin, Submitted};

/// The field a serde error is about: `missing field `x`` and `unknown field `x`` name it; the
/// path names the rest. `body` when nothing more precise is known.
pub fn field_of(message: &str, path: &str) -> String {
    for marker in ["missing field `", "unknown field `"] {
        if let Some(rest) = message.split(marker).nth(1) {
            if let Some(name) = rest.split('`').next() {
                let at_root = path.is_empty() || path == ".";
                return if at_root {
                    name.to_string()
                } else if path == name || path.ends_with(&format!(".{name}")) {
                    path.to_string()
                } else {
                    format!("{path}.{name}")
                };
            }
        }
    }
    if path.is_empty() || path == "." {
        "body".into()
    } else {
        path.to_string()
    }
}

/// A request body from JSON already parsed, refusals naming the field.
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|err| {
        let path = err.path().to_string();
        let message = err.into_inner().to_string();
        FieldError::new(field_of(&message, &path), message)
    })
}

/// Refuses any field: for kinds whose request has no body.
fn nothing_else(body: &Map<String, Value>) -> AppResult<()> {
    match body.keys().next() {
        Some(field) => Err(AppError::invalid(field, "unknown field")),
        None => Ok(()),
    }
}

impl App {
    /// The request a foreign message makes, checked and stored exactly as the API request of
    /// its kind: the operation takes the message's id (and queue, per `origin`).
    pub async fn from_message(
        &self,
        kind: &str,
        kwargs: &Value,
        origin: &Origin,
    ) -> AppResult<Submitted> {
        let Some(kind) = OperationKind::parse(kind) else {
            return Err(AppError::invalid(
                "task",
                format!("hefring has no operation named {kind}"),
            ));
        };
        let subject_key = kind.subject_type().as_str();
        let Value::Object(mut body) = kwargs.clone() else {
            return Err(AppError::invalid("kwargs", "must be an object"));
        };
        let subject = match body.remove(subject_key) {
            Some(Value::String(subject)) => subject,
            _ => {
                return Err(AppError::invalid(
                    subject_key,
                    format!(
                        "is missing: {kind} needs the {subject_key} id in its kwargs \
                         (kwargs={{\"{subject_key}\": ID}})"
                    ),
                ))
            }
        };
        fn parse<T: DeserializeOwned>(body: Map<String, Value>) -> Result<T, FieldError> {
            from_value(Value::Object(body))
        }
        use OperationKind as K;
        match kind {
            K::TargetVerify => {
                nothing_else(&body)?;
                self.verify_target(&subject, origin).await
            }
            K::TargetDelete => {
                nothing_else(&body)?;
                self.delete_target(&subject, origin).await
            }
            K::ProjectVerify => {
                nothing_else(&body)?;
                self.verify_project(&subject, origin).await
            }
            K::ReleaseBuild => self.build_release(&subject, parse(body)?, origin).await,
            K::ReleaseFleetUpdate => self.fleet_update(&subject, parse(body)?, origin).await,
            K::EnvironmentDeploy => self.deploy(&subject, parse(body)?, origin).await,
            K::EnvironmentUpdate => self.update(&subject, parse(body)?, origin).await,
            K::EnvironmentVerify => {
                nothing_else(&body)?;
                self.verify_environment(&subject, origin).await
            }
            K::EnvironmentDelete => {
                nothing_else(&body)?;
                self.delete_environment(&subject, origin).await
            }
            K::EnvironmentDisable | K::EnvironmentEnable => {
                nothing_else(&body)?;
                self.toggle(&subject, kind, origin).await
            }
            K::EnvironmentLogin => {
                nothing_else(&body)?;
                self.login(&subject, origin).await
            }
            K::EnvironmentRenewCertificate => {
                nothing_else(&body)?;
                self.renew_certificate(&subject, origin).await
            }
            K::EnvironmentBackup => self.backup(&subject, parse(body)?, origin).await,
            K::EnvironmentRestore => self.restore(&subject, parse(body)?, origin).await,
            K::EnvironmentClone => self.clone_environment(&subject, parse(body)?, origin).await,
            K::EnvironmentSync => self.sync(&subject, parse(body)?, origin).await,
            K::EnvironmentMigrate => self.migrate(&subject, parse(body)?, origin).await,
            K::BackupDelete => {
                nothing_else(&body)?;
                self.delete_backup(&subject, origin).await
            }
            // The scheduler's runs, and the move of an environment to its own user queued
            // when Hefring starts: Hefring's own, never asked for.
            K::EnvironmentCron | K::EnvironmentPruneBackups | K::EnvironmentIsolate => {
                Err(AppError::invalid(
                    "task",
                    format!("{kind} is started by Hefring itself, not by a message"),
                ))
            }
            K::SystemNoop => {
                nothing_else(&body)?;
                self.store_operation(kind, &subject, Value::Object(body), origin)
                    .await
            }
        }
    }
}
