"""Spatio-temporal forecasting: DIFFormer-s / -a with and without the graph on one dataset, under one protocol,
N runs (seeds 0..N-1) each through ``train.py``, beside forecasters that learn nothing.

    python benchmarks/temporal.py --dataset chickenpox --protocol reference --runs 10 --out results/temporal/chickenpox_reference.json
    python benchmarks/temporal.py --dataset england_covid --protocol standard --runs 10 --out results/temporal/england_covid_standard.json
    python benchmarks/temporal.py --dataset england_covid --protocol standard --edge-weight-transform log1p --runs 10 --out ...

``--protocol reference`` trains ``configs/reference/<dataset>_<variant>.yaml`` (the authors' spatial-temporal
protocol exactly: all-pairs objective, one step per epoch, their stopping rule and per-configuration
hyperparameters), ``standard`` ``configs/<dataset>_<variant>.yaml`` (per-node MSE, consecutive patience).
For every run it records the test error at the best validation epoch, per node (``test_mse``) and as the
reference's all-pairs broadcast error (``test_mse_all_pairs``), the epochs run and, for the configurations
with a graph, the graph term's size over the attention term's at initialisation per layer
(``callbacks.Energy``). The trivial forecasters (``difformer_lightning.trivial_forecasts``) are scored on
the same test snapshots. The spread is the population standard deviation (ddof 0), as the reference reports
it. Writes JSON after every configuration.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from callbacks import Energy  # noqa: E402
from datamodules import TemporalDataModule  # noqa: E402
from difformer_lightning import all_pairs_mse, trivial_forecasts  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402
from train import main as train_main  # noqa: E402

VARIANTS = {"s": "DIFFormer-s", "s_graph": "DIFFormer-s + graph", "a": "DIFFormer-a", "a_graph": "DIFFormer-a + graph"}
QUIET = ["--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"]


def preset(dataset: str, protocol: str, variant: str) -> Path:
    folder = ROOT / "configs" / ("reference" if protocol == "reference" else "")
    return folder / f"{dataset}_{variant}.yaml"


def run(config: Path, seed: int, data_args: list, graph: bool) -> dict:
    energy = ["--trainer.callbacks+=callbacks.Energy"] if graph else []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="temporal-") as folder:  # no run folder under runs/ per run
        cli = train_main(["fit", "--config", str(config), "--seed_everything", str(seed), *QUIET, *energy, *data_args,
                          "--trainer.default_root_dir", folder], save_config_callback=None)
    module = cli.model
    ratios = next((c.initial_graph_ratios for c in cli.trainer.callbacks if isinstance(c, Energy)), None)
    return {"test_mse": float(module.test_at_best_val), "test_mse_all_pairs": float(module.test_all_pairs_at_best_val),
            "epochs": cli.trainer.current_epoch, "graph_ratio": ratios, "wall_s": time.perf_counter() - began}


def trivial(datamodule: TemporalDataModule) -> dict:
    """Each trivial forecaster's per-node and all-pairs MSE over the test snapshots (all-pairs: the mean over
    snapshots of each one's, as the module and the reference average it)."""
    squares, pairs, count = {}, {}, 0
    for snapshot in datamodule.splits["test"]:
        batch = torch.zeros(snapshot.num_nodes, dtype=torch.long)
        count += snapshot.num_nodes
        for name, forecast in trivial_forecasts(snapshot.x, batch).items():
            squares[name] = squares.get(name, 0.0) + float((forecast - snapshot.y).pow(2).sum())
            pairs.setdefault(name, []).append(float(all_pairs_mse(forecast, snapshot.y, batch)[0]))
    return {name: {"test_mse": squares[name] / count, "test_mse_all_pairs": statistics.mean(pairs[name])}
            for name in squares}


def spread(values: list) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="chickenpox", choices=["chickenpox", "england_covid"])
    parser.add_argument("--protocol", default="standard", choices=["standard", "reference"])
    parser.add_argument("--edge-weight-transform", default="none", choices=["none", "log1p", "max"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--root", help="data root (default: $DIFFORMER_DATA or ./data)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # graphs of 20 and 129 nodes: one thread is fastest, and a second thread spinning on a shared core
    # made each step several times slower here
    torch.set_num_threads(1)
    sys.argv = sys.argv[:1]  # the CLI gets its arguments from run, not from this command line
    data_args = ["--data.init_args.name", args.dataset, "--data.init_args.edge_weight_transform",
                 args.edge_weight_transform] + (["--data.init_args.root", args.root] if args.root else [])
    datamodule = TemporalDataModule(args.dataset, root=args.root, edge_weight_transform=args.edge_weight_transform)
    result = {"dataset": args.dataset, "protocol": args.protocol, "edge_weight_transform": args.edge_weight_transform,
              "runs": args.runs, "seeds": list(range(args.runs)), "spread": "population standard deviation (ddof 0)",
              "split": {name: len(part) for name, part in datamodule.splits.items()},
              "trivial": trivial(datamodule), "configs": {}}
    print(f"| {args.dataset}, {args.protocol} protocol, weights {args.edge_weight_transform} | test MSE per node | "
          f"test all-pairs MSE (reference's) | epochs | graph / attention at init |\n|---|---|---|---|---|")
    for name, values in result["trivial"].items():
        print(f"| trivial: {name} | {values['test_mse']:.4f} | {values['test_mse_all_pairs']:.4f} | | |")
    for variant in args.variants:
        config = preset(args.dataset, args.protocol, variant)
        runs = [run(config, seed, data_args, variant.endswith("graph")) for seed in range(args.runs)]
        entry = {key: [r[key] for r in runs] for key in ("test_mse", "test_mse_all_pairs", "epochs", "wall_s",
                                                         "graph_ratio")}
        entry.update(preset=str(config.relative_to(ROOT)), test_mse_spread=spread(entry["test_mse"]),
                     test_mse_all_pairs_spread=spread(entry["test_mse_all_pairs"]))
        result["configs"][variant] = entry
        ratio = runs[0]["graph_ratio"]
        print(f"| {VARIANTS[variant]} | {entry['test_mse_spread']['mean']:.4f} +- {entry['test_mse_spread']['std']:.4f} | "
              f"{entry['test_mse_all_pairs_spread']['mean']:.4f} +- {entry['test_mse_all_pairs_spread']['std']:.4f} | "
              f"{statistics.mean(entry['epochs']):.0f} | {', '.join(f'{r:.3g}' for r in ratio) if ratio else ''} |",
              flush=True)
        write_json_atomic(args.out, result)
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
