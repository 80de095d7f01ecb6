#!/bin/sh
# Install the real servers the benchmark tests compare against: Debian's redis-server
# (tests/test_bench*.py) and nats-server (tests/test_bench_ws.py). Idempotent and quick
# when they are there. Never fails the build: without one, its tests are skipped, loudly.
set -u
missing=""
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v nats-server >/dev/null 2>&1 || missing="$missing nats-server"
if [ -z "$missing" ]; then
    echo "install-servers: redis-server and nats-server are installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-servers: no apt-get: the tests needing$missing will be SKIPPED" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-servers: not root and no sudo: the tests needing$missing will be SKIPPED" >&2
        exit 0
    fi
fi
echo "install-servers: installing Debian's$missing"
# (installing starts them as services on their default ports; the tests use their own)
if $SUDO apt-get update -qq && \
   DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null; then
    echo "install-servers: installed$missing"
else
    echo "install-servers: apt-get failed: the tests needing$missing will be SKIPPED" >&2
fi
exit 0
