//! Task handlers: one function per (operation kind, task name). Each must be safe to run
//! again after a crash part-way through it.

mod git;
mod project;
mod release;
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
        (K::SystemNoop, "noop") => Ok(TaskOutput::done()),
        (kind, task) => Err(TaskError(format!("{kind} has no task named {task}"))),
    }
}

/// Called once an operation has failed or been cancelled, after its rollback tasks, so the
/// subject's status tells the truth.
pub async fn after_failure(t: &TaskContext<'_>, error: &str) {
    let outcome = match t.op.kind {
        OperationKind::ReleaseBuild => release::mark_failed(t).await,
        _ => Ok(()),
    };
    if let Err(e) = outcome {
        t.log
            .info(format!("could not record the failure ({error}): {e}"));
    }
}
