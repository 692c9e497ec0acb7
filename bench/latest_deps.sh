#!/usr/bin/env bash
# Drift check: does the code still work with the newest versions pyproject.toml allows?
#
# Builds a throwaway venv from pyproject.toml's ranges alone (no lock, so pip takes the newest allowed
# release of every package), prints what it resolved next to the lock, and runs a fast subset of the
# tests: one forward + generate, one save/load round trip, training steps, one merge from YAML, one
# pack/unpack read by transformers. Not part of CI, which must stay reproducible: run it before a
# release or a lock refresh (see README, "Dependencies and the lock").
#
# torch is the one exception: it is installed at the lock's CPU pin first, because the newest torch on
# PyPI is a CUDA build of several GB. Set LATEST_TORCH=1 to let it float too.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${LATEST_VENV:-/tmp/agent-forge-latest-deps}
PY=${PYTHON:-python3}
rm -rf "$VENV" && "$PY" -m venv "$VENV" || exit 2
if [ "${LATEST_TORCH:-0}" != 1 ]; then
    "$VENV/bin/pip" install -q "$(grep -E '^torch==' requirements.lock)" 2>&1 | grep -v '^WARNING: Location' || true
fi
"$VENV/bin/pip" install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location'
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "latest-deps: install from pyproject.toml's ranges FAILED"; exit 1; }

echo "== resolved (newest allowed) vs requirements.lock"
"$VENV/bin/python" - <<'PY'
import re
from importlib.metadata import distributions
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = {norm(a): b for a, b in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", open("requirements.lock").read(), re.M)}
have = {norm(d.metadata["Name"]): d.version for d in distributions()}
for name in ("torch", "transformers", "tokenizers", "datasets", "safetensors", "prefect", "fastapi", "pydantic",
             "wandb", "httpx", "huggingface-hub", "ruff", "pytest"):
    print(f"  {name:<16} {have.get(name, '-'):<14} lock {lock.get(name, '-')}")
drift = sorted(n for n in have if n in lock and have[n] != lock[n])
print(f"  {len(drift)} of {len(lock)} locked packages resolve to another version: {', '.join(drift) or 'none'}")
PY

SUBSET=(
    "tests/test_cognate_model.py::test_decode_cache_matches_full_forward_and_generate_is_greedy_forward"
    "tests/test_cognate_model.py::test_save_pretrained_round_trip_through_auto_classes"
    "tests/test_training_safety.py::test_muon_takes_hidden_matrices_adamw_the_rest"
    "tests/test_cognate_training.py::test_nan_never_reaches_a_checkpoint_and_is_never_stepped"
    "tests/test_evomerge_merge.py::test_merge_cli_runs_the_exported_yaml_to_the_same_tensors"
    "tests/test_bitnet.py::test_pack_unpack_is_bit_exact_and_transformers_reads_it"
)
echo "== fast subset on the newest versions"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${SUBSET[@]}"
rc=$?
verdict=$([ $rc -eq 0 ] && echo PASS || echo FAIL)
echo "latest-deps: $verdict"
"$VENV/bin/python" -c "
import json, sys, transformers, torch
print(json.dumps({'bench': 'latest_deps', 'verdict': '$verdict', 'python': sys.version.split()[0],
                  'torch': torch.__version__, 'transformers': transformers.__version__}))"
exit $rc
