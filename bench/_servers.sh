# Shared by bench/queue_compare.sh and bench/durable_publish.sh (sourced, not run):
# installs Debian's redis-server if missing, checks that $PYTHON imports mq_trio, makes
# the temp dir $work (removed at exit with every server started), and defines
# free_port, wait_port, start_redis PORT ARGS... and start_mq PORT ARGS... (servers on
# $SERVER_CPU; each sets last_pid). Needs PYTHON, SERVER_CPU; BENCH_NAME names $work.
if ! command -v redis-server >/dev/null; then
    echo "installing redis-server (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y redis-server >/dev/null || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; }
fi
if ! "$PYTHON" -c "import mq_trio.benchmark" 2>/dev/null; then
    echo "$PYTHON cannot import mq_trio: pip install -e . first (or set PYTHON)" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/mq-trio-${BENCH_NAME:-bench}.XXXXXX")
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

