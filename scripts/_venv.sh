# Sourced by demo.sh and test.sh: create .venv once and install the package with the given extras.
# torch is installed first, pinned to the CPU build that pip takes from local disk (a plain `torch` would pull CUDA).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -e ".[$1]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, optimum_admm; print('optimum-admm', optimum_admm.__version__, '| torch', torch.__version__)"
