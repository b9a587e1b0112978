//! Secrets at rest: every secret the store keeps (target admin passwords, environment
//! database passwords, deploy keys, login links in flight) is sealed with the installation's
//! secret key before it reaches a row, and opened when it is read back. Records in memory hold
//! plaintext (inside [`crate::Secret`], which `Debug` does not print); rows hold
//! `enc:v1:KEY_ID:BASE64(nonce | ciphertext | tag)`.
//!
//! The cipher is ChaCha20-Poly1305 (ring, which the engine and rustls already use), with a
//! random 96-bit nonce per value and the value's place (`target:ID:mariadb.password`) as
//! associated data, so a sealed value copied into another row or field does not open.
//!
//! The key lives outside the database, in a file of its own (`DATA_DIR/secret.key` by default,
//! mode 0600): a copy of the database alone reveals no secret, and losing the key loses every
//! secret. A rotation keeps the previous key as `secret.key.old` until every value is sealed
//! again with the new one, so a crash at any point leaves every value readable.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::{Result, StoreError};

/// What every sealed value starts with: the format's version.
pub const SEALED_PREFIX: &str = "enc:v1:";

/// One 256-bit key and its id (derived from it, so a key file is the key alone).
pub struct SecretKey {
    id: String,
    bytes: [u8; 32],
    key: LessSafeKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.id)
    }
}

impl SecretKey {
    pub fn from_bytes(bytes: [u8; 32]) -> SecretKey {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &[b"hefring secret key id\0".as_slice(), &bytes].concat(),
        );
        let id = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &bytes).expect("a 32-byte ChaCha20 key"),
        );
        SecretKey { id, bytes, key }
    }

    /// A new random key.
    pub fn generate() -> SecretKey {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system's random source");
        SecretKey::from_bytes(bytes)
    }

    /// The key's id: 16 hex digits, the prefix of a hash of the key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key file's text.
    fn to_file_text(&self) -> String {
        format!("{}\n", STANDARD.encode(self.bytes))
    }

    fn from_file_text(path: &Path, text: &str) -> std::io::Result<SecretKey> {
        let bytes = STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "{} is not a Hefring secret key (one line: 32 bytes in base64)",
                    path.display()
                ))
            })?;
        Ok(SecretKey::from_bytes(bytes))
    }
}

/// Seals with the current key; opens with the current key or any older one still loaded
/// (a rotation in progress).
#[derive(Debug)]
pub struct Sealer {
    current: SecretKey,
    older: Vec<SecretKey>,
}

impl Sealer {
    pub fn new(current: SecretKey, older: Vec<SecretKey>) -> Sealer {
        let older = older.into_iter().filter(|k| k.id != current.id).collect();
        Sealer { current, older }
    }

    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Whether a key other than the current one is loaded (a rotation is not finished).
    pub fn has_older_keys(&self) -> bool {
        !self.older.is_empty()
    }

    /// Whether the key with this id is loaded.
    pub fn knows(&self, id: &str) -> bool {
        self.current.id == id || self.older.iter().any(|k| k.id == id)
    }

    /// `plaintext` sealed for `place` (which must be given again to open it).
    pub fn seal(&self, place: &str, plaintext: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's random source");
        let mut data = plaintext.as_bytes().to_vec();
        self.current
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(place.as_bytes()),
                &mut data,
            )
            .expect("sealing cannot fail for a value this size");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!(
            "{SEALED_PREFIX}{}:{}",
            self.current.id,
            URL_SAFE_NO_PAD.encode(out)
        )
    }

    /// Whether `stored` is a sealed value (else it is plaintext from before sealing).
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(SEALED_PREFIX)
    }

    /// Whether `stored` is sealed with the current key (nothing to do for it).
    pub fn is_current(&self, stored: &str) -> bool {
        stored
            .strip_prefix(SEALED_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(id, _)| id == self.current.id)
    }

    /// The plaintext of a value sealed for `place`. A value that is not sealed (written before
    /// secrets were sealed) is answered as it is: the start-up pass seals it.
    pub fn open(&self, place: &str, stored: &str) -> Result<String> {
        let Some(rest) = stored.strip_prefix(SEALED_PREFIX) else {
            return Ok(stored.to_string());
        };
        let corrupt = |why: &str| StoreError::Corrupt(format!("the secret {place} {why}"));
        let (id, body) = rest
            .split_once(':')
            .ok_or_else(|| corrupt("is not a sealed value"))?;
        let key = std::iter::once(&self.current)
            .chain(&self.older)
            .find(|k| k.id == id)
            .ok_or_else(|| {
                corrupt(&format!(
                    "is sealed with the secret key {id}, which this installation's key file does \
                     not hold (the key file must be the one the installation was set up with)"
                ))
            })?;
        let mut data = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| corrupt("is not a sealed value"))?;
        if data.len() < NONCE_LEN {
            return Err(corrupt("is not a sealed value"));
        }
        let mut sealed = data.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&data).map_err(|_| corrupt("is damaged"))?;
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(place.as_bytes()), &mut sealed)
            .map_err(|_| corrupt("does not open (damaged, or copied from elsewhere)"))?;
        String::from_utf8(plain.to_vec()).map_err(|_| corrupt("is not text"))
    }
}

/// The key file and its rotation companion (`PATH.old`, the previous key, present only while
/// a rotation is unfinished).
#[derive(Clone, Debug)]
pub struct KeyFiles {
    pub path: PathBuf,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `key` to `path` through a temporary file renamed over it (0600, synced).
fn write_key(path: &Path, key: &SecretKey) -> std::io::Result<()> {
    let tmp = with_suffix(path, ".tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(key.to_file_text().as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn read_key(path: &Path) -> std::io::Result<Option<SecretKey>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            // Readable by its owner alone, whoever made it.
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            }
            SecretKey::from_file_text(path, &text).map(Some)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("cannot read the secret key {}: {e}", path.display()),
        )),
    }
}

impl KeyFiles {
    pub fn new(path: impl Into<PathBuf>) -> KeyFiles {
        KeyFiles { path: path.into() }
    }

    /// Where the previous key waits while a rotation is unfinished.
    pub fn old_path(&self) -> PathBuf {
        with_suffix(&self.path, ".old")
    }

    /// The sealer of the key file (and of the previous key, while a rotation is unfinished);
    /// `None` when there is no key file yet.
    pub fn load(&self) -> std::io::Result<Option<Sealer>> {
        let Some(current) = read_key(&self.path)? else {
            return Ok(None);
        };
        let older = read_key(&self.old_path())?.into_iter().collect();
        Ok(Some(Sealer::new(current, older)))
    }

    /// The key file's sealer, making a new key when there is no key file.
    pub fn load_or_create(&self) -> std::io::Result<Sealer> {
        if let Some(sealer) = self.load()? {
            return Ok(sealer);
        }
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let key = SecretKey::generate();
        write_key(&self.path, &key)?;
        Ok(Sealer::new(key, Vec::new()))
    }

    /// Starts (or resumes) a rotation: afterwards the key file holds a new key and `PATH.old`
    /// the previous one, and the answered sealer seals with the new key and opens with both.
    /// Every step leaves a state a crash can resume from: the key file always holds either the
    /// previous key or the new one, and the previous key is kept in `PATH.old` before the key
    /// file changes.
    pub fn begin_rotation(&self) -> std::io::Result<Sealer> {
        let current = read_key(&self.path)?.ok_or_else(|| {
            std::io::Error::other(format!(
                "there is no secret key at {} to rotate",
                self.path.display()
            ))
        })?;
        match read_key(&self.old_path())? {
            // The key file already changed: an interrupted rotation, to finish.
            Some(old) if old.id != current.id => return Ok(Sealer::new(current, vec![old])),
            Some(_) => {}
            None => write_key(&self.old_path(), &current)?,
        }
        let new = SecretKey::generate();
        write_key(&self.path, &new)?;
        Ok(Sealer::new(new, vec![current]))
    }

    /// Ends a rotation once every value is sealed with the new key: the previous key goes.
    pub fn finish_rotation(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.old_path()) {
            Ok(()) => sync_dir(&self.path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_place() {
        let a = Sealer::new(SecretKey::generate(), Vec::new());
        let sealed = a.seal("target:t1:mariadb.password", "s3cret-value");
        assert!(sealed.starts_with(&format!("enc:v1:{}:", a.current_id())));
        assert!(!sealed.contains("s3cret"));
        assert!(a.is_current(&sealed));
        assert_eq!(
            a.open("target:t1:mariadb.password", &sealed).unwrap(),
            "s3cret-value"
        );
        // Another place, another key, a damaged value: refused.
        assert!(a.open("target:t2:mariadb.password", &sealed).is_err());
        let b = Sealer::new(SecretKey::generate(), Vec::new());
        let err = b
            .open("target:t1:mariadb.password", &sealed)
            .unwrap_err()
            .to_string();
        assert!(err.contains(a.current_id()), "{err}");
        let mut damaged = sealed.clone();
        damaged.pop();
        damaged.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(a.open("target:t1:mariadb.password", &damaged).is_err());
        // Two seals of one value differ (a fresh nonce each time).
        assert_ne!(a.seal("p", "v"), a.seal("p", "v"));
        // Plaintext from before sealing reads as it is.
        assert_eq!(a.open("p", "plain").unwrap(), "plain");
        assert_eq!(format!("{a:?}").matches("SecretKey(").count(), 1);
    }

    #[test]
    fn a_rotation_keeps_every_value_readable_at_every_step() {
        let dir = tempfile::tempdir().unwrap();
        let files = KeyFiles::new(dir.path().join("secret.key"));
        assert!(files.load().unwrap().is_none());
        let first = files.load_or_create().unwrap();
        let mode = std::fs::metadata(&files.path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let v1 = first.seal("p", "value");
        assert_eq!(
            files.load_or_create().unwrap().current_id(),
            first.current_id()
        );

        // Interrupted after the old key was kept but before the key file changed: the
        // rotation goes on with a new key.
        std::fs::copy(&files.path, files.old_path()).unwrap();
        let rotating = files.begin_rotation().unwrap();
        assert_ne!(rotating.current_id(), first.current_id());
        assert!(rotating.has_older_keys());
        assert_eq!(rotating.open("p", &v1).unwrap(), "value");
        // Interrupted after the key file changed: resumed with the same keys.
        let resumed = files.load().unwrap().unwrap();
        assert_eq!(resumed.current_id(), rotating.current_id());
        assert_eq!(resumed.open("p", &v1).unwrap(), "value");
        let again = files.begin_rotation().unwrap();
        assert_eq!(again.current_id(), rotating.current_id());
        let v2 = again.seal("p", "value");
        files.finish_rotation().unwrap();
        let done = files.load().unwrap().unwrap();
        assert!(!done.has_older_keys());
        assert_eq!(done.open("p", &v2).unwrap(), "value");
        assert!(done.open("p", &v1).is_err(), "the old key is gone");
    }
}
