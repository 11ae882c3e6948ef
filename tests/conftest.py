"""Fixtures both tests/unit and tests/serve use: a real redis-server, and a real
three-node Redis Cluster."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(exe: str) -> str:
    path = shutil.which(exe)
    if path is None:  # never a skip: .ci/run installs Debian's redis-server
        pytest.fail(f"{exe} is not installed (apt-get install redis-server)")
    return path


def _wait_for_pong(port: int, proc: subprocess.Popen, what: str) -> None:
    end = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{what} did not start on port {port}")
        time.sleep(0.02)


class RedisServer:
    """A real `redis-server` on a free loopback port, appending to a file in its own
    temporary directory, so a restart on the same port keeps the data (the tests of
    Redis going away and coming back)."""

    def __init__(self) -> None:
        self.exe = _which("redis-server")
        self.dir = tempfile.mkdtemp(prefix="imagegen-redis-")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", self.dir,
             "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_for_pong(self.port, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            assert s.recv(16).startswith(b"+OK")


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


class RedisCluster:
    """Three real `redis-server`s in cluster mode on free loopback ports, joined by
    `redis-cli --cluster create` with no replicas (each owns a third of the slots);
    nothing persisted but each node's cluster config, so a node restarted on its port
    rejoins owning its slots. `url` names one node: the client finds the others."""

    def __init__(self) -> None:
        self.exe, cli = _which("redis-server"), _which("redis-cli")
        self.dir = tempfile.mkdtemp(prefix="imagegen-redis-cluster-")
        ports: set[int] = set()
        while len(ports) < 6:  # the client ports, then the cluster bus ports
            ports.add(free_port())
        # The bus port is explicit: the default, port + 10000, may be past 65535.
        self.ports, self.bus_ports = sorted(ports)[:3], sorted(ports)[3:]
        self.procs: list[subprocess.Popen | None] = [None] * 3
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}/0"
        try:
            for i in range(3):
                self.start(i)
            subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            self.wait_ok()
        except BaseException:
            self.close()
            raise

    def start(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.ports[i]),
             "--cluster-enabled", "yes", "--cluster-port", str(self.bus_ports[i]),
             "--cluster-config-file", f"{self.dir}/nodes-{i}.conf", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_for_pong(self.ports[i], self.procs[i], "redis-server (cluster)")

    def stop(self, i: int) -> None:
        if self.procs[i] is not None:
            self.procs[i].terminate()
            self.procs[i].wait(10)
            self.procs[i] = None

    def node(self, i: int):
        """A plain (single-node) client of node i: what that node alone holds."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.ports[i], decode_responses=True,
                           socket_timeout=5)

    def wait_ok(self) -> None:
        """Until every node says `cluster_state:ok` (a restarted primary waits ~2 s)."""
        end = time.monotonic() + 30
        for i in range(3):
            with self.node(i) as r:
                while r.cluster("info")["cluster_state"] != "ok":
                    if time.monotonic() > end:
                        raise RuntimeError(f"cluster node {self.ports[i]} is not ok")
                    time.sleep(0.05)

    def owner(self, key: str) -> int:
        """Which node (0-2) owns `key`'s slot, by the servers' own CLUSTER KEYSLOT."""
        with self.node(0) as r:
            slot = r.cluster("keyslot", key)
            for start, end, primary, *_ in r.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return self.ports.index(int(primary[1]))
        raise AssertionError(f"slot {slot} is not covered")

    def flush(self) -> None:
        for i in range(3):
            with self.node(i) as r:
                r.flushall()

    def close(self) -> None:
        for i in range(3):
            self.stop(i)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster():
    cluster = RedisCluster()
    yield cluster
    cluster.close()
