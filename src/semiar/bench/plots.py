"""Plots for `semiar bench`: speedup by method and task, acceptance by tree depth."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _colors(n: int) -> list:
    """n distinct colours: tab10's up to ten methods, tab20's beyond (tab10 repeats after ten)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_speedup(results: dict, path: Path) -> None:
    summary = results["summary"]
    scopes = list(summary)
    methods = [m for m in results["runs"] if m != "ar"] or ["ar"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(scopes) * max(1, len(methods) / 3)), 4))
    for i, (m, color) in enumerate(zip(methods, _colors(len(methods)))):
        vals = [summary[s].get(m, {}).get("speedup") or 0 for s in scopes]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(scopes))]
        bars = ax.bar(xs, vals, width, label=m, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(scopes)), scopes)
    ax.set_ylabel("speedup vs ar (same run)")
    ax.set_title(f"{results['target']} on {results['machine']['device']}")
    ax.legend(fontsize=8, ncols=min(4, len(methods)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_acceptance(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [(m, row) for m, row in results["summary"]["all"].items() if row.get("accept_by_depth")]
    for (m, row), color in zip(rows, _colors(len(rows))):
        acc = row["accept_by_depth"]
        ax.plot(range(1, len(acc) + 1), acc, marker="o", color=color, label=f"{m} (tau {row.get('tau')})")
    ax.set_xlabel("tree depth")
    ax.set_ylabel("acceptance rate at depth")
    ax.set_ylim(0, 1.05)
    ax.set_title("acceptance by depth (all tasks)")
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
