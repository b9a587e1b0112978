//! Backups of environments on server targets, and what is made of them: restore (into the
//! same or another environment), clone and sync.
//!
//! A backup is made on the target, in `ROOT/backups/BACKUP_ID/`: a consistent dump checked
//! against the database's catalog, the SHA-256 of every persistent file (read as the web user,
//! as the site reads them: a file the site cannot read fails the backup, and root's powers are
//! never lent to a tree the site writes), a manifest, then one `tar.zst` stored in the backup
//! store. A restore unpacks an archive in `ROOT/backups/restore-OP/`, checks every SHA-256 the
//! manifest lists, and only then replaces the database and the files.
//!
//! Every record is written before what it describes is made, and found again by the
//! operation's id, so a retried task picks up what its first attempt began.

use std::collections::BTreeMap;
use std::path::PathBuf;

use hefring_backend_server::CommandSpec;
use hefring_core::backup::{self, BackupManifest, DatabasePart, DumpFacts, FilesPart};
use hefring_core::environment::format_ms;
use hefring_core::manifest::{DatabaseKind, Manifest};
use hefring_core::{new_id, IdKind};
use hefring_store::{BackupFilter, BackupRecord, Page};
use serde_json::json;

use super::environment::{
    dump_command, load_command, manifest, mariadb_admin, psql_admin, psql_admin_on, run_sql,
    served_release, DumpIn, Site,
};
use crate::run::{require_success, run_captured, TaskContext, TaskError, TaskOutput, TaskResult};
use crate::time::now_ms;

/// The zstd level of archives (zstd's default: fast, and most of a site compresses well).
pub const ZSTD_LEVEL: u32 = 3;

/// Prints the SHA-256 of its arguments as `HEX  NAME` lines, with openssl when it is there (it
/// uses the CPU's SHA instructions; coreutils' sha256sum does not).
/// Defined as `$d` too, for the shells `xargs` starts (it has no single quote, so it can be).
/// A file that cannot be read fails it (its output is held, not piped, so that openssl's
/// status is not lost behind sed's).
const DIGEST: &str = r#"d='digest() { if command -v openssl >/dev/null 2>&1; then o=$(openssl dgst -sha256 -r "$@") || return 1; printf "%s\n" "$o" | sed "s/ \*/  /"; else sha256sum -- "$@"; fi; }'; eval "$d""#;

/// What a backup takes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Parts {
    pub database: bool,
    pub files: bool,
}

const EVERYTHING: Parts = Parts {
    database: true,
    files: true,
};

/// The backup this operation makes of `environment` (its `role`: manual, scheduled, safety or
/// copy), recorded before anything is made. A retried task finds the record its first attempt
/// wrote.
async fn backup_record(
    t: &TaskContext<'_>,
    environment: &str,
    kind: &str,
    description: &str,
) -> Result<BackupRecord, TaskError> {
    let existing = t
        .ctx
        .store
        .list_backups(
            &BackupFilter {
                environment: Some(environment.to_string()),
                operation: Some(t.op.id.clone()),
                kind: Some(kind.to_string()),
                status: None,
            },
            &Page {
                limit: 1,
                cursor: None,
            },
        )
        .await?;
    if let Some(mut found) = existing.items.into_iter().next() {
        // A retried operation makes the backup its failed attempt began.
        if found.status == "failed" {
            found.status = "creating".into();
            found.updated_at = now_ms();
            t.ctx.store.update_backup(&found).await?;
        }
        return Ok(found);
    }
    // A scheduled backup is dated by the slot it was scheduled for (the scheduler's clock,
    // which tests drive), so retention counts days as the schedule does.
    let now = match (kind, t.op.inputs["scheduled_for"].as_i64()) {
        ("scheduled", Some(slot)) => slot,
        _ => now_ms(),
    };
    let id = new_id(IdKind::Backup, now);
    let record = BackupRecord {
        object_key: backup::object_key(environment, &id),
        id,
        environment_id: environment.to_string(),
        operation_id: t.op.id.clone(),
        kind: kind.to_string(),
        description: description.to_string(),
        status: "creating".into(),
        size: None,
        sha256: None,
        manifest: None,
        created_at: now,
        updated_at: now,
    };
    t.ctx.store.insert_backup(&record).await?;
    Ok(record)
}

/// `key value` lines, then (after a line `tail`) the rest verbatim.
fn facts_of(out: &str) -> (BTreeMap<String, String>, String) {
    let mut map = BTreeMap::new();
    let mut lines = out.lines();
    for line in lines.by_ref() {
        if line == "tail" {
            break;
        }
        if let Some((key, value)) = line.split_once(' ') {
            map.insert(key.to_string(), value.trim().to_string());
        }
    }
    (map, lines.collect::<Vec<_>>().join("\n"))
}

fn number(facts: &BTreeMap<String, String>, key: &str) -> Result<u64, TaskError> {
    facts
        .get(key)
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| TaskError(format!("the target did not report {key}")))
}

fn text(facts: &BTreeMap<String, String>, key: &str) -> Result<String, TaskError> {
    facts
        .get(key)
        .cloned()
        .ok_or_else(|| TaskError(format!("the target did not report {key}")))
}

/// Runs a dump command (the arguments after the file; it writes the file itself), then
/// counts the dump's tables and takes its SHA-256 at once, each on its own core, from the page
/// cache; then reports its size and last lines. (The dump writes its file directly: piping
/// it through tee to a digest and a counter as it is made slowed the dump by a fifth, the
/// extra processes and pipe copies competing with the database for the cores.)
const DUMP_AND_CHECK: &str = r#"set -e
umask 077
f=$1; shift
DIGEST
rm -f "$f" "$f.sum"
code=0; "$@" || code=$?
if [ "$code" -ne 0 ]; then echo "the dump command exited with status $code" >&2; exit 1; fi
[ -f "$f" ] || { echo "the dump command wrote no file" >&2; exit 1; }
digest "$f" > "$f.sum" &
summing=$!
echo "tables $(grep -c '^CREATE TABLE' "$f" || true)"
wait "$summing" || { echo "reading the dump failed" >&2; exit 1; }
echo "size $(stat -c %s "$f")"
echo "sha256 $(cut -d' ' -f1 "$f.sum")"
rm -f "$f.sum"
echo tail
tail -n 8 "$f"
"#;

/// Dumps the database into `path` through [`DUMP_AND_CHECK`]; answers the facts and the tail.
async fn dump_and_check(
    site: &Site<'_>,
    access: &hefring_core::environment::DatabaseAccess,
    path: &str,
    tool_name: &str,
) -> Result<(BTreeMap<String, String>, String), TaskError> {
    let dump = dump_command(site, access, path);
    let mut args = vec![path.to_string()];
    args.extend(dump.argv);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let spec =
        crate::tasks::server::script_spec(&with_digest(DUMP_AND_CHECK), &args).envs(dump.env);
    let (code, out) = run_captured(site.server.exec.as_ref(), &spec, site.server.log).await?;
    require_success(code, tool_name)?;
    Ok(facts_of(&out))
}

/// SQLite's online backup of a live database, checked for integrity and against the tables
/// of the original.
const SQLITE_DUMP: &str = r#"set -e
src=$1; dest=$2
DIGEST
if [ -f "$src" ]; then
  sqlite3 "$src" ".backup '$dest'"
  echo "catalog $(sqlite3 "$src" "SELECT count(*) FROM sqlite_master WHERE type='table'")"
  echo "tables $(sqlite3 "$dest" "SELECT count(*) FROM sqlite_master WHERE type='table'")"
  echo "integrity $(sqlite3 "$dest" 'PRAGMA integrity_check' | head -n 1)"
else
  : > "$dest"; echo "catalog 0"; echo "tables 0"; echo "integrity ok"
fi
echo "size $(wc -c < "$dest")"
echo "sha256 $(digest "$dest" | cut -d' ' -f1)"
"#;

fn with_digest(script: &str) -> String {
    script.replace("DIGEST", DIGEST)
}

/// Runs SQL as the database admin and answers its output.
async fn query(site: &Site<'_>, spec: CommandSpec, sql: &str) -> Result<String, TaskError> {
    let (code, out) = run_captured(
        site.server.exec.as_ref(),
        &spec.stdin(sql.to_string()),
        site.server.log,
    )
    .await?;
    require_success(code, "reading the database's catalog")?;
    Ok(out)
}

/// Dumps the environment's database into `stage` and refuses a dump that is not whole.
async fn dump_into(
    site: &Site<'_>,
    manifest: &Manifest,
    stage: &str,
) -> Result<Option<DatabasePart>, TaskError> {
    let Some(access) = site.database(manifest) else {
        return Ok(None);
    };
    let file = backup::dump_file(access.kind);
    let path = match access.kind {
        DatabaseKind::Sqlite => format!("{}/{file}", site_stage(stage)),
        _ => format!("{stage}/{file}"),
    };
    let (facts, tail, catalog) = match access.kind {
        DatabaseKind::Mariadb => {
            let mut count = mariadb_admin(site);
            count.argv.push("--skip-column-names".into());
            let catalog = query(
                site,
                count,
                &format!(
                    "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '{}' AND table_type = 'BASE TABLE';",
                    access.name
                ),
            )
            .await?;
            let (facts, tail) = dump_and_check(site, &access, &path, "mysqldump").await?;
            (facts, tail, catalog.trim().parse::<u64>().ok())
        }
        DatabaseKind::Postgresql => {
            let mut count = psql_admin_on(site, &access.name);
            count.argv.push("-At".into());
            let catalog = query(
                site,
                count,
                "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema');",
            )
            .await?;
            let (facts, tail) = dump_and_check(site, &access, &path, "pg_dump").await?;
            (facts, tail, catalog.trim().parse::<u64>().ok())
        }
        DatabaseKind::Sqlite => {
            // The site's own file, read by the site's own user: a link it planted in its
            // database directory leads nowhere it could not read already.
            let out = site
                .site_sh(
                    "copying the SQLite database",
                    &with_digest(SQLITE_DUMP),
                    &[&access.path, &path],
                )
                .await?;
            let (facts, tail) = facts_of(&out);
            let catalog = facts.get("catalog").and_then(|c| c.parse().ok());
            (facts, tail, catalog)
        }
        DatabaseKind::None => return Ok(None),
    };
    let checked = DumpFacts {
        tail,
        tables_in_dump: number(&facts, "tables")?,
        tables_in_catalog: catalog
            .ok_or_else(|| TaskError::new("the database's catalog gave no table count"))?,
        integrity: facts.get("integrity").cloned(),
    };
    backup::check_dump(access.kind, &checked).map_err(TaskError)?;
    Ok(Some(DatabasePart {
        kind: access.kind,
        file: file.to_string(),
        size: number(&facts, "size")?,
        sha256: text(&facts, "sha256")?,
        tables: checked.tables_in_dump,
    }))
}

/// Lists the SHA-256 of every persistent file into `files.sha256` (read as the web user) and
/// reports how many, their bytes and the listing's SHA-256. Any file that cannot be read fails.
const HASH_FILES: &str = r#"set -e
# Byte order, whatever the target's locale: the restore recomputes this listing elsewhere.
export LC_ALL=C
files=$1; listing=$2
DIGEST
cd "$files"
errors=$(mktemp)
find . -type f -print0 2>"$errors" | sort -z | xargs -0 -r sh -c "$d"'; digest "$@"' sh > "$listing"
if [ -s "$errors" ]; then cat "$errors" >&2; rm -f "$errors"; exit 1; fi
rm -f "$errors"
echo "count $(find . -type f | wc -l)"
echo "bytes $(find . -type f -printf '%s\n' | awk '{s += $1} END {printf "%d", s}')"
echo "sha256 $(digest "$listing" | cut -d' ' -f1)"
"#;

/// Packs the archive: `tar` (passed as the arguments, run as the web user) through zstd.
/// A tar that fails (2) fails the archive; files that changed while read (1) are reported.
/// (Its SHA-256 is taken while it is stored, when the cores are no longer busy compressing.)
const PACK: &str = r#"set -e
umask 077
# tar runs as the site's user, who may not enter Hefring's own working directory.
cd /
out=$1; level=$2; shift 2
rm -f "$out.status" "$out.failed"
{ "$@" && s=0 || s=$?; echo "$s" > "$out.status"; } \
  | { zstd -q -T0 "-$level" -o "$out.part" -f || echo zstd > "$out.failed"; }
code=$(cat "$out.status"); rm -f "$out.status"
if [ -e "$out.failed" ]; then echo "writing the archive failed" >&2; rm -f "$out.part" "$out.failed"; exit 1; fi
if [ "$code" -ge 2 ]; then rm -f "$out.part"; echo "tar failed (exit status $code)" >&2; exit 1; fi
if [ "$code" -eq 1 ]; then echo "some files changed while they were read" >&2; fi
mv -f "$out.part" "$out"
echo "size $(stat -c %s "$out")"
"#;

/// The backup's working directory on the target and its archive beside it.
fn stage_of(site: &Site<'_>, backup: &str) -> (String, String) {
    let stage = site.layout().backup_work_dir(backup);
    let archive = format!("{stage}.tar.zst");
    (stage, archive)
}

/// A clean working directory of root's, readable by the environment's group, with a
/// `site/` directory inside that the environment's user owns: what root makes (the dump of a
/// database server, the manifest) goes into the first, what the site's user makes (the files'
/// listing, the SQLite copy) into the second, and the site's user packs both. Root never
/// writes where the site could have planted a link.
async fn fresh_stage(site: &Site<'_>, stage: &str) -> Result<(), TaskError> {
    let (owner, group) = site.owner_and_group();
    site.server
        .sh(
            "preparing the backup directory",
            r#"set -e; dir=$1; stage=$2; owner=$3; group=$4
mkdir -p "$dir"; chmod 711 "$dir"
rm -rf "$stage" "$stage.tar.zst"
mkdir -m 700 "$stage" "$stage/site"
if [ -n "$owner" ]; then chown -h "root:$group" "$stage"; chmod 750 "$stage"; chown -h "$owner" "$stage/site"; fi"#,
            &[&site.layout().backups_dir(), stage, &owner, &group],
        )
        .await
}

/// Where the site's user writes inside a backup's stage.
fn site_stage(stage: &str) -> String {
    format!("{stage}/site")
}

/// The SHA-256 of every persistent file, listed into the stage (read as the web user; a file
/// it cannot read fails the backup).
async fn hash_files(
    site: &Site<'_>,
    stage: &str,
    parts: Parts,
) -> Result<Option<FilesPart>, TaskError> {
    let files_dir = site.layout().files_dir(site.id());
    let listing = format!("{}/{}", site_stage(stage), backup::FILES_LISTING);
    let has_files = parts.files
        && site
            .server
            .sh_output(
                "looking for the files",
                r#"[ -d "$1" ] && echo yes || echo no"#,
                &[&files_dir],
            )
            .await?
            .trim()
            == "yes";
    let files = if has_files {
        let spec = site.as_site_user(crate::tasks::server::script_spec(
            &with_digest(HASH_FILES),
            &[&files_dir, &listing],
        ));
        let (code, out) = run_captured(site.server.exec.as_ref(), &spec, site.server.log).await?;
        if code != Some(0) {
            return Err(TaskError::new(
                "a persistent file cannot be read (see the log): the backup would be incomplete",
            ));
        }
        let (facts, _) = facts_of(&out);
        Some(FilesPart {
            count: number(&facts, "count")?,
            bytes: number(&facts, "bytes")?,
            sha256: text(&facts, "sha256")?,
        })
    } else {
        None
    };
    Ok(files)
}

/// Step one of a backup: the dump and, at the same time (the dump leaves a core idle), the
/// SHA-256 of every persistent file.
async fn dump_step(
    site: &Site<'_>,
    manifest: &Manifest,
    backup: &BackupRecord,
    parts: Parts,
) -> Result<(Option<DatabasePart>, Option<FilesPart>), TaskError> {
    let (stage, _) = stage_of(site, &backup.id);
    fresh_stage(site, &stage).await?;
    let dump = async {
        match parts.database {
            true => dump_into(site, manifest, &stage).await,
            false => Ok(None),
        }
    };
    let (part, files) = tokio::try_join!(dump, hash_files(site, &stage, parts))?;
    if let Some(part) = &part {
        site.server.log.info(format!(
            "{} dump: {} tables, {} bytes, checked against the catalog",
            part.kind.as_str(),
            part.tables,
            part.size
        ));
    }
    Ok((part, files))
}

/// Step two: write the manifest, pack the archive. Answers the manifest and the archive's
/// size.
async fn pack_step(
    t: &TaskContext<'_>,
    site: &Site<'_>,
    backup: &BackupRecord,
    database: Option<DatabasePart>,
    files: Option<FilesPart>,
) -> Result<(BackupManifest, u64), TaskError> {
    let (stage, archive) = stage_of(site, &backup.id);
    let layout = site.layout();
    // Root's dump and manifest, in root's stage (0750: tar opens the directories it packs
    // from): given to the site's user alone, who reads them into the archive. Not to its
    // group, which nginx's user shares with every environment.
    let owner = site.owner();
    if let (Some(owner), Some(part)) = (&owner, &database) {
        if part.kind != DatabaseKind::Sqlite {
            site.server
                .sh(
                    "letting the site's user read the dump",
                    r#"set -e; chown "$1" "$2"; chmod 600 "$2""#,
                    &[owner, &format!("{stage}/{}", part.file)],
                )
                .await?;
        }
    }
    let release = site.env.release_id.clone();
    let commit = match &release {
        Some(id) => t.ctx.store.get_release(id).await?.map(|r| r.commit),
        None => None,
    };
    let mut tools = BTreeMap::new();
    let versions = site
        .server
        .sh_output(
            "reading tool versions",
            r#"for t in mysqldump pg_dump sqlite3 tar zstd; do v=$("$t" --version 2>/dev/null | head -n 1) && [ -n "$v" ] && echo "$t $v"; done; true"#,
            &[],
        )
        .await?;
    for line in versions.lines() {
        if let Some((tool, version)) = line.split_once(' ') {
            tools.insert(tool.to_string(), version.to_string());
        }
    }
    let manifest = BackupManifest {
        format: backup::FORMAT,
        backup: backup.id.clone(),
        environment: site.env.id.clone(),
        environment_name: site.env.name.clone(),
        project: site.env.project_id.clone(),
        release,
        commit,
        created_at: format_ms(backup.created_at),
        database,
        files,
        tools,
    };
    let manifest_json = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
    site.server
        .write_file(
            &format!("{stage}/{}", backup::MANIFEST_FILE),
            &manifest_json,
            "600",
            owner.as_deref(),
        )
        .await?;
    let mut tar = vec![
        "tar".to_string(),
        "-c".into(),
        "-f".into(),
        "-".into(),
        "-C".into(),
        stage.clone(),
        backup::MANIFEST_FILE.into(),
    ];
    match &manifest.database {
        Some(part) if part.kind != DatabaseKind::Sqlite => tar.push(part.file.clone()),
        _ => {}
    }
    tar.extend(["-C".into(), site_stage(&stage)]);
    if let Some(part) = manifest
        .database
        .as_ref()
        .filter(|p| p.kind == DatabaseKind::Sqlite)
    {
        tar.push(part.file.clone());
    }
    if manifest.files.is_some() {
        tar.extend([
            backup::FILES_LISTING.into(),
            "-C".into(),
            layout.environment_dir(site.id()),
            backup::FILES_DIR.into(),
        ]);
    }
    let tar = site.as_site_user(CommandSpec::new(tar));
    let mut args = vec![archive.clone(), ZSTD_LEVEL.to_string()];
    args.extend(tar.argv);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = site
        .server
        .sh_output("packing the archive", PACK, &args)
        .await?;
    let (facts, _) = facts_of(&out);
    let size = number(&facts, "size")?;
    site.server.log.info(format!(
        "archive {archive}: {size} bytes, {} files",
        manifest.files.as_ref().map_or(0, |f| f.count)
    ));
    Ok((manifest, size))
}

/// Step three: into the backup store, its SHA-256 taken on the target at the same time
/// (both read the archive just written, from the page cache), then the record says it is
/// ready and the working files go. A retry after the record is ready only cleans up.
async fn store_step(
    t: &TaskContext<'_>,
    site: &Site<'_>,
    backup: &mut BackupRecord,
    manifest: BackupManifest,
    size: u64,
) -> Result<(), TaskError> {
    let (stage, archive) = stage_of(site, &backup.id);
    if backup.status != "ready" {
        let store = &t.ctx.backups;
        let put = async {
            if site.server.exec.is_local() {
                store
                    .put_file(&backup.object_key, std::path::Path::new(&archive))
                    .await
                    .map_err(|e| TaskError(format!("storing the archive: {e}")))
            } else {
                let local = scratch_file(t, &format!("{}.tar.zst", backup.id))?;
                site.server.exec.download(&archive, &local).await?;
                let stored = store.put_file(&backup.object_key, &local).await;
                let _ = std::fs::remove_file(&local);
                stored.map_err(|e| TaskError(format!("storing the archive: {e}")))
            }
        };
        let digest = async {
            let out = site
                .server
                .sh_output(
                    "taking the archive's SHA-256",
                    &with_digest(
                        r#"DIGEST
digest "$1" | cut -d' ' -f1"#,
                    ),
                    &[&archive],
                )
                .await?;
            match out.trim() {
                sum if sum.len() == 64 => Ok(sum.to_string()),
                other => Err(TaskError(format!(
                    "the archive's SHA-256 came out as {other:?}"
                ))),
            }
        };
        let (_, sha256) = tokio::try_join!(put, digest)?;
        t.log.info(format!(
            "stored as {} in {}",
            backup.object_key,
            store.describe()
        ));
        backup.status = "ready".into();
        backup.size = Some(size as i64);
        backup.sha256 = Some(sha256);
        backup.manifest = Some(serde_json::to_value(&manifest).expect("a manifest serialises"));
        backup.updated_at = now_ms();
        t.ctx.store.update_backup(backup).await?;
    }
    site.server.remove(&[stage, archive]).await?;
    Ok(())
}

/// A file in the control plane's scratch directory (for archives passing through).
fn scratch_file(t: &TaskContext<'_>, name: &str) -> Result<PathBuf, TaskError> {
    let dir = t.ctx.data_dir.join("tmp");
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(name))
}

/// A whole backup in one step: for the safety backup of a restore, and the source of a clone
/// or sync.
async fn make_backup(
    t: &TaskContext<'_>,
    site: &Site<'_>,
    kind: &str,
    description: &str,
    parts: Parts,
) -> Result<BackupRecord, TaskError> {
    let mut record = backup_record(t, site.id(), kind, description).await?;
    if record.status == "ready" {
        // Made by an earlier attempt, which may have stopped before its working files went.
        let (stage, archive) = stage_of(site, &record.id);
        site.server.remove(&[stage, archive]).await?;
        return Ok(record);
    }
    let manifest = match &site.env.release_id {
        Some(_) => served_release(t, &site.env).await?.1,
        None => return Err(TaskError::new("the environment is not deployed")),
    };
    let (database, files) = dump_step(site, &manifest, &record, parts).await?;
    let (archive_manifest, size) = pack_step(t, site, &record, database, files).await?;
    store_step(t, site, &mut record, archive_manifest, size).await?;
    t.log
        .info(format!("backup {} of {} is ready", record.id, site.id()));
    Ok(record)
}

/// A whole backup of everything (a migration's).
pub(super) async fn make_full_backup(
    t: &TaskContext<'_>,
    site: &Site<'_>,
    kind: &str,
    description: &str,
) -> Result<BackupRecord, TaskError> {
    make_backup(t, site, kind, description, EVERYTHING).await
}

// ---------------------------------------------------------------------------------------
// environment_backup

fn backup_kind(t: &TaskContext<'_>) -> String {
    t.op.inputs["kind"].as_str().unwrap_or("manual").to_string()
}

pub async fn dump_database(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let (_, manifest) = served_release(t, &site.env).await?;
    let description = t.op.inputs["description"].as_str().unwrap_or_default();
    let record = backup_record(t, site.id(), &backup_kind(t), description).await?;
    let (database, files) = dump_step(&site, &manifest, &record, EVERYTHING).await?;
    Ok(TaskOutput::with_state(json!({
        "backup": record.id,
        "database_part": database,
        "files_part": files,
    })))
}

fn state_backup(t: &TaskContext<'_>) -> Result<String, TaskError> {
    t.state["backup"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| TaskError::new("the operation has no backup recorded"))
}

async fn load_backup(t: &TaskContext<'_>, id: &str) -> Result<BackupRecord, TaskError> {
    t.ctx
        .store
        .get_backup(id)
        .await?
        .ok_or_else(|| TaskError(format!("backup {id} no longer exists")))
}

pub async fn pack_archive(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let record = load_backup(t, &state_backup(t)?).await?;
    let database: Option<DatabasePart> =
        serde_json::from_value(t.state["database_part"].clone()).unwrap_or(None);
    let files: Option<FilesPart> =
        serde_json::from_value(t.state["files_part"].clone()).unwrap_or(None);
    let (manifest, size) = pack_step(t, &site, &record, database, files).await?;
    Ok(TaskOutput::with_state(json!({
        "archive": {"manifest": manifest, "size": size},
    })))
}

pub async fn store_archive(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let mut record = load_backup(t, &state_backup(t)?).await?;
    let archive = &t.state["archive"];
    let manifest: BackupManifest = serde_json::from_value(archive["manifest"].clone())
        .map_err(|_| TaskError::new("the operation has no archive recorded"))?;
    let size = archive["size"].as_u64().unwrap_or_default();
    store_step(t, &site, &mut record, manifest, size).await?;
    Ok(TaskOutput::with_state(
        json!({ "result": { "backup": record.id } }),
    ))
}

/// The rollback of a failed backup: its working files go, and it is marked failed.
pub async fn discard_backup(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let Ok(id) = state_backup(t) else {
        // The first task failed before it recorded the backup: find it by the operation.
        let found = t
            .ctx
            .store
            .list_backups(
                &BackupFilter {
                    operation: Some(t.op.id.clone()),
                    ..Default::default()
                },
                &Page {
                    limit: 10,
                    cursor: None,
                },
            )
            .await?;
        for mut record in found.items {
            discard(t, &site, &mut record).await?;
        }
        return Ok(TaskOutput::done());
    };
    let mut record = load_backup(t, &id).await?;
    discard(t, &site, &mut record).await?;
    Ok(TaskOutput::done())
}

async fn discard(
    t: &TaskContext<'_>,
    site: &Site<'_>,
    record: &mut BackupRecord,
) -> Result<(), TaskError> {
    let (stage, archive) = stage_of(site, &record.id);
    site.server.remove(&[stage, archive]).await?;
    if record.status == "creating" {
        record.status = "failed".into();
        record.updated_at = now_ms();
        t.ctx.store.update_backup(record).await?;
        t.log.info(format!("backup {} marked failed", record.id));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// backup_delete and retention

/// Removes the environment's scheduled backups its retention does not keep. Only scheduled
/// backups are considered: a manual or safety backup is never pruned.
pub async fn prune_backups(t: &TaskContext<'_>) -> TaskResult {
    let env = &t.op.subject_id;
    let policy: hefring_core::schedule::Retention =
        serde_json::from_value(t.op.inputs["retention"].clone())
            .map_err(|_| TaskError::new("the operation names no retention"))?;
    let now = t.op.inputs["now"].as_i64().unwrap_or_else(now_ms);
    let mut scheduled = Vec::new();
    let mut cursor = None;
    loop {
        let listed = t
            .ctx
            .store
            .list_backups(
                &BackupFilter {
                    environment: Some(env.clone()),
                    kind: Some("scheduled".into()),
                    status: Some("ready".into()),
                    ..Default::default()
                },
                &Page { limit: 500, cursor },
            )
            .await?;
        scheduled.extend(listed.items);
        match listed.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let dated: Vec<(&str, i64)> = scheduled
        .iter()
        .map(|b| (b.id.as_str(), b.created_at))
        .collect();
    let keep = hefring_core::schedule::retained(&dated, policy, now);
    let mut removed = 0;
    for backup in scheduled.iter().filter(|b| !keep.contains(b.id.as_str())) {
        t.ctx
            .backups
            .delete(&backup.object_key)
            .await
            .map_err(|e| TaskError(format!("removing {}: {e}", backup.object_key)))?;
        let mut gone = backup.clone();
        gone.status = "deleted".into();
        gone.updated_at = now_ms();
        t.ctx.store.update_backup(&gone).await?;
        t.log.info(format!(
            "removed scheduled backup {} of {}",
            backup.id,
            format_ms(backup.created_at)
        ));
        removed += 1;
    }
    t.log.info(format!(
        "kept {} scheduled backup(s) (daily {}, weekly {}), removed {removed}",
        keep.len(),
        policy.daily,
        policy.weekly
    ));
    Ok(TaskOutput::done())
}

pub async fn remove_archive(t: &TaskContext<'_>) -> TaskResult {
    let record = load_backup(t, &t.op.subject_id).await?;
    delete_archive(t, record).await?;
    Ok(TaskOutput::done())
}

/// The archive leaves the store, then the record says so (a retry after a crash in between
/// deletes a missing object, which stores accept).
async fn delete_archive(t: &TaskContext<'_>, mut record: BackupRecord) -> Result<(), TaskError> {
    t.ctx
        .backups
        .delete(&record.object_key)
        .await
        .map_err(|e| TaskError(format!("removing the archive: {e}")))?;
    record.status = "deleted".into();
    record.updated_at = now_ms();
    t.ctx.store.update_backup(&record).await?;
    t.log.info(format!("removed {}", record.object_key));
    Ok(())
}

/// The last step of a clone or sync: the backup that carried the data across has been
/// restored, so its archive goes. Its record stays (`deleted`), so the operation's result
/// still says what was copied.
pub async fn discard_copy(t: &TaskContext<'_>) -> TaskResult {
    let id = t.state["restore_from"]
        .as_str()
        .ok_or_else(|| TaskError::new("the operation has no copied backup recorded"))?;
    let record = load_backup(t, id).await?;
    if record.kind == "copy" && record.status == "ready" {
        delete_archive(t, record).await?;
    }
    Ok(TaskOutput::done())
}

// ---------------------------------------------------------------------------------------
// restore, clone, sync

/// What a restore or sync takes from the backup: the operation's `database` and `files`
/// (both unless said otherwise).
fn wanted(t: &TaskContext<'_>) -> Parts {
    Parts {
        database: t.op.inputs["database"].as_bool().unwrap_or(true),
        files: t.op.inputs["files"].as_bool().unwrap_or(true),
    }
}

fn source_id(t: &TaskContext<'_>) -> Result<String, TaskError> {
    t.op.inputs["from"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| TaskError::new("the operation names no source environment"))
}

/// A fresh backup of the source of a clone or sync.
pub async fn take_source_backup(t: &TaskContext<'_>) -> TaskResult {
    let from = source_id(t)?;
    let source = Site::open_other(t, &from).await?;
    let record = make_backup(
        t,
        &source,
        "copy",
        &format!("copied into {}", t.op.subject_id),
        wanted(t),
    )
    .await?;
    let mut patch = json!({ "restore_from": record.id });
    if t.op.kind == hefring_core::operation::OperationKind::EnvironmentClone {
        patch["result"] = json!({ "environment": t.op.subject_id, "backup": record.id });
    }
    Ok(TaskOutput::with_state(patch))
}

/// Nothing is overwritten before what is there is backed up. Also records the served
/// release's manifest for the tasks after it (the deploy commands).
pub async fn take_safety_backup(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let (release, manifest) = served_release(t, &site.env).await?;
    let record = make_backup(
        t,
        &site,
        "safety",
        &format!("before {} {}", t.op.kind, t.op.id),
        wanted(t),
    )
    .await?;
    let mut patch = json!({
        "result": { "safety_backup": record.id },
        "safety_backup": record.id,
        "manifest": manifest,
        "release_id": release.id,
    });
    if let Some(backup) = t.op.inputs["backup"].as_str() {
        patch["restore_from"] = json!(backup);
    }
    Ok(TaskOutput::with_state(patch))
}

/// Where the environment's user unpacks the backup being restored: a directory of its own,
/// inside the environment's directory (root's).
fn restore_dir(site: &Site<'_>, t: &TaskContext<'_>) -> String {
    let tail = t.op.id.rsplit('_').next().unwrap_or(&t.op.id);
    site.layout().restore_dir(site.id(), tail)
}

/// Where the archive being restored waits, root's, beside the backups' stages.
fn restore_archive(site: &Site<'_>, t: &TaskContext<'_>) -> String {
    let tail = t.op.id.rsplit('_').next().unwrap_or(&t.op.id);
    format!(
        "{}.tar.zst",
        site.layout().backup_work_dir(&format!("restore-{tail}"))
    )
}

/// Unpacks an archive (already checked: its SHA-256, and only a manifest, a dump and files
/// that stay inside) as the environment's user into its own directory, then takes the dump's
/// and the files' SHA-256.
const UNPACK: &str = r#"set -e
umask 027
export LC_ALL=C
archive=$1; work=$2
DIGEST
# The files keep the modes they had (nginx reads them through the environment's group).
if ! { zstd -q -d -c "$archive" | tar -x --no-same-owner --same-permissions -f - -C "$work"; }; then
  echo "unpacked no"; exit 0
fi
# The dump's digest and the files' listing side by side, on two cores.
for f in database.sql database.sqlite; do
  if [ -f "$work/$f" ]; then (digest "$work/$f" | cut -d' ' -f1 > "$work/.database.sum") & fi
done
if [ -d "$work/files" ]; then
  (cd "$work/files" && find . -type f -print0 | sort -z | xargs -0 -r sh -c "$d"'; digest "$@"' sh) > "$work/files.check"
fi
wait
if [ -f "$work/.database.sum" ]; then echo "database $(cat "$work/.database.sum")"; rm -f "$work/.database.sum"; fi
if [ -f "$work/files.check" ]; then echo "files $(digest "$work/files.check" | cut -d' ' -f1)"; fi
echo tail
cat "$work/manifest.json"
"#;

/// Reads an archive on this machine once: its SHA-256, and its entries checked against what a
/// backup may hold ([`hefring_core::archive::check_backup`]). Answers the SHA-256 of the whole
/// file, and whether its entries passed.
fn check_archive(path: &std::path::Path) -> Result<(String, Result<(), TaskError>), TaskError> {
    use sha2::{Digest, Sha256};
    struct Hashing<R> {
        inner: R,
        hash: Sha256,
    }
    impl<R: std::io::Read> std::io::Read for Hashing<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hash.update(&buf[..n]);
            Ok(n)
        }
    }
    let file = std::fs::File::open(path)
        .map_err(|e| TaskError(format!("cannot open the archive {}: {e}", path.display())))?;
    let mut hashing = Hashing {
        inner: std::io::BufReader::new(file),
        hash: Sha256::new(),
    };
    let checked = (|| {
        let decoder = zstd::Decoder::new(&mut hashing)
            .map_err(|e| TaskError(format!("the archive cannot be read: {e}")))?;
        let entries = super::environment::archive_entries(decoder)?;
        hefring_core::archive::check_backup(&entries)
            .map_err(|e| TaskError(format!("the archive is refused: {e}")))
    })();
    // The digest covers the whole file, whatever the entries said.
    std::io::copy(&mut hashing, &mut std::io::sink())?;
    Ok((hex::encode(hashing.hash.finalize()), checked))
}

/// Brings the backup to restore onto the target, checks its SHA-256 and its entries before
/// anything is unpacked, unpacks it as the environment's user and checks every SHA-256.
pub async fn fetch_backup(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let id = t.state["restore_from"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| TaskError::new("the operation names no backup to restore"))?;
    let record = load_backup(t, &id).await?;
    if record.status != "ready" {
        return Err(TaskError(format!("backup {id} is {}", record.status)));
    }
    let work = restore_dir(&site, t);
    let archive = restore_archive(&site, t);
    site.server
        .mkdirs(std::slice::from_ref(&site.layout().backups_dir()), "711")
        .await?;
    let store = &t.ctx.backups;
    let local = if site.server.exec.is_local() {
        std::path::PathBuf::from(&archive)
    } else {
        scratch_file(t, &format!("{id}.tar.zst"))?
    };
    store
        .get_to_file(&record.object_key, &local)
        .await
        .map_err(|e| TaskError(format!("fetching the archive: {e}")))?;
    let checked = {
        let local = local.clone();
        tokio::task::spawn_blocking(move || check_archive(&local))
            .await
            .map_err(|e| TaskError(format!("checking the archive: {e}")))?
    };
    // A damaged archive is said to be damaged first, whatever its entries look like.
    let checked = checked.and_then(|(sha256, entries)| {
        if record.sha256.as_deref() != Some(sha256.as_str()) {
            return Err(TaskError::new(
                "the archive does not match its SHA-256: the backup is damaged",
            ));
        }
        entries
    });
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&local);
        return Err(e);
    }
    if !site.server.exec.is_local() {
        let sent = site.server.exec.upload(&local, &archive).await;
        let _ = std::fs::remove_file(&local);
        sent?;
    }
    // Root's archive, readable by the environment's group; a directory of the environment's
    // user to unpack into (made fresh by root inside root's environment directory).
    let (owner, group) = site.owner_and_group();
    site.server
        .sh(
            "preparing the restore",
            r#"set -e; archive=$1; work=$2; owner=$3; group=$4
rm -rf "$work"; mkdir -m 700 "$work"
if [ -n "$owner" ]; then chown -h "$owner" "$work"; chown "$owner" "$archive"; chmod 600 "$archive"; fi"#,
            &[&archive, &work, &owner, &group],
        )
        .await?;
    let out = site
        .site_sh(
            "unpacking the archive",
            &with_digest(UNPACK),
            &[&archive, &work],
        )
        .await?;
    site.server.remove(std::slice::from_ref(&archive)).await?;
    let (facts, manifest_text) = facts_of(&out);
    let mismatch = |what: &str| {
        TaskError(format!(
            "the archive's {what} does not match its SHA-256: the backup is damaged"
        ))
    };
    if facts.get("unpacked").map(String::as_str) == Some("no") {
        return Err(TaskError::new(
            "the archive could not be unpacked (see the log), though its SHA-256 is right",
        ));
    }
    let manifest: BackupManifest = serde_json::from_str(&manifest_text)
        .map_err(|e| TaskError(format!("the archive's manifest is unreadable: {e}")))?;
    if let Some(part) = &manifest.database {
        if facts.get("database") != Some(&part.sha256) {
            return Err(mismatch("database dump"));
        }
    }
    if let Some(part) = &manifest.files {
        if facts.get("files") != Some(&part.sha256) {
            return Err(mismatch("files"));
        }
    }
    t.log.info(format!(
        "backup {id} of {} ({}) unpacked and checked",
        manifest.environment_name, manifest.created_at
    ));
    // A restore or sync runs the commands of the release the environment serves; a clone
    // recorded its own in prepare_target.
    let mut patch = json!({ "restore_manifest": manifest });
    if t.state["manifest"].is_null() {
        let (release, served) = served_release(t, &site.env).await?;
        patch["manifest"] = json!(served);
        patch["release_id"] = json!(release.id);
    }
    Ok(TaskOutput::with_state(patch))
}

fn restore_manifest(t: &TaskContext<'_>) -> Result<BackupManifest, TaskError> {
    serde_json::from_value(t.state["restore_manifest"].clone()).map_err(|_| {
        TaskError::new("the operation has no unpacked backup (fetch_backup did not run)")
    })
}

pub async fn restore_database(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let manifest = manifest(t)?;
    let archive = restore_manifest(t)?;
    if !wanted(t).database {
        t.log.info("the database is left as it is");
        return Ok(TaskOutput {
            skipped: true,
            ..Default::default()
        });
    }
    backup::check_restorable(&archive, manifest.database, true).map_err(TaskError)?;
    let (Some(part), Some(access)) = (&archive.database, site.database(&manifest)) else {
        t.log.info("the environment has no database");
        return Ok(TaskOutput {
            skipped: true,
            ..Default::default()
        });
    };
    let dump = format!("{}/{}", restore_dir(&site, t), part.file);
    let name = &access.name;
    match access.kind {
        DatabaseKind::Mariadb => {
            // A new, empty database: tables the backup does not have must not survive.
            run_sql(
                &site,
                mariadb_admin(&site),
                format!(
                    "DROP DATABASE IF EXISTS `{name}`;\nCREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;\n"
                ),
                "emptying the MariaDB database",
            )
            .await?;
            let spec = load_command(&site, &access, &dump, DumpIn::SitesFile);
            require_success(site.server.run(&spec).await?, "loading the dump")?;
        }
        DatabaseKind::Postgresql => {
            run_sql(
                &site,
                psql_admin(&site),
                format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE);\n\
                     CREATE DATABASE {name} OWNER {name} ENCODING 'UTF8' TEMPLATE template0;\n\
                     REVOKE ALL ON DATABASE {name} FROM PUBLIC;\n"
                ),
                "emptying the PostgreSQL database",
            )
            .await?;
            let spec = load_command(&site, &access, &dump, DumpIn::SitesFile);
            require_success(site.server.run(&spec).await?, "loading the dump")?;
        }
        DatabaseKind::Sqlite => {
            // By the site's user, from its unpacked copy into its own database directory.
            site.site_sh(
                "putting the database in place",
                r#"set -e
dump=$1; db=$2
cp "$dump" "$db.restoring"
rm -f "$db-wal" "$db-shm" "$db-journal"
mv -f "$db.restoring" "$db""#,
                &[&dump, &access.path],
            )
            .await?;
        }
        DatabaseKind::None => {}
    }
    t.log.info(format!(
        "database {name} restored from backup {} ({} tables)",
        archive.backup, part.tables
    ));
    Ok(TaskOutput::done())
}

/// Puts the unpacked files (made by the environment's user) in place of the persistent
/// directory by renames inside the environment's directory, which root owns, so the site sees
/// the old tree or the new one. What lands there must be a directory, not a link the site
/// put in its unpacking directory: checked after the rename, when the site can no longer
/// change it, and undone if not.
const SWAP_FILES: &str = r#"set -e
new=$1; files=$2
if [ -d "$new" ] && [ ! -L "$new" ]; then
  rm -rf "$files.old"
  if [ -e "$files" ] || [ -L "$files" ]; then mv "$files" "$files.old"; fi
  mv "$new" "$files"
  if [ -L "$files" ] || [ ! -d "$files" ]; then
    rm -f "$files"
    if [ -e "$files.old" ]; then mv "$files.old" "$files"; fi
    echo "the unpacked files are not a directory" >&2
    exit 1
  fi
fi
rm -rf "$files.old"
"#;

pub async fn restore_files(t: &TaskContext<'_>) -> TaskResult {
    let site = Site::open(t).await?;
    let archive = restore_manifest(t)?;
    let work = restore_dir(&site, t);
    let outcome = if !wanted(t).files {
        t.log.info("the files are left as they are");
        TaskOutput {
            skipped: true,
            ..Default::default()
        }
    } else if archive.files.is_none() {
        t.log.info("the backup holds no files");
        TaskOutput {
            skipped: true,
            ..Default::default()
        }
    } else {
        let files = site.layout().files_dir(site.id());
        site.server
            .sh(
                "putting the files in place",
                SWAP_FILES,
                &[&format!("{work}/{}", backup::FILES_DIR), &files],
            )
            .await?;
        t.log.info(format!(
            "{} files restored from backup {}",
            archive.files.as_ref().map_or(0, |f| f.count),
            archive.backup
        ));
        TaskOutput::done()
    };
    site.server.remove(&[work]).await?;
    Ok(outcome)
}

/// After a failed restore, clone or sync: the unpacked archive goes.
pub async fn clean_up_restore(t: &TaskContext<'_>) -> Result<(), TaskError> {
    let site = Site::open(t).await?;
    let work = restore_dir(&site, t);
    site.server.remove(&[restore_archive(&site, t), work]).await
}
