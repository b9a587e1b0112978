//! What an archive may hold before Hefring unpacks it: a release artifact (unpacked by root
//! into a tree the site cannot change) or a backup (unpacked as the environment's user).
//!
//! A release is data, never privileges: regular files, directories and links that stay inside
//! the tree; permission bits only (no setuid, setgid or sticky bit); no hard link, device or
//! fifo; no absolute name, `..` or name given twice. A link's target is resolved as the kernel
//! would resolve it inside the unpacked tree (following the archive's other links), so a chain
//! of links cannot climb out either. The docroot and every `writable` path must be reached
//! without passing through a link, and no link outside a writable path may lead into one (PHP
//! must never run a file the site wrote).

use std::collections::BTreeMap;

/// What kind of entry an archive holds, as its header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    /// A symbolic link and its target, as written.
    Symlink(String),
    HardLink,
    /// A device, fifo or anything else.
    Other(String),
}

/// One entry of an archive: its name, kind and mode (permission and special bits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
}

/// Why an archive is refused, naming the entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ArchiveError {
    pub path: String,
    pub reason: String,
}

fn refuse(path: &str, reason: impl Into<String>) -> ArchiveError {
    ArchiveError {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// Links are followed at most this deep, as Linux does (ELOOP).
const MAX_LINK_DEPTH: usize = 40;

/// An entry's name as components, refusing absolute names, `..`, empty or control characters.
/// `./` prefixes and the root entry `.` are accepted (tar writes them).
fn components(path: &str) -> Result<Vec<String>, ArchiveError> {
    if path.starts_with('/') {
        return Err(refuse(path, "is an absolute name"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(refuse(path, "holds a control character"));
    }
    let mut out = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(refuse(path, "climbs out of the tree with '..'")),
            name => out.push(name.to_string()),
        }
    }
    Ok(out)
}

/// The tree an archive would unpack into: every entry by its components.
struct Tree {
    kinds: BTreeMap<Vec<String>, EntryKind>,
}

impl Tree {
    fn new(entries: &[Entry]) -> Result<Tree, ArchiveError> {
        let mut kinds = BTreeMap::new();
        for entry in entries {
            let parts = components(&entry.path)?;
            if parts.is_empty() {
                if entry.kind != EntryKind::Directory {
                    return Err(refuse(&entry.path, "the tree's root must be a directory"));
                }
                continue;
            }
            if kinds.insert(parts, entry.kind.clone()).is_some() {
                return Err(refuse(&entry.path, "is in the archive twice"));
            }
        }
        Ok(Tree { kinds })
    }

    fn link_at(&self, parts: &[String]) -> Option<&str> {
        match self.kinds.get(parts) {
            Some(EntryKind::Symlink(target)) => Some(target),
            _ => None,
        }
    }

    /// Where the link at `link` leads, inside the tree, following the archive's other links.
    /// `Err` when it leaves the tree (absolute, or above the root) or loops.
    fn resolve_link(&self, link: &[String]) -> Result<Vec<String>, String> {
        let mut depth = 0;
        let mut dir: Vec<String> = link[..link.len() - 1].to_vec();
        let target = self.link_at(link).unwrap_or_default().to_string();
        self.walk(&mut dir, &target, &mut depth)?;
        Ok(dir)
    }

    /// Walks `path` from `dir` (which becomes the result), following links.
    fn walk(&self, dir: &mut Vec<String>, path: &str, depth: &mut usize) -> Result<(), String> {
        if path.starts_with('/') {
            return Err(format!("points outside the tree ({path})"));
        }
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if dir.pop().is_none() {
                        return Err(format!("points outside the tree ({path})"));
                    }
                }
                name => {
                    dir.push(name.to_string());
                    if let Some(target) = self.link_at(dir) {
                        *depth += 1;
                        if *depth > MAX_LINK_DEPTH {
                            return Err("is a loop of links".into());
                        }
                        let target = target.to_string();
                        dir.pop();
                        self.walk(dir, &target, depth)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The first link met on the way to `path` (itself included), if any.
    fn link_on_the_way(&self, path: &[String]) -> Option<Vec<String>> {
        (1..=path.len())
            .map(|n| path[..n].to_vec())
            .find(|prefix| self.link_at(prefix).is_some())
    }
}

fn is_within(path: &[String], dir: &[String]) -> bool {
    path.len() >= dir.len() && path[..dir.len()] == *dir
}

/// Refuses an entry stored below a link of the archive (`d -> .`, then `d/x`): the checks
/// resolve names as written, while tar would follow the link it had just made, so every
/// entry must stand in real directories.
fn check_parents(tree: &Tree, entries: &[Entry]) -> Result<(), ArchiveError> {
    for entry in entries {
        let parts = components(&entry.path)?;
        if parts.len() > 1 {
            if let Some(link) = tree.link_on_the_way(&parts[..parts.len() - 1]) {
                return Err(refuse(
                    &entry.path,
                    format!("lies below the link {}", link.join("/")),
                ));
            }
        }
    }
    Ok(())
}

/// Checks a release artifact's entries against the trust rules above, for the manifest's
/// `docroot` and `writable` paths (already validated as relative paths without `..`).
pub fn check_release(
    entries: &[Entry],
    docroot: &str,
    writable: &[String],
) -> Result<(), ArchiveError> {
    let tree = Tree::new(entries)?;
    for entry in entries {
        match &entry.kind {
            EntryKind::File | EntryKind::Directory | EntryKind::Symlink(_) => {}
            EntryKind::HardLink => {
                return Err(refuse(
                    &entry.path,
                    "is a hard link, which a release may not hold",
                ))
            }
            EntryKind::Other(kind) => {
                return Err(refuse(
                    &entry.path,
                    format!("is a {kind}, which a release may not hold"),
                ))
            }
        }
        if entry.mode & !0o777 != 0 && !matches!(entry.kind, EntryKind::Symlink(_)) {
            return Err(refuse(
                &entry.path,
                format!(
                    "has mode {:o}: a release holds permission bits only (no setuid, setgid or sticky bit)",
                    entry.mode
                ),
            ));
        }
    }
    check_parents(&tree, entries)?;
    let writable: Vec<Vec<String>> = writable
        .iter()
        .map(|w| components(w))
        .collect::<Result<_, _>>()?;
    let docroot_parts = components(docroot)?;
    for (name, path) in std::iter::once((docroot, &docroot_parts))
        .chain(writable.iter().map(|w| ("writable path", w)))
    {
        if let Some(link) = tree.link_on_the_way(path) {
            return Err(refuse(
                &link.join("/"),
                format!(
                    "is a link on the way to the {}: it must be reached through directories only",
                    if name == docroot { "docroot" } else { name }
                ),
            ));
        }
    }
    for (path, kind) in &tree.kinds {
        if !matches!(kind, EntryKind::Symlink(_)) {
            continue;
        }
        let shown = path.join("/");
        let resolved = tree.resolve_link(path).map_err(|why| refuse(&shown, why))?;
        // Into a writable path, or to a directory holding one: either way the site's files
        // would be reachable under another URL, where nginx does not keep them from PHP.
        let inside_writable = writable.iter().any(|w| is_within(path, w));
        if !inside_writable
            && writable
                .iter()
                .any(|w| is_within(&resolved, w) || is_within(w, &resolved))
        {
            return Err(refuse(
                &shown,
                "leads into a writable path or a directory holding one, whose files the site writes and PHP must never run",
            ));
        }
    }
    Ok(())
}

/// The names a backup archive may hold at its top, beside the `files/` tree.
const BACKUP_TOP: [&str; 4] = [
    crate::backup::MANIFEST_FILE,
    crate::backup::FILES_LISTING,
    "database.sql",
    "database.sqlite",
];

/// Checks a backup archive before it is unpacked: the manifest, the files listing, a dump and
/// the `files/` tree, nothing else; regular files, directories and links that stay inside
/// `files/`; no hard link, device or fifo; no absolute name or `..`.
pub fn check_backup(entries: &[Entry]) -> Result<(), ArchiveError> {
    let tree = Tree::new(entries)?;
    check_parents(&tree, entries)?;
    let files_dir = vec![crate::backup::FILES_DIR.to_string()];
    for entry in entries {
        let parts = components(&entry.path)?;
        if parts.is_empty() {
            continue;
        }
        let top = parts[0].as_str();
        if parts.len() == 1 && BACKUP_TOP.contains(&top) {
            if entry.kind != EntryKind::File {
                return Err(refuse(&entry.path, "must be a regular file"));
            }
        } else if top != crate::backup::FILES_DIR {
            return Err(refuse(
                &entry.path,
                "is not part of a backup (a manifest, a dump and files/)",
            ));
        }
        match &entry.kind {
            EntryKind::File | EntryKind::Directory => {}
            EntryKind::Symlink(_) => {
                let resolved = tree
                    .resolve_link(&parts)
                    .map_err(|why| refuse(&entry.path, why))?;
                if !is_within(&resolved, &files_dir) {
                    return Err(refuse(&entry.path, "points outside files/"));
                }
            }
            EntryKind::HardLink => {
                return Err(refuse(
                    &entry.path,
                    "is a hard link, which a backup may not hold",
                ))
            }
            EntryKind::Other(kind) => {
                return Err(refuse(
                    &entry.path,
                    format!("is a {kind}, which a backup may not hold"),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File,
            mode: 0o644,
        }
    }
    fn dir(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Directory,
            mode: 0o755,
        }
    }
    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Symlink(target.into()),
            mode: 0o777,
        }
    }

    fn release(entries: &[Entry]) -> Result<(), String> {
        check_release(entries, "web", &["web/files".to_string()]).map_err(|e| e.to_string())
    }

    #[test]
    fn an_ordinary_release_passes() {
        let entries = [
            dir("."),
            dir("web"),
            file("web/index.php"),
            dir("vendor"),
            dir("vendor/bin"),
            dir("vendor/drush"),
            file("vendor/drush/drush"),
            link("vendor/bin/drush", "../drush/drush"),
            link("web/core", "../vendor"),
            dir("web/files"),
            link("web/files/latest", "a.txt"),
        ];
        assert_eq!(release(&entries), Ok(()));
    }

    #[test]
    fn links_that_leave_the_tree_are_refused() {
        let cases = [
            (link("web/leak", "/etc/passwd"), "web/leak: points outside"),
            (link("web/up", "../../etc"), "web/up: points outside"),
            (link("web/a", "b/../../.."), "web/a: points outside"),
        ];
        for (entry, expected) in cases {
            let entries = [dir("web"), entry];
            let error = release(&entries).unwrap_err();
            assert!(error.starts_with(expected), "{error}");
        }
        // A chain: each link looks harmless alone, the second climbs out through the first.
        let chain = [
            dir("web"),
            dir("a"),
            dir("a/b"),
            link("web/deep", "../a/b"),
            link("web/out", "deep/../../.."),
        ];
        let error = release(&chain).unwrap_err();
        assert!(error.starts_with("web/out"), "{error}");
        let lp = [dir("web"), link("web/x", "y"), link("web/y", "x")];
        assert!(release(&lp).unwrap_err().contains("loop"));
    }

    #[test]
    fn privileges_and_odd_entries_are_refused() {
        let mut setuid = file("web/tool");
        setuid.mode = 0o4755;
        assert!(release(&[dir("web"), setuid])
            .unwrap_err()
            .contains("setuid"));
        let hard = Entry {
            path: "web/h".into(),
            kind: EntryKind::HardLink,
            mode: 0o644,
        };
        assert!(release(&[dir("web"), hard])
            .unwrap_err()
            .contains("hard link"));
        let device = Entry {
            path: "web/null".into(),
            kind: EntryKind::Other("character device".into()),
            mode: 0o666,
        };
        assert!(release(&[dir("web"), device])
            .unwrap_err()
            .contains("device"));
        assert!(release(&[file("/etc/x")]).unwrap_err().contains("absolute"));
        assert!(release(&[file("web/../../x")]).unwrap_err().contains(".."));
        assert!(release(&[file("web/x"), file("./web/x")])
            .unwrap_err()
            .contains("twice"));
    }

    #[test]
    fn docroot_and_writable_paths_are_reached_through_directories_only() {
        // The attack: `leak -> /etc` committed, `leak/shadow` named writable.
        let leak = check_release(&[link("leak", "/etc")], ".", &["leak/shadow".to_string()])
            .unwrap_err()
            .to_string();
        assert!(leak.starts_with("leak:"), "{leak}");
        // Even a link that stays inside may not stand on the way.
        let inside = check_release(&[dir("real"), link("web", "real")], "web", &[])
            .unwrap_err()
            .to_string();
        assert!(inside.contains("docroot"), "{inside}");
        // A link into the writable path, from outside it, would let PHP run uploads.
        let into = release(&[dir("web"), dir("web/files"), link("web/up", "files")]).unwrap_err();
        assert!(into.contains("writable"), "{into}");
        // A link to a directory holding the writable path (a multisite alias of `web`).
        let parent = release(&[dir("web"), dir("web/files"), link("web/site", ".")]).unwrap_err();
        assert!(parent.contains("holding one"), "{parent}");
    }

    #[test]
    fn entries_below_a_link_are_refused() {
        // `d -> .` made first, then a link written through it: the name looks harmless, the
        // place tar puts it is not.
        let entries = [
            dir("web"),
            link("d", "."),
            link("d/d/d/web2", "../../../.."),
        ];
        let error = release(&entries).unwrap_err();
        assert!(error.contains("lies below the link d"), "{error}");
        let backup = [
            file("manifest.json"),
            dir("files"),
            link("files/d", "."),
            file("files/d/x"),
        ];
        assert!(check_backup(&backup)
            .unwrap_err()
            .to_string()
            .contains("below the link"));
    }

    #[test]
    fn backups_hold_a_manifest_a_dump_and_files_only() {
        let good = [
            file("manifest.json"),
            file("files.sha256"),
            file("database.sql"),
            dir("files"),
            dir("files/a"),
            file("files/a/x.jpg"),
            link("files/latest", "a/x.jpg"),
        ];
        assert_eq!(check_backup(&good), Ok(()));
        let refused = [
            (link("files/x", "/etc/shadow"), "outside"),
            (link("files/x", "../database.sql"), "outside files/"),
            (file("../x"), ".."),
            (file("/x"), "absolute"),
            (file("etc/cron.d/x"), "not part of a backup"),
            (
                Entry {
                    path: "files/h".into(),
                    kind: EntryKind::HardLink,
                    mode: 0o644,
                },
                "hard link",
            ),
            (
                Entry {
                    path: "files/dev".into(),
                    kind: EntryKind::Other("block device".into()),
                    mode: 0o644,
                },
                "device",
            ),
        ];
        for (entry, expected) in refused {
            let mut entries = good.to_vec();
            entries.push(entry);
            let error = check_backup(&entries).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
    }
}
