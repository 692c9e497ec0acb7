"""Quiet-STaR thought generation and inference speed, each against its baseline in the same run.

    python bench/quietstar.py [--preset tiny] [--model DIR] [--seq 48] [--thoughts 2] [--length 8] [--threads 2]

1. Thoughts after every position: the batched pass (phases/quietstar/thoughts.py, one loop over the
   extension's tokens) against a per-position loop producing the same thoughts (one decode cache walks
   the sequence; at each position a copy of it takes each thought token by token: the cheapest
   sequential way). Both replay the same sampled thoughts; the largest logit difference is printed to
   show they compute the same thing. Ratio = sequential time / batched time.
2. Generation with a thought before every token (QuietStarForCausalLM.generate) against plain decoding
   of the same model: tokens/s each, and the slowdown.
The model is a randomly initialised Cognate of the preset's shape unless --model names a saved one
(timing depends on shapes, not on weights). Thought tokens: the two last ids of the vocabulary.
3. With --quietstar DIR (a trained Quiet-STaR model, e.g. the store's quietstar-model) and --curriculum DIR:
   thinking only where the direct next-token entropy exceeds a threshold (``config.thought_entropy``), at
   each of --entropy's thresholds: decode ms per answer token on the test word problems (greedy, batch 1,
   against the same model's plain decoding), the share of tokens that got a thought, and the held-out
   accuracy per skill with thoughts (teacher-forced exact answers, the forging report's measure).
Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's phases/, and the per-position reference


def _model(preset: str, path: str | None):
    from phases.cognate import CognateConfig, CognateForCausalLM
    from phases.common.hf_io import load_pretrained
    from phases.config import PipelineConfig

    if path:
        return load_pretrained(CognateForCausalLM, path).eval()
    cfg = PipelineConfig.from_preset(preset)
    torch.manual_seed(0)
    return CognateForCausalLM(CognateConfig(
        vocab_size=cfg.tokenizer.vocab_size + 12, hidden_size=cfg.model.d_model, num_hidden_layers=cfg.model.n_layers,
        num_attention_heads=cfg.model.n_heads, window_size=cfg.cognate.window_size,
        act_max_steps=cfg.cognate.act_max_steps, mem_chunk_size=27)).eval()  # 27: the chunk tiny training ends at


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--model", default=None, help="a saved Cognate model directory (default: random, preset shape)")
    ap.add_argument("--seq", type=int, default=48)
    ap.add_argument("--thoughts", type=int, default=2)
    ap.add_argument("--length", type=int, default=8)
    ap.add_argument("--n-true", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quietstar", default=None, help="a trained Quiet-STaR model directory, for part 3")
    ap.add_argument("--curriculum", default=None, help="the curriculum directory its test problems come from")
    ap.add_argument("--entropy", default="0,1,2,3", help="thresholds (nats) for part 3; 0 thinks everywhere")
    ap.add_argument("--problems", type=int, default=20, help="part 3: test problems per skill (accuracy)")
    ap.add_argument("--timed", type=int, default=3, help="part 3: word problems decoded for the timing")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from thought_references import cached_sequential

    from phases.quietstar.model import QuietStarForCausalLM, quietstar_config
    from phases.quietstar.thoughts import ThoughtSpec, parallel_thoughts

    base = _model(args.preset, args.model)
    V = base.config.vocab_size
    start, end = V - 2, V - 1
    spec = ThoughtSpec(count=args.thoughts, length=args.length, n_true=args.n_true, start_id=start, end_id=end,
                       banned=(start, end))
    x = torch.randint(0, V - 12, (1, args.seq), generator=torch.Generator().manual_seed(0))
    print(f"model: {sum(p.numel() for p in base.parameters()):,} params, act_max_steps {base.config.act_max_steps}, "
          f"memory chunk {base.config.mem_chunk_size}; torch threads {torch.get_num_threads()}")
    print(f"thoughts: {args.thoughts} x {args.length} tokens after each of {args.seq} positions, {args.n_true} true "
          f"tokens scored (extension {spec.extension} tokens)\n")

    with torch.no_grad():
        ref = parallel_thoughts(base, x, spec, generator=torch.Generator().manual_seed(1), keep_ext_logits=True)
        batched = _time(lambda: parallel_thoughts(base, x, spec, forced=ref.thoughts), args.repeats)
        seq_logits = cached_sequential(base, x, ref.extension)
        sequential = _time(lambda: cached_sequential(base, x, ref.extension), max(1, args.repeats // 2))
    diff = float((seq_logits - ref.ext_logits).abs().max())
    n_ext = args.thoughts * args.seq * spec.extension
    print("| thought generation | seconds | extension tokens/s |")
    print("|---|---|---|")
    print(f"| per-position loop (decode cache) | {sequential:.3f} | {n_ext / sequential:,.0f} |")
    print(f"| batched pass | {batched:.3f} | {n_ext / batched:,.0f} |")
    print(f"ratio sequential/batched: {sequential / batched:.2f}x   (max |logit difference| {diff:.2e})\n")

    model = QuietStarForCausalLM(quietstar_config(base.config, args.length, start, end, [start, end])).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    prompt = x[:, :16]
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                  bad_words_ids=[[start]])

    def gen(thoughts: bool):
        model.config.thoughts_enabled = thoughts
        return _time(lambda: model.generate(prompt, **kwargs), max(1, args.repeats // 2))

    plain, thinking = gen(False), gen(True)
    print("| generation (batch 1, decode cache) | tokens/s | ms/token |")
    print("|---|---|---|")
    print(f"| without thoughts | {args.new_tokens / plain:.1f} | {1000 * plain / args.new_tokens:.1f} |")
    print(f"| with a {args.length}-token thought before each token | {args.new_tokens / thinking:.1f} | "
          f"{1000 * thinking / args.new_tokens:.1f} |")
    print(f"slowdown with thoughts: {thinking / plain:.2f}x (a thought is {args.length + 2} extra decode steps)")
    import transformers

    figures = {"bench": "quietstar", "device": "cpu", "threads": torch.get_num_threads(),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
               "parallel_speedup": sequential / batched,
               "plain_ms_per_token": 1000 * plain / args.new_tokens,
               "thinking_ms_per_token": 1000 * thinking / args.new_tokens,
               "thought_overhead": thinking / plain}  # a thought before every token
    if args.quietstar:
        rows = entropy_gate(args)
        figures["entropy_gate"] = rows
        # per threshold: time per answer token with thoughts gated there / without thoughts
        figures["thought_overhead_gated"] = {str(r["thought_entropy"]): r["over_plain"] for r in rows
                                             if r["thought_entropy"] is not None}
    print(json.dumps(figures))


def entropy_gate(args) -> list[dict]:
    """Part 3: one row per threshold."""
    from phases.common.hf_io import load_pretrained
    from phases.common.measure import teacher_forced_hits
    from phases.data import dataset_files
    from phases.data import tokenizer as bpe
    from phases.data.encoding import EvalSet
    from phases.quietstar.model import QuietStarForCausalLM

    if not args.curriculum:
        raise SystemExit("--quietstar needs --curriculum: the test problems come from it")
    model = load_pretrained(QuietStarForCausalLM, args.quietstar).eval()
    tokenizer = bpe.load(args.quietstar)
    # no rows are packed (n_rows 0), so the row length is never used
    test = EvalSet.build(list(dataset_files.load_splits(args.curriculum)["test"]), tokenizer, 1, 0, args.problems, "test")
    timed = [torch.tensor([p]) for (p, _), k in zip(test.problems, test.skills) if k == "word_problem"][: args.timed]
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                  bad_words_ids=[[model.config.thought_start_id]])

    def decode_s(thoughts: bool) -> float:
        model.config.thoughts_enabled = thoughts
        return sum(_time(lambda p=p: model.generate(p, **kwargs), 1) for p in timed)

    plain = decode_s(False)
    tokens = args.new_tokens * len(timed)
    rows = []
    print("\n| thought_entropy (nats) | ms/token | × plain | tokens with a thought | "
          + " | ".join(f"{k} accuracy" for k in sorted(set(test.skills))) + " |")
    print("|---" * (4 + len(set(test.skills))) + "|")
    with torch.no_grad():
        # each threshold with thoughts on, then the same model with them off (None)
        for threshold in [*(float(t) for t in args.entropy.split(",")), None]:
            if threshold is None:
                model.config.thoughts_enabled = False
                seconds, rate = plain, 0.0
            else:
                model.config.thought_entropy = threshold
                seconds = decode_s(True)
                shown = [model.generate(p, show_thoughts=True, **kwargs) for p in timed]
                rate = sum(int((s[0, p.shape[1]:] == model.config.thought_start_id).sum())
                           for s, p in zip(shown, timed)) / tokens
            skills = test.skill_hits(teacher_forced_hits(model, test.problems))
            row = {"thought_entropy": threshold, "ms_per_token": 1000 * seconds / tokens,
                   "over_plain": seconds / plain, "thought_rate": rate,
                   "accuracy": {k: h / n for k, (h, n) in skills.items()}}
            rows.append(row)
            label = "thoughts off" if threshold is None else f"{threshold:g}"
            print(f"| {label} | {row['ms_per_token']:.1f} | {row['over_plain']:.2f} | {rate:.0%} | "
                  + " | ".join(f"{h}/{n}" for h, n in skills.values()) + " |")
    return rows


if __name__ == "__main__":
    main()
