//! Store records to wire types.

use hefring_core::environment;
use hefring_store::{
    EnvironmentRecord, OperationRecord, ProjectRecord, ReleaseRecord, TargetRecord,
};
use hefring_wire as wire;

/// RFC 3339 in UTC with exactly three fraction digits, so log lines align.
pub fn timestamp(ms: i64) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_default()
}

pub fn target(t: TargetRecord) -> wire::Target {
    let queue = if t.settings.own_queue {
        hefring_core::target::target_queue(&t.id)
    } else {
        hefring_store::DEFAULT_QUEUE.to_string()
    };
    wire::Target {
        queue,
        isolation: t.settings.isolation.as_str().to_string(),
        id: t.id,
        name: t.name,
        kind: t.kind,
        status: t.status,
        host: t.host,
        root: t.root,
        http_port: t.http_port,
        https_port: t.https_port,
        web_user: t.web_user,
        host_key: t.host_key,
        inspection: t.inspection,
        mariadb: wire::MariadbAdmin {
            socket: t.settings.mariadb.socket,
            host: t.settings.mariadb.host,
            port: Some(t.settings.mariadb.port),
            user: Some(t.settings.mariadb.user),
            password: None,
        },
        postgresql: wire::PostgresqlAdmin {
            host: Some(t.settings.postgresql.host),
            port: Some(t.settings.postgresql.port),
            user: Some(t.settings.postgresql.user),
            password: None,
        },
        system_nginx: t.settings.system_nginx.map(|n| wire::SystemNginx {
            sites_dir: n.sites_dir,
            test_command: Some(n.test_command),
            reload_command: Some(n.reload_command),
        }),
        created_at: timestamp(t.created_at),
        updated_at: timestamp(t.updated_at),
    }
}

pub fn project(p: ProjectRecord) -> wire::Project {
    wire::Project {
        id: p.id,
        name: p.name,
        git_url: p.git_url,
        branch: p.branch,
        status: p.status,
        manifest: p.manifest,
        deploy_key: p.deploy_key.map(|k| k.public_key),
        created_at: timestamp(p.created_at),
        updated_at: timestamp(p.updated_at),
    }
}

pub fn release(r: ReleaseRecord, environments: Vec<String>) -> wire::Release {
    let artifact = match (r.artifact_sha256, r.artifact_size) {
        (Some(sha256), Some(size)) => Some(wire::Artifact {
            sha256,
            size: size as u64,
        }),
        _ => None,
    };
    wire::Release {
        id: r.id,
        project: r.project_id,
        git_ref: r.git_ref,
        commit: r.commit,
        artifact,
        image: r.image,
        status: r.status,
        operation: r.build_operation_id,
        environments,
        created_at: timestamp(r.created_at),
        updated_at: timestamp(r.updated_at),
    }
}

pub fn operation(o: OperationRecord) -> wire::Operation {
    // The engine's bookkeeping (keys starting with '_') stays inside.
    wire::Operation {
        id: o.id,
        kind: o.kind.as_str().into(),
        subject: wire::Subject {
            subject_type: o.subject_type.as_str().into(),
            id: o.subject_id,
        },
        status: o.status.as_str().into(),
        attempt: o.attempt as u32,
        parent: o.parent_id,
        requested_by: o.requested_by,
        inputs: o.inputs,
        result: o.result,
        error: o.error,
        cancel_requested: o.cancel_requested,
        created_at: timestamp(o.created_at),
        started_at: o.started_at.map(timestamp),
        finished_at: o.finished_at.map(timestamp),
        updated_at: timestamp(o.updated_at),
        tasks: o
            .tasks
            .into_iter()
            .map(|t| wire::Task {
                name: t.name,
                status: t.status.as_str().into(),
                attempts: t.attempts as u32,
                rollback: t.rollback,
                started_at: t.started_at.map(timestamp),
                finished_at: t.finished_at.map(timestamp),
            })
            .collect(),
    }
}

pub fn environment(e: EnvironmentRecord, target: &TargetRecord) -> wire::Environment {
    wire::Environment {
        url: environment::url(&e.domain, e.https, target.http_port, target.https_port),
        id: e.id,
        name: e.name,
        project: e.project_id,
        target: e.target_id,
        domain: e.domain,
        aliases: e
            .aliases
            .into_iter()
            .map(|a| wire::Alias {
                domain: a.domain,
                redirect: a.redirect,
            })
            .collect(),
        https: e.https.as_str().into(),
        release: e.release_id,
        status: e.status,
        created_at: timestamp(e.created_at),
        updated_at: timestamp(e.updated_at),
    }
}

pub fn backup(b: hefring_store::BackupRecord) -> wire::Backup {
    wire::Backup {
        id: b.id,
        environment: b.environment_id,
        operation: b.operation_id,
        kind: b.kind,
        description: b.description,
        status: b.status,
        size: b.size,
        sha256: b.sha256,
        manifest: b.manifest,
        created_at: timestamp(b.created_at),
        updated_at: timestamp(b.updated_at),
    }
}
