"""Where routing documents come from, for an ingress replica to apply live.

* A file, watched by polling what its path resolves to: an editor's atomic
  replace makes a new inode, and the kubelet updates a mounted ConfigMap by
  swapping the volume's `..data` symlink to a new timestamped directory, so the
  same path resolves to another file. A mounted volume changes only when the
  kubelet syncs (typically within a minute).
* One ConfigMap through the Kubernetes API (serve/routing/kube.py: list + watch,
  resume, relist on 410 Gone, reconnect with backoff): applied within about a
  second of the API event, the fast path.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("imagegen.routing")

FILE_POLL_S = 0.5


def _fingerprint(path: Path) -> tuple | None:
    try:
        st = path.stat()  # follows symlinks: a swapped ..data shows as a new inode
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size, os.path.realpath(path)


async def watch_file(path: Path, apply: Callable[[str, str], bool],
                     unreachable: Callable[[str], None], poll_s: float = FILE_POLL_S,
                     what: str = "routing file") -> None:
    """Apply `path` now (it may have changed since the ingress loaded it) and
    whenever what it resolves to changes; runs until cancelled."""
    seen: tuple | None | bool = False
    while True:
        now = _fingerprint(path)
        if now != seen:
            seen = now
            try:
                _read_and_apply(path, now is not None, apply, unreachable, what)
            except Exception:  # the watch must outlive any one bad read
                log.exception("%s %s: cannot apply", what, path)
        await asyncio.sleep(poll_s)


async def watch_dir(directory: Path, reload: Callable[[Path], bool],
                    poll_s: float = FILE_POLL_S) -> None:
    """Call `reload(directory)` now (it may have changed since it was loaded) and
    whenever a `*.yaml` in it changes, appears or goes (a mounted ConfigMap's files
    all move at once); runs until cancelled."""
    seen = None
    while True:
        now = tuple(sorted((str(p), _fingerprint(p)) for p in Path(directory).glob("*.yaml")))
        if now != seen:
            try:
                reload(directory)
            except Exception:  # the watch must outlive any one bad read
                log.exception("directory %s: cannot reload", directory)
        seen = now
        await asyncio.sleep(poll_s)


def _read_and_apply(path: Path, exists: bool, apply, unreachable, what: str) -> None:
    if not exists:
        unreachable(f"{what} {path} is missing; keeping the applied document")
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        unreachable(f"cannot read {what} {path}: {e}")
        return
    apply(text, f"file {path}")


class ConfigMapSource:
    """The Kubernetes API watch of one ConfigMap key, applied on the event loop."""

    def __init__(self, namespace: str | None, name: str, key: str,
                 apply: Callable[[str, str], bool], unreachable: Callable[[str], None],
                 loop: asyncio.AbstractEventLoop, kubeconfig: str | None = None,
                 reachable: Callable[[], None] = lambda: None) -> None:
        from .kube import ConfigMapWatch, api_client, pod_namespace

        self.namespace = namespace or pod_namespace()
        self.name, self.key = name, key
        self._apply, self._unreachable, self._loop = apply, unreachable, loop
        self._reachable = reachable
        self.describe = f"configmap {self.namespace}/{name} key {key}"
        self.watch = ConfigMapWatch(api_client(kubeconfig), self.namespace, name,
                                    on_change=self._changed, on_error=self._failed,
                                    on_ok=lambda: loop.call_soon_threadsafe(self._reachable))

    def start(self) -> None:
        self.watch.start()

    def stop(self) -> None:
        self.watch.stop()

    # Called on the watch thread: hand over to the event loop.
    def _changed(self, data: dict[str, str] | None, resource_version: str) -> None:
        if data is None or self.key not in data:
            msg = (f"{self.describe}: no such ConfigMap or key (resourceVersion "
                   f"{resource_version}); keeping the applied document")
            self._loop.call_soon_threadsafe(self._unreachable, msg)
            return
        origin = f"{self.describe} resourceVersion {resource_version}"
        self._loop.call_soon_threadsafe(self._apply, data[self.key], origin)

    def _failed(self, message: str) -> None:
        log.warning("%s: %s", self.describe, message)
        self._loop.call_soon_threadsafe(self._unreachable, f"{self.describe}: {message}")
