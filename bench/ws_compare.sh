#!/usr/bin/env bash
# Fan-out over WebSocket (issue 16, point 1): mq-trio's WebSocket listener beside its TCP
# listener and beside NATS's WebSocket listener (and NATS over TCP), same run, same machine.
#
#   bench/ws_compare.sh [extra 'mq-trio bench' options, e.g. --duration 3]
#
# Installs Debian's nats-server if it is missing (apt-get install -y nats-server), starts
# mq-trio (--port, --ws-port) and nats-server (TCP and `websocket { no_tls }`) on CPU 0,
# runs the generator on CPU 1: fanout S=1,10,100 and e2e, publisher over TCP, subscribers
# over WebSocket or TCP. Prints a Markdown table with the ratios mq-trio WS / mq-trio TCP
# and mq-trio WS / NATS WS, writes the JSON lines to bench/results/ws-*.jsonl, and stops
# both servers (SIGTERM, then SIGKILL) whatever happens.
# Environment: PYTHON (an interpreter with mq-trio installed, default python3), MQ_PORT
# (7299), MQ_WS_PORT (7298), NATS_PORT (4299), NATS_WS_PORT (4298), SERVER_CPU (0),
# GEN_CPU (1).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

PYTHON=${PYTHON:-python3}
MQ_PORT=${MQ_PORT:-7299}
MQ_WS_PORT=${MQ_WS_PORT:-7298}
NATS_PORT=${NATS_PORT:-4299}
NATS_WS_PORT=${NATS_WS_PORT:-4298}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}

if ! command -v nats-server >/dev/null; then
    echo "installing nats-server (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y nats-server >/dev/null || { apt-get update >/dev/null && apt-get install -y nats-server >/dev/null; }
fi
if ! (cd / && "$PYTHON" -c "import mq_trio.benchmark.ws") 2>/dev/null; then
    echo "$PYTHON cannot import mq_trio (with its WebSocket bench): pip install -e . first (or set PYTHON)" >&2
    exit 2
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
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

cat >"$work/nats.conf" <<EOF
listen: "127.0.0.1:$NATS_PORT"
# the generator's subscribers do not answer PINGs: none within a run
ping_interval: "10m"
websocket { listen: "127.0.0.1:$NATS_WS_PORT", no_tls: true }
EOF
taskset -c "$SERVER_CPU" nats-server -c "$work/nats.conf" >"$work/nats.log" 2>&1 &
nats_pid=$!
pids+=("$nats_pid")
# From outside the checkout: "-m mq_trio" in the checkout's directory would import the
# checkout, not the mq-trio installed for PYTHON.
(cd / && exec taskset -c "$SERVER_CPU" "$PYTHON" -m mq_trio serve --host 127.0.0.1 \
    --port "$MQ_PORT" --ws-port "$MQ_WS_PORT" --log-level warning) &
mq_pid=$!
pids+=("$mq_pid")
for p in "$NATS_PORT" "$NATS_WS_PORT" "$MQ_PORT" "$MQ_WS_PORT"; do wait_port "$p"; done

mkdir -p bench/results
out=$root/bench/results
common=(--subscribers 1,10,100 --no-progress "$@" fanout e2e)
bench() {
    (cd / && taskset -c "$GEN_CPU" "$PYTHON" -m mq_trio bench "$@")
}
status=0
bench --port "$MQ_PORT" --server-pid "$mq_pid" --json "$out/ws-mq-tcp.jsonl" \
    "${common[@]}" || status=$?
bench --port "$MQ_PORT" --server-pid "$mq_pid" --ws --ws-port "$MQ_WS_PORT" \
    --json "$out/ws-mq-ws.jsonl" "${common[@]}" || status=$?
bench --nats --port "$NATS_PORT" --server-pid "$nats_pid" --ws --ws-port "$NATS_WS_PORT" \
    --json "$out/ws-nats-ws.jsonl" "${common[@]}" || status=$?
bench --nats --port "$NATS_PORT" --server-pid "$nats_pid" --json "$out/ws-nats-tcp.jsonl" \
    "${common[@]}" || status=$?

echo
echo "$(nats-server --version), mq-trio $(cd / && "$PYTHON" -c 'import mq_trio; print(mq_trio.__version__)' 2>/dev/null || echo '?'), $(nproc) CPUs, $(uname -sr)"
echo
(cd / && "$PYTHON" -m mq_trio.benchmark.ws_report "$out"/ws-mq-tcp.jsonl "$out"/ws-mq-ws.jsonl \
    "$out"/ws-nats-ws.jsonl "$out"/ws-nats-tcp.jsonl)
exit "$status"
