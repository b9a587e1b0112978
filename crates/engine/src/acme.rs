//! A small ACME (RFC 8555) client for HTTP-01: an account key kept in `DATA_DIR/acme`, an
//! order for the environment's host names, challenge files published through a callback (the
//! target's nginx serves `/.well-known/acme-challenge/` from its ACME directory for every
//! site), and the certificate chain.
//!
//! Signing uses ECDSA P-256 (`ES256`) from `ring`, which the TLS stack already brings; the
//! certificate request is made by `openssl` like the local CA's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Where certificates come from when an ACME directory is configured.
#[derive(Clone, Debug)]
pub struct AcmeConfig {
    /// The directory URL (Let's Encrypt: `https://acme-v02.api.letsencrypt.org/directory`).
    pub directory: String,
    /// Extra PEM roots to trust for the ACME server's own API (a test CA such as pebble).
    pub ca_file: Option<PathBuf>,
    /// The account's contact address, if any.
    pub email: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("ACME: {0}")]
pub struct AcmeError(pub String);

fn err(e: impl std::fmt::Display) -> AcmeError {
    AcmeError(e.to_string())
}

/// A key and certificate chain, as PEM.
pub struct Certificate {
    pub chain_pem: String,
    pub key_pem: String,
}

pub struct AcmeClient {
    http: reqwest::Client,
    key: EcdsaKeyPair,
    directory: Value,
    account: Option<String>,
    nonce: Option<String>,
    email: Option<String>,
    work_dir: PathBuf,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

impl AcmeClient {
    /// Loads (or makes, once) the account key and reads the directory.
    pub async fn connect(config: &AcmeConfig, data_dir: &Path) -> Result<AcmeClient, AcmeError> {
        let dir = data_dir.join("acme");
        tokio::fs::create_dir_all(&dir).await.map_err(err)?;
        let key_file = dir.join("account.pk8");
        let pkcs8 = match tokio::fs::read(&key_file).await {
            Ok(bytes) => bytes,
            Err(_) => {
                let doc = EcdsaKeyPair::generate_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &SystemRandom::new(),
                )
                .map_err(|_| AcmeError("cannot make an account key".into()))?;
                let partial = dir.join("account.pk8.part");
                tokio::fs::write(&partial, doc.as_ref())
                    .await
                    .map_err(err)?;
                use std::os::unix::fs::PermissionsExt;
                tokio::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))
                    .await
                    .map_err(err)?;
                tokio::fs::rename(&partial, &key_file).await.map_err(err)?;
                doc.as_ref().to_vec()
            }
        };
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &SystemRandom::new(),
        )
        .map_err(|_| AcmeError(format!("{} is not a P-256 key", key_file.display())))?;
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = &config.ca_file {
            let pem = tokio::fs::read(ca)
                .await
                .map_err(|e| AcmeError(format!("{}: {e}", ca.display())))?;
            builder =
                builder.add_root_certificate(reqwest::Certificate::from_pem(&pem).map_err(err)?);
        }
        let http = builder.build().map_err(err)?;
        let directory: Value = http
            .get(&config.directory)
            .send()
            .await
            .map_err(|e| {
                AcmeError(format!(
                    "cannot read the directory {}: {e}",
                    config.directory
                ))
            })?
            .json()
            .await
            .map_err(err)?;
        Ok(AcmeClient {
            http,
            key,
            directory,
            account: None,
            nonce: None,
            email: config.email.clone(),
            work_dir: dir,
        })
    }

    fn url(&self, name: &str) -> Result<String, AcmeError> {
        self.directory[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| AcmeError(format!("the directory has no {name}")))
    }

    /// The account key as a JWK: the members RFC 7638 hashes, in its order.
    fn jwk(&self) -> Value {
        let point = self.key.public_key().as_ref();
        // Uncompressed point: 0x04 || X (32) || Y (32).
        json!({
            "crv": "P-256",
            "kty": "EC",
            "x": b64(&point[1..33]),
            "y": b64(&point[33..65]),
        })
    }

    fn thumbprint(&self) -> String {
        let jwk = self.jwk();
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["x"].as_str().unwrap_or_default(),
            jwk["y"].as_str().unwrap_or_default()
        );
        b64(&Sha256::digest(canonical.as_bytes()))
    }

    async fn fresh_nonce(&mut self) -> Result<String, AcmeError> {
        if let Some(nonce) = self.nonce.take() {
            return Ok(nonce);
        }
        let response = self
            .http
            .head(self.url("newNonce")?)
            .send()
            .await
            .map_err(err)?;
        response
            .headers()
            .get("replay-nonce")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| AcmeError("no Replay-Nonce from newNonce".into()))
    }

    /// A signed POST (`payload` `None` is POST-as-GET). Retries once on `badNonce`.
    async fn post(
        &mut self,
        url: &str,
        payload: Option<&Value>,
    ) -> Result<reqwest::Response, AcmeError> {
        for attempt in 0..3 {
            let nonce = self.fresh_nonce().await?;
            let mut protected = json!({ "alg": "ES256", "nonce": nonce, "url": url });
            match &self.account {
                Some(kid) => protected["kid"] = json!(kid),
                None => protected["jwk"] = self.jwk(),
            }
            let protected = b64(protected.to_string().as_bytes());
            let payload = match payload {
                Some(p) => b64(p.to_string().as_bytes()),
                None => String::new(),
            };
            let signature = self
                .key
                .sign(
                    &SystemRandom::new(),
                    format!("{protected}.{payload}").as_bytes(),
                )
                .map_err(|_| AcmeError("signing failed".into()))?;
            let body = json!({ "protected": protected, "payload": payload, "signature": b64(signature.as_ref()) });
            let response = self
                .http
                .post(url)
                .header("content-type", "application/jose+json")
                .body(body.to_string())
                .send()
                .await
                .map_err(err)?;
            self.nonce = response
                .headers()
                .get("replay-nonce")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if response.status().is_success() {
                return Ok(response);
            }
            let status = response.status();
            let problem: Value = response.json().await.unwrap_or(Value::Null);
            if problem["type"] == "urn:ietf:params:acme:error:badNonce" && attempt < 2 {
                continue;
            }
            return Err(AcmeError(format!(
                "{url} answered {status}: {}",
                problem["detail"].as_str().unwrap_or("no detail")
            )));
        }
        unreachable!("the loop returns")
    }

    async fn ensure_account(&mut self) -> Result<(), AcmeError> {
        if self.account.is_some() {
            return Ok(());
        }
        let mut payload = json!({ "termsOfServiceAgreed": true });
        if let Some(email) = &self.email {
            payload["contact"] = json!([format!("mailto:{email}")]);
        }
        let url = self.url("newAccount")?;
        let response = self.post(&url, Some(&payload)).await?;
        let kid = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| AcmeError("the account has no Location".into()))?
            .to_string();
        self.account = Some(kid);
        Ok(())
    }

    async fn poll(&mut self, url: &str, what: &str) -> Result<Value, AcmeError> {
        for _ in 0..60 {
            let value: Value = self.post(url, None).await?.json().await.map_err(err)?;
            match value["status"].as_str() {
                Some("pending") | Some("processing") => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                _ => return Ok(value),
            }
        }
        Err(AcmeError(format!("the {what} stayed pending for 30 s")))
    }

    /// Orders a certificate for `names`. `publish(token, key_authorization)` must make
    /// `http://NAME/.well-known/acme-challenge/TOKEN` answer the key authorization before it
    /// returns.
    pub async fn issue<F, Fut>(
        &mut self,
        names: &[&str],
        mut publish: F,
    ) -> Result<Certificate, AcmeError>
    where
        F: FnMut(String, String) -> Fut,
        Fut: std::future::Future<Output = Result<(), AcmeError>>,
    {
        self.ensure_account().await?;
        let identifiers: Vec<Value> = names
            .iter()
            .map(|n| json!({ "type": "dns", "value": n }))
            .collect();
        let new_order = self.url("newOrder")?;
        let response = self
            .post(&new_order, Some(&json!({ "identifiers": identifiers })))
            .await?;
        let order_url = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| AcmeError("the order has no Location".into()))?
            .to_string();
        let order: Value = response.json().await.map_err(err)?;
        let thumbprint = self.thumbprint();
        for authz_url in order["authorizations"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let authz_url = authz_url.as_str().unwrap_or_default().to_string();
            let authz: Value = self
                .post(&authz_url, None)
                .await?
                .json()
                .await
                .map_err(err)?;
            if authz["status"] == "valid" {
                continue;
            }
            let challenge = authz["challenges"]
                .as_array()
                .and_then(|all| all.iter().find(|c| c["type"] == "http-01"))
                .cloned()
                .ok_or_else(|| {
                    AcmeError(format!(
                        "no http-01 challenge for {}",
                        authz["identifier"]["value"]
                    ))
                })?;
            let token = challenge["token"].as_str().unwrap_or_default().to_string();
            if token.is_empty()
                || !token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(AcmeError("the challenge token is not base64url".into()));
            }
            publish(token.clone(), format!("{token}.{thumbprint}")).await?;
            let challenge_url = challenge["url"].as_str().unwrap_or_default().to_string();
            self.post(&challenge_url, Some(&json!({}))).await?;
            let done = self.poll(&authz_url, "authorization").await?;
            if done["status"] != "valid" {
                let detail = done["challenges"]
                    .as_array()
                    .and_then(|c| c.iter().find_map(|c| c["error"]["detail"].as_str()))
                    .unwrap_or("no detail");
                return Err(AcmeError(format!(
                    "{} was not validated: {detail}",
                    done["identifier"]["value"]
                )));
            }
        }
        let (key_pem, csr_der) = self.certificate_request(names).await?;
        let finalize = order["finalize"].as_str().unwrap_or_default().to_string();
        self.post(&finalize, Some(&json!({ "csr": b64(&csr_der) })))
            .await?;
        let order = self.poll(&order_url, "order").await?;
        let certificate_url = order["certificate"]
            .as_str()
            .ok_or_else(|| AcmeError(format!("the order ended {}", order["status"])))?
            .to_string();
        let chain_pem = self
            .post(&certificate_url, None)
            .await?
            .text()
            .await
            .map_err(err)?;
        Ok(Certificate { chain_pem, key_pem })
    }

    /// A new key and a DER certificate request for `names`, by openssl.
    async fn certificate_request(&self, names: &[&str]) -> Result<(String, Vec<u8>), AcmeError> {
        let work = tempfile::tempdir_in(&self.work_dir).map_err(err)?;
        let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        let out = tokio::process::Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ])
            .args([
                "-keyout",
                "key.pem",
                "-outform",
                "DER",
                "-out",
                "request.der",
                "-subj",
            ])
            .arg(format!(
                "/CN={}",
                names.first().copied().unwrap_or("localhost")
            ))
            .arg("-addext")
            .arg(format!("subjectAltName={}", san.join(",")))
            .current_dir(work.path())
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(err)?;
        if !out.status.success() {
            return Err(AcmeError(format!(
                "openssl req failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let key = tokio::fs::read_to_string(work.path().join("key.pem"))
            .await
            .map_err(err)?;
        let der = tokio::fs::read(work.path().join("request.der"))
            .await
            .map_err(err)?;
        Ok((key, der))
    }
}
