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


def diagnosis_figure(d: dict, out_png: Path) -> Path:
    """The four diagnostics of one model: D1 ‖W‖ over tokens, D2 the reads' singular spectrum, D3 coupling and
    memory share per layer, D4 accuracy by distance against the memory-ablated control."""
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), dpi=80)
    (a1, a2), (a3, a4) = axes
    d1, d2, d3, d4 = d["d1"], d["d2"], d["d3"], d["d4"]
    for li, norms in enumerate(d1["norms"]):
        a1.plot(d1["positions"], norms, label=f"layer {li} ({d1['growth'][li]:.2g}×)", linewidth=1)
    for x in range(d1["shard_length"], d1["tokens"], d1["shard_length"]):
        a1.axvline(x, color="grey", linestyle=":", linewidth=0.8)
    a1.set(title="D1 memory state norm (dotted: shard resets)", xlabel="token", ylabel="‖W‖_F, mean over inputs")
    for li, spectrum in enumerate(d2["spectrum"]):
        a2.semilogy(range(1, len(spectrum) + 1), [max(v, 1e-12) for v in spectrum],
                    label=f"layer {li} (rank {d2['read_rank'][li]:.2f}·d)", linewidth=1)
    a2.set(title="D2 memory reads: singular spectrum", xlabel="index", ylabel="σ / σ_max")
    layers = range(len(d3["coupling"]))
    a3.bar([x - 0.2 for x in layers], [min(c, 50) for c in d3["coupling"]], width=0.4, label="gradient ratio (×)")
    a3.axhline(2.5, color="green", linestyle="--", linewidth=0.8)
    a3.axhline(5.0, color="red", linestyle="--", linewidth=0.8)
    a3.set(title="D3 coupling (bars) and memory share (line)", xlabel="layer", ylabel="attention / memory gradient",
           xticks=list(layers))
    a3b = a3.twinx()
    a3b.plot(list(layers), [100 * s for s in d3["memory_share"]], "o-", color="purple", label="memory share (%)")
    a3b.set_ylim(0, 100)
    a3b.set_ylabel("memory's share of the mix (%)")
    rows = d4["by_distance"]
    xs = [r["distance"] for r in rows]
    for key, band, style, label in (("accuracy", "wilson_95", "o-", "memory on"),
                                    ("ablated", "ablated_wilson_95", "s--", "memory read zeroed")):
        ys = [100 * r[key] for r in rows]
        # clamped: at 0 or 100% the Wilson bound and the rate can differ in the last bit
        err = [[max(0.0, 100 * (r[key] - r[band][0])) for r in rows], [max(0.0, 100 * (r[band][1] - r[key])) for r in rows]]
        a4.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=label, linewidth=1)
    a4.axvline(d["window"], color="grey", linestyle=":", linewidth=0.8)
    a4.set(title=f"D4 recall by distance (dotted: window {d['window']})", xlabel="tokens from code to question",
           ylabel="exact answers (%, 95% interval)", ylim=(-2, 102))
    for ax in (a1, a2, a4):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a3.legend(fontsize=7, loc="upper left")
    a3b.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{d['name']}: {d['verdict']} (state health {d['health']:.2f})")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
