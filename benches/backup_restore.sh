#!/usr/bin/env bash
# Benchmark: backup and restore throughput of a MariaDB site against the same work run by hand.
#
#   benches/backup_restore.sh [SIZE_MB]        (default 600)
#
# ROUNDS (default 3) sets the number of rounds; LOGS_DIR, a directory to keep each Hefring
# operation's JSON (with its task timestamps) and its log (timestamped lines) in.
#
# Starts `hefring serve` (release build; HEFRING_BIN to use another) on a fresh data
# directory, a local target with its own root and ports, the PHP fixture app of the
# integration tests with `database: mariadb`, and deploys one environment. Then it generates
# a site of about SIZE_MB (benches/backup_restore_gen.py): half as rows of the environment's
# database (pseudo-prose in MEDIUMTEXT/TEXT columns, about 3.5x compressible), half as
# persistent files in ROOT/environments/ENV/files/uploads/ (half of those bytes random
# "photos" of 0.5-4 MB, the rest some thousands of 1-64 KB text and HTML files), owned by
# www-data as the site's own files are.
#
# Everything lives on one filesystem, the one holding /tmp (WORK_PARENT to choose another
# directory; MariaDB's data directory is wherever the machine's MariaDB keeps it): the
# target root, Hefring's data directory with its default backup store (DATA/backups), and
# the hand-run's working directory and store.
#
# ROUNDS rounds, each: a Hefring backup and a hand backup, then a Hefring restore and a hand
# restore, the order of each pair alternating between rounds (so that page cache, InnoDB
# flushing and other processes on the machine weigh on both sides alike). Before each timed
# step: `sync` and a wait until InnoDB has flushed its dirty pages (the machine's MariaDB's
# innodb_max_dirty_pages_pct is set to 0 for that wait, then back to what it was; the exit
# trap puts it back too). Each restore restores the backup its side made in the same round.
#
# What is timed:
# - Hefring backup: POST /environments/ENV/backup to the operation seen `succeeded` (polled
#   every 50 ms by one python3 process over a kept-alive connection: cheap, so that the
#   waiting client takes next to no CPU from the work measured); also the operation's own
#   started_at -> finished_at and each task's time.
# - Hand backup, the same work as Hefring's without its checks:
#     mysqldump (the same flags and admin connection as Hefring's:
#       --single-transaction --quick --routines --triggers --events --result-file) DB
#     tar -c -f - -C STAGE database.sql -C ENVDIR files | zstd -q -T0 -3 -o STAGE.tar.zst
#     cp into the store directory as a temporary name, fsync it, rename it, fsync the
#       directory (what Hefring's directory store does), then remove the stage and archive.
#   Not in the hand run (Hefring's own checks): the table count against the catalog, the
#   SHA-256 of the dump, of every file (as www-data) and of the archive, the manifest, the
#   tool versions, the chown of the stage to the web user.
# - Hefring restore: POST /environments/ENV/restore {"backup": ID} to `succeeded`. That
#   operation first takes a safety backup of what is there, so it is reported twice: the whole
#   operation, and the restore part alone (fetch_backup's start to restore_files' end, from
#   the operation's task timestamps; run_deploy_commands, the app's deploy script, is not in
#   it).
# - Hand restore, the same work as that restore part without its checks:
#     cp the archive from the store (fsync, rename: as the store's get does)
#     zstd -q -d -c | tar -x --no-same-owner -f - -C WORK, remove the archive
#     DROP DATABASE; CREATE DATABASE (utf8mb4); mariadb DB < WORK/database.sql
#     chown -R www-data the new files, rename it over the old files directory, remove the old
#   Not in the hand run: the SHA-256 of the archive, of the dump and of every file.
#
# Throughput = (the dump's bytes + the files' bytes, from the first Hefring backup's
# manifest) / seconds, in MB/s (10^6 bytes). The table gives each side's median over the
# rounds and Hefring's speed as a percentage of the hand run's (hand seconds / Hefring seconds).
# Needs jq, curl, python3, mariadb and mysqldump, zstd, nginx, php-fpm (scripts/test brings
# them). Run as root (as Hefring's local target is: it drops to www-data itself).
set -euo pipefail
cd "$(dirname "$0")/.."
size_mb=${1:-600}
rounds=${ROUNDS:-3}
here=$(pwd)

bin=${HEFRING_BIN:-target/release/hefring}
if [ -z "${HEFRING_BIN:-}" ]; then
  cargo build --release -q -p hefring
fi
"$bin" serve --help | grep -q -- --backup-store || { echo "$bin has no backups (no --backup-store)" >&2; exit 1; }
for tool in jq curl python3 mariadb mysqldump zstd; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (the hand run reads and writes as Hefring's local target does)" >&2; exit 1; }

sock=/run/mysqld/mysqld.sock
db_admin=(--protocol=socket "--socket=$sock" --user=root)
sql() { mariadb "${db_admin[@]}" --batch --skip-column-names -e "$1"; }
if ! sql 'SELECT 1' >/dev/null 2>&1; then
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  for _ in $(seq 100); do sql 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.1; done
fi

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
work=$(mktemp -d "${WORK_PARENT:-/tmp}/hfbench-XXXXXX")
chmod 755 "$work"
data="$work/data"
root="$work/root"
hand="$work/hand"
hand_store="$work/hand-store"
mkdir -p "$root" "$hand" "$hand_store"
chmod 755 "$root"
server_pid=""
url=""
token=""
env=""
db=""
cleanup() {
  set +e
  if [ -n "$env" ] && [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    # The environment's delete operation drops its database and user, its site and files.
    op=$(curl -fsS -X DELETE -H "Authorization: Bearer $token" "$url/api/v1/environments/$env" | jq -r .id)
    for _ in $(seq 600); do
      case $(curl -fsS -H "Authorization: Bearer $token" "$url/api/v1/operations/$op" | jq -r .status) in
        succeeded|failed|cancelled) break ;;
      esac
      sleep 0.1
    done
  fi
  if [ -n "$db" ] && [ -n "$(sql "SHOW DATABASES LIKE '$db'" 2>/dev/null)" ]; then
    echo "the environment's delete left $db: dropping it" >&2
    sql "DROP DATABASE IF EXISTS \`$db\`; DROP USER IF EXISTS '$db'@'localhost'"
  fi
  [ -n "${dirty_pct:-}" ] && sql "SET GLOBAL innodb_max_dirty_pages_pct = $dirty_pct"
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
  for pid_file in "$root/nginx/nginx.pid" "$root/php-fpm/php-fpm.pid"; do
    [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2>/dev/null
  done
  if [ -n "$server_pid" ]; then
    for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
https_port=$(free_port)

token=$("$bin" admin create-token --name bench --data-dir "$data" 2>/dev/null | tail -n 1)
"$bin" serve --listen 127.0.0.1:0 --data-dir "$data" > "$work/serve.out" 2> "$work/serve.log" &
server_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
url=$(grep -o 'http://[0-9.:]*' "$work/serve.out" | head -n 1)
api() { # METHOD PATH [JSON]
  if [ $# -ge 3 ]; then
    curl -fsS -X "$1" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' -d "$3" "$url/api/v1$2"
  else
    curl -fsS -X "$1" -H "Authorization: Bearer $token" "$url/api/v1$2"
  fi
}
wait_op() { # ID -> prints the finished operation (polls every 50 ms)
  while :; do
    op=$(api GET "/operations/$1")
    case $(echo "$op" | jq -r .status) in
      succeeded|failed|cancelled) echo "$op"; return ;;
    esac
    sleep 0.05
  done
}
# The timed operations: POST, then GET the operation every 50 ms over one kept-alive
# connection until it ends; prints {"client_ms": POST to seen ended, "op": the operation}. (A
# curl and a jq a poll would cost about 25 ms of CPU each time: a third of a core taken from
# the work measured, which the hand run does not pay.)
timed_op() { # PATH JSON
  python3 - "$url" "$token" "$1" "$2" <<'PY'
import http.client, json, sys, time, urllib.parse
base, token, path, body = sys.argv[1:5]
u = urllib.parse.urlparse(base)
conn = http.client.HTTPConnection(u.hostname, u.port)
headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
def call(method, path, body=None):
    conn.request(method, "/api/v1" + path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    if r.status >= 300:
        sys.exit("%s %s: %d %s" % (method, path, r.status, data[:300].decode()))
    return json.loads(data)
t0 = time.monotonic()
op = call("POST", path, body)
while op["status"] not in ("succeeded", "failed", "cancelled"):
    time.sleep(0.05)
    op = call("GET", "/operations/" + op["id"])
t1 = time.monotonic()
print(json.dumps({"client_ms": round((t1 - t0) * 1000), "op": op}))
PY
}
must_succeed() { # WHAT OPERATION_JSON
  [ "$(echo "$2" | jq -r .status)" = succeeded ] || { echo "$1 failed: $2" >&2; exit 1; }
}
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# The API's timestamps (2026-01-02T03:04:05.678Z) in milliseconds.
JQ_MS='def ms: (sub("\\.[0-9]+Z$"; "Z") | fromdateiso8601) * 1000 + (capture("\\.(?<f>[0-9]+)Z$").f | tonumber);'
op_ms() { echo "$1" | jq -r "$JQ_MS"' (.finished_at | ms) - (.started_at | ms)'; }
task_ms() { # OPERATION_JSON FIRST_TASK LAST_TASK: first's start to last's end
  echo "$1" | jq -r --arg a "$2" --arg b "$3" "$JQ_MS"' ([.tasks[] | select(.name == $b and (.rollback | not))][0].finished_at | ms) - ([.tasks[] | select(.name == $a and (.rollback | not))][0].started_at | ms)'
}

# The fixture app of crates/hefring/tests/it/environments.rs (APP_INDEX, APP_INSTALL,
# APP_DEPLOY, app_manifest("mariadb")).
repo="$work/repo"
git init -q -b main "$repo"
cat > "$repo/.hefring.yml" <<'YAML'
database: mariadb
writable: [uploads]
install:
  - php install.php
deploy:
  - [php, deploy.php]
health: /health.php
YAML
cat > "$repo/index.php" <<'PHP'
<?php
$driver = getenv('DB_DRIVER');
if ($driver === 'sqlite') {
    $pdo = new PDO('sqlite:' . getenv('DB_NAME'));
} else {
    $dsn = $driver . ':host=' . getenv('DB_HOST') . ';port=' . getenv('DB_PORT') . ';dbname=' . getenv('DB_NAME');
    $pdo = new PDO($dsn, getenv('DB_USER'), getenv('DB_PASSWORD'));
}
echo 'release=' . trim(file_get_contents(__DIR__ . '/VERSION')) . "\n";
echo 'rows=' . $pdo->query('SELECT COUNT(*) FROM hits')->fetchColumn() . "\n";
echo 'upload=' . (is_file(__DIR__ . '/uploads/kept.txt') ? trim(file_get_contents(__DIR__ . '/uploads/kept.txt')) : 'none') . "\n";
PHP
cat > "$repo/install.php" <<'PHP'
<?php
$driver = getenv('DB_DRIVER');
if ($driver === 'sqlite') {
    $pdo = new PDO('sqlite:' . getenv('DB_NAME'));
} else {
    $dsn = $driver . ':host=' . getenv('DB_HOST') . ';port=' . getenv('DB_PORT') . ';dbname=' . getenv('DB_NAME');
    $pdo = new PDO($dsn, getenv('DB_USER'), getenv('DB_PASSWORD'));
}
$pdo->exec('CREATE TABLE IF NOT EXISTS hits (id INTEGER)');
file_put_contents(getenv('FILES_DIR') . '/uploads/kept.txt', 'from-install');
echo "installed\n";
PHP
cat > "$repo/deploy.php" <<'PHP'
<?php
$driver = getenv('DB_DRIVER');
if ($driver === 'sqlite') {
    $pdo = new PDO('sqlite:' . getenv('DB_NAME'));
} else {
    $dsn = $driver . ':host=' . getenv('DB_HOST') . ';port=' . getenv('DB_PORT') . ';dbname=' . getenv('DB_NAME');
    $pdo = new PDO($dsn, getenv('DB_USER'), getenv('DB_PASSWORD'));
}
$pdo->exec('INSERT INTO hits (id) VALUES (1)');
echo "deployed " . getenv('HEFRING_RELEASE') . "\n";
if (is_file(__DIR__ . '/FAIL_DEPLOY')) { fwrite(STDERR, "deploy failed on purpose\n"); exit(1); }
PHP
echo "<?php echo 'ok';" > "$repo/health.php"
echo 1 > "$repo/VERSION"
mkdir "$repo/uploads" && : > "$repo/uploads/.keep"
git -C "$repo" add -A && git -C "$repo" -c user.name=b -c user.email=b@b commit -qm one

target=$(api POST /targets "{\"name\":\"bench\",\"host\":\"local\",\"root\":\"$root\",\"http_port\":$http_port,\"https_port\":$https_port}" | jq -r .id)
must_succeed "target verify" "$(wait_op "$(api POST "/targets/$target/verify" | jq -r .id)")"
project=$(api POST /projects "{\"name\":\"app\",\"git_url\":\"$repo\"}" | jq -r .id)
built=$(wait_op "$(api POST "/projects/$project/releases" '{"ref":"main"}' | jq -r .id)")
must_succeed build "$built"
release=$(echo "$built" | jq -r .result.release)
env=$(api POST /environments "{\"name\":\"live\",\"project\":\"$project\",\"target\":\"$target\",\"domain\":\"bench.test\"}" | jq -r .id)
db="hf_$(echo "${env#*_}" | tr '[:upper:]' '[:lower:]')"
must_succeed deploy "$(wait_op "$(api POST "/environments/$env/deploy" "{\"release\":\"$release\"}" | jq -r .id)")"
env_dir="$root/environments/$env"
[ -d "$env_dir/files/uploads" ] || { echo "no $env_dir/files/uploads after the deploy" >&2; exit 1; }
[ -n "$(sql "SHOW DATABASES LIKE '$db'")" ] || { echo "no database $db after the deploy" >&2; exit 1; }

# The site: half database rows, half files.
half=$(( size_mb * 1000000 / 2 ))
gen_start=$(now_ms)
python3 "$here/benches/backup_restore_gen.py" sql "$half" | mariadb "${db_admin[@]}" "$db"
python3 "$here/benches/backup_restore_gen.py" files "$env_dir/files/uploads/media" "$half" 2> "$work/gen.log"
chown -R www-data:www-data "$env_dir/files"
sql "ANALYZE TABLE \`$db\`.posts, \`$db\`.comments" > /dev/null
echo "environment $env (database $db, files $env_dir/files) on the filesystem of $work: $(df --output=source,fstype "$work" | tail -n 1 | tr -s ' ')"
echo "generated the site in $(( ($(now_ms) - gen_start) / 1000 )) s: $(sql "SELECT CONCAT((SELECT COUNT(*) FROM \`$db\`.posts), ' posts, ', (SELECT COUNT(*) FROM \`$db\`.comments), ' comments, ', ROUND(SUM(data_length + index_length) / 1e6), ' MB in InnoDB') FROM information_schema.tables WHERE table_schema = '$db'"); $(cat "$work/gen.log")"

# Waits until what earlier steps wrote is on disk: the page cache, then InnoDB's dirty pages
# (flushed at once by lowering innodb_max_dirty_pages_pct to 0 for the wait, then putting
# it back; left alone, MariaDB would trickle them out at innodb_io_capacity during the next
# step).
dirty_pct=$(sql "SELECT @@GLOBAL.innodb_max_dirty_pages_pct")
settle() {
  sync
  sql "SET GLOBAL innodb_max_dirty_pages_pct = 0"
  for _ in $(seq 120); do
    dirty=$(sql "SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_dirty'" | cut -f2)
    [ "${dirty:-0}" -lt 50 ] && break
    sleep 0.5
  done
  sql "SET GLOBAL innodb_max_dirty_pages_pct = $dirty_pct"
  sync
  sleep 1
}

results="$work/results.tsv" # metric, round, milliseconds
keep() { # NAME OPERATION_JSON: into LOGS_DIR, when set
  [ -n "${LOGS_DIR:-}" ] || return 0
  mkdir -p "$LOGS_DIR"
  echo "$2" > "$LOGS_DIR/$1.json"
  api GET "/operations/$(echo "$2" | jq -r .id)/log" > "$LOGS_DIR/$1.log"
}
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$results"; }
load() { cut -d' ' -f1 /proc/loadavg; }

hefring_backup() { # ROUND -> sets hefring_backup_id
  local timed client op
  timed=$(timed_op "/environments/$env/backup" '{"description":"bench"}')
  client=$(echo "$timed" | jq -r .client_ms)
  op=$(echo "$timed" | jq -c .op)
  must_succeed "Hefring backup" "$op"
  keep "round-$1-backup" "$op"
  hefring_backup_id=$(echo "$op" | jq -r .result.backup)
  record hefring_backup "$1" "$client"
  record hefring_backup_op "$1" "$(op_ms "$op")"
  for task in dump_database pack_archive store_archive; do
    record "hefring_backup.$task" "$1" "$(task_ms "$op" "$task" "$task")"
  done
  printf '  round %s  Hefring backup   %7.2f s (operation %.2f s)  load %s\n' "$1" \
    "$(awk "BEGIN {print $client / 1000}")" "$(op_ms "$op" | awk '{print $1 / 1000}')" "$(load)"
}

hand_backup() { # ROUND -> leaves $hand_store/ROUND.tar.zst
  local stage="$hand/stage" t0 t1 t2 t3
  rm -rf "$stage" "$stage.tar.zst"
  mkdir -m 700 "$stage"
  t0=$(now_ms)
  mysqldump "${db_admin[@]}" --single-transaction --quick --routines --triggers --events \
    "--result-file=$stage/database.sql" "$db"
  t1=$(now_ms)
  tar -c -f - -C "$stage" database.sql -C "$env_dir" files | zstd -q -T0 -3 -f -o "$stage.tar.zst"
  t2=$(now_ms)
  cp "$stage.tar.zst" "$hand_store/.tmp-$1"
  sync "$hand_store/.tmp-$1"
  mv "$hand_store/.tmp-$1" "$hand_store/$1.tar.zst"
  sync "$hand_store"
  hand_dump_bytes=$(stat -c %s "$stage/database.sql")
  rm -rf "$stage" "$stage.tar.zst"
  t3=$(now_ms)
  record hand_backup "$1" $((t3 - t0))
  record hand_backup.dump "$1" $((t1 - t0))
  record hand_backup.tar_zstd "$1" $((t2 - t1))
  record hand_backup.store "$1" $((t3 - t2))
  printf '  round %s  hand backup      %7.2f s (dump %.2f, tar|zstd %.2f, store %.2f)  load %s\n' "$1" \
    "$(awk "BEGIN {print ($t3 - $t0) / 1000}")" "$(awk "BEGIN {print ($t1 - $t0) / 1000}")" \
    "$(awk "BEGIN {print ($t2 - $t1) / 1000}")" "$(awk "BEGIN {print ($t3 - $t2) / 1000}")" "$(load)"
}

hefring_restore() { # ROUND BACKUP_ID
  local timed client op
  timed=$(timed_op "/environments/$env/restore" "{\"backup\":\"$2\"}")
  client=$(echo "$timed" | jq -r .client_ms)
  op=$(echo "$timed" | jq -c .op)
  must_succeed "Hefring restore" "$op"
  keep "round-$1-restore" "$op"
  record hefring_restore "$1" "$client"
  record hefring_restore_op "$1" "$(op_ms "$op")"
  record hefring_restore_part "$1" "$(task_ms "$op" fetch_backup restore_files)"
  for task in take_safety_backup fetch_backup restore_database restore_files run_deploy_commands; do
    record "hefring_restore.$task" "$1" "$(task_ms "$op" "$task" "$task")"
  done
  printf '  round %s  Hefring restore  %7.2f s (operation %.2f s; restore part %.2f s)  load %s\n' "$1" \
    "$(awk "BEGIN {print $client / 1000}")" "$(op_ms "$op" | awk '{print $1 / 1000}')" \
    "$(task_ms "$op" fetch_backup restore_files | awk '{print $1 / 1000}')" "$(load)"
}

hand_restore() { # ROUND
  local w="$hand/restore" files="$env_dir/files" t0 t1 t2 t3 t4
  rm -rf "$w" "$w.tar.zst"
  t0=$(now_ms)
  cp "$hand_store/$1.tar.zst" "$hand/.tmp-restore"
  sync "$hand/.tmp-restore"
  mv "$hand/.tmp-restore" "$w.tar.zst"
  t1=$(now_ms)
  mkdir -m 700 "$w"
  zstd -q -d -c "$w.tar.zst" | tar -x --no-same-owner -f - -C "$w"
  rm -f "$w.tar.zst"
  t2=$(now_ms)
  sql "DROP DATABASE IF EXISTS \`$db\`; CREATE DATABASE \`$db\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
  mariadb "${db_admin[@]}" --batch "$db" < "$w/database.sql"
  t3=$(now_ms)
  chown -R www-data:www-data "$w/files"
  rm -rf "$files.old"
  mv "$files" "$files.old"
  mv "$w/files" "$files"
  rm -rf "$files.old" "$w"
  t4=$(now_ms)
  record hand_restore "$1" $((t4 - t0))
  record hand_restore.fetch "$1" $((t1 - t0))
  record hand_restore.unpack "$1" $((t2 - t1))
  record hand_restore.database "$1" $((t3 - t2))
  record hand_restore.files "$1" $((t4 - t3))
  printf '  round %s  hand restore     %7.2f s (fetch %.2f, unpack %.2f, database %.2f, files %.2f)  load %s\n' "$1" \
    "$(awk "BEGIN {print ($t4 - $t0) / 1000}")" "$(awk "BEGIN {print ($t1 - $t0) / 1000}")" \
    "$(awk "BEGIN {print ($t2 - $t1) / 1000}")" "$(awk "BEGIN {print ($t3 - $t2) / 1000}")" \
    "$(awk "BEGIN {print ($t4 - $t3) / 1000}")" "$(load)"
}

echo "load average before the rounds: $(cut -d' ' -f1-3 /proc/loadavg) (before setup: $load_before; $(nproc) cores)"
site_bytes=""
for round in $(seq "$rounds"); do
  if [ $((round % 2)) -eq 1 ]; then
    settle; hefring_backup "$round"; settle; hand_backup "$round"
  else
    settle; hand_backup "$round"; settle; hefring_backup "$round"
  fi
  if [ -z "$site_bytes" ]; then
    backup=$(api GET "/backups/$hefring_backup_id")
    dump_bytes=$(echo "$backup" | jq -r .manifest.database.size)
    files_bytes=$(echo "$backup" | jq -r .manifest.files.bytes)
    site_bytes=$((dump_bytes + files_bytes))
    echo "  site: dump $dump_bytes bytes (the hand dump: $hand_dump_bytes), files $files_bytes bytes in $(echo "$backup" | jq -r .manifest.files.count) files; Hefring's archive $(echo "$backup" | jq -r .size) bytes, the hand's $(stat -c %s "$hand_store/$round.tar.zst")"
  fi
  if [ $((round % 2)) -eq 1 ]; then
    settle; hefring_restore "$round" "$hefring_backup_id"; settle; hand_restore "$round"
  else
    settle; hand_restore "$round"; settle; hefring_restore "$round" "$hefring_backup_id"
  fi
  rm -f "$hand_store/$round.tar.zst"
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$results" "$site_bytes" <<'PY'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    metric, _, ms = line.rstrip("\n").split("\t")
    rows.setdefault(metric, []).append(int(ms) / 1000)
site = int(sys.argv[2])
med = {k: statistics.median(v) for k, v in rows.items()}
print()
print("site: %.1f MB (database dump + files); %d rounds; MB = 10^6 bytes" % (site / 1e6, len(rows["hand_backup"])))
print()
print("%-58s %-26s %9s %8s %10s" % ("side", "rounds (s)", "median s", "MB/s", "% of hand"))
def line(label, key, hand):
    vals = " ".join("%.2f" % v for v in rows[key])
    pct = "" if hand is None else "%.0f%%" % (100 * med[hand] / med[key])
    print("%-58s %-26s %9.2f %8.1f %10s" % (label, vals, med[key], site / 1e6 / med[key], pct))
line("backup: hand (dump, tar|zstd -3, store)", "hand_backup", None)
line("backup: Hefring (POST -> succeeded)", "hefring_backup", "hand_backup")
line("backup: Hefring (operation start -> finish)", "hefring_backup_op", "hand_backup")
line("restore: hand (fetch, unpack, load, swap)", "hand_restore", None)
line("restore: Hefring part (fetch_backup..restore_files)", "hefring_restore_part", "hand_restore")
line("restore: Hefring (POST -> succeeded, with safety backup)", "hefring_restore", "hand_restore")
line("restore: Hefring (operation, with safety backup)", "hefring_restore_op", "hand_restore")
print()
print("medians of the steps (s):")
for prefix in ("hand_backup.", "hefring_backup.", "hand_restore.", "hefring_restore."):
    parts = [(k[len(prefix):], med[k]) for k in rows if k.startswith(prefix)]
    print("  %-17s %s" % (prefix.rstrip("."), ", ".join("%s %.2f" % p for p in parts)))
PY
echo
echo "load average: before setup $load_before, after the rounds $load_after ($(nproc) cores)"
