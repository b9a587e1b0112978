//! `target_verify` and `target_delete`.

use hefring_backend_server::{inspect, CommandSpec, SshExecutor};
use hefring_core::target::{self, Host};
use hefring_store::TargetRecord;
use serde_json::json;

use crate::run::{run_captured, TaskContext, TaskError, TaskOutput, TaskResult};
use crate::time::now_ms;

async fn load(t: &TaskContext<'_>) -> Result<TargetRecord, TaskError> {
    t.ctx
        .store
        .get_target(&t.op.subject_id)
        .await?
        .ok_or_else(|| TaskError::new("the target no longer exists"))
}

async fn save(
    t: &TaskContext<'_>,
    mut target: TargetRecord,
    status: &str,
) -> Result<(), TaskError> {
    target.status = status.into();
    target.updated_at = now_ms();
    t.ctx.store.update_target(&target).await?;
    Ok(())
}

pub async fn connect(t: &TaskContext<'_>) -> TaskResult {
    let mut target = load(t).await?;
    let exec = t.ctx.executor_for(&target)?;
    t.log.info(format!("connecting to {}", target.host));
    let probe = CommandSpec::new(["sh", "-c", "echo \"connected as $(id -un) on $(uname -n)\""]);
    let (code, out) = run_captured(exec.as_ref(), &probe, t.log).await?;
    if code != Some(0) {
        save(t, target.clone(), "unreachable").await?;
        return Err(TaskError(format!(
            "cannot reach {} (exit status {})",
            target.host,
            code.map_or("none".into(), |c| c.to_string())
        )));
    }
    t.log.info(out.trim());
    if let Host::Ssh { user, host, port } =
        Host::parse("host", &target.host).map_err(|e| TaskError(e.to_string()))?
    {
        if target.host_key.is_none() {
            let ssh = SshExecutor {
                user,
                host,
                port,
                key: t.ctx.ssh_key.clone(),
                known_hosts: t
                    .ctx
                    .data_dir
                    .join("ssh")
                    .join("known_hosts.d")
                    .join(&target.id),
                pinned_host_key: None,
            };
            let key = ssh
                .recorded_host_key()
                .await
                .ok_or_else(|| TaskError::new("the host key was not recorded"))?;
            t.log.info(format!("pinned the host key {key}"));
            target.host_key = Some(key);
            save(t, target.clone(), &target.status.clone()).await?;
        }
    }
    Ok(TaskOutput::done())
}

pub async fn inspect_system(t: &TaskContext<'_>) -> TaskResult {
    let mut target = load(t).await?;
    let exec = t.ctx.executor_for(&target)?;
    let (code, out) = run_captured(exec.as_ref(), &inspect::command(), t.log).await?;
    if code != Some(0) {
        save(t, target, "unreachable").await?;
        return Err(TaskError::new("the inspection script failed on the target"));
    }
    let found = inspect::parse(&out);
    t.log.info(format!("os: {}", found.os));
    t.log.info(format!("kernel: {}", found.kernel));
    for (tool, path) in &found.tools {
        match path {
            Some(path) => t.log.info(format!("found {tool} at {path}")),
            None => t.log.info(format!("missing {tool}")),
        }
    }
    for (service, up) in &found.services {
        t.log.info(format!(
            "service {service}: {}",
            if *up { "up" } else { "down" }
        ));
    }
    let mut missing = target::missing_requirements(&found);
    // Each environment is its own Unix user, which only root can make.
    let (code, uid) = run_captured(exec.as_ref(), &CommandSpec::new(["id", "-u"]), t.log).await?;
    let is_root = code == Some(0) && uid.trim() == "0";
    let isolation = if is_root {
        t.log.info(
            "isolation: possible (Hefring is root there: each environment gets its own user)",
        );
        "possible"
    } else {
        match target.settings.isolation {
            hefring_core::target::Isolation::Required => {
                t.log.info(
                    "isolation: impossible, Hefring is not root there, and the target requires it: deploys will be refused",
                );
                missing.push("root (isolation is required: each environment needs its own user)".into());
            }
            hefring_core::target::Isolation::Optional => t.log.info(
                "isolation: impossible, Hefring is not root there: every site would run as Hefring's own user and could read the others' (isolation: optional)",
            ),
        }
        "impossible"
    };
    // Hefring's own servers on the target (started by the first deploy), by their pid files.
    let layout = hefring_core::environment::Layout::new(target.root.clone());
    let (code, out) = run_captured(
        exec.as_ref(),
        &CommandSpec::new([
            "sh",
            "-c",
            r#"for f in "$@"; do pid=$(cat "$f" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo running || echo stopped; done"#,
            "sh",
            &format!("{}/nginx.pid", layout.nginx_dir()),
            &format!("{}/php-fpm.pid", layout.fpm_dir()),
        ]),
        t.log,
    )
    .await?;
    let states: Vec<&str> = if code == Some(0) {
        out.lines().collect()
    } else {
        Vec::new()
    };
    let nginx_state = if target.settings.system_nginx.is_some() {
        "system"
    } else {
        states.first().copied().unwrap_or("unknown")
    };
    let fpm_state = states.get(1).copied().unwrap_or("unknown");
    t.log.info(format!(
        "Hefring's nginx: {nginx_state}; Hefring's PHP-FPM: {fpm_state} (started by the first deploy)"
    ));
    target.inspection = Some(json!({
        "servers": {"nginx": nginx_state, "php-fpm": fpm_state},
        "os": found.os,
        "kernel": found.kernel,
        "tools": found.tools.iter().map(|(n, p)| (n.clone(), json!(p))).collect::<serde_json::Map<_, _>>(),
        "services": found.services.iter().map(|(n, up)| (n.clone(), json!(up))).collect::<serde_json::Map<_, _>>(),
        "missing": missing,
        "isolation": isolation,
    }));
    if missing.is_empty() {
        save(t, target, "ready").await?;
        Ok(TaskOutput::done())
    } else {
        save(t, target, "failed").await?;
        Err(TaskError(format!(
            "the target lacks what environments need: {}",
            missing.join(", ")
        )))
    }
}

pub async fn remove(t: &TaskContext<'_>) -> TaskResult {
    let environments = t.ctx.store.environments_on_target(&t.op.subject_id).await?;
    if !environments.is_empty() {
        return Err(TaskError(format!(
            "the target still has environments: {}",
            environments.join(", ")
        )));
    }
    t.ctx.store.delete_target(&t.op.subject_id).await?;
    let _ = tokio::fs::remove_file(
        t.ctx
            .data_dir
            .join("ssh")
            .join("known_hosts.d")
            .join(&t.op.subject_id),
    )
    .await;
    t.log.info("target removed");
    Ok(TaskOutput::done())
}
