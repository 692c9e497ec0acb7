"""Cognate training throughput and memory against a transformers Llama of equal size and depth.

    python bench/cognate.py [--preset tiny] [--steps 10] [--batch 8]

Each model trains in its own subprocess on the same seeded batches with AdamW (so the optimizer is
not what is compared): tokens/s over the timed steps, and peak memory growth during training (CUDA:
max allocated; CPU: peak RSS minus RSS before the first step). Cognate is also reported per recursion
step, since its T_max recursion multiplies compute by design. titans-pytorch's memory-as-context
transformer joins when it is installed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _build(kind: str, preset: str):
    from phases.config import PipelineConfig

    cfg = PipelineConfig.from_preset(preset)
    d, L, H, V = cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.tokenizer.vocab_size
    if kind == "cognate":
        from phases.cognate import CognateConfig, CognateForCausalLM

        return CognateForCausalLM(CognateConfig(vocab_size=V, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                                window_size=cfg.cognate.window_size, act_max_steps=cfg.cognate.act_max_steps,
                                                mem_chunk_size=cfg.cognate.train.chunk_start)), cfg
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        # SwiGLU width 8d/3 gives 12·d² per layer, Cognate's per-layer budget (4 attention + 2 memory/gate + 6 MLP)
        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                            intermediate_size=8 * d // 3, max_position_embeddings=cfg.model.seq_len,
                                            tie_word_embeddings=True)), cfg
    if kind == "titans-mac":
        from titans_pytorch import MemoryAsContextTransformer

        return MemoryAsContextTransformer(num_tokens=V, dim=d, depth=L, heads=H, segment_len=cfg.cognate.window_size,
                                          num_persist_mem_tokens=8, num_longterm_mem_tokens=8), cfg
    raise ValueError(kind)


def worker(kind: str, preset: str, steps: int, batch: int) -> dict:
    torch.manual_seed(0)
    model, cfg = _build(kind, preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.tokenizer.vocab_size, (steps + 2, batch, cfg.model.seq_len), generator=g).to(device)

    def step(x):
        if kind == "titans-mac":
            loss = model(x, return_loss=True)
        else:
            loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(data[0])  # warm-up (allocator, lazy init)
    rss0 = _rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        step(data[i + 1])
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0)
    return {"model": kind, "params": sum(p.numel() for p in model.parameters()), "device": device,
            "tokens_per_s": steps * batch * cfg.model.seq_len / seconds, "peak_mem_mb": peak,
            "recursion": getattr(getattr(model, "config", None), "act_max_steps", 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.preset, args.steps, args.batch)))
        return
    results = {}
    for kind in ("cognate", "llama", "titans-mac"):
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--preset", args.preset, "--steps",
                               str(args.steps), "--batch", str(args.batch)], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{kind:11s} skipped: {last}")
            continue
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{'model':11s} {'params':>10s} {'tokens/s':>10s} {'peak MB':>9s}")
    for r in results.values():
        print(f"{r['model']:11s} {r['params']:>10,d} {r['tokens_per_s']:>10.0f} {r['peak_mem_mb']:>9.1f}")
    if "cognate" in results and "llama" in results:
        c, b = results["cognate"], results["llama"]
        print(f"\ncognate / llama: tokens/s {c['tokens_per_s'] / b['tokens_per_s']:.3f}x, "
              f"peak memory {c['peak_mem_mb'] / max(b['peak_mem_mb'], 1e-9):.2f}x, params {c['params'] / b['params']:.3f}x")
        print(f"cognate per recursion step (T_max={c['recursion']}): tokens/s "
              f"{c['recursion'] * c['tokens_per_s'] / b['tokens_per_s']:.3f}x of llama")
    if "titans-mac" in results and "cognate" in results:
        t = results["titans-mac"]
        print(f"cognate / titans-pytorch MAC: tokens/s {results['cognate']['tokens_per_s'] / t['tokens_per_s']:.3f}x, "
              f"peak memory {results['cognate']['peak_mem_mb'] / max(t['peak_mem_mb'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
