"""A real `imagegen serve` process for tests/serve (imported by the test modules:
tests/serve is on sys.path while pytest collects it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import yaml

from serve.config import ROOT

STOP_WITHIN_S = 10


class Service:
    """One real `imagegen serve` process; its output collected line by line."""

    def __init__(self, tmp_path, served_models, ports, routing, *, sigint_ignored=False,
                 settings: dict | None = None):
        if os.environ.get("LOOPBACK_NS") != "1":
            pytest.skip("Serve tests run inside scripts/loopback (Ray binds wildcard sockets)")
        lock, models = served_models
        self.routing_file = tmp_path / "routing.yaml"
        self.routing_file.write_text(yaml.safe_dump(routing))
        self.config = config = tmp_path / "imagegen.yaml"
        config.write_text(yaml.safe_dump({
            "lock_file": str(lock), "model_dir": str(models), "engine": "fake",
            "routing_file": str(self.routing_file),
            "state_url": f"sqlite://{tmp_path / 'state.db'}",
            "storage_url": f"file://{tmp_path / 'images'}",
            # the session stack runs the real classifier; these test the CLI service
            "image_classifier": "none", **(settings or {}),
        }))
        self.url = f"http://127.0.0.1:{ports['port']}"
        self.grpc_target = f"127.0.0.1:{ports['grpc_port']}"
        self.lines: list[str] = []
        self.started = time.time()
        # sigint_ignored: as a background job of a non-interactive shell starts it
        # (`imagegen serve &` in a script), the case that lost Ctrl-C.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "--config", str(config), "serve",
             "--port", str(ports["port"]), "--metrics-port", str(ports["metrics_port"]),
             "--grpc-port", str(ports["grpc_port"])],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
            if sigint_ignored else None,
        )
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def key(self) -> str:
        """The development API key the service made and printed on its first run."""
        self.wait_for("Authorization: Bearer ")
        line = next(x for x in self.lines if "Authorization: Bearer " in x)
        return line.split("Bearer ", 1)[1].strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`imagegen --config <this service's settings> ARGS`, as an operator runs it."""
        return subprocess.run([sys.executable, "-m", "serve.cli", "--config", str(self.config),
                               *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              check=False)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, deadline_s: float = 120) -> None:
        end = time.monotonic() + deadline_s
        while text not in self.output:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output}"
            assert time.monotonic() < end, f"no {text!r} within {deadline_s} s:\n{self.output}"
            time.sleep(0.1)

    def stop(self, sig=signal.SIGINT, keep: frozenset[int] = frozenset()) -> int:
        """Send `sig`; its exit code. Asserts it exits within STOP_WITHIN_S, leaving
        nothing running (but `keep`: processes the test itself started since, which
        look like orphans where the test process is the namespace's init)."""
        tree = psutil.Process(self.proc.pid).children(recursive=True)
        assert tree, "the service started no process"
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"still running {STOP_WITHIN_S} s after {sig.name}:\n{self.output}")
        suspects = [p for p in tree + _orphans_since(self.started) if p.pid not in keep]
        left = _alive(suspects, STOP_WITHIN_S - (time.monotonic() - t0))
        assert not left, f"left running {STOP_WITHIN_S} s after {sig.name}: {[p.info for p in left]}"
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _alive(procs: list[psutil.Process], within_s: float) -> list[psutil.Process]:
    """Those of `procs` still running after `within_s` (a zombie has exited: the
    namespace's init reaps it when it can)."""
    deadline = time.monotonic() + max(0.0, within_s)
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.info = {"pid": p.pid, "cmd": " ".join(p.cmdline())[:120]}
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _orphans_since(t0: float) -> list[psutil.Process]:
    """Processes handed to the namespace's init since t0 (what a dying service leaves)."""
    out = []
    for p in psutil.process_iter(["ppid", "create_time"]):
        if p.info["ppid"] == 1 and p.info["create_time"] >= t0 - 1 and p.pid != os.getpid():
            out.append(p)
    return out


