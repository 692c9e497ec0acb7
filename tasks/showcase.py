"""What a run shows in the Prefect UI, drawn from stored artifacts.

Called from flow bodies, never from tasks: a flow body runs on every attempt, while a task whose result is
cached does not run at all. So a second run of the same config, or a UI Retry that finds finished work, shows
the same loss curves, fitness plot, reports and finished progress bars as the run that computed them.
"""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_progress_artifact

from phases.bitnet.steps import FIGURE
from storage import ArtifactRef
from tasks.bitnet import summary_markdown
from tasks.runtime import png_markdown, store


def loss_curve(home: str, key: str, ref: ArtifactRef, what: str) -> None:
    create_markdown_artifact(key=key, description=f"{what}: loss",
                             markdown=png_markdown(store(home).file(ref, "loss.png"), f"{what} loss"))


def finished(key: str, what: str) -> None:
    """A progress bar at 100%: the latest version under ``key``, whatever an earlier attempt left there."""
    create_progress_artifact(progress=100.0, key=key, description=f"{what}: done")


def evomerge_champion(home: str, ref: ArtifactRef) -> None:
    st = store(home)
    create_markdown_artifact(key="evomerge-fitness", description="EvoMerge: fitness per generation",
                             markdown=png_markdown(st.file(ref, "fitness.png"), "fitness per generation"))
    create_markdown_artifact(key="evomerge-skills", description="EvoMerge: held-out skill accuracy, champion and inputs",
                             markdown="### Test accuracy per skill (95% Wilson interval)\n\n"
                             + st.file(ref, "skills.md").read_text())


def bitnet_report(home: str, ref: ArtifactRef) -> None:
    st = store(home)
    create_markdown_artifact(key="bitnet-report", description="BitNet: sparsity per layer, accuracy before/after",
                             markdown=summary_markdown(st.manifest(ref)["metrics"]) + "\n\n"
                             + png_markdown(st.file(ref, FIGURE), "bitnet"))
