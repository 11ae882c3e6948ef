"""`imagegen serve` without Ray: the port check before start-up and the start-up
summary (tests/serve/test_cli_serve.py runs the real process)."""

from __future__ import annotations

import signal
import socket

import pytest

from serve.cli.serve import _summary
from serve.config import load_settings
from serve.errors import ConfigError
from serve.local import DIRECT_INGRESS_PORTS, check_ports
from serve.local import ports as ports_of

URL = "http://127.0.0.1:8000"
SETTINGS = load_settings(metrics_port=8080, grpc_port=9000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def held():
    """A port another program listens on."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("field, what, flag", [
    ("port", "HTTP", "--port"),
    ("metrics_port", "metrics", "--metrics-port"),
    ("proxy", "Serve proxy", "--port + 8"),
    ("grpc_port", "gRPC", "--grpc-port"),
    ("grpc_proxy", "Serve gRPC proxy", "--grpc-port + 8"),
])
def test_a_busy_port_is_named(held, field, what, flag):
    ports = {"port": _free_port(), "metrics_port": _free_port(), "grpc_port": _free_port()}
    if field == "proxy":
        ports["port"] = held - DIRECT_INGRESS_PORTS
    elif field == "grpc_proxy":
        ports["grpc_port"] = held - DIRECT_INGRESS_PORTS
    else:
        ports[field] = held
    with pytest.raises(ConfigError) as e:
        check_ports(load_settings(**ports))
    assert f"{what} port {held} on 127.0.0.1 is in use" in e.value.message
    assert flag in e.value.message


def test_free_ports_pass_and_a_port_given_twice_does_not():
    port = _free_port()
    check_ports(load_settings(port=port, metrics_port=_free_port(), grpc_port=_free_port(),
                              direct_ingress=False))
    with pytest.raises(ConfigError, match=f"metrics port and the HTTP port are both {port}"):
        check_ports(load_settings(port=port, metrics_port=port, grpc_port=0))


def test_overlapping_direct_ingress_ranges_are_refused():
    with pytest.raises(ConfigError, match="overlap; choose --port and --grpc-port at least 9"):
        check_ports(load_settings(port=8000, grpc_port=8004))
    with pytest.raises(ConfigError, match="gRPC port and the HTTP port are both 8000"):
        check_ports(load_settings(port=8000, grpc_port=8000, direct_ingress=False))


def test_grpc_port_zero_serves_no_grpc():
    settings = load_settings(port=_free_port(), metrics_port=_free_port(), grpc_port=0)
    assert set(ports_of(settings)) == {"HTTP", "metrics", "Serve proxy"}


def _rev(ready: bool, *tiers: str, reason: str | None = None, backs=()) -> dict:
    return {"ready": ready, "reason": reason, "tiers": list(tiers), "backs": list(backs)}


def _body(models: dict, **tiers: bool) -> dict:
    return {"models": models, "tiers": tiers}


def test_summary_all_ready(capsys):
    body = _body({"a": _rev(True, "draft"), "b": _rev(True, backs=["draft"])}, draft=True)
    assert _summary(body, URL, 12.3, SETTINGS)
    out = capsys.readouterr().out
    assert "imagegen ready in 12 s at http://127.0.0.1:8000" in out
    assert "backs draft" in out
    assert "metrics: http://127.0.0.1:8080/metrics" in out
    assert "gRPC: 127.0.0.1:9000 (imagegen.v1.Images" in out


def test_summary_names_each_unready_revision_with_its_reason(capsys):
    models = {"a": _rev(True, "draft"), "b": _rev(False, "final", reason="sha256 mismatch for x"),
              "c": _rev(False, reason="no such file")}
    assert _summary(_body(models, draft=True, final=False), URL, 9, SETTINGS)  # draft serves
    out = capsys.readouterr().out
    assert "1 primary revision(s) NOT READY: b" in out and "imagegen ready" not in out
    line = {name: next(x for x in out.splitlines() if f" {name} " in x) for name in "abc"}
    assert line["a"].endswith(" ready")
    assert "NOT READY: sha256 mismatch for x" in line["b"]
    assert "NOT READY: no such file" in line["c"] and "(no tier)" in line["c"]
    assert "tier final: nothing ready to serve it" in out


def test_a_primary_down_behind_a_ready_fallback_still_serves(capsys):
    models = {"a": _rev(False, "draft", reason="boom"), "spare": _rev(True, backs=["draft"])}
    assert _summary(_body(models, draft=True), URL, 9, SETTINGS)
    assert "NOT READY: a" in capsys.readouterr().out


def test_summary_fails_when_no_tier_can_serve(capsys):
    models = {"a": _rev(False, "draft", reason="boom"), "spare": _rev(True)}
    assert not _summary(_body(models, draft=False), URL, 9, SETTINGS)
    captured = capsys.readouterr()
    assert "error: no tier has a ready revision" in captured.err
    assert "NOT READY: boom" in captured.out and "metrics:" not in captured.out


def test_a_port_taken_while_serve_starts_is_named_not_a_traceback(monkeypatch):
    from serve import local

    port, grpc = _free_port(), _free_port()
    while abs(port - grpc) <= DIRECT_INGRESS_PORTS:
        grpc = _free_port()
    settings = load_settings(port=port, grpc_port=grpc, metrics_port=_free_port(),
                             engine="fake")
    proxy = port + DIRECT_INGRESS_PORTS

    def taken(*_args):
        raise RuntimeError(f"Failed to bind to address '127.0.0.1:{proxy}'.")

    monkeypatch.setattr(local, "check_ports", lambda s: None)
    monkeypatch.setattr(local, "_init_ray", lambda *a: None)
    monkeypatch.setattr(local, "_start_serve", taken)
    stopped = []
    monkeypatch.setattr(local, "stop", lambda: stopped.append(True))  # a session's Ray lives on
    for var in ("MIN_HTTP_PORT", "MAX_HTTP_PORT", "MIN_GRPC_PORT", "MAX_GRPC_PORT"):
        monkeypatch.delenv(f"RAY_SERVE_DIRECT_INGRESS_{var}", raising=False)  # restored after
    with pytest.raises(ConfigError, match=f"Serve proxy port {proxy} was taken by another "
                       "process while the service started; it is --port \\+ 8"):
        local.start(settings)
    assert stopped  # nothing is left running


@pytest.mark.timeout(10)
def test_the_first_signal_is_acted_on_once_whoever_sees_it():
    from serve.cli.serve import Stopped, _Phase, _stop_handler

    phase = _Phase()
    handler = _stop_handler(phase)
    phase.starting = True
    handler(signal.SIGTERM, None)  # Ray starting: held for the watcher
    assert phase.end_start_up() == signal.SIGTERM  # start-up ended first: the main thread's
    assert not phase.claim(starting=True) and not phase.claim(starting=False)

    phase = _Phase()
    handler = _stop_handler(phase)
    # a handler runs between any two bytecodes: here, inside end_start_up's lock
    with phase._lock, pytest.raises(Stopped):
        handler(signal.SIGINT, None)
    assert phase.end_start_up() is None  # claimed already
