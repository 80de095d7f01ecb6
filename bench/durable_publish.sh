#!/usr/bin/env bash
# Durable publishing (issue #16 point 5): mq-trio with --data-dir --fsync everysec
# beside mq-trio in memory and Redis with appendonly yes, appendfsync everysec doing the
# equivalent work (XADD topic MAXLEN 100 per message, pipelined), in one run.
#
#   bench/durable_publish.sh [extra 'mq-trio bench publish' options, e.g. --duration 3]
#
# Installs Debian's redis-server if it is missing, then starts on CPU 0 mq-trio in
# memory, mq-trio with --data-dir (temp dir) --fsync everysec, and Redis with
# --appendonly yes --appendfsync everysec (temp dir); runs 'mq-trio bench publish'
# against each on CPU 1 (Redis with --redis --redis-stream) and prints the ratios.
# Servers and temp dirs are removed whatever happens.
# Environment: PYTHON (an interpreter with mq-trio installed, default python3), JSON (also
# keep the results, JSON lines, in this file), SERVER_CPU (0), GEN_CPU (1).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
# The defaults of the published run; options given to the script come after, so win.
DEFAULTS=(--duration 5)

BENCH_NAME=durable-bench
# shellcheck source=bench/_servers.sh
source "bench/_servers.sh"

mkdir -p "$work/redis-aof" "$work/mq-data"
: >"$work/results.jsonl"
mq_mem_port=$(free_port); start_mq "$mq_mem_port"; mq_mem_pid=$last_pid
mq_disk_port=$(free_port)
start_mq "$mq_disk_port" --data-dir "$work/mq-data" --fsync everysec; mq_disk_pid=$last_pid
redis_aof_port=$(free_port)
start_redis "$redis_aof_port" --appendonly yes --appendfsync everysec --dir "$work/redis-aof"
redis_aof_pid=$last_pid
for port in "$mq_mem_port" "$mq_disk_port" "$redis_aof_port"; do
    wait_port "$port"
done

status=0
run() {  # name, port, pid, [--redis --redis-stream]
    local name=$1 port=$2 pid=$3
    shift 3
    echo "== $name" >&2
    rm -f "$work/part.jsonl"
    taskset -c "$GEN_CPU" "$PYTHON" -m mq_trio bench publish --no-progress --name "$name" \
        --port "$port" --server-pid "$pid" "$@" "${DEFAULTS[@]}" "${EXTRA[@]}" \
        --json "$work/part.jsonl" >&2 || {
        local rc=$?
        [ "$rc" -lt 128 ] || exit "$rc"
        status=$rc
    }
    cat "$work/part.jsonl" >>"$work/results.jsonl" 2>/dev/null || status=1
}
EXTRA=("$@")
run "mq-trio (memory)" "$mq_mem_port" "$mq_mem_pid"
run "mq-trio (--data-dir, fsync everysec)" "$mq_disk_port" "$mq_disk_pid"
run "redis XADD MAXLEN 100 (AOF everysec)" "$redis_aof_port" "$redis_aof_pid" --redis --redis-stream

echo >&2
echo "redis: $(redis-server --version)" >&2
"$PYTHON" - "$work/results.jsonl" <<'PY' || status=$?
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rate = {}
for r in rows:
    value = next((v for k, v in r["metrics"].items() if k.endswith("per_s")), None)
    rate[r["target"]] = value
mem, disk, redis = (rate.get(n) for n in (
    "mq-trio (memory)", "mq-trio (--data-dir, fsync everysec)",
    "redis XADD MAXLEN 100 (AOF everysec)"))
print("| server | acked msg/s |")
print("|---|---:|")
for name, value in rate.items():
    print(f"| {name} | {value:,.0f} |" if value else f"| {name} | failed |")
if mem and disk and redis:
    print()
    print(f"durable / memory: {disk / mem:.2f}x (target >= 0.5x); "
          f"durable / Redis AOF XADD: {disk / redis:.2f}x (target >= 1.0x)")
PY
if [ -n "${JSON:-}" ]; then
    cp "$work/results.jsonl" "$JSON"
fi
exit "$status"
