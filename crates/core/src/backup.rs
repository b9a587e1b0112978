//! Backups: what an archive holds and how Hefring decides that a dump is complete.
//!
//! An archive is one `tar.zst` with `manifest.json`, the database dump (`database.sql`, or
//! `database.sqlite` for SQLite), `files.sha256` (the SHA-256 of every persistent file) and the
//! `files/` tree. The manifest records the SHA-256 of each part, so a restore checks what it
//! unpacked before it overwrites anything.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::DatabaseKind;

/// The archive format this version writes and reads.
pub const FORMAT: u32 = 1;

/// Inside an archive.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const FILES_LISTING: &str = "files.sha256";
pub const FILES_DIR: &str = "files";

/// The manifest of a backup archive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub format: u32,
    pub backup: String,
    pub environment: String,
    pub environment_name: String,
    pub project: String,
    pub release: Option<String>,
    pub commit: Option<String>,
    /// ISO 8601, UTC.
    pub created_at: String,
    /// `None` when the environment has no database, or the backup leaves it out (a sync of
    /// files only).
    pub database: Option<DatabasePart>,
    /// `None` when the backup leaves the files out (a sync of the database only).
    pub files: Option<FilesPart>,
    /// `tool -> its --version line`, for whoever restores it years later.
    pub tools: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatabasePart {
    pub kind: DatabaseKind,
    /// The dump's name in the archive.
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// Tables in the dump (equal to the catalog's count when it was taken).
    pub tables: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FilesPart {
    pub count: u64,
    pub bytes: u64,
    /// SHA-256 of `files.sha256`, the sorted listing of every file's SHA-256.
    pub sha256: String,
}

/// The name of a database's dump inside an archive.
pub fn dump_file(kind: DatabaseKind) -> &'static str {
    match kind {
        DatabaseKind::Sqlite => "database.sqlite",
        _ => "database.sql",
    }
}

/// Where an environment's backup lives in the backup store.
pub fn object_key(environment: &str, backup: &str) -> String {
    format!("backups/{environment}/{backup}.tar.zst")
}

/// What Hefring learns of a dump once it is written: its last lines, and how many tables it
/// creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpFacts {
    /// The dump's last few lines.
    pub tail: String,
    pub tables_in_dump: u64,
    /// Tables in the database's catalog, read just before the dump.
    pub tables_in_catalog: u64,
    /// SQLite: `PRAGMA integrity_check` of the copy.
    pub integrity: Option<String>,
}

/// Refuses a dump that is not whole: one without its tool's completion marker (it was cut
/// short) or with fewer tables than the catalog had. An incomplete backup must never be
/// recorded as a good one.
pub fn check_dump(kind: DatabaseKind, facts: &DumpFacts) -> Result<(), String> {
    // The last line that says something: pg_dump closes with `--` lines, blank lines and
    // (since 15.14) an `\unrestrict` line after its marker.
    let last = facts
        .tail
        .lines()
        .map(str::trim)
        .rev()
        .find(|l| !l.is_empty() && *l != "--" && !l.starts_with("\\unrestrict "))
        .unwrap_or_default();
    match kind {
        DatabaseKind::Mariadb if !last.starts_with("-- Dump completed") => {
            return Err(format!(
                "the dump is incomplete: it does not end with mysqldump's \"-- Dump completed\" (its last line: {:?})",
                truncate(last)
            ))
        }
        DatabaseKind::Postgresql if last != "-- PostgreSQL database dump complete" => {
            return Err(format!(
                "the dump is incomplete: it does not end with pg_dump's \"-- PostgreSQL database dump complete\" (its last line: {:?})",
                truncate(last)
            ))
        }
        DatabaseKind::Sqlite if facts.integrity.as_deref() != Some("ok") => {
            return Err(format!(
                "the database copy fails its integrity check: {}",
                facts.integrity.as_deref().unwrap_or("no answer")
            ))
        }
        _ => {}
    }
    if facts.tables_in_dump < facts.tables_in_catalog {
        return Err(format!(
            "the dump is incomplete: it has {} tables, the database has {}",
            facts.tables_in_dump, facts.tables_in_catalog
        ));
    }
    Ok(())
}

fn truncate(line: &str) -> String {
    line.chars().take(80).collect()
}

/// Checks the manifest of an archive about to be restored into an environment whose
/// database is `destination`: same format, and a dump of the same kind of database.
pub fn check_restorable(
    manifest: &BackupManifest,
    destination: DatabaseKind,
    want_database: bool,
) -> Result<(), String> {
    if manifest.format != FORMAT {
        return Err(format!(
            "the archive has format {}, this Hefring reads format {FORMAT}",
            manifest.format
        ));
    }
    if !want_database {
        return Ok(());
    }
    match &manifest.database {
        Some(part) if part.kind != destination => Err(format!(
            "the backup holds a {} database, the environment uses {}",
            part.kind.as_str(),
            destination.as_str()
        )),
        None if destination != DatabaseKind::None => {
            Err("the backup holds no database, the environment has one".into())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(last: &str, dump: u64, catalog: u64) -> DumpFacts {
        DumpFacts {
            tail: format!("SET x = 1;\n{last}\n"),
            tables_in_dump: dump,
            tables_in_catalog: catalog,
            integrity: None,
        }
    }

    #[test]
    fn a_whole_dump_passes() {
        let done = facts("-- Dump completed on 2026-11-25 10:00:00", 12, 12);
        assert_eq!(check_dump(DatabaseKind::Mariadb, &done), Ok(()));
        let pg = facts("-- PostgreSQL database dump complete", 3, 3);
        assert_eq!(check_dump(DatabaseKind::Postgresql, &pg), Ok(()));
        // As pg_dump 15.19 really ends.
        let mut pg_tail = pg.clone();
        pg_tail.tail =
            "--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict di8UOQBng90\n\n".into();
        assert_eq!(check_dump(DatabaseKind::Postgresql, &pg_tail), Ok(()));
    }

    #[test]
    fn a_dump_cut_short_fails() {
        let cut = facts("INSERT INTO `page` VALUES (1,'Main", 12, 12);
        let err = check_dump(DatabaseKind::Mariadb, &cut).unwrap_err();
        assert!(err.contains("Dump completed"), "{err}");
        // The PostgreSQL marker is not MariaDB's, and the other way round.
        let pg_marker = facts("-- PostgreSQL database dump complete", 3, 3);
        assert!(check_dump(DatabaseKind::Mariadb, &pg_marker).is_err());
        let my_marker = facts("-- Dump completed on x", 3, 3);
        assert!(check_dump(DatabaseKind::Postgresql, &my_marker).is_err());
    }

    #[test]
    fn fewer_tables_than_the_catalog_fails() {
        let short = facts("-- Dump completed on x", 11, 12);
        let err = check_dump(DatabaseKind::Mariadb, &short).unwrap_err();
        assert!(err.contains("11 tables") && err.contains("has 12"), "{err}");
    }

    #[test]
    fn sqlite_needs_an_intact_copy() {
        let mut ok = facts("", 2, 2);
        ok.integrity = Some("ok".into());
        assert_eq!(check_dump(DatabaseKind::Sqlite, &ok), Ok(()));
        let mut bad = ok.clone();
        bad.integrity = Some("database disk image is malformed".into());
        assert!(check_dump(DatabaseKind::Sqlite, &bad).is_err());
    }

    fn manifest(database: Option<DatabaseKind>) -> BackupManifest {
        BackupManifest {
            format: FORMAT,
            backup: "bak_1".into(),
            environment: "env_1".into(),
            environment_name: "live".into(),
            project: "prj_1".into(),
            release: Some("rel_1".into()),
            commit: Some("abc".into()),
            created_at: "2026-11-25T10:00:00Z".into(),
            database: database.map(|kind| DatabasePart {
                kind,
                file: dump_file(kind).into(),
                size: 1,
                sha256: "00".repeat(32),
                tables: 1,
            }),
            files: None,
            tools: BTreeMap::new(),
        }
    }

    #[test]
    fn restores_need_the_same_kind_of_database() {
        let maria = manifest(Some(DatabaseKind::Mariadb));
        assert_eq!(
            check_restorable(&maria, DatabaseKind::Mariadb, true),
            Ok(())
        );
        let err = check_restorable(&maria, DatabaseKind::Postgresql, true).unwrap_err();
        assert!(
            err.contains("mariadb") && err.contains("postgresql"),
            "{err}"
        );
        // Files only: the database does not matter.
        assert_eq!(
            check_restorable(&maria, DatabaseKind::Postgresql, false),
            Ok(())
        );
        let none = manifest(None);
        assert!(check_restorable(&none, DatabaseKind::Mariadb, true).is_err());
        assert_eq!(check_restorable(&none, DatabaseKind::None, true), Ok(()));
        let mut future = maria.clone();
        future.format = FORMAT + 1;
        assert!(check_restorable(&future, DatabaseKind::Mariadb, true).is_err());
    }

    #[test]
    fn keys_and_dump_names() {
        assert_eq!(object_key("env_1", "bak_2"), "backups/env_1/bak_2.tar.zst");
        assert_eq!(dump_file(DatabaseKind::Sqlite), "database.sqlite");
        assert_eq!(dump_file(DatabaseKind::Postgresql), "database.sql");
    }
}
