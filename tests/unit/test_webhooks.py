"""Batch webhooks: Standard Webhooks signatures, the SSRF allowlist, and delivery
with retries against a real HTTP server on 127.0.0.1 (in a thread)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve.batch.webhooks import (
    Webhooks,
    backoff,
    format_secret,
    new_secret,
    parse_secret,
    sign,
    signed_headers,
    verify,
)
from serve.errors import ConfigError, InvalidRequest

SECRET = b"0123456789abcdef0123456789abcdef"


class Receiver(ThreadingHTTPServer):
    """Answers each POST with the next scripted (status, headers); 200 when the script
    runs out. `hang` makes it hold every request until teardown."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: list[tuple[int, dict[str, str]]] = []
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.hang = False
        self.released = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.seen.append((self.command, self.path, dict(self.headers.items()), body))
        if self.server.hang:
            self.server.released.wait(10)
        status, headers = self.server.script.pop(0) if self.server.script else (200, {})
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-length", "0")
        self.end_headers()

    do_POST = do_GET = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.released.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def hooks(receiver: Receiver, delays: list[float] | None = None, **kw) -> Webhooks:
    async def fake_sleep(s: float) -> None:
        delays.append(s)

    kw.setdefault("rng", random.Random(7))
    if delays is not None:
        kw["sleep"] = fake_sleep
    return Webhooks(SECRET, [receiver.base], **kw)


def spec_signature(secret: bytes, headers: dict[str, str], body: bytes) -> str:
    """The spec's scheme, computed independently of the module."""
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body.decode()}"
    return "v1," + base64.b64encode(
        hmac.new(secret, content.encode(), hashlib.sha256).digest()).decode()


# -- signing ------------------------------------------------------------------------


def test_known_answer_from_the_spec():
    # The worked example of the Standard Webhooks / Svix documentation.
    key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
    headers = signed_headers(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert verify(key, headers, body, now=1614265330 + 10)


def test_secret_round_trip():
    assert parse_secret(format_secret(SECRET)) == SECRET
    assert new_secret().startswith("whsec_") and len(parse_secret(new_secret())) == 32
    with pytest.raises(ConfigError):
        parse_secret("whsec_not base64!")


def test_delivery_is_signed_per_spec(receiver):
    assert asyncio.run(hooks(receiver).send(receiver.base + "done", "batch.completed",
                                            {"batch_id": "b1", "images": 3}))
    method, path, headers, body = receiver.seen[0]
    headers = {k.lower(): v for k, v in headers.items()}
    assert (method, path, headers["content-type"]) == ("POST", "/done", "application/json")
    doc = json.loads(body)
    assert doc["type"] == "batch.completed" and doc["data"] == {"batch_id": "b1", "images": 3}
    assert doc["timestamp"].endswith("Z")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert headers["webhook-id"].startswith("msg_")
    assert spec_signature(SECRET, headers, body) in headers["webhook-signature"].split()
    assert verify(SECRET, headers, body)
    assert verify(format_secret(SECRET), headers, body.decode())


def test_official_library_accepts_the_signature(receiver):
    standardwebhooks = pytest.importorskip("standardwebhooks")
    asyncio.run(hooks(receiver).send(receiver.base, "batch.completed", {"x": 1}))
    _, _, headers, body = receiver.seen[0]
    assert standardwebhooks.Webhook(format_secret(SECRET)).verify(body, headers) == json.loads(
        body)


def _signed(body: bytes = b'{"a":1}', stamp: int | None = None) -> dict[str, str]:
    return signed_headers(SECRET, "msg_1", int(time.time()) if stamp is None else stamp, body)


@pytest.mark.parametrize("case", ["wrong_secret", "tampered_body", "stale", "future",
                                  "tampered_id", "missing_signature", "garbage_signature",
                                  "bad_timestamp", "other_version"])
def test_verify_rejects(case):
    body, headers, secret = b'{"a":1}', _signed(), SECRET
    if case == "wrong_secret":
        secret = b"another secret"
    elif case == "tampered_body":
        body = b'{"a":2}'
    elif case == "stale":
        headers = _signed(stamp=int(time.time()) - 301)
    elif case == "future":
        headers = _signed(stamp=int(time.time()) + 301)
    elif case == "tampered_id":
        headers["webhook-id"] = "msg_2"
    elif case == "missing_signature":
        del headers["webhook-signature"]
    elif case == "garbage_signature":
        headers["webhook-signature"] = "v1 ,,, v1,%%% nonsense"
    elif case == "bad_timestamp":
        headers["webhook-timestamp"] = "12e3"
    elif case == "other_version":
        headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    assert verify(secret, headers, body) is False


def test_verify_accepts_any_of_several_signatures_and_any_header_case():
    headers = _signed()
    rotated = {k.title(): v for k, v in headers.items()}
    rotated["Webhook-Signature"] = "v1,b2xka2V5 " + headers["webhook-signature"]
    assert verify(SECRET, rotated, b'{"a":1}')
    assert verify(SECRET, _signed(stamp=int(time.time()) - 200), b'{"a":1}', tolerance_s=300)
    assert not verify(SECRET, _signed(stamp=int(time.time()) - 200), b'{"a":1}', tolerance_s=60)


# -- the allowlist --------------------------------------------------------------------

ALLOW = ["https://hooks.example.com/", "https://api.example.org:8443/v1/hooks",
         "http://10.0.0.1/"]


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/",
    "https://hooks.example.com/batch/done?token=x",
    "https://HOOKS.example.com/a",
    "https://hooks.example.com:443/a",
    "https://api.example.org:8443/v1/hooks",
    "https://api.example.org:8443/v1/hooks/b1",
    "http://10.0.0.1/cb",  # internal, but the allowlist names that exact host
])
def test_check_allows(url):
    Webhooks(SECRET, ALLOW).check(url)


@pytest.mark.parametrize("url", [
    "https://evil.example.com/",  # another host
    "https://hooks.example.com.evil.com/",  # a string prefix would admit this
    "http://hooks.example.com/",  # another scheme
    "ftp://hooks.example.com/",
    "https://hooks.example.com:8443/",  # another port
    "https://user:pw@hooks.example.com/",  # userinfo
    "https://hooks.example.com@evil.com/",
    "https://hooks.example.com\\@evil.com/",
    "https://api.example.org:8443/v1/hooksevil",  # not a whole path segment
    "https://api.example.org:8443/v1/hooks/../../admin",
    "https://api.example.org:8443/v1/hooks/%2e%2e/admin",
    "https://api.example.org:8443/v1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.2/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://127.0.0.1:8080/",
    "not a url",
    "https:///nohost",
    "https://hooks.example.com:99999/",
])
def test_check_refuses(url):
    with pytest.raises(InvalidRequest) as e:
        Webhooks(SECRET, ALLOW).check(url)
    assert e.value.details == [{"field": "webhook_url", "type": "not_allowed"}]


def test_loopback_needs_its_own_allowlist_entry(receiver):
    port = receiver.server_address[1]
    with pytest.raises(InvalidRequest):
        Webhooks(SECRET, ["https://hooks.example.com/"]).check(f"http://127.0.0.1:{port}/")
    with pytest.raises(InvalidRequest):  # another port of the same host
        Webhooks(SECRET, [receiver.base]).check(f"http://127.0.0.1:{port + 1}/")
    Webhooks(SECRET, [receiver.base]).check(f"http://127.0.0.1:{port}/x")


@pytest.mark.parametrize("entry", ["hooks.example.com", "ftp://x/", "https://u@x/", "https://"])
def test_bad_allowlist_entry_is_a_config_error(entry):
    with pytest.raises(ConfigError):
        Webhooks(SECRET, [entry])


def test_send_refuses_without_a_request(receiver):
    port = receiver.server_address[1]
    wh = Webhooks(SECRET, ["https://hooks.example.com/"])
    assert asyncio.run(wh.send(f"http://127.0.0.1:{port}/", "batch.completed", {})) is False
    assert receiver.seen == []


def test_send_refuses_a_name_resolving_to_an_internal_address(receiver):
    port = receiver.server_address[1]
    url = f"http://localhost:{port}/"
    assert asyncio.run(Webhooks(SECRET, [url]).send(url, "e", {})) is False
    assert receiver.seen == []
    assert asyncio.run(Webhooks(SECRET, [url], check_resolved=False).send(url, "e", {}))
    assert len(receiver.seen) == 1


# -- delivery and retries ---------------------------------------------------------------


@pytest.mark.parametrize("attempt,base,cap,bound", [
    (0, 1.0, 300.0, 1.0), (1, 1.0, 300.0, 2.0), (5, 1.0, 300.0, 32.0),
    (9, 1.0, 300.0, 300.0), (3, 0.5, 300.0, 4.0), (10_000, 1.0, 60.0, 60.0),
    (2, 0.0, 300.0, 0.0),
])
def test_backoff_is_full_jitter(attempt, base, cap, bound):
    rng = random.Random(attempt)
    samples = [backoff(attempt, base, cap, rng) for _ in range(200)]
    assert all(0.0 <= d <= bound for d in samples)
    if bound:
        assert max(samples) > bound * 0.8 and min(samples) < bound * 0.2  # the whole range


def test_retries_503_then_delivers(receiver):
    receiver.script = [(503, {}), (503, {})]
    delays: list[float] = []
    wh = hooks(receiver, delays, base_delay_s=0.5, max_delay_s=300)
    assert asyncio.run(wh.send(receiver.base, "batch.completed", {"b": 1})) is True
    assert len(receiver.seen) == 3
    rng = random.Random(7)
    assert delays == [backoff(0, 0.5, 300, rng), backoff(1, 0.5, 300, rng)]
    assert 0 <= delays[0] <= 0.5 and 0 <= delays[1] <= 1.0
    ids = {h["webhook-id"] for _, _, h, _ in receiver.seen}
    assert len(ids) == 1  # one id across retries, so receivers can deduplicate
    assert all(verify(SECRET, h, body) for _, _, h, body in receiver.seen)


@pytest.mark.parametrize("status,retry_after,expected", [
    (429, "3", 3.0), (503, "0.25", 0.25), (503, "100000", 300.0), (500, "3", None),
    (503, "Wed, 21 Oct 2015 07:28:00 GMT", None), (429, "nan", None),
])
def test_retry_after(receiver, status, retry_after, expected):
    receiver.script = [(status, {"Retry-After": retry_after})]
    delays: list[float] = []
    assert asyncio.run(hooks(receiver, delays).send(receiver.base, "e", {}))
    if expected is None:  # ignored: full jitter below base
        assert 0 <= delays[0] <= 1.0 and delays[0] != 3.0
    else:
        assert delays == [expected]


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
def test_client_errors_are_not_retried(receiver, status):
    receiver.script = [(status, {})]
    delays: list[float] = []
    assert asyncio.run(hooks(receiver, delays).send(receiver.base, "e", {})) is False
    assert len(receiver.seen) == 1 and delays == []


def test_gives_up_after_attempts(receiver):
    receiver.script = [(500, {})] * 10
    delays: list[float] = []
    assert asyncio.run(hooks(receiver, delays, attempts=4).send(receiver.base, "e", {})) is False
    assert len(receiver.seen) == 4 and len(delays) == 3


def test_server_down_is_false_not_an_exception():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/"
    delays: list[float] = []

    async def fake_sleep(s: float) -> None:
        delays.append(s)

    wh = Webhooks(SECRET, [url], attempts=5, sleep=fake_sleep)
    assert asyncio.run(wh.send(url, "e", {})) is False
    assert len(delays) == 4


def test_timeout_is_retried(receiver):
    receiver.hang = True
    delays: list[float] = []
    wh = hooks(receiver, delays, attempts=2, timeout_s=0.2)
    start = time.monotonic()
    assert asyncio.run(wh.send(receiver.base, "e", {})) is False
    assert len(receiver.seen) == 2 and len(delays) == 1
    assert time.monotonic() - start < 2


def test_redirects_are_not_followed(receiver):
    receiver.script = [(302, {"Location": receiver.base + "elsewhere"})]
    assert asyncio.run(hooks(receiver, []).send(receiver.base, "e", {})) is False
    assert [p for _, p, _, _ in receiver.seen] == ["/"]


def test_payload_that_is_not_json_is_false(receiver):
    assert asyncio.run(hooks(receiver).send(receiver.base, "e", {"x": object()})) is False
    assert receiver.seen == []


# -- cancellation ---------------------------------------------------------------------


async def _until(predicate, deadline_s: float = 5.0) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


def test_cancel_during_retry_sleep_is_prompt(receiver):
    receiver.script = [(503, {"Retry-After": "60"})]

    async def main() -> float:
        task = asyncio.create_task(hooks(receiver).send(receiver.base, "e", {}))
        await _until(lambda: receiver.seen)
        await asyncio.sleep(0.05)  # into the 60 s sleep
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - start

    assert asyncio.run(main()) < 0.5


def test_wait_for_bounds_a_send_in_flight(receiver):
    receiver.hang = True

    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(hooks(receiver, timeout_s=30).send(receiver.base, "e", {}),
                                   0.2)
        return time.monotonic() - start

    assert asyncio.run(main()) < 0.5
    assert len(receiver.seen) == 1
