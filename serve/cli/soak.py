"""What a soak must show (`imagegen loadtest --watch`): every process of a local stack
sampled while locust runs — resident memory, open files, sockets — and Ray's object
count from the metrics endpoint; then, against the sample taken once the warm-up
(the first minute) is over, nothing may have grown past its bound by the end."""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass, field

RSS_GROWTH = 0.05  # at most 5% after the warm-up, per process
FD_SLACK = 2  # files and sockets a process may open past the warm-up's count
OBJECT_SLACK = 16  # Ray objects in flight at any moment under load
SERVING = ("ServeReplica", "ProxyActor", "ServeController", "raylet", "gcs_server")


@dataclass
class Sample:
    t: float  # seconds since the watch started
    rss: dict[int, int] = field(default_factory=dict)  # pid -> bytes
    files: dict[int, int] = field(default_factory=dict)  # pid -> open regular files
    sockets: dict[int, int] = field(default_factory=dict)  # pid -> open sockets
    objects: float | None = None  # Ray objects in the object store(s)


def stack_root() -> int | None:
    """The process that started the local Ray stack (`imagegen serve`, a test): the
    parent of this user's raylet, when exactly one runs."""
    import psutil

    parents = {p.ppid() for p in psutil.process_iter(["name"]) if p.info["name"] == "raylet"}
    return parents.pop() if len(parents) == 1 else None


class Watch(threading.Thread):
    """Samples the root's process tree every `interval_s` until stopped."""

    def __init__(self, root: int, metrics_url: str | None, interval_s: float = 5.0) -> None:
        super().__init__(name="imagegen-soak-watch", daemon=True)
        self.root, self.metrics_url, self.interval_s = root, metrics_url, interval_s
        self.samples: list[Sample] = []
        self.names: dict[int, str] = {}
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append(self.sample())
            self._done.wait(self.interval_s)

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=30)
        self.samples.append(self.sample())

    def sample(self) -> Sample:
        import psutil

        s = Sample(time.monotonic() - self._t0)
        me = psutil.Process()
        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
            mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
        except psutil.NoSuchProcess:
            return s
        if self.root not in mine:  # the stack is not ours: leave out the watch and its locust
            procs = [p for p in procs if p.pid not in mine]
        for p in procs:
            try:
                with p.oneshot():
                    s.rss[p.pid] = p.memory_info().rss
                    s.files[p.pid] = len(p.open_files())
                    s.sockets[p.pid] = len(p.net_connections(kind="all"))
                    self.names.setdefault(p.pid, _name(p))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        s.objects = _objects(self.metrics_url)
        return s


def _name(p) -> str:
    cmd = p.cmdline()
    for part in cmd:  # Ray names its workers by their actor: ray::ServeReplica:app:name
        if part.startswith("ray::"):
            return part.split(".")[0]  # not the method it happened to be running
    return " ".join(cmd[:3])[:80] or p.name()


def _objects(url: str | None) -> float | None:
    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(("ray_object_store_num_local_objects", "object_store_num_local_objects")):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def verdict(samples: list[Sample], names: dict[int, str], warmup_s: float) -> dict:
    """Growth from the first sample past the warm-up to the last, per process alive at
    both; `ok` when none grew past its bound. Processes that came or went are listed:
    a replica restarted under load is a finding of its own."""
    later = [s for s in samples if s.t >= warmup_s]
    if len(later) < 2:
        late = f"no samples after the {warmup_s:g} s warm-up: run longer than it"
        return {"ok": False, "problems": [late], "processes": []}
    first, last = later[0], later[-1]
    rows, problems = [], []
    for pid in sorted(set(first.rss) & set(last.rss)):
        row = {"pid": pid, "name": names.get(pid, "?"),
               "rss_mb": [round(first.rss[pid] / 2**20, 1), round(last.rss[pid] / 2**20, 1)],
               "rss_growth": last.rss[pid] / first.rss[pid] - 1 if first.rss[pid] else 0.0,
               "files": [first.files[pid], last.files[pid]],
               "sockets": [first.sockets[pid], last.sockets[pid]]}
        rows.append(row)
        if row["rss_growth"] > RSS_GROWTH:
            problems.append(f"{row['name']} (pid {pid}): RSS {row['rss_mb'][0]} -> "
                            f"{row['rss_mb'][1]} MB (+{row['rss_growth']:.1%} > "
                            f"{RSS_GROWTH:.0%})")
        for what in ("files", "sockets"):
            a, b = row[what]
            if b > a + FD_SLACK:
                problems.append(f"{row['name']} (pid {pid}): {what} {a} -> {b}")
    gone = sorted(set(first.rss) - set(last.rss))
    new = sorted(set(last.rss) - set(first.rss))
    # Ray reaps idle workers and helper processes by itself; a serving process that
    # ended (a replica, the raylet, the GCS, a proxy) is a restart under load.
    died = [p for p in gone if any(k in names.get(p, "") for k in SERVING)]
    if died:
        problems.append("serving processes ended during the soak: " + ", ".join(
            f"{names.get(p, '?')} ({p})" for p in died))
    objects = [first.objects, last.objects]
    if None not in objects and objects[1] > objects[0] + OBJECT_SLACK:
        problems.append(f"Ray objects {objects[0]:g} -> {objects[1]:g}")
    return {"ok": not problems, "problems": problems, "warmup_s": warmup_s,
            "window_s": [first.t, last.t], "objects": objects,
            "new_processes": [{"pid": p, "name": names.get(p, "?")} for p in new],
            "ended_processes": [{"pid": p, "name": names.get(p, "?")} for p in gone],
            "processes": rows}


def plot(samples: list[Sample], names: dict[int, str], warmup_s: float, path) -> bool:
    """RSS per process over time (the big ones), the warm-up shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    peak = {pid: max(s.rss.get(pid, 0) for s in samples) for s in samples for pid in s.rss}
    top = sorted(peak, key=peak.get, reverse=True)[:8]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for pid in top:
        pts = [(s.t, s.rss[pid] / 2**20) for s in samples if pid in s.rss]
        ax.plot(*zip(*pts, strict=True), label=f"{names.get(pid, pid)}"[:48])
    ax.axvspan(0, warmup_s, color="0.9", label="warm-up")
    ax.set(xlabel="seconds", ylabel="RSS MB", title="Process memory during the soak")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
