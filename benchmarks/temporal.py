"""Spatio-temporal forecasting: the four chickenpox presets (DIFFormer-s / -a, with and without the
graph) trained through ``train.py`` on one dataset, 5 runs each.

    python benchmarks/temporal.py --dataset chickenpox --out results/temporal/chickenpox.json

The presets hold the reference's recipe: 2 layers, hidden 4, Adam lr 1e-2 (weight decay 5e-4), up to
200 epochs, early stopping on validation MSE with patience 20, chronological 20/20/60 split; here 8
snapshots per optimiser step. Reports the test MSE at the best validation epoch, per node and as the
reference's all-pairs (broadcast) error, and writes JSON.
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules.temporal import DEFAULT_LAGS  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402
from reproduce import QUIET  # noqa: E402
from train import main as train_main  # noqa: E402

PRESETS = {"DIFFormer-s": "chickenpox_s", "DIFFormer-s + graph": "chickenpox_s_graph",
           "DIFFormer-a": "chickenpox_a", "DIFFormer-a + graph": "chickenpox_a_graph"}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(preset: str, dataset: str, root: str, seed: int, epochs: int) -> dict:
    data_args = ["--data.init_args.name", dataset] + (["--data.init_args.root", root] if root else [])
    cli = train_main(["fit", "--config", str(CONFIGS / f"{preset}.yaml"), "--seed_everything", str(seed),
                      "--trainer.max_epochs", str(epochs), *QUIET, *data_args], save_config_callback=None)
    module = cli.model
    return {"test_mse": float(module.test_at_best_val), "epochs": cli.trainer.current_epoch,
            "test_mse_all_pairs": float(module.test_all_pairs_at_best_val)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="chickenpox", choices=["chickenpox", "england_covid",
                                                                     "wikivital_mathematics"])
    parser.add_argument("--root", help="data root (default: $DIFFORMER_DATA or ./data)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI gets its arguments from run, not from this command line
    results = {}
    print(f"| {args.dataset} | test MSE per node | all-pairs MSE (reference's) | epochs |\n|---|---|---|---|")
    for name, preset in PRESETS.items():
        runs = [run(preset, args.dataset, args.root, seed, args.epochs) for seed in range(args.runs)]
        mse = [r["test_mse"] for r in runs]
        pairs = [r["test_mse_all_pairs"] for r in runs]
        results[name] = {"test_mse": mse, "mean": statistics.mean(mse), "std": statistics.stdev(mse),
                         "all_pairs_mean": statistics.mean(pairs), "all_pairs_std": statistics.stdev(pairs),
                         "epochs": [r["epochs"] for r in runs]}
        print(f"| {name} | {results[name]['mean']:.4f} +- {results[name]['std']:.4f} | "
              f"{results[name]['all_pairs_mean']:.4f} +- {results[name]['all_pairs_std']:.4f} | "
              f"{statistics.mean(results[name]['epochs']):.0f} |", flush=True)
    write_json_atomic(args.out, {"dataset": args.dataset, "lags": DEFAULT_LAGS[args.dataset], "runs": args.runs,
                                 "snapshots_per_batch": 8, "presets": PRESETS, "models": results})


if __name__ == "__main__":
    main()
