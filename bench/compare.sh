#!/usr/bin/env bash
# mq-trio vs Redis pub/sub, same scenarios, same run, same machine.
#
#   bench/compare.sh [extra 'mq-trio bench' options, e.g. --duration 3 rtt e2e]
#
# Installs Debian's redis-server if it is missing, starts Redis (127.0.0.1, no
# persistence) and mq-trio on CPU 0, runs the generator on CPU 1, writes
# docs/benchmarks.md (the generated block), docs/benchmarks.png and
# bench/results/latest.jsonl, and stops both servers whatever happens.
# Environment: PYTHON (an interpreter with mq-trio installed, default python3),
# MQ_PORT (7199), REDIS_PORT (6399), SERVER_CPU (0), GEN_CPU (1).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
MQ_PORT=${MQ_PORT:-7199}
REDIS_PORT=${REDIS_PORT:-6399}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}

if ! command -v redis-server >/dev/null; then
    echo "installing redis-server (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y redis-server >/dev/null || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; }
fi
if ! "$PYTHON" -c "import mq_trio.benchmark" 2>/dev/null; then
    echo "$PYTHON cannot import mq_trio: pip install -e '.[plot]' first (or set PYTHON)" >&2
    exit 2
fi

# 10,000 connections need more than the usual 1024 descriptors (servers and generator).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -INT "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 100); do
        if "$PYTHON" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2
    return 1
}

taskset -c "$SERVER_CPU" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' \
    --appendonly no --maxclients 15000 --logfile /dev/null --daemonize no &
pids+=($!)
taskset -c "$SERVER_CPU" "$PYTHON" -m mq_trio serve --host 127.0.0.1 --port "$MQ_PORT" \
    --log-level warning &
mq_pid=$!
pids+=("$mq_pid")
wait_port "$REDIS_PORT"
wait_port "$MQ_PORT"

status=0
taskset -c "$GEN_CPU" "$PYTHON" -m mq_trio bench --port "$MQ_PORT" --server-pid "$mq_pid" \
    --compare-redis "127.0.0.1:$REDIS_PORT" \
    --json bench/results/latest.jsonl --plot docs/benchmarks.png \
    --markdown docs/benchmarks.md "$@" || status=$?
echo "wrote docs/benchmarks.md, docs/benchmarks.png, bench/results/latest.jsonl" >&2
exit "$status"
