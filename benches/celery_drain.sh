#!/usr/bin/env bash
# Reference figures for Hefring's distributed-queue benchmark: Python Celery draining N queued
# no-op tasks, in both modes of benches/celery_drain.py (like-for-like: acks_late and an rpc://
# result per task; defaults: Celery's defaults), on a throwaway RabbitMQ vhost.
#
#   benches/celery_drain.sh [N] [extra celery_drain.py options, e.g. --concurrency 2]
#
# On a shared machine add `--wait-idle 600` (start each worker only once the CPUs are quiet)
# and check `load.other_cpu_seconds_during_drain` in the JSON: above ~0.5 s, something else
# competed with the drain; rerun.
#
# N defaults to 20000. Needs Python with celery 5.x (PYTHON, default python3), RabbitMQ on
# 127.0.0.1:5672 with guest/guest, and rabbitmqctl. Creates vhost celery-drain-PID, deletes it
# at the end (also on failure). Progress and details go to stderr; stdout gets the two JSON
# lines, like-for-like first, then defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
shift || true
python=${PYTHON:-python3}
"$python" -c 'import celery' 2>/dev/null || { echo "needs celery: pip install celery" >&2; exit 1; }
command -v rabbitmqctl >/dev/null || { echo "needs rabbitmqctl" >&2; exit 1; }

vhost="celery-drain-$$"
rabbitmqctl -q add_vhost "$vhost" >/dev/null
trap 'rabbitmqctl -q delete_vhost "$vhost" >/dev/null 2>&1 || echo "could not delete vhost $vhost" >&2' EXIT
rabbitmqctl -q set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null
broker="amqp://guest:guest@127.0.0.1:5672/$vhost"

lines=()
for mode in like-for-like defaults; do
  echo "== celery_drain.py --tasks $n --mode $mode $* (uptime: $(uptime))" >&2
  line=$("$python" benches/celery_drain.py --broker "$broker" --tasks "$n" --mode "$mode" "$@" | tail -n 1)
  lines+=("$line")
done
printf '%s\n' "${lines[@]}"
