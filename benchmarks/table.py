"""Prints the Markdown table of benchmarks/reproduce.py results, with the published numbers beside them.

    python benchmarks/table.py results/reproduce/*.json
"""
import json
import sys
from pathlib import Path

# DIFFORMER.md section 4 (CiteSeer/PubMed as recalled from the paper, not checked against the PDF).
PUBLISHED = {"cora_s": "85.9 +- 0.4", "cora_a": "84.1 +- 0.6", "cora_gcn": "81.5 +- 1.3 (GCN)",
             "cora_gat": "83.0 +- 0.7 (GAT)", "cora_mlp": "56.1 +- 1.6 (MLP)", "citeseer_s": "73.5 +- 0.3",
             "citeseer_a": "75.7 +- 0.3", "pubmed_s": "81.8 +- 0.3", "pubmed_a": "80.5 +- 1.2"}


def main(paths) -> None:
    print("| preset | ours: test acc at best val (%) | runs (seeds 0..4) | paper |")
    print("|---|---|---|---|")
    for path in sorted(paths):
        result = json.loads(Path(path).read_text())
        name = Path(result["config"]).stem
        runs = ", ".join(f"{r:.1f}" for r in result["runs"])
        options = " ".join(result.get("extra_args", [])).replace("--data.init_args.", "")
        print(f"| `{name}`{' ' + options if options else ''} | {result['mean']:.2f} +- {result['std']:.2f} | {runs} | {PUBLISHED.get(name, 'n/a')} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
