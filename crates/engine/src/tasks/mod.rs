//! Task handlers: one function per (operation kind, task name). Each must be safe to run
//! again after a crash part-way through it.

mod backup;
mod environment;
mod fleet;
mod git;
mod migrate;
mod project;
mod release;
mod server;
mod target;

use hefring_core::operation::OperationKind;

use crate::run::{TaskContext, TaskError, TaskOutput, TaskResult};

pub async fn run(t: &TaskContext<'_>, task: &str) -> TaskResult {
    use OperationKind as K;
    match (t.op.kind, task) {
        (K::TargetVerify, "connect") => target::connect(t).await,
        (K::TargetVerify, "inspect_system") => target::inspect_system(t).await,
        (K::TargetDelete, "remove_target") => target::remove(t).await,
        (K::ProjectVerify, "fetch_repository") => project::fetch_repository(t).await,
        (K::ProjectVerify, "read_manifest") => project::read_manifest(t).await,
        (K::ReleaseBuild, "resolve_ref") => release::resolve_ref(t).await,
        (K::ReleaseBuild, "check_out") => release::check_out(t).await,
        (K::ReleaseBuild, "run_build_commands") => release::run_build_commands(t).await,
        (K::ReleaseBuild, "pack_artifact") => release::pack_artifact(t).await,
        (K::ReleaseBuild, "discard_build") => release::discard_build(t).await,
        (
            K::EnvironmentDeploy
            | K::EnvironmentUpdate
            | K::EnvironmentClone
            | K::EnvironmentMigrate,
            "prepare_target",
        ) => environment::prepare_target(t).await,
        (K::EnvironmentDeploy | K::EnvironmentClone | K::EnvironmentMigrate, "create_database") => {
            environment::create_database(t).await
        }
        (
            K::EnvironmentDeploy | K::EnvironmentClone | K::EnvironmentMigrate,
            "create_files_directory",
        ) => environment::create_files_directory(t).await,
        (
            K::EnvironmentDeploy
            | K::EnvironmentUpdate
            | K::EnvironmentClone
            | K::EnvironmentMigrate,
            "unpack_release",
        ) => environment::unpack_release(t).await,
        (
            K::EnvironmentDeploy
            | K::EnvironmentRenewCertificate
            | K::EnvironmentClone
            | K::EnvironmentMigrate,
            "obtain_certificate",
        ) => environment::obtain_certificate(t).await,
        (K::EnvironmentRenewCertificate, "reload_nginx") => environment::reload_nginx(t).await,
        (K::EnvironmentDisable, "disable_site") => environment::set_enabled(t, false).await,
        (K::EnvironmentEnable, "enable_site") => environment::set_enabled(t, true).await,
        (K::EnvironmentLogin, "run_login_command") => environment::run_login_command(t).await,
        (K::EnvironmentIsolate, "create_user") => environment::create_user(t).await,
        (K::EnvironmentIsolate, "hand_over_files") => environment::hand_over_files(t).await,
        (
            K::EnvironmentDeploy
            | K::EnvironmentClone
            | K::EnvironmentMigrate
            | K::EnvironmentIsolate,
            "write_pool",
        ) => environment::write_pool(t).await,
        (
            K::EnvironmentDeploy
            | K::EnvironmentClone
            | K::EnvironmentMigrate
            | K::EnvironmentIsolate,
            "write_server_block",
        ) => environment::write_server_block(t).await,
        (K::EnvironmentDeploy, "run_install_commands") => {
            environment::run_install_commands(t).await
        }
        (
            K::EnvironmentDeploy
            | K::EnvironmentUpdate
            | K::EnvironmentClone
            | K::EnvironmentMigrate,
            "switch_release",
        ) => environment::switch_release(t).await,
        (
            K::EnvironmentDeploy
            | K::EnvironmentUpdate
            | K::EnvironmentVerify
            | K::EnvironmentClone
            | K::EnvironmentMigrate
            | K::EnvironmentIsolate,
            "check_health",
        ) => environment::check_health(t).await,
        (K::EnvironmentUpdate, "check_preview") => environment::check_preview(t).await,
        (K::EnvironmentUpdate, "dump_database") => environment::dump_database(t).await,
        (
            K::EnvironmentUpdate
            | K::EnvironmentRestore
            | K::EnvironmentClone
            | K::EnvironmentSync
            | K::EnvironmentMigrate,
            "run_deploy_commands",
        ) => environment::run_deploy_commands(t).await,
        (K::EnvironmentBackup, "dump_database") => backup::dump_database(t).await,
        (K::EnvironmentBackup, "pack_archive") => backup::pack_archive(t).await,
        (K::EnvironmentBackup, "store_archive") => backup::store_archive(t).await,
        (K::EnvironmentBackup, "discard_backup") => backup::discard_backup(t).await,
        (K::BackupDelete, "remove_archive") => backup::remove_archive(t).await,
        (K::EnvironmentPruneBackups, "prune_backups") => backup::prune_backups(t).await,
        (K::EnvironmentMigrate, "take_backup") => migrate::take_backup(t).await,
        (K::EnvironmentMigrate, "switch_target") => migrate::switch_target(t).await,
        (K::EnvironmentMigrate, "remove_old_copy") => migrate::remove_old_copy(t).await,
        (K::EnvironmentMigrate, "remove_new_copy") => migrate::remove_new_copy(t).await,
        (K::EnvironmentCron, "run_cron_command") => environment::run_cron_command(t).await,
        (K::EnvironmentRestore | K::EnvironmentSync, "take_safety_backup") => {
            backup::take_safety_backup(t).await
        }
        (K::EnvironmentClone | K::EnvironmentSync, "take_source_backup") => {
            backup::take_source_backup(t).await
        }
        (K::EnvironmentClone | K::EnvironmentSync, "discard_copy") => backup::discard_copy(t).await,
        (
            K::EnvironmentRestore
            | K::EnvironmentClone
            | K::EnvironmentSync
            | K::EnvironmentMigrate,
            "fetch_backup",
        ) => backup::fetch_backup(t).await,
        (
            K::EnvironmentRestore
            | K::EnvironmentClone
            | K::EnvironmentSync
            | K::EnvironmentMigrate,
            "restore_database",
        ) => backup::restore_database(t).await,
        (
            K::EnvironmentRestore
            | K::EnvironmentClone
            | K::EnvironmentSync
            | K::EnvironmentMigrate,
            "restore_files",
        ) => backup::restore_files(t).await,
        (K::EnvironmentUpdate, "prune_releases") => environment::prune_releases(t).await,
        (K::EnvironmentUpdate, "switch_back") => environment::switch_back(t).await,
        (K::EnvironmentVerify, "check_servers") => environment::check_servers(t).await,
        (K::EnvironmentDelete, "remove_server_block") => environment::remove_server_block(t).await,
        (K::EnvironmentDelete, "remove_pool") => environment::remove_pool(t).await,
        (K::EnvironmentDelete, "drop_database") => environment::drop_database(t).await,
        (K::EnvironmentDelete, "remove_files") => environment::remove_files(t).await,
        (K::EnvironmentDelete, "mark_deleted") => environment::mark_deleted(t).await,
        (K::ReleaseFleetUpdate, "update_canary") => fleet::update_canary(t).await,
        (K::ReleaseFleetUpdate, "update_rest") => fleet::update_rest(t).await,
        (K::ReleaseFleetUpdate, "report_results") => fleet::report_results(t).await,
        (K::ReleaseFleetUpdate, "cancel_children") => fleet::cancel_children(t).await,
        (K::SystemNoop, "noop") => Ok(TaskOutput::done()),
        (kind, task) => Err(TaskError(format!("{kind} has no task named {task}"))),
    }
}

/// Called once an operation has failed or been cancelled, after its rollback tasks, so the
/// subject's status tells the truth.
pub async fn after_failure(t: &TaskContext<'_>, error: &str) {
    let outcome = match t.op.kind {
        OperationKind::ReleaseBuild => release::mark_failed(t).await,
        OperationKind::EnvironmentDeploy
        | OperationKind::EnvironmentUpdate
        | OperationKind::EnvironmentDelete
        | OperationKind::EnvironmentVerify
        | OperationKind::EnvironmentRenewCertificate => environment::mark_failed(t).await,
        // The clone's new environment did not come to serve; the unpacked archive goes.
        OperationKind::EnvironmentClone => {
            let cleaned = backup::clean_up_restore(t).await;
            environment::mark_failed(t).await.and(cleaned)
        }
        // The environment serves what it served (a restore or sync that failed before it
        // replaced anything changed nothing; one that failed after says so in its log, and
        // its safety backup holds what was there).
        OperationKind::EnvironmentRestore | OperationKind::EnvironmentSync => {
            backup::clean_up_restore(t).await
        }
        // Back to active where it was (or, after the switch, where it went).
        OperationKind::EnvironmentMigrate => environment::mark_failed(t).await,
        // A disable or enable that failed changed nothing the site serves.
        OperationKind::EnvironmentDisable
        | OperationKind::EnvironmentEnable
        | OperationKind::EnvironmentLogin => Ok(()),
        _ => Ok(()),
    };
    if let Err(e) = outcome {
        t.log
            .info(format!("could not record the failure ({error}): {e}"));
    }
}
