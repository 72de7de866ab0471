"""PNG figures for reports: the ablation bars and the convergence curves (needs the `plots` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_ablation", "plot_convergence"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Plots need matplotlib: pip install 'metatransfer[plots]'.") from None
    return plt


def plot_ablation(table: dict[tuple[str, int], dict[str, float]], rows: list[str], path: Path, *, title: str) -> None:
    """Grouped bars: one group per shot, one bar per ablation row, 95% CI as error bars."""
    plt = _pyplot()
    shots = sorted({shot for _, shot in table})
    rows = [row for row in rows if any((row, s) in table for s in shots)]
    fig, axes = plt.subplots(1, len(shots), figsize=(5.5 * len(shots), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, shot in zip(axes[0], shots):
        values = [table.get((row, shot), {}).get("accuracy", np.nan) for row in rows]
        errors = [table.get((row, shot), {}).get("ci95", 0.0) for row in rows]
        bars = ax.bar(range(len(rows)), values, yerr=errors, capsize=4, color=colours[: len(rows)])
        finite = [v for v in values if np.isfinite(v)]
        bottom = max(0.0, min(finite) - 8)
        ax.set_ylim(bottom, min(100.0, max(finite) + 5))
        for bar, value in zip(bars, values):  # inside the bar's foot, clear of the error bars
            ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, bottom), ha="center", va="bottom",
                        xytext=(0, 4), textcoords="offset points", fontsize=9, color="white", fontweight="bold")
        ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize=9)
        ax.set_ylabel("5-way test accuracy (%)")
        ax.set_title(f"{shot}-shot")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, *, title: str) -> None:
    """Validation accuracy against meta-iterations: the mean over seeds with a min-max band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row, (steps, accuracy) in curves.items():
        mean = accuracy.mean(axis=0)
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{row} ({accuracy.shape[0]} seeds)")
        if accuracy.shape[0] > 1:
            ax.fill_between(steps, accuracy.min(axis=0), accuracy.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("meta-iterations (hard ones included)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
