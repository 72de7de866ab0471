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


def plot_ablation(tables: dict[str, dict[tuple[str, int], dict[str, float]]], rows: list[str], path: Path, *, title: str) -> None:
    """Grouped bars: one panel per shot, one group per ablation row, one bar per checkpoint kind
    (`tables`: "best" and optionally "last", as `ablate.summarise` gives them), 95% CI as error bars."""
    plt = _pyplot()
    shots = sorted({shot for table in tables.values() for _, shot in table})
    rows = [row for row in rows if any((row, s) in table for table in tables.values() for s in shots)]
    labels = {"best": "checkpoint picked by validation", "last": "last checkpoint"}
    width = 0.8 / len(tables)
    fig, axes = plt.subplots(1, len(shots), figsize=(6 * len(shots), 4.6), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, shot in zip(axes[0], shots):
        finite = [t[(row, shot)]["accuracy"] for t in tables.values() for row in rows if (row, shot) in t]
        bottom = max(0.0, min(finite) - 8)
        for index, (kind, table) in enumerate(tables.items()):
            values = [table.get((row, shot), {}).get("accuracy", np.nan) for row in rows]
            errors = [table.get((row, shot), {}).get("ci95", 0.0) for row in rows]
            x = np.arange(len(rows)) + (index - (len(tables) - 1) / 2) * width
            bars = ax.bar(x, values, width, yerr=errors, capsize=3, color=colours[index], label=labels.get(kind, kind))
            for bar, value in zip(bars, values):  # inside the bar's foot, clear of the error bars
                if np.isfinite(value):
                    ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, bottom), ha="center", va="bottom",
                                xytext=(0, 4), textcoords="offset points", fontsize=8, color="white", fontweight="bold",
                                rotation=90 if len(tables) > 1 else 0)
        ax.set_ylim(bottom, min(100.0, max(finite) + 5))
        ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize=9)
        ax.set_ylabel("5-way test accuracy (%)")
        ax.set_title(f"{shot}-shot")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    if len(tables) > 1:  # one legend for both panels, below them, clear of the bars
        handles, labels_ = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels_, loc="lower center", ncol=len(tables), fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if len(tables) > 1 else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_convergence(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, *, title: str) -> None:
    """Validation accuracy against meta-iterations: the mean over seeds with a min-max band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row, (steps, accuracy) in curves.items():
        mean = accuracy.mean(axis=0)
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{row} ({accuracy.shape[0]} seed{'s' if accuracy.shape[0] > 1 else ''})")
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
