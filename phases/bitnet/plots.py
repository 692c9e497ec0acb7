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
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100, gridspec_kw={"width_ratios": [2, 1]})
    names = [*sparsity, *fp16_layers]
    short = [n.removeprefix("model.").replace("layers.", "L") for n in names]
    values = [sparsity[n] if n in sparsity else 0.0 for n in names]
    colors = ["tab:blue" if n in sparsity else "lightgray" for n in names]
    ax1.bar(range(len(names)), values, color=colors)
    for i, n in enumerate(names):
        if n not in sparsity:
            ax1.text(i, 0.01, "FP16", rotation=90, ha="center", va="bottom", fontsize=7)
    ax1.axhline(sparsity_target, color="red", linestyle="--", label=f"target {sparsity_target:.0%}")
    ax1.set_xticks(range(len(names)), short, rotation=70, fontsize=7)
    ax1.set_ylabel("fraction of zero weights")
    ax1.set_ylim(0, 1)
    ax1.set_title("Ternary sparsity per layer")
    ax1.legend(fontsize=8)

    metrics = ["accuracy", "token_accuracy"]
    width = 0.8 / max(1, len(stages))
    for j, (label, vals) in enumerate(stages.items()):
        xs = [i + j * width for i in range(len(metrics))]
        heights = [vals.get(m) or 0.0 for m in metrics]
        bars = ax2.bar(xs, heights, width, label=label)
        for b, h in zip(bars, heights, strict=True):
            ax2.text(b.get_x() + b.get_width() / 2, h, f"{h:.3f}", ha="center", va="bottom", fontsize=7)
    ax2.set_xticks([i + width * (len(stages) - 1) / 2 for i in range(len(metrics))],
                   ["task accuracy", "next-token accuracy"])
    ax2.set_ylim(0, 1)
    ax2.set_title("Held-out accuracy before / after")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
