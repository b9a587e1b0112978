//! Operations and their tasks: which kinds exist, how each expands into ordered, named tasks,
//! and the state machines of operation and task statuses.

use serde::{Deserialize, Serialize};

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// What an operation acts on. Two operations on one subject never run at once.
    SubjectType {
        Target => "target",
        Project => "project",
        Release => "release",
        Environment => "environment",
        Backup => "backup",
        System => "system",
    }
);

string_enum!(
    /// One user-visible action, named `<subject>_<action>`.
    OperationKind {
        TargetVerify => "target_verify",
        TargetDelete => "target_delete",
        ProjectVerify => "project_verify",
        ReleaseBuild => "release_build",
        EnvironmentDeploy => "environment_deploy",
        EnvironmentUpdate => "environment_update",
        EnvironmentDelete => "environment_delete",
        EnvironmentVerify => "environment_verify",
        EnvironmentRenewCertificate => "environment_renew_certificate",
        EnvironmentDisable => "environment_disable",
        EnvironmentEnable => "environment_enable",
        EnvironmentLogin => "environment_login",
        EnvironmentBackup => "environment_backup",
        EnvironmentRestore => "environment_restore",
        EnvironmentClone => "environment_clone",
        EnvironmentSync => "environment_sync",
        EnvironmentMigrate => "environment_migrate",
        EnvironmentCron => "environment_cron",
        EnvironmentPruneBackups => "environment_prune_backups",
        EnvironmentIsolate => "environment_isolate",
        BackupDelete => "backup_delete",
        ReleaseFleetUpdate => "release_fleet_update",
        SystemNoop => "system_noop",
    }
);

string_enum!(
    OperationStatus {
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

string_enum!(
    TaskStatus {
        Pending => "pending",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Skipped => "skipped",
        Cancelled => "cancelled",
    }
);

impl OperationKind {
    /// The type of entity this kind of operation is queued against.
    ///
    /// A release build is serialised per project, not per release: builds of one project
    /// share the project's git mirror, and the release row only exists once the ref is
    /// resolved to a commit.
    pub fn subject_type(self) -> SubjectType {
        match self {
            OperationKind::TargetVerify | OperationKind::TargetDelete => SubjectType::Target,
            OperationKind::ProjectVerify | OperationKind::ReleaseBuild => SubjectType::Project,
            OperationKind::EnvironmentDeploy
            | OperationKind::EnvironmentUpdate
            | OperationKind::EnvironmentDelete
            | OperationKind::EnvironmentVerify
            | OperationKind::EnvironmentRenewCertificate
            | OperationKind::EnvironmentDisable
            | OperationKind::EnvironmentEnable
            | OperationKind::EnvironmentLogin
            | OperationKind::EnvironmentBackup
            | OperationKind::EnvironmentRestore
            | OperationKind::EnvironmentClone
            | OperationKind::EnvironmentSync
            | OperationKind::EnvironmentMigrate
            | OperationKind::EnvironmentCron
            | OperationKind::EnvironmentPruneBackups
            | OperationKind::EnvironmentIsolate => SubjectType::Environment,
            OperationKind::BackupDelete => SubjectType::Backup,
            // Serialised per release it updates from: two fleet updates of one release never
            // run at once.
            OperationKind::ReleaseFleetUpdate => SubjectType::Release,
            OperationKind::SystemNoop => SubjectType::System,
        }
    }

    /// The ordered tasks an operation of this kind runs. Each must be safe to run again
    /// after a crash part-way through it.
    pub fn tasks(self) -> &'static [&'static str] {
        match self {
            OperationKind::TargetVerify => &["connect", "inspect_system"],
            OperationKind::TargetDelete => &["remove_target"],
            OperationKind::ProjectVerify => &["fetch_repository", "read_manifest"],
            OperationKind::ReleaseBuild => &[
                "resolve_ref",
                "check_out",
                "run_build_commands",
                "pack_artifact",
            ],
            OperationKind::EnvironmentDeploy => &[
                "prepare_target",
                "create_database",
                "create_files_directory",
                "unpack_release",
                "obtain_certificate",
                "write_pool",
                "write_server_block",
                "run_install_commands",
                "switch_release",
                "check_health",
            ],
            // The new release is checked through a preview server block before anything the
            // site serves changes; the safety dump comes before the deploy commands touch
            // the database.
            OperationKind::EnvironmentUpdate => &[
                "prepare_target",
                "unpack_release",
                "check_preview",
                "dump_database",
                "switch_release",
                "run_deploy_commands",
                "check_health",
                "prune_releases",
            ],
            OperationKind::EnvironmentDelete => &[
                "remove_server_block",
                "remove_pool",
                "drop_database",
                "remove_files",
                "mark_deleted",
            ],
            OperationKind::EnvironmentVerify => &["check_servers", "check_health"],
            OperationKind::EnvironmentRenewCertificate => &["obtain_certificate", "reload_nginx"],
            // The site answers every path with the "site disabled" page (503), or serves again;
            // nothing else changes.
            OperationKind::EnvironmentDisable => &["disable_site"],
            OperationKind::EnvironmentEnable => &["enable_site"],
            OperationKind::EnvironmentLogin => &["run_login_command"],
            // A consistent dump checked against the database's catalog, then one archive with
            // the dump, the persistent files and a manifest of their SHA-256, into the store.
            OperationKind::EnvironmentBackup => &["dump_database", "pack_archive", "store_archive"],
            // Nothing is overwritten before a safety backup of what is there exists.
            OperationKind::EnvironmentRestore => &[
                "take_safety_backup",
                "fetch_backup",
                "restore_database",
                "restore_files",
                "run_deploy_commands",
            ],
            // The subject is the new environment: a deploy of the source's release, with a
            // fresh backup of the source restored into it before it is switched on. That
            // backup only carries the data across: once it is in, its archive goes (clones
            // and nightly syncs would otherwise fill the backup store with copies).
            OperationKind::EnvironmentClone => &[
                "take_source_backup",
                "prepare_target",
                "create_database",
                "create_files_directory",
                "unpack_release",
                "obtain_certificate",
                "write_pool",
                "write_server_block",
                "fetch_backup",
                "restore_database",
                "restore_files",
                "run_deploy_commands",
                "switch_release",
                "check_health",
                "discard_copy",
            ],
            OperationKind::EnvironmentSync => &[
                "take_source_backup",
                "take_safety_backup",
                "fetch_backup",
                "restore_database",
                "restore_files",
                "run_deploy_commands",
                "discard_copy",
            ],
            // A copy on the new target, from a fresh backup, checked before the record
            // switches; the old copy goes last.
            OperationKind::EnvironmentMigrate => &[
                "take_backup",
                "prepare_target",
                "create_database",
                "create_files_directory",
                "unpack_release",
                "obtain_certificate",
                "write_pool",
                "write_server_block",
                "fetch_backup",
                "restore_database",
                "restore_files",
                "run_deploy_commands",
                "switch_release",
                "check_health",
                "switch_target",
                "remove_old_copy",
            ],
            OperationKind::EnvironmentCron => &["run_cron_command"],
            OperationKind::EnvironmentPruneBackups => &["prune_backups"],
            // An environment deployed before isolation moves to its own user: queued once per
            // such environment when an upgraded Hefring starts.
            OperationKind::EnvironmentIsolate => &[
                "create_user",
                "hand_over_files",
                "write_pool",
                "write_server_block",
                "check_health",
            ],
            OperationKind::BackupDelete => &["remove_archive"],
            // A canary first, alone: its failure stops everything. Then the rest, a bounded
            // number at a time, each a child operation of its own.
            // It succeeds only when every child did: `report_results` fails it otherwise, once
            // the per-environment results are recorded.
            OperationKind::ReleaseFleetUpdate => {
                &["update_canary", "update_rest", "report_results"]
            }
            OperationKind::SystemNoop => &["noop"],
        }
    }

    /// Steps that undo a failed or cancelled attempt; they are appended as tasks when needed.
    pub fn rollback_tasks(self) -> &'static [&'static str] {
        match self {
            OperationKind::ReleaseBuild => &["discard_build"],
            // Back to the release that served before, with the database as it was if the
            // deploy commands had run.
            OperationKind::EnvironmentUpdate => &["switch_back"],
            // A backup that failed leaves no staging files and is marked failed.
            OperationKind::EnvironmentBackup => &["discard_backup"],
            // The copy made on the new target goes; the environment serves where it was.
            OperationKind::EnvironmentMigrate => &["remove_new_copy"],
            // Children still queued or running are cancelled with their parent.
            OperationKind::ReleaseFleetUpdate => &["cancel_children"],
            _ => &[],
        }
    }
}

impl OperationStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            OperationStatus::Succeeded | OperationStatus::Failed | OperationStatus::Cancelled
        )
    }

    /// Queued or running: what the duplicate guard and the per-subject guard look at.
    pub fn is_active(self) -> bool {
        !self.is_terminal()
    }
}

impl TaskStatus {
    /// A task that needs no further run when an operation resumes.
    pub fn is_done(self) -> bool {
        matches!(self, TaskStatus::Succeeded | TaskStatus::Skipped)
    }
}

/// What can happen to an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationEvent {
    /// A worker takes it (or takes it over after a lease expired).
    Claim,
    Succeed,
    Fail,
    Cancel,
    Retry,
}

/// Why an event does not apply: the API answers 409 `conflict` with this message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("an operation that is {from} cannot be {action}")]
pub struct InvalidTransition {
    pub from: OperationStatus,
    pub action: &'static str,
}

/// The operation state machine.
pub fn transition(
    from: OperationStatus,
    event: OperationEvent,
) -> Result<OperationStatus, InvalidTransition> {
    use OperationEvent as E;
    use OperationStatus as S;
    let to = match (from, event) {
        (S::Queued, E::Claim) | (S::Running, E::Claim) => S::Running,
        (S::Running, E::Succeed) => S::Succeeded,
        (S::Running, E::Fail) => S::Failed,
        (S::Queued, E::Cancel) | (S::Running, E::Cancel) => S::Cancelled,
        (S::Failed, E::Retry) | (S::Cancelled, E::Retry) => S::Queued,
        _ => {
            let action = match event {
                E::Claim => "claimed",
                E::Succeed => "marked succeeded",
                E::Fail => "marked failed",
                E::Cancel => "cancelled",
                E::Retry => "retried",
            };
            return Err(InvalidTransition { from, action });
        }
    };
    Ok(to)
}

/// The task statuses a retry starts from: finished tasks stay finished (so they do not run
/// again) unless `from_start`; everything else runs again.
pub fn statuses_for_retry(tasks: &[TaskStatus], from_start: bool) -> Vec<TaskStatus> {
    tasks
        .iter()
        .map(|&s| {
            if !from_start && s.is_done() {
                s
            } else {
                TaskStatus::Pending
            }
        })
        .collect()
}

/// The first task that still has to run, if any.
pub fn next_task(tasks: &[TaskStatus]) -> Option<usize> {
    tasks.iter().position(|s| !s.is_done())
}

/// Task statuses once an operation is cancelled: what never ran, or was cut off, is cancelled.
pub fn statuses_for_cancel(tasks: &[TaskStatus]) -> Vec<TaskStatus> {
    tasks
        .iter()
        .map(|&s| match s {
            TaskStatus::Pending | TaskStatus::Running => TaskStatus::Cancelled,
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_kind_has_tasks_and_a_snake_case_name() {
        for kind in OperationKind::ALL {
            assert!(!kind.tasks().is_empty(), "{kind}");
            assert!(
                kind.as_str().starts_with(kind.subject_type().as_str())
                    || *kind == OperationKind::ReleaseBuild
            );
            assert_eq!(OperationKind::parse(kind.as_str()), Some(*kind));
        }
    }

    #[test]
    fn the_happy_path_and_retry() {
        use OperationEvent as E;
        use OperationStatus as S;
        let mut s = S::Queued;
        for (event, expected) in [
            (E::Claim, S::Running),
            (E::Fail, S::Failed),
            (E::Retry, S::Queued),
            (E::Claim, S::Running),
            (E::Succeed, S::Succeeded),
        ] {
            s = transition(s, event).unwrap();
            assert_eq!(s, expected);
        }
        assert!(transition(S::Succeeded, E::Retry).is_err());
        assert!(transition(S::Succeeded, E::Cancel).is_err());
        assert!(transition(S::Queued, E::Retry).is_err());
    }

    fn any_status() -> impl Strategy<Value = OperationStatus> {
        proptest::sample::select(OperationStatus::ALL.to_vec())
    }
    fn any_event() -> impl Strategy<Value = OperationEvent> {
        use OperationEvent as E;
        proptest::sample::select(vec![E::Claim, E::Succeed, E::Fail, E::Cancel, E::Retry])
    }
    fn any_task_status() -> impl Strategy<Value = TaskStatus> {
        proptest::sample::select(TaskStatus::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn succeeded_is_final_and_only_terminal_states_retry(from in any_status(), event in any_event()) {
            match transition(from, event) {
                Ok(to) => {
                    prop_assert_ne!(from, OperationStatus::Succeeded);
                    if event == OperationEvent::Retry {
                        prop_assert!(from.is_terminal());
                        prop_assert_eq!(to, OperationStatus::Queued);
                    }
                    if event == OperationEvent::Claim {
                        prop_assert!(from.is_active());
                    }
                }
                Err(e) => prop_assert_eq!(e.from, from),
            }
        }

        #[test]
        fn walks_never_leave_the_machine(events in proptest::collection::vec(any_event(), 0..30)) {
            let mut s = OperationStatus::Queued;
            for e in events {
                if let Ok(next) = transition(s, e) { s = next; }
            }
            prop_assert!(OperationStatus::ALL.contains(&s));
        }

        #[test]
        fn retry_keeps_finished_tasks_and_reruns_the_rest(tasks in proptest::collection::vec(any_task_status(), 0..12), from_start: bool) {
            let after = statuses_for_retry(&tasks, from_start);
            prop_assert_eq!(after.len(), tasks.len());
            for (before, now) in tasks.iter().zip(&after) {
                if from_start || !before.is_done() {
                    prop_assert_eq!(*now, TaskStatus::Pending);
                } else {
                    prop_assert_eq!(now, before);
                }
            }
            let first = next_task(&after);
            prop_assert_eq!(first, after.iter().position(|s| *s == TaskStatus::Pending));
        }

        #[test]
        fn cancel_leaves_nothing_pending_or_running(tasks in proptest::collection::vec(any_task_status(), 0..12)) {
            let after = statuses_for_cancel(&tasks);
            prop_assert!(after.iter().all(|s| !matches!(s, TaskStatus::Pending | TaskStatus::Running)));
            prop_assert_eq!(next_task(&after).is_none(), after.iter().all(|s| s.is_done()));
        }
    }
}
