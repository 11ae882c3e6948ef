"""One ConfigMap through the Kubernetes API, with the official `kubernetes` client.

The client is imported inside each function: importing this module stays cheap and
works where `kubernetes` is not installed (routing from a file needs none of it).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("imagegen.routing")

SERVICEACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
CONNECT_TIMEOUT_S = 10.0
# read and patch are single small requests: bounded, so a hung API server fails
# the call instead of hanging the caller.
REQUEST_TIMEOUT_S = (CONNECT_TIMEOUT_S, 30.0)
PATCH_TYPES = {
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/merge-patch+json",
}
_NOTHING = object()  # ConfigMapWatch has delivered nothing yet


class KubeError(Exception):
    """A Kubernetes API call or client configuration failed; the message is one line."""


def api_client(kubeconfig: str | None = None, context: str | None = None):
    """A kubernetes.client.ApiClient: in-cluster config when running in a pod
    (KUBERNETES_SERVICE_HOST set) and no kubeconfig is given, else the kubeconfig
    (the given path, or $KUBECONFIG / ~/.kube/config) with the given context.
    KubeError when no configuration can be loaded."""
    from kubernetes import client, config

    in_cluster = kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    # Read $KUBECONFIG now: the client's default path is fixed when it is imported.
    path = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        if in_cluster:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        # persist_config=False: the client would otherwise write refreshed tokens back.
        return config.new_client_from_config(config_file=path, context=context,
                                             persist_config=False)
    except Exception as e:  # ConfigException, OSError, bad YAML, a failing exec plugin
        where = "in-cluster" if in_cluster else f"kubeconfig {path}"
        raise KubeError(f"cannot load Kubernetes config ({where}): {_one_line(e)}") from e


def pod_namespace(default: str = "default") -> str:
    """The pod's namespace from /var/run/secrets/kubernetes.io/serviceaccount/namespace,
    else default."""
    try:
        with open(SERVICEACCOUNT_NAMESPACE) as f:
            return f.read().strip() or default
    except OSError:
        return default


def read_configmap(api, namespace: str, name: str) -> tuple[dict[str, str], str]:
    """(data, resourceVersion) of the ConfigMap; KubeError (one line, "not found" for
    a 404) on any failure."""
    from kubernetes import client

    try:
        obj = client.CoreV1Api(api).read_namespaced_config_map(
            name, namespace, _request_timeout=REQUEST_TIMEOUT_S)
    except Exception as e:  # the client raises urllib3, ApiException and ValueError alike
        raise KubeError(_call_failed("read", namespace, name, e)) from e
    return dict(obj.data or {}), obj.metadata.resource_version


def patch_configmap(api, namespace: str, name: str, data: dict[str, str | None], *,
                    merge: str = "strategic", resource_version: str | None = None) -> str:
    """Patch `data` keys into the ConfigMap (a None value deletes the key); merge is
    "strategic" (application/strategic-merge-patch+json) or "json"
    (application/merge-patch+json). With `resource_version`, the API refuses the
    patch (409) when the ConfigMap changed since it was read at that version.
    Returns the new resourceVersion; KubeError on failure, ValueError for an unknown
    merge."""
    from kubernetes import client

    content_type = PATCH_TYPES.get(merge)
    if content_type is None:
        raise ValueError(f"merge must be one of {sorted(PATCH_TYPES)}, got {merge!r}")
    try:
        obj = client.CoreV1Api(api).patch_namespaced_config_map(
            name, namespace, {"data": data, **({"metadata": {"resourceVersion": resource_version}}
                                               if resource_version else {})},
            _content_type=content_type,
            _request_timeout=REQUEST_TIMEOUT_S)
    except Exception as e:
        raise KubeError(_call_failed("patch", namespace, name, e)) from e
    return obj.metadata.resource_version


class ConfigMapWatch:
    """Follows one ConfigMap by name: LIST (fieldSelector metadata.name=NAME) to get the
    current object and resourceVersion, then WATCH from that resourceVersion
    (allowWatchBookmarks=true, a server-side timeoutSeconds so idle watches are renewed),
    resuming from the last seen resourceVersion after a normal end; on 410 Gone (an ERROR
    event with a Status code 410, or an ApiException 410) relist; on any error or a
    dropped/hung connection reconnect with exponential backoff and full jitter
    (backoff_s=(min, max), see backoff_delay). Runs in one daemon thread.

    on_change(data, resource_version) runs on that thread after the first list and
    whenever the data differs from what it last delivered; data is None while the
    ConfigMap does not exist. on_error(message) gets one line per failure; the watch
    retries until stop(). read_timeout_s bounds each wait for bytes, so a hung
    connection is noticed; it must exceed watch_timeout_s, or a healthy but idle
    watch would time out before the server ends it."""

    def __init__(self, api, namespace: str, name: str, *,
                 on_change: Callable[[dict[str, str] | None, str], None],
                 on_error: Callable[[str], None],
                 on_ok: Callable[[], None] | None = None,
                 backoff_s: tuple[float, float] = (0.5, 30.0),
                 watch_timeout_s: int = 60,
                 read_timeout_s: float = 90.0) -> None:
        lo, hi = backoff_s
        if not 0 < lo <= hi:
            raise ValueError(f"backoff_s must be (min, max) with 0 < min <= max, got {backoff_s}")
        if not isinstance(watch_timeout_s, int) or watch_timeout_s < 1:
            raise ValueError(f"watch_timeout_s must be a whole number >= 1, got {watch_timeout_s!r}")
        if not read_timeout_s > watch_timeout_s:
            raise ValueError(f"read_timeout_s ({read_timeout_s}) must exceed "
                             f"watch_timeout_s ({watch_timeout_s})")
        self.namespace, self.name = namespace, name
        self._api = api
        self._on_change, self._on_error = on_change, on_error
        self._on_ok = on_ok  # the API answered (a list, an event, a bookmark): errors are over
        self._backoff = (lo, hi)
        self._watch_timeout_s = watch_timeout_s
        self._timeouts = (min(CONNECT_TIMEOUT_S, read_timeout_s), read_timeout_s)
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # guards _stream, which stop() cuts from another thread
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._rv: str | None = None  # None: list before watching
        self._delivered: Any = _NOTHING
        self._progressed = False

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"watch of configmap {self.namespace}/{self.name} already started")
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"configmap-watch:{self.namespace}/{self.name}")
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; returns within about a second (the thread is a daemon)."""
        self._stopped.set()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        deadline = time.monotonic() + 1.0
        while thread.is_alive() and time.monotonic() < deadline:
            with self._lock:
                stream = self._stream
            # Watch.stop() shuts the socket down so a blocked read returns at once, but
            # only once the response has arrived (before that Watch.stream() resets its
            # stop flag as it starts): so cut again until the thread has gone.
            if stream is not None:
                stream.stop()
            thread.join(timeout=0.05)

    # --- the loop -----------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            self._progressed = False
            outcome = self._attempt()
            if self._progressed or outcome is None:
                failures = 0
            if outcome is None or self._stopped.is_set():
                continue
            failures += 1
            # A 410 is routine (history compacted past our resourceVersion): relist at
            # once, but back off if it repeats, so a confused server is not hammered.
            if outcome == "gone" and failures == 1:
                continue
            if outcome not in ("gone", "early"):
                self._on_error(outcome)
            self._stopped.wait(backoff_delay(failures, self._backoff))

    # A list when needed, then one watch. None when the watch ended normally, else
    # "gone", "early" (ended at once with nothing) or the error's one-line message.
    def _attempt(self) -> str | None:
        started = time.monotonic()
        action = "list" if self._rv is None else "watch"
        try:
            if self._rv is None:
                self._list()
                action = "watch"
            self._follow()
        except Exception as e:  # noqa: BLE001 - urllib3, ApiException, a bad event: reconnect
            if self._stopped.is_set():
                return None
            if getattr(e, "status", None) == 410:
                self._rv = None
                return "gone"
            return f"{action} failed: {_describe(e)}"
        # A proxy or server that ends watches at once would make this loop spin.
        if not self._progressed and time.monotonic() - started < self._watch_timeout_s / 2:
            return "early"
        return None

    def _list(self) -> None:
        from kubernetes import client

        result = client.CoreV1Api(self._api).list_namespaced_config_map(
            self.namespace, field_selector=f"metadata.name={self.name}",
            _request_timeout=self._timeouts)
        items = [i for i in result.items or [] if i.metadata.name == self.name]
        self._rv = result.metadata.resource_version
        self._deliver(dict(items[0].data or {}) if items else None)
        self._ok()

    def _follow(self) -> None:
        from kubernetes import client, watch

        stream = watch.Watch()
        with self._lock:
            if self._stopped.is_set():
                return
            self._stream = stream
        # timeout_seconds also makes Watch.stream send exactly one request and raise
        # ApiException(410) on an expired resourceVersion instead of retrying on its own
        # (kubernetes/watch/watch.py, Watch.stream: disable_retries).
        events = stream.stream(
            client.CoreV1Api(self._api).list_namespaced_config_map, self.namespace,
            field_selector=f"metadata.name={self.name}", resource_version=self._rv,
            allow_watch_bookmarks=True, timeout_seconds=self._watch_timeout_s,
            _request_timeout=self._timeouts)
        try:
            for event in events:
                if self._stopped.is_set():
                    return
                if event is not None:  # Watch.stream yields None for a blank or non-JSON line
                    self._handle(event["type"], event["raw_object"])
        finally:
            events.close()  # closes the response even when we leave early
            with self._lock:
                self._stream = None

    def _handle(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        self._rv = meta.get("resourceVersion") or self._rv
        self._progressed = True
        self._ok()
        if kind == "BOOKMARK" or meta.get("name") != self.name:
            return
        self._deliver(None if kind == "DELETED" else dict(obj.get("data") or {}))

    def _ok(self) -> None:
        if self._on_ok is not None:
            self._on_ok()

    def _deliver(self, data: dict[str, str] | None) -> None:
        if data == self._delivered:
            return
        self._delivered = None if data is None else dict(data)  # the callback may mutate its copy
        try:
            self._on_change(data, self._rv)
        except Exception:
            # A bug in the consumer must not end the watch; it is logged with its traceback.
            log.exception("on_change of configmap %s/%s failed", self.namespace, self.name)


def backoff_delay(failures: int, backoff_s: tuple[float, float],
                  uniform: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait after the n-th consecutive failure: exponential backoff with full
    jitter, uniform(0, min(max, min * 2**(n-1)))."""
    lo, hi = backoff_s
    return uniform(0.0, min(hi, lo * 2 ** min(failures - 1, 32)))


def _call_failed(verb: str, namespace: str, name: str, e: Exception) -> str:
    if getattr(e, "status", None) == 404:
        return f"configmap {namespace}/{name} not found (404)"
    return f"cannot {verb} configmap {namespace}/{name}: {_describe(e)}"


# One line for a failure of the client: the HTTP status and the Status message the
# API server sent, or the transport's reason.
def _describe(e: Exception) -> str:
    status = getattr(e, "status", None)
    if isinstance(status, int) and status > 0:  # an ApiException (0: raised client-side)
        return _one_line(f"{status} {e.reason}" + _status_message(getattr(e, "body", None)))
    reason = getattr(e, "reason", None)  # urllib3's MaxRetryError wraps the real cause
    if isinstance(reason, Exception):
        e = reason
    return _one_line(f"{type(e).__name__}: {e}")


def _status_message(body: Any) -> str:
    import json

    try:
        message = json.loads(body).get("message")
    except (TypeError, ValueError, AttributeError):
        return ""
    return f": {message}" if message else ""


def _one_line(text: Any) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= 500 else line[:497] + "..."
