"""Graceful drain under load: SIGTERM to a real `imagegen serve` process (what the
kubelet sends a pod's main process) while clients keep generating. Serve stops the
ingress replica; every request it holds finishes, every new one is answered 503
`draining` with Retry-After (its connection closed), /readyz turns 503, and the
process exits well within the grace. The service is its own (service_proc), not
the session `stack`, which stopping would break."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from service_proc import STOP_WITHIN_S, Service

pytestmark = pytest.mark.serve

ROUTING = {"tiers": {"draft": {"model": "tiny-draft"}}}
CLIENTS = 4  # concurrent generators, each on its own kept-alive connection
GRACE_S = 20  # request_timeout_s, and so the drain's grace (serve/app.py)


@dataclass
class Sent:
    at: float  # time.monotonic() when the request left
    status: int | None = None
    code: str | None = None
    retry_after: str | None = None
    connection: str | None = None
    error: str | None = None  # a transport error's type: the request had no answer


def _client(s: Service, headers: dict[str, str], log: list[Sent], done: threading.Event):
    """Generate until the service says it is draining or stops listening (a client
    behind a load balancer would retry elsewhere then)."""
    with httpx.Client(base_url=s.url, timeout=GRACE_S, headers=headers) as c:
        while not done.is_set():
            sent = Sent(time.monotonic())
            log.append(sent)
            try:
                r = c.post("/v1/images", json={"prompt": "a fox", "tier": "draft"})
            except httpx.TransportError as e:
                sent.error = type(e).__name__
                return
            sent.status, sent.connection = r.status_code, r.headers.get("connection")
            if r.status_code != 200:
                sent.code = r.json()["error"]["code"]
                sent.retry_after = r.headers.get("retry-after")
                return


def _probe(s: Service, seen: list[tuple[int, bool]], done: threading.Event) -> None:
    while not done.is_set():
        try:
            r = httpx.get(f"{s.url}/readyz", timeout=5)
            seen.append((r.status_code, r.json().get("draining")))
        except httpx.TransportError:
            return
        time.sleep(0.05)


@pytest.fixture
def service(tmp_path, served_models, free_ports):
    # Slow enough that requests are in flight when the stop begins and several
    # queue behind one another in the ingress's coalescing.
    s = Service(tmp_path, served_models, free_ports, ROUTING, settings={
        "engine_options": {"seconds_per_image": 0.3}, "request_timeout_s": GRACE_S})
    yield s
    s.close()


def test_sigterm_under_load_finishes_in_flight_and_refuses_new(service):
    s = service
    s.wait_for("  metrics: ")
    headers = s.headers
    log: list[Sent] = []
    ready: list[tuple[int, bool]] = []
    done = threading.Event()
    threads = [threading.Thread(target=_client, args=(s, headers, log, done))
               for _ in range(CLIENTS)]
    threads.append(threading.Thread(target=_probe, args=(s, ready, done)))
    for t in threads:
        t.start()
    try:
        end = time.monotonic() + 30
        while sum(x.status == 200 for x in log) < 2 * CLIENTS:
            assert time.monotonic() < end and all(t.is_alive() for t in threads[:-1]), \
                (log, s.output)
            time.sleep(0.1)
        sigterm = time.monotonic()
        rc = s.stop(signal.SIGTERM)  # asserts it exits, leaving nothing, within 10 s
        took = time.monotonic() - sigterm
    finally:
        done.set()
        for t in threads:
            t.join(GRACE_S)
    assert rc == 0 and "Traceback" not in s.output, s.output
    assert took < min(GRACE_S, STOP_WITHIN_S)

    before = [x for x in log if x.at < sigterm]
    failed = [x for x in before if x.status != 200]
    assert not failed, f"in-flight requests failed: {failed}\n{s.output}"
    after = [x for x in log if x.at >= sigterm]
    refused = [x for x in after if x.status == 503]
    assert refused, f"no new request was refused: {after}\n{s.output}"
    for x in refused:
        assert (x.code, x.retry_after, x.connection) == ("draining", "1", "close"), x
    # Anything else sent after the signal was served (admitted before the replica
    # stopped), or refused at connect once the listener had closed: never cut off.
    other = [x for x in after if x.status not in (200, 503)]
    assert all(x.error == "ConnectError" for x in other), other
    assert (200, False) in ready and (503, True) in ready, ready
