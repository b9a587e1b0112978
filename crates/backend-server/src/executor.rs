//! Running commands on a target.

use std::path::PathBuf;
use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// Which stream a line of output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A command to run: an argument vector, a working directory, extra environment, and text
/// for its standard input (secrets travel there or in the environment, never in argv).
#[derive(Clone, Default)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub stdin: Option<String>,
}

impl std::fmt::Debug for CommandSpec {
    // The environment and standard input may hold secrets: only their names and size show.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandSpec")
            .field("argv", &self.argv)
            .field("cwd", &self.cwd)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("stdin_bytes", &self.stdin.as_ref().map(String::len))
            .finish()
    }
}

impl CommandSpec {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        CommandSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn envs(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        self.env.extend(vars);
        self
    }

    pub fn stdin(mut self, text: impl Into<String>) -> Self {
        self.stdin = Some(text.into());
        self
    }
}

/// What a child reads on its standard input.
pub(crate) enum Input {
    Nothing,
    Bytes(Vec<u8>),
    File(std::fs::File),
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("could not start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("i/o error while running {program}: {source}")]
    Io {
        program: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Where output lines go as they are produced.
pub type LineSink<'a> = &'a (dyn Fn(Stream, String) + Send + Sync);

#[async_trait]
pub trait Executor: Send + Sync {
    /// Runs the command to completion, sending each output line to `sink`, and answers its
    /// exit code (`None` when killed by a signal). Dropping the future kills the command and
    /// everything it started.
    async fn run(&self, spec: &CommandSpec, sink: LineSink<'_>) -> Result<Option<i32>, ExecError>;

    /// Copies a local file to `remote` on the target, atomically (a partial copy never has
    /// the final name). The parent directory must exist.
    async fn upload(&self, local: &std::path::Path, remote: &str) -> Result<(), ExecError>;

    /// Copies `remote` on the target to a local file, atomically (a partial copy never has
    /// the final name).
    async fn download(&self, remote: &str, local: &std::path::Path) -> Result<(), ExecError>;

    /// Whether the target's paths are this machine's (no copy needed to read them here).
    fn is_local(&self) -> bool {
        false
    }
}

/// The variables of Hefring's own environment that commands it runs on this machine see:
/// where programs are, the locale, the time zone, temporary files, proxies and CA bundles.
/// Nothing else: the rest may be secrets.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Runs commands on this machine.
#[derive(Clone, Debug, Default)]
pub struct LocalExecutor;

#[async_trait]
impl Executor for LocalExecutor {
    async fn run(&self, spec: &CommandSpec, sink: LineSink<'_>) -> Result<Option<i32>, ExecError> {
        let Some(program) = spec.argv.first() else {
            return Err(ExecError::Invalid("empty command".into()));
        };
        let mut command = Command::new(program);
        command.args(&spec.argv[1..]);
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        // Hefring's own environment holds secrets (S3 keys, database and broker URLs): a
        // command gets only what any process needs, plus what its spec gives it.
        command.env_clear();
        for name in INHERITED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.envs(spec.env.iter().map(|(k, v)| (k, v)));
        let input = match &spec.stdin {
            Some(text) => Input::Bytes(text.clone().into_bytes()),
            None => Input::Nothing,
        };
        run_child(command, program, input, sink).await
    }

    async fn upload(&self, local: &std::path::Path, remote: &str) -> Result<(), ExecError> {
        let io_err = |source| ExecError::Io {
            program: "copy".into(),
            source,
        };
        // A name of this copy's own: several operations may copy the same artifact at once.
        static COPIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let partial = format!("{remote}.part.{}.{n}", std::process::id());
        tokio::fs::copy(local, &partial).await.map_err(io_err)?;
        tokio::fs::rename(&partial, remote).await.map_err(io_err)?;
        Ok(())
    }

    async fn download(&self, remote: &str, local: &std::path::Path) -> Result<(), ExecError> {
        self.upload(std::path::Path::new(remote), &local.to_string_lossy())
            .await
    }

    fn is_local(&self) -> bool {
        true
    }
}

/// Kills a command's whole process group when dropped, so a cancelled or timed-out task
/// leaves nothing behind (build scripts start children of their own).
struct GroupKiller(Option<i32>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // SAFETY: kill(2) with a negative pid signals the process group we created.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

pub(crate) async fn run_child(
    mut command: Command,
    program: &str,
    stdin: Input,
    sink: LineSink<'_>,
) -> Result<Option<i32>, ExecError> {
    let (stdio, bytes) = match stdin {
        Input::Nothing => (Stdio::null(), None),
        Input::Bytes(bytes) => (Stdio::piped(), Some(bytes)),
        Input::File(file) => (Stdio::from(file), None),
    };
    command
        .stdin(stdio)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        program: program.into(),
        source,
    })?;
    // Also on success: whatever the command left running in its group is killed with it.
    let _killer = GroupKiller(child.id().map(|p| p as i32));
    let io_err = |source| ExecError::Io {
        program: program.into(),
        source,
    };
    // Standard input is written while the output is read: a command that answers before it
    // has read all its input (xargs) would otherwise fill its output pipe and wait for us
    // while we wait for it to read.
    let stdin = child.stdin.take();
    let feed = async move {
        if let (Some(bytes), Some(mut pipe)) = (bytes, stdin) {
            // A command that exits without reading all of it is not an error of ours.
            match pipe.write_all(&bytes).await {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e),
                _ => {}
            }
        }
        Ok(())
    };
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (fed, out, err) = tokio::join!(
        feed,
        forward_lines(stdout, Stream::Stdout, sink),
        forward_lines(stderr, Stream::Stderr, sink)
    );
    fed.map_err(io_err)?;
    out.map_err(io_err)?;
    err.map_err(io_err)?;
    let status = child.wait().await.map_err(io_err)?;
    Ok(status.code())
}

async fn forward_lines(
    pipe: impl AsyncRead + Unpin,
    stream: Stream,
    sink: LineSink<'_>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        sink(stream, String::from_utf8_lossy(&buf).into_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn output_is_streamed_line_by_line_with_its_stream() {
        let lines = Mutex::new(Vec::new());
        let sink = |s: Stream, l: String| lines.lock().unwrap().push((s, l));
        let spec = CommandSpec::new([
            "sh",
            "-c",
            "echo one; echo two >&2; echo \"$GREETING\"; exit 3",
        ])
        .env("GREETING", "hello");
        let code = LocalExecutor.run(&spec, &sink).await.unwrap();
        assert_eq!(code, Some(3));
        let mut got = lines.into_inner().unwrap();
        got.sort_by_key(|(s, _)| *s == Stream::Stderr);
        assert_eq!(
            got,
            [
                (Stream::Stdout, "one".to_string()),
                (Stream::Stdout, "hello".to_string()),
                (Stream::Stderr, "two".to_string())
            ]
        );
    }

    /// xargs answers while it still reads: with a large input, writing all of it before
    /// reading any output would wait forever.
    #[tokio::test]
    async fn a_large_input_and_output_flow_at_the_same_time() {
        let count = std::sync::atomic::AtomicUsize::new(0);
        let sink = |s: Stream, _: String| {
            if s == Stream::Stdout {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let input: String = (0..100_000).map(|i| format!("line-{i:06}\n")).collect();
        let spec = CommandSpec::new(["sh", "-c", "xargs -n 100 printf '%s\\n'"]).stdin(input);
        let run = LocalExecutor.run(&spec, &sink);
        let code = tokio::time::timeout(std::time::Duration::from_secs(60), run)
            .await
            .expect("no deadlock")
            .unwrap();
        assert_eq!(code, Some(0));
        assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 100_000);
    }

    #[tokio::test]
    async fn dropping_the_run_kills_the_whole_process_group() {
        let dir = std::env::temp_dir().join(format!("hefring-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("survived");
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let spec = CommandSpec::new(["sh", "-c", &script]);
        let sink = |_: Stream, _: String| {};
        let run = LocalExecutor.run(&spec, &sink);
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), run).await;
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert!(
            !marker.exists(),
            "a child of the killed command kept running"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let sink = |_: Stream, _: String| {};
        let err = LocalExecutor
            .run(&CommandSpec::new(["/nonexistent/program"]), &sink)
            .await
            .unwrap_err();
        assert!(err
            .to_string()
            .contains("could not start /nonexistent/program"));
    }
}
