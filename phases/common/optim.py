"""Muon × Grokfast: torch.optim.Muon for hidden 2-D weight matrices, AdamW for everything else.

Muon orthogonalises 2-D updates (Newton-Schulz), which suits hidden projections but not embeddings,
the LM head, norms, gains or biases: those go to AdamW, as Muon's authors recommend.
"""

from __future__ import annotations

import torch

from phases.common.config import MuonGrokfastConfig
from phases.common.grokfast import GrokfastEMA


def is_muon_param(name: str, p: torch.nn.Parameter) -> bool:
    lowered = name.lower()
    return p.ndim == 2 and not any(s in lowered for s in ("embed", "wte", "wpe", "lm_head", "norm", "persistent"))


class MuonGrokfast:
    """One step(): Grokfast filter on all gradients, then Muon and AdamW steps."""

    def __init__(self, model: torch.nn.Module, cfg: MuonGrokfastConfig | None = None):
        cfg = cfg or MuonGrokfastConfig()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        muon = [p for n, p in named if is_muon_param(n, p)]
        other = [p for n, p in named if not is_muon_param(n, p)]
        self.optimizers: list[torch.optim.Optimizer] = []
        if muon:
            self.optimizers.append(torch.optim.Muon(muon, lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
        if other:
            self.optimizers.append(torch.optim.AdamW(other, lr=cfg.adam_lr, weight_decay=cfg.weight_decay))
        self.grokfast = GrokfastEMA([p for _, p in named], cfg.grokfast_alpha, cfg.grokfast_lambda)
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        self.n_muon, self.n_adam = sum(p.numel() for p in muon), sum(p.numel() for p in other)

    def scale_lr(self, factor: float) -> None:
        """Every group's learning rate set to ``factor`` × the configured one (a schedule's value)."""
        for opt, bases in zip(self.optimizers, self.base_lrs):
            for group, base in zip(opt.param_groups, bases):
                group["lr"] = base * factor

    def step(self) -> None:
        self.grokfast.apply()
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers], "grokfast": self.grokfast.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        self.grokfast.load_state_dict(state["grokfast"])


def linear_decay(step: int, total: int, decay_fraction: float, floor: float) -> float:
    """A stable-then-decay schedule (warmup-stable-decay without the warmup): the learning-rate factor at
    ``step`` (1-based) of ``total``: 1 until the last ``decay_fraction`` of the steps, then linearly down to
    ``floor`` at the last step."""
    start = total * (1 - decay_fraction)
    if decay_fraction <= 0 or step <= start:
        return 1.0
    return max(floor, 1 - (1 - floor) * (step - start) / max(1e-9, total - start))
