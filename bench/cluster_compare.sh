#!/usr/bin/env bash
# Cluster mode (issue 15, point 6): a two-node cluster's cross-node path (publisher on node
# A, subscribers on node B) beside a single node and plain Redis pub/sub, same run, same
# machine.
#
#   bench/cluster_compare.sh [extra 'mq-trio bench' options, e.g. --duration 3]
#
# Installs Debian's redis-server if it is missing, starts in one run: a Redis for the
# cluster and a Redis for plain pub/sub (both 127.0.0.1, no persistence), two mq-trio nodes
# with --cluster on the first, and one mq-trio node without. Every server runs on CPU 0
# (taskset), the generator on CPU 1: the cluster (Redis + A + B) gets the one core a single
# node or Redis gets, so the ratios compare the same CPU budget. Runs publish, fanout
# S=1,10,100 and e2e (p50/p99 at --rate, 5000/s), each scenario against the single node,
# the cluster (publisher on A; subscribers, in fanout and e2e, on B; the CPU of A, B and the
# cluster's Redis measured) and Redis, in turn. Prints the Markdown tables (ratios, CPU per
# message, targets), writes the JSON lines to bench/results/cluster-latest.jsonl and the
# tables into docs/benchmarks.md (between its cluster-bench markers), and stops every
# server and removes its temporary directory whatever happens.
# Environment: PYTHON (an interpreter with mq-trio and its 'cluster' extra installed,
# default python3), CLUSTER_REDIS_PORT (6497), REDIS_PORT (6498), SINGLE_PORT (7490),
# NODE_A_PORT (7491), NODE_B_PORT (7492), SERVER_CPU (0), GEN_CPU (1), WRITE_DOCS (1; 0:
# leave the docs alone), DOCS (docs/benchmarks.md), RESULTS
# (bench/results/cluster-latest.jsonl), ROUNDS (1: how often every scenario runs against
# every target, all in turn; the tables take the median), COMMIT (what the header names
# as the code measured; default: git's HEAD, and whether mq_trio/ has uncommitted changes;
# for a run from an exported tree, e.g. git archive HEAD | tar -x -C DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

PYTHON=${PYTHON:-python3}
CLUSTER_REDIS_PORT=${CLUSTER_REDIS_PORT:-6497}
REDIS_PORT=${REDIS_PORT:-6498}
SINGLE_PORT=${SINGLE_PORT:-7490}
NODE_A_PORT=${NODE_A_PORT:-7491}
NODE_B_PORT=${NODE_B_PORT:-7492}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
WRITE_DOCS=${WRITE_DOCS:-1}
ROUNDS=${ROUNDS:-1}
DOCS=${DOCS:-$root/docs/benchmarks.md}
RESULTS=${RESULTS:-$root/bench/results/cluster-latest.jsonl}

if ! command -v redis-server >/dev/null; then
    echo "installing redis-server (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y redis-server >/dev/null || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; }
fi
if ! "$PYTHON" -c "import mq_trio.benchmark.cluster_report, mq_trio.cluster, hiredis" 2>/dev/null; then
    echo "$PYTHON cannot import mq_trio with its cluster extra: pip install -e '.[cluster]' first (or set PYTHON)" >&2
    exit 2
fi

work=$(mktemp -d)
pids=()
cleanup() {
    # mq-trio stops on SIGINT, Redis on SIGTERM; both die by SIGKILL after 5 s.
    for pid in "${pids[@]}"; do
        kill -INT "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {
    for _ in $(seq 150); do
        if "$PYTHON" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on port $1; the servers' logs:" >&2
    tail -n 20 "$work"/*.log >&2 || true
    return 1
}

redis() {  # PORT: a redis-server on CPU 0, no persistence, its files in $work
    mkdir -p "$work/redis-$1"
    taskset -c "$SERVER_CPU" redis-server --bind 127.0.0.1 --port "$1" --save '' \
        --appendonly no --dir "$work/redis-$1" --logfile "$work/redis-$1.log" \
        --daemonize no &
    pids+=($!)
}
serve() {  # PORT [serve options]: mq-trio on CPU 0 (its pid in $!)
    local port=$1
    shift
    taskset -c "$SERVER_CPU" "$PYTHON" -m mq_trio serve --host 127.0.0.1 --port "$port" \
        --log-level warning "$@" 2>>"$work/mq-$port.log" &
    pids+=($!)
}

redis "$CLUSTER_REDIS_PORT"
cluster_redis_pid=$!
redis "$REDIS_PORT"
wait_port "$CLUSTER_REDIS_PORT"
wait_port "$REDIS_PORT"
serve "$SINGLE_PORT"
single_pid=$!
serve "$NODE_A_PORT" --cluster "redis://127.0.0.1:$CLUSTER_REDIS_PORT"
a_pid=$!
serve "$NODE_B_PORT" --cluster "redis://127.0.0.1:$CLUSTER_REDIS_PORT"
b_pid=$!
for p in "$SINGLE_PORT" "$NODE_A_PORT" "$NODE_B_PORT"; do wait_port "$p"; done

out=$RESULTS
mkdir -p "$(dirname "$out")"
: >"$out"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
bench() {
    local rc=0
    rm -f "$work/run.jsonl"
    taskset -c "$GEN_CPU" "$PYTHON" -m mq_trio bench --no-progress --json "$work/run.jsonl" \
        --subscribers 1,10,100 "$@" || rc=$?
    if [ "$rc" = 2 ]; then
        echo "mq-trio bench refused its arguments" >&2
        exit 2
    fi
    if [ "$rc" != 0 ]; then
        status=$rc
    fi
    if [ -f "$work/run.jsonl" ]; then
        cat "$work/run.jsonl" >>"$out"
    fi
}
status=0
for _ in $(seq "$ROUNDS"); do
for scenario in publish fanout e2e; do
    bench --name "single node" --port "$SINGLE_PORT" --server-pid "$single_pid" \
        "$@" "$scenario"
    bench --name "cluster A->B" --port "$NODE_A_PORT" --server-pid "$a_pid" \
        --sub-port "$NODE_B_PORT" --sub-pid "$b_pid" --cpu-pid "redis=$cluster_redis_pid" \
        "$@" "$scenario"
    bench --name redis --redis --port "$REDIS_PORT" "$@" "$scenario"
done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

versions=$("$PYTHON" - <<'EOF'
import platform, sys
from importlib.metadata import version
def v(name):
    try:
        return version(name)
    except Exception:
        return "?"
print(f"CPython {platform.python_version()}, trio {v('trio')}, msgspec {v('msgspec')}, "
      f"hiredis {v('hiredis')}, mq-trio {v('mq-trio')}")
EOF
)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}
if [ -z "${COMMIT:-}" ] && [ -n "$(git status --porcelain -- mq_trio 2>/dev/null)" ]; then
    commit="$commit (mq_trio/ with uncommitted changes)"
fi
header="Run of $(date -u '+%Y-%m-%d %H:%M UTC') at \`$commit\`: \`ROUNDS=$ROUNDS bench/cluster_compare.sh $*\`
(\`mq-trio bench\` per scenario and target, in turn: \`--name 'single node' --port $SINGLE_PORT\`;
\`--name 'cluster A->B' --port $NODE_A_PORT --sub-port $NODE_B_PORT --sub-pid B --cpu-pid redis=PID\`;
\`--name redis --redis --port $REDIS_PORT\`; each with \`--subscribers 1,10,100\`).
Machine: $(nproc) CPUs ($cpu), $(uname -sr), $(redis-server --version | cut -d' ' -f1-3), $versions.
Placement: Redis (both), node A, node B and the single node on CPU $SERVER_CPU; the generator on CPU $GEN_CPU.
Load average (1, 5, 15 min) before: $load_before; after: $load_after."

echo
echo "$header"
echo
docs=()
if [ "$WRITE_DOCS" = 1 ]; then
    docs=(--splice "$DOCS" --header "$header")
fi
"$PYTHON" -m mq_trio.benchmark.cluster_report "$out" "${docs[@]}"
if [ "$WRITE_DOCS" = 1 ]; then
    echo "wrote $DOCS (its cluster section) and $out" >&2
fi
exit "$status"
