"""Epoch time of random-partition training against graph size: synthetic stores of 1M to 8M nodes.

    python benchmarks/scaling.py --out results/scaling.json

For every size, a contextual-SBM store with the same average degree (10) and features (64, float16)
is built under ``--stores`` (kept for reruns), then ``train.py fit`` trains one epoch of
configs/synthetic_partition.yaml on it (DIFFormer-s, 3 layers, hidden 64, batches of 100,000 nodes,
2 DataLoader workers, no validation) in a child process. ``epoch_s`` is the training epoch's wall
time and ``data_wait_fraction`` the share of it the loop waited for batches (both from the
Throughput callback). A batch costs the same whatever the graph's size (its induced subgraph keeps
degree x batch / N edges per node, fewer on larger graphs), so the epoch time should grow with the
number of batches: ``ratio_8m_1m`` near 8.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from datamodules.synthetic import write_synthetic_store  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402
from train_memory import fit_command, throughput  # noqa: E402


def ensure_store(folder: Path, num_nodes: int, degree: float) -> Path:
    path = folder / f"csbm-{num_nodes}-{degree:g}"
    if not (path / "meta.json").is_file():
        start = time.perf_counter()
        write_synthetic_store(path, num_nodes, avg_degree=degree)
        print(f"built {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def epoch(store: Path, batch_size: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as logs:
        command = fit_command(str(store), batch_size, workers, 1, logs, ["--trainer.max_epochs", "1"])
        start = time.perf_counter()
        child = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if child.returncode:
            raise SystemExit(f"training on {store} failed:\n{child.stderr[-3000:]}")
        wait, speed = throughput(logs)
    return {"nodes_per_s": speed[-1], "data_wait_fraction": wait[-1], "process_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000, 8_000_000])
    parser.add_argument("--degree", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stores", default="runs/stores", help="folder for the stores (built once, reused)")
    args = parser.parse_args()

    rows = []
    print("| nodes | batches | epoch (s) | s per batch | nodes/s | data wait |\n|---|---|---|---|---|---|", flush=True)
    for size in args.sizes:
        measured = epoch(ensure_store(Path(args.stores), size, args.degree), args.batch_size, args.workers)
        batches = -(-size // args.batch_size)
        row = {"nodes": size, "batches": batches, "epoch_s": size / measured["nodes_per_s"], **measured}
        rows.append(row)
        print(f"| {size:,} | {batches} | {row['epoch_s']:.1f} | {row['epoch_s'] / batches:.2f} | "
              f"{row['nodes_per_s']:,.0f} | {row['data_wait_fraction']:.1%} |", flush=True)
    by_size = {row["nodes"]: row for row in rows}
    result = {"degree": args.degree, "batch_size": args.batch_size, "workers": args.workers,
              "epoch_s": {str(size): row["epoch_s"] for size, row in by_size.items()},
              "data_wait_fraction": {str(size): row["data_wait_fraction"] for size, row in by_size.items()},
              "mean_data_wait_fraction": statistics.mean(row["data_wait_fraction"] for row in rows), "runs": rows}
    if 1_000_000 in by_size and 8_000_000 in by_size:
        result["ratio_8m_1m"] = by_size[8_000_000]["epoch_s"] / by_size[1_000_000]["epoch_s"]
        print(f"epoch time 8M / 1M: {result['ratio_8m_1m']:.2f} (linear: 8)")
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
