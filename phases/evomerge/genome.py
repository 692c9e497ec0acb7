"""A candidate is a recipe: which technique each stage uses and with what parameters. The recipe is
the candidate's identity: the same recipe gives the same model and is evaluated once.

    stage 1  interpolation   M1 = linear(A, B, C; w)        or  slerp(slerp(A, B), C)  (bit 0)
    stage 2  task arithmetic M2 = (1 − β) M1 + β · TM(base; A, B, C; w, density)       (bit 1: TIES or DARE)
    stage 3  selection       layers of {M2, A, B, C} by FrankenMerge pattern or DFS path (bit 2)

Stage 2 blends the interpolation with the task-arithmetic merge (β = ``blend``), so every stage
shapes the result and β = 1 is exactly mergekit's TIES/DARE on the shared base. Stage 3 takes
embeddings, final norm and heads from M2; a layer source 0 is M2, 1–3 are the inputs A, B, C.
Runtime settings (Cognate's recursion bound, window, memory scales) come from input ``runtime_from``.

Genes a combination does not use (a FrankenMerge pattern when bit 2 picks DFS) stay in the genome, so
a later bit flip can use them, but are left out of ``recipe()``, the identity.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.hashing import canonical_json, recipe_key

INTERPOLATION = ("linear", "slerp")
TASK_ARITHMETIC = ("ties", "dare")
SELECTION = ("frankenmerge", "dfs")
N_INPUTS = 3
N_SOURCES = N_INPUTS + 1  # stage 3 draws layers from M2 and the three inputs


def techniques(combo: int) -> tuple[str, str, str]:
    if not 0 <= combo < 8:
        raise ValueError(f"combo {combo} is not a 3-bit number")
    return INTERPOLATION[combo & 1], TASK_ARITHMETIC[(combo >> 1) & 1], SELECTION[(combo >> 2) & 1]


class Genome(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    combo: int = Field(ge=0, le=7)
    weights: tuple[float, float, float]
    density: float = Field(gt=0, le=1)
    blend: float = Field(ge=0, le=1)
    pattern: tuple[int, ...]
    path: tuple[tuple[int, int, float], ...]
    runtime_from: int = Field(ge=0, lt=N_INPUTS)
    seed: int = 0
    origin: str = Field(default="seed", description="how it was made; not part of the identity")

    @model_validator(mode="before")
    @classmethod
    def _canonical(cls, data: Any) -> Any:
        """Weights normalised to sum 1 and every float rounded to 6 decimals, so the genome *is* its
        recipe: what is merged is exactly what is hashed and exported."""
        if isinstance(data, dict):
            data = dict(data)
            w = [float(x) for x in data.get("weights", ())]
            if w and sum(w) > 0 and min(w) >= 0:
                data["weights"] = tuple(round(x / sum(w), 6) for x in w)
            for k in ("density", "blend"):
                if k in data:
                    data[k] = round(float(data[k]), 6)
            if "path" in data:
                data["path"] = tuple((int(s), int(layer), round(float(c), 6)) for s, layer, c in data["path"])
        return data

    @field_validator("weights")
    @classmethod
    def _positive(cls, w: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"merge weights must be non-negative with a positive sum, got {w}")
        return w

    def recipe(self) -> dict[str, Any]:
        """The identity: the techniques and only the parameters they use, rounded so that float noise
        below 1e-6 does not make a new candidate."""
        interp, task, select = techniques(self.combo)
        w = list(self.weights)
        r: dict[str, Any] = {
            "combo": self.combo,
            "interpolation": {"method": interp, "weights": w},
            "task_arithmetic": {"method": task, "weights": w, "density": self.density, "blend": self.blend},
            "runtime_from": self.runtime_from,
        }
        if self.blend == 0:  # stage 2 is the identity: its technique and parameters do not matter
            r["task_arithmetic"] = {"blend": 0.0}
        elif task == "dare":
            r["task_arithmetic"]["seed"] = self.seed
        if select == "frankenmerge":
            r["selection"] = {"method": "frankenmerge", "pattern": list(self.pattern)}
        else:
            r["selection"] = {"method": "dfs", "path": [list(step) for step in self.path]}
        return r

    def key(self) -> str:
        return recipe_key("evomerge-candidate", [], self.recipe(), "1")

    def describe(self) -> str:
        return "+".join(techniques(self.combo))


def default_pattern(n_layers: int, rng: random.Random) -> tuple[int, ...]:
    """Half the layers from M2, the rest from a random input."""
    return tuple(0 if rng.random() < 0.5 else rng.randint(1, N_INPUTS) for _ in range(n_layers))


def default_path(n_layers: int, rng: random.Random) -> tuple[tuple[int, int, float], ...]:
    """M2's stack with one layer swapped for an input's and one step inserted or dropped."""
    path = [(0, i, 1.0) for i in range(n_layers)]
    i = rng.randrange(n_layers)
    path[i] = (rng.randint(1, N_INPUTS), i, 1.0)
    if n_layers > 1 and rng.random() < 0.5:
        del path[rng.randrange(len(path))]
    else:
        j = rng.randrange(n_layers)
        path.insert(j + 1, (rng.randrange(N_SOURCES), j, 1.0))
    return tuple(path)


def input_genome(i: int, n_layers: int, path: tuple[tuple[int, int, float], ...], seed: int) -> Genome:
    """The recipe that gives input ``i`` back bit for bit: all its weight, no task arithmetic, every layer
    from the interpolation, its own runtime settings."""
    weights = tuple(1.0 if j == i else 0.0 for j in range(N_INPUTS))
    return Genome(combo=0, weights=weights, density=0.5, blend=0.0, pattern=(0,) * n_layers, path=path,
                  runtime_from=i, seed=seed, origin=f"input-{i}")


def generation_zero(n_layers: int, runtime_from: int, seed: int) -> list[Genome]:
    """The 8 binary combinations with equal weights, density 0.5 and blend 0.5, then the three inputs
    themselves. The pattern and path are drawn once and shared, so the 8 differ only in their techniques.
    With the inputs in the population the champion is never worse than the best of them, mutants of an input
    search the merges near it, and a champion that is an input says, plainly, that no merge beat it."""
    rng = random.Random(seed)
    pattern, path = default_pattern(n_layers, rng), default_path(n_layers, rng)
    combos = [Genome(combo=c, weights=(1.0, 1.0, 1.0), density=0.5, blend=0.5, pattern=pattern, path=path,
                     runtime_from=runtime_from, seed=seed, origin=f"combo-{c}") for c in range(8)]
    return combos + [input_genome(i, n_layers, path, seed) for i in range(N_INPUTS)]


def _clip(x: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, x))


def mutate(g: Genome, rng: random.Random, sigma: float, n_layers: int, origin: str) -> Genome:
    """Gaussian noise on the weights, density and blend; with small probabilities, a changed layer
    source, a DFS step inserted or removed, a rescaled DFS input, another runtime donor."""
    weights = tuple(max(0.05, w * (1 + rng.gauss(0, sigma))) for w in g.weights)
    density = _clip(g.density + rng.gauss(0, sigma), 0.05, 1.0)
    blend = _clip(g.blend + rng.gauss(0, sigma), 0.0, 1.0)
    pattern = list(g.pattern)
    if rng.random() < 0.3:
        pattern[rng.randrange(n_layers)] = rng.randrange(N_SOURCES)
    path = [list(step) for step in g.path]
    r = rng.random()
    if r < 0.15 and len(path) < 2 * n_layers:
        j = rng.randrange(n_layers)
        path.insert(rng.randrange(len(path) + 1), [rng.randrange(N_SOURCES), j, 1.0])
    elif r < 0.3 and len(path) > max(1, n_layers // 2):
        del path[rng.randrange(len(path))]
    elif r < 0.5:
        step = rng.choice(path)
        step[0] = rng.randrange(N_SOURCES)
    for step in path:
        step[2] = _clip(step[2] * (1 + rng.gauss(0, sigma / 2)), 0.5, 1.5)
    runtime_from = rng.randrange(N_INPUTS) if rng.random() < 0.1 else g.runtime_from
    return _with(g, {
        "weights": weights, "density": density, "blend": blend, "pattern": tuple(pattern),
        "path": tuple((int(s), int(layer), float(c)) for s, layer, c in path), "runtime_from": runtime_from,
        "seed": rng.getrandbits(31), "origin": origin,
    })


def merge_genomes(group: list[Genome], rng: random.Random, origin: str) -> Genome:
    """Loser merging, in recipe space: the child's continuous genes are the group's means, each combo
    bit and each layer source is the majority's (ties broken at random), its DFS path is the fittest
    member's (``group`` comes sorted by fitness, best first)."""
    n = len(group)
    bits = 0
    for b in range(3):
        ones = sum((g.combo >> b) & 1 for g in group)
        if ones * 2 > n or (ones * 2 == n and rng.random() < 0.5):
            bits |= 1 << b
    weights = tuple(sum(g.weights[i] for g in group) / n for i in range(N_INPUTS))
    pattern = []
    for i in range(len(group[0].pattern)):
        votes = [g.pattern[i] for g in group]
        best = max(votes.count(v) for v in set(votes))
        pattern.append(rng.choice(sorted(v for v in set(votes) if votes.count(v) == best)))
    donors = [g.runtime_from for g in group]
    return _with(group[0], {
        "combo": bits, "weights": weights, "density": sum(g.density for g in group) / n,
        "blend": sum(g.blend for g in group) / n, "pattern": tuple(pattern),
        "runtime_from": max(set(donors), key=donors.count), "seed": rng.getrandbits(31), "origin": origin,
    })


def _with(g: Genome, update: dict[str, Any]) -> Genome:
    """A changed copy that is validated (and so canonicalised) again; model_copy would skip that."""
    return Genome.model_validate(g.model_dump() | update)


def random_genome(n_layers: int, rng: random.Random, origin: str) -> Genome:
    """A fresh candidate for re-seeding a population that lost its diversity."""
    return Genome(combo=rng.randrange(8), weights=tuple(rng.uniform(0.2, 1.0) for _ in range(N_INPUTS)),
                  density=rng.uniform(0.2, 1.0), blend=rng.uniform(0.0, 1.0), pattern=default_pattern(n_layers, rng),
                  path=default_path(n_layers, rng), runtime_from=rng.randrange(N_INPUTS), seed=rng.getrandbits(31),
                  origin=origin)


def recipe_json(g: Genome) -> str:
    return canonical_json(g.recipe())
