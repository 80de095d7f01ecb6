"""Real redis-server processes for the tests: one server, or a three-master Redis Cluster.

Everything binds 127.0.0.1 on free ports and keeps its files in a temporary directory.
The helpers are synchronous (subprocess); the fixtures are ``redis_server`` (one per
module), ``fresh_redis`` (one per test: for tests that kill or restart it) and
``redis_cluster`` (one per session). Without Debian's redis-server (tests/install-servers.sh
installs it) they skip, loudly. Use them with ``pytest_plugins = ["redis_support"]``, and
import this module's names only under TYPE_CHECKING or inside functions: imported before
pytest registers the plugin, it would not get pytest's assertion rewriting (a warning).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trustme

HOST = "127.0.0.1"
START_SECONDS = 10.0

MISSING = (
    "redis-server is not installed (tests/install-servers.sh installs Debian's): "
    "the tests against a real Redis are SKIPPED"
)


def binaries() -> tuple[str, str]:
    """redis-server and redis-cli, or a loud skip."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip(MISSING)
    return server, cli


def free_port(bus: bool = False) -> int:
    """A free loopback port (and, for a cluster node, its bus port, +10000, free too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if not bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind((HOST, port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def ping(port: int) -> bool:
    """Whether a Redis answers PING on the port (not while it is still loading its data)."""
    try:
        with socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
            return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")  # not LOADING
    except OSError:
        return False


@attrs.define
class RedisProcess:
    """One redis-server on ``port``, its files in ``directory``."""

    port: int
    directory: Path
    aof: bool = False
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        server, _ = binaries()
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [server, "--port", str(self.port), "--bind", HOST, "--dir", str(self.directory),
                "--save", "", "--appendonly", "yes" if self.aof else "no",
                "--daemonize", "no", "--logfile", "redis.log", *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_SECONDS
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.directory / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (Redis then writes its AOF), SIGKILL if it takes over 5 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the abrupt end of a crash."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(5)
        self.proc = None

    def restart(self, *, keep_data: bool = True) -> None:
        """Stop and start again on the same port, with its files or without them."""
        self.stop()
        if not keep_data:
            for path in self.directory.iterdir():
                if path.name != "redis.log":
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        self.start()

    def cli(self, *args: str) -> str:
        """``redis-cli -p PORT args...`` and its output."""
        _, cli = binaries()
        done = subprocess.run([cli, "-h", HOST, "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=30, check=True)
        return done.stdout


def start_redis(directory: Path, *, aof: bool = False, extra: tuple[str, ...] = ()) -> RedisProcess:
    """A started redis-server on a free port."""
    redis = RedisProcess(free_port(), directory, aof=aof, extra=extra)
    redis.start()
    return redis


def start_tls_redis(directory: Path, ca: trustme.CA) -> tuple[RedisProcess, int]:
    """A redis-server with a TLS port (a certificate for 127.0.0.1 from ``ca``; clients
    need no certificate) besides its plain one (which the start-up PING uses)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(HOST)
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    tls_port = free_port()
    redis = start_redis(directory, extra=(
        "--tls-port", str(tls_port), "--tls-cert-file", str(directory / "cert.pem"),
        "--tls-key-file", str(directory / "key.pem"),
        "--tls-ca-cert-file", str(directory / "ca.pem"), "--tls-auth-clients", "no",
    ))
    return redis, tls_port


@attrs.define
class RedisCluster:
    """A Redis Cluster of masters without replicas."""

    nodes: list[RedisProcess]

    @property
    def url(self) -> str:
        """The first node as a cluster seed (``redis+cluster://``)."""
        return f"redis+cluster://{HOST}:{self.nodes[0].port}"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(directory: Path, masters: int = 3) -> RedisCluster:
    """``masters`` cluster-enabled servers joined by ``redis-cli --cluster create``,
    returned once every node reports ``cluster_state:ok``."""
    _, cli = binaries()
    nodes: list[RedisProcess] = []
    cluster = RedisCluster(nodes)
    try:
        for i in range(masters):
            node = RedisProcess(
                free_port(bus=True), directory / f"node{i}",
                extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                       "--cluster-node-timeout", "5000"),
            )
            node.start()
            nodes.append(node)
        subprocess.run(
            [cli, "--cluster", "create", *[f"{HOST}:{n.port}" for n in nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=True,
        )
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server shared by a module's tests (no persistence)."""
    binaries()
    redis = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of the test's own, to kill or restart."""
    binaries()
    redis = start_redis(tmp_path / "redis")
    try:
        yield redis
    finally:
        redis.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A three-master Redis Cluster shared by the session."""
    binaries()
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()
