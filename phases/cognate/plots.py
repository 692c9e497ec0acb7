"""Loss curves as PNG, from telemetry JSONL (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(telemetry: dict[str, Path], out_png: Path, title: str = "Cognate training") -> Path:
    """Training loss per global step (one line per stage/model) and held-out loss as markers."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, path in telemetry.items():
        rows = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
        steps = [r for r in rows if isinstance(r.get("lm_loss"), (int, float)) and r.get("event") is None]
        if not steps:
            continue
        line, = ax.plot([r.get("global_step", r["step"]) for r in steps], [r["lm_loss"] for r in steps],
                        label=f"{label} train", linewidth=1)
        evals = [r for r in steps if isinstance(r.get("eval_loss"), (int, float))]
        ax.plot([r.get("global_step", r["step"]) for r in evals], [r["eval_loss"] for r in evals], "o",
                color=line.get_color(), markersize=3, label=f"{label} held-out")
        for r in rows:
            if r.get("event") in ("non-finite loss", "eval spike"):
                ax.axvline(r.get("global_step", r["step"]), color="red", alpha=0.3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
