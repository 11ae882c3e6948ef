"""Failover end to end: a real `imagegen serve` (fake engine, 30 ms a batch) that
follows its routing ConfigMap through the Kubernetes API (an in-test fake of the
API server, tests/fakes/kube_api.py), under steady load from 4 loopback clients,
bounded in time. Flip the switch with `imagegen fallback enable --kube` ->
requests move to the fallback within 2 s; kill a primary replica; make every
primary replica fail; patch in an invalid document. Zero failed requests."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Self

import httpx
import psutil
import pytest
import yaml
from kube_api import FakeKubeAPI
from service_proc import Service

pytestmark = pytest.mark.serve

ROUTING = {
    "version": 1,
    "tiers": {"draft": {"model": "tiny-draft", "fallbacks": ["tiny-spare"]},
              "final": {"model": "tiny-final", "fallbacks": ["tiny-spare"]}},
    "breaker": {"consecutive_failures": 3, "open_s": 2, "half_open_probes": 2,
                "timeout_s": 10},
}


@dataclass
class Load:
    """Closed-loop draft requests from `clients` threads; every answer kept."""

    url: str
    headers: dict[str, str]
    clients: int = 4
    # (sent at, status, model, fallback, error code, seconds)
    results: list[tuple[float, int, str, bool, str, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Self:
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as c:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    r = c.post("/v1/images", json={"prompt": "a fox", "tier": "draft"})
                    body = r.json()
                    self.results.append((t, r.status_code, body.get("model", ""),
                                         body.get("fallback", False),
                                         body.get("error", {}).get("code", ""),
                                         time.monotonic() - t))
                except httpx.HTTPError as e:
                    self.results.append((t, 0, "", False, type(e).__name__, 0.0))

    def latency_ms(self, since: float, until: float) -> str:
        """p50/p95 of the requests sent in [since, until), for the printed figures."""
        lat = sorted(r[5] for r in self.results if since <= r[0] < until)
        if not lat:
            return "-"
        return f"p50 {lat[len(lat) // 2] * 1e3:.0f} / p95 {lat[int(len(lat) * 0.95)] * 1e3:.0f} ms"

    def failed(self) -> list:
        return [r for r in self.results if r[1] != 200]

    def served_by(self, since: float, until: float = float("inf")) -> set[str]:
        """Revisions that served requests sent in [since, until)."""
        return {r[2] for r in list(self.results) if since <= r[0] < until and r[1] == 200}


NS, CM = "imagegen", "imagegen-routing"


@pytest.fixture(scope="module")
def kube():
    with FakeKubeAPI(token="t0ken") as api:
        api.set(NS, CM, {"routing.yaml": yaml.safe_dump(ROUTING)})
        yield api


@pytest.fixture(scope="module")
def svc(tmp_path_factory, served_models, new_ports, kube):
    tmp = tmp_path_factory.mktemp("failover")
    config = kube.write_kubeconfig(tmp / "kubeconfig")
    s = Service(tmp, served_models, new_ports(), ROUTING, settings={
        "routing_configmap": CM, "routing_namespace": NS, "kubeconfig": str(config),
        "engine_options": {"seconds_per_batch": 0.03}, "allow_pinning": True})
    s.wait_for("  metrics: ")
    _wait(lambda: _routing(s)["origin"].startswith("configmap"), 10, "the ConfigMap applied")
    yield s
    s.stop()


def _routing(svc) -> dict:
    return httpx.get(f"{svc.url}/v1/routing", timeout=5).json()


def _wait(cond, deadline_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < deadline_s, f"{what} not within {deadline_s} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_the_switch_moves_the_tier_within_2s_and_back_with_no_failed_request(svc):
    with Load(svc.url, svc.headers) as load:
        time.sleep(1)
        asked = time.monotonic()
        flip = svc.cli("fallback", "enable", "draft", "--kube", "--url", svc.url)
        flipped = time.monotonic()
        assert flip.returncode == 0, flip.stderr
        assert f"configmap {NS}/{CM}" in flip.stdout and "now served by tiny-spare" in flip.stdout
        took = _wait(lambda: load.served_by(time.monotonic() - 0.2) == {"tiny-spare"}, 5,
                     "all drafts on tiny-spare")
        time.sleep(max(0.0, flipped + 3 - time.monotonic()))
        asked_back = time.monotonic()  # the CLI patches before it returns
        back = svc.cli("fallback", "disable", "draft", "--kube")
        unflipped = time.monotonic()
        assert back.returncode == 0, back.stderr
        took_back = _wait(lambda: load.served_by(time.monotonic() - 0.2) == {"tiny-draft"}, 5,
                          "drafts back on tiny-draft")
        time.sleep(max(0.0, unflipped + 3 - time.monotonic()))
    assert took < 2 and took_back < 2
    assert load.served_by(flipped + 2, asked_back) == {"tiny-spare"}
    assert load.served_by(unflipped + 2) == {"tiny-draft"}
    assert all(r[3] == (r[2] == "tiny-spare") for r in load.results if r[1] == 200)
    assert not load.failed(), load.failed()[:5]
    assert len(load.results) > 50
    print(f"\nswitch: on the fallback {took:.2f} s after the CLI returned, back "
          f"{took_back:.2f} s after; {len(load.results)} requests, 0 failed; latency before "
          f"{load.latency_ms(0, asked)}, during the flip {load.latency_ms(asked, flipped + 2)},"
          f" on the fallback {load.latency_ms(flipped + 2, asked_back)}")


def _replicas(svc, model: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(svc.proc.pid).children(recursive=True):
        try:
            if f"ServeReplica:imagegen:{model}-" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_killing_a_primary_replica_fails_no_request(svc):
    victims = _replicas(svc, "tiny-draft")
    assert len(victims) == 2  # the policy's two draft replicas
    with Load(svc.url, svc.headers) as load:
        time.sleep(1)
        killed = time.monotonic()
        os.kill(victims[0].pid, signal.SIGKILL)
        time.sleep(4)
    assert not load.failed(), load.failed()[:5]
    assert "tiny-draft" in load.served_by(0)
    print(f"\nreplica kill: {len(load.results)} requests, 0 failed; latency before "
          f"{load.latency_ms(0, killed)}, the 2 s after {load.latency_ms(killed, killed + 2)}")


def test_a_failing_primary_opens_its_breaker_and_recovery_closes_it(svc, served_models):
    _, models = served_models
    from serve.lockfile import load_lock

    fault = load_lock(served_models[0]).models["tiny-draft"].local_dir(models) / "FAULT"
    _wait(lambda: len(_replicas(svc, "tiny-draft")) == 2, 30, "two draft replicas")
    _wait(lambda: _routing(svc)["revisions"]["tiny-draft"]["ready"], 30, "tiny-draft ready")
    with Load(svc.url, svc.headers) as load:
        time.sleep(1)
        fault.write_text("injected by the test\n")
        broke = time.monotonic()
        try:
            opened = _wait(lambda: _routing(svc)["revisions"]["tiny-draft"]["breaker"] == "open",
                           5, "breaker open")
            time.sleep(1)
        finally:
            fault.unlink()
        healed = time.monotonic()
        closed = _wait(lambda: _routing(svc)["revisions"]["tiny-draft"]["breaker"] == "closed"
                       and load.served_by(time.monotonic() - 0.2) == {"tiny-draft"}, 20,
                       "breaker closed, drafts back on tiny-draft")
    assert not load.failed(), load.failed()[:5]
    assert "tiny-spare" in load.served_by(broke)
    print(f"\nfault: breaker open in {opened:.2f} s, closed {closed:.2f} s after the fault "
          f"cleared; {len(load.results)} requests, 0 failed")
    assert healed - broke < 10


def test_an_invalid_document_keeps_the_last_good_one(svc, kube):
    before = _routing(svc)["version"]
    kube.set(NS, CM, {"routing.yaml": "tiers: {draft: {model: nope}}\n"})
    _wait(lambda: _routing(svc)["error"] is not None, 5, "the refusal")
    live = _routing(svc)
    assert live["version"] == before and "nope" in live["error"]
    assert httpx.post(f"{svc.url}/v1/images", json={"prompt": "x"}, timeout=10,
                      headers=svc.headers).status_code == 200
    ready = httpx.get(f"{svc.url}/readyz", timeout=5)
    assert ready.status_code == 200 and "nope" in ready.json()["routing"]["error"]
    kube.set(NS, CM, {"routing.yaml": yaml.safe_dump(ROUTING | {"version": before + 1})})
    _wait(lambda: _routing(svc)["error"] is None and _routing(svc)["version"] == before + 1, 5,
          "the good document")


def test_grpc_health_is_serving_beside_a_200_readyz(svc):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(svc.grpc_target) as ch:
        got = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert httpx.get(f"{svc.url}/readyz", timeout=5).status_code == 200
    assert got.status == health_pb2.HealthCheckResponse.SERVING


def test_a_pinned_revision_serves_on_every_transport_with_no_fallback(svc, served_models):
    """Pinning tiny-draft while its every call fails: no fallback serves it (an
    unpinned request moves to the spare)."""
    import grpc
    import openai
    from grpc_key import keyed_channel

    from serve.ingress.proto import images_pb2 as pb
    from serve.ingress.proto import images_pb2_grpc as pb_grpc

    oa = openai.OpenAI(base_url=f"{svc.url}/v1", api_key=svc.key, max_retries=0)
    with keyed_channel(svc.grpc_target, svc.key) as ch:
        stub = pb_grpc.ImagesStub(ch)
        g = stub.Generate(pb.GenerateRequest(prompt="x", model="tiny-spare"), timeout=30)
        h = httpx.post(f"{svc.url}/v1/images", json={"prompt": "x", "model": "tiny-spare"},
                       timeout=30, headers=svc.headers).json()
        o = oa.images.generate(prompt="x", model="tiny-spare").model_extra["imagegen"]
        assert (g.model, g.pinned, h["model"], h["pinned"], o["model"], o["pinned"]) == (
            "tiny-spare", True, "tiny-spare", True, "tiny-spare", True)
        from serve.lockfile import load_lock

        lock, models = served_models
        fault = load_lock(lock).models["tiny-draft"].local_dir(models) / "FAULT"
        fault.write_text("pinned test")
        try:
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(pb.GenerateRequest(prompt="x", model="tiny-draft"), timeout=30)
            assert info.value.code() == grpc.StatusCode.INTERNAL  # generation_failed
            r = stub.Generate(pb.GenerateRequest(prompt="x"), timeout=30)
            assert (r.model, r.fallback, r.pinned) == ("tiny-spare", True, False)
        finally:
            fault.unlink()
