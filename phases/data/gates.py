"""Exit gates of the prepare phase, from what the data and tokenizer tasks measured."""

from __future__ import annotations

from typing import Any

from phases.common.gates import GateReport

MIN_CHARS_PER_TOKEN = 2.0  # a BPE that learned no merges sits near 1 char per token


def prepare_gates(
    curriculum: dict[str, Any],
    tokenizer: dict[str, Any],
    hub_selected: int,
    hub_downloaded: int,
    fell_back: dict[str, str],
    mode: str = "strict",
) -> GateReport:
    r = GateReport(phase="prepare", mode=mode)
    r.add("answers_verified", "fraction of curriculum answers a second solver agrees with (the expression evaluated "
          "as a syntax tree, each worked column re-added, each story replayed sentence by sentence, each passage "
          "read for the last code)", curriculum["verified_fraction"], ">=", 1.0)
    # the generator draws held-out texts it has not drawn for train, so this count is 0 by construction
    r.fact("no_heldout_leak", "validation/test texts also present in train", curriculum["train_heldout_overlap"])
    r.add("all_splits_nonempty", "smallest split's row count", min(curriculum["rows"].values()), ">", 0)
    r.add("tokenizer_roundtrip", "validation texts decoded back exactly", tokenizer["roundtrip_rate"], ">=", 1.0)
    r.add("tokenizer_compression", "characters per token on validation", tokenizer["chars_per_token"], ">=",
          MIN_CHARS_PER_TOKEN)
    if hub_selected:
        # a download that fails raises before the gates, unless data.offline_fallback lets the run go on without it:
        # either way the count is decided before it is measured, so it is shown, not gated, with what was left out
        left_out = "; ".join(f"{name}: {why[:200]}" for name, why in sorted(fell_back.items()))
        r.fact("hub_datasets", f"selected hub datasets read, of {hub_selected}"
               + (f" (offline fallback, went on without {left_out})" if fell_back else ""), hub_downloaded)
    return r
