"""evomerge: three models (default: the newest Cognate specialists) and their shared base → the 8
binary combinations → generations of a genetic algorithm over merge recipes → the champion, its
history and plot → exit gates → W&B."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows.parameters import described
from flows.phase_result import PhaseResult, handed_on, verdict
from flows.prepare import Prepared, prepare
from phases.config import PipelineConfig
from phases.evomerge import steps
from phases.evomerge.gates import evomerge_gates
from storage import ArtifactError, ArtifactRef, ArtifactStore
from tasks import scaling, showcase
from tasks.evomerge import champion_recipe, eval_device, evaluate_candidate, measure_inputs, store_champion
from tasks.gates import close_phase
from tasks.runtime import resolve_home, store, work_dir

SPECIALIST_ORDER = ("reasoning", "memory", "speed")


class EvoMerge(PhaseResult):
    champion: ArtifactRef
    inputs: dict[str, ArtifactRef]
    base: ArtifactRef
    stop_reason: str
    generations: int


def latest_cognate(st: ArtifactStore) -> tuple[dict[str, ArtifactRef], ArtifactRef]:
    """The newest complete set of Cognate specialists that share one base."""
    by_base: dict[str, dict[str, dict]] = {}
    for m in sorted(st.list("cognate-model"), key=lambda m: m.get("producer", {}).get("created_at", "")):
        if "error" in m:
            continue
        by_base.setdefault(m["inputs"][0], {})[m["config"].get("specialist", m["id"])] = m
    complete = [(b, ms) for b, ms in by_base.items() if len(ms) >= 3]
    if not complete:
        raise ArtifactError("no three Cognate models sharing a base in the store: run the cognate flow first, "
                            "or pass models= and base=")
    base_id, ms = complete[-1]
    names = [n for n in SPECIALIST_ORDER if n in ms] or sorted(ms)
    return {n: st.ref(ms[n]["id"]) for n in names[:3]}, st.ref(base_id)


@flow(name="evomerge", persist_result=True, task_runner=scaling.task_runner())
@described
def evomerge(config: PipelineConfig = PipelineConfig(), home: str | None = None, run_group: str | None = None,
             models: dict[str, ArtifactRef] | None = None, base: ArtifactRef | None = None,
             prepared: Prepared | None = None) -> EvoMerge:
    home = resolve_home(home)
    run_group = run_group or str(flow_run.id)
    logger = get_run_logger()
    if prepared is None:
        prepared = handed_on(prepare(config, home, run_group))
    st = store(home)
    if models is None:
        models, found_base = latest_cognate(st)
        base = base or found_base
    if len(models) != 3:
        raise ValueError(f"EvoMerge merges three models, got {len(models)}: {sorted(models)}")
    if base is None:  # the shared ancestor, from the first model's lineage
        base = st.ref(st.manifest(next(iter(models.values())))["inputs"][0])
    inputs = list(models.values())
    sec = config.evomerge
    weights = prepared.strategy["fitness_weights"]
    recipe = champion_recipe(config, base, inputs, prepared.curriculum)
    state_dir = work_dir(home, recipe)

    existing = st.find(recipe)
    if existing is None:
        raws = measure_inputs(config, inputs, prepared.curriculum, home)
        progress = create_progress_artifact(progress=0.0, key="evomerge-progress",
                                            description="EvoMerge: generations done (of the maximum)")

        def evaluate(genomes):
            """Each generation's candidates as concurrent tasks, yielded as they complete."""
            with scaling.claim(eval_device(config)):
                futures = {evaluate_candidate.submit(g.model_dump(mode="json", exclude={"origin"}), g.key()[:12],
                                                     config, base, inputs, prepared.curriculum, home): g for g in genomes}
            for fut in as_completed(list(futures)):
                yield futures[fut], fut.result()

        def on_generation(record):
            update_progress_artifact(progress, progress=100.0 * (record["generation"] + 1) / sec.search.generations)

        run = steps.search(raws, list(models), st.load(base), sec, config.seed, weights, state_dir, evaluate,
                           log=logger.info, on_generation=on_generation)
        update_progress_artifact(progress, progress=100.0)
        ref = store_champion(config, run["champion"].genome.model_dump(mode="json"), base, models,
                             prepared.curriculum, str(state_dir), run["summary"], weights, home)
        steps.discard_state(state_dir)
    else:
        logger.info("EvoMerge champion for this recipe already stored (%s): not evolving again", existing.id)
        ref = existing
        showcase.finished("evomerge-progress", "EvoMerge: generations")
    showcase.evomerge_champion(home, ref)
    metrics = st.manifest(ref)["metrics"]
    report = evomerge_gates(metrics["final"], metrics["run"], sec.gates, config.gate_mode("evomerge"))
    final = metrics["final"]
    best_input = max(final["inputs"].values(), key=lambda m: m["fitness"])["fitness"]
    logger.info("champion %s: test fitness %.4f vs best input %.4f (×%.3f); %s", metrics["champion"]["techniques"],
                final["champion"]["fitness"], best_input, final["champion"]["fitness"] / best_input,
                metrics["run"]["stop_reason"])
    close_phase(report, config, run_group, home, metrics, [ref], images={"evomerge/fitness": str(st.file(ref, "fitness.png"))})
    return EvoMerge(champion=ref, inputs=models, base=base, stop_reason=metrics["run"]["stop_reason"],
                    generations=metrics["run"]["generations_run"], **verdict(report))
