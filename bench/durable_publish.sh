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

if ! command -v redis-server >/dev/null; then
    echo "installing redis-server (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y redis-server >/dev/null || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; }
fi
if ! "$PYTHON" -c "import mq_trio.benchmark" 2>/dev/null; then
    echo "$PYTHON cannot import mq_trio: pip install -e . first (or set PYTHON)" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/mq-trio-durable-bench.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -INT "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    "$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}

wait_port() {
    for _ in $(seq 150); do
        if "$PYTHON" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

start_redis() {  # port, extra redis-server options...
    local port=$1
    shift
    taskset -c "$SERVER_CPU" redis-server --bind 127.0.0.1 --port "$port" --save '' \
        --logfile /dev/null --daemonize no "$@" &
    pids+=($!)
    last_pid=$!
}

start_mq() {  # port, extra 'mq-trio serve' options...
    local port=$1
    shift
    taskset -c "$SERVER_CPU" "$PYTHON" -m mq_trio serve --host 127.0.0.1 --port "$port" \
        --log-level warning "$@" &
    pids+=($!)
    last_pid=$!
}

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
