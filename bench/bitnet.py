"""BitNet: compression, bits per weight, and packed vs FP32 decode speed and peak memory, in one run.

    python bench/bitnet.py [--shape tiny|small] [--model DIR] [--packed DIR] [--tokens 32] [--repeats 3] [--prompts 2]
                           [--rounds 3]

--model: a saved Cognate directory (default: the newest quietstar-model / evomerge-champion / cognate-model in the
store at $AGENT_FORGE_HOME for --shape tiny, else a randomly initialised model of the --shape preset's shape; speed,
memory and bytes do not depend on training). --packed: its packed artifact (default: packed here, every linear
layer but the LM head, without calibration or fine-tuning, which change values, not sizes).

Each model decodes in its own subprocess on the same prompts: greedy, ``--tokens`` new tokens forced, decode cache,
batch 1, CPU; tokens/s (wall-clock, and per CPU-second of the worker) is the median over repeats after a warm-up;
peak memory is the growth of the worker's peak RSS (VmHWM) from just before the model is loaded to the end of
decoding. The two models take turns for ``--rounds`` rounds, each in a fresh process; medians over the rounds.
The last line is one JSON object: ``decode_speedup`` (packed / FP32 tokens/s), ``peak_memory_ratio``, ``shape``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(kind: str, path: str, tokens: int, repeats: int, prompts: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from phases.bitnet import evaluate as ev
    from phases.bitnet.packed_format import load_packed
    from phases.cognate import CognateForCausalLM
    from phases.common.measure import decode_rates

    g = torch.Generator().manual_seed(0)
    rss0 = _status_mb("VmRSS")
    model = load_packed(path) if kind == "packed" else CognateForCausalLM.from_pretrained(path).eval()
    vocab = model.config.vocab_size
    prompt_ids = [torch.randint(0, vocab, (1, 12), generator=g) for _ in range(prompts)]
    rate = decode_rates({kind: model}, prompt_ids, tokens, repeats)[kind]
    return {"kind": kind, **rate, "peak_growth_mb": _status_mb("VmHWM") - rss0,
            "resident_tensor_bytes": ev.resident_bytes(model), "threads": torch.get_num_threads()}


def _newest_model() -> Path | None:
    from storage import ArtifactStore

    home = os.environ.get("AGENT_FORGE_HOME", "./.agent-forge")
    if not Path(home).is_dir():
        return None
    st = ArtifactStore(home)
    for kind in ("quietstar-model", "evomerge-champion", "cognate-model"):
        found = [m for m in st.list(kind) if "error" not in m]
        if found:
            return st.load(found[-1]["id"])
    return None


def _random(shape: str, out: Path) -> Path:
    import torch

    from phases.cognate import CognateConfig, CognateForCausalLM
    from phases.config import PipelineConfig

    cfg = PipelineConfig.from_preset(shape)
    torch.manual_seed(0)
    CognateForCausalLM(CognateConfig(
        vocab_size=cfg.tokenizer.vocab_size, hidden_size=cfg.model.d_model, num_hidden_layers=cfg.model.n_layers,
        num_attention_heads=cfg.model.n_heads, window_size=cfg.cognate.window_size,
        act_max_steps=cfg.cognate.act_max_steps, mem_chunk_size=cfg.cognate.train.chunk_start)).save_pretrained(out)
    return out


def _pack_all(model_dir: Path, out: Path) -> Path:
    from phases.bitnet import convert
    from phases.bitnet.packed_format import save_packed
    from phases.cognate import CognateForCausalLM

    model = CognateForCausalLM.from_pretrained(model_dir).eval()
    convert.to_bitlinear(model, convert.quantizable(model))
    save_packed(model, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--shape", choices=("tiny", "small"), default="tiny",
                    help="the preset whose shape a randomly initialised model takes when --model is not given")
    ap.add_argument("--packed")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each decoding worker")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PATH"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.tokens, args.repeats, args.prompts, args.threads)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bitnet-bench-"))
    try:
        report(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(args: argparse.Namespace, tmp: Path) -> None:
    import torch

    from phases.bitnet import evaluate as ev
    from phases.bitnet.packed_format import load_packed, packed_layers
    from phases.cognate import CognateForCausalLM

    model_dir = Path(args.model) if args.model else (_newest_model() if args.shape == "tiny" else None)
    source = str(model_dir) if model_dir else f"random init, {args.shape} preset shape"
    model_dir = model_dir or _random(args.shape, tmp / "fp32")
    packed_dir = Path(args.packed) if args.packed else _pack_all(model_dir, tmp / "packed")
    how = "" if args.packed else " (every linear but the LM head, plain absmean)"
    print(f"input:  {source}\npacked: {args.packed or 'a temporary directory'}{how}")

    fp32 = CognateForCausalLM.from_pretrained(model_dir)
    packed = load_packed(packed_dir)
    layers = packed_layers(packed)
    weights = sum(m.out_features * m.in_features for m in layers.values())
    comp = ev.compression(model_dir, packed_dir, list(layers), ev.input_fp32_bytes(model_dir, fp32),
                          ev.saved_bytes(fp32, torch.float16), weights)
    params = sum(p.numel() for p in fp32.parameters())
    print(f"\nparams {params:,}; ternary layers {len(layers)} holding {comp['quantized_weights']:,} weights "
          f"({comp['quantized_weights'] / params:.1%})")
    print(f"{'weights file':28s} {'bytes':>12s} {'vs packed':>10s}")
    print(f"{'FP32 input':28s} {comp['fp32_bytes']:>12,d} {comp['ratio_vs_fp32']:>9.2f}x")
    print(f"{'FP16 copy of the input':28s} {comp['fp16_bytes']:>12,d} {comp['ratio_vs_fp16']:>9.2f}x")
    print(f"{'packed':28s} {comp['packed_bytes']:>12,d} {1:>9.2f}x")
    print(f"quantized layers alone: {comp['quantized_fp32_bytes']:,} B FP32 -> {comp['quantized_packed_bytes']:,} B "
          f"packed ({comp['quantized_ratio_vs_fp32']:.2f}x); {comp['bits_per_weight']:.3f} bits/weight incl. scales "
          f"and biases (2-bit packing: 2.000; ternary limit log2(3) = {comp['ternary_limit_bits']:.3f})")
    print(f"kept in FP16 (tied embeddings/LM head, norms, persistent memory, memory gates, fallbacks): "
          f"{comp['kept_bytes']:,} B = "
          f"{comp['kept_bytes'] / comp['packed_bytes']:.1%} of the packed file")

    runs: dict[str, list[dict]] = {"fp32": [], "packed": []}
    for _ in range(args.rounds):  # the two take turns, so a change in machine load hits both alike
        for kind, path in (("fp32", model_dir), ("packed", packed_dir)):
            proc = subprocess.run([sys.executable, __file__, "--worker", kind, str(path), "--tokens", str(args.tokens),
                                   "--repeats", str(args.repeats), "--prompts", str(args.prompts),
                                   "--threads", str(args.threads)],
                                  capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-2000:]}")
            runs[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    f, p = ({k: statistics.median(r[k] for r in runs[kind]) if k != "kind" else kind for k in runs[kind][0]}
            for kind in ("fp32", "packed"))
    print(f"\ndecode on CPU ({f['threads']:.0f} threads), {args.prompts} prompts x {args.tokens} tokens; medians over "
          f"{args.rounds} alternating processes x {args.repeats} repeats")
    print(f"{'model':8s} {'tokens/s':>9s} {'tokens/CPU-s':>13s} {'peak RSS growth MB':>19s} {'tensor bytes':>13s}")
    for r in (f, p):
        print(f"{r['kind']:8s} {r['tokens_per_s']:>9.1f} {r['tokens_per_cpu_s']:>13.1f} {r['peak_growth_mb']:>19.1f} "
              f"{r['resident_tensor_bytes']:>13,.0f}")
    print(f"\npacked / fp32: tokens/s {p['tokens_per_s'] / f['tokens_per_s']:.2f}x (per CPU-second "
          f"{p['tokens_per_cpu_s'] / f['tokens_per_cpu_s']:.2f}x), peak RSS growth "
          f"{p['peak_growth_mb'] / max(f['peak_growth_mb'], 1e-9):.2f}x, tensor bytes "
          f"{p['resident_tensor_bytes'] / f['resident_tensor_bytes']:.2f}x")
    import transformers

    print(json.dumps({
        "bench": "bitnet", "shape": args.shape if not args.model else "model", "source": source,
        "params": params, "device": "cpu", "threads": f["threads"], "tokens": args.tokens, "prompts": args.prompts,
        "rounds": args.rounds, "decode_speedup": p["tokens_per_s"] / f["tokens_per_s"],
        "decode_speedup_cpu_time": p["tokens_per_cpu_s"] / f["tokens_per_cpu_s"],
        "fp32_tokens_per_s": f["tokens_per_s"], "packed_tokens_per_s": p["tokens_per_s"],
        "peak_memory_ratio": p["peak_growth_mb"] / max(f["peak_growth_mb"], 1e-9),
        "tensor_bytes_ratio": p["resident_tensor_bytes"] / f["resident_tensor_bytes"],
        "compression_vs_fp32": comp["ratio_vs_fp32"], "compression_vs_fp16": comp["ratio_vs_fp16"],
        "bits_per_weight": comp["bits_per_weight"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}))


if __name__ == "__main__":
    main()
