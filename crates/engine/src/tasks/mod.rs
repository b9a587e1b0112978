//! Task handlers: one function per (operation kind, task name). Each must be safe to run
//! again after a crash part-way through it.

mod environment;
mod git;
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
        (K::EnvironmentDeploy | K::EnvironmentUpdate, "prepare_target") => {
            environment::prepare_target(t).await
        }
        (K::EnvironmentDeploy, "create_database") => environment::create_database(t).await,
        (K::EnvironmentDeploy, "create_files_directory") => {
            environment::create_files_directory(t).await
        }
        (K::EnvironmentDeploy | K::EnvironmentUpdate, "unpack_release") => {
            environment::unpack_release(t).await
        }
        (K::EnvironmentDeploy | K::EnvironmentRenewCertificate, "obtain_certificate") => {
            environment::obtain_certificate(t).await
        }
        (K::EnvironmentRenewCertificate, "reload_nginx") => environment::reload_nginx(t).await,
        (K::EnvironmentDisable, "disable_site") => environment::set_enabled(t, false).await,
        (K::EnvironmentEnable, "enable_site") => environment::set_enabled(t, true).await,
        (K::EnvironmentLogin, "run_login_command") => environment::run_login_command(t).await,
        (K::EnvironmentDeploy, "write_pool") => environment::write_pool(t).await,
        (K::EnvironmentDeploy, "write_server_block") => environment::write_server_block(t).await,
        (K::EnvironmentDeploy, "run_install_commands") => {
            environment::run_install_commands(t).await
        }
        (K::EnvironmentDeploy | K::EnvironmentUpdate, "switch_release") => {
            environment::switch_release(t).await
        }
        (K::EnvironmentDeploy | K::EnvironmentUpdate | K::EnvironmentVerify, "check_health") => {
            environment::check_health(t).await
        }
        (K::EnvironmentUpdate, "check_preview") => environment::check_preview(t).await,
        (K::EnvironmentUpdate, "dump_database") => environment::dump_database(t).await,
        (K::EnvironmentUpdate, "run_deploy_commands") => environment::run_deploy_commands(t).await,
        (K::EnvironmentUpdate, "prune_releases") => environment::prune_releases(t).await,
        (K::EnvironmentUpdate, "switch_back") => environment::switch_back(t).await,
        (K::EnvironmentVerify, "check_servers") => environment::check_servers(t).await,
        (K::EnvironmentDelete, "remove_server_block") => environment::remove_server_block(t).await,
        (K::EnvironmentDelete, "remove_pool") => environment::remove_pool(t).await,
        (K::EnvironmentDelete, "drop_database") => environment::drop_database(t).await,
        (K::EnvironmentDelete, "remove_files") => environment::remove_files(t).await,
        (K::EnvironmentDelete, "mark_deleted") => environment::mark_deleted(t).await,
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
