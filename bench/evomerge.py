"""EvoMerge benchmark: technique speed, agreement with mergekit, and one generation's cost.

    python bench/evomerge.py [--size small] [--gen-size tiny] [--no-mergekit] [--mergekit-path /tmp/mkdeps]

1. Techniques. Each of the seven (linear, slerp, task_arithmetic, ties, dare, frankenmerge, dfs) is
   run over a whole state dict through phases/evomerge/techniques.py on the same triple A, B, C and
   base of ``--size`` Cognate models (random base, each input = base + small random deltas: weight-space
   merging needs a shared ancestor, not training). Times are the best of up to ``--repeats`` runs
   (fewer once 3 s are spent), with the ratio to linear. Two full candidates
   (``merge_genome`` from safetensors, combos 0 and 7 cover all six
   techniques) show what one merge of a candidate costs at that size.
2. mergekit. The same shape saved as LlamaForCausalLM directories (mergekit cannot load Cognate),
   identical YAMLs for linear, slerp, task_arithmetic and ties (float32) run through mergekit's
   ``run_merge`` (the function behind ``mergekit-yaml``, in a subprocess with ``--mergekit-path`` on
   PYTHONPATH, so mergekit never enters the project's environment) and through our
   ``mergekit_yaml.run`` (``agent-forge merge``). Both times include reading inputs and writing the
   output, best of ``--repeats`` runs each; mergekit's import time is reported apart. Ours and mergekit's
   outputs agree when their max abs diff is ≤ 1e-6.
3. One generation at ``--gen-size`` (tiny: d=192, 2 layers, seq 128): curriculum, BPE, a random
   base and three specialists (base + deltas, the specialists' runtime settings), then the 8
   generation-0 candidates, each timed as merge (``merge_genome``), build (``steps.build_model``)
   and evaluation (``steps.measure_model``: held-out loss, accuracy, speed/memory once per
   structure, predictions for diversity) with one structure memo, as ``local_evaluator`` does.

Everything runs with ``--threads`` torch threads (default 1: on shared busy cores 2 OpenMP threads
were up to 10× slower). The ratios compare figures taken in the same run.

mergekit install (a side directory; the project's .venv is untouched):
    .venv/bin/pip download mergekit --no-deps -d /tmp/mk
    .venv/bin/pip install --no-deps --target /tmp/mkdeps /tmp/mk/mergekit-*.whl accelerate immutables peft sentencepiece scipy
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REL_DELTA = 0.1  # input = base + 0.1·rms(tensor)·N(0,1): far enough apart that slerp takes its spherical branch
WEIGHTS = (0.5, 0.3, 0.2)
DENSITY = 0.5


# ----------------------------------------------------------------------------- shared helpers

def _shape(preset: str):
    from phases.config import PipelineConfig

    return PipelineConfig.from_preset(preset)


def _timed(fn, repeats: int, budget_s: float = 3.0):
    """(best wall seconds of up to ``repeats`` runs, last result). Stops repeating once ``budget_s`` is
    spent, so cheap merges get a best-of-N on busy cores and TIES at ``small`` runs once."""
    best, out, spent = float("inf"), None, 0.0
    for _ in range(repeats):
        out = None  # free the previous result before the next run
        t0 = time.perf_counter()
        out = fn()
        took = time.perf_counter() - t0
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best, out


def branch(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A variant sharing ``base`` as ancestor: each tensor plus REL_DELTA of its RMS in Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in base.items():
        rms = float(t.float().pow(2).mean().sqrt()) if t.numel() else 0.0
        out[k] = t + REL_DELTA * max(rms, 1e-2) * torch.randn(t.shape, generator=g, dtype=t.dtype)
    return out


def cognate_config(cfg, vocab_size: int, **extra):
    from phases.cognate import CognateConfig

    m, c = cfg.model, cfg.cognate
    shape = dict(vocab_size=vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
                 num_attention_heads=m.n_heads, window_size=c.window_size, mem_chunk_size=c.train.chunk_start,
                 shard_length=c.shard_length,
                 act_max_steps=c.act_max_steps, n_persistent=c.n_persistent)
    return CognateConfig(**(shape | extra))


def saved_state(model) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained writes: a tied lm_head is not one of them."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _params(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def _fmt_s(s: float) -> str:
    return f"{s * 1000:8.1f} ms" if s < 1 else f"{s:8.2f} s "


# ----------------------------------------------------------------------------- 1. techniques

def apply_plan(plan, sources: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stage 3 as merge.merge_genome does it: non-layer tensors from source 0, layer j of the result
    = layer ``step.layer`` of ``sources[step.source]``, a repeated layer cloned."""
    from phases.evomerge.merge import layer_key

    state, per_layer = {}, {}
    for k, t in sources[0].items():
        parsed = layer_key(k)
        if parsed is None:
            state[k] = t
        else:
            per_layer.setdefault(parsed[1], []).append((parsed[0], parsed[2]))
    used: set[int] = set()
    for j, step in enumerate(plan):
        for prefix, rest in per_layer[step.layer]:
            t = sources[step.source][f"{prefix}.{step.layer}.{rest}"]
            state[f"{prefix}.{j}.{rest}"] = t.clone() if id(t) in used else t
            used.add(id(t))
    return state


def bench_techniques(cfg, repeats: int, workdir: Path, combos: list[int]) -> list[tuple]:
    from phases.cognate import CognateForCausalLM
    from phases.common import hf_io
    from phases.evomerge import techniques as tq
    from phases.evomerge.genome import default_pattern, generation_zero
    from phases.evomerge.merge import merge_genome

    V, L = cfg.tokenizer.vocab_size, cfg.model.n_layers
    torch.manual_seed(0)
    model = hf_io.build(CognateForCausalLM, cognate_config(cfg, V))
    base = {k: v.detach().clone() for k, v in saved_state(model).items()}
    a, b, c = (branch(base, 100 + i) for i in range(3))
    xs_all = (a, b, c)
    n = _params(base)
    print(f"\n[1] techniques on one triple + base of {cfg.preset} Cognate state dicts: {L} layers, d={cfg.model.d_model}, "
          f"{cfg.model.n_heads} heads, vocab {V}, {n / 1e6:.1f}M params, {len(base)} tensors, float32; "
          f"weights {WEIGHTS}, density {DENSITY}, best of ≤{repeats} runs")

    w = WEIGHTS

    def linear():
        return {k: tq.linear([x[k] for x in xs_all], w) for k in base}

    def slerp():  # three-way as merge.Merger does it: slerp(slerp(A, B), C), t = the newcomer's weight share
        return {k: tq.slerp(w[2] / sum(w), tq.slerp(w[1] / (w[0] + w[1]), a[k], b[k]), c[k]) for k in base}

    def task_arithmetic():
        return {k: tq.task_arithmetic(base[k], [x[k] for x in xs_all], w) for k in base}

    def ties():
        return {k: tq.ties(base[k], [x[k] for x in xs_all], w, DENSITY) for k in base}

    def dare():
        return {k: tq.dare(base[k], [x[k] for x in xs_all], w, DENSITY,
                           torch.Generator().manual_seed(tq.tensor_seed(0, k))) for k in base}

    rng = random.Random(0)
    merged_m = linear()  # source 0 of the selection stage (M2 in a recipe); also the warm-up, not timed
    sources = [merged_m, a, b, c]
    pattern = default_pattern(L, rng)
    path = [(rng.randrange(4), rng.randrange(L), round(rng.uniform(0.8, 1.2), 3)) for _ in range(L + 1)]
    path[1] = path[0][:2] + (1.0,)  # one repeated layer, so DFS's clone-on-repeat is part of the time

    def frankenmerge():
        return apply_plan(tq.frankenmerge(pattern), sources)

    def dfs():
        return apply_plan(tq.dfs(path, L, len(sources)), sources)

    rows = []
    for name, fn in [("linear", linear), ("slerp", slerp), ("task_arithmetic", task_arithmetic), ("ties", ties),
                     ("dare", dare), ("frankenmerge", frankenmerge), ("dfs", dfs)]:
        t, out = _timed(fn, repeats)
        if name == "dfs":  # the DFS result must be a valid Cognate model of depth len(path) with its input scales
            dm = hf_io.build(CognateForCausalLM, cognate_config(cfg, V, num_hidden_layers=len(path),
                                                                layer_scales=[s for _, _, s in path]))
            missing, unexpected = dm.load_state_dict(out, strict=False)
            bad = (set(missing) - {"lm_head.weight"}) | set(unexpected)
            with torch.no_grad():
                finite = bool(torch.isfinite(dm(torch.arange(16).unsqueeze(0)).logits).all())
            check = f"valid Cognate, {len(path)} layers, finite logits" if not bad and finite else f"INVALID: {sorted(bad)[:3]}"
            del dm
        elif name == "frankenmerge":
            check = f"pattern {''.join(map(str, pattern))}: re-indexing, no tensor math"
        else:
            check = f"{n / t / 1e6:7.1f} Mparam/s" + ("  (3 inputs = 2 pairwise slerps)" if name == "slerp" else "")
        rows.append((name, t, check))
        del out
    base_t = rows[0][1]
    print(f"  {'technique':<16}{'time':>12}{'× linear':>10}   note")
    for name, t, check in rows:
        print(f"  {name:<16}{_fmt_s(t):>12}{t / base_t:>10.2f}   {check}")

    # full candidates, as an evolution evaluates them: merge_genome reading the parents' safetensors
    if combos:
        from phases.evomerge.genome import techniques as combo_techniques

        dirs = {}
        for name, state in (("base", base), ("a", a), ("b", b), ("c", c)):
            model.load_state_dict(state, strict=False)
            hf_io.save_pretrained(model, workdir / f"cognate_{name}")
            dirs[name] = workdir / f"cognate_{name}"
        genomes = generation_zero(L, runtime_from=0, seed=0)
        print("  full candidate (merge_genome from safetensors, stage 1-2 per tensor + stage 3):")
        for combo in combos:
            t, out = _timed(lambda combo=combo: merge_genome(dirs["base"], [dirs[x] for x in "abc"], genomes[combo]), repeats)
            print(f"  combo {combo} {'+'.join(combo_techniques(combo)):<28}{_fmt_s(t):>10}{t / base_t:>8.2f}× linear"
                  f"   {len(out[0])} tensors, {out[1]['num_hidden_layers']} layers")
            del out
    return rows


# ----------------------------------------------------------------------------- 2. mergekit

MK_METHODS = ("linear", "slerp", "task_arithmetic", "ties")
# Non-default parameters, so that normalisation (weights not summing to 1) and lambda are exercised.
LINEAR_W, SLERP_T, TA_W, TA_LAMBDA, TIES_W = (0.5, 0.3, 0.4), 0.4, WEIGHTS, 0.9, (0.6, 0.3, 0.5)


def mk_yamls(dirs: dict[str, Path]) -> dict[str, str]:
    """One mergekit config per method; the same file goes to mergekit and to ours."""
    import yaml

    m = {k: str(v) for k, v in dirs.items()}
    docs = {
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": m[x], "parameters": {"weight": wt}} for x, wt in zip("abc", LINEAR_W)]},
        "slerp": {"merge_method": "slerp", "base_model": m["a"], "dtype": "float32",
                  "models": [{"model": m["a"]}, {"model": m["b"]}], "parameters": {"t": SLERP_T}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": m["base"], "dtype": "float32",
                            "models": [{"model": m[x], "parameters": {"weight": wt}} for x, wt in zip("abc", TA_W)],
                            "parameters": {"lambda": TA_LAMBDA}},
        "ties": {"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
                 "models": [{"model": m[x], "parameters": {"weight": wt, "density": DENSITY}}
                            for x, wt in zip("abc", TIES_W)]},
    }
    return {k: yaml.safe_dump(v, sort_keys=False) for k, v in docs.items()}


def float64_reference(method: str, key: str, dirs: dict[str, Path]) -> torch.Tensor:
    """The same merge of one tensor with float64 arithmetic: which side's float32 result is closer."""
    from safetensors import safe_open

    from phases.evomerge import techniques as tq

    def get(x):
        with safe_open(str(dirs[x] / "model.safetensors"), framework="pt") as f:
            return f.get_tensor(key).double()

    xs = [get(x) for x in "abc"]
    if method == "linear":
        return tq.linear(xs, LINEAR_W)
    if method == "slerp":
        return tq.slerp(SLERP_T, xs[0], xs[1])
    if method == "task_arithmetic":
        return tq.task_arithmetic(get("base"), xs, TA_W, lam=TA_LAMBDA)
    return tq.ties(get("base"), xs, TIES_W, DENSITY)


def ties_at_the_cut(key: str, dirs: dict[str, Path]) -> torch.Tensor:
    """Entries of one tensor where some input's |δ| equals its trim cut and more entries share that magnitude
    than the trim keeps: which of them survive is the sort's choice (mergekit: an unstable argsort; ours: the
    first by position), so the two merges may differ there and nowhere else."""
    from safetensors import safe_open

    def get(x):
        with safe_open(str(dirs[x] / "model.safetensors"), framework="pt") as f:
            return f.get_tensor(key)

    base = get("base")
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for x in "abc":
        magnitude = (get(x) - base).abs().float()
        k = max(1, int(DENSITY * magnitude.numel()))
        cut = torch.kthvalue(magnitude.reshape(-1), magnitude.numel() - k + 1).values
        at_cut = magnitude == cut
        if int((magnitude > cut).sum()) + int(at_cut.sum()) > k:
            tied |= at_cut
    return tied


def mergekit_worker(spec_path: str) -> None:
    """Runs inside the subprocess with mergekit on PYTHONPATH: times run_merge per YAML, prints JSON."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    from importlib.metadata import version

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    result = {"import_s": time.perf_counter() - t0, "version": version("mergekit"), "times": {}}
    options = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False)
    for name, (yaml_path, out) in spec["jobs"].items():
        times = []
        for _ in range(spec.get("repeats", 1)):
            t0 = time.perf_counter()
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(Path(yaml_path).read_text())), out,
                      options=options)
            times.append(time.perf_counter() - t0)
        result["times"][name] = min(times)
    print("MERGEKIT_RESULT " + json.dumps(result))


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(d.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, str, str]:
    """(max abs diff, the tensor where it is, a note on key or dtype mismatches)."""
    notes = []
    if set(ours) != set(theirs):
        notes.append(f"keys differ: only ours {sorted(set(ours) - set(theirs))[:2]}, "
                     f"only mergekit {sorted(set(theirs) - set(ours))[:2]}")
    worst, where = 0.0, "-"
    dtypes = set()
    for k in sorted(set(ours) & set(theirs)):
        dtypes.add((ours[k].dtype, theirs[k].dtype))
        if ours[k].shape != theirs[k].shape:
            notes.append(f"{k}: shape {tuple(ours[k].shape)} vs {tuple(theirs[k].shape)}")
            continue
        d = float((ours[k].double() - theirs[k].double()).abs().max()) if ours[k].numel() else 0.0
        if d > worst:
            worst, where = d, k
    if any(x != y for x, y in dtypes):
        notes.append(f"dtypes differ {sorted({(str(x), str(y)) for x, y in dtypes})}")
    return worst, where, "; ".join(notes)


def bench_mergekit(cfg, workdir: Path, mergekit_path: str | None, threads: int | None, repeats: int = 3) -> list[tuple]:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from phases.common import hf_io
    from phases.evomerge import mergekit_yaml

    d, L, H, V = cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.tokenizer.vocab_size
    lcfg = LlamaConfig(vocab_size=V, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                       num_key_value_heads=H, intermediate_size=8 * d // 3, max_position_embeddings=cfg.model.seq_len,
                       tie_word_embeddings=False)
    lcfg.architectures = ["LlamaForCausalLM"]  # mergekit picks its weight map by this name
    torch.manual_seed(1)
    base = {k: v.detach().clone() for k, v in hf_io.build(LlamaForCausalLM, lcfg).state_dict().items()}
    dirs = {}
    states = {"base": base, **{x: branch(base, 200 + i) for i, x in enumerate("abc")}}
    for name, state in states.items():
        dirs[name] = workdir / f"llama_{name}"
        dirs[name].mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(dirs[name] / "model.safetensors"),
                  metadata={"format": "pt"})
        lcfg.save_pretrained(str(dirs[name]))
    cos = [float(torch.nn.functional.cosine_similarity(states["a"][k].flatten().double(),
                                                       states["b"][k].flatten().double(), dim=0)) for k in base]
    spherical = sum(abs(x) <= 0.9995 for x in cos)
    n = _params(base)
    del states
    print(f"\n[2] mergekit vs ours (mergekit_yaml.run = `agent-forge merge`) on {cfg.preset}-shaped LlamaForCausalLM "
          f"directories: {L} layers, d={d}, vocab {V}, {n / 1e6:.1f}M params (untied head), float32; "
          f"slerp takes the spherical branch on {spherical}/{len(cos)} tensors (|cos| ≤ 0.9995)")

    ydir = workdir / "yaml"
    ydir.mkdir(exist_ok=True)
    yamls = mk_yamls(dirs)
    for k, text in yamls.items():
        (ydir / f"{k}.yaml").write_text(text)

    ours_t = {}
    for k in MK_METHODS:
        times = []
        for _ in range(repeats):  # best of: one run is at the mercy of a busy machine's page cache and scheduler
            t0 = time.perf_counter()
            mergekit_yaml.run(ydir / f"{k}.yaml", workdir / "ours" / k)
            times.append(time.perf_counter() - t0)
        ours_t[k] = min(times)

    mk = None
    reason = "skipped (--no-mergekit)"
    if mergekit_path is not None:
        spec = {"threads": threads, "repeats": repeats,
                "jobs": {k: [str(ydir / f"{k}.yaml"), str(workdir / "mergekit" / k)] for k in MK_METHODS}}
        (workdir / "mk_spec.json").write_text(json.dumps(spec))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([mergekit_path, *filter(None, [env.get("PYTHONPATH")])])
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--mergekit-worker", str(workdir / "mk_spec.json")],
                              env=env, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t0
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MERGEKIT_RESULT ")), None)
        if proc.returncode == 0 and line:
            mk = json.loads(line.split(" ", 1)[1]) | {"wall_s": wall}
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            reason = f"could not run (exit {proc.returncode}): {' | '.join(tail)}"
    if mk is None:
        print(f"  mergekit: {reason}. Our times only:")
    else:
        print(f"  mergekit {mk['version']} from {mergekit_path}: import {mk['import_s']:.2f} s, "
              f"subprocess wall {mk['wall_s']:.1f} s for all four (times below: best of the repeats, without the import)")
    print(f"  {'method':<16}{'ours':>12}{'mergekit':>12}{'ours/mk':>9}{'max|diff|':>12}  {'≤1e-6':<6}"
          f"{'max|ours−A|':>12}  worst tensor")
    input_a = _load_dir(dirs["a"])
    rows, failures = [], []
    for k in MK_METHODS:
        ours = _load_dir(workdir / "ours" / k)
        moved = max(float((ours[n] - input_a[n]).abs().max()) for n in ours)  # the merge is not a copy of an input
        if mk is None:
            print(f"  {k:<16}{_fmt_s(ours_t[k]):>12}{'n/a':>12}{'':>9}{'n/a':>12}  {'':<6}{moved:>12.2e}")
            rows.append((k, ours_t[k], None, None))
            continue
        theirs_all = _load_dir(workdir / "mergekit" / k)
        diff, where, note = compare(ours, theirs_all)
        tie_note = ""
        if k == "ties" and diff > 1e-6:
            # agreement off the entries whose fate a sort's tie order decides (ties_at_the_cut)
            tied = {n: ties_at_the_cut(n, dirs) for n in ours if n in theirs_all and ours[n].dim() > 0}
            off = {n: torch.where(tied[n], 0.0, ours[n].double()) for n in tied}
            diff, where, _ = compare(off, {n: torch.where(tied[n], 0.0, theirs_all[n].double()) for n in tied})
            tie_note = f"off the {sum(int(t.sum()) for t in tied.values())} entries tied at a trim cut"
        ok = "PASS" if diff <= 1e-6 and not note else "FAIL"
        note = "; ".join(x for x in (note, tie_note) if x)
        print(f"  {k:<16}{_fmt_s(ours_t[k]):>12}{_fmt_s(mk['times'][k]):>12}{ours_t[k] / mk['times'][k]:>9.2f}"
              f"{diff:>12.2e}  {ok:<6}{moved:>12.2e}  {where}{'  ' + note if note else ''}")
        if diff > 1e-6 and where != "-":
            ref = float64_reference(k, where, dirs)
            theirs = _load_dir(workdir / "mergekit" / k)[where]
            failures.append(f"  {k} {where} ({ours[where].numel() / 1e6:.1f}M elements): distance to the same merge in "
                            f"float64: ours {float((ours[where].double() - ref).abs().max()):.2e}, "
                            f"mergekit {float((theirs.double() - ref).abs().max()):.2e}")
        rows.append((k, ours_t[k], mk["times"][k], diff))
    for line in failures:
        print(line)
    return rows


# ----------------------------------------------------------------------------- 3. one generation

def bench_generation(cfg, workdir: Path) -> dict:
    from phases.cognate import CognateForCausalLM
    from phases.cognate.specialists import runtime_for, specialists
    from phases.cognate.steps import model_config
    from phases.common import hf_io
    from phases.common.sizing import model_size, strategy_for
    from phases.data import curriculum, dataset_files
    from phases.data import tokenizer as bpe
    from phases.evomerge import fitness as fit
    from phases.evomerge import steps
    from phases.evomerge.genome import generation_zero
    from phases.evomerge.merge import merge_genome

    sec = cfg.evomerge.fitness
    t_setup = time.perf_counter()
    splits = curriculum.generate(cfg.data.train_per_stage, cfg.data.eval_per_stage, seed=cfg.data.seed)
    dataset_files.save_splits(splits, workdir / "curriculum")
    tok = bpe.train_bpe([r["text"] for r in splits["train"]], vocab_size=cfg.tokenizer.vocab_size)
    tok_dir = workdir / "tokenizer"
    bpe.save(tok, tok_dir)
    torch.manual_seed(2)
    ccfg = model_config(cfg.model, cfg.cognate, tok)  # what the Cognate phase builds
    model = hf_io.build(CognateForCausalLM, ccfg)
    base = {k: v.detach().clone() for k, v in saved_state(model).items()}
    weights = strategy_for(model_size(model), cfg.model).fitness_weights
    dirs = []
    hf_io.save_pretrained(model, workdir / "gen_base")
    for i, spec in enumerate(specialists(cfg.cognate)):
        m = hf_io.build(CognateForCausalLM, ccfg)
        m.load_state_dict(branch(base, 300 + i), strict=False)
        m.set_runtime(**runtime_for(spec, cfg.cognate.act_max_steps))
        dirs.append(workdir / f"gen_{spec.name}")
        hf_io.save_pretrained(m, dirs[-1])
        bpe.save(tok, dirs[-1])
    setup_s = time.perf_counter() - t_setup

    data = steps.eval_set(workdir / "curriculum", tok_dir, sec, cfg.model.seq_len, "validation")
    probe = data.rows[:sec.probe_rows]
    memo: dict = {}
    t0 = time.perf_counter()
    raws = [steps.measure_model(steps.load_model(d), data, probe, memo) for d in dirs]
    inputs_s = time.perf_counter() - t0
    reference = fit.reference(raws)
    donor = steps.runtime_donor(raws, reference, weights)
    genomes = generation_zero(cfg.model.n_layers, donor, seed=cfg.seed)
    print(f"\n[3] one generation at {cfg.preset}: d={cfg.model.d_model}, {cfg.model.n_layers} layers, "
          f"{cfg.model.n_heads} heads, vocab {len(tok)}, seq {cfg.model.seq_len}; eval_rows {sec.eval_rows}, "
          f"accuracy_problems {len(data.problems)}, probe_rows {sec.probe_rows}; specialists' T_max "
          f"{[runtime_for(s, cfg.cognate.act_max_steps)['act_max_steps'] for s in specialists(cfg.cognate)]}, "
          f"runtime donor {donor}")
    print(f"  setup (curriculum, BPE, 4 models saved) {setup_s:.1f} s; inputs measured once (the fitness reference) "
          f"{inputs_s:.2f} s")
    print(f"  {'candidate':<34}{'layers':>7}{'merge':>10}{'build':>10}{'eval':>10}{'fitness':>9}  speed/mem")
    rows = []
    for g in genomes:
        misses = len(memo)
        t0 = time.perf_counter()
        state, config = merge_genome(workdir / "gen_base", dirs, g)
        t1 = time.perf_counter()
        model = steps.build_model(state, config)
        t2 = time.perf_counter()
        raw = steps.measure_model(model, data, probe, memo)
        t3 = time.perf_counter()
        score = fit.score(raw, reference, weights)[0]
        measured = "measured" if len(memo) > misses else "memo"
        rows.append((t1 - t0, t2 - t1, t3 - t2))
        print(f"  {g.combo} {g.describe():<32}{config['num_hidden_layers']:>7}{(t1 - t0) * 1000:>8.0f}ms"
              f"{(t2 - t1) * 1000:>8.0f}ms{(t3 - t2) * 1000:>8.0f}ms{score:>9.4f}  {measured}")
        del state, model
    merge_s, build_s, eval_s = (sum(r[i] for r in rows) for i in range(3))
    total = merge_s + build_s + eval_s
    print(f"  {'generation total (8 candidates)':<41}{merge_s:>8.2f}s {build_s:>8.2f}s {eval_s:>8.2f}s"
          f"   = {total:.2f} s")
    print(f"  shares: merge {merge_s / total:.1%}, build {build_s / total:.1%}, evaluation {eval_s / total:.1%}; "
          f"eval/merge = {eval_s / merge_s:.1f}×; median candidate {statistics.median(sum(r) for r in rows):.2f} s")
    return {"merge_s": merge_s, "build_s": build_s, "eval_s": eval_s, "inputs_s": inputs_s}


# ----------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="small", choices=["tiny", "small"], help="preset shape for techniques and mergekit")
    p.add_argument("--gen-size", default="tiny", choices=["tiny", "small"], help="preset for the one-generation timing")
    p.add_argument("--repeats", type=int, default=3,
                   help="technique and candidate times: best of up to this many runs (fewer past 3 s)")
    p.add_argument("--combos", default="0,7", help="full candidates merged with merge_genome at --size ('' to skip)")
    p.add_argument("--no-mergekit", action="store_true", help="skip the mergekit subprocess (our YAML times still shown)")
    p.add_argument("--mergekit-path", default=os.environ.get("MERGEKIT_PATH", "/tmp/mkdeps"),
                   help="a directory with mergekit and its extra dependencies, put on the subprocess' PYTHONPATH")
    p.add_argument("--skip", default="", help="comma list of parts to skip: techniques,mergekit,generation")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads here and in the mergekit subprocess (0: torch's default). On shared busy "
                        "cores one thread avoids OpenMP oversubscription, which slowed 2-thread runs here up to 10×")
    p.add_argument("--workdir", default=None, help="keep the models and outputs here (default: a temp dir, removed)")
    p.add_argument("--mergekit-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mergekit_worker:
        mergekit_worker(args.mergekit_worker)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = args.threads or None
    skip = set(filter(None, args.skip.split(",")))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="evomerge_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    mk_path = None if args.no_mergekit else args.mergekit_path
    if mk_path is not None and not Path(mk_path).is_dir():
        print(f"mergekit: {mk_path} does not exist; install it there (see this file's docstring) or pass --mergekit-path")
        mk_path = None
    print(f"EvoMerge bench: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    t_all = time.perf_counter()
    figures: dict = {"bench": "evomerge", "size": args.size, "device": "cpu", "threads": torch.get_num_threads(),
                     "torch": torch.__version__}
    try:
        if "techniques" not in skip:
            rows = bench_techniques(_shape(args.size), args.repeats, workdir,
                                    [int(x) for x in args.combos.split(",") if x.strip()])
            figures["technique_s"] = {name: round(t, 4) for name, t, _ in rows}
            figures["technique_vs_linear"] = {name: round(t / rows[0][1], 2) for name, t, _ in rows}
        if "mergekit" not in skip:
            rows = bench_mergekit(_shape(args.size), workdir, mk_path, args.threads, args.repeats)
            figures["ours_s"] = {k: round(ours, 4) for k, ours, _, _ in rows}
            if all(mk is not None for _, _, mk, _ in rows):
                figures["mergekit_s"] = {k: round(mk, 4) for k, _, mk, _ in rows}
                figures["ours_over_mergekit"] = {k: round(ours / mk, 3) for k, ours, mk, _ in rows}
                figures["speedup_vs_mergekit"] = {k: round(mk / ours, 2) for k, ours, mk, _ in rows}
                figures["max_abs_diff"] = {k: diff for k, _, _, diff in rows}
        if "generation" not in skip:
            figures["generation"] = bench_generation(_shape(args.gen_size), workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    figures["wall_s"] = round(time.perf_counter() - t_all, 1)
    print(f"\nbench wall time {figures['wall_s']:.0f} s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
