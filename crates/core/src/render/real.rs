//! The rendered files against the real nginx and PHP-FPM: `nginx -t` and `php-fpm -t` accept
//! them, `php-fpm -tt` reads environment values back byte for byte, and both servers, started
//! for real on free ports, serve PHP, redirects, HTTPS and the disabled page. These tests
//! spawn processes (the renderers themselves stay pure); `scripts/test` installs nginx,
//! php-fpm and openssl.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::fpm::{self, FpmInstance, PoolConfig};
use super::nginx::{self, Alias, NginxInstance, SiteConfig, Tls};
use super::Https;
use crate::id::{new_id, IdKind};

const INSTALL_HINT: &str =
    "scripts/test installs it (Debian packages nginx, php-fpm, php-cli, openssl)";

fn find_binary(candidates: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .collect();
    candidates
        .iter()
        .find_map(|name| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
}

fn nginx_binary() -> PathBuf {
    find_binary(&["nginx"]).unwrap_or_else(|| panic!("nginx is not installed: {INSTALL_HINT}"))
}

fn php_fpm_binary() -> PathBuf {
    find_binary(&[
        "php-fpm",
        "php-fpm8.4",
        "php-fpm8.3",
        "php-fpm8.2",
        "php-fpm8.1",
        "php-fpm8.0",
        "php-fpm7.4",
    ])
    .unwrap_or_else(|| panic!("php-fpm is not installed: {INSTALL_HINT}"))
}

fn openssl_binary() -> PathBuf {
    find_binary(&["openssl"]).unwrap_or_else(|| panic!("openssl is not installed: {INSTALL_HINT}"))
}

fn run(program: &Path, args: &[String]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// The unprivileged account the servers' workers use when the tests run as root, and its
/// group (`nogroup` on Debian, `nobody` elsewhere).
fn worker_account() -> Option<(String, String)> {
    if !is_root() {
        return None;
    }
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let group = if groups.lines().any(|l| l.starts_with("nogroup:")) {
        "nogroup"
    } else {
        "nobody"
    };
    Some(("nobody".into(), group.into()))
}

fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

fn write(path: impl AsRef<Path>, contents: &str) {
    let path = path.as_ref();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A directory the servers' unprivileged workers can traverse (under `/tmp` when root, as
/// `TMPDIR` may be private), with odd but allowed characters in its name, so quoting is proven
/// too. (Not ',' or '=': PHP-FPM cannot reload with those in a socket path, and the renderer
/// refuses them.)
fn root_dir() -> tempfile::TempDir {
    let parent = if is_root() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("hefring-render-(x)&~!^|+@")
        .tempdir_in(parent)
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn path_str(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

fn self_signed(dir: &Path, names: &[&str]) -> Tls {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::create_dir_all(dir).unwrap();
    let san = names
        .iter()
        .map(|n| format!("DNS:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let out = run(
        &openssl_binary(),
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=x",
            "-addext",
            &format!("subjectAltName={san}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]
        .map(String::from),
    );
    assert!(out.status.success(), "openssl req: {}", text(&out));
    for file in [&cert, &key] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    Tls {
        certificate: path_str(&cert),
        key: path_str(&key),
    }
}

struct Target {
    root: tempfile::TempDir,
    nginx: NginxInstance,
    fpm: FpmInstance,
    worker: Option<(String, String)>,
}

impl Target {
    fn new(http_port: u16, https_port: u16) -> Target {
        let root = root_dir();
        let worker = worker_account();
        let dir = path_str(root.path());
        let nginx = NginxInstance {
            dir: format!("{dir}/nginx"),
            user: worker.as_ref().map(|(u, _)| u.clone()),
            group: worker.as_ref().map(|(_, g)| g.clone()),
            http_port,
            https_port,
            worker_processes: Some(1),
        };
        let fpm = FpmInstance {
            dir: format!("{dir}/php-fpm"),
            user: worker.as_ref().map(|(u, _)| u.clone()),
            group: worker.as_ref().map(|(_, g)| g.clone()),
        };
        for d in nginx.directories().into_iter().chain(fpm.directories()) {
            std::fs::create_dir_all(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        write(nginx.config_file(), &nginx::main_config(&nginx).unwrap());
        write(fpm.config_file(), &fpm::master_config(&fpm).unwrap());
        Target {
            root,
            nginx,
            fpm,
            worker,
        }
    }

    fn path(&self) -> String {
        path_str(self.root.path())
    }

    /// An environment with a release `r1` behind its `current` link.
    fn environment(&self, domain: &str) -> (String, SiteConfig) {
        let id = new_id(IdKind::Environment, 1_700_000_000_000);
        let env_dir = format!("{}/environments/{id}", self.path());
        let release = format!("{env_dir}/releases/r1");
        write(
            format!("{release}/web/index.php"),
            "<?php\nheader('Content-Type: text/plain');\n\
             echo 'release=r1', \"\\n\";\n\
             echo 'greeting=', getenv('GREETING'), \"\\n\";\n\
             echo 'tricky=', getenv('TRICKY'), \"\\n\";\n\
             echo 'server_name=', $_SERVER['SERVER_NAME'], \"\\n\";\n\
             echo 'script=', $_SERVER['SCRIPT_FILENAME'], \"\\n\";\n\
             echo 'document_root=', $_SERVER['DOCUMENT_ROOT'], \"\\n\";\n\
             echo 'path_info=', $_SERVER['PATH_INFO'] ?? '', \"\\n\";\n\
             echo 'request_uri=', $_SERVER['REQUEST_URI'], \"\\n\";\n\
             echo 'https=', $_SERVER['HTTPS'] ?? '', \"\\n\";\n\
             echo 'master_only=', getenv('HEFRING_MASTER_ONLY') === false ? '(unset)' : 'leaked', \"\\n\";\n",
        );
        write(
            format!("{release}/web/env.php"),
            "<?php header('Content-Type: application/json'); echo json_encode(getenv(null, true));",
        );
        write(format!("{release}/web/style.css"), "body { color: red }\n");
        write(format!("{release}/web/.env"), "SECRET=1\n");
        write(format!("{release}/web/notes.php.txt"), "not php\n");
        std::os::unix::fs::symlink(&release, format!("{env_dir}/current")).unwrap();
        let site = SiteConfig {
            id: id.clone(),
            domain: domain.into(),
            aliases: vec![],
            https: Https::Off,
            tls: None,
            http_port: self.nginx.http_port,
            https_port: self.nginx.https_port,
            docroot: format!("{env_dir}/current/web"),
            fpm_socket: self.fpm.socket(&id),
            log_dir: self.nginx.log_dir(),
            acme_dir: self.nginx.acme_dir(),
            disabled_page: self.nginx.disabled_page_file(&id),
            disabled: false,
            writable_locations: Vec::new(),
            owner_checked_links: false,
        };
        (id, site)
    }

    fn add_site(&self, site: &SiteConfig, env: &[(&str, &str)]) {
        write(
            self.nginx.site_file(&site.id),
            &nginx::server_blocks(site).unwrap(),
        );
        write(&site.disabled_page, &nginx::disabled_page(&site.domain));
        let pool = PoolConfig {
            id: site.id.clone(),
            socket: self.fpm.socket(&site.id),
            user: self.worker.as_ref().map(|(u, _)| u.clone()),
            group: self.worker.as_ref().map(|(_, g)| g.clone()),
            listen_owner: self.worker.as_ref().map(|(u, _)| u.clone()),
            listen_group: self.worker.as_ref().map(|(_, g)| g.clone()),
            listen_mode: 0o660,
            error_log: self.fpm.php_error_log(&site.id),
            max_children: 4,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            php: None,
        };
        write(self.fpm.pool_file(&site.id), &fpm::pool(&pool).unwrap());
    }

    fn nginx_test(&self) -> Output {
        run(&nginx_binary(), &self.nginx.argv(&["-t"]))
    }

    fn fpm_test(&self, flag: &str) -> Output {
        run(&php_fpm_binary(), &self.fpm.argv(&[flag]))
    }
}

/// The values that must reach PHP exactly as given.
const TRICKY: &[(&str, &str)] = &[
    ("TRICKY", r#"a"b\c$d${HOME};#'e"#),
    ("BACKSLASHES", r"\\server\share\"),
    ("LITERAL_ESCAPES", r"\n\t\x41\$"),
    ("TAB", "a\tb"),
    ("SPACES", "  padded  "),
    ("UNICODE", "é ß 漢字 🙂"),
    ("INI_OPERATORS", "=[]{}|&~!^() ; # x=1"),
    ("DOLLAR_INSIDE", "a$HOME"),
    ("LOOKS_BOOLEAN", "yes"),
    ("LOOKS_NULL", "null"),
    ("ZERO", "0"),
    (
        "URL",
        "postgresql://u:p%40ss@127.0.0.1:5432/db?sslmode=disable",
    ),
];

#[test]
fn nginx_accepts_the_rendered_configuration() {
    let target = Target::new(free_port(), free_port());
    let certs = format!("{}/certs", target.path());
    // The longest domain there can be: 253 characters.
    let long_domain = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "b".repeat(61));
    assert_eq!(long_domain.len(), 253);
    let tls = self_signed(Path::new(&certs), &["x.test"]);
    let aliases = [
        Alias {
            domain: "www.x.test".into(),
            redirect: false,
        },
        Alias {
            domain: "old.x.test".into(),
            redirect: true,
        },
    ];
    let mut sites = vec![];
    for (i, (https, disabled)) in [
        (Https::Off, false),
        (Https::On, false),
        (Https::Required, false),
        (Https::Required, true),
        (Https::Off, true),
    ]
    .into_iter()
    .enumerate()
    {
        let (_, mut site) = target.environment(&format!("site{i}.test"));
        site.aliases = aliases
            .iter()
            .map(|a| Alias {
                domain: format!("{i}.{}", a.domain),
                redirect: a.redirect,
            })
            .collect();
        site.https = https;
        site.tls = Some(tls.clone());
        site.disabled = disabled;
        sites.push(site);
    }
    let (_, mut long) = target.environment(&long_domain);
    long.https = Https::On;
    long.tls = Some(tls);
    sites.push(long);
    for site in &sites {
        target.add_site(site, &[]);
    }
    let out = target.nginx_test();
    let log = text(&out);
    assert!(out.status.success(), "nginx -t refused the files:\n{log}");
    assert!(
        !log.contains("[warn]") && !log.contains("[emerg]"),
        "nginx -t warned:\n{log}"
    );
}

#[test]
fn php_fpm_accepts_the_rendered_configuration_and_reads_values_back() {
    let target = Target::new(free_port(), free_port());
    // With no environment at all (Hefring's own pool only)...
    let out = target.fpm_test("-t");
    assert!(
        out.status.success(),
        "php-fpm -t refused the master configuration:\n{}",
        text(&out)
    );
    // ... and with several.
    let mut ids = vec![];
    for i in 0..3 {
        let (id, site) = target.environment(&format!("site{i}.test"));
        target.add_site(&site, TRICKY);
        ids.push(id);
    }
    let out = target.fpm_test("-t");
    assert!(
        out.status.success(),
        "php-fpm -t refused the pools:\n{}",
        text(&out)
    );
    // -tt dumps the configuration as parsed: every value comes back byte for byte.
    let out = target.fpm_test("-tt");
    let dump = text(&out);
    assert!(out.status.success(), "php-fpm -tt:\n{dump}");
    for (name, value) in TRICKY {
        let expected = format!("\tenv[{name}] = {value}\n");
        assert_eq!(
            dump.matches(&expected).count(),
            ids.len(),
            "env[{name}] did not come back as {value:?}:\n{dump}"
        );
    }
    for id in &ids {
        assert!(
            dump.contains(&format!("[{id}]")),
            "pool {id} missing:\n{dump}"
        );
    }
}

/// Sends one HTTP/1.0 request and returns the status code, the headers (lower-cased names)
/// and the body.
fn http_get(port: u16, host: &str, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to nginx");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the answer");
    parse_response(&raw)
}

/// The same over TLS, through `openssl s_client` (no TLS client among the dependencies).
fn https_get(port: u16, host: &str, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut child = Command::new(openssl_binary())
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            host,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    parse_response(&out.stdout)
}

fn parse_response(raw: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let raw = String::from_utf8_lossy(raw);
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Stops a daemon through its pid file when dropped, so a failing test leaves nothing
/// running.
struct Daemon {
    name: &'static str,
    pid_file: String,
}

impl Daemon {
    fn pid(&self) -> Option<String> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
    }

    fn wait_for_pid(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = self.pid() {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "{} wrote no pid file at {}",
                self.name,
                self.pid_file
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([format!("-{signal}"), pid])
                .stderr(Stdio::null())
                .status();
        }
    }

    fn alive(pid: &str) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(pid) = self.pid() else { return };
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Daemon::alive(&pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if Daemon::alive(&pid) {
            self.signal("KILL");
        }
    }
}

/// Starts a daemonizing server and returns once its pid file is there. The command's own
/// output goes to a file: the daemon may keep inherited descriptors open.
fn start(
    name: &'static str,
    program: &Path,
    args: &[String],
    pid_file: String,
    log: &Path,
) -> Daemon {
    let log_file = std::fs::File::create(log).unwrap();
    let status = Command::new(program)
        .args(args)
        .env("HEFRING_MASTER_ONLY", "the pool must not see this")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .status()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    assert!(
        status.success(),
        "{name} did not start: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    let daemon = Daemon { name, pid_file };
    daemon.wait_for_pid();
    daemon
}

fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn rendered_sites_serve_for_real() {
    let http = free_port();
    let https = free_port();
    let target = Target::new(http, https);
    let logs = target.root.path().join("start-logs");
    std::fs::create_dir_all(&logs).unwrap();

    // shop.test: PHP, an alias that serves and one that redirects.
    let (shop_id, mut shop) = target.environment("shop.test");
    shop.aliases = vec![
        Alias {
            domain: "www.shop.test".into(),
            redirect: false,
        },
        Alias {
            domain: "old-shop.test".into(),
            redirect: true,
        },
    ];
    let shop_vars: Vec<(&str, &str)> = [("GREETING", "hello from the pool")]
        .into_iter()
        .chain(TRICKY.iter().copied())
        .collect();
    target.add_site(&shop, &shop_vars);
    // closed.test: disabled.
    let (_, mut closed) = target.environment("closed.test");
    closed.disabled = true;
    target.add_site(&closed, &[("GREETING", "closed")]);
    // secure.test: HTTPS required.
    let (_, mut secure) = target.environment("secure.test");
    secure.https = Https::Required;
    secure.tls = Some(self_signed(
        &target.root.path().join("certs"),
        &["secure.test"],
    ));
    target.add_site(&secure, &[("GREETING", "secure")]);
    // An ACME challenge token.
    write(
        format!("{}/token-123", target.nginx.acme_dir()),
        "token-123.thumbprint",
    );

    let out = target.nginx_test();
    assert!(out.status.success(), "nginx -t: {}", text(&out));
    let out = target.fpm_test("-t");
    assert!(out.status.success(), "php-fpm -t: {}", text(&out));

    let fpm = start(
        "php-fpm",
        &php_fpm_binary(),
        &target.fpm.argv(&[]),
        target.fpm.pid_file(),
        &logs.join("php-fpm.log"),
    );
    let nginx = start(
        "nginx",
        &nginx_binary(),
        &target.nginx.argv(&[]),
        target.nginx.pid_file(),
        &logs.join("nginx.log"),
    );
    eventually("nginx to listen", || {
        TcpStream::connect(("127.0.0.1", http)).ok()
    });

    let diagnostics = || {
        let mut all = String::new();
        for file in [
            target.nginx.error_log(),
            target.fpm.error_log(),
            format!("{}/{shop_id}.error.log", target.nginx.log_dir()),
        ] {
            all += &format!(
                "--- {file}\n{}\n",
                std::fs::read_to_string(&file).unwrap_or_default()
            );
        }
        all
    };

    // PHP answers, with the pool's variables, through the resolved `current` link.
    let (status, _, body) = http_get(http, "shop.test", "/");
    assert_eq!(status, 200, "{body}\n{}", diagnostics());
    let shop_env = format!("{}/environments/{shop_id}", target.path());
    assert!(body.contains("release=r1\n"), "{body}");
    assert!(body.contains("greeting=hello from the pool\n"), "{body}");
    assert!(
        body.contains(&format!("tricky={}\n", TRICKY[0].1)),
        "{body}"
    );
    assert!(body.contains("server_name=shop.test\n"), "{body}");
    assert!(
        body.contains(&format!("document_root={shop_env}/releases/r1/web\n")),
        "{body}"
    );
    assert!(
        body.contains(&format!("script={shop_env}/releases/r1/web/index.php\n")),
        "{body}"
    );
    assert!(body.contains("master_only=(unset)\n"), "clear_env: {body}");
    // Every variable reaches PHP byte for byte (and none of the master's: `master_only` above).
    let (status, _, body) = http_get(http, "shop.test", "/env.php");
    assert_eq!(status, 200, "{body}");
    let seen: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    for (name, value) in &shop_vars {
        assert_eq!(seen.get(*name).map(String::as_str), Some(*value), "{name}");
    }
    // Front controller, PATH_INFO, query strings.
    let (status, _, body) = http_get(http, "shop.test", "/products/42?color=red");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("request_uri=/products/42?color=red\n"),
        "{body}"
    );
    let (status, _, body) = http_get(http, "shop.test", "/index.php/Main_Page");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("path_info=/Main_Page\n"), "{body}");
    // Static files, dotfiles, PHP files that do not exist.
    let (status, headers, body) = http_get(http, "shop.test", "/style.css");
    assert_eq!((status, body.as_str()), (200, "body { color: red }\n"));
    assert_eq!(header(&headers, "content-type"), Some("text/css"));
    assert_eq!(http_get(http, "shop.test", "/.env").0, 403);
    assert_eq!(http_get(http, "shop.test", "/missing.php").0, 404);
    let (status, _, body) = http_get(http, "shop.test", "/notes.php.txt");
    assert_eq!((status, body.as_str()), (200, "not php\n"));
    // The alias that serves, and the one that redirects (path and query kept).
    let (status, _, body) = http_get(http, "www.shop.test", "/");
    assert_eq!(status, 200);
    assert!(body.contains("server_name=shop.test\n"), "{body}");
    let (status, headers, _) = http_get(http, "old-shop.test", "/a/b?c=d&e=f");
    assert_eq!(status, 301);
    assert_eq!(
        header(&headers, "location"),
        Some(format!("http://shop.test:{http}/a/b?c=d&e=f").as_str())
    );
    // Unknown host names.
    assert_eq!(http_get(http, "nobody.test", "/").0, 404);

    // Disabled: 503 and the page everywhere, ACME challenges still answered.
    for path in ["/", "/index.php", "/style.css", "/anything?x=1"] {
        let (status, headers, body) = http_get(http, "closed.test", path);
        assert_eq!(status, 503, "{path}");
        assert!(body.contains("closed.test is disabled"), "{path}: {body}");
        assert_eq!(header(&headers, "content-type"), Some("text/html"));
    }
    let (status, _, body) = http_get(http, "closed.test", "/.well-known/acme-challenge/token-123");
    assert_eq!((status, body.as_str()), (200, "token-123.thumbprint"));

    // HTTPS required: HTTP redirects, except ACME; HTTPS serves PHP.
    let (status, headers, _) = http_get(http, "secure.test", "/x?y=1");
    assert_eq!(status, 301);
    assert_eq!(
        header(&headers, "location"),
        Some(format!("https://secure.test:{https}/x?y=1").as_str())
    );
    let (status, _, body) = http_get(http, "secure.test", "/.well-known/acme-challenge/token-123");
    assert_eq!((status, body.as_str()), (200, "token-123.thumbprint"));
    let (status, _, body) = https_get(https, "secure.test", "/");
    assert_eq!(status, 200, "{body}\n{}", diagnostics());
    assert!(body.contains("greeting=secure\n"), "{body}");
    assert!(body.contains("https=on\n"), "{body}");

    // Switching the `current` link switches the release at the next request.
    let release2 = format!("{shop_env}/releases/r2");
    write(
        format!("{release2}/web/index.php"),
        "<?php echo 'release=r2:', getenv('GREETING');",
    );
    let next = format!("{shop_env}/current.next");
    std::os::unix::fs::symlink(&release2, &next).unwrap();
    std::fs::rename(&next, format!("{shop_env}/current")).unwrap();
    let (status, _, body) = http_get(http, "shop.test", "/");
    assert_eq!(
        (status, body.as_str()),
        (200, "release=r2:hello from the pool")
    );

    // A graceful reload of each picks up changed files.
    shop.disabled = true;
    target.add_site(&shop, &[("GREETING", "reloaded pool")]);
    let out = target.nginx_test();
    assert!(out.status.success(), "nginx -t: {}", text(&out));
    let out = run(&nginx_binary(), &target.nginx.argv(&["-s", "reload"]));
    assert!(out.status.success(), "nginx -s reload: {}", text(&out));
    eventually("nginx to reload", || {
        (http_get(http, "shop.test", "/").0 == 503).then_some(())
    });
    // PHP-FPM re-executes itself on SIGUSR2 and, with `daemonize = yes`, forks again: its
    // pid changes and only the pid file knows the new one.
    let before = fpm.wait_for_pid();
    fpm.signal("USR2");
    let after = eventually("PHP-FPM to write its new pid", || {
        fpm.pid().filter(|pid| *pid != before && Daemon::alive(pid))
    });
    eventually("the old PHP-FPM master to exit", || {
        (!Daemon::alive(&before)).then_some(())
    });
    assert_eq!(fpm.pid().as_deref(), Some(after.as_str()));
    shop.disabled = false;
    target.add_site(&shop, &[("GREETING", "reloaded pool")]);
    let out = run(&nginx_binary(), &target.nginx.argv(&["-s", "reload"]));
    assert!(out.status.success(), "nginx -s reload: {}", text(&out));
    let mut last = None;
    let reloaded = (0..200).any(|_| {
        let (status, _, body) = http_get(http, "shop.test", "/");
        let done = status == 200 && body == "release=r2:reloaded pool";
        last = Some((status, body));
        if !done {
            std::thread::sleep(Duration::from_millis(50));
        }
        done
    });
    assert!(
        reloaded,
        "PHP-FPM and nginx did not reload: last answer {last:?}\n{}",
        diagnostics()
    );

    // Stop both; nothing stays behind.
    let nginx_pid = nginx.wait_for_pid();
    let fpm_pid = fpm.wait_for_pid();
    drop(nginx);
    drop(fpm);
    assert!(!Daemon::alive(&nginx_pid), "nginx still runs");
    assert!(!Daemon::alive(&fpm_pid), "php-fpm still runs");
    assert!(TcpStream::connect(("127.0.0.1", http)).is_err());
}
