"""An in-test fake of the Kubernetes API server for ConfigMaps, on the wire protocol
the `kubernetes` client speaks (the real kube-apiserver cannot run here).

Faithful where ConfigMapWatch depends on it: one global resourceVersion bumped by
every write; LIST returns the store's resourceVersion (not the item's); WATCH
replays history after resourceVersion, then streams, one JSON event per chunk of a
chunked HTTP/1.1 response, and ends after timeoutSeconds; an expired
resourceVersion gets one ERROR event (Status 410 Expired) and the end of the stream;
errors are Status objects; an unchanged write is a no-op (no new resourceVersion, no
event). Test controls break it on purpose: compact(), drop_watches(),
hang_watches(), bookmark().
"""

from __future__ import annotations

import collections
import copy
import json
import queue
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

PATH = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/configmaps(?:/(?P<name>[^/]+))?$")
PATCH_TYPES = ("application/strategic-merge-patch+json", "application/merge-patch+json")
# The apiserver ends a watch without timeoutSeconds after a random 30-60 min.
DEFAULT_WATCH_S = 1800
_WAKE = object()  # a watcher's queue item that only wakes its handler


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A failure Status object, as the apiserver sends it."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: a null deletes. For a ConfigMap (string maps, no
    lists) a strategic merge patch applies the same way."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def write_kubeconfig(path: str | Path, server: str, *, token: str | None = None,
                     context: str = "fake", current_context: str | None = None) -> Path:
    """A kubeconfig with one cluster, user and context pointing at `server`; JSON,
    which is YAML the client reads. current_context defaults to `context`."""
    user = {"token": token} if token else {}
    cfg = {
        "apiVersion": "v1", "kind": "Config",
        "current-context": current_context or context,
        "clusters": [{"name": f"{context}-cluster", "cluster": {"server": server}}],
        "users": [{"name": f"{context}-user", "user": user}],
        "contexts": [{"name": context, "context": {"cluster": f"{context}-cluster",
                                                   "user": f"{context}-user"}}],
    }
    path = Path(path)
    path.write_text(json.dumps(cfg, indent=1))
    return path


class _Watcher:
    def __init__(self, ns: str, name: str | None, bookmarks: bool, conn: socket.socket) -> None:
        self.ns, self.name, self.bookmarks, self.conn = ns, name, bookmarks, conn
        self.events: queue.Queue = queue.Queue()
        self.hang_until = 0.0
        self.dropped = False

    def matches(self, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        return meta["namespace"] == self.ns and self.name in (None, meta["name"])


class FakeKubeAPI:
    """The fake server: `with FakeKubeAPI(token=...) as api:` or start()/close().
    port=0 picks a free one; give a port to start later on one chosen earlier."""

    def __init__(self, *, token: str | None = None, port: int = 0) -> None:
        self.token = token
        self._port = port
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._history: list[tuple[int, str, dict[str, Any]]] = []
        self._rv = 100  # the store's resourceVersion; real ones are etcd revisions
        self._compacted = 0  # a watch from a resourceVersion below this gets 410
        self._watchers: set[_Watcher] = set()
        self._conns: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self.requests: list[tuple[str, str]] = []
        self.content_types: list[str] = []  # of each PATCH

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> Self:
        server = ThreadingHTTPServer(("127.0.0.1", self._port), _Handler)
        server.block_on_close = False  # close() cuts open watches instead of joining them
        server.api = self  # type: ignore[attr-defined]
        self._server = server
        self._port = server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="fake-kube-api", daemon=True).start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self.drop_watches()  # ends hung streams too, which wait on no socket
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _cut(conn)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def write_kubeconfig(self, path: str | Path, *, token: str | None = None,
                         context: str = "fake", current_context: str | None = None) -> Path:
        """write_kubeconfig for this server; token defaults to the one it expects."""
        return write_kubeconfig(path, self.url, token=token or self.token, context=context,
                                current_context=current_context)

    # --- test controls ----------------------------------------------------------

    def set(self, ns: str, name: str, data: dict[str, str],
            labels: dict[str, str] | None = None) -> str:
        """Create or replace the ConfigMap's data (and labels, when given): ADDED or
        MODIFIED; an unchanged object is a no-op. Returns its resourceVersion."""
        with self._lock:
            old = self._objects.get((ns, name))
            if old is None:
                obj = {"apiVersion": "v1", "kind": "ConfigMap",
                       "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()),
                                    "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                       time.gmtime())}}
            else:
                obj = copy.deepcopy(old)
            obj["data"] = dict(data)
            if labels is not None:
                obj["metadata"]["labels"] = dict(labels)
            return self._write("ADDED" if old is None else "MODIFIED", old, obj)

    def delete(self, ns: str, name: str) -> str:
        """Delete the ConfigMap (KeyError if absent): DELETED at a new resourceVersion."""
        with self._lock:
            old = self._objects[(ns, name)]
            return self._write("DELETED", old, copy.deepcopy(old))

    def get(self, ns: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return copy.deepcopy(self._objects.get((ns, name)))

    def compact(self) -> None:
        """Forget the history: a watch from any resourceVersion older than now gets 410."""
        with self._lock:
            self._history.clear()
            self._compacted = self._rv

    def drop_watches(self) -> None:
        """Close every open watch connection abruptly, mid-stream (no final chunk)."""
        with self._lock:
            watchers = list(self._watchers)
        for w in watchers:
            w.dropped = True
            _cut(w.conn)
            w.events.put(_WAKE)

    def hang_watches(self, seconds: float) -> None:
        """Open watches send nothing (no events, no bookmarks, no end) for `seconds`."""
        with self._lock:
            for w in self._watchers:
                w.hang_until = time.monotonic() + seconds

    def bookmark(self) -> None:
        """Send a BOOKMARK at the store's resourceVersion to watches that allow them."""
        with self._lock:
            # The apiserver's bookmark object: kind, apiVersion and resourceVersion only.
            obj = {"kind": "ConfigMap", "apiVersion": "v1",
                   "metadata": {"resourceVersion": str(self._rv)}}
            for w in self._watchers:
                if w.bookmarks:
                    w.events.put(("BOOKMARK", obj))

    def watch_count(self) -> int:
        with self._lock:
            return len(self._watchers)

    # --- the store, for the handler ----------------------------------------------

    # Commit a change; the caller holds self._lock.
    def _write(self, kind: str, old: dict[str, Any] | None, obj: dict[str, Any]) -> str:
        if kind != "DELETED" and not obj.get("data"):
            obj.pop("data", None)  # the apiserver omits an empty data map
        if old is not None and kind != "DELETED" and obj == old:
            return old["metadata"]["resourceVersion"]
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if kind == "DELETED":
            del self._objects[key]
        else:
            self._objects[key] = obj
        self._history.append((self._rv, kind, copy.deepcopy(obj)))
        for w in self._watchers:
            if w.matches(obj):
                w.events.put((kind, copy.deepcopy(obj)))
        return str(self._rv)

    def _list(self, ns: str, name: str | None) -> dict[str, Any]:
        with self._lock:
            items = [_item(o) for (n, k), o in sorted(self._objects.items())
                     if n == ns and name in (None, k)]
            return {"kind": "ConfigMapList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _open_watch(self, ns: str, name: str | None, rv: str | None, bookmarks: bool,
                    conn: socket.socket) -> tuple[_Watcher | None, list, str | None]:
        # (watcher, events to replay, None), or (None, [], why) for an expired rv.
        w = _Watcher(ns, name, bookmarks, conn)
        with self._lock:
            if rv in (None, "", "0"):  # "any": synthetic ADDED for what exists now
                backlog = [("ADDED", copy.deepcopy(o)) for o in self._objects.values()
                           if w.matches(o)]
            elif int(rv) < self._compacted:
                return None, [], f"too old resource version: {rv} ({self._compacted})"
            else:
                backlog = [(kind, copy.deepcopy(o)) for r, kind, o in self._history
                           if r > int(rv) and w.matches(o)]
            self._watchers.add(w)
            return w, backlog, None

    def _close_watch(self, w: _Watcher) -> None:
        with self._lock:
            self._watchers.discard(w)

    def _patch(self, ns: str, name: str, patch: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(patch, dict):
            return 400, status(400, "BadRequest", "patch body must be a JSON object")
        data = patch.get("data")
        if data is not None and (not isinstance(data, dict) or not all(
                isinstance(v, str | None) for v in data.values())):
            return 400, status(400, "BadRequest", "ConfigMap.data values must be strings")
        with self._lock:
            old = self._objects.get((ns, name))
            if old is None:
                return 404, status(404, "NotFound", f'configmaps "{name}" not found')
            want = (patch.get("metadata") or {}).get("resourceVersion")
            if want and want != old["metadata"]["resourceVersion"]:
                return 409, status(409, "Conflict", f'Operation cannot be fulfilled on configmaps '
                                   f'"{name}": the object has been modified; please apply your '
                                   f'changes to the latest version and try again')
            new = merge_patch(copy.deepcopy(old), patch)
            # Identity is not the patch's to change.
            new["apiVersion"], new["kind"] = "v1", "ConfigMap"
            new["metadata"] = {**new.get("metadata", {}), **{
                k: old["metadata"][k] for k in ("name", "namespace", "uid", "resourceVersion")}}
            self._write("MODIFIED", old, new)
            return 200, copy.deepcopy(self._objects[(ns, name)])

    def _authorized(self, header: str | None) -> bool:
        return self.token is None or header == f"Bearer {self.token}"


def _item(obj: dict[str, Any]) -> dict[str, Any]:
    # Items of a list carry no kind or apiVersion on the wire.
    return {k: copy.deepcopy(v) for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _cut(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer


# The name of `metadata.name=NAME`; ValueError for any other selector.
def _field_name(selector: str | None) -> str | None:
    if not selector:
        return None
    m = re.fullmatch(r"metadata\.name==?([^,=]+)", selector)
    if m is None:
        raise ValueError(f'unsupported field selector "{selector}"')
    return m[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked streaming needs it, as does keep-alive

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    @property
    def api(self) -> FakeKubeAPI:
        return self.server.api  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.api._lock:
            self.api._conns.add(self.connection)

    def finish(self) -> None:
        with self.api._lock:
            self.api._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # a connection cut by drop_watches or close

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        self.api.requests.append((method, self.path))
        # Read the body first, whatever the answer: the connection is kept alive.
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self.api._authorized(self.headers.get("Authorization")):
            return self._send(401, status(401, "Unauthorized", "Unauthorized"))
        url = urlsplit(self.path)
        m = PATH.match(url.path)
        if m is None:
            return self._send(404, status(404, "NotFound",
                                          "the server could not find the requested resource"))
        ns, name = m["ns"], m["name"]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if method == "PATCH" and name is not None:
            return self._patch(ns, name, body)
        if method != "GET":
            return self._send(405, status(405, "MethodNotAllowed",
                                          f"{method} is not supported by this fake"))
        if name is not None:
            obj = self.api.get(ns, name)
            if obj is None:
                return self._send(404, status(404, "NotFound", f'configmaps "{name}" not found'))
            return self._send(200, obj)
        try:
            selected = _field_name(query.get("fieldSelector"))
        except ValueError as e:
            return self._send(400, status(400, "BadRequest", str(e)))
        if query.get("watch") in ("true", "1"):
            return self._watch(ns, selected, query)
        return self._send(200, self.api._list(ns, selected))

    def _patch(self, ns: str, name: str, body: bytes) -> None:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        self.api.content_types.append(ctype)
        if ctype not in PATCH_TYPES:
            return self._send(415, status(415, "UnsupportedMediaType",
                                          f"the body of the request was in an unknown format - "
                                          f"accepted media types include: {', '.join(PATCH_TYPES)}"))
        try:
            patch = json.loads(body)
        except ValueError as e:
            return self._send(400, status(400, "BadRequest", f"invalid JSON: {e}"))
        self._send(*self.api._patch(ns, name, patch))

    def _send(self, code: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, ns: str, name: str | None, query: dict[str, str]) -> None:
        try:
            timeout = int(query.get("timeoutSeconds", DEFAULT_WATCH_S))
            w, backlog, gone = self.api._open_watch(
                ns, name, query.get("resourceVersion"),
                query.get("allowWatchBookmarks") == "true", self.connection)
        except ValueError as e:
            return self._send(400, status(400, "BadRequest", f"invalid watch parameters: {e}"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if w is None:
                self._event("ERROR", status(410, "Expired", gone))
            else:
                self._stream(w, backlog, time.monotonic() + timeout)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True  # cut by drop_watches, or the client left
        finally:
            if w is not None:
                self.api._close_watch(w)
                if w.dropped:
                    self.close_connection = True

    def _stream(self, w: _Watcher, backlog: list, deadline: float) -> None:
        pending = collections.deque(backlog)
        while not w.dropped:
            now = time.monotonic()
            if now < w.hang_until:
                time.sleep(min(0.05, w.hang_until - now))  # hung: not even the end is sent
            elif pending:
                self._event(*pending.popleft())
            elif now >= deadline:
                return
            else:
                try:
                    item = w.events.get(timeout=min(deadline - now, 0.1))
                except queue.Empty:
                    continue
                if item is not _WAKE:
                    pending.append(item)
        raise ConnectionAbortedError("watch dropped")

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
