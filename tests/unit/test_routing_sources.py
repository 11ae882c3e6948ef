"""Routing sources feeding LiveRouting: a watched file (an editor's atomic replace,
and a mounted ConfigMap updated the way the kubelet does it), and the Kubernetes
API watch of one ConfigMap against the in-test API server (tests/fakes)."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
import yaml
from kube_api import FakeKubeAPI

from serve.routing import LiveRouting, parse_routing
from serve.routing.sources import ConfigMapSource, watch_file

DOC = {"version": 1, "tiers": {"draft": {"model": "tiny-draft"}, "final": {"model": "tiny-final"}}}


def doc(version: int, **draft) -> str:
    d = {"version": version, "tiers": {**DOC["tiers"], "draft": {"model": "tiny-draft", **draft}}}
    return yaml.safe_dump(d)


@pytest.fixture
def live(lock):
    return LiveRouting(parse_routing(DOC, lock), lock, "file test")


async def _until(cond, deadline_s: float) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < deadline_s, "not within the deadline"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def _replace(path, text: str) -> None:
    tmp = path.with_name(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _kubelet_swap(volume, n: int, text: str) -> None:
    """What the kubelet's atomic writer does: a new timestamped directory, a
    `..data_tmp` symlink to it renamed over `..data`, the old directory removed."""
    new = volume / f"..2026_12_01_10_00_0{n}.000"
    new.mkdir()
    (new / "routing.yaml").write_text(text)
    old = os.readlink(volume / "..data") if (volume / "..data").exists() else None
    os.symlink(new.name, volume / "..data_tmp")
    os.replace(volume / "..data_tmp", volume / "..data")
    if not (volume / "routing.yaml").exists():
        os.symlink("..data/routing.yaml", volume / "routing.yaml")
    if old:
        for f in (volume / old).iterdir():
            f.unlink()
        (volume / old).rmdir()


def test_a_replaced_file_is_applied_and_a_bad_one_refused(tmp_path, live):
    path = tmp_path / "routing.yaml"
    path.write_text(doc(1))

    async def go():
        task = asyncio.create_task(watch_file(path, live.apply_text, live.unreachable, 0.05))
        try:
            _replace(path, doc(2, fallbacks=[], force_fallback=False))
            await _until(lambda: live.table.version == 2, 2)
            _replace(path, "tiers: {draft: {model: nope}}")
            await _until(lambda: live.error is not None, 2)
            assert live.table.version == 2
            _replace(path, "")
            path.write_bytes(doc(2).encode() + "# caf\u00e9\n".encode("latin-1"))
            await _until(lambda: "cannot read" in (live.source_error or ""), 2)  # not UTF-8
            path.unlink()
            await _until(lambda: "missing" in (live.source_error or ""), 2)
            path.write_text(doc(3))
            await _until(lambda: live.table.version == 3, 2)
        finally:
            task.cancel()

    asyncio.run(go())
    assert live.error is None and live.source_error is None


def test_a_mounted_configmap_is_followed_through_the_kubelets_symlink_swap(tmp_path, live):
    volume = tmp_path / "routing"
    volume.mkdir()
    _kubelet_swap(volume, 1, doc(1))
    path = volume / "routing.yaml"

    async def go():
        task = asyncio.create_task(watch_file(path, live.apply_text, live.unreachable, 0.05))
        try:
            for n in (2, 3):
                _kubelet_swap(volume, n, doc(n, force_fallback=False))
                await _until(lambda n=n: live.table.version == n, 2)
        finally:
            task.cancel()

    asyncio.run(go())
    assert live.origin == f"file {path}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_api_watch_applies_changes_fast_and_survives_the_api_being_down(tmp_path, live):
    port = _free_port()
    api = FakeKubeAPI(token="t", port=port)
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")

    async def go():
        source = ConfigMapSource("ns", "routing", "routing.yaml", live.apply_text,
                                 live.unreachable, asyncio.get_running_loop(), str(kubeconfig),
                                 reachable=live.reachable)
        source.watch.backoff_s = (0.05, 0.2)
        source.start()
        try:
            # Unreachable at start: the file default stays, and says why.
            await _until(lambda: live.source_error is not None, 5)
            assert live.table.version == 1 and "configmap ns/routing" in live.source_error
            api.start()
            api.set("ns", "routing", {"routing.yaml": doc(2)})
            await _until(lambda: live.table.version == 2, 5)
            took = []
            for v in (3, 4, 5):
                t0 = time.monotonic()
                api.set("ns", "routing", {"routing.yaml": doc(v)})
                await _until(lambda v=v: live.table.version == v, 2)
                took.append(time.monotonic() - t0)
            assert max(took) < 2 and live.error is None
            # A dropped watch says so, and stops saying so once the API answers
            # again, though the document has not changed.
            api.drop_watches()
            await _until(lambda: live.source_error is not None, 3)
            await _until(lambda: api.bookmark() or live.source_error is None, 3)  # once rewatched
            assert live.table.version == 5
            api.set("ns", "routing", {"routing.yaml": "version: 6\ntiers: {}\n"})
            await _until(lambda: live.error is not None, 2)
            assert live.table.version == 5  # the last good one
            api.set("ns", "routing", {"other": "x"})
            await _until(lambda: "no such ConfigMap or key" in (live.source_error or ""), 2)
            assert live.table.version == 5
        finally:
            source.stop()
            api.close()

    asyncio.run(go())
