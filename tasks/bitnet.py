"""BitNet tasks: quantize (staged, calibrated), fine-tune and pack, evaluate. Each builds one store artifact whose
inputs name what it was made from, so the packed model's lineage runs back to the model it compresses:

    bitnet-staged  <- (input model, curriculum, tokenizer)   latent weights + plan.json (which layers, scales)
    bitnet-model   <- (bitnet-staged, input model, curriculum) the packed artifact (2-bit + FP16, config.json)
    bitnet-report  <- (bitnet-model, input model, bitnet-staged, curriculum) report.json + bitnet.png
"""

from __future__ import annotations

import math
from typing import Any

from prefect import get_run_logger, task

from phases.bitnet import steps
from phases.config import PipelineConfig
from storage import ArtifactRef, Recipe
from tasks.code_version import code_version
from tasks.runtime import create, recipe_cache, store


def _recipe_config(config: PipelineConfig, step: str) -> dict[str, Any]:
    """What one step's artifact depends on: the held-out cut and the step's own block, every field of them (the
    gates block is read by the flow only, so changing a threshold never recomputes). Fine-tuning reads no held-out
    problems, but it already followed their number through its input, the staged artifact, whose id is its recipe."""
    return {"bitnet": config.bitnet.model_dump(mode="json", include={"heldout", step}), "seq_len": config.model.seq_len,
            "seed": config.seed}


def staged_recipe(config: PipelineConfig, model: ArtifactRef, curriculum: ArtifactRef, tokenizer: ArtifactRef) -> Recipe:
    return Recipe(kind="bitnet-staged", inputs=(model.id, curriculum.id, tokenizer.id),
                  config=_recipe_config(config, "quantize"), code_version=code_version("phases.bitnet"))


def packed_recipe(config: PipelineConfig, staged: ArtifactRef, model: ArtifactRef, curriculum: ArtifactRef) -> Recipe:
    return Recipe(kind="bitnet-model", inputs=(staged.id, model.id, curriculum.id),
                  config=_recipe_config(config, "finetune"), code_version=code_version("phases.bitnet"))


def report_recipe(config: PipelineConfig, model: ArtifactRef, staged: ArtifactRef, packed: ArtifactRef,
                  curriculum: ArtifactRef) -> Recipe:
    return Recipe(kind="bitnet-report", inputs=(packed.id, model.id, staged.id, curriculum.id),
                  config=_recipe_config(config, "evaluate"), code_version=code_version("phases.bitnet"))


@task(name="bitnet-quantize", cache_policy=recipe_cache(staged_recipe), persist_result=True)
def quantize(config: PipelineConfig, model: ArtifactRef, curriculum: ArtifactRef, tokenizer: ArtifactRef,
             home: str) -> ArtifactRef:
    st = store(home)
    recipe = staged_recipe(config, model, curriculum, tokenizer)

    def build(out):
        return steps.quantize(st.load(model), st.load(curriculum), st.load(tokenizer), config.bitnet.heldout,
                              config.bitnet.quantize, config.model, out)

    ref = create(home, recipe, "bitnet-quantize", build)
    m = st.manifest(ref)["metrics"]
    logger = get_run_logger()
    for s in m["stages"]:
        logger.info("staged %s: %s%s", s["group"], "KEPT IN FP16: " if s["kept_fp16"] else "ternary; ", s["reason"])
    logger.info("held-out next-token accuracy %.4f -> %.4f after quantization (%d ternary layers)",
                m["before"]["token_accuracy"], m["after_quantization"]["token_accuracy"], m["quantized_layers"])
    return ref


@task(name="bitnet-finetune", cache_policy=recipe_cache(packed_recipe), persist_result=True)
def finetune(config: PipelineConfig, staged: ArtifactRef, model: ArtifactRef, curriculum: ArtifactRef,
             home: str) -> ArtifactRef:
    st = store(home)
    recipe = packed_recipe(config, staged, model, curriculum)

    def build(out):
        return steps.finetune(st.load(staged), st.load(curriculum), config.bitnet.heldout, config.bitnet.finetune,
                              config.model, config.seed, out)

    ref = create(home, recipe, "bitnet-finetune", build)
    m = st.manifest(ref)["metrics"]
    get_run_logger().info("fine-tuning decision: %s; packed vs fake-quantized logits: max |diff| %.4g, arg-max "
                          "agreement %.4f", m["decision"], m["packed_vs_fake_quant"]["max_abs_logit_diff"],
                          m["packed_vs_fake_quant"]["argmax_agreement"])
    return ref


@task(name="bitnet-evaluate", cache_policy=recipe_cache(report_recipe), persist_result=True)
def evaluate(config: PipelineConfig, model: ArtifactRef, staged: ArtifactRef, packed: ArtifactRef,
             curriculum: ArtifactRef, home: str) -> ArtifactRef:
    st = store(home)
    recipe = report_recipe(config, model, staged, packed, curriculum)

    def build(out):
        return steps.evaluate(st.load(model), st.manifest(staged)["metrics"], st.load(packed), st.load(curriculum),
                              config.bitnet.heldout, config.bitnet.evaluate, config.model, out)

    return create(home, recipe, "bitnet-evaluate", build)


def _drop(value: float) -> str:
    """A relative drop; none where the input answered nothing (a share of nothing is undefined)."""
    return "drop n/a (the input answers none)" if math.isnan(value) else f"drop {value:.2%}"


def summary_markdown(report: dict[str, Any]) -> str:
    c, s, a, m = report["compression"], report["speed"], report["accuracy"], report["memory"]
    lines = [
        "| figure | FP32 input | packed | ratio |", "|---|---|---|---|",
        f"| weights file (bytes) | {c['fp32_bytes']:,} | {c['packed_bytes']:,} | {c['ratio_vs_fp32']:.2f}x |",
        f"| FP16 copy of the input (bytes) | {c['fp16_bytes']:,} | {c['packed_bytes']:,} | {c['ratio_vs_fp16']:.2f}x |",
        f"| quantized layers (bytes) | {c['quantized_fp32_bytes']:,} | {c['quantized_packed_bytes']:,} | "
        f"{c['quantized_ratio_vs_fp32']:.2f}x ({c['bits_per_weight']:.3f} bits/weight; ternary limit "
        f"{c['ternary_limit_bits']:.3f}) |",
        f"| decode tokens/s | {s['fp32_tokens_per_s']:.1f} | {s['packed_tokens_per_s']:.1f} | {s['speedup']:.2f}x |",
        f"| resident tensor bytes | {m['fp32_resident_bytes']:,} | {m['packed_resident_bytes']:,} | "
        f"{m['ratio']:.2f}x |",
        f"| task accuracy (n={a['examples']}) | {a['before']:.4f} | {a['packed']:.4f} | "
        f"{_drop(a['task_accuracy_drop'])} (paired McNemar p={a['mcnemar_p']:.3g}) |",
        *[f"| {skill} (answered / asked) | {h}/{n} | {a['skills_packed'][skill][0]}/{n} | |"
          for skill, (h, n) in a["skills_before"].items()],
        f"| next-token accuracy | {report['before']['token_accuracy']:.4f} | "
        f"{report['packed']['token_accuracy']:.4f} | "
        f"{_drop(a['token_accuracy_drop'])} |",
        f"| perplexity | {report['before']['ppl']:.3f} | {report['packed']['ppl']:.3f} | |",
        "", f"Sparsity (zero ternary weights): {report['sparsity']['overall']:.2%} overall.", "",
        "| layer group | kept in FP16 | why |", "|---|---|---|",
        *[f"| {st['group']} | {'yes' if st['kept_fp16'] else 'no'} | {st['reason']} |" for st in report["stages"]],
    ]
    return "\n".join(lines)
