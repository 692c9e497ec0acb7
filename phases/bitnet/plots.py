"""The Phase 4 figure (matplotlib Agg, PNG): per-layer sparsity against the target, and accuracy before/after."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def bitnet_report_png(sparsity: dict[str, float], fp16_layers: list[str], sparsity_target: float,
                      stages: dict[str, dict[str, float]], out_png: Path) -> Path:
    """``sparsity``: ternary layer -> fraction of zeros; ``fp16_layers``: linear layers left in FP16 (drawn empty,
    labelled); ``stages``: e.g. {"FP32 input": {"accuracy": .., "token_accuracy": ..}, "ternary": {...}, ...}."""
    names = [*sparsity, *fp16_layers]
    # 690 px wide, the width the Prefect UI shows a markdown artifact's image at, so nothing is scaled down; one layer
    # per row, named in full at a readable size, however many layers the model has
    rows = len(names)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.9, 2.6 + 0.2 * rows + 2.6), dpi=100,
                                   gridspec_kw={"height_ratios": [max(2.0, 0.2 * rows), 2.6]})
    short = [n.removeprefix("model.").replace("layers.", "L") for n in names]
    values = [sparsity[n] if n in sparsity else 0.0 for n in names]
    colors = ["tab:blue" if n in sparsity else "lightgray" for n in names]
    ax1.barh(range(rows), values, color=colors)
    for i, n in enumerate(names):
        if n not in sparsity:
            ax1.text(0.01, i, "kept in FP16", va="center", fontsize=8)
    ax1.axvline(sparsity_target, color="red", linestyle="--", label=f"target {sparsity_target:.0%}")
    ax1.set_yticks(range(rows), short, fontsize=8)
    ax1.invert_yaxis()  # the first layer on top
    ax1.set_xlabel("fraction of zero weights")
    ax1.set_xlim(0, 1)
    ax1.set_title("Ternary sparsity per layer")
    ax1.legend(fontsize=9, loc="lower right")

    metrics = ["accuracy", "token_accuracy"]
    width = 0.8 / max(1, len(stages))
    for j, (label, vals) in enumerate(stages.items()):
        xs = [i + j * width for i in range(len(metrics))]
        heights = [vals.get(m) or 0.0 for m in metrics]
        bars = ax2.bar(xs, heights, width, label=label)
        for b, h in zip(bars, heights, strict=True):
            ax2.text(b.get_x() + b.get_width() / 2, h, f"{h:.3f}", ha="center", va="bottom", fontsize=9)
    ax2.set_xticks([i + width * (len(stages) - 1) / 2 for i in range(len(metrics))],
                   ["task accuracy", "next-token accuracy"])
    ax2.set_title("Held-out accuracy before / after")
    ax2.set_ylim(0, 1.1)  # room for the value labels above full bars
    ax2.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(stages), frameon=False)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
