//! SSH targets, through the OpenSSH client. The installation has one key pair; a target's
//! host key is pinned on its first verify and checked on every connection after.
//!
//! The command, its working directory and its environment travel on the SSH session's
//! standard input as a small script, so nothing (secrets included) appears in the argument
//! list of a process on either machine.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::executor::{run_child, CommandSpec, ExecError, Executor, Input, LineSink};

/// The installation's SSH key pair (`DATA_DIR/ssh/id_ed25519`).
#[derive(Clone, Debug)]
pub struct SshKeyPair {
    pub private_key: PathBuf,
}

impl SshKeyPair {
    /// Creates the key pair under `dir` unless it exists.
    pub async fn ensure(dir: &Path) -> std::io::Result<SshKeyPair> {
        let private_key = dir.join("id_ed25519");
        if !private_key.exists() {
            tokio::fs::create_dir_all(dir).await?;
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "hefring", "-f"])
                .arg(&private_key)
                .status()
                .await?;
            if !status.success() {
                return Err(std::io::Error::other("ssh-keygen failed"));
            }
        }
        Ok(SshKeyPair { private_key })
    }

    pub fn public_key(&self) -> std::io::Result<String> {
        let text = std::fs::read_to_string(self.private_key.with_extension("pub"))?;
        Ok(text.trim().to_string())
    }
}

/// Runs commands on a host over SSH.
#[derive(Clone, Debug)]
pub struct SshExecutor {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub key: SshKeyPair,
    /// A known_hosts file for this target alone.
    pub known_hosts: PathBuf,
    /// The pinned host key (`TYPE BASE64`), or `None` to accept and record the first one.
    pub pinned_host_key: Option<String>,
}

impl SshExecutor {
    fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    /// Writes the pinned key (or an empty file) as this target's known_hosts.
    async fn prepare_known_hosts(&self) -> std::io::Result<()> {
        if let Some(parent) = self.known_hosts.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let content = match &self.pinned_host_key {
            Some(key) => format!("{} {}\n", self.known_hosts_name(), key),
            None => String::new(),
        };
        tokio::fs::write(&self.known_hosts, content).await
    }

    /// The host key recorded by the last connection (`TYPE BASE64`).
    pub async fn recorded_host_key(&self) -> Option<String> {
        let text = tokio::fs::read_to_string(&self.known_hosts).await.ok()?;
        text.lines().find_map(|line| {
            let mut parts = line.split_whitespace();
            let _host = parts.next()?;
            let kind = parts.next()?;
            let key = parts.next()?;
            Some(format!("{kind} {key}"))
        })
    }
}

/// Quotes a word for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn remote_script(spec: &CommandSpec) -> Result<String, ExecError> {
    if spec.argv.is_empty() {
        return Err(ExecError::Invalid("empty command".into()));
    }
    let mut script = String::from("set -e\n");
    for (key, value) in &spec.env {
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(ExecError::Invalid(format!(
                "invalid environment variable name {key:?}"
            )));
        }
        script.push_str(&format!("export {key}={}\n", shell_quote(value)));
    }
    if let Some(cwd) = &spec.cwd {
        script.push_str(&format!("cd {}\n", shell_quote(&cwd.to_string_lossy())));
    }
    script.push_str("exec");
    for word in &spec.argv {
        script.push(' ');
        script.push_str(&shell_quote(word));
    }
    match &spec.stdin {
        None => script.push_str(" </dev/null\n"),
        Some(text) => {
            // A here-document whose delimiter is derived from the text, so the text cannot
            // contain it. The shell adds a final newline if the text lacks one.
            let digest = Sha256::digest(text.as_bytes());
            let delimiter = format!("HEFRING_STDIN_{}", hex::encode(&digest[..12]));
            script.push_str(&format!(" <<'{delimiter}'\n{text}"));
            if !text.is_empty() && !text.ends_with('\n') {
                script.push('\n');
            }
            script.push_str(&delimiter);
            script.push('\n');
        }
    }
    Ok(script)
}

impl SshExecutor {
    /// The ssh command up to (and including) the host; the remote command follows.
    async fn ssh_command(&self) -> Result<Command, ExecError> {
        self.prepare_known_hosts()
            .await
            .map_err(|source| ExecError::Io {
                program: "ssh".into(),
                source,
            })?;
        let checking = if self.pinned_host_key.is_some() {
            "yes"
        } else {
            "accept-new"
        };
        let mut command = Command::new("ssh");
        command
            .arg("-i")
            .arg(&self.key.private_key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "HashKnownHosts=no",
            ])
            .args(["-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15"])
            .arg("-o")
            .arg(format!("StrictHostKeyChecking={checking}"))
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null", "-p"])
            .arg(self.port.to_string())
            .arg("-l")
            .arg(&self.user)
            .arg("--")
            .arg(&self.host);
        Ok(command)
    }
}

#[async_trait]
impl Executor for SshExecutor {
    async fn run(&self, spec: &CommandSpec, sink: LineSink<'_>) -> Result<Option<i32>, ExecError> {
        let script = remote_script(spec)?;
        let mut command = self.ssh_command().await?;
        command.args(["sh", "-s"]);
        run_child(command, "ssh", Input::Bytes(script.into_bytes()), sink).await
    }

    async fn upload(&self, local: &std::path::Path, remote: &str) -> Result<(), ExecError> {
        let file = std::fs::File::open(local).map_err(|source| ExecError::Io {
            program: "ssh".into(),
            source,
        })?;
        let mut command = self.ssh_command().await?;
        // One argument: the remote shell reads it as a command line.
        let quoted = shell_quote(remote);
        // A name of this copy's own (the remote shell's pid): several operations may copy the
        // same artifact at once.
        let partial = format!("{}.$$", shell_quote(&format!("{remote}.part")));
        command.arg(format!("cat > {partial} && mv -f {partial} {quoted}"));
        let errors = std::sync::Mutex::new(Vec::new());
        let sink = |_: crate::executor::Stream, line: String| errors.lock().unwrap().push(line);
        match run_child(command, "ssh", Input::File(file), &sink).await? {
            Some(0) => Ok(()),
            code => Err(ExecError::Invalid(format!(
                "copying to {remote} failed ({code:?}): {}",
                errors.into_inner().unwrap().join("; ")
            ))),
        }
    }

    async fn download(&self, remote: &str, local: &std::path::Path) -> Result<(), ExecError> {
        let io_err = |source| ExecError::Io {
            program: "ssh".into(),
            source,
        };
        let partial = local.with_extension("part");
        let file = std::fs::File::create(&partial).map_err(io_err)?;
        let mut command = self.ssh_command().await?;
        command.arg(format!("cat {}", shell_quote(remote)));
        command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(file))
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let output = command
            .spawn()
            .map_err(|source| ExecError::Spawn {
                program: "ssh".into(),
                source,
            })?
            .wait_with_output()
            .await
            .map_err(io_err)?;
        if !output.status.success() {
            let _ = std::fs::remove_file(&partial);
            return Err(ExecError::Invalid(format!(
                "copying {remote} from the target failed ({:?}): {}",
                output.status.code(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        std::fs::rename(&partial, local).map_err(io_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_a_shell() {
        for word in ["plain", "it's", "$(touch /tmp/x)", "a b\nc", "'", ""] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(word)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), word);
        }
    }

    #[test]
    fn the_remote_script_runs_the_argv_with_its_environment() {
        let spec = CommandSpec::new([
            "sh",
            "-c",
            "echo \"$SECRET\" in \"$PWD\"; echo \"$1\"",
            "x",
            "it's",
        ])
        .cwd("/tmp")
        .env("SECRET", "p@ss'word");
        let script = remote_script(&spec).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-s")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(script.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "p@ss'word in /tmp\nit's\n"
        );
        assert!(remote_script(&CommandSpec::new(["x"]).env("BAD;NAME", "v")).is_err());
    }
}
