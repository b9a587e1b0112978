//! The installation's own certificate authority, for HTTPS when no ACME directory is
//! configured: a root made once in `DATA_DIR/ca`, and certificates for environments signed by
//! it. Users who want browsers to trust these sites import the root (`GET /api/v1/ca.pem`).
//!
//! The keys are made by the `openssl` command on this machine (a required tool of every
//! server, so it is here too); the CA key never leaves `DATA_DIR/ca` (mode 0700).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the local CA: {0}")]
    Io(#[from] std::io::Error),
    #[error("the local CA: openssl {step} failed: {output}")]
    Openssl { step: &'static str, output: String },
}

/// A key and its certificate chain, as PEM.
#[derive(Clone)]
pub struct IssuedCertificate {
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("chain_pem", &self.chain_pem)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
pub struct LocalCa {
    dir: PathBuf,
}

/// How long an issued certificate is valid; renewal comes well before the end.
pub const CERTIFICATE_DAYS: u32 = 90;

async fn openssl(step: &'static str, args: &[&str], cwd: &Path) -> Result<(), CaError> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CaError::Openssl {
            step,
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl LocalCa {
    pub fn new(data_dir: &Path) -> LocalCa {
        LocalCa {
            dir: data_dir.join("ca"),
        }
    }

    pub fn certificate_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Makes the root once (a crash half-way leaves no root, and the next call makes one).
    pub async fn ensure(&self) -> Result<String, CaError> {
        let cert = self.certificate_path();
        if let Ok(pem) = tokio::fs::read_to_string(&cert).await {
            return Ok(pem);
        }
        tokio::fs::create_dir_all(&self.dir).await?;
        tokio::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700)).await?;
        let work = tempfile::tempdir_in(&self.dir)?;
        openssl(
            "making the root",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca.pem",
                "-days",
                "3650",
                "-subj",
                "/O=Hefring/CN=Hefring local CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE,pathlen:0",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            work.path(),
        )
        .await?;
        // The key first: a root certificate without its key would be useless.
        tokio::fs::rename(work.path().join("ca-key.pem"), self.dir.join("ca-key.pem")).await?;
        tokio::fs::rename(work.path().join("ca.pem"), &cert).await?;
        Ok(tokio::fs::read_to_string(&cert).await?)
    }

    /// A new key and a certificate for `names` (the first is the subject), signed by the root.
    pub async fn issue(&self, names: &[&str]) -> Result<IssuedCertificate, CaError> {
        let root = self.ensure().await?;
        let work = tempfile::tempdir_in(&self.dir)?;
        let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        tokio::fs::write(
            work.path().join("ext.cnf"),
            format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth\n\
                 subjectAltName={}\n",
                san.join(",")
            ),
        )
        .await?;
        let subject = format!("/CN={}", names.first().copied().unwrap_or("localhost"));
        openssl(
            "making a key and request",
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "request.pem",
                "-subj",
                &subject,
            ],
            work.path(),
        )
        .await?;
        let ca_cert = self.certificate_path();
        let ca_key = self.dir.join("ca-key.pem");
        let days = CERTIFICATE_DAYS.to_string();
        openssl(
            "signing",
            &[
                "x509",
                "-req",
                "-in",
                "request.pem",
                "-CA",
                &ca_cert.to_string_lossy(),
                "-CAkey",
                &ca_key.to_string_lossy(),
                "-CAcreateserial",
                "-CAserial",
                "serial",
                "-days",
                &days,
                "-extfile",
                "ext.cnf",
                "-out",
                "certificate.pem",
            ],
            work.path(),
        )
        .await?;
        let leaf = tokio::fs::read_to_string(work.path().join("certificate.pem")).await?;
        let key_pem = tokio::fs::read_to_string(work.path().join("key.pem")).await?;
        Ok(IssuedCertificate {
            chain_pem: format!("{leaf}{root}"),
            key_pem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn issued_certificates_verify_against_the_root_for_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::new(dir.path());
        let root = ca.ensure().await.unwrap();
        assert_eq!(ca.ensure().await.unwrap(), root, "the root is made once");
        let issued = ca.issue(&["a.test", "www.a.test"]).await.unwrap();
        let leaf = dir.path().join("leaf.pem");
        std::fs::write(&leaf, &issued.chain_pem).unwrap();
        for name in ["a.test", "www.a.test"] {
            let out = std::process::Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(ca.certificate_path())
                .args(["-verify_hostname", name])
                .arg(&leaf)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(ca.certificate_path())
            .args(["-verify_hostname", "other.test"])
            .arg(&leaf)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "a name not asked for must not verify"
        );
        assert!(issued.key_pem.contains("PRIVATE KEY"));
    }
}
