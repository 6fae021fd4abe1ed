"""Judge gain vs training steps, one line per arm, from the base (step 0, gain 0): the offline benchmarks' plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_gain_curves(arms: dict[str, list[dict]], path: Path, *, title: str, xlabel: str = "training steps") -> None:
    """`arms`: label -> rows with `steps`, `gain` and `ci` (95% half-width); dashed lines for labels with "sft"."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, rows in arms.items():
        xs, ys = [0] + [r["steps"] for r in rows], [0.0] + [r["gain"] for r in rows]
        es = [0.0] + [r["ci"] for r in rows]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label, ls="--" if "sft" in label else "-")
    ax.axhline(0, ls=":", c="gray")
    ax.set(xlabel=xlabel, ylabel="judge gain vs base (probe set)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
