"""Cognate training throughput and memory against a transformers Llama of equal size and depth, at the
tiny and the small preset's shapes in one run.

    python bench/cognate.py [--steps 3] [--tiny-batch 8] [--small-batch 1] [--shapes tiny,small] [--grad-steps 1]

Each model trains in its own subprocess on the same seeded batches with AdamW (so the optimizer is not
what is compared), as the Cognate trainer runs it: activation checkpointing on, the memory chunk at the
schedule's floor (the chunk most of a run spends at, and the most memory), glibc returning freed blocks.
Reported per shape: forward FLOPs per token of each (counted, so the ratio Cognate could reach at
Llama's FLOP rate is known), tokens/s over the timed steps (Cognate with its full T_max recursion), peak memory
growth over the process (CUDA: max allocated; CPU: peak RSS minus RSS before the model was built), and
the sizing estimate preflight uses. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's phases, not an installed copy


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(kind: str, preset: str, grad_steps: int | None = None):
    from phases.config import PipelineConfig

    cfg = PipelineConfig.from_preset(preset, **({} if grad_steps is None else {"cognate": {"train": {"grad_steps": grad_steps}}}))
    d, L, H, V = cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.tokenizer.vocab_size
    c = cfg.cognate
    if kind == "cognate":
        from phases.cognate import CognateConfig, CognateForCausalLM

        model = CognateForCausalLM(CognateConfig(
            vocab_size=V, hidden_size=d, num_hidden_layers=L, num_attention_heads=H, window_size=c.window_size,
            act_max_steps=c.act_max_steps, n_persistent=c.n_persistent, shard_length=c.shard_length,
            mem_chunk_size=c.train.chunk_floor, grad_steps=c.train.grad_steps))
        if c.train.activation_checkpointing:
            model.activation_checkpointing_enable()
        return model, cfg
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        # SwiGLU width 8d/3 gives 12·d² per layer, Cognate's per-layer budget (4 attention + 2 memory/gate + 6 MLP)
        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                            intermediate_size=8 * d // 3, max_position_embeddings=cfg.model.seq_len,
                                            tie_word_embeddings=True)), cfg
    if kind == "titans-mac":
        from titans_pytorch import MemoryAsContextTransformer

        return MemoryAsContextTransformer(num_tokens=V, dim=d, depth=L, heads=H, segment_len=c.window_size,
                                          num_persist_mem_tokens=8, num_longterm_mem_tokens=8), cfg
    raise ValueError(kind)


def _estimate_mb(kind: str, cfg, params: int, batch: int) -> float:
    from phases.common.sizing import MB, Recursion, training_memory_bytes

    c = cfg.cognate
    recursion = (Recursion(c.graph_steps(), c.train.chunk_floor, cfg.tokenizer.vocab_size, c.train.activation_checkpointing)
                 if kind == "cognate" else None)
    return training_memory_bytes(params, cfg.model, batch, recursion=recursion) / MB


def worker(kind: str, preset: str, steps: int, batch: int, grad_steps: int | None = None) -> dict:
    from phases.common.resources import return_freed_memory

    torch.set_num_threads(1)
    return_freed_memory()
    rss0 = _rss_mb()
    torch.manual_seed(0)
    model, cfg = _build(kind, preset, grad_steps)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.tokenizer.vocab_size, (steps + 1, batch, cfg.model.seq_len), generator=g).to(device)

    def step(x):
        if kind == "titans-mac":
            loss = model(x, return_loss=True)
        else:
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(data[0])  # warm-up (allocator, lazy init, optimizer states)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(data[i + 1])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    flops = math.nan
    if kind != "titans-mac":
        from phases.common.measure import forward_flops_per_token

        with torch.no_grad():
            flops = forward_flops_per_token(model, data[0][:1])
    return {"forward_flops_per_token": flops, "model": kind, "params": params, "device": device, "batch": batch,
            "seq": cfg.model.seq_len,
            "tokens_per_s": steps * batch * cfg.model.seq_len / seconds, "peak_mb": peak,
            "estimate_mb": _estimate_mb(kind, cfg, params, batch),
            "recursion": getattr(getattr(model, "config", None), "act_max_steps", 1),
            "grad_steps": cfg.cognate.train.grad_steps}


def _run(kind: str, preset: str, steps: int, batch: int, grad_steps: int | None) -> dict | None:
    extra = [] if grad_steps is None else ["--grad-steps", str(grad_steps)]
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--preset", preset, "--steps", str(steps),
                           "--batch", str(batch), *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        print(f"{preset:5s} {kind:11s} skipped: {last}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--shapes", default="tiny,small")
    ap.add_argument("--tiny-batch", type=int, default=8, help="the tiny preset's batch size")
    # The small preset's strategy batch (16-32 by free memory) fits its estimate but takes minutes per step
    # on a CPU core; 1 keeps the bench to minutes. The memory estimate scales with it linearly.
    ap.add_argument("--small-batch", type=int, default=1)
    ap.add_argument("--grad-steps", type=int, default=None, help=(
        "recursion steps that back-propagate (cognate.train.grad_steps; 1: TRM's one-step gradient); default: the preset's"))
    ap.add_argument("--worker")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.preset, args.steps, args.batch, args.grad_steps)))
        return
    torch.set_num_threads(1)  # as the workers: one core is what the machine lends each run
    batches = {"tiny": args.tiny_batch, "small": args.small_batch}
    shapes: dict[str, dict] = {}
    print(f"{'shape':5s} {'model':11s} {'params':>10s} {'batch':>5s} {'tokens/s':>10s} {'peak MB':>9s} {'estimate MB':>11s}")
    for preset in args.shapes.split(","):
        kinds = ("cognate", "llama", "titans-mac") if preset == "tiny" else ("cognate", "llama")
        results = {k: r for k in kinds if (r := _run(k, preset, args.steps, batches[preset], args.grad_steps)) is not None}
        for r in results.values():
            print(f"{preset:5s} {r['model']:11s} {r['params']:>10,d} {r['batch']:>5d} {r['tokens_per_s']:>10.0f} "
                  f"{r['peak_mb']:>9.1f} {r['estimate_mb']:>11.1f}", flush=True)
        if "cognate" in results and "llama" in results:
            c, b = results["cognate"], results["llama"]
            ratio = c["tokens_per_s"] / b["tokens_per_s"]
            print(f"{preset:5s} cognate / llama: tokens/s {ratio:.3f}x (per recursion step, T_max={c['recursion']}: "
                  f"{c['recursion'] * ratio:.3f}x), peak memory {c['peak_mb'] / max(b['peak_mb'], 1e-9):.2f}x", flush=True)
            # at Llama's FLOP rate Cognate could reach at most this: the recursion's and the memory's
            # arithmetic, not their implementation, set it
            ceiling = b["forward_flops_per_token"] / c["forward_flops_per_token"]
            print(f"{preset:5s} forward FLOPs/token: cognate {c['forward_flops_per_token']:.3g}, llama "
                  f"{b['forward_flops_per_token']:.3g}: the ratio at equal FLOP rate is {ceiling:.3f}x", flush=True)
            shapes[preset] = {"tokens_per_s_ratio": round(ratio, 4), "flops_ratio": round(ceiling, 4),
                              "peak_mb": round(c["peak_mb"], 1),
                              "estimate_mb": round(c["estimate_mb"], 1), "llama_peak_mb": round(b["peak_mb"], 1),
                              "batch": c["batch"], "seq": c["seq"], "t_max": c["recursion"], "grad_steps": c["grad_steps"]}
    print(json.dumps({"bench": "cognate", "shapes": shapes, "steps": args.steps, "threads": torch.get_num_threads(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
