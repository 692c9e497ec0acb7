"""prepare: preflight -> data (hub pre-download, built-in curriculum) -> tokenizer -> gates -> W&B."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.parameters import described
from phases.config import PipelineConfig
from phases.data.gates import prepare_gates
from storage import ArtifactRef
from tasks import scaling
from tasks.data import build_curriculum, download_hub_dataset, train_tokenizer
from tasks.gates import close_phase
from tasks.preflight import preflight
from tasks.runtime import resolve_home, store


class Prepared(BaseModel):
    curriculum: ArtifactRef
    hub_datasets: list[ArtifactRef]
    tokenizer: ArtifactRef
    strategy: dict


@flow(name="prepare", persist_result=True, task_runner=scaling.task_runner())
@described
def prepare(config: PipelineConfig = PipelineConfig(), home: str | None = None, run_group: str | None = None,
            checked: dict | None = None) -> Prepared:
    logger = get_run_logger()
    home = resolve_home(home)
    run_group = run_group or str(flow_run.id)
    checked = checked or preflight(config, home)  # the caller's check when it just made one

    downloads = {name: download_hub_dataset.submit(name, config.data, home) for name in config.data.hub_datasets}
    hub_refs: list[ArtifactRef] = []
    fell_back: dict[str, str] = {}  # dataset -> why it could not be read
    for name, future in downloads.items():
        try:
            hub_refs.append(future.result())
        except Exception as e:
            if not config.data.offline_fallback:
                raise
            fell_back[name] = str(e)
            logger.warning("data.offline_fallback: going on without hub dataset %s: %s", name, e)

    curriculum = build_curriculum(config.data, home)
    tokenizer = train_tokenizer(config.tokenizer, [curriculum, *hub_refs], home)

    st = store(home)
    cur_metrics, tok_metrics = st.manifest(curriculum)["metrics"], st.manifest(tokenizer)["metrics"]
    hub_metrics = {m["config"]["name"]: m["metrics"] for m in map(st.manifest, hub_refs)}
    report = prepare_gates(cur_metrics, tok_metrics, len(config.data.hub_datasets), len(hub_refs), fell_back,
                           config.gate_mode("prepare"))
    close_phase(report, config, run_group, home,
                {"curriculum": cur_metrics, "tokenizer": tok_metrics, "preflight": checked["needs"], "hub": hub_metrics,
                 "hub_fell_back": fell_back},
                [curriculum, *hub_refs, tokenizer])
    return Prepared(curriculum=curriculum, hub_datasets=hub_refs, tokenizer=tokenizer, strategy=checked["strategy"])
