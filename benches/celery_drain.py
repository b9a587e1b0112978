#!/usr/bin/env python3
"""Reference benchmark: Python Celery draining N queued no-op tasks.

Hefring's own distributed-queue benchmark (crates/engine/benches/distributed_queue.rs) is
compared against this one in the same run; `benches/celery_drain.sh N` runs both modes on a
throwaway vhost.

    python3 benches/celery_drain.py --broker amqp://guest:guest@127.0.0.1:5672/VHOST \\
        --tasks N --mode like-for-like|defaults [--concurrency 2] [--latency-samples 200]

The vhost belongs to the caller: it must exist (with permissions for the user in the URL) and
is not deleted; everything this script creates in it is deleted at the end.

What it does
------------
1. Writes a small task module (`bench_tasks.py`, tasks `bench.noop` and `bench.stamp`, queue
   `bench`) and its settings to a temporary directory, so that the worker can import it.
2. Publishes N `bench.noop` tasks with NO worker running, through Celery's own `apply_async`
   (message protocol 2, JSON), persistent, with publisher confirms (py-amqp
   `confirm_publish`: each publish waits for the broker's ack, one at a time), and checks with
   a passive `queue.declare` that the queue holds exactly N ready messages and no consumer.
3. Starts a real worker process, timing from just before the process is spawned:
       python3 -m celery -A bench_tasks worker -P prefork -c CONCURRENCY -Q bench \\
           --without-gossip --without-mingle --without-heartbeat -l warning
   (`python3 -m celery` is the `celery` command without the pyenv shim in front of it.)
   - like-for-like: `task_acks_late=True`, result backend `rpc://`, one result per task. The
     drain ends when the client has received all N results from its rpc reply queue (the
     queue of the publishing thread; by default read with a plain kombu consumer, see
     "Result collection" below; --collect join_native|get for Celery's result API).
   - defaults: Celery's defaults (acks early, no result backend; `task_ignore_result=True`).
     The drain ends when all N tasks have executed: each task appends one byte to a shared
     file (O_APPEND, one write(2) per task, about 2 us); the client stat(2)s it every 2 ms and
     the drain ends when its size is N. With early acks, a task is acked when a pool process
     accepts it, i.e. before it runs, so "N executed" implies "0 ready, 0 unacked" up to the
     acks of the last couple of tasks in flight; this is then verified (outside the timing)
     with a passive queue.declare (ready = 0) and one `rabbitmqctl list_queues` (ready and
     unacked = 0). The management plugin is not enabled on these machines and
     `rabbitmqctl` takes ~0.3 s per call, so neither is used in the timed loop.
   The same byte-per-task file is written in both modes (same task body), so in
   like-for-like the client also knows when the last task executed, and reports the lag
   between that and the last result received, plus the largest backlog (executed but not yet
   received) sampled every 50 ms: that shows whether collecting the results is the bottleneck.
   Startup = worker spawn -> first task executed (each pool process records, with
   CLOCK_MONOTONIC, the time of its first task). tasks_per_second = N / drain_seconds;
   tasks_per_second_after_startup = N / (drain_seconds - startup_seconds).
4. With --latency-samples K > 0: after the drain, with the worker running and idle (0.5 s
   pause), sends K `bench.stamp` tasks one at a time (same mode settings, same publisher
   confirms); each records CLOCK_MONOTONIC when it starts into a file; dispatch latency =
   task start - the instant just before apply_async. The next sample is sent once the
   previous task has started (and, like-for-like, once its result arrived). p50/p99/max in ms.
5. Stops the worker (SIGTERM, warm shutdown; SIGKILL to its process group if it lingers),
   deletes the queues and exchanges Celery created (bench, the rpc reply queue, the pidbox
   queue and exchanges) and lists what is left in the vhost (best effort, `rabbitmqctl`).

Human-readable progress goes to stderr; the last line on stdout is one JSON object with
every figure and the settings used. It also carries the machine load: loadavg and CPU busy
just before the worker starts, and `other_cpu_seconds_during_drain` = CPU time the machine
spent during the drain outside this benchmark (client, worker processes, the RabbitMQ VM),
from /proc. On this 2-core machine a value above ~0.5 s means something else (a cargo build,
a test run) competed; rerun then.

Settings chosen (measured on this 2-core machine, Celery 5.7.0 / kombu 5.7.0 / py-amqp 5.4.2,
concurrency 2, N=20000, only runs with no other load during the drain; tasks/s from spawn)
------------------------------------------------------------------------------------------
- `-O fair` vs default: identical in Celery 5.7 (both map to the FAIR pool scheduling
  strategy, and the CLI offers nothing else), so no -O is passed.
- worker_prefetch_multiplier (prefetch count = multiplier x concurrency):
    defaults:      1: 1704 (N=20000; at N=10000 it matched 4, 1672 vs 1671);
                   4 (Celery's default): 1681-2171 (6 runs, mean ~1950);
                   16: 1801-2005; 64: 1782-2050 (6 runs, mean ~1910). No gain over the
                   default: 4 is used.
    like-for-like: 1: ~886 at N=10000 (4: 1050-1074 there);
                   with join_native collection: 4: 1116-1132; 64: 1160-1193;
                   with the kombu collector: 1: 1126; 64: 1167-1310. 64 is used.
  Expect a run-to-run spread of about +-10% even with nothing else running.
- Result collection (like-for-like). Every way tried keeps up with the worker (the last
  result arrives within a few ms of the last task executing, backlog below ~600 results),
  but on 2 cores the client's CPU competes with the worker:
    ResultSet.join_native: ~6 s client CPU for 20000 results, 1160-1190 tasks/s;
    AsyncResult.get in order: ~6.7 s, ~1095 tasks/s;
    a plain kombu consumer on the same rpc reply queue (decodes each result, checks its
    task id and SUCCESS): ~3.2 s, 1200-1310 tasks/s.
  Collected alone, after all tasks had executed, join_native receives ~2200-2850 results/s.
  The kombu consumer is the default (--collect kombu): the least client overhead, so the
  best figure for Celery; --collect join_native gives the stock-client figure.
- The worker publishes its results without publisher confirms (Celery's default for the
  rpc backend; `result_persistent` False). --worker-confirms turns py-amqp confirm_publish on
  in the worker too, which is what Hefring does with its replies: ~970 tasks/s (join_native)
  instead of ~1165.
- Serializer JSON (protocol 2), events off, no gossip/mingle/heartbeat, log level warning.
- --wait-idle SECONDS makes the script wait, after publishing, for a quiet machine before it
  starts the worker (the runs above used --wait-idle 600 --idle-percent 8, and were
  repeated when other_cpu_seconds_during_drain was above 0.5).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

QUEUE = 'bench'

MODULE_SRC = r'''
"""Tasks for benches/celery_drain.py (generated)."""
import json
import os
import time

from celery import Celery

_here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_here, "bench_config.json")) as f:
    _cfg = json.load(f)

app = Celery("bench_tasks", broker=_cfg["broker"])
app.conf.update(_cfg["conf"])

_COUNT = _cfg["count_file"]
_FIRST = _cfg["first_file"]
_STAMPS = _cfg["stamp_file"]
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT
_count_fd = None


@app.task(name="bench.noop")
def noop():
    global _count_fd
    if _count_fd is None:
        fd = os.open(_FIRST, _FLAGS, 0o644)
        os.write(fd, b"%d %.6f\n" % (os.getpid(), time.monotonic()))
        os.close(fd)
        _count_fd = os.open(_COUNT, _FLAGS, 0o644)
    os.write(_count_fd, b".")


@app.task(name="bench.stamp")
def stamp(i):
    now = time.monotonic()
    fd = os.open(_STAMPS, _FLAGS, 0o644)
    os.write(fd, b"%d %.6f\n" % (i, now))
    os.close(fd)
    return now
'''

# Best settings found per mode (see the docstring).
DEFAULT_PREFETCH = {'like-for-like': 64, 'defaults': 4}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def percentile(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(1, min(len(sorted_vals), int(-(-len(sorted_vals) * p // 1))))
    return sorted_vals[k - 1]


def vhost_of(broker):
    path = urllib.parse.urlparse(broker).path
    if not path or path == '/':
        return '/'
    return urllib.parse.unquote(path[1:])


# --- CPU accounting from /proc (to tell whether something else used the machine) ---------

TICK = os.sysconf('SC_CLK_TCK')


def machine_busy_seconds():
    with open('/proc/stat') as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
    return busy / TICK


def proc_stat(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(')') + 2:].split()
    # rest[0] is field 3 (state); utime = field 14, stime = 15, pgrp = 5
    return {'pgrp': int(rest[2]), 'cpu': (int(rest[11]) + int(rest[12])) / TICK}


def pids_where(pred):
    out = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and pred(int(name), st):
                out.append((int(name), st))
    return out


def group_cpu(pgid):
    return sum(st['cpu'] for _, st in pids_where(lambda p, st: st['pgrp'] == pgid))


def rabbit_pids():
    pids = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                with open(f'/proc/{name}/comm') as f:
                    if f.read().strip() in ('beam.smp', 'epmd', 'erl_child_setup', 'inet_gethost'):
                        pids.append(int(name))
            except OSError:
                pass
    return pids


def pids_cpu(pids):
    total = 0.0
    for p in pids:
        st = proc_stat(p)
        if st:
            total += st['cpu']
    return total


def self_cpu():
    t = os.times()
    return t.user + t.system


def busy_percent_over(seconds):
    a = machine_busy_seconds()
    time.sleep(seconds)
    return 100.0 * (machine_busy_seconds() - a) / seconds / os.cpu_count()


# --- broker helpers (kombu, outside the timed part) --------------------------------------

def queue_counts(conn, name):
    """(ready messages, consumers) by a passive queue.declare; None if it does not exist."""
    ch = conn.channel()
    try:
        _, ready, consumers = ch.queue_declare(queue=name, passive=True)
        return ready, consumers
    except conn.channel_errors:
        return None
    finally:
        try:
            ch.close()
        except Exception:
            pass


def rabbitmqctl_queues(vhost):
    try:
        out = subprocess.run(
            ['rabbitmqctl', '-q', 'list_queues', '-p', vhost, '--no-table-headers',
             'name', 'messages_ready', 'messages_unacknowledged', 'consumers'],
            capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = {}
    for line in out.stdout.splitlines():
        parts = line.split('\t')
        if len(parts) == 4:
            rows[parts[0]] = [int(x) for x in parts[1:]]
    return rows


def rabbitmqctl_exchanges(vhost):
    try:
        out = subprocess.run(['rabbitmqctl', '-q', 'list_exchanges', '-p', vhost,
                              '--no-table-headers', 'name'],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [x for x in out.stdout.splitlines()
            if x.strip() and not x.startswith('amq.')]


class RawResultCollector:
    """Receives rpc:// results with a plain kombu consumer on the client's reply queue.

    The cheap way for a client to collect results (no AsyncResult/promise bookkeeping): a
    no-ack consumer, each message's JSON body decoded by kombu, counted when its status is
    SUCCESS. It consumes from before the worker starts until the end, so the auto-delete
    reply queue stays in place.
    """

    def __init__(self, broker, queue):
        import kombu
        self.conn = kombu.Connection(broker)
        self.conn.connect()
        self.done = set()
        self.consumer = kombu.Consumer(self.conn.channel(), queues=[queue], no_ack=True,
                                       accept=['json'], callbacks=[self._on_message])
        self.consumer.consume()

    def _on_message(self, body, message):
        if body.get('status') == 'SUCCESS':
            self.done.add(body.get('task_id'))
        elif body.get('status') in ('FAILURE', 'REVOKED', 'REJECTED'):
            raise SystemExit(f'task {body.get("task_id")} ended {body.get("status")}')

    def wait(self, ids, on_result=None, on_interval=None, timeout=60):
        pending = set(ids)
        deadline = time.monotonic() + timeout
        while pending:
            ready = pending & self.done
            if ready:
                pending -= ready
                self.done -= ready
                if on_result:
                    for task_id in ready:
                        on_result(task_id, None)
                continue
            if time.monotonic() > deadline:
                raise SystemExit(f'{len(pending)} results missing after {timeout} s')
            try:
                self.conn.drain_events(timeout=1)
            except socket.timeout:
                if on_interval:
                    on_interval()

    def close(self):
        try:
            self.consumer.cancel()
        except Exception:
            pass
        self.conn.release()


# --- the benchmark -------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--broker', required=True)
    ap.add_argument('--tasks', type=int, required=True)
    ap.add_argument('--mode', choices=('like-for-like', 'defaults'), required=True)
    ap.add_argument('--concurrency', type=int, default=2)
    ap.add_argument('--latency-samples', type=int, default=200)
    ap.add_argument('--prefetch-multiplier', type=int, default=None,
                    help='worker_prefetch_multiplier (default: the best found per mode)')
    ap.add_argument('--optimization', choices=('default', 'fair'), default=None,
                    help='worker -O (default and fair are the same in Celery >= 4)')
    ap.add_argument('--collect', choices=('kombu', 'join_native', 'get'), default='kombu',
                    help='like-for-like: how the client collects the results')
    ap.add_argument('--wait-idle', type=float, default=0, metavar='SECONDS',
                    help='after publishing, wait up to SECONDS for the machine to be quiet '
                         '(CPU busy below --idle-percent over 1 s) before starting the worker')
    ap.add_argument('--idle-percent', type=float, default=15)
    ap.add_argument('--collect-after-executed', action='store_true',
                    help='diagnostic (like-for-like): start collecting results only once all '
                         'tasks executed, to time the collection alone')
    ap.add_argument('--worker-confirms', action='store_true',
                    help='publisher confirms in the worker too (its result messages)')
    args = ap.parse_args()
    if args.tasks < 1:
        ap.error('--tasks must be at least 1')

    import celery
    import kombu
    from celery.result import ResultSet

    mode = args.mode
    prefetch = args.prefetch_multiplier
    if prefetch is None:
        prefetch = DEFAULT_PREFETCH[mode]
    vhost = vhost_of(args.broker)
    nodename = f'bench-{os.getpid()}@localhost'

    conf = {
        'task_default_queue': QUEUE,
        'task_serializer': 'json',
        'accept_content': ['json'],
        'result_serializer': 'json',
        'worker_prefetch_multiplier': prefetch,
        'broker_connection_retry_on_startup': True,
        'worker_send_task_events': False,
    }
    if mode == 'like-for-like':
        conf.update({'task_acks_late': True, 'result_backend': 'rpc://',
                     'task_ignore_result': False})
    else:
        conf.update({'task_ignore_result': True})
    if args.worker_confirms:
        conf['broker_transport_options'] = {'confirm_publish': True}

    tmp = tempfile.mkdtemp(prefix='celery-drain-')
    count_file = os.path.join(tmp, 'executed')
    first_file = os.path.join(tmp, 'first')
    stamp_file = os.path.join(tmp, 'stamps')
    with open(os.path.join(tmp, 'bench_config.json'), 'w') as f:
        json.dump({'broker': args.broker, 'conf': conf, 'count_file': count_file,
                   'first_file': first_file, 'stamp_file': stamp_file}, f)
    with open(os.path.join(tmp, 'bench_tasks.py'), 'w') as f:
        f.write(MODULE_SRC)
    open(count_file, 'wb').close()
    open(stamp_file, 'wb').close()

    worker_cmd = [sys.executable, '-m', 'celery', '-A', 'bench_tasks', 'worker',
                  '-P', 'prefork', '-c', str(args.concurrency), '-Q', QUEUE,
                  '--without-gossip', '--without-mingle', '--without-heartbeat',
                  '-l', 'warning', '-n', nodename]
    if args.optimization:
        worker_cmd += ['-O', args.optimization]

    settings = {
        'celery': celery.__version__, 'kombu': kombu.__version__,
        'pool': 'prefork', 'concurrency': args.concurrency,
        'worker_prefetch_multiplier': prefetch,
        'prefetch_count': prefetch * args.concurrency,
        'optimization': args.optimization or 'default (= fair)',
        'task_acks_late': mode == 'like-for-like',
        'result_backend': 'rpc://' if mode == 'like-for-like' else None,
        'task_ignore_result': mode != 'like-for-like',
        'result_collection': args.collect if mode == 'like-for-like' else None,
        'client_publisher_confirms': True,
        'worker_publisher_confirms': bool(args.worker_confirms),
        'collect_after_executed': bool(args.collect_after_executed),
        'delivery_mode': 'persistent',
        'serializer': 'json',
        'worker_command': ' '.join(['celery'] + worker_cmd[3:]),
        'drain_end': ('all N results received by the client (rpc reply queue)'
                      if mode == 'like-for-like' else
                      'all N tasks executed (byte-per-task file, stat every 2 ms); '
                      'queue verified empty (ready 0, unacked 0) afterwards'),
    }
    log(f'celery_drain: mode={mode} tasks={args.tasks} vhost={vhost!r}')
    log('settings: ' + json.dumps(settings))

    sys.path.insert(0, tmp)
    import bench_tasks  # noqa: E402  (the module just written)
    app = bench_tasks.app
    # The client publishes with confirms whatever the worker does.
    app.conf.broker_transport_options = {'confirm_publish': True}

    worker = None
    pgid = None
    collector = None
    result = {}
    admin = kombu.Connection(args.broker)
    try:
        admin.connect()
        # Start from an empty queue of our own (declared as Celery declares it).
        existing = queue_counts(admin, QUEUE)
        if existing is not None:
            if existing[1]:
                raise SystemExit(f'queue {QUEUE!r} in vhost {vhost!r} has consumers; '
                                 'use a vhost of your own')
            ch = admin.channel()
            ch.queue_purge(QUEUE)
            ch.close()

        # ---- publish N tasks, no worker running ----
        noop = bench_tasks.noop
        results = []
        t_pub = time.monotonic()
        with app.producer_or_acquire() as producer:
            for _ in range(args.tasks):
                r = noop.apply_async(producer=producer)
                if mode == 'like-for-like':
                    results.append(r)
        publish_seconds = time.monotonic() - t_pub
        counts = queue_counts(admin, QUEUE)
        if counts != (args.tasks, 0):
            raise SystemExit(f'after publishing, queue {QUEUE!r} has (ready, consumers) = '
                             f'{counts}, expected ({args.tasks}, 0)')
        log(f'published {args.tasks} tasks (persistent, confirmed one at a time) in '
            f'{publish_seconds:.2f} s ({args.tasks / publish_seconds:.0f}/s); '
            f'queue holds {counts[0]} ready, no consumer')

        collector = None
        if mode == 'like-for-like' and args.collect == 'kombu':
            collector = RawResultCollector(args.broker, app.backend.binding)

        # ---- wait for a quiet machine (optional), note the load ----
        waited = 0.0
        t_wait = time.monotonic()
        while True:
            busy_before = busy_percent_over(1.0)
            waited = time.monotonic() - t_wait
            if busy_before < args.idle_percent or waited >= args.wait_idle:
                break
        load_before = os.getloadavg()
        log(f'machine before the worker starts: loadavg {load_before[0]:.2f} '
            f'{load_before[1]:.2f} {load_before[2]:.2f}; CPU busy over 1 s: '
            f'{busy_before:.0f}%' + (f' (waited {waited:.0f} s for it)' if args.wait_idle else ''))

        # ---- start the worker and drain ----
        env = dict(os.environ)
        env['PYTHONPATH'] = tmp + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
        rabbit = rabbit_pids()
        rabbit_cpu0 = pids_cpu(rabbit)
        self_cpu0 = self_cpu()
        busy0 = machine_busy_seconds()
        t0 = time.monotonic()
        worker = subprocess.Popen(worker_cmd, cwd=tmp, env=env, start_new_session=True,
                                  stdin=subprocess.DEVNULL, stdout=sys.stderr)
        pgid = worker.pid

        done_at = {}
        samples = []
        received = [0]
        stop_poll = threading.Event()

        def poll_executed():
            """Executed count from the file size, every POLL s; samples every 50 ms."""
            next_sample = 0.0
            while not stop_poll.is_set():
                size = os.stat(count_file).st_size
                now = time.monotonic()
                if size >= args.tasks and 'executed' not in done_at:
                    done_at['executed'] = now
                    if mode == 'defaults':
                        return
                if now >= next_sample:
                    samples.append((now - t0, size, received[0]))
                    next_sample = now + 0.05
                if worker.poll() is not None:
                    done_at['worker_died'] = now
                    return
                time.sleep(POLL)

        # defaults: the poll ends the drain: 2 ms (costs ~1.5% of a core). like-for-like: only
        # diagnostic (lag, backlog): 5 ms (~0.7% of a core).
        POLL = 0.002 if mode == 'defaults' else 0.005
        poller = threading.Thread(target=poll_executed, daemon=True)
        poller.start()
        collect_cpu = None
        if mode == 'like-for-like':
            def on_result(task_id, value):
                received[0] += 1

            def on_interval():
                if worker.poll() is not None:
                    raise SystemExit(f'the worker exited (code {worker.returncode}) '
                                     'before the drain ended')
            if args.collect_after_executed:
                while 'executed' not in done_at:
                    on_interval()
                    time.sleep(0.001)
            t_collect = time.monotonic()
            c0 = self_cpu()
            if args.collect == 'join_native':
                ResultSet(results).join_native(callback=on_result, timeout=600,
                                               on_interval=on_interval)
            elif args.collect == 'get':
                for r in results:
                    r.get(timeout=600)
                    received[0] += 1
            else:
                collector.wait({r.id for r in results}, on_result, on_interval, timeout=600)
            t_end = time.monotonic()
            collect_cpu = self_cpu() - c0
            stop_poll.set()
            poller.join()
            if 'executed' not in done_at and os.stat(count_file).st_size >= args.tasks:
                # The last results came in before the poller's next look at the file.
                done_at['executed'] = t_end
        else:
            poller.join()
            t_end = done_at.get('executed')
        if t_end is None:
            raise SystemExit(f'the worker exited (code {worker.returncode}) before the drain ended')
        # CPU used during the drain: ours vs the whole machine.
        busy1 = machine_busy_seconds()
        ours = group_cpu(pgid) + (self_cpu() - self_cpu0) + (pids_cpu(rabbit) - rabbit_cpu0)
        other_cpu = max(0.0, (busy1 - busy0) - ours)
        drain = t_end - t0

        with open(first_file) as f:
            firsts = [float(line.split()[1]) for line in f if line.strip()]
        startup = min(firsts) - t0
        executed = os.stat(count_file).st_size
        if executed != args.tasks:
            raise SystemExit(f'{executed} tasks executed, expected {args.tasks}')
        result.update({
            'mode': mode, 'tasks': args.tasks, 'concurrency': args.concurrency,
            'drain_seconds': round(drain, 3),
            'tasks_per_second': round(args.tasks / drain, 1),
            'startup_seconds': round(startup, 3),
            'tasks_per_second_after_startup': round(args.tasks / (drain - startup), 1),
            'publish_seconds': round(publish_seconds, 3),
        })
        log(f'drained {args.tasks} tasks in {drain:.2f} s from worker spawn: '
            f'{args.tasks / drain:.0f} tasks/s; first task after {startup:.2f} s; '
            f'{args.tasks / (drain - startup):.0f} tasks/s after that')
        if mode == 'like-for-like':
            # The executed time is seen by a 5 ms stat poll, so the lag is +-5 ms; clamp at 0.
            lag = max(0.0, t_end - done_at['executed'])
            executed_s = done_at['executed'] - t0
            backlog = max((s[1] - s[2] for s in samples), default=0)
            result['result_collection'] = {
                'method': args.collect,
                'all_executed_seconds': round(executed_s, 3),
                'last_executed_to_last_received_ms': round(lag * 1000, 1),
                'max_backlog_executed_not_received': backlog,
                'client_cpu_seconds': round(collect_cpu, 2),
            }
            if args.collect_after_executed:
                rc = result['result_collection']
                rc['collected_after_all_executed'] = True
                rc['collect_seconds'] = round(t_end - t_collect, 3)
                rc['results_per_second'] = round(args.tasks / (t_end - t_collect), 1)
                log(f'diagnostic: results collected only after all tasks executed: '
                    f'{t_end - t_collect:.2f} s, {args.tasks / (t_end - t_collect):.0f} results/s')
            log(f'result collection ({args.collect}): last result {lag * 1000:.1f} ms after the '
                f'last task executed; largest backlog (executed, not yet received, sampled every '
                f'50 ms) {backlog}; client CPU {collect_cpu:.2f} s over {drain:.2f} s')

        # Verify the queue is empty (outside the timing).
        counts = queue_counts(admin, QUEUE)
        rows = rabbitmqctl_queues(vhost)
        unacked = rows.get(QUEUE, [None, None])[1] if rows else None
        result['queue_after_drain'] = {'ready': counts[0] if counts else None,
                                       'unacked': unacked}
        log(f'queue after the drain: ready {result["queue_after_drain"]["ready"]}, '
            f'unacked {unacked} (rabbitmqctl)')

        # ---- dispatch latency, idle worker ----
        lat = []
        if args.latency_samples > 0:
            time.sleep(0.5)
            stamp = bench_tasks.stamp
            pos = 0
            buf = b''
            with app.producer_or_acquire() as producer, open(stamp_file, 'rb') as sf:
                for i in range(args.latency_samples):
                    sent = time.monotonic()
                    r = stamp.apply_async((i,), producer=producer)
                    started = None
                    deadline = sent + 30
                    while started is None:
                        chunk = sf.read()
                        if chunk:
                            buf += chunk
                            while b'\n' in buf:
                                line, buf = buf.split(b'\n', 1)
                                k, at = line.split()
                                if int(k) == i:
                                    started = float(at)
                        elif time.monotonic() > deadline:
                            raise SystemExit(f'latency sample {i}: task did not start in 30 s')
                        else:
                            time.sleep(0.0002)
                    lat.append((started - sent) * 1000)
                    if mode == 'like-for-like':
                        if collector is not None:
                            collector.wait({r.id}, timeout=30)
                        else:
                            r.get(timeout=30)
            lat.sort()
            result['latency_ms'] = {
                'samples': len(lat),
                'p50': round(percentile(lat, 0.50), 3),
                'p99': round(percentile(lat, 0.99), 3),
                'max': round(lat[-1], 3),
            }
            log(f'dispatch latency (before apply_async -> task started), idle worker, '
                f'n={len(lat)}: p50 {percentile(lat, 0.5):.2f} ms, p99 '
                f'{percentile(lat, 0.99):.2f} ms, max {lat[-1]:.2f} ms')
        else:
            result['latency_ms'] = None

        result['load'] = {
            'loadavg_at_worker_start': [round(x, 2) for x in load_before],
            'cpu_busy_percent_1s_before_worker_start': round(busy_before, 1),
            'other_cpu_seconds_during_drain': round(other_cpu, 2),
            'cpus': os.cpu_count(),
        }
        log(f'CPU used outside the benchmark during the drain: {other_cpu:.2f} s '
            f'(of {os.cpu_count()} x {drain:.2f} s)')
        result['settings'] = settings
    finally:
        # ---- clean up ----
        if worker is not None:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(15)
                except subprocess.TimeoutExpired:
                    log('worker did not stop in 15 s; SIGKILL to its process group')
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                worker.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if collector is not None:
            collector.close()
        try:
            if mode == 'like-for-like':
                try:
                    app.backend.result_consumer.stop()
                except Exception:
                    pass
            app.close()
        except Exception:
            pass
        names_q = [QUEUE, f'{nodename}.celery.pidbox']
        if mode == 'like-for-like':
            names_q.append(app.backend.oid)
        names_x = [QUEUE, 'celery.pidbox', 'reply.celery.pidbox', 'celeryev', 'celery']
        try:
            if not admin.connected:
                admin.connect()
            for name in names_q:
                ch = admin.channel()
                try:
                    ch.queue_delete(name)
                except admin.channel_errors:
                    pass
                try:
                    ch.close()
                except Exception:
                    pass
            for name in names_x:
                ch = admin.channel()
                try:
                    ch.exchange_delete(name)
                except admin.channel_errors:
                    pass
                try:
                    ch.close()
                except Exception:
                    pass
            admin.release()
        except Exception as exc:  # report, do not hide the benchmark's own error
            log(f'cleanup: {exc!r}')
        left_q = rabbitmqctl_queues(vhost)
        left_x = rabbitmqctl_exchanges(vhost)
        if left_q or left_x:
            log(f'cleanup: left in vhost {vhost!r}: queues {sorted(left_q or {})}, '
                f'exchanges {left_x}')
        shutil.rmtree(tmp, ignore_errors=True)

    print(json.dumps(result), flush=True)


if __name__ == '__main__':
    main()
