"""The planner's figure: cost against p95 wait for every set, and one set's day as a timeline.

Imported only when ``--plot`` is given, so the planner runs without matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a file, never a window

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from lib.planner.model import TIMELINE_PHASES, Result  # noqa: E402

# The most points a timeline is drawn with; longer ones are resampled on a grid.
MAX_POINTS = 1200

_PHASE_COLOURS = {
    "provisioning": "#f2a541",
    "loading": "#f5d76e",
    "ready": "#4c9f70",
    "stopping": "#c0392b",
    "cold": "#7f8c8d",
}


def plot_results(
    path: Path,
    results: Sequence[Result],
    front: Sequence[int],
    shown: int,
    timeline: Result,
    source: str,
) -> None:
    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 1.6), hspace=0.35, wspace=0.25)
    ax_front = fig.add_subplot(grid[:, 0])
    ax_workers = fig.add_subplot(grid[0, 1])
    ax_queue = fig.add_subplot(grid[1, 1], sharex=ax_workers)

    costs = [r.cost for r in results]
    p95s = [r.wait_stats()["p95"] for r in results]
    ax_front.scatter(costs, p95s, s=18, color="#95a5a6", label="parameter sets", zorder=2)
    fx = [costs[i] for i in front]
    fy = [p95s[i] for i in front]
    ax_front.step(fx, fy, where="post", color="#2c3e50", lw=1.5, label="Pareto front", zorder=3)
    ax_front.scatter(fx, fy, s=26, color="#2c3e50", zorder=4)
    ax_front.scatter([costs[shown]], [p95s[shown]], s=120, facecolors="none", edgecolors="#c0392b", lw=2, zorder=5)
    ax_front.annotate(f"set {shown + 1}", (costs[shown], p95s[shown]), textcoords="offset points", xytext=(8, 8))
    ax_front.set_xlabel("cost")
    ax_front.set_ylabel("p95 wait for a worker (s)")
    ax_front.set_title("cost against p95 wait")
    ax_front.grid(alpha=0.3)
    ax_front.legend(loc="upper right", fontsize=8)

    times, queue, phases = _resampled(timeline.timeline or [])
    hours = [t / 3600.0 for t in times]
    bottom = [0.0] * len(times)
    for phase, counts in zip(TIMELINE_PHASES, phases, strict=False):
        if not any(counts):
            continue
        top = [b + c for b, c in zip(bottom, counts, strict=False)]
        ax_workers.fill_between(hours, bottom, top, step="post", color=_PHASE_COLOURS[phase.value], label=phase.value)
        bottom = top
    # Head room above the busiest moment for the legend.
    ax_workers.set_ylim(0, max(max(bottom, default=0), 1) * 1.3)
    ax_workers.set_ylabel("workers")
    ax_workers.set_title(f"set {shown + 1}: workers by phase")
    ax_workers.legend(loc="upper left", fontsize=8, ncol=5)
    ax_workers.grid(alpha=0.3)
    ax_queue.step(hours, queue, where="post", color="#2980b9", lw=1)
    ax_queue.set_ylabel("jobs waiting")
    ax_queue.set_xlabel("hours from the trace's start")
    ax_queue.set_title("queue depth")
    ax_queue.grid(alpha=0.3)
    fig.suptitle(source, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _resampled(rows: Sequence[tuple]) -> tuple[list[float], list[int], list[list[int]]]:
    """Times, queue depths and per-phase counts, on a grid of MAX_POINTS cells when longer.

    Each cell shows its deepest queue, and the workers of its busiest moment
    (a real moment, so the phases still add up to a fleet that existed).
    """
    if not rows:
        return [0.0], [0], [[0] for _ in TIMELINE_PHASES]
    if len(rows) > MAX_POINTS:
        start, end = rows[0][0], rows[-1][0]
        step = (end - start) / MAX_POINTS or 1.0
        queue_peak: dict[int, int] = {}
        busiest: dict[int, tuple] = {}
        for row in rows:
            cell = min(int((row[0] - start) / step), MAX_POINTS - 1)
            queue_peak[cell] = max(queue_peak.get(cell, 0), row[1])
            kept = busiest.get(cell)
            if kept is None or sum(row[2:]) > sum(kept[2:]):
                busiest[cell] = row
        rows = [(start + cell * step, queue_peak[cell], *busiest[cell][2:]) for cell in sorted(busiest)]
    times = [row[0] for row in rows]
    queue = [row[1] for row in rows]
    phases = [[row[2 + k] for row in rows] for k in range(len(TIMELINE_PHASES))]
    return times, queue, phases
