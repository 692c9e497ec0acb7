"""End to end, the way a user runs it: a real `prefect server start` on 127.0.0.1, a real process
worker, deployments from prefect.yaml, `prefect deployment run agent-forge/full`, and a failed run
retried the way the UI's Retry button does it."""

from pathlib import Path

import pytest
from prefect_stack import PHASE_KINDS, SPECIALISTS
from test_run_form import assert_form

from storage import ArtifactStore
from tasks.runtime import read_journal

pytestmark = pytest.mark.deployment


def _snapshot(home: Path) -> dict[str, str]:
    """Each artifact's manifest text: it holds every file's sha256, so equal text means equal bytes."""
    st = ArtifactStore(home)
    return {m["id"]: (Path(st.ref(m["id"]).path) / "manifest.json").read_text() for m in st.list()}


def test_the_form_the_server_serves_titles_every_section_and_fills_none_from_a_preset(stack):
    deployment = stack.deployment()
    assert deployment["enforce_parameter_schema"]  # the server checks a run's parameters against this schema
    config = deployment["parameter_openapi_schema"]["properties"]["config"]
    assert config["title"] and config["description"]
    assert_form(deployment["parameter_openapi_schema"])


def test_full_deployment_completes_and_second_run_is_cached(stack, deployed):
    first = deployed
    store = ArtifactStore(stack.home)
    kinds = sorted(m["kind"] for m in store.list())
    assert kinds == sorted(["cognate-base", *["cognate-model", "cognate-diagnosis"] * 3, "curriculum",
                            "tokenizer", *PHASE_KINDS, "forging-report"])
    before = _snapshot(stack.home)
    executions = len(read_journal(str(stack.home)))

    second = stack.wait(stack.run_deployment_cli())  # as the README says it
    assert second["state"]["type"] == "COMPLETED", stack.log("worker")
    assert _snapshot(stack.home) == before  # same artifacts, untouched
    again = [e["task"] for e in read_journal(str(stack.home))][executions:]
    assert again == ["preflight"]  # nothing executed again but the checks of disk and memory, never cached
    states = stack.task_states(second["id"])
    assert states.pop("preflight") == "Completed"
    # the report finds its stored table and adds this run's gates and wall times: it runs, it measures nothing
    assert states.pop("forging-report") == "Completed"
    assert states and set(states.values()) == {"Cached"}, states
    # a cached run shows what the run that computed it showed: loss curves, fitness, reports, finished progress
    shown = stack.artifact_keys(first["id"])
    assert {"cognate-base-loss", "cognate-memory-progress", "evomerge-fitness", "evomerge-skills",
            "quietstar-reinforce-loss", "bitnet-report", "forging-report", "bitnet-gates"} <= shown, shown
    assert stack.artifact_keys(second["id"]) == shown
    # the top-level run's own artifact: the forging report, with each phase's verdict linked to its subflow run
    report = [a for a in stack.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [second["id"]]}}})
              if a.get("key") == "forging-report"]
    assert report, "the agent-forge run itself carries no forging report"
    subflows = {s["name"]: s["id"] for s in stack.post("/flow_runs/filter", {
        "flow_runs": {"parent_flow_run_id": {"any_": [second["id"]]}}})}
    phase_runs = [i for i in subflows.values() if f"/flow-run/{i})" in report[0]["data"]]
    assert len(phase_runs) == 4, (report[0]["data"], subflows)  # cognate, evomerge, quietstar and bitnet; not prepare
    # the UI's Task Runs tab lists a run's tasks only when no input names a flow run (Prefect 3.8's UI rejects the
    # "flow_run" input type): subflow results are handed on as copies
    tasks = stack.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [second["id"], *subflows.values()]}}})
    linked = {t["name"]: k for t in tasks for k, inputs in t["task_inputs"].items()
              if any(i["input_type"] == "flow_run" for i in inputs)}
    assert len(tasks) > 20 and not linked, linked


def test_failed_run_is_retried_like_the_ui_and_resumes(stack, tmp_path):
    home = tmp_path / "retry-home"
    (home / "artifacts").mkdir(parents=True)
    # A fault a user can fix, hit after the specialists have trained: a plain file sits where their
    # artifacts must go. prepare and the shared foundation finish before it.
    blocker = home / "artifacts" / "cognate-model"
    blocker.write_text("not a directory")

    run_id = stack.run_deployment(home=str(home))
    failed = stack.wait(run_id)
    assert failed["state"]["type"] == "FAILED", stack.log("worker")
    assert "exists and is not a directory" in stack.log("worker")
    kinds = sorted(m["kind"] for m in ArtifactStore(home).list())
    assert kinds == ["cognate-base", "curriculum", "tokenizer"]  # finished before the failure, and whole
    before = _snapshot(home)
    ran_before = [e["task"] for e in read_journal(str(home))]
    assert ran_before[:5] == ["preflight", "build-curriculum", "train-tokenizer", "wandb:prepare", "cognate-foundation"]
    assert set(ran_before[5:]) == SPECIALISTS

    blocker.unlink()  # the fix
    stack.retry(run_id)  # what the UI's Retry button posts
    done = stack.wait(run_id)
    assert done["id"] == run_id and done["state"]["type"] == "COMPLETED", stack.log("worker")
    assert done["run_count"] >= 2

    ran_after = [e["task"] for e in read_journal(str(home))][len(ran_before):]
    assert ran_after.count("preflight") == 1  # the retry checks disk and memory again
    ran_after.remove("preflight")
    assert set(ran_after[:3]) == SPECIALISTS and ran_after[3] == "cognate-evaluate"
    assert ran_after[4:7] == ["cognate-diagnose"] * 3 and ran_after[7] == "wandb:cognate"
    # then EvoMerge, Quiet-STaR and BitNet, for the first time
    assert ran_after[8] == "evomerge-measure-inputs" and "evomerge-champion" in ran_after
    assert sum(t.startswith("evomerge-fitness:") for t in ran_after) >= 8
    assert ran_after[-3:] == ["wandb:bitnet", "forging-report", "wandb:report"]  # the report last, measured once
    assert {"wandb:evomerge", "wandb:quietstar", "quietstar-data"} <= set(ran_after)
    states = stack.task_states(run_id)
    assert states["cognate-foundation"] == "Cached", states
    assert states["cognate-specialist"] == "Completed" and states["cognate-evaluate"] == "Completed", states
    progress = stack.final_progress(run_id)
    assert "cognate-base-progress" in progress and set(progress.values()) == {100.0}, progress  # the work is done
    after = _snapshot(home)
    assert {k: after[k] for k in before} == before  # nothing stored before the failure changed
    store = ArtifactStore(home)
    for m in store.list():
        store.verify(m["id"])
        if m["kind"] == "cognate-model":  # the retried specialists resumed from their last checkpoints
            stages = store.manifest(store.ref(m["id"]))["metrics"]["stages"]
            # (a specialist's stage length is its compute share, so read it off the stage): nothing ran again,
            # and the record counts the steps the first attempt ran, as an unbroken run's does
            assert stages["advanced"]["resumed_from"] == stages["advanced"]["final_step"] > 0, stages
            assert stages["advanced"]["steps_run"] == stages["advanced"]["final_step"], stages
