"""The evolution at a glance: best, mean and worst fitness per generation, and diversity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def fitness_curve(history: list[dict[str, Any]], out: Path, input_best: float | None = None,
                  reseed_below: float | None = None) -> Path:
    gens = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(gens, [h["best"] for h in history], "-o", ms=3, label="best")
    ax.plot(gens, [h["mean"] for h in history], "-", label="mean")
    ax.plot(gens, [h["worst"] for h in history], "-", alpha=0.6, label="worst")
    if input_best is not None:
        ax.axhline(input_best, color="gray", ls=":", label="best input")
    ax.set_xlabel("generation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # generations are whole numbers
    ax.set_ylabel("fitness (validation)")
    ax2 = ax.twinx()
    ax2.plot(gens, [h["diversity"] for h in history], "--", color="tab:purple", label="diversity")
    if reseed_below is not None:
        ax2.axhline(reseed_below, color="tab:purple", ls=":", alpha=0.5)
    ax2.set_ylabel("diversity (prediction disagreement)")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower right", fontsize=8)
    ax.set_title("EvoMerge: fitness per generation")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
