"""The genetic algorithm over merge recipes, resumable at any point.

Generation 0 is the 8 binary combinations. Each later generation keeps the 2 fittest (elites), adds
3 Gaussian mutants of each, and merges the 6 least fit, in two groups of 3, into 2 children (loser
merging), so a population is 2 + 6 + 2 = 10 (the defaults of the ``search`` block, settings.py). When
the population's diversity falls below ``reseed_below`` its weakest members are replaced by fresh random
recipes. It stops after ``generations`` or when the best fitness of the last ``patience`` generations
improved by less than ``min_improvement``.

Everything is written as it happens, under ``state_dir``:
- evaluations.jsonl: one line per evaluated recipe (raw measurements), appended as each finishes;
- generations.jsonl: one line per finished generation (its population, fitness, diversity).
A run killed at generation k replays the recorded generations without evaluating anything, continues
at k, and takes every recipe evaluated before the kill from evaluations.jsonl.
"""

from __future__ import annotations

import json
import os
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phases.evomerge import fitness as fit
from phases.evomerge.genome import Genome, generation_zero, merge_genomes, mutate, random_genome
from phases.evomerge.settings import EvoMergeSearch

# evaluate(genomes) yields (genome, raw measurements) as each finishes, in any order.
Evaluate = Callable[[list[Genome]], Iterable[tuple[Genome, dict[str, Any]]]]


@dataclass
class Scored:
    genome: Genome
    raw: dict[str, Any]
    fitness: float
    parts: dict[str, float]

    def row(self) -> dict[str, Any]:
        return {"key": self.genome.key(), "techniques": self.genome.describe(), "origin": self.genome.origin,
                "recipe": self.genome.recipe(), "genome": self.genome.model_dump(mode="json"),
                "fitness": self.fitness, "components": self.parts,
                "raw": {k: v for k, v in self.raw.items() if k != "predictions"}}


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: that evaluation simply runs again
            break
    return out


class Evolution:
    """``seed``: the run's seed; every generation's random draws derive from it and the generation number."""

    def __init__(self, search: EvoMergeSearch, seed: int, n_layers: int, runtime_from: int, reference: dict[str, float],
                 weights: dict[str, float], state_dir: str | Path, evaluate: Evaluate,
                 log: Callable[[str], None] = print, on_generation: Callable[[dict[str, Any]], None] | None = None):
        self.s, self.seed, self.n_layers, self.runtime_from = search, seed, n_layers, runtime_from
        self.reference, self.weights, self.evaluate, self.log = reference, weights, evaluate, log
        self.on_generation = on_generation
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.evals_path, self.gens_path = self.dir / "evaluations.jsonl", self.dir / "generations.jsonl"
        self.raw: dict[str, dict[str, Any]] = {r["key"]: r["raw"] for r in _read(self.evals_path)}
        self.evaluated_now = 0  # evaluations this process ran (the resume test reads it)

    # -- evaluation with the persistent cache ------------------------------------------------------
    def _score(self, g: Genome) -> Scored:
        raw = self.raw[g.key()]
        f, parts = fit.score(raw, self.reference, self.weights)
        return Scored(g, raw, f, parts)

    def _evaluate(self, genomes: list[Genome], generation: int) -> list[Scored]:
        todo = list({g.key(): g for g in genomes if g.key() not in self.raw}.values())
        for g, raw in self.evaluate(todo) if todo else ():
            self.raw[g.key()] = raw
            self.evaluated_now += 1
            _append(self.evals_path, {"key": g.key(), "generation": generation, "raw": raw,
                                      "genome": g.model_dump(mode="json")})
        return sorted((self._score(g) for g in genomes), key=lambda s: -s.fitness)

    # -- one generation ----------------------------------------------------------------------------
    def _next(self, ranked: list[Scored], generation: int) -> list[Genome]:
        rng = random.Random(f"{self.seed}:{generation}")
        elites = [s.genome for s in ranked[: self.s.elites]]
        children = [mutate(e, rng, self.s.mutation_sigma, self.n_layers, f"g{generation}:mutant-of-{e.key()[:8]}")
                    for e in elites for _ in range(self.s.children_per_elite)]
        losers = ranked[-self.s.loser_groups * self.s.loser_group_size:]
        merged = [merge_genomes([s.genome for s in losers[i * self.s.loser_group_size:(i + 1) * self.s.loser_group_size]],
                                rng, f"g{generation}:merged-losers")
                  for i in range(self.s.loser_groups)]
        return elites + children + merged

    def _reseed(self, ranked: list[Scored], generation: int) -> list[Genome]:
        rng = random.Random(f"{self.seed}:{generation}:reseed")
        keep = [s.genome for s in ranked[: len(ranked) - self.s.reseed_count]]
        return keep + [random_genome(self.n_layers, rng, f"g{generation}:reseeded") for _ in range(self.s.reseed_count)]

    def _diversity(self, ranked: list[Scored]) -> float:
        return fit.diversity([s.raw["predictions"] for s in ranked])

    def _stop_reason(self, history: list[dict[str, Any]]) -> str | None:
        p = self.s.patience
        if len(history) > p and history[-1]["best"] - history[-1 - p]["best"] < self.s.min_improvement:
            return (f"early stop after generation {history[-1]['generation']}: best fitness rose by "
                    f"{history[-1]['best'] - history[-1 - p]['best']:.5f} < {self.s.min_improvement} "
                    f"over the last {p} generations")
        return None

    def run(self) -> dict[str, Any]:
        done = _read(self.gens_path)
        if done:
            self.log(f"resuming after generation {done[-1]['generation']} ({len(done)} recorded, "
                     f"{len(self.raw)} recipes already evaluated)")
        ranked: list[Scored] = []
        history: list[dict[str, Any]] = []
        stop_reason = f"completed {self.s.generations} generations"
        for g in range(self.s.generations):
            if g < len(done):  # replay: the recorded population, scored from recorded measurements
                record = done[g]
                ranked = [self._score(Genome.model_validate(r["genome"])) for r in record["population"]]
            else:
                pop = generation_zero(self.n_layers, self.runtime_from, self.seed) if g == 0 else self._next(ranked, g)
                ranked = self._evaluate(pop, g)
                div, reseeded = self._diversity(ranked), 0
                if div < self.s.reseed_below and g > 0:
                    self.log(f"generation {g}: diversity {div:.3f} < {self.s.reseed_below}: re-seeding the "
                             f"{self.s.reseed_count} weakest")
                    ranked = self._evaluate(self._reseed(ranked, g), g)
                    div, reseeded = self._diversity(ranked), self.s.reseed_count
                fits = [s.fitness for s in ranked]
                record = {"generation": g, "best": fits[0], "mean": statistics.fmean(fits), "worst": fits[-1],
                          "diversity": div, "reseeded": reseeded, "best_key": ranked[0].genome.key(),
                          "population": [s.row() for s in ranked]}
                _append(self.gens_path, record)
                self.log(f"generation {g}: best {fits[0]:.4f} ({ranked[0].genome.describe()}), mean "
                         f"{record['mean']:.4f}, worst {fits[-1]:.4f}, diversity {div:.3f}")
            history.append(record)
            if self.on_generation:
                self.on_generation(record)
            if reason := self._stop_reason(history):
                stop_reason = reason
                break
        self.log(stop_reason)
        return {"champion": ranked[0], "history": history, "stop_reason": stop_reason,
                "generations_run": len(history), "evaluated": len(self.raw), "evaluated_now": self.evaluated_now}
