"""PNG charts of the planner's sweeps. matplotlib is imported inside each function
(Agg canvas, no pyplot state), so importing the planner stays fast and needs no
display."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .latency import Performance
from .planner import SloPoint


def plot_latency_vs_load(
    points: Sequence[Performance], slo_s: float, path: str | Path, *, title: str = "",
    planned_rps: float | None = None,
) -> Path:
    """p50 and p95 latency against arrival rate (from planner.sweep_load), with
    the SLO as a horizontal line. Unstable points (infinite latency) are left out."""
    stable = [p for p in points if p.stable]
    fig, ax = _figure()
    rates = [p.arrival_rps for p in stable]
    ax.plot(rates, [p.p50_s for p in stable], marker="o", label="p50")
    ax.plot(rates, [p.p95_s for p in stable], marker="o", label="p95")
    ax.axhline(slo_s, color="red", linestyle="--", label=f"SLO p95 {slo_s:g} s")
    if planned_rps is not None:
        ax.axvline(planned_rps, color="grey", linestyle=":", label="planned load")
    if stable and slo_s > 10 * max(p.p95_s for p in stable):
        ax.set_yscale("log")  # a loose SLO would flatten the curve to the axis
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("latency (s)")
    replicas = {p.replicas for p in points}
    ax.set_title(title or f"latency against load, {', '.join(map(str, sorted(replicas)))} replicas")
    ax.legend()
    return _save(fig, path)


def plot_cost_vs_slo(points: Sequence[SloPoint], path: str | Path, *, title: str = "") -> Path:
    """Cost per hour against the p95 SLO (from planner.sweep_slo); plans that miss
    an SLO or overflow the node cap are marked with crosses."""
    fig, ax = _figure()
    slos = [p.slo_p95_s for p in points]
    ax.step(slos, [p.cost_per_hour for p in points], where="post", marker="o", label="cost")
    short = [p for p in points if p.slo_misses or not p.fits_cap]
    if short:
        ax.scatter([p.slo_p95_s for p in short], [p.cost_per_hour for p in short],
                   marker="x", color="red", s=80, zorder=3, label="misses SLO / over cap")
    if slos and min(slos) > 0 and max(slos) > 10 * min(slos):
        ax.set_xscale("log")
    ax.set_xlabel("p95 SLO (s)")
    ax.set_ylabel("cost per hour")
    ax.set_title(title or "cost against SLO")
    ax.legend()
    return _save(fig, path)


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
