"""The forging report task: every stage's model on the same held-out problems (phases/forging_report.py), stored,
shown on the top-level run, logged to W&B."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from phases import forging_report as fr
from phases.common.gates import GateReport
from phases.config import PipelineConfig
from storage import ArtifactRef, Recipe
from tasks.code_version import code_version
from tasks.runtime import create, store
from tasks.tracking import log_phase_boundary

# (row name, artifact, is it packed, score with thoughts): the order of the climb
StageRef = tuple[str, ArtifactRef, bool, bool]


def report_recipe(config: PipelineConfig, stages: list[StageRef], curriculum: ArtifactRef,
                  hub: Sequence[ArtifactRef] = ()) -> Recipe:
    return Recipe(kind="forging-report", inputs=(*(ref.id for _, ref, _, _ in stages), curriculum.id, *(r.id for r in hub)),
                  config={"rows": [[name, packed, thoughts] for name, _, packed, thoughts in stages],
                          "problems_per_skill": config.report.problems_per_skill, "seq_len": config.model.seq_len,
                          "hub_problems": config.report.hub_problems},
                  code_version=code_version("phases.forging_report"))


# Never cached by Prefect: the stored table is found by its recipe, and the phases' gates and wall times, which
# differ between runs of the same models, are added to it on every run
@task(name="forging-report", cache_policy=NO_CACHE)
def forging_report(config: PipelineConfig, stages: list[StageRef], curriculum: ArtifactRef,
                   phases: list[dict[str, Any]], run_group: str, home: str,
                   hub: Sequence[ArtifactRef] = ()) -> tuple[ArtifactRef, str]:
    """The stored table (found again by its recipe, measured once) and the report's markdown; ``hub``: the prepared
    hub datasets, those with a scorer scored on their own held-out splits."""
    st = store(home)
    hub_sets = [fr.HubSet(m["config"]["name"], st.load(r), m["metrics"]["scorer"])
                for r, m in ((r, st.manifest(r)) for r in hub) if m["metrics"].get("scorer")]

    def build(out):
        # the measuring; a run that finds the table only reads it
        rows = fr.measure([fr.Stage(name, st.load(ref), packed, thoughts) for name, ref, packed, thoughts in stages],
                          st.load(curriculum), config.model.seq_len, config.report.problems_per_skill, hub_sets,
                          config.report.hub_problems)
        fr.write(out, rows, [])
        return {"stages": rows}

    ref = create(home, report_recipe(config, stages, curriculum, hub), "forging-report", build)
    rows = st.manifest(ref)["metrics"]["stages"]
    text = fr.markdown(rows, [fr.PhaseSummary(**p) for p in phases])
    create_markdown_artifact(key="forging-report", markdown=text,
                             description="What each phase added: per-skill held-out accuracy at every stage")
    get_run_logger().info("\n%s", text)
    # Wall times and run links stay out of W&B: its boundary task is keyed by what it logs, and a retry that found
    # the phases finished must not log the same report twice
    metrics = {"stages": {r["stage"]: {s: h / n for s, (h, n) in (r["skills"] | r.get("hub", {})).items()} for r in rows},
               "phases": {p["name"]: {k: v for k, v in p.items() if k not in ("seconds", "link")} for p in phases}}
    log_phase_boundary("report", run_group, home, config.tracking.wandb_mode, config.tracking.project,
                       config.model_dump(mode="json"), metrics, GateReport(phase="report", mode=config.gates.mode),
                       [ref])
    return ref, text
