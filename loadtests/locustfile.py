"""imagegen under locust: users for HTTP (`POST /v1/images`), the OpenAI route
(`POST /v1/images/generations`) and gRPC (`imagegen.v1.Images/Generate`), one shape
chosen by `--imagegen-profile`, and the SLO verdict as the exit code.

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 \\
        --imagegen-profile smoke --json-file out/stats --csv out/locust --csv-full-history

(`imagegen loadtest` runs this and draws the report; README § Load testing.) User
classes by name pick the transports (default: all three, equal weight). Every
`--imagegen-*` option also reads an environment variable (`--help` names it); the
API key comes from IMAGEGEN_API_KEY, never argv.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import grpc.experimental.gevent as grpc_gevent
from gevent.lock import Semaphore
from locust import FastHttpUser, LoadTestShape, User, events, task
from locust import log as locust_log
from locust.runners import WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file
import mix
import shapes  # (the module only: its classes would be shapes of this file)
import slo

grpc_gevent.init_gevent()  # before any channel: gRPC calls must yield to other users

log = logging.getLogger("imagegen.loadtest")


@events.init_command_line_parser.add_listener
def _options(parser, **_kw) -> None:
    def opt(name, env, **kw):
        parser.add_argument(f"--imagegen-{name}", env_var=env, include_in_web_ui=False, **kw)

    opt("profile", "IMAGEGEN_LOADTEST_PROFILE", default="smoke", choices=list(shapes.PROFILES),
        help="load shape (loadtests/shapes.py)")
    opt("users", "IMAGEGEN_LOADTEST_USERS", type=int, help="users (peak for step, base for "
        "spike); default: the profile's")
    opt("duration", "IMAGEGEN_LOADTEST_DURATION", type=float,
        help="seconds; default: the profile's")
    opt("key", "IMAGEGEN_API_KEY", default="", is_secret=True, help="API key")
    opt("mix", "IMAGEGEN_LOADTEST_MIX", default="draft=4,final=1", help="tier weights")
    opt("template-share", "IMAGEGEN_LOADTEST_TEMPLATE_SHARE", type=float, default=0.5,
        help="share of requests naming a template (GET /v1/templates) instead of a prompt")
    opt("max-n", "IMAGEGEN_LOADTEST_MAX_N", type=int, default=1,
        help="images per request: 1..this, uniformly")
    opt("cache", "IMAGEGEN_LOADTEST_CACHE", action="store_true",
        help=f"repeat {mix.CACHE_SET_SIZE} fixed recipes (cache hits) instead of a fresh "
        "seed per request")
    opt("think", "IMAGEGEN_LOADTEST_THINK", type=float, default=0.1,
        help="mean seconds a user waits between requests (uniform 0..2x)")
    opt("rate", "IMAGEGEN_LOADTEST_RATE", type=float, default=0.0,
        help="requests/s in all, at Poisson times (open loop: each user's next arrival "
        "never waits for its last answer, as with real callers; give enough users); "
        "0: every user thinks --imagegen-think between answers instead")
    opt("timeout", "IMAGEGEN_LOADTEST_TIMEOUT", type=float, default=60.0,
        help="seconds a request may take")
    opt("grpc-target", "IMAGEGEN_LOADTEST_GRPC_TARGET", default="",
        help="HOST:PORT of the gRPC service; default: the --host's name, port 9000")
    opt("slo-p95-draft-ms", "IMAGEGEN_SLO_P95_DRAFT_MS", type=float,
        help="p95 bound for the draft tier")
    opt("slo-p95-final-ms", "IMAGEGEN_SLO_P95_FINAL_MS", type=float,
        help="p95 bound for the final tier")
    opt("max-fail-ratio", "IMAGEGEN_MAX_FAIL_RATIO", type=float, default=0.01,
        help="failed requests over all (429 and 503 are not failures)")
    opt("report", "IMAGEGEN_LOADTEST_REPORT", default="",
        help="write the SLO verdict and per-tier figures here (JSON)")


@events.init.add_listener
def _check_options(environment, **_kw) -> None:
    """Refuse bad options before any user starts: one line, exit 2."""
    o = environment.parsed_options
    if o is None:  # run as a library (locust.debug, tests): nothing parsed
        return
    try:
        mix.parse_weights(o.imagegen_mix)
        shapes.for_profile(o.imagegen_profile, o.imagegen_users, o.imagegen_duration)
        if not 1 <= o.imagegen_max_n <= 8:
            raise ValueError(f"--imagegen-max-n {o.imagegen_max_n}: must be 1..8")
        if o.imagegen_rate < 0:
            raise ValueError(f"--imagegen-rate {o.imagegen_rate}: must be >= 0")
        if not 0 <= o.imagegen_template_share <= 1:
            raise ValueError(f"--imagegen-template-share {o.imagegen_template_share}: 0..1")
        if not o.imagegen_key:
            raise ValueError("no API key: set IMAGEGEN_API_KEY (or --imagegen-key)")
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


class ProfileShape(LoadTestShape):
    """The profile named by --imagegen-profile (loadtests/shapes.py), built once the
    options are parsed (locust makes shapes when it imports this file)."""

    def __init__(self) -> None:
        super().__init__()
        self.profile: shapes.StagedShape | None = None

    def reset_time(self) -> None:
        super().reset_time()
        if self.profile is not None:
            self.profile.reset_time()

    def tick(self):
        if self.profile is None:
            o = self.runner.environment.parsed_options
            self.profile = shapes.for_profile(o.imagegen_profile, o.imagegen_users,
                                              o.imagegen_duration)
            self.profile.start_time = self.start_time  # one clock: the run's
        return self.profile.tick()


# -- what the users send ---------------------------------------------------------------

_shared: dict = {}
_lock = Semaphore()


def _mix(environment) -> mix.Mix:
    """One Mix per process, the style library read once."""
    with _lock:
        if "mix" not in _shared:
            o = environment.parsed_options
            templates = _templates(environment.host, o.imagegen_key)
            _shared["mix"] = mix.Mix(mix.parse_weights(o.imagegen_mix), templates,
                                     o.imagegen_template_share, o.imagegen_max_n,
                                     o.imagegen_cache)
        return _shared["mix"]


def _templates(host: str, key: str) -> list[mix.Template]:
    req = urllib.request.Request(f"{host.rstrip('/')}/v1/templates",
                                 headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            found = mix.servable_templates(json.load(r))
    except (OSError, ValueError) as e:  # the requests will show what is wrong
        log.warning("no templates (GET /v1/templates: %s): raw prompts only", e)
        return []
    log.info("templates: %s", ", ".join(t.ref for t in found) or "none approved")
    return found


def _think(user) -> float:
    o = user.environment.parsed_options
    if not o.imagegen_rate:
        return random.uniform(0, 2 * o.imagegen_think)
    # Each user a Poisson process of rate / users, paced from its own arrival times
    # (not from its answers): together a Poisson stream at the asked-for rate.
    runner = user.environment.runner
    users = max(1, getattr(runner, "target_user_count", 0) or runner.user_count)
    now = time.monotonic()
    user.next_arrival = max(getattr(user, "next_arrival", now), now - 1.0) + random.expovariate(
        o.imagegen_rate / users)
    return max(0.0, user.next_arrival - now)


class _Http(FastHttpUser):
    abstract = True
    wait_time = _think
    route = ""
    transport = ""

    def __init__(self, environment) -> None:
        self.network_timeout = environment.parsed_options.imagegen_timeout  # read by super
        super().__init__(environment)

    def on_start(self) -> None:
        self.headers = {"Authorization": f"Bearer {self.environment.parsed_options.imagegen_key}"}

    def body(self, r: mix.Recipe) -> dict:
        raise NotImplementedError

    def images(self, answer: dict) -> int:
        raise NotImplementedError

    @task
    def generate(self) -> None:
        r = _mix(self.environment).next()
        with self.client.post(self.route, json=self.body(r), headers=self.headers, name=r.tier,
                              catch_response=True) as resp:
            resp.request_meta["request_type"] = self.transport
            status = resp.status_code
            kind = slo.outcome(status)
            if kind == "refused":
                resp.request_meta["name"] = slo.entry_name(r.tier, status)
                resp.success()
            elif kind == "ok" and self._images(resp) >= 1:
                resp.success()
            else:
                resp.failure(_http_failure(resp, kind))

    def _images(self, resp) -> int:
        try:
            return self.images(resp.json())
        except (ValueError, TypeError, AttributeError):
            return 0


def _http_failure(resp, kind: str) -> str:
    if resp.status_code == 0:
        return f"no answer: {type(resp.error).__name__}: {resp.error}"
    if kind == "ok":
        return f"HTTP {resp.status_code} without its images"
    try:
        err = resp.json()["error"]
        code = err.get("code") or err.get("type")
    except (ValueError, KeyError, TypeError, AttributeError):
        code = "no error envelope"
    return f"HTTP {resp.status_code} {code}"  # no ids: failures group by cause


class ImagesHttpUser(_Http):
    """POST /v1/images."""

    route, transport = "/v1/images", "HTTP"

    def body(self, r):
        return mix.http_body(r)

    def images(self, answer):
        return len(answer["images"])


class ImagesOpenAIUser(_Http):
    """POST /v1/images/generations (withheld images are left out of `data`)."""

    route, transport = "/v1/images/generations", "OpenAI"

    def body(self, r):
        return mix.openai_body(r)

    def images(self, answer):
        return len(answer["data"])


class ImagesGrpcUser(User):
    """imagegen.v1.Images/Generate over one channel per user."""

    wait_time = _think

    def on_start(self) -> None:
        from serve.ingress.proto import images_pb2, images_pb2_grpc

        o = self.environment.parsed_options
        target = o.imagegen_grpc_target or f"{urlsplit(self.environment.host).hostname}:9000"
        self.pb = images_pb2
        self.channel = grpc.insecure_channel(target)
        self.stub = images_pb2_grpc.ImagesStub(self.channel)
        self.metadata = (("authorization", f"Bearer {o.imagegen_key}"),)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def generate(self) -> None:
        r = _mix(self.environment).next()
        name, exc, size = r.tier, None, 0
        start, t0 = time.time(), time.perf_counter()
        try:
            answer = self.stub.Generate(
                self.pb.GenerateRequest(**mix.grpc_fields(r)), metadata=self.metadata,
                timeout=self.environment.parsed_options.imagegen_timeout)
            size = answer.ByteSize()
            if not answer.images:
                exc = GrpcFailure("OK without its images")
        except grpc.RpcError as e:
            service_code = dict(e.trailing_metadata() or ()).get("imagegen-code")
            if (status := slo.grpc_refusal(e.code().name, service_code)) is not None:
                name = slo.entry_name(r.tier, status)
            else:
                exc = GrpcFailure(f"gRPC {e.code().name} {service_code or 'no answer'}")
        self.environment.events.request.fire(
            request_type="gRPC", name=name, response_time=(time.perf_counter() - t0) * 1000,
            response_length=size, exception=exc, context={}, start_time=start)


class GrpcFailure(Exception):
    pass


# -- the verdict -----------------------------------------------------------------------

def slo_of(options) -> slo.Slo:
    bounds = {"draft": options.imagegen_slo_p95_draft_ms,
              "final": options.imagegen_slo_p95_final_ms}
    return slo.Slo({t: b for t, b in bounds.items() if b is not None},
                   options.imagegen_max_fail_ratio)


@events.quitting.add_listener
def _assert_slos(environment, **_kw) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return  # the master judges the whole run
    o = environment.parsed_options
    report = slo.evaluate(environment.stats, slo_of(o), len(environment.runner.exceptions))
    for line in slo.describe(report):
        (log.info if "MISSED" not in line else log.error)(line)
    # 2 as locust would give it: an error in locust's own greenlets or event handlers
    # (this file's included) makes the run unreliable, whatever the figures say
    environment.process_exit_code = 2 if locust_log.unhandled_greenlet_exception else (
        0 if report.ok else 1)
    if o.imagegen_report:
        doc = {"profile": o.imagegen_profile, "host": environment.host, **report.to_dict()}
        Path(o.imagegen_report).write_text(json.dumps(doc, indent=2) + "\n")
