"""serve/routing/kube.py, the real `kubernetes` client against an in-test fake of the
API server (kube_api.py) on a loopback port: list + watch, resume, 410 relist,
reconnects, bookmarks, deletes, auth, read and patch.

Every wait has a deadline of a few seconds; watches that must end on their own use
timeoutSeconds=1.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from kube_api import FakeKubeAPI, write_kubeconfig

from serve.routing import kube
from serve.routing.kube import (
    ConfigMapWatch,
    KubeError,
    api_client,
    backoff_delay,
    patch_configmap,
    pod_namespace,
    read_configmap,
)

NS = "imagegen"
CM = "routing"
V1 = {"routing.yaml": "version: 1\n"}
V2 = {"routing.yaml": "version: 2\n"}
V3 = {"routing.yaml": "version: 3\n"}
FAST = {"backoff_s": (0.05, 0.2)}
DEADLINE_S = 4.0


def eventually(check: Callable[[], Any], timeout: float = DEADLINE_S) -> Any:
    """check()'s first truthy value within timeout; fails the test otherwise."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"not within {timeout} s: {check}")
        time.sleep(0.02)


class Recorder:
    """on_change and on_error for a ConfigMapWatch, with timestamps, waitable."""

    def __init__(self) -> None:
        self.changes: list[tuple[dict[str, str] | None, str]] = []
        self.errors: list[str] = []
        self.change_times: list[float] = []
        self.error_times: list[float] = []
        self._cond = threading.Condition()

    def on_change(self, data: dict[str, str] | None, rv: str) -> None:
        with self._cond:
            self.changes.append((data, rv))
            self.change_times.append(time.monotonic())
            self._cond.notify_all()

    def on_error(self, message: str) -> None:
        with self._cond:
            self.errors.append(message)
            self.error_times.append(time.monotonic())
            self._cond.notify_all()

    def wait(self, check: Callable[[Recorder], bool], timeout: float = DEADLINE_S) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: check(self), timeout):
                pytest.fail(f"not within {timeout} s; changes={self.changes} "
                            f"errors={self.errors}")

    def wait_changes(self, n: int, timeout: float = DEADLINE_S) -> None:
        self.wait(lambda r: len(r.changes) >= n, timeout)


def queries(fake: FakeKubeAPI, *, watch: bool) -> list[dict[str, str]]:
    """Query parameters of the collection GETs the fake saw: watches or lists."""
    out = []
    for method, target in list(fake.requests):
        url = urlsplit(target)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if method == "GET" and url.path.endswith("/configmaps") and (q.get("watch") == "true") \
                == watch:
            out.append(q)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake():
    with FakeKubeAPI() as api:
        yield api


@pytest.fixture
def watch(fake, tmp_path):
    """Factory: a started ConfigMapWatch of NS/CM through a kubeconfig for `fake`
    (or `api`), reporting to a new Recorder; stopped at teardown."""
    started: list[ConfigMapWatch] = []

    def make(*, api=None, name: str = CM, **kwargs) -> Recorder:
        if api is None:
            api = api_client(str(fake.write_kubeconfig(tmp_path / "kubeconfig")), context="fake")
        rec = Recorder()
        w = ConfigMapWatch(api, NS, name, on_change=rec.on_change, on_error=rec.on_error,
                           **{**FAST, **kwargs})
        started.append(w)
        w.start()
        return rec

    yield make
    for w in started:
        w.stop()


# --- list, watch, resume -----------------------------------------------------------


def test_initial_list_then_change_within_2s_watching_from_the_list_rv(fake, watch):
    item_rv = fake.set(NS, CM, V1)
    list_rv = fake.set(NS, "unrelated", {"k": "v"})  # the list's RV is newer than the item's
    rec = watch()
    rec.wait_changes(1)
    assert rec.changes == [(V1, list_rv)] and list_rv != item_rv

    first = eventually(lambda: queries(fake, watch=True))[0]
    assert first["resourceVersion"] == list_rv
    assert first["fieldSelector"] == f"metadata.name={CM}"
    assert first["allowWatchBookmarks"] == "true" and first["timeoutSeconds"] == "60"
    assert queries(fake, watch=False)[0]["fieldSelector"] == f"metadata.name={CM}"

    eventually(fake.watch_count)
    t0 = time.monotonic()
    rv = fake.set(NS, CM, V2)
    rec.wait_changes(2, timeout=2.0)
    assert rec.change_times[1] - t0 < 2.0
    assert rec.changes[1] == (V2, rv)
    assert rec.errors == []


def test_normal_end_resumes_from_the_last_seen_rv_without_relisting(fake, watch):
    fake.set(NS, CM, V1)
    rec = watch(watch_timeout_s=1, read_timeout_s=3.0)
    rec.wait_changes(1)
    eventually(fake.watch_count)
    rv = fake.set(NS, CM, V2)
    rec.wait_changes(2)
    resumed = eventually(lambda: [q for q in queries(fake, watch=True)
                                  if q["resourceVersion"] == rv])
    assert resumed[0]["timeoutSeconds"] == "1"
    assert len(queries(fake, watch=False)) == 1
    assert rec.errors == [] and rec.changes == [(V1, rec.changes[0][1]), (V2, rv)]


def test_bookmark_advances_rv_without_on_change(fake, watch):
    fake.set(NS, CM, V1)
    rec = watch(watch_timeout_s=2, read_timeout_s=4.0)
    rec.wait_changes(1)
    # A write the field selector hides moves the store on; only a bookmark tells us.
    hidden_rv = fake.set(NS, "unrelated", {"k": "v"})
    eventually(fake.watch_count)
    fake.bookmark()
    eventually(lambda: [q for q in queries(fake, watch=True)
                        if q["resourceVersion"] == hidden_rv], timeout=DEADLINE_S)
    assert len(rec.changes) == 1 and rec.errors == []


# --- 410 Gone -------------------------------------------------------------------------


def test_gone_relists_and_delivers_the_newest_data(fake, watch):
    fake.set(NS, CM, V1)
    rec = watch()
    rec.wait_changes(1)
    eventually(fake.watch_count)
    fake.hang_watches(30)  # the open watch never shows V2 or V3
    fake.set(NS, CM, V2)
    newest = fake.set(NS, CM, V3)
    fake.compact()
    fake.drop_watches()  # it resumes from V1's RV, which is now too old: 410
    rec.wait_changes(2)
    assert rec.changes[1] == (V3, newest)
    assert [d for d, _ in rec.changes] == [V1, V3]
    assert len(queries(fake, watch=False)) == 2
    assert len(rec.errors) == 1  # the drop; the 410 is routine, not reported


def test_gone_with_unchanged_data_delivers_nothing_twice(fake, watch):
    fake.set(NS, CM, V1)
    rec = watch()
    rec.wait_changes(1)
    eventually(fake.watch_count)
    fake.set(NS, CM, V1, labels={"team": "serving"})  # MODIFIED, same data
    fake.set(NS, "unrelated", {"k": "v"})  # moves the store past our RV
    fake.compact()
    fake.drop_watches()
    eventually(lambda: len(queries(fake, watch=False)) == 2)
    eventually(fake.watch_count)
    rv = fake.set(NS, CM, V2)
    rec.wait_changes(2)
    assert [d for d, _ in rec.changes] == [V1, V2] and rec.changes[1][1] == rv


# --- broken connections -----------------------------------------------------------------


def test_dropped_connection_reconnects_and_reports_one_line(fake, watch):
    fake.set(NS, CM, V1)
    rec = watch()
    rec.wait_changes(1)
    eventually(fake.watch_count)
    fake.drop_watches()
    rec.wait(lambda r: r.errors)
    assert "\n" not in rec.errors[0] and rec.errors[0].startswith("watch failed:")
    eventually(lambda: len(queries(fake, watch=True)) == 2)
    eventually(fake.watch_count)
    rv = fake.set(NS, CM, V2)
    rec.wait_changes(2)
    assert rec.changes[1] == (V2, rv)
    assert len(queries(fake, watch=False)) == 1  # resumed, not relisted


def test_hung_watch_is_cut_by_the_read_timeout(fake, watch):
    fake.set(NS, CM, V1)
    rec = watch(watch_timeout_s=1, read_timeout_s=1.5)
    rec.wait_changes(1)
    eventually(fake.watch_count)
    fake.hang_watches(20)
    t0 = time.monotonic()
    rv = fake.set(NS, CM, V2)
    rec.wait_changes(2, timeout=5.0)  # the hang lasts 20 s: only a reconnect delivers
    assert rec.changes[1] == (V2, rv)
    assert 0.5 < rec.change_times[1] - t0 < 5.0
    assert any("timed out" in e.lower() for e in rec.errors), rec.errors


def test_unreachable_at_start_backs_off_then_delivers(tmp_path, monkeypatch):
    # The ceiling of each jittered delay, so the spacing of the errors is known.
    monkeypatch.setattr(kube, "backoff_delay",
                        lambda n, b: backoff_delay(n, b, uniform=lambda lo, hi: hi))
    port = free_port()
    path = write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    rec = Recorder()
    w = ConfigMapWatch(api_client(str(path)), NS, CM, on_change=rec.on_change,
                       on_error=rec.on_error, backoff_s=(0.05, 0.2))
    w.start()
    try:
        rec.wait(lambda r: len(r.errors) >= 4)
        assert all(e.startswith("list failed:") and "\n" not in e for e in rec.errors)
        assert "refused" in rec.errors[0].lower()
        gaps = [b - a for a, b in zip(rec.error_times, rec.error_times[1:], strict=False)]
        assert gaps[0] >= 0.045 and gaps[1] >= 0.095 and gaps[2] >= 0.19, gaps
        assert rec.changes == []
        server = FakeKubeAPI(port=port)
        rv = server.set(NS, CM, V1)
        with server:
            rec.wait_changes(1)
        assert rec.changes == [(V1, rv)]
    finally:
        w.stop()


def test_wrong_token_is_401_and_the_right_one_works(tmp_path, watch):
    with FakeKubeAPI(token="right") as secured:
        secured.set(NS, CM, V1)
        wrong = api_client(str(secured.write_kubeconfig(tmp_path / "w", token="wrong")))
        rec = watch(api=wrong)
        rec.wait(lambda r: r.errors)
        assert "401" in rec.errors[0] and "Unauthorized" in rec.errors[0]
        with pytest.raises(KubeError, match="401"):
            read_configmap(wrong, NS, CM)
        right = api_client(str(secured.write_kubeconfig(tmp_path / "r")))
        ok = watch(api=right)
        ok.wait_changes(1)
        assert ok.changes[0][0] == V1 and ok.errors == [] and rec.changes == []


# --- deletes ------------------------------------------------------------------------


def test_deleted_then_recreated(fake, watch):
    fake.set(NS, CM, V1)
    rec = watch()
    rec.wait_changes(1)
    eventually(fake.watch_count)
    gone_rv = fake.delete(NS, CM)
    rec.wait_changes(2)
    assert rec.changes[1] == (None, gone_rv)
    back_rv = fake.set(NS, CM, V2)
    rec.wait_changes(3)
    assert rec.changes[2] == (V2, back_rv)


def test_absent_at_start_then_created(fake, watch):
    list_rv = fake.set(NS, "unrelated", {"k": "v"})
    rec = watch()
    rec.wait_changes(1)
    assert rec.changes == [(None, list_rv)] and rec.errors == []
    eventually(fake.watch_count)
    rv = fake.set(NS, CM, {})
    rec.wait_changes(2)
    assert rec.changes[1] == ({}, rv)  # no data field on the wire: an empty dict


def test_a_failing_on_change_does_not_end_the_watch(fake, tmp_path):
    fake.set(NS, CM, V1)
    seen: list[dict | None] = []

    def on_change(data, rv):
        seen.append(data)
        if len(seen) == 1:
            raise RuntimeError("consumer bug")

    errors: list[str] = []
    api = api_client(str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
    w = ConfigMapWatch(api, NS, CM, on_change=on_change, on_error=errors.append, **FAST)
    w.start()
    try:
        eventually(fake.watch_count)
        fake.set(NS, CM, V2)
        eventually(lambda: len(seen) == 2)
        # Logged, not an API failure: no on_error, no reconnect, no relist.
        assert seen == [V1, V2] and errors == []
        assert len(queries(fake, watch=False)) == 1 and len(queries(fake, watch=True)) == 1
    finally:
        w.stop()


# --- read and patch --------------------------------------------------------------------


def test_read_and_both_patch_types_reach_get_and_a_running_watch(fake, tmp_path, watch):
    fake.set(NS, CM, {"a": "1"})
    api = api_client(str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
    assert read_configmap(api, NS, CM) == ({"a": "1"}, fake.get(NS, CM)["metadata"]
                                           ["resourceVersion"])
    rec = watch(api=api)
    rec.wait_changes(1)
    eventually(fake.watch_count)

    rv = patch_configmap(api, NS, CM, {"b": "2"})
    assert fake.content_types[-1] == "application/strategic-merge-patch+json"
    assert read_configmap(api, NS, CM) == ({"a": "1", "b": "2"}, rv)
    rec.wait_changes(2)
    assert rec.changes[1] == ({"a": "1", "b": "2"}, rv)

    rv = patch_configmap(api, NS, CM, {"a": None}, merge="json")  # a null deletes
    assert fake.content_types[-1] == "application/merge-patch+json"
    assert read_configmap(api, NS, CM) == ({"b": "2"}, rv)
    rec.wait_changes(3)
    assert rec.changes[2] == ({"b": "2"}, rv)


def test_missing_configmap_and_bad_merge_raise(fake, tmp_path):
    api = api_client(str(fake.write_kubeconfig(tmp_path / "kubeconfig")))
    with pytest.raises(KubeError, match=f"{NS}/nope not found"):
        patch_configmap(api, NS, "nope", {"a": "1"})
    with pytest.raises(KubeError, match=f"{NS}/nope not found"):
        read_configmap(api, NS, "nope")
    with pytest.raises(ValueError, match="merge must be one of"):
        patch_configmap(api, NS, "nope", {"a": "1"}, merge="apply")


def test_fake_rejects_other_patch_content_types(fake):
    fake.set(NS, CM, V1)
    req = urllib.request.Request(f"{fake.url}/api/v1/namespaces/{NS}/configmaps/{CM}",
                                 data=b'[{"op": "remove", "path": "/data"}]', method="PATCH",
                                 headers={"Content-Type": "application/json-patch+json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 415 and json.loads(e.value.read())["reason"] == "UnsupportedMediaType"
    assert fake.get(NS, CM)["data"] == V1


# --- stop ---------------------------------------------------------------------------------


# "listed": stop as the watch request goes out, before Watch.stop() can cut its socket.
@pytest.mark.parametrize("state", ["listed", "watching", "backing-off"])
def test_stop_returns_within_a_second(fake, tmp_path, state):
    fake.set(NS, CM, V1)
    url = f"http://127.0.0.1:{free_port()}" if state == "backing-off" else fake.url
    api = api_client(str(write_kubeconfig(tmp_path / "kubeconfig", url)))
    rec = Recorder()
    w = ConfigMapWatch(api, NS, CM, on_change=rec.on_change, on_error=rec.on_error,
                       backoff_s=(20.0, 30.0))
    w.start()
    if state == "backing-off":
        rec.wait(lambda r: r.errors)
    else:
        rec.wait_changes(1)
    if state == "watching":
        eventually(fake.watch_count)
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 1.0
    name = f"configmap-watch:{NS}/{CM}"
    eventually(lambda: name not in {t.name for t in threading.enumerate()}, timeout=1.0)
    seen = len(fake.requests)
    fake.set(NS, CM, V2)
    time.sleep(0.2)
    assert len(fake.requests) == seen and len(rec.changes) == (state != "backing-off")


# --- pure parts, config ---------------------------------------------------------------------


@pytest.mark.parametrize(("failures", "ceiling"), [
    (1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (500, 30.0),
])
def test_backoff_is_exponential_with_full_jitter(failures, ceiling):
    assert backoff_delay(failures, (0.5, 30.0), uniform=lambda lo, hi: hi) == ceiling
    assert backoff_delay(failures, (0.5, 30.0), uniform=lambda lo, hi: lo) == 0.0
    assert 0.0 <= backoff_delay(failures, (0.5, 30.0)) <= ceiling


@pytest.mark.parametrize("kwargs", [
    {"backoff_s": (0.0, 1.0)}, {"backoff_s": (2.0, 1.0)},
    {"watch_timeout_s": 0}, {"watch_timeout_s": 60, "read_timeout_s": 60.0},
])
def test_bad_watch_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ConfigMapWatch(None, NS, CM, on_change=lambda d, rv: None, on_error=lambda m: None,
                       **kwargs)


def test_api_client_honours_context_kubeconfig_env_and_in_cluster(fake, tmp_path, monkeypatch):
    fake.set(NS, CM, V1)
    path = fake.write_kubeconfig(tmp_path / "kubeconfig", current_context="missing")
    with pytest.raises(KubeError, match="cannot load Kubernetes config"):
        api_client(str(path))
    assert read_configmap(api_client(str(path), context="fake"), NS, CM)[0] == V1

    monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "env")))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert read_configmap(api_client(), NS, CM)[0] == V1

    # In a pod an explicit kubeconfig still wins; without one the pod's service
    # account is used (absent here, so a clear error).
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert read_configmap(api_client(str(path), context="fake"), NS, CM)[0] == V1
    with pytest.raises(KubeError, match="in-cluster"):
        api_client()


def test_pod_namespace(tmp_path, monkeypatch):
    monkeypatch.setattr(kube, "SERVICEACCOUNT_NAMESPACE", str(tmp_path / "absent"))
    assert pod_namespace() == "default" and pod_namespace("x") == "x"
    (tmp_path / "namespace").write_text("imagegen-prod\n")
    monkeypatch.setattr(kube, "SERVICEACCOUNT_NAMESPACE", str(tmp_path / "namespace"))
    assert pod_namespace() == "imagegen-prod"
