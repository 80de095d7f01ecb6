#!/usr/bin/env bash
# Acknowledged jobs: mq-trio vs Redis Streams consumer groups, in memory and durable,
# all four in one session on the same machine (issue #14 point 7).
#
#   bench/queue_compare.sh [extra 'mq-trio bench queue' options, e.g. --duration 3]
#
# Installs Debian's redis-server if it is missing, then starts on CPU 0:
#   redis (memory)            --save '' --appendonly no
#   redis (AOF everysec)      --save '' --appendonly yes --appendfsync everysec (temp dir)
#   mq-trio (memory)
#   mq-trio (--data-dir)      --data-dir (temp dir) --fsync everysec
# runs 'mq-trio bench queue' against each on CPU 1, Redis then mq-trio per mode, and
# prints the table of both and their ratio per mode (Markdown with MARKDOWN=1). Servers
# and temp dirs are removed whatever happens. Nothing in the repository is rewritten.
# Environment: PYTHON (an interpreter with mq-trio installed, default python3), JSON (also
# keep the results, JSON lines, in this file), SERVER_CPU (0), GEN_CPU (1), MARKDOWN.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
# The defaults of the published run; options given to the script come after, so win.
DEFAULTS=(--duration 5 --producers 2 --consumers 2 --prefetch 300 --window 300 --size 64)

BENCH_NAME=queue-bench
# shellcheck source=bench/_servers.sh
source "bench/_servers.sh"

mkdir -p "$work/redis-aof" "$work/mq-data"
: >"$work/results.jsonl"
redis_mem_port=$(free_port); start_redis "$redis_mem_port" --appendonly no; redis_mem_pid=$last_pid
redis_aof_port=$(free_port)
start_redis "$redis_aof_port" --appendonly yes --appendfsync everysec --dir "$work/redis-aof"
redis_aof_pid=$last_pid
mq_mem_port=$(free_port); start_mq "$mq_mem_port"; mq_mem_pid=$last_pid
mq_disk_port=$(free_port)
start_mq "$mq_disk_port" --data-dir "$work/mq-data" --fsync everysec; mq_disk_pid=$last_pid
for port in "$redis_mem_port" "$redis_aof_port" "$mq_mem_port" "$mq_disk_port"; do
    wait_port "$port"
done

status=0
run() {  # name, port, pid, [--redis]
    local name=$1 port=$2 pid=$3
    shift 3
    echo "== $name" >&2
    rm -f "$work/part.jsonl"
    taskset -c "$GEN_CPU" "$PYTHON" -m mq_trio bench queue --no-progress --name "$name" \
        --port "$port" --server-pid "$pid" "$@" "${DEFAULTS[@]}" "${EXTRA[@]}" \
        --json "$work/part.jsonl" >&2 || {
        local rc=$?
        [ "$rc" -lt 128 ] || exit "$rc"  # killed by a signal (Ctrl-C): stop here
        status=$rc
    }
    cat "$work/part.jsonl" >>"$work/results.jsonl" 2>/dev/null || status=1
}
EXTRA=("$@")
# Per mode, Redis first then mq-trio: the summary pairs each mq-trio run with the Redis
# run just before it.
run "redis (memory)" "$redis_mem_port" "$redis_mem_pid" --redis
run "mq-trio (memory)" "$mq_mem_port" "$mq_mem_pid"
run "redis (AOF everysec)" "$redis_aof_port" "$redis_aof_pid" --redis
run "mq-trio (--data-dir, fsync everysec)" "$mq_disk_port" "$mq_disk_pid"

echo >&2
echo "redis: $(redis-server --version)" >&2
echo "mq-trio: $("$PYTHON" -c 'import mq_trio; print(mq_trio.__version__)' 2>/dev/null || echo '?'), $("$PYTHON" --version)" >&2
summary=(-c 'import sys; from mq_trio.benchmark.report import queue_summary_main as m; sys.exit(m(sys.argv[1:]))' "$work/results.jsonl")
if [ -n "${MARKDOWN:-}" ]; then
    summary+=(--markdown)
fi
"$PYTHON" "${summary[@]}" || status=$?
if [ -n "${JSON:-}" ]; then
    cp "$work/results.jsonl" "$JSON"
fi
exit "$status"
