"""`imagegen serve` as a user runs it: a real process in the loopback namespace,
with the fake engine (the real Ray Serve stack, without torch in the replicas).
Busy ports fail at once, naming the port; the first SIGINT or SIGTERM stops it
within 10 s at any moment, leaving no process behind; the start-up summary names
an unready revision (tests/unit/test_serve_startup.py: the summary's cases)."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import psutil
import pytest
from service_proc import Service

pytestmark = pytest.mark.serve

DRAFT_AND_BROKEN = {"tiers": {"draft": {"model": "tiny-draft"}, "broken": {"model": "broken"}}}
DEFAULT = {"tiers": {"draft": {"model": "tiny-draft"}, "final": {"model": "tiny-final"}}}


@pytest.fixture
def service(tmp_path, served_models, free_ports):
    made = []

    def start(routing=DEFAULT, **kw) -> Service:
        made.append(Service(tmp_path, served_models, free_ports, routing, **kw))
        return made[-1]

    yield start
    for s in made:
        s.close()


@pytest.mark.parametrize("which, flag", [("port", "--port"), ("metrics_port", "--metrics-port"),
                                        ("grpc_port", "--grpc-port")])
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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_stops_it(service, sig):
    s = service(sigint_ignored=True)
    s.wait_for("starting Ray and Serve")
    # inside ray.init (which installs its own SIGTERM handler and holds the main
    # thread in C), once it has started processes that must not outlive the service
    end = time.monotonic() + 60
    while not psutil.Process(s.proc.pid).children():
        assert s.proc.poll() is None and time.monotonic() < end, s.output
        time.sleep(0.05)
    time.sleep(0.5)
    rc = s.stop(sig)
    assert rc == 128 + sig, s.output
    assert f"{sig.name}: stopping" in s.output and "Traceback" not in s.output


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
    assert "1 primary revision(s) NOT READY: broken" in s.output
    broken = next(line for line in s.lines if " broken " in line)
    assert "NOT READY" in broken and "sha256 mismatch for model_index.json" in broken
    assert "tiny-draft       ready" in s.output

    done = {"ok": 0}
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=s.url, timeout=10, headers=s.headers) as c:
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
