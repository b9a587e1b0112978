#!/usr/bin/env bash
# Benchmark: how long an environment update takes, and whether any request fails while a
# site is updated again and again under load.
#
#   benches/environment_update.sh [UPDATES] [SECONDS_OF_LOAD_PER_UPDATE_MIN]
#
# Starts `hefring serve` (release build; HEFRING_BIN to use another) on a fresh data
# directory, a local target with its own root and ports, the small PHP fixture app (SQLite,
# no deploy commands), two releases, and deploys one. Then wrk hammers the site over HTTP
# (4 connections, keep-alive) while UPDATES updates (default 20) alternate between the two
# releases. Reports each update's duration (the operation's started_at to finished_at, and
# the request-to-finish time seen by the client), p50/p90/max, and wrk's totals: requests,
# non-2xx answers and socket errors. Needs wrk, jq, curl, nginx, php-fpm (scripts/test and
# `apt-get install wrk jq` bring them).
set -euo pipefail
cd "$(dirname "$0")/.."
updates=${1:-20}

bin=${HEFRING_BIN:-target/release/hefring}
if [ -z "${HEFRING_BIN:-}" ]; then
  cargo build --release -q -p hefring
fi
for tool in wrk jq curl; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install $tool)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/hfbench-XXXXXX)
chmod 755 "$work"
data="$work/data"
root="$work/root"
mkdir -p "$root"
chmod 755 "$root"
server_pid=""
# The network rules' tables there before, so that only this run's goes afterwards.
tables_before=$(nft list tables 2>/dev/null | awk '/hefring_/{print $3}' || true)
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  for pid_file in "$root/nginx/nginx.pid" "$root/php-fpm/php-fpm.pid"; do
    [ -f "$pid_file" ] && kill "$(cat "$pid_file")" 2>/dev/null || true
  done
  # Each environment's own user, and this server's nftables table.
  for dir in "$root"/environments/env_*; do
    [ -d "$dir" ] || continue
    user="hf-$(basename "$dir" | cut -d_ -f2)"
    pkill -KILL -u "$user" 2>/dev/null || true
    userdel -f "$user" 2>/dev/null || true
    groupdel "$user" 2>/dev/null || true
  done
  for table in $(nft list tables 2>/dev/null | awk '/hefring_/{print $3}'); do
    echo "$tables_before" | grep -qx "$table" || nft delete table inet "$table" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

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
wait_op() { # ID -> prints the finished operation
  while :; do
    op=$(api GET "/operations/$1")
    case $(echo "$op" | jq -r .status) in
      succeeded|failed|cancelled) echo "$op"; return ;;
    esac
    sleep 0.02
  done
}

# The fixture app: a page that reads its SQLite database, a health check, no deploy commands.
repo="$work/repo"
git init -q -b main "$repo"
cat > "$repo/.hefring.yml" <<'YAML'
database: sqlite
install:
  - php install.php
health: /health.php
YAML
cat > "$repo/install.php" <<'PHP'
<?php
$pdo = new PDO('sqlite:' . getenv('DB_NAME'));
$pdo->exec('CREATE TABLE IF NOT EXISTS hits (id INTEGER)');
PHP
cat > "$repo/index.php" <<'PHP'
<?php
$pdo = new PDO('sqlite:' . getenv('DB_NAME'));
echo 'release=' . trim(file_get_contents(__DIR__ . '/VERSION')) . ' rows=' . $pdo->query('SELECT COUNT(*) FROM hits')->fetchColumn() . "\n";
PHP
echo '<?php echo "ok";' > "$repo/health.php"
echo 1 > "$repo/VERSION"
git -C "$repo" add -A && git -C "$repo" -c user.name=b -c user.email=b@b commit -qm one

target=$(api POST /targets "{\"name\":\"bench\",\"host\":\"local\",\"root\":\"$root\",\"http_port\":$http_port,\"https_port\":$https_port}" | jq -r .id)
wait_op "$(api POST "/targets/$target/verify" | jq -r .id)" > /dev/null
project=$(api POST /projects "{\"name\":\"app\",\"git_url\":\"$repo\"}" | jq -r .id)
build() { wait_op "$(api POST "/projects/$project/releases" '{"ref":"main"}' | jq -r .id)" | jq -r .result.release; }
release_a=$(build)
echo 2 > "$repo/VERSION"
git -C "$repo" -c user.name=b -c user.email=b@b commit -qam two
release_b=$(build)
env=$(api POST /environments "{\"name\":\"live\",\"project\":\"$project\",\"target\":\"$target\",\"domain\":\"bench.test\"}" | jq -r .id)
deployed=$(wait_op "$(api POST "/environments/$env/deploy" "{\"release\":\"$release_a\"}" | jq -r .id)")
[ "$(echo "$deployed" | jq -r .status)" = succeeded ] || { echo "deploy failed: $deployed" >&2; exit 1; }

# A Lua script makes wrk send the environment's Host header to the target's port.
cat > "$work/host.lua" <<'LUA'
wrk.headers["Host"] = "bench.test"
LUA
wrk -t 2 -c 4 -d 3600s -s "$work/host.lua" "http://127.0.0.1:$http_port/" > "$work/wrk.out" 2>&1 &
wrk_pid=$!
sleep 1

durations=()
client=()
for i in $(seq "$updates"); do
  if [ $((i % 2)) -eq 1 ]; then release=$release_b; else release=$release_a; fi
  start=$(date +%s%N)
  op=$(wait_op "$(api POST "/environments/$env/update" "{\"release\":\"$release\"}" | jq -r .id)")
  end=$(date +%s%N)
  [ "$(echo "$op" | jq -r .status)" = succeeded ] || { echo "update $i failed: $op" >&2; exit 1; }
  ms=$(echo "$op" | jq -r '((.finished_at | sub("\\.[0-9]+Z$"; "Z") | fromdateiso8601) * 1000 + (.finished_at | capture("\\.(?<f>[0-9]+)Z$").f | tonumber)) - ((.started_at | sub("\\.[0-9]+Z$"; "Z") | fromdateiso8601) * 1000 + (.started_at | capture("\\.(?<f>[0-9]+)Z$").f | tonumber))')
  durations+=("$ms")
  client+=($(( (end - start) / 1000000 )))
done
sleep 1
kill -INT "$wrk_pid"
wait "$wrk_pid" 2>/dev/null || true

stats() { # prints p50 p90 max of its arguments
  printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {p50=a[int((NR+1)/2)]; p90=a[int(NR*0.9+0.999)]; printf "p50 %d ms, p90 %d ms, max %d ms", p50, p90, a[NR]}'
}
echo "updates: $updates (alternating two releases, no deploy commands, SQLite, $(nproc) cores)"
echo "update operation (started_at -> finished_at): $(stats "${durations[@]}")"
echo "update as the client sees it (POST -> finished, polling every 20 ms): $(stats "${client[@]}")"
requests=$(grep -Eo '^ *[0-9]+ requests in' "$work/wrk.out" | grep -Eo '[0-9]+' | head -n 1)
non2xx=$(grep -Eo 'Non-2xx or 3xx responses: [0-9]+' "$work/wrk.out" | grep -Eo '[0-9]+$' || echo 0)
errors=$(grep -Eo 'Socket errors: .*' "$work/wrk.out" || echo "Socket errors: none")
echo "load during the updates (wrk, 4 connections): $requests requests, non-2xx/3xx: ${non2xx:-0}, $errors"
grep -E 'Requests/sec|Latency' "$work/wrk.out" | sed 's/^/  /'
