"""Rewrite the "Measured results" section of each docs/methods page from a compare_methods.py results file.

python benchmarks/update_method_pages.py benchmarks/results/smollm2-135m-2026-11-23.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"admm": ["admm-cubic", "admm-constant"], "sparsegpt": ["sparsegpt"], "wanda": ["wanda"]}
PAGES["magnitude"] = ["magnitude"]


def section(results: dict, path: Path, methods: list[str]) -> str:
    dense = results["dense"]["perplexity"]
    domains = [d for d in dense if d != "mean"]
    rows = [r for r in results["runs"] if r["method"] in methods]
    lines = [
        "## Measured results",
        "",
        f"From `{path.relative_to(ROOT)}` (full table with every method: `{path.with_suffix('.md').relative_to(ROOT)}`; "
        f"regenerate with `python benchmarks/compare_methods.py --model {results['model']}`). Weights: "
        f"{results['model']} ({results['source'].get('file', results['source'])}); calibration: "
        f"{results['calibration']}; evaluation: {results['evaluation']}. Dense mean perplexity "
        f"{dense['mean']:.2f}. Wall times were taken on shared cores: compare them only where the full table's load "
        "average is near 2.",
        "",
        "| run | pattern | mean ppl | " + " | ".join(domains) + " | mean rel. layer error | wall s |",
        "|---|---|---:|" + "---:|" * (len(domains) + 2),
    ]
    for r in rows:
        error = "–" if r["mean_relative_error"] is None else f"{r['mean_relative_error']:.3e}"
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['perplexity']['mean']:.2f} | "
            + " | ".join(f"{r['perplexity'][d]:.2f}" for d in domains)
            + f" | {error} | {r['time_seconds']['wall']:.1f} |"
        )
    if not rows:
        lines.append("| (no run in this file) | | | " + " | " * (len(domains) + 1))
    return "\n".join(lines) + "\n"


def main(path: str) -> None:
    path = Path(path).resolve()
    results = json.loads(path.read_text())
    for page, methods in PAGES.items():
        doc = ROOT / "docs" / "methods" / f"{page}.md"
        text = doc.read_text()
        start = text.index("## Measured results")
        end = text.find("\n## ", start + 1)
        tail = "" if end == -1 else text[end:]
        doc.write_text(text[:start] + section(results, path, methods) + tail)


if __name__ == "__main__":
    main(sys.argv[1])
