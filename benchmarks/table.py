"""Prints the Markdown tables of benchmarks/reproduce.py results, with the published numbers beside them.

    python benchmarks/table.py results/reproduce/*.json

Results over seeds (``--runs``) go in one table, a row per file; results over a dataset's splits
(``--splits``; files named ``<dataset>_<model>.json``) in a second, a row per dataset and a column per model.
"""
import json
import statistics
import sys
from pathlib import Path

# DIFFORMER.md section 4: the paper's 5-run means of the authors' code (CiteSeer/PubMed as recalled from the
# paper, not checked against the PDF).
PUBLISHED = {"cora_s": "85.9 +- 0.4", "cora_a": "84.1 +- 0.6", "cora_gcn": "81.5 +- 1.3 (GCN)",
             "cora_gat": "83.0 +- 0.7 (GAT)", "cora_mlp": "56.1 +- 1.6 (MLP)", "citeseer_s": "73.5 +- 0.3",
             "citeseer_a": "75.7 +- 0.3", "pubmed_s": "81.8 +- 0.3", "pubmed_a": "80.5 +- 1.2"}

# Published baselines on the same datasets (DIFFormer has none there). Geom-GCN's 10 splits (48/32/20): GCN,
# GAT and MLP as tabulated by GGCN (Yan et al. 2022, Table 1). Minesweeper, 10 splits (50/25/25), ROC-AUC:
# Platonov et al. 2023 (github.com/yandex-research/heterophilous-graphs, notebooks/results.ipynb). The Facebook100
# graphs (reed98, amherst41, johnshopkins55): none found.
PUBLISHED_SPLITS = {
    "cornell": "GCN 60.54 +- 5.30, GAT 61.89 +- 5.05, MLP 81.89 +- 6.40",
    "texas": "GCN 55.14 +- 5.16, GAT 52.16 +- 6.63, MLP 80.81 +- 4.75",
    "wisconsin": "GCN 51.76 +- 3.06, GAT 49.41 +- 4.09, MLP 85.29 +- 3.31",
    "actor": "GCN 27.32 +- 1.10, GAT 27.44 +- 0.89, MLP 36.53 +- 0.70",
    "minesweeper": "GCN 89.75 +- 0.52, GAT 92.01 +- 0.68, GT 91.85 +- 0.76, ResNet 50.89 +- 1.39",
}
MODELS = {"s": "DIFFormer-s", "a": "DIFFormer-a", "gcn": "GCN (DIFFormer recipe)"}


def cell(result: dict) -> str:
    return f"{result['mean']:.2f} +- {result['std']:.2f}"


def done(result: dict) -> str:
    """Nothing for a finished benchmark, " of N planned" for one stopped part way (reproduce.py writes the
    file after every run)."""
    planned = result.get("planned", len(result["runs"]))
    return "" if planned <= len(result["runs"]) else f" of {planned} planned"


def label(result: dict) -> str:
    """The preset and the options given beside it (a data root is where, not what: left out)."""
    extra, options = result.get("extra_args", []), []
    for key, value in zip(extra[::2], extra[1::2]):
        if not key.endswith(".root"):
            options.append(f"{key.replace('--data.init_args.', '')} {value}")
    return f"`{Path(result['config']).stem}`" + "".join(" " + option for option in options)


def seeds_table(results: dict) -> None:
    print("| preset | ours: test acc at best val (%), mean +- std | runs | lowest .. highest | paper (authors' code, 5 runs) |")
    print("|---|---|---|---|---|")
    for name, result in sorted(results.items(), key=lambda item: label(item[1])):
        runs = result["runs"]
        error = statistics.stdev(runs) / len(runs) ** 0.5 if len(runs) > 1 else float("nan")
        print(f"| {label(result)} | {cell(result)} (s.e. of the mean {error:.2f}) | {len(runs)} (seeds 0..{len(runs) - 1}"
              f"{done(result)}) "
              f"| {min(runs):.1f} .. {max(runs):.1f} | {PUBLISHED.get(Path(result['config']).stem, 'n/a')} |")


def splits_table(results: dict) -> None:
    datasets = sorted({name.rsplit("_", 1)[0] for name in results})
    models = [model for model in MODELS if any(name.endswith("_" + model) for name in results)]
    print(f"| dataset | metric (%) | {' | '.join(MODELS[m] for m in models)} | published (other models) |")
    print("|---|---|" + "---|" * len(models) + "---|")
    for dataset in datasets:
        row = [results.get(f"{dataset}_{model}") for model in models]
        metric = next(r["metric"] for r in row if r).split(" at ")[0].replace("test ", "")
        cells = [f"{cell(r)} ({len(r['runs'])} splits{done(r)})" if r else "not run" for r in row]
        print(f"| {dataset} | {metric} | {' | '.join(cells)} | {PUBLISHED_SPLITS.get(dataset, 'none found')} |")


def main(paths) -> None:
    results = {path: json.loads(Path(path).read_text()) for path in paths}
    seeds = {p: r for p, r in results.items() if r.get("over", "seeds") == "seeds"}
    splits = {Path(p).stem: r for p, r in results.items() if r.get("over") == "splits"}
    if seeds:
        seeds_table(seeds)
    if seeds and splits:
        print()
    if splits:
        splits_table(splits)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
