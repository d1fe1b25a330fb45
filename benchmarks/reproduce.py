"""Trains a preset with seeds 0..runs-1 and reports the test metric at the best validation epoch.

    python benchmarks/reproduce.py --config configs/cora_s.yaml --runs 5 --out results/reproduce/cora_s.json
    python benchmarks/reproduce.py --config configs/heterophily_s.yaml --splits 5 --out results/x.json \
        --data.init_args.dataset WebKB --data.init_args.name cornell

Writes ``{"metric", "mean", "std", "runs", "planned", ...}`` (percent) after every run, so a stopped benchmark
keeps what it measured, and prints the same. ``--splits K`` runs the
data module's splits 0..K-1 instead (run ``k``: ``--data.init_args.split k``, seed ``k``), for datasets
published over several splits. Any further arguments go to ``train.py fit`` unchanged (for example
``--trainer.max_epochs 50``).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difformer_lightning.io import write_json_atomic  # noqa: E402
from train import main as train_main  # noqa: E402

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
         "--trainer.enable_model_summary=false"]


def train_once(config: str, seed: int, extra: list) -> tuple:
    with tempfile.TemporaryDirectory(prefix="reproduce-") as folder:  # no run folder under runs/ per run
        cli = train_main(["fit", "--config", config, "--seed_everything", str(seed), *QUIET,
                          "--trainer.default_root_dir", folder, *extra], save_config_callback=None)
    model = cli.model
    return model.metric_name, 100.0 * float(model.test_at_best_val), 100.0 * float(model.best_val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a preset under configs/")
    parser.add_argument("--runs", type=int, default=5, help="seeds 0..runs-1")
    parser.add_argument("--splits", type=int, default=0, help="run splits 0..K-1 (seed k for split k) instead")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args, extra = parser.parse_known_args()
    sys.argv = sys.argv[:1]  # the CLI gets its arguments from train_once, not from this command line
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config} does not exist")

    runs, vals, seconds = [], [], []
    count = args.splits or args.runs
    for seed in range(count):
        start = time.perf_counter()
        split = ["--data.init_args.split", str(seed)] if args.splits else []
        metric, test, val = train_once(args.config, seed, [*extra, *split])
        seconds.append(time.perf_counter() - start)
        runs.append(round(test, 2))
        vals.append(round(val, 2))
        label = f"split {seed}" if args.splits else f"seed {seed}"
        print(f"{label}: val {val:.2f}  test@best_val {test:.2f}  ({seconds[-1]:.0f} s)", flush=True)
        # written after every run: a long benchmark stopped part way keeps what it measured ("planned" says
        # how many runs it was for; benchmarks/table.py marks such a file as incomplete)
        result = summary(args, extra, metric, runs, vals, seconds, planned=count)
        write_json_atomic(args.out, result)
    print(f"{args.config}: {result['metric']} = {result['mean']:.2f} +- {result['std']:.2f} over {count} runs "
          f"({result['seconds_per_run']:.0f} s/run) -> {args.out}")


def summary(args, extra: list, metric: str, runs: list, vals: list, seconds: list, planned: int) -> dict:
    std = statistics.stdev(runs) if len(runs) > 1 else 0.0
    return {"config": args.config, "metric": f"test {metric} at best validation (%)",
            "mean": round(statistics.mean(runs), 2), "std": round(std, 2), "runs": runs, "val_runs": vals,
            "seconds_per_run": round(statistics.mean(seconds), 1), "extra_args": extra,
            "over": "splits" if args.splits else "seeds", "planned": planned}


if __name__ == "__main__":
    main()
