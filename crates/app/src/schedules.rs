//! An environment's schedules: stored directly (nothing on a target changes).

use hefring_core::schedule::{BackupSchedule, EnvironmentSchedules};
use hefring_core::validate;
use hefring_store::EnvironmentRecord;
use hefring_wire as wire;

use crate::{now_ms, App, AppError, AppResult};

impl App {
    /// Sets the environment's cron override (`null`: the manifest's) and scheduled backups
    /// (`null`: none). A cron schedule fires at most once a minute.
    pub async fn set_schedules(
        &self,
        env: &str,
        body: wire::Schedules,
    ) -> AppResult<EnvironmentRecord> {
        let mut env = self.environment(env).await?;
        if env.status == "deleted" {
            return Err(AppError::conflict("the environment is deleted"));
        }
        let cron = match &body.cron {
            None => None,
            Some(text) => Some(validate::cron_schedule("cron", text)?),
        };
        let backups = match &body.backups {
            None => None,
            Some(b) => {
                let schedule = validate::cron_schedule("backups.schedule", &b.schedule)?;
                if b.keep_daily == 0 && b.keep_weekly == 0 {
                    return Err(AppError::invalid(
                        "backups.keep_daily",
                        "keep at least one daily or one weekly backup",
                    ));
                }
                if b.keep_daily > 3660 || b.keep_weekly > 520 {
                    return Err(AppError::invalid(
                        "backups.keep_daily",
                        "keep at most 3660 daily and 520 weekly backups",
                    ));
                }
                Some(BackupSchedule {
                    schedule,
                    keep_daily: b.keep_daily,
                    keep_weekly: b.keep_weekly,
                })
            }
        };
        let schedules = EnvironmentSchedules { cron, backups };
        let mut settings = env.settings.clone();
        if !settings.is_object() {
            settings = serde_json::json!({});
        }
        let value = serde_json::to_value(&schedules).expect("schedules serialise");
        for field in ["cron", "backups"] {
            match value.get(field) {
                Some(v) => settings[field] = v.clone(),
                None => {
                    settings.as_object_mut().expect("an object").remove(field);
                }
            }
        }
        env.settings = settings;
        env.updated_at = now_ms();
        self.store.update_environment(&env).await?;
        Ok(env)
    }
}
