//! A directory as an object store: objects at `root/key`. The directory may be an NFS share
//! all workers mount; everything here works through renames within one directory, which NFS
//! also makes atomic.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures::StreamExt;
use tokio_util::io::ReaderStream;

use crate::key::is_valid_key;
use crate::{validate_key, validate_prefix, ObjectError, ObjectInfo, ObjectStore, ObjectStream};

/// Temporary files start with this; `~` is not allowed in keys, so a listing can never
/// mistake one (left behind by a crash) for an object.
pub(crate) const TEMP_PREFIX: &str = ".hefring~";

/// Objects as files under a root directory.
#[derive(Clone, Debug)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    /// A store rooted at an absolute path. The directory is created by the first put.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, ObjectError> {
        let root = root.into();
        if !root.is_absolute() {
            return Err(ObjectError::InvalidSpec(format!(
                "{}: the object directory must be an absolute path",
                root.display()
            )));
        }
        Ok(LocalDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a (validated) key lives.
    fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

/// Errors that mean "no object there": the file is missing, or a directory on its path is a
/// file (key `a/b` when `a` is an object).
fn is_absent(error: &std::io::Error) -> bool {
    matches!(error.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
}

pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ObjectError> + Send + 'static,
) -> Result<T, ObjectError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ObjectError::io("file task", std::io::Error::other(error)))?
}

/// Copies `source` into a new temporary file in `dir`, flushed to disk, and renames it to
/// `destination` (in `dir`). Returns the bytes copied.
fn copy_atomically(source: &mut File, dir: &Path, destination: &Path) -> Result<u64, ObjectError> {
    let mut temp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(|e| {
            ObjectError::io(format!("creating a temporary file in {}", dir.display()), e)
        })?;
    let size = std::io::copy(source, temp.as_file_mut())
        .map_err(|e| ObjectError::io(format!("writing {}", temp.path().display()), e))?;
    temp.as_file()
        .sync_all()
        .map_err(|e| ObjectError::io(format!("flushing {}", temp.path().display()), e))?;
    temp.persist(destination)
        .map_err(|e| ObjectError::io(format!("renaming to {}", destination.display()), e.error))?;
    // The rename itself is durable once the directory is flushed too.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(size)
}

pub(crate) fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[async_trait]
impl ObjectStore for LocalDir {
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError> {
        validate_key(key)?;
        let destination = self.path_of(key);
        let source = path.to_path_buf();
        blocking(move || {
            let mut file = File::open(&source)
                .map_err(|e| ObjectError::io(format!("opening {}", source.display()), e))?;
            let dir = parent_of(&destination);
            std::fs::create_dir_all(&dir)
                .map_err(|e| ObjectError::io(format!("creating {}", dir.display()), e))?;
            copy_atomically(&mut file, &dir, &destination)
        })
        .await
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64, ObjectError> {
        validate_key(key)?;
        let source = self.path_of(key);
        let destination = path.to_path_buf();
        let key = key.to_owned();
        blocking(move || {
            let mut file = match File::open(&source) {
                Ok(file) => file,
                Err(e) if is_absent(&e) => return Err(ObjectError::NotFound { key }),
                Err(e) => return Err(ObjectError::io(format!("opening {}", source.display()), e)),
            };
            let metadata = file
                .metadata()
                .map_err(|e| ObjectError::io(format!("reading {}", source.display()), e))?;
            if !metadata.is_file() {
                return Err(ObjectError::NotFound { key });
            }
            copy_atomically(&mut file, &parent_of(&destination), &destination)
        })
        .await
    }

    async fn open(&self, key: &str) -> Result<(u64, ObjectStream), ObjectError> {
        validate_key(key)?;
        let path = self.path_of(key);
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if is_absent(&e) => {
                return Err(ObjectError::NotFound {
                    key: key.to_owned(),
                })
            }
            Err(e) => return Err(ObjectError::io(format!("opening {}", path.display()), e)),
        };
        let metadata = file
            .metadata()
            .await
            .map_err(|e| ObjectError::io(format!("reading {}", path.display()), e))?;
        if !metadata.is_file() {
            return Err(ObjectError::NotFound {
                key: key.to_owned(),
            });
        }
        // Objects are replaced by renames, so this open file keeps the object as it was.
        Ok((
            metadata.len(),
            ReaderStream::with_capacity(file, 64 * 1024).boxed(),
        ))
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, ObjectError> {
        validate_key(key)?;
        let path = self.path_of(key);
        match tokio::fs::metadata(&path).await {
            Ok(metadata) if metadata.is_file() => Ok(Some(metadata.len())),
            Ok(_) => Ok(None),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(ObjectError::io(format!("reading {}", path.display()), e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        validate_key(key)?;
        let path = self.path_of(key);
        // Emptied directories stay: removing them would race with a put creating its file there.
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if is_absent(&e) || e.kind() == ErrorKind::IsADirectory => Ok(()),
            Err(e) => Err(ObjectError::io(format!("deleting {}", path.display()), e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ObjectError> {
        validate_prefix(prefix)?;
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            // Only the directory the prefix is certainly inside needs walking.
            let start = match prefix.rfind('/') {
                Some(slash) => root.join(&prefix[..slash]),
                None => root.clone(),
            };
            let mut found = Vec::new();
            walk(&root, &start, &prefix, &mut found)?;
            found.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(found)
        })
        .await
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// Collects the objects below `dir` whose keys start with `prefix`. Symbolic links are not
/// followed; names that are not keys (temporary files, anything else) are skipped.
fn walk(
    root: &Path,
    dir: &Path,
    prefix: &str,
    found: &mut Vec<ObjectInfo>,
) -> Result<(), ObjectError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if is_absent(&e) => return Ok(()),
        Err(e) => return Err(ObjectError::io(format!("listing {}", dir.display()), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| ObjectError::io(format!("listing {}", dir.display()), e))?;
        let path = entry.path();
        let Some(key) = path
            .strip_prefix(root)
            .ok()
            .and_then(|relative| relative.to_str())
        else {
            continue;
        };
        let file_type = match entry.file_type() {
            Ok(file_type) => file_type,
            // Deleted while listing.
            Err(e) if is_absent(&e) => continue,
            Err(e) => return Err(ObjectError::io(format!("reading {}", path.display()), e)),
        };
        if !is_valid_key(key) {
            continue;
        }
        if file_type.is_dir() {
            // Only descend where keys with the prefix can be.
            let as_prefix = format!("{key}/");
            if as_prefix.starts_with(prefix) || prefix.starts_with(&as_prefix) {
                walk(root, &path, prefix, found)?;
            }
        } else if file_type.is_file() && key.starts_with(prefix) {
            match entry.metadata() {
                Ok(metadata) => found.push(ObjectInfo {
                    key: key.to_owned(),
                    size: metadata.len(),
                }),
                Err(e) if is_absent(&e) => continue,
                Err(e) => return Err(ObjectError::io(format!("reading {}", path.display()), e)),
            }
        }
    }
    Ok(())
}
