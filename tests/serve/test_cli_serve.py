"""`imagegen serve` as a user runs it: a real process in the loopback namespace,
with the fake engine (the real Ray Serve stack, without torch in the replicas).
Busy ports fail at once, naming the port; the first SIGINT or SIGTERM stops it
within 10 s at any moment, leaving no process behind; the start-up summary names
an unready revision (tests/unit/test_serve_startup.py: the summary's cases)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import yaml

from serve.config import ROOT

pytestmark = pytest.mark.serve

STOP_WITHIN_S = 10
DRAFT_AND_BROKEN = {"tiers": {"draft": {"model": "tiny-draft"}, "broken": {"model": "broken"}}}
DEFAULT = {"tiers": {"draft": {"model": "tiny-draft"}, "final": {"model": "tiny-final"}}}


class Service:
    """One real `imagegen serve` process; its output collected line by line."""

    def __init__(self, tmp_path, served_models, ports, routing, *, sigint_ignored=False):
        if os.environ.get("LOOPBACK_NS") != "1":
            pytest.skip("Serve tests run inside scripts/loopback (Ray binds wildcard sockets)")
        lock, models = served_models
        (tmp_path / "routing.yaml").write_text(yaml.safe_dump(routing))
        config = tmp_path / "imagegen.yaml"
        config.write_text(yaml.safe_dump({
            "lock_file": str(lock), "model_dir": str(models), "engine": "fake",
            "routing_file": str(tmp_path / "routing.yaml"),
        }))
        self.url = f"http://127.0.0.1:{ports['port']}"
        self.lines: list[str] = []
        self.started = time.time()
        # sigint_ignored: as a background job of a non-interactive shell starts it
        # (`imagegen serve &` in a script), the case that lost Ctrl-C.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "--config", str(config), "serve",
             "--port", str(ports["port"]), "--metrics-port", str(ports["metrics_port"])],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
            if sigint_ignored else None,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, deadline_s: float = 120) -> None:
        end = time.monotonic() + deadline_s
        while text not in self.output:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output}"
            assert time.monotonic() < end, f"no {text!r} within {deadline_s} s:\n{self.output}"
            time.sleep(0.1)

    def stop(self, sig=signal.SIGINT) -> int:
        """Send `sig`; its exit code. Asserts it exits within STOP_WITHIN_S, leaving
        nothing running."""
        tree = psutil.Process(self.proc.pid).children(recursive=True)
        assert tree, "the service started no process"
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"still running {STOP_WITHIN_S} s after {sig.name}:\n{self.output}")
        left = _alive(tree + _orphans_since(self.started), STOP_WITHIN_S - (time.monotonic() - t0))
        assert not left, f"left running {STOP_WITHIN_S} s after {sig.name}: {[p.info for p in left]}"
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _alive(procs: list[psutil.Process], within_s: float) -> list[psutil.Process]:
    """Those of `procs` still running after `within_s` (a zombie has exited: the
    namespace's init reaps it when it can)."""
    deadline = time.monotonic() + max(0.0, within_s)
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.info = {"pid": p.pid, "cmd": " ".join(p.cmdline())[:120]}
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _orphans_since(t0: float) -> list[psutil.Process]:
    """Processes handed to the namespace's init since t0 (what a dying service leaves)."""
    out = []
    for p in psutil.process_iter(["ppid", "create_time"]):
        if p.info["ppid"] == 1 and p.info["create_time"] >= t0 - 1 and p.pid != os.getpid():
            out.append(p)
    return out


@pytest.fixture
def service(tmp_path, served_models, free_ports):
    made = []

    def start(routing=DEFAULT, **kw) -> Service:
        made.append(Service(tmp_path, served_models, free_ports, routing, **kw))
        return made[-1]

    yield start
    for s in made:
        s.close()


@pytest.mark.parametrize("which, flag", [("port", "--port"), ("metrics_port", "--metrics-port")])
def test_a_busy_port_fails_at_once_naming_it(service, free_ports, which, flag):
    with socket_listening(free_ports[which]):
        s = service()
        t0 = time.monotonic()
        rc = s.proc.wait(30)
    assert rc == 2 and time.monotonic() - t0 < 10
    time.sleep(0.2)  # the reader thread drains the pipe
    assert f"port {free_ports[which]} on 127.0.0.1 is in use" in s.output
    assert flag in s.output and "Traceback" not in s.output


class socket_listening:
    """Another program holding a port, as uvicorn or nginx would (SO_REUSEADDR)."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def test_sigint_during_start_up_stops_it(service):
    s = service(sigint_ignored=True)
    s.wait_for("starting Ray and Serve")
    time.sleep(3)  # inside ray.init / serve.start
    rc = s.stop(signal.SIGINT)
    assert rc == 128 + signal.SIGINT, s.output
    assert "SIGINT: stopping" in s.output and "Traceback" not in s.output


def test_sigint_the_moment_readyz_answers_200_stops_it(service):
    s = service(sigint_ignored=True)
    end = time.monotonic() + 120
    while True:
        assert s.proc.poll() is None and time.monotonic() < end, s.output
        try:
            if httpx.get(f"{s.url}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    rc = s.stop(signal.SIGINT)
    assert rc in (0, 128 + signal.SIGINT), s.output
    assert "Traceback" not in s.output


def test_summary_names_the_unready_revision_and_sigint_under_load_stops_it(service):
    s = service(DRAFT_AND_BROKEN)
    s.wait_for("  metrics: ")
    assert "1 routed revision(s) NOT READY: broken" in s.output
    broken = next(line for line in s.lines if " broken " in line)
    assert "NOT READY" in broken and "sha256 mismatch for model_index.json" in broken
    assert "tiny-draft       ready" in s.output

    done = {"ok": 0}
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=s.url, timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/images", json={"prompt": "a fox", "tier": "draft"})
                    done["ok"] += r.status_code == 200
                except httpx.HTTPError:
                    return  # the service has gone: load over
    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    time.sleep(2)
    assert done["ok"] > 0, s.output
    try:
        rc = s.stop(signal.SIGINT)
    finally:
        stop.set()
        for t in clients:
            t.join(15)
    assert rc == 0, s.output
    assert "SIGINT: stopping" in s.output and "Traceback" not in s.output
