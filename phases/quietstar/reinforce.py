"""Quiet-STaR reinforcement (step 2): REINFORCE on the thoughts, a learned mixing head, KL to the baked
model, and anti-theater checks that can stop it.

Per batch of rows x (B, S), with K thoughts of L tokens after every position (thoughts.py):

    reward     r_{i,k} = Σ_{s<n} [ log p_talk(x_{i+1+s} | x_≤i, thought_k) − log p(x_{i+1+s} | x_≤i) ]
    baseline   r̄_i = mean_k r_{i,k}                                    (Zelikman et al., 2024, eq. 5)
    policy     L_π  = −mean_{i,k} (r_{i,k} − r̄_i) · Σ_j log π(t_{i,k,j})   (r detached)
    talk NLL   L_nll = −mean log p_mix(x_{i+1+s} | …),  p_mix from base + w·(talk − base)   (mixing.py)
    KL         L_kl = mean_i KL(p_θ(·|x_≤i) ‖ p_baked(·|x_≤i))   on the direct (no-thought) predictions
    loss       L_nll + L_π + β·L_kl          β: 0.1, the RL preset's weight against drift

p_talk is the prediction right after ``[/endthinking]`` before mixing: the reward scores the thought
itself, so it is informative from the first step (with the mixed prediction it would be 0 while w = 0).
``reward_on: mixed`` scores p_mix instead, and ``positive_advantages`` keeps only advantages above 0 (the
authors' code does both): two switches in settings.py.
The KL acts on the direct predictions: it keeps the language model near the baked one without taxing
the influence thoughts gain through the mixing head (which the anti-theater checks require).

Anti-theater (empty reasoning shows as divergence < 0.3, ablation < 0.02, correlation < 0.5), on
held-out curriculum problems (``text`` = prompt + answer), answer positions = the positions predicting
the answer's tokens, the thought after each position greedy:
- divergence: mean total-variation distance ½·Σ|p_mix − p_direct| over answer positions;
- ablation: teacher-forced answer accuracy with thoughts minus without (a problem is right when the
  argmax at every answer position is the answer's token);
- correlation: at the position before the answer, ``theater.eval_thoughts`` sampled thoughts per problem;
  quality = the thought's reward over the answer tokens, correct = the mixed argmax gets every answer
  token right after that thought; both centred per problem, then the pooled Pearson correlation (0 when
  either has no variance: a correctness no thought changes is not explained by thoughts).
A thought-blind model (w ≡ 0) scores 0 on all three.

On a failed check: roll back to the last checkpoint that passed (or the start), double β, retry with
fresh batches; after ``theater.max_retries`` the run stops on the last weights that passed (the baked model
with w = 0 when none did: tiny, seed 0, the weights the failed check measured took the baked model's arithmetic
test from 52% to 22% with thoughts on), and the gates measure that model; the figures of the check that
stopped it are kept in ``stopped``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from phases.cognate.modeling import CognateForCausalLM
from phases.common.checkpoints import CheckpointManager
from phases.common.grokfast import GrokfastEMA
from phases.common.optim import MuonGrokfast
from phases.common.telemetry import TelemetryWriter
from phases.quietstar.baking import encode
from phases.quietstar.mixing import mix
from phases.quietstar.model import QuietStarForCausalLM, outside_thinking
from phases.quietstar.settings import Reinforcement
from phases.quietstar.thoughts import ThoughtPass, ThoughtSpec, parallel_thoughts


class ReinforceError(RuntimeError):
    pass


POLICY_WEIGHT = 1.0
CLIP_NORM = 1.0


def thought_spec(settings: Reinforcement, model: QuietStarForCausalLM, count: int, greedy: bool = False,
                 n_true: int | None = None) -> ThoughtSpec:
    """``count`` thoughts after every position, as long as the model was built for."""
    cfg = model.config
    return ThoughtSpec(count=count, length=cfg.thought_length, n_true=n_true or settings.n_true,
                       start_id=cfg.thought_start_id, end_id=cfg.thought_end_id, temperature=settings.temperature,
                       greedy=greedy, banned=tuple(cfg.thought_banned))


# ------------------------------------------------------------------ the objective
@dataclass
class Scored:
    """Mixed and unmixed log-likelihoods of the true continuation, per (b, k, i, s)."""

    tp: ThoughtPass
    w: torch.Tensor  # (B, K, S, n) mixing weight
    mixed: torch.Tensor  # (B, K, S, n, V) mixed logits
    base_at: torch.Tensor  # (B, S, n, V) direct logits for the same tokens
    lp_mix: torch.Tensor  # (B, K, S, n)
    lp_talk: torch.Tensor  # (B, K, S, n)
    lp_base: torch.Tensor  # (B, S, n)
    valid: torch.Tensor  # (B, S, n) float

    @property
    def reward(self) -> torch.Tensor:
        """(B, K, S) gain in log-likelihood of the next n true tokens from the thought."""
        return self.reward_on("talk")

    def reward_on(self, which: str) -> torch.Tensor:
        """The gain scored on the prediction right after the thought ('talk') or after mixing ('mixed')."""
        lp = {"talk": self.lp_talk, "mixed": self.lp_mix}[which]
        return ((lp - self.lp_base[:, None]) * self.valid[:, None]).sum(-1)


def score(model: QuietStarForCausalLM, x: torch.Tensor, spec: ThoughtSpec, generator: torch.Generator | None = None,
          forced_w: float | None = None) -> Scored:
    tp = parallel_thoughts(model, x, spec, generator)
    base_at = tp.base_at_talk(tp.base_logits)
    w = model.mixing(tp.base_at_talk(tp.base_hidden)[:, None], tp.talk_hidden)
    outside = outside_thinking(x, spec.start_id, spec.end_id)  # no thought inside a written block (model.py)
    w = w * tp.base_at_talk(outside)[:, None].to(w.dtype)
    if forced_w is not None:
        w = torch.full_like(w, forced_w)
    mixed = mix(base_at[:, None], tp.talk_logits, w)
    tgt = tp.targets.clamp(min=0)
    tk = tgt[:, None].expand_as(w)
    return Scored(
        tp=tp, w=w, mixed=mixed, base_at=base_at,
        lp_mix=torch.log_softmax(mixed.float(), -1).gather(-1, tk[..., None]).squeeze(-1),
        lp_talk=torch.log_softmax(tp.talk_logits.float(), -1).gather(-1, tk[..., None]).squeeze(-1),
        lp_base=torch.log_softmax(base_at.float(), -1).gather(-1, tgt[..., None]).squeeze(-1),
        valid=(tp.targets >= 0).float(),
    )


def reinforce_loss(reward: torch.Tensor, thought_logprobs: torch.Tensor,
                   mask: torch.Tensor | None = None, positive_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE with the per-position mean over thoughts as baseline: reward (B, K, S), log π of each
    thought token (B, K, S, L), mask (B, S) of positions that count; ``positive_only`` zeroes the negative
    advantages. Returns (loss, advantage)."""
    reward = reward.detach()
    advantage = reward - reward.mean(1, keepdim=True)
    if positive_only:
        advantage = advantage.clamp_min(0)
    m = torch.ones_like(reward) if mask is None else mask[:, None].expand_as(reward).to(reward.dtype)
    loss = -(advantage * thought_logprobs.sum(-1) * m).sum() / m.sum().clamp_min(1)
    return loss, advantage


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def quietstar_loss(model: QuietStarForCausalLM, x: torch.Tensor, spec: ThoughtSpec, ref_logits: torch.Tensor | None,
                   kl_weight: float, policy_weight: float = 1.0, generator: torch.Generator | None = None,
                   reward_on: str = "talk", positive_only: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of the module docstring for one batch, and what telemetry records."""
    sc = score(model, x, spec, generator)
    K = spec.count
    vm = sc.valid[:, None].expand_as(sc.lp_mix)
    nll = -(sc.lp_mix * vm).sum() / vm.sum().clamp_min(1)
    reward = sc.reward_on(reward_on).detach()
    has_target = sc.valid[:, :, 0]
    policy, advantage = reinforce_loss(reward, sc.tp.thought_logprobs, has_target, positive_only)
    has_target = has_target[:, None].expand_as(advantage)
    kl = kl_to_reference(sc.tp.base_logits, ref_logits) if ref_logits is not None else torch.zeros(())
    loss = nll + policy_weight * policy + kl_weight * kl
    stats = {"loss": loss.item(), "nll_mixed": nll.item(), "policy": policy.item(), "kl": kl.item(),
             "reward_mean": float((reward * has_target).sum() / has_target.sum().clamp_min(1)),
             "advantage_abs": float((advantage.abs() * has_target).sum() / has_target.sum().clamp_min(1)),
             "mixing_weight": float((sc.w.detach() * vm).sum() / vm.sum().clamp_min(1)), "thoughts": K}
    return loss, stats


def answer_windows(problems: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Training rows for reinforcement: the problems' texts joined by EOS, one row per problem made of
    the ``seq_len`` tokens that end with its answer and EOS, so every row holds the positions where a
    thought can help most (before the answer) next to ordinary text."""
    stream: list[int] = []
    rows = []
    for p in problems:
        stream += tokenizer.encode(p["text"], add_special_tokens=False) + [tokenizer.eos_token_id]
        if len(stream) >= seq_len:
            rows.append(stream[len(stream) - seq_len:])
    if not rows:
        raise ReinforceError(f"{len(problems)} problems give fewer than {seq_len} tokens: no reinforcement row")
    return torch.tensor(rows)


# ------------------------------------------------------------------ anti-theater
@dataclass
class TheaterProblem:
    ids: torch.Tensor  # (1, S) prompt + answer tokens
    prompt_len: int


def theater_problems(problems: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> list[TheaterProblem]:
    out = []
    for p in problems:
        e = encode({"text": p["text"], "prompt": p["prompt"]}, tokenizer)
        if 0 < e.prompt_len < len(e.ids):
            out.append(TheaterProblem(torch.tensor([e.ids]), e.prompt_len))
    if not out:
        raise ReinforceError("no held-out problem has both a prompt and an answer to check thoughts on")
    return out


def _pearson(a: list[float], b: list[float]) -> float:
    n = len(a)
    if n < 2:
        return 0.0
    ma, mb = sum(a) / n, sum(b) / n
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    if va <= 1e-12 or vb <= 1e-12:
        return 0.0
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / math.sqrt(va * vb)


@torch.no_grad()
def anti_theater(model: QuietStarForCausalLM, problems: Sequence[TheaterProblem], settings: Reinforcement,
                 forced_w: float | None = None, seed: int = 0) -> dict[str, Any]:
    """The three checks of the module docstring; ``forced_w`` pins the mixing weight (0: thoughts ignored)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    tv, right_with, right_without, quality, correct = [], 0, 0, [], []
    for p in problems:
        x, a = p.ids, p.prompt_len
        answer = x[0, a:]
        at = torch.arange(a - 1, x.shape[1] - 1)  # positions predicting the answer tokens
        sc = score(model, x, thought_spec(settings, model, 1, greedy=True, n_true=1), forced_w=forced_w)
        p_mix = torch.softmax(sc.mixed[0, 0, at, 0].float(), -1)
        p_dir = torch.softmax(sc.base_at[0, at, 0].float(), -1)
        tv += (0.5 * (p_mix - p_dir).abs().sum(-1)).tolist()
        right_with += bool((p_mix.argmax(-1) == answer).all())
        right_without += bool((p_dir.argmax(-1) == answer).all())
        n = min(len(answer), settings.n_true)
        sc = score(model, x[:, : a + n], thought_spec(settings, model, settings.theater.eval_thoughts, n_true=n),
                   generator=g, forced_w=forced_w)
        q = sc.reward[0, :, a - 1]  # (K,)
        ok = (sc.mixed[0, :, a - 1].argmax(-1) == answer[:n]).all(-1).float()  # (K,)
        quality += (q - q.mean()).tolist()
        correct += (ok - ok.mean()).tolist()
    model.train(was_training)
    m = {"divergence": sum(tv) / len(tv), "accuracy_with_thoughts": right_with / len(problems),
         "accuracy_without_thoughts": right_without / len(problems),
         "correlation": _pearson(quality, correct), "problems": len(problems)}
    m["ablation"] = m["accuracy_with_thoughts"] - m["accuracy_without_thoughts"]
    t = settings.theater
    m["passed"] = (m["divergence"] > t.min_divergence and m["ablation"] > t.min_ablation
                   and m["correlation"] > t.min_correlation)
    return m


# ------------------------------------------------------------------ the loop
class _Optimizer:
    """Muon × Grokfast for the backbone; AdamW + Grokfast for the mixing head (an output head, which
    Muon's authors leave to AdamW, like the LM head)."""

    def __init__(self, model: QuietStarForCausalLM, s: Reinforcement):
        self.backbone = MuonGrokfast(model.model, s.optim)
        head = list(model.mixing.parameters())
        self.head = torch.optim.AdamW(head, lr=s.mixing_lr, weight_decay=0.0)
        self.head_grokfast = GrokfastEMA(head, s.optim.grokfast_alpha, s.optim.grokfast_lambda)

    def step(self) -> None:
        self.backbone.step()
        self.head_grokfast.apply()
        self.head.step()

    def zero_grad(self) -> None:
        self.backbone.zero_grad()
        self.head.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"backbone": self.backbone.state_dict(), "head": self.head.state_dict(),
                "head_grokfast": self.head_grokfast.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.backbone.load_state_dict(s["backbone"])
        self.head.load_state_dict(s["head"])
        self.head_grokfast.load_state_dict(s["head_grokfast"])


def reinforce(model: QuietStarForCausalLM, baked: CognateForCausalLM, rows: torch.Tensor,
              problems: Sequence[TheaterProblem], settings: Reinforcement, thought_count: int, seed: int,
              workdir: Path, on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``model`` in place with ``thought_count`` thoughts after every position; ``baked`` is the
    frozen KL reference. Resumable from ``workdir``: the latest checkpoint is always the last one whose
    anti-theater check passed (or the start)."""
    if thought_count < 2:
        raise ValueError(f"thought_count must be >= 2: the REINFORCE baseline is the mean over a position's "
                         f"thoughts, so with {thought_count} every advantage is 0")
    workdir = Path(workdir)
    if len(rows) < 1:
        raise ReinforceError("no training rows for reinforcement")
    ckpts = CheckpointManager(workdir / "checkpoints", keep_last=2, max_rollbacks=10**9)
    telemetry = TelemetryWriter(workdir / "telemetry.jsonl")
    state_file = workdir / "rl_state.json"
    opt = _Optimizer(model, settings)
    baked.eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    spec = thought_spec(settings, model, thought_count)

    # What happened so far, as an unbroken run would have it at its latest durable point: the checks, rollbacks,
    # KL weight, steps run and telemetry lines. It is written to the state file after a rollback and into each
    # checkpoint; a resume takes the newer of the two (by ``saves``) and drops the telemetry written after it.
    state = {"kl_weight": settings.kl_weight, "retries": 0, "checks": [], "rollbacks": [], "steps_run": 0,
             "telemetry_lines": 0, "saves": 0}
    latest = ckpts.latest(model)
    if latest is None:
        ckpts.save(0, model, opt.state_dict(), 0.0, extra={"good": True, "state": state})
        step = 1
    else:
        opt.load_state_dict(latest[0])
        step = latest[1]["step"] + 1
        saved = [latest[1]["state"]] + ([json.loads(state_file.read_text())] if state_file.exists() else [])
        state = max(saved, key=lambda st: st["saves"])
        telemetry.truncate(state["telemetry_lines"])

    def durable() -> dict:
        """The state as of now, one save newer: what a checkpoint or the state file records."""
        state["saves"] += 1
        state["telemetry_lines"] = telemetry.lines
        return state

    def save_state() -> None:
        state_file.write_text(json.dumps(durable()))

    t0 = time.perf_counter()
    model.train()
    while step <= settings.steps and not state.get("ended"):
        g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * state["retries"] + step)
        x = rows[torch.randint(len(rows), (settings.batch_size,), generator=g)]
        with torch.no_grad():
            ref_logits = baked(x).logits
        loss, stats = quietstar_loss(model, x, spec, ref_logits, state["kl_weight"], POLICY_WEIGHT, g,
                                     settings.reward_on, settings.positive_advantages)
        if not math.isfinite(loss.item()):
            raise ReinforceError(f"non-finite Quiet-STaR loss at step {step} ({stats}): "
                                 "lower rl.optim.adam_lr / rl.optim.muon_lr")
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, CLIP_NORM))
        opt.step()
        opt.zero_grad()
        state["steps_run"] += 1
        record = {"step": step, "lm_loss": stats["nll_mixed"], "grad_norm": grad_norm, "kl_weight": state["kl_weight"],
                  "lr": settings.optim.adam_lr, "rollback_count": state["retries"], **stats}
        if step % settings.theater.check_every == 0 or step == settings.steps:
            check = anti_theater(model, problems, settings, seed=seed + step)
            state["checks"].append(check | {"step": step, "kl_weight": state["kl_weight"]})
            record["theater"] = check
            telemetry.write(**record)
            if check["passed"]:
                ckpts.save(step, model, opt.state_dict(), stats["nll_mixed"], extra={"good": True, "state": durable()})
            elif state["retries"] < settings.theater.max_retries:
                state["retries"] += 1
                state["kl_weight"] *= 2
                opt_state, meta = ckpts.latest(model)
                opt.load_state_dict(opt_state)
                state["rollbacks"].append({"at_step": step, "to_step": meta["step"], "new_kl_weight": state["kl_weight"],
                                           "failed": {k: check[k] for k in ("divergence", "ablation", "correlation")}})
                telemetry.write(step=step, event="anti-theater failed: rolled back, KL doubled",
                                rollback_count=state["retries"], kl_weight=state["kl_weight"])
                save_state()
                step = meta["step"] + 1
                continue
            else:
                # Out of retries: the model that ships is the last one that passed (the baked model, thoughts
                # weighted 0, when none did), so a failed reinforcement costs no accuracy downstream. The
                # check that stopped it stays in the record; the final check measures what ships.
                opt_state, meta = ckpts.latest(model)
                opt.load_state_dict(opt_state)
                state["stopped"] = {"at_step": step, "kept_step": meta["step"],
                                    "failed": {k: check[k] for k in ("divergence", "ablation", "correlation")}}
                telemetry.write(step=step, event=f"anti-theater failed: retries used up; the weights of step "
                                                 f"{meta['step']} are kept")
                state["checks"].append(anti_theater(model, problems, settings, seed=seed + step)
                                       | {"step": step, "kl_weight": state["kl_weight"], "kept_step": meta["step"]})
                # ended and saved: a resume ends here too instead of running the step again
                state["ended"] = True
                ckpts.save(step, model, opt.state_dict(), stats["nll_mixed"], extra={"good": False, "state": durable()})
                break
        else:
            telemetry.write(**record)
        if on_progress is not None:
            on_progress(record | {"total_steps": settings.steps})
        step += 1
    # the last check an unbroken run made; a run resumed after it finds it in its state
    last_check = state["checks"][-1] if state["checks"] else (
        anti_theater(model, problems, settings, seed=seed) | {"step": step - 1, "kl_weight": state["kl_weight"]})
    return {"final_check": last_check, "checks": state["checks"], "rollbacks": state["rollbacks"],
            "stopped": state.get("stopped"),
            "retries": state["retries"], "kl_weight_final": state["kl_weight"], "steps_run": state["steps_run"],
            "train_seconds": time.perf_counter() - t0, "telemetry": str(telemetry.path)}
