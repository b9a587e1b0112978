//! Deploy keys: an ed25519 key pair per project, made here (ring) in OpenSSH's formats, so
//! that a repository's host can trust one project's fetches without trusting the
//! installation's key (which every target trusts).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// A new key pair: (the OpenSSH private key file's text, the `ssh-ed25519 BASE64 COMMENT`
/// public line).
pub fn generate(comment: &str) -> (String, String) {
    let rng = SystemRandom::new();
    let mut seed = [0u8; 32];
    rng.fill(&mut seed).expect("the system's random source");
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("a 32-byte seed");
    let public: &[u8] = pair.public_key().as_ref();

    let mut public_blob = Vec::new();
    put_string(&mut public_blob, b"ssh-ed25519");
    put_string(&mut public_blob, public);

    // The private section, unencrypted: two equal check words, the key, the comment, then
    // padding 1, 2, 3, ... to a multiple of 8 (PROTOCOL.key in OpenSSH).
    let mut check = [0u8; 4];
    rng.fill(&mut check).expect("the system's random source");
    let mut private = Vec::new();
    private.extend_from_slice(&check);
    private.extend_from_slice(&check);
    put_string(&mut private, b"ssh-ed25519");
    put_string(&mut private, public);
    put_string(&mut private, &[seed.as_slice(), public].concat());
    put_string(&mut private, comment.as_bytes());
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }

    let mut file = b"openssh-key-v1\0".to_vec();
    put_string(&mut file, b"none");
    put_string(&mut file, b"none");
    put_string(&mut file, b"");
    file.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut file, &public_blob);
    put_string(&mut file, &private);
    seed.fill(0);

    let body = STANDARD.encode(&file);
    let mut pem = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(70) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END OPENSSH PRIVATE KEY-----\n");
    let line = format!("ssh-ed25519 {} {comment}", STANDARD.encode(&public_blob));
    (pem, line)
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ssh_keygen_reads_the_private_key_and_derives_the_same_public_key() {
        let (private, public) = super::generate("hefring-prj_1");
        let (_, other) = super::generate("hefring-prj_1");
        assert_ne!(public, other);
        assert!(public.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, &private).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = std::process::Command::new("ssh-keygen")
            .args(["-y", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let derived = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            derived.split_whitespace().take(2).collect::<Vec<_>>(),
            public.split_whitespace().take(2).collect::<Vec<_>>()
        );
    }
}
