"""State diagnostics for a Cognate model and the go/no-go verdict on them; each runs the model's real forward
on tokens.

D1 state divergence   ‖W‖_F of each layer's memory state, traced span by span through the decode cache over a
                      sequence several shards long. FAIL when it grows past 10× its value after the first
                      ``early_tokens`` tokens.
D2 state collapse     the effective rank of the memory reads across positions and inputs, and the dispersion of
                      different inputs' states at the same position. FAIL on one read, or one state, for every
                      input.
D3 component interaction
                      gradient coupling: per layer, the gradient norm of attention's output projection over the
                      memory's (o_proj against mem_out: the two paths' matching d×d maps into the residual stream)
                      on an LM loss; balanced below 2.5×, FAIL above 5×.
                      information flow: each path's share of what the MAG mix adds to the residual stream,
                      ‖g ⊙ a‖ against ‖(1 − g) ⊙ m‖ per token; healthy above 20%, FAIL below 5%.
D4 long-range dependency
                      a code stated at distances from inside the attention window to 256 tokens beyond it, then
                      asked for; exact-answer accuracy by distance, and the same problems with the memory read
                      zeroed as the control (a paired test). PASS when recall beyond the window beats the control
                      significantly (McNemar p < 0.05).
State health, in [0, 1]: per layer the smaller of a divergence score (1 up to 3× growth, 0 from 10×, linear in
log-growth between) and a collapse score (the read rank and the state dispersion against their healthy
levels); the worst layer counts. GO needs every diagnostic PASS and health above 0.7.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from phases.cognate.modeling import CognateCache, CognateForCausalLM
from phases.common.measure import difference_interval, mcnemar_p, teacher_forced_hits, wilson_interval
from phases.data import curriculum

# The go/no-go criteria: (pass when, fail when). Between the two a diagnostic is WARN, which is not a GO.
MAX_GROWTH = 10.0  # D1: ‖W‖ past this multiple of its early value diverges
# D1: up to this multiple the divergence score is 1. Random writes accumulate like a random walk: from token 256
# to the end of a 2048-token shard that is √8 ≈ 2.8×
HEALTHY_GROWTH = 3.0
COUPLING = (2.5, 5.0)  # D3: gradient-norm ratio between the paths
FLOW = (0.20, 0.05)  # D3: the smaller path's share of the mix
# D2: an untrained tiny model's reads have an effective rank of ~0.3·d and its inputs' states a dispersion of ~0.7;
# one read for everything has rank 1 (1/d) and one state for every input dispersion 0
HEALTHY_RANK, MIN_RANK = 0.10, 0.02  # effective rank of the reads as a fraction of d
HEALTHY_DISPERSION, MIN_DISPERSION = 0.25, 0.05
MIN_HEALTH = 0.7
SIGNIFICANCE = 0.05


@dataclass
class Diagnosis:
    name: str
    window: int
    d1: dict[str, Any] = field(default_factory=dict)
    d2: dict[str, Any] = field(default_factory=dict)
    d3: dict[str, Any] = field(default_factory=dict)
    d4: dict[str, Any] = field(default_factory=dict)
    health: float = math.nan
    rows: list[dict[str, Any]] = field(default_factory=list)  # the go/no-go table
    verdict: str = "NO-GO"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- probe data
def probe_ids(tokenizer, n_tokens: int, seed: int) -> list[int]:
    """``n_tokens`` tokens of the curriculum's hardest rung (every skill), EOS between examples."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        for ex in curriculum.generate_stage("advanced", "test", max(8, n_tokens // 40), seed, set()):
            ids += tokenizer.encode(ex["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
        seed += 1
    return ids[:n_tokens]


def _batch(tokenizer, inputs: int, n_tokens: int, seed: int) -> torch.Tensor:
    return torch.tensor([probe_ids(tokenizer, n_tokens, seed + 7 * i) for i in range(inputs)])


# ----------------------------------------------------------------------------- D1 + D2
class _Reads:
    """Forward hooks on every layer's NeuralMemory: its read y, kept at every ``stride``-th position."""

    def __init__(self, model: CognateForCausalLM, stride: int):
        self.layers = list(model.model.layers)
        self.stride, self.rows = stride, {li: [] for li in range(len(self.layers))}
        self.handles = [layer.memory.register_forward_hook(self._hook(li)) for li, layer in enumerate(self.layers)]
        self.offset = 0  # position of the current span's first token

    def _hook(self, li: int):
        def keep(_module, _args, y: torch.Tensor) -> None:
            first = (-self.offset) % self.stride
            self.rows[li].append(y[:, first::self.stride].reshape(-1, y.shape[-1]).float().cpu())
        return keep

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy and Vetterli): 1 for one direction, d for
    isotropic rows; 0 for all-zero rows."""
    s = singular_values
    if float(s.sum()) == 0.0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def trace_states(model: CognateForCausalLM, ids: torch.Tensor, span: int, early_tokens: int,
                 max_rows: int = 4096) -> tuple[dict[str, Any], dict[str, Any]]:
    """(D1, D2) from one pass over ``ids`` (inputs × tokens) through the decode cache, ``span`` tokens a call."""
    cfg = model.config
    n_layers, B, N = cfg.num_hidden_layers, ids.shape[0], ids.shape[1]
    stride = max(1, math.ceil(B * N * cfg.act_max_steps / max_rows))
    reads = _Reads(model, stride)
    cache = CognateCache()
    positions: list[int] = []
    norms: list[list[float]] = [[] for _ in range(n_layers)]  # per layer: mean ‖W‖ over inputs, worst recursion step
    dispersion: list[list[float]] = [[] for _ in range(n_layers)]
    try:
        for start in range(0, N, span):
            reads.offset = start
            model(ids[:, start:start + span], cache=cache, use_cache=True)
            positions.append(min(N, start + span))
            for li in range(n_layers):
                worst, disp = 0.0, []
                for t in range(cfg.act_max_steps):
                    W = cache.slot(t, li)["mem"].W.float()  # (B, d, d)
                    n = W.flatten(1).norm(dim=1)
                    worst = max(worst, float(n.mean()))
                    energy = float(n.pow(2).mean())
                    if energy > 0 and B > 1:
                        disp.append(math.sqrt(float((W - W.mean(0)).flatten(1).norm(dim=1).pow(2).mean()) / energy))
                norms[li].append(worst)
                if disp:
                    dispersion[li].append(sum(disp) / len(disp))
    finally:
        reads.remove()
    d = cfg.hidden_size
    growth, ranks, disps, spectra = [], [], [], []
    for li in range(n_layers):
        early = next((v for p, v in zip(positions, norms[li]) if p >= early_tokens and v > 0), 0.0)
        peak = max(norms[li])
        growth.append(peak / early if early > 0 else (1.0 if peak == 0 else math.inf))
        s = torch.linalg.svdvals(torch.cat(reads.rows[li]).double())
        ranks.append(effective_rank(s) / d)
        spectra.append((s / s[0]).tolist() if float(s[0]) > 0 else s.tolist())  # for the rank plot
        disps.append(sum(dispersion[li]) / len(dispersion[li]) if dispersion[li] else 0.0)
    d1 = {"positions": positions, "norms": norms, "growth": growth, "worst_growth": max(growth),
          "tokens": N, "shard_length": cfg.shard_length}
    d2 = {"read_rank": ranks, "state_dispersion": disps, "min_read_rank": min(ranks),
          "min_state_dispersion": min(disps), "spectrum": spectra}
    return d1, d2


def _log_linear(x: float, one_at: float, zero_at: float) -> float:
    """1 at or below ``one_at``, 0 at or above ``zero_at``, linear in log x between."""
    if not math.isfinite(x) or x >= zero_at:
        return 0.0
    if x <= one_at:
        return 1.0
    return 1.0 - math.log(x / one_at) / math.log(zero_at / one_at)


def health_score(d1: dict[str, Any], d2: dict[str, Any]) -> float:
    """The worst layer's min(divergence score, collapse score), in [0, 1]."""
    scores = []
    for growth, rank, disp in zip(d1["growth"], d2["read_rank"], d2["state_dispersion"]):
        divergence = _log_linear(growth, HEALTHY_GROWTH, MAX_GROWTH)
        collapse = min(1.0, max(0.0, (rank - MIN_RANK) / (HEALTHY_RANK - MIN_RANK)),
                       max(0.0, (disp - MIN_DISPERSION) / (HEALTHY_DISPERSION - MIN_DISPERSION)))
        scores.append(min(divergence, collapse))
    return min(scores)


# ----------------------------------------------------------------------------- D3
def component_interaction(model: CognateForCausalLM, ids: torch.Tensor) -> dict[str, Any]:
    """Per layer: the gradient-norm ratio o_proj / mem_out on the LM loss of ``ids``, and the memory path's share
    of ‖g ⊙ a‖ + ‖(1 − g) ⊙ m‖ summed over tokens and recursion steps."""
    layers = list(model.model.layers)
    sums = [{"a": [], "m": [], "z": []} for _ in layers]
    handles = []
    for li, layer in enumerate(layers):
        for key, module in (("a", layer.o_proj), ("m", layer.mem_out), ("z", layer.gate_proj)):
            handles.append(module.register_forward_hook(
                lambda _m, _i, out, li=li, key=key: sums[li][key].append(out.detach())))
    was_training = model.training
    model.eval()
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            model(ids, labels=ids).lm_loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    ratio, share = [], []
    for li, layer in enumerate(layers):
        ga, gm = layer.o_proj.weight.grad.norm().item(), layer.mem_out.weight.grad.norm().item()
        ratio.append(max(ga, gm) / min(ga, gm) if min(ga, gm) > 0 else math.inf)
        att = mem = 0.0
        for a, m, z in zip(sums[li]["a"], sums[li]["m"], sums[li]["z"]):
            g = torch.sigmoid(z + model.config.gate_bias)
            att += float((g * a).norm(dim=-1).sum())
            mem += float(((1 - g) * m).norm(dim=-1).sum())
        share.append(mem / (att + mem) if att + mem > 0 else 0.0)
    for n, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(saved[n])
    return {"coupling": ratio, "memory_share": share, "worst_coupling": max(ratio),
            "smallest_share": min(min(s, 1 - s) for s in share)}


# ----------------------------------------------------------------------------- D4
def needle_problems(tokenizer, distance: int, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt ids, answer ids): a code, prose, then the question, with the answer position exactly
    ``distance`` tokens after the code's last token."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        key, code, statement = curriculum.recall_statement(rng)
        s_ids = tokenizer.encode(statement, add_special_tokens=False)
        code_end = len(tokenizer.encode(statement[:-1], add_special_tokens=False)) - 1
        question = curriculum.recall_question(key)
        q_ids = tokenizer.encode(question, add_special_tokens=False)
        full_q = tokenizer.encode(question + " " + code, add_special_tokens=False)
        fill = distance - (len(s_ids) - 1 - code_end) - len(q_ids)
        if fill < 0:
            raise ValueError(f"D4 distance {distance} is shorter than the question itself ({len(q_ids)} tokens)")
        f_ids = tokenizer.encode(" " + curriculum.filler(rng, fill + 8), add_special_tokens=False)
        while len(f_ids) < fill:
            f_ids += tokenizer.encode(" " + curriculum.filler(rng, fill), add_special_tokens=False)
        out.append((s_ids + f_ids[:fill] + q_ids, full_q[len(q_ids):]))
    return out


def long_range(model: CognateForCausalLM, tokenizer, trials: int, beyond: Sequence[int], seed: int) -> dict[str, Any]:
    """D4: accuracy per distance (two inside the window: half of it and seven eighths; the rest ``beyond`` it), with
    and without the memory read."""
    window = model.config.window_size
    distances = [window // 2, window - window // 8] + [window + b for b in beyond]
    own = model.config.mem_read_scale
    rows, pooled_on, pooled_off = [], [], []
    for j, distance in enumerate(distances):
        try:
            problems = needle_problems(tokenizer, distance, trials, seed + 1009 * j)
        except ValueError:
            if distance < window:  # a window shorter than the question has no distance inside it to test
                continue
            raise
        on = teacher_forced_hits(model, problems)
        model.set_runtime(mem_read_scale=0.0)
        try:
            off = teacher_forced_hits(model, problems)
        finally:
            model.set_runtime(mem_read_scale=own)
        inside = distance < window
        rows.append({"distance": distance, "inside_window": inside, "n": trials,
                     "accuracy": sum(on) / trials, "wilson_95": wilson_interval(sum(on), trials),
                     "ablated": sum(off) / trials, "ablated_wilson_95": wilson_interval(sum(off), trials)})
        if not inside:
            pooled_on += on
            pooled_off += off
    n = len(pooled_on)
    acc, abl = sum(pooled_on) / n, sum(pooled_off) / n
    return {"by_distance": rows, "beyond_accuracy": acc, "beyond_ablated": abl, "beyond_n": n,
            "difference": acc - abl,
            "interval": difference_interval(sum(pooled_on), n, sum(pooled_off), n),
            "mcnemar_p": mcnemar_p(pooled_on, pooled_off)}


# ----------------------------------------------------------------------------- the verdict
def _status(value: float, passes: bool, fails: bool) -> str:
    return "FAIL" if fails or not math.isfinite(value) else ("PASS" if passes else "WARN")


def go_no_go(d: Diagnosis) -> None:
    """Fill ``d.rows`` (the table) and ``d.verdict``."""
    growth = d.d1["worst_growth"]
    rank, disp = d.d2["min_read_rank"], d.d2["min_state_dispersion"]
    coupling, share = d.d3["worst_coupling"], d.d3["smallest_share"]
    d4 = d.d4
    d4_pass = d4["difference"] > 0 and d4["mcnemar_p"] < SIGNIFICANCE
    d.rows = [
        {"diagnostic": "D1 state divergence", "measured": f"‖W‖ peak {growth:.3g}× its value at token "
         f"{d.d1.get('early_tokens', '')}".rstrip(), "pass": f"≤ {MAX_GROWTH:g}×", "fail": f"> {MAX_GROWTH:g}×",
         "status": _status(growth, growth <= MAX_GROWTH, growth > MAX_GROWTH)},
        {"diagnostic": "D2 state collapse", "measured": f"read rank {rank:.3f}·d, state dispersion {disp:.3f}",
         "pass": f"rank ≥ {HEALTHY_RANK:g}·d and dispersion ≥ {HEALTHY_DISPERSION:g}",
         "fail": f"rank < {MIN_RANK:g}·d or dispersion < {MIN_DISPERSION:g}",
         "status": _status(min(rank, disp), rank >= HEALTHY_RANK and disp >= HEALTHY_DISPERSION,
                           rank < MIN_RANK or disp < MIN_DISPERSION)},
        {"diagnostic": "State health (D1, D2)", "measured": f"{d.health:.3f}", "pass": f"> {MIN_HEALTH:g}",
         "fail": f"≤ {MIN_HEALTH:g}", "status": "PASS" if d.health > MIN_HEALTH else "FAIL"},
        {"diagnostic": "D3 gradient coupling", "measured": "attention/memory gradient ratio "
         + ", ".join(f"{r:.3g}×" for r in d.d3["coupling"]) + " (per layer)",
         "pass": f"< {COUPLING[0]:g}×", "fail": f"> {COUPLING[1]:g}×",
         "status": _status(coupling, coupling < COUPLING[0], coupling > COUPLING[1])},
        {"diagnostic": "D3 information flow", "measured": "memory's share of the mix "
         + ", ".join(f"{s:.1%}" for s in d.d3["memory_share"]) + " (per layer)",
         "pass": f"each path > {FLOW[0]:.0%}", "fail": f"a path < {FLOW[1]:.0%}",
         "status": _status(share, share > FLOW[0], share < FLOW[1])},
        {"diagnostic": "D4 long-range dependency", "measured": f"beyond the window {d4['beyond_accuracy']:.1%} vs "
         f"{d4['beyond_ablated']:.1%} with the memory read zeroed (n={d4['beyond_n']}, McNemar p = {d4['mcnemar_p']:.3g})",
         "pass": "above the ablated control, p < 0.05", "fail": "not significantly above it",
         "status": "PASS" if d4_pass else "FAIL"},
    ]
    d.verdict = "GO" if all(r["status"] == "PASS" for r in d.rows) else "NO-GO"


def diagnose(model: CognateForCausalLM, tokenizer, name: str, settings) -> Diagnosis:
    """Every diagnostic on ``model`` (left in eval mode, its runtime settings unchanged). ``settings``: a
    CognateDiagnostics."""
    model.eval()
    cfg = model.config
    n_tokens = min(settings.max_tokens, settings.shards * cfg.shard_length)
    ids = _batch(tokenizer, settings.inputs, n_tokens, settings.seed).to(next(model.parameters()).device)
    d1, d2 = trace_states(model, ids, settings.span, settings.early_tokens)
    d1["early_tokens"] = settings.early_tokens
    d = Diagnosis(name=name, window=cfg.window_size, d1=d1, d2=d2)
    d.health = health_score(d1, d2)
    d.d3 = component_interaction(model, ids[:, : settings.coupling_tokens])
    d.d4 = long_range(model, tokenizer, settings.trials, settings.beyond, settings.seed)
    go_no_go(d)
    return d


def markdown(diagnoses: Sequence[Diagnosis]) -> str:
    """The go/no-go table (one block per model), then D4's accuracy by distance."""
    out = []
    for d in diagnoses:
        out.append(f"### {d.name}: {d.verdict}\n\n| diagnostic | measured | PASS | FAIL | status |\n|---|---|---|---|---|\n"
                   + "\n".join(f"| {r['diagnostic']} | {r['measured']} | {r['pass']} | {r['fail']} | {r['status']} |"
                               for r in d.rows))
        out.append(f"\nD4 by distance (window {d.window} tokens):\n\n| distance | accuracy (95%) | memory read zeroed (95%) |\n"
                   "|---|---|---|\n" + "\n".join(
                       f"| {r['distance']}{' (inside)' if r['inside_window'] else ''} | {r['accuracy']:.1%} "
                       f"[{r['wilson_95'][0]:.1%}, {r['wilson_95'][1]:.1%}] | {r['ablated']:.1%} "
                       f"[{r['ablated_wilson_95'][0]:.1%}, {r['ablated_wilson_95'][1]:.1%}] |"
                       for r in d.d4["by_distance"]))
    return "\n\n".join(out)


