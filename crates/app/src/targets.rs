//! Targets: register, verify, remove.

use hefring_core::operation::OperationKind;
use hefring_core::target::{Host, TargetSettings};
use hefring_core::{new_id, validate, IdKind};
use hefring_store::TargetRecord;
use hefring_wire as wire;
use serde_json::json;

use crate::{now_ms, App, AppError, AppResult, Origin, Submitted};

fn check_host_key(key: &str) -> AppResult<()> {
    let parts: Vec<&str> = key.split(' ').collect();
    let ok = parts.len() == 2
        && parts[0]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'@' || b == b'.')
        && parts[1]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    ok.then_some(())
        .ok_or_else(|| AppError::invalid("host_key", "must be 'TYPE BASE64', as in known_hosts"))
}

/// The admin connections and system nginx a request gives, over the defaults.
pub fn target_settings(
    mariadb: Option<wire::MariadbAdmin>,
    postgresql: Option<wire::PostgresqlAdmin>,
    system_nginx: Option<wire::SystemNginx>,
) -> TargetSettings {
    let mut settings = TargetSettings {
        system_nginx: system_nginx.map(|n| {
            hefring_core::target::SystemNginx::new(n.sites_dir, n.test_command, n.reload_command)
        }),
        ..Default::default()
    };
    if let Some(m) = mariadb {
        let admin = &mut settings.mariadb;
        if m.socket.is_some() || m.host.is_some() {
            admin.socket = m.socket;
            admin.host = m.host;
        }
        admin.port = m.port.unwrap_or(admin.port);
        admin.user = m.user.unwrap_or_else(|| admin.user.clone());
        admin.password = m.password.map(hefring_core::Secret::new);
    }
    if let Some(p) = postgresql {
        let admin = &mut settings.postgresql;
        admin.host = p.host.unwrap_or_else(|| admin.host.clone());
        admin.port = p.port.unwrap_or(admin.port);
        admin.user = p.user.unwrap_or_else(|| admin.user.clone());
        admin.password = p.password.map(hefring_core::Secret::new);
    }
    settings
}

impl App {
    pub(crate) async fn target(&self, id: &str) -> AppResult<TargetRecord> {
        match IdKind::Target.matches(id) {
            true => self.store.get_target(id).await?,
            false => None,
        }
        .ok_or_else(|| AppError::not_found("target"))
    }

    /// Registers a server target (verify it next).
    pub async fn create_target(&self, body: wire::CreateTarget) -> AppResult<TargetRecord> {
        validate::name("name", &body.name)?;
        if body.kind != "server" {
            return Err(AppError::invalid(
                "kind",
                "only 'server' targets are supported by this version",
            ));
        }
        let host = Host::parse("host", &body.host)?;
        if let Some(root) = &body.root {
            validate::setting_path("root", root)?;
        }
        for (field, port) in [
            ("http_port", body.http_port),
            ("https_port", body.https_port),
        ] {
            if port == Some(0) {
                return Err(AppError::invalid(field, "must be between 1 and 65535"));
            }
        }
        if let Some(user) = &body.web_user {
            validate::web_user("web_user", user)?;
        }
        if let Some(key) = &body.host_key {
            check_host_key(key)?;
        }
        let mut settings = target_settings(body.mariadb, body.postgresql, body.system_nginx);
        settings.own_queue = body.own_queue;
        settings.isolation = match body.isolation.as_deref() {
            None | Some("required") => hefring_core::target::Isolation::Required,
            Some("optional") => hefring_core::target::Isolation::Optional,
            Some(other) => {
                return Err(AppError::invalid(
                    "isolation",
                    format!("{other:?} is not required or optional"),
                ))
            }
        };
        settings.check()?;
        let now = now_ms();
        let id = new_id(IdKind::Target, now);
        // Short: PHP-FPM's sockets live below the root, and a socket path holds 107 bytes.
        let root = body.root.unwrap_or_else(|| match host {
            Host::Local => self
                .targets_root
                .join(&body.name)
                .to_string_lossy()
                .into_owned(),
            Host::Ssh { .. } => "/var/lib/hefring".into(),
        });
        let record = TargetRecord {
            id,
            name: body.name,
            kind: body.kind,
            status: "new".into(),
            host: host.render(),
            root,
            http_port: body.http_port.unwrap_or(80),
            https_port: body.https_port.unwrap_or(443),
            web_user: body.web_user.unwrap_or_else(|| "www-data".into()),
            host_key: body.host_key,
            inspection: None,
            settings,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_target(&record).await?;
        Ok(record)
    }

    /// Checks that the target can be reached and has what environments need.
    pub async fn verify_target(&self, id: &str, origin: &Origin) -> AppResult<Submitted> {
        let target = self.target(id).await?;
        self.store_operation(OperationKind::TargetVerify, &target.id, json!({}), origin)
            .await
    }

    /// Removes a target that runs no environments.
    pub async fn delete_target(&self, id: &str, origin: &Origin) -> AppResult<Submitted> {
        let target = self.target(id).await?;
        let environments = self.store.environments_on_target(&target.id).await?;
        if !environments.is_empty() {
            return Err(AppError::conflict(format!(
                "the target still runs environments: {}",
                environments.join(", ")
            )));
        }
        self.store_operation(OperationKind::TargetDelete, &target.id, json!({}), origin)
            .await
    }
}
