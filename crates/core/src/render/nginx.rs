//! nginx: the main configuration of Hefring's own nginx master on a target, and the server
//! blocks of one environment.
//!
//! Hefring's nginx keeps every file under its directory (`NginxInstance::dir`, below the
//! target's root) and never reads `/etc/nginx`. Start it with
//! `nginx -p DIR -c DIR/nginx.conf` (see [`NginxInstance::argv`]): it daemonizes (a new
//! session, so it outlives the command that started it and its process group), writes its pid
//! file, and from then on `-s reload` (or `SIGHUP` to the pid in the pid file) reloads it
//! gracefully after `-t` has validated the new files.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{
    check_account, check_environment_id, check_path, check_port, check_socket_path, html_escape,
    Https, RenderError,
};
use crate::validate;

/// Hefring's own nginx master on one target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NginxInstance {
    /// The directory holding everything this nginx reads and writes, e.g. `ROOT/nginx`.
    pub dir: String,
    /// The account the worker processes run as (the `user` directive). Only meaningful when
    /// the master runs as root (otherwise nginx ignores it with a warning), so leave it `None`
    /// then. When the master runs as root and this is `None`, workers run as `nobody`, which
    /// must then be able to read the sites and connect to their PHP-FPM sockets.
    pub user: Option<String>,
    /// The group for `user`. Without it nginx uses the group named like the user, which may
    /// not exist (Debian's `nobody` is in `nogroup`).
    pub group: Option<String>,
    /// The target's `http_port` and `https_port`: the catch-all server for unknown host names
    /// listens on them.
    pub http_port: u16,
    pub https_port: u16,
    /// `worker_processes`; `None` renders `auto` (one per CPU).
    pub worker_processes: Option<u32>,
}

impl NginxInstance {
    pub fn config_file(&self) -> String {
        format!("{}/nginx.conf", self.dir)
    }
    pub fn pid_file(&self) -> String {
        format!("{}/nginx.pid", self.dir)
    }
    pub fn log_dir(&self) -> String {
        format!("{}/logs", self.dir)
    }
    pub fn error_log(&self) -> String {
        format!("{}/logs/error.log", self.dir)
    }
    /// The access log of requests no environment answers (unknown host names).
    pub fn access_log(&self) -> String {
        format!("{}/logs/access.log", self.dir)
    }
    /// The directory whose `*.conf` files the main configuration includes.
    pub fn sites_dir(&self) -> String {
        format!("{}/sites", self.dir)
    }
    /// Where an environment's server blocks go.
    pub fn site_file(&self, environment: &str) -> String {
        format!("{}/sites/{environment}.conf", self.dir)
    }
    /// Static pages nginx serves itself (the "site disabled" pages).
    pub fn pages_dir(&self) -> String {
        format!("{}/pages", self.dir)
    }
    /// Where an environment's [`disabled_page`] goes.
    pub fn disabled_page_file(&self, environment: &str) -> String {
        format!("{}/pages/{environment}.disabled.html", self.dir)
    }
    /// The ACME HTTP-01 challenge directory: a token `T` is served at
    /// `/.well-known/acme-challenge/T` from `ACME_DIR/T`, for every environment on the target.
    pub fn acme_dir(&self) -> String {
        format!("{}/acme", self.dir)
    }
    pub fn temp_dir(&self) -> String {
        format!("{}/temp", self.dir)
    }
    /// The directories to create (in this order) before nginx first starts.
    pub fn directories(&self) -> Vec<String> {
        vec![
            self.dir.clone(),
            self.log_dir(),
            self.sites_dir(),
            self.pages_dir(),
            self.acme_dir(),
            self.temp_dir(),
        ]
    }
    /// The arguments after the nginx binary for this instance, followed by `extra`:
    /// `[]` starts it, `["-t"]` tests the configuration, `["-s", "reload"]` reloads it,
    /// `["-s", "quit"]` stops it gracefully.
    ///
    /// nginx ≥ 1.19.5 also takes `-e FILE` for the log it writes before it has read the
    /// configuration; it is not passed here because older nginx refuses the flag. Debian's
    /// nginx logs to stderr until then; builds whose default is `/var/log/nginx/error.log`
    /// print an `[alert]` when they cannot open it and carry on.
    pub fn argv(&self, extra: &[&str]) -> Vec<String> {
        let mut argv = vec![
            "-p".to_string(),
            format!("{}/", self.dir),
            "-c".to_string(),
            self.config_file(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv
    }

    fn check(&self) -> Result<(), RenderError> {
        check_path("nginx.dir", &self.dir)?;
        if let Some(user) = &self.user {
            check_account("nginx.user", user)?;
        }
        if let Some(group) = &self.group {
            check_account("nginx.group", group)?;
            if self.user.is_none() {
                return Err(RenderError::new(
                    "nginx.group",
                    "can only be given together with nginx.user",
                ));
            }
        }
        check_port("http_port", self.http_port)?;
        check_port("https_port", self.https_port)?;
        if self.http_port == self.https_port {
            return Err(RenderError::new("https_port", "must differ from http_port"));
        }
        if self.worker_processes == Some(0) {
            return Err(RenderError::new(
                "nginx.worker_processes",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Another host name of an environment: it serves the site, or with `redirect` answers 301 to
/// the primary domain, keeping the path and query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub domain: String,
    pub redirect: bool,
}

/// The certificate and key nginx presents for an environment over HTTPS. The certificate
/// covers the primary domain and every alias.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tls {
    /// PEM: the certificate followed by its chain.
    pub certificate: String,
    /// PEM private key.
    pub key: String,
}

/// Everything nginx needs to serve one environment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteConfig {
    /// The environment's immutable id: log names derive from it.
    pub id: String,
    /// The primary domain: `server_name` starts with it and redirects go to it.
    pub domain: String,
    pub aliases: Vec<Alias>,
    pub https: Https,
    /// Required unless `https` is `off`.
    pub tls: Option<Tls>,
    pub http_port: u16,
    pub https_port: u16,
    /// The absolute document root, through the environment's `current` link (for example
    /// `ROOT/environments/ID/current/web`). nginx resolves the link on every request and hands
    /// PHP the resolved path (`$realpath_root`), so switching the link switches releases.
    pub docroot: String,
    /// The environment's PHP-FPM socket ([`super::fpm::FpmInstance::socket`]).
    pub fpm_socket: String,
    /// Where `ID.access.log` and `ID.error.log` go ([`NginxInstance::log_dir`]).
    pub log_dir: String,
    /// [`NginxInstance::acme_dir`].
    pub acme_dir: String,
    /// The file holding this environment's [`disabled_page`]
    /// ([`NginxInstance::disabled_page_file`]).
    pub disabled_page: String,
    /// When set, every request but ACME challenges answers 503 with the disabled page.
    pub disabled: bool,
    /// The URL prefixes (below the docroot, without a trailing `/`, for example
    /// `/sites/default/files`) of the release's writable paths: the site writes there, so
    /// nothing under them ever reaches PHP.
    pub writable_locations: Vec<String>,
    /// Set when the site's files belong to its own user: nginx then follows a link only when
    /// the link and what it points to have the same owner, so a link the site planted to a
    /// file it does not own is never served (`disable_symlinks if_not_owner`).
    pub owner_checked_links: bool,
}

impl SiteConfig {
    fn check(&self) -> Result<(), RenderError> {
        check_environment_id("id", &self.id)?;
        validate::domain("domain", &self.domain)?;
        for (i, alias) in self.aliases.iter().enumerate() {
            let field = format!("aliases[{i}].domain");
            validate::domain(&field, &alias.domain)?;
            if alias.domain == self.domain {
                return Err(RenderError::new(
                    field,
                    "must differ from the primary domain",
                ));
            }
            if self.aliases[..i].iter().any(|a| a.domain == alias.domain) {
                return Err(RenderError::new(field, "is listed twice"));
            }
        }
        check_port("http_port", self.http_port)?;
        check_port("https_port", self.https_port)?;
        if self.https != Https::Off {
            if self.http_port == self.https_port {
                return Err(RenderError::new("https_port", "must differ from http_port"));
            }
            let tls = self.tls.as_ref().ok_or_else(|| {
                RenderError::new(
                    "tls",
                    format!(
                        "a certificate and key are required when https is {}",
                        self.https.as_str()
                    ),
                )
            })?;
            check_path("tls.certificate", &tls.certificate)?;
            check_path("tls.key", &tls.key)?;
        }
        check_path("docroot", &self.docroot)?;
        check_socket_path("fpm_socket", &self.fpm_socket)?;
        check_path("log_dir", &self.log_dir)?;
        check_path("acme_dir", &self.acme_dir)?;
        check_path("disabled_page", &self.disabled_page)?;
        for (i, location) in self.writable_locations.iter().enumerate() {
            let field = format!("writable_locations[{i}]");
            check_path(&field, location)?;
            if !location.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '@' | '/')
            }) {
                return Err(RenderError::new(
                    field,
                    "holds a character nginx would read as syntax or a pattern",
                ));
            }
        }
        Ok(())
    }

    /// The names that serve the site: the primary domain first, then the aliases that do not
    /// redirect.
    fn serving_names(&self) -> Vec<&str> {
        std::iter::once(self.domain.as_str())
            .chain(
                self.aliases
                    .iter()
                    .filter(|a| !a.redirect)
                    .map(|a| a.domain.as_str()),
            )
            .collect()
    }

    fn redirect_names(&self) -> Vec<&str> {
        self.aliases
            .iter()
            .filter(|a| a.redirect)
            .map(|a| a.domain.as_str())
            .collect()
    }

    /// `scheme://domain[:port]` of the primary domain.
    fn origin(&self, tls: bool) -> String {
        match (tls, self.http_port, self.https_port) {
            (false, 80, _) => format!("http://{}", self.domain),
            (false, port, _) => format!("http://{}:{port}", self.domain),
            (true, _, 443) => format!("https://{}", self.domain),
            (true, _, port) => format!("https://{}:{port}", self.domain),
        }
    }
}

/// The main configuration of Hefring's nginx on a target (`NginxInstance::config_file`).
pub fn main_config(instance: &NginxInstance) -> Result<String, RenderError> {
    instance.check()?;
    let mut out = String::new();
    let o = &mut out;
    line(
        o,
        0,
        "# Hefring's own nginx for this target. Generated by Hefring: do not edit.",
    );
    line(
        o,
        0,
        "# Everything it reads and writes is under this directory.",
    );
    if let Some(user) = &instance.user {
        match &instance.group {
            Some(group) => line(o, 0, &format!("user {user} {group};")),
            None => line(o, 0, &format!("user {user};")),
        }
    }
    // Started by Hefring and left running: it must daemonize (a new session, so it survives
    // the end of the command or SSH session that started it) and keep a master process, which
    // is what makes `-s reload` / SIGHUP a graceful reload.
    line(o, 0, "daemon on;");
    line(o, 0, "master_process on;");
    match instance.worker_processes {
        Some(n) => line(o, 0, &format!("worker_processes {n};")),
        None => line(o, 0, "worker_processes auto;"),
    }
    // Old workers finish their requests after a reload, but do not linger for ever.
    line(o, 0, "worker_shutdown_timeout 60s;");
    line(o, 0, &format!("pid {};", instance.pid_file()));
    line(o, 0, &format!("error_log {} warn;", instance.error_log()));
    line(o, 0, "");
    line(o, 0, "events {");
    line(o, 1, "worker_connections 1024;");
    line(o, 0, "}");
    line(o, 0, "");
    line(o, 0, "http {");
    // A small map of our own rather than `include /etc/nginx/mime.types`, so this instance
    // reads nothing outside its directory (and works where nginx lives elsewhere). PHP
    // answers carry their own Content-Type; this only covers static files of PHP sites.
    line(o, 1, "types {");
    for (mime, exts) in MIME_TYPES {
        line(o, 2, &format!("{mime} {exts};"));
    }
    line(o, 1, "}");
    line(o, 1, "default_type application/octet-stream;");
    line(o, 1, "");
    // Without these nginx opens its compiled-in paths (/var/log/nginx, /var/lib/nginx/...),
    // which a non-root Hefring cannot write and which are not Hefring's to touch.
    line(o, 1, &format!("access_log {};", instance.access_log()));
    let temp = instance.temp_dir();
    for (directive, sub) in [
        ("client_body_temp_path", "client_body"),
        ("proxy_temp_path", "proxy"),
        ("fastcgi_temp_path", "fastcgi"),
        ("uwsgi_temp_path", "uwsgi"),
        ("scgi_temp_path", "scgi"),
    ] {
        line(o, 1, &format!("{directive} {temp}/{sub};"));
    }
    line(o, 1, "");
    line(o, 1, "sendfile on;");
    line(o, 1, "tcp_nopush on;");
    line(o, 1, "server_tokens off;");
    line(o, 1, "keepalive_timeout 65s;");
    line(o, 1, "client_max_body_size 64m;");
    // Redirects nginx makes itself (a directory without its trailing slash) stay relative,
    // so they are right behind a proxy or on a non-default port.
    line(o, 1, "absolute_redirect off;");
    // Host names may be up to 253 characters (256 is too small a bucket for that).
    line(o, 1, "server_names_hash_bucket_size 512;");
    line(o, 1, "server_names_hash_max_size 4096;");
    line(o, 1, "");
    line(o, 1, "ssl_protocols TLSv1.2 TLSv1.3;");
    line(o, 1, "ssl_prefer_server_ciphers off;");
    line(o, 1, "ssl_session_cache shared:hefring_tls:10m;");
    line(o, 1, "ssl_session_timeout 1d;");
    line(o, 1, "ssl_session_tickets off;");
    line(o, 1, "");
    line(o, 1, "# Host names no environment serves.");
    line(o, 1, "server {");
    line(
        o,
        2,
        &format!("listen {} default_server;", instance.http_port),
    );
    line(
        o,
        2,
        &format!("listen {} ssl default_server;", instance.https_port),
    );
    line(o, 2, "ssl_reject_handshake on;");
    line(o, 2, "server_name _;");
    // ACME HTTP-01 challenges for a host name before its own server block exists (the first
    // certificate of an environment is obtained before its HTTPS block can be written).
    line(o, 2, "location ^~ /.well-known/acme-challenge/ {");
    line(o, 3, &format!("alias {}/;", instance.acme_dir()));
    line(o, 3, "default_type text/plain;");
    line(o, 2, "}");
    line(o, 2, "location / {");
    line(o, 3, "return 404;");
    line(o, 2, "}");
    line(o, 1, "}");
    line(o, 1, "");
    line(o, 1, &format!("include {}/*.conf;", instance.sites_dir()));
    line(o, 0, "}");
    Ok(out)
}

/// Extensions nginx maps to a Content-Type for static files.
const MIME_TYPES: &[(&str, &str)] = &[
    ("text/html", "html htm"),
    ("text/css", "css"),
    ("text/javascript", "js mjs"),
    ("text/plain", "txt"),
    ("text/csv", "csv"),
    ("text/xml", "xml"),
    ("text/markdown", "md"),
    ("application/json", "json map"),
    ("application/manifest+json", "webmanifest"),
    ("application/wasm", "wasm"),
    ("application/pdf", "pdf"),
    ("application/zip", "zip"),
    ("application/gzip", "gz"),
    ("application/rss+xml", "rss"),
    ("application/atom+xml", "atom"),
    ("image/png", "png"),
    ("image/jpeg", "jpg jpeg"),
    ("image/gif", "gif"),
    ("image/webp", "webp"),
    ("image/avif", "avif"),
    ("image/svg+xml", "svg svgz"),
    ("image/x-icon", "ico"),
    ("font/woff", "woff"),
    ("font/woff2", "woff2"),
    ("font/ttf", "ttf"),
    ("font/otf", "otf"),
    ("audio/mpeg", "mp3"),
    ("audio/ogg", "ogg oga"),
    ("video/mp4", "mp4"),
    ("video/webm", "webm"),
];

/// The URI, inside every server, of the disabled page (only reachable through `error_page`).
const DISABLED_URI: &str = "/__hefring/disabled.html";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    Http,
    Https,
}

enum Body {
    /// The PHP site.
    Site,
    /// 503 and the disabled page.
    Disabled,
    /// 301 to `target` followed by the request URI.
    Redirect(String),
}

/// The server blocks of one environment, for [`NginxInstance::site_file`].
///
/// Per listener (HTTP, and HTTPS unless `https` is `off`) there is one server for the primary
/// domain and the aliases that serve the site, and one for the aliases that redirect. Every
/// server answers ACME HTTP-01 challenges from [`SiteConfig::acme_dir`], whatever `https` and
/// `disabled` say. When `https` is `required` the HTTP servers answer 301 to HTTPS (the
/// redirecting aliases straight to the primary domain); when the environment is disabled every
/// server answers 503 with the disabled page instead of redirecting or serving.
pub fn server_blocks(site: &SiteConfig) -> Result<String, RenderError> {
    site.check()?;
    let serving = site.serving_names();
    let redirecting = site.redirect_names();
    let mut out = String::new();
    let aliases = site
        .aliases
        .iter()
        .map(|a| {
            if a.redirect {
                format!("{} (redirects)", a.domain)
            } else {
                a.domain.clone()
            }
        })
        .collect::<Vec<_>>();
    line(
        &mut out,
        0,
        &format!(
            "# Hefring environment {}: {}. Generated by Hefring: do not edit.",
            site.id, site.domain
        ),
    );
    if !aliases.is_empty() {
        line(&mut out, 0, &format!("# aliases: {}", aliases.join(", ")));
    }
    line(
        &mut out,
        0,
        &format!(
            "# https: {}{}",
            site.https.as_str(),
            if site.disabled { "; disabled" } else { "" }
        ),
    );

    let mut listeners = vec![Listener::Http];
    if site.https != Https::Off {
        listeners.push(Listener::Https);
    }
    for listener in listeners {
        if site.disabled {
            let names: Vec<&str> = serving.iter().chain(&redirecting).copied().collect();
            server(&mut out, site, listener, &names, Body::Disabled);
            continue;
        }
        let to_https = listener == Listener::Http && site.https == Https::Required;
        let body = if to_https {
            let port = match site.https_port {
                443 => String::new(),
                port => format!(":{port}"),
            };
            Body::Redirect(format!("https://$host{port}"))
        } else {
            Body::Site
        };
        server(&mut out, site, listener, &serving, body);
        if !redirecting.is_empty() {
            let target = site.origin(listener == Listener::Https || to_https);
            server(
                &mut out,
                site,
                listener,
                &redirecting,
                Body::Redirect(target),
            );
        }
    }
    Ok(out)
}

fn server(out: &mut String, site: &SiteConfig, listener: Listener, names: &[&str], body: Body) {
    let id = &site.id;
    line(out, 0, "");
    line(out, 0, "server {");
    match listener {
        Listener::Http => line(out, 1, &format!("listen {};", site.http_port)),
        Listener::Https => {
            line(out, 1, &format!("listen {} ssl;", site.https_port));
        }
    }
    line(out, 1, &format!("server_name {};", names.join(" ")));
    if listener == Listener::Https {
        // Checked in SiteConfig::check: present whenever https is not off.
        if let Some(tls) = &site.tls {
            line(out, 1, &format!("ssl_certificate {};", tls.certificate));
            line(out, 1, &format!("ssl_certificate_key {};", tls.key));
        }
    }
    line(
        out,
        1,
        &format!("access_log {}/{id}.access.log;", site.log_dir),
    );
    line(
        out,
        1,
        &format!("error_log {}/{id}.error.log;", site.log_dir),
    );
    if let Body::Site = body {
        line(out, 1, &format!("root {};", site.docroot));
        line(out, 1, "index index.php index.html;");
        if site.owner_checked_links {
            line(
                out,
                1,
                "# A link is followed only to what its own owner owns (links the site planted).",
            );
            line(out, 1, "disable_symlinks if_not_owner from=$document_root;");
        }
    }
    line(out, 1, "");
    line(out, 1, "location ^~ /.well-known/acme-challenge/ {");
    line(out, 2, &format!("alias {}/;", site.acme_dir));
    line(out, 2, "default_type text/plain;");
    line(out, 1, "}");
    match body {
        Body::Redirect(target) => {
            line(out, 1, "location / {");
            line(out, 2, &format!("return 301 {target}$request_uri;"));
            line(out, 1, "}");
        }
        Body::Disabled => {
            line(out, 1, &format!("error_page 503 {DISABLED_URI};"));
            line(out, 1, &format!("location = {DISABLED_URI} {{"));
            line(out, 2, "internal;");
            line(out, 2, &format!("alias {};", site.disabled_page));
            line(out, 2, "default_type text/html;");
            line(out, 2, "add_header Cache-Control \"no-store\" always;");
            line(out, 1, "}");
            line(out, 1, "location / {");
            line(out, 2, "return 503;");
            line(out, 1, "}");
        }
        Body::Site => {
            line(
                out,
                1,
                "# No dotfiles (.git, .env, .hefring.yml, ...) but .well-known.",
            );
            line(out, 1, "location ~ /\\.(?!well-known/) {");
            line(out, 2, "deny all;");
            line(out, 1, "}");
            for location in &site.writable_locations {
                line(
                    out,
                    1,
                    "# Written by the site: served as files, never run as PHP.",
                );
                line(out, 1, &format!("location ^~ {location}/ {{"));
                line(out, 2, "location ~ /\\. {");
                line(out, 3, "deny all;");
                line(out, 2, "}");
                line(out, 2, "location ~ \\.(php|phar|phtml)(/|$) {");
                line(out, 3, "return 403;");
                line(out, 2, "}");
                line(out, 2, "try_files $uri $uri/ /index.php?$query_string;");
                line(out, 1, "}");
            }
            line(out, 1, "location / {");
            line(out, 2, "try_files $uri $uri/ /index.php?$query_string;");
            line(out, 1, "}");
            line(
                out,
                1,
                "# Only PHP files that exist reach PHP-FPM; PATH_INFO after them is kept.",
            );
            line(out, 1, "location ~ [^/]\\.php(/|$) {");
            line(out, 2, "fastcgi_split_path_info ^(.+?\\.php)(/.*)$;");
            // try_files resets $fastcgi_path_info: keep it first (nginx trac #321).
            line(out, 2, "set $hefring_path_info $fastcgi_path_info;");
            line(out, 2, "try_files $fastcgi_script_name =404;");
            line(out, 2, &format!("fastcgi_pass unix:{};", site.fpm_socket));
            line(out, 2, "fastcgi_index index.php;");
            for (param, value) in FASTCGI_PARAMS {
                line(out, 2, &format!("fastcgi_param {param} {value};"));
            }
            line(out, 1, "}");
        }
    }
    line(out, 0, "}");
}

/// The FastCGI parameters PHP receives, written out rather than included from
/// `/etc/nginx/fastcgi_params`. `$realpath_root` is the document root with the `current`
/// link resolved, so a request that started on one release finishes on it.
const FASTCGI_PARAMS: &[(&str, &str)] = &[
    ("SCRIPT_FILENAME", "$realpath_root$fastcgi_script_name"),
    ("DOCUMENT_ROOT", "$realpath_root"),
    ("SCRIPT_NAME", "$fastcgi_script_name"),
    ("PATH_INFO", "$hefring_path_info"),
    ("QUERY_STRING", "$query_string"),
    ("REQUEST_METHOD", "$request_method"),
    ("CONTENT_TYPE", "$content_type"),
    ("CONTENT_LENGTH", "$content_length"),
    ("REQUEST_URI", "$request_uri"),
    ("DOCUMENT_URI", "$document_uri"),
    ("SERVER_PROTOCOL", "$server_protocol"),
    ("REQUEST_SCHEME", "$scheme"),
    ("HTTPS", "$https if_not_empty"),
    ("GATEWAY_INTERFACE", "CGI/1.1"),
    ("SERVER_SOFTWARE", "nginx"),
    ("REMOTE_ADDR", "$remote_addr"),
    ("REMOTE_PORT", "$remote_port"),
    ("SERVER_ADDR", "$server_addr"),
    ("SERVER_PORT", "$server_port"),
    ("SERVER_NAME", "$server_name"),
    ("REDIRECT_STATUS", "200"),
    // httpoxy: a request's `Proxy:` header must not become PHP's HTTP_PROXY.
    ("HTTP_PROXY", "\"\""),
];

/// The page a disabled environment answers with (status 503), for
/// [`NginxInstance::disabled_page_file`].
pub fn disabled_page(domain: &str) -> String {
    let domain = html_escape(domain);
    format!(
        "<!DOCTYPE html>\n\
         <html lang=\"en\">\n\
         <head>\n\
         <meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex\">\n\
         <title>Site disabled</title>\n\
         </head>\n\
         <body>\n\
         <h1>Site disabled</h1>\n\
         <p>{domain} is disabled for now.</p>\n\
         </body>\n\
         </html>\n"
    )
}

fn line(out: &mut String, indent: usize, text: &str) {
    if text.is_empty() {
        out.push('\n');
        return;
    }
    let _ = writeln!(out, "{:width$}{text}", "", width = indent * 4);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const ID: &str = "env_01jd8x2k3m4n5p6q7r8s9t0vwx";
    pub(crate) const ROOT: &str = "/srv/hefring";

    pub(crate) fn instance() -> NginxInstance {
        NginxInstance {
            dir: format!("{ROOT}/nginx"),
            user: Some("www-data".into()),
            group: None,
            http_port: 80,
            https_port: 443,
            worker_processes: None,
        }
    }

    pub(crate) fn plain() -> SiteConfig {
        let nginx = instance();
        SiteConfig {
            id: ID.into(),
            domain: "shop.example.test".into(),
            aliases: vec![],
            https: Https::Off,
            tls: None,
            http_port: 80,
            https_port: 443,
            docroot: format!("{ROOT}/environments/{ID}/current/web"),
            fpm_socket: format!("{ROOT}/php-fpm/sock/{ID}.sock"),
            log_dir: nginx.log_dir(),
            acme_dir: nginx.acme_dir(),
            disabled_page: nginx.disabled_page_file(ID),
            disabled: false,
            writable_locations: vec!["/sites/default/files".into()],
            owner_checked_links: true,
        }
    }

    fn tls() -> Option<Tls> {
        Some(Tls {
            certificate: format!("{ROOT}/environments/{ID}/tls/fullchain.pem"),
            key: format!("{ROOT}/environments/{ID}/tls/key.pem"),
        })
    }

    fn with_aliases() -> SiteConfig {
        SiteConfig {
            aliases: vec![
                Alias {
                    domain: "www.shop.example.test".into(),
                    redirect: false,
                },
                Alias {
                    domain: "old-shop.example.test".into(),
                    redirect: true,
                },
            ],
            ..plain()
        }
    }

    #[test]
    fn snapshot_main_config() {
        insta::assert_snapshot!(main_config(&instance()).unwrap());
    }

    #[test]
    fn snapshot_main_config_without_root() {
        let instance = NginxInstance {
            user: None,
            worker_processes: Some(2),
            http_port: 8080,
            https_port: 8443,
            ..instance()
        };
        insta::assert_snapshot!(main_config(&instance).unwrap());
    }

    #[test]
    fn snapshot_plain_site() {
        insta::assert_snapshot!(server_blocks(&plain()).unwrap());
    }

    #[test]
    fn snapshot_site_with_aliases() {
        insta::assert_snapshot!(server_blocks(&with_aliases()).unwrap());
    }

    #[test]
    fn snapshot_https_on() {
        let site = SiteConfig {
            https: Https::On,
            tls: tls(),
            ..with_aliases()
        };
        insta::assert_snapshot!(server_blocks(&site).unwrap());
    }

    #[test]
    fn snapshot_https_required_on_other_ports() {
        let site = SiteConfig {
            https: Https::Required,
            tls: tls(),
            http_port: 8080,
            https_port: 8443,
            ..with_aliases()
        };
        insta::assert_snapshot!(server_blocks(&site).unwrap());
    }

    #[test]
    fn snapshot_disabled() {
        let site = SiteConfig {
            https: Https::Required,
            tls: tls(),
            disabled: true,
            ..with_aliases()
        };
        insta::assert_snapshot!(server_blocks(&site).unwrap());
    }

    #[test]
    fn snapshot_disabled_page() {
        insta::assert_snapshot!(disabled_page("shop.example.test"));
    }

    #[test]
    fn disabled_page_escapes_html() {
        let page = disabled_page("<script>alert('x')</script>&\"");
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"));
        assert!(!page.contains("<script>"));
    }

    #[test]
    fn redirects_keep_the_port_and_the_request_uri() {
        let site = SiteConfig {
            http_port: 8080,
            ..with_aliases()
        };
        let text = server_blocks(&site).unwrap();
        assert!(text.contains("return 301 http://shop.example.test:8080$request_uri;"));
        let site = SiteConfig {
            https: Https::Required,
            tls: tls(),
            ..with_aliases()
        };
        let text = server_blocks(&site).unwrap();
        assert!(text.contains("return 301 https://$host$request_uri;"));
        assert!(text.contains("return 301 https://shop.example.test$request_uri;"));
        assert!(!text.contains("return 301 http://"));
    }

    #[test]
    fn every_server_answers_acme_challenges() {
        for (https, disabled) in [
            (Https::Off, false),
            (Https::On, false),
            (Https::Required, false),
            (Https::Required, true),
        ] {
            let site = SiteConfig {
                https,
                tls: tls(),
                disabled,
                ..with_aliases()
            };
            let text = server_blocks(&site).unwrap();
            assert_eq!(
                text.matches("server {").count(),
                text.matches("location ^~ /.well-known/acme-challenge/ {")
                    .count(),
                "{https:?} {disabled}"
            );
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        type Set = fn(&mut SiteConfig, String);
        let cases: Vec<(&str, Set)> = vec![
            ("docroot", |s, v| s.docroot = v),
            ("fpm_socket", |s, v| s.fpm_socket = v),
            ("log_dir", |s, v| s.log_dir = v),
            ("acme_dir", |s, v| s.acme_dir = v),
            ("disabled_page", |s, v| s.disabled_page = v),
            ("tls.certificate", |s, v| {
                s.https = Https::On;
                s.tls = Some(Tls {
                    certificate: v,
                    key: "/k.pem".into(),
                })
            }),
            ("tls.key", |s, v| {
                s.https = Https::On;
                s.tls = Some(Tls {
                    certificate: "/c.pem".into(),
                    key: v,
                })
            }),
        ];
        for (field, set) in cases {
            for bad in [
                "/srv/x; include /etc/passwd",
                "/srv/x}",
                "/srv/x{",
                "/srv/x\n    return 200 pwned",
                "/srv/$document_root",
                "/srv/x#",
                "/srv/a b",
                "/srv/\"x\"",
                "relative/path",
                "/srv/../etc",
            ] {
                let mut site = plain();
                set(&mut site, bad.to_string());
                let err = server_blocks(&site).unwrap_err();
                assert_eq!(err.field, field, "{bad:?}: {err}");
            }
        }
        for bad in ["/srv/x;", "/srv/x}", "/srv/x\n"] {
            let err = main_config(&NginxInstance {
                dir: bad.into(),
                ..instance()
            })
            .unwrap_err();
            assert_eq!(err.field, "nginx.dir");
        }
    }

    #[test]
    fn hostile_domains_are_refused() {
        for bad in [
            "a.test; return 200 x",
            "a.test}",
            "a.test\nserver_name b",
            "A.test",
            "*.a.test",
            "~^(?<x>.+)$",
            "_",
            "",
        ] {
            let site = SiteConfig {
                domain: bad.into(),
                ..plain()
            };
            assert_eq!(server_blocks(&site).unwrap_err().field, "domain", "{bad:?}");
            let site = SiteConfig {
                aliases: vec![
                    Alias {
                        domain: "ok.test".into(),
                        redirect: false,
                    },
                    Alias {
                        domain: bad.into(),
                        redirect: true,
                    },
                ],
                ..plain()
            };
            assert_eq!(
                server_blocks(&site).unwrap_err().field,
                "aliases[1].domain",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn other_bad_input_is_refused() {
        let field = |site: SiteConfig| server_blocks(&site).unwrap_err().field;
        assert_eq!(
            field(SiteConfig {
                id: "my-site".into(),
                ..plain()
            }),
            "id"
        );
        assert_eq!(
            field(SiteConfig {
                aliases: vec![Alias {
                    domain: "shop.example.test".into(),
                    redirect: true
                }],
                ..plain()
            }),
            "aliases[0].domain"
        );
        let twice = Alias {
            domain: "www.test".into(),
            redirect: false,
        };
        assert_eq!(
            field(SiteConfig {
                aliases: vec![twice.clone(), twice],
                ..plain()
            }),
            "aliases[1].domain"
        );
        assert_eq!(
            field(SiteConfig {
                https: Https::Required,
                ..plain()
            }),
            "tls"
        );
        assert_eq!(
            field(SiteConfig {
                https: Https::On,
                tls: tls(),
                https_port: 80,
                ..plain()
            }),
            "https_port"
        );
        assert_eq!(
            field(SiteConfig {
                http_port: 0,
                ..plain()
            }),
            "http_port"
        );
        assert_eq!(
            field(SiteConfig {
                fpm_socket: format!("/{}", "s".repeat(200)),
                ..plain()
            }),
            "fpm_socket"
        );
        let user = main_config(&NginxInstance {
            user: Some("www-data;".into()),
            ..instance()
        })
        .unwrap_err();
        assert_eq!(user.field, "nginx.user");
    }
}
