"""Memory and data wait of a random-partition training run over a graph store, one or more DDP ranks.

    python benchmarks/train_memory.py --store runs/stores/csbm-10000000-10 --devices 1 --out results/train_memory_1.json
    python benchmarks/train_memory.py --store runs/stores/csbm-10000000-10 --devices 2 --out results/train_memory_2.json

Runs ``train.py fit`` (configs/synthetic_partition.yaml on ``--store``) for ``--steps`` steps in a
child process and samples every process of its tree (DDP ranks, DataLoader workers) twice a
second from /proc: the summed PSS (shared pages divided among their users, so the store's page
cache counts once), and each process's private memory. The data-wait fraction comes from the
``Throughput`` callback's log.
"""
import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from difformer_lightning.io import write_json_atomic  # noqa: E402
from proc import memory_kb, tree  # noqa: E402


def fit_command(store: str, batch_size: int, workers: int, devices: int, logs: str, extra: list) -> list:
    """``train.py fit`` of configs/synthetic_partition.yaml on ``store``: training only, on CPU,
    with the Throughput callback logging to CSV under ``logs``."""
    command = [sys.executable, "train.py", "fit", "--config", "configs/synthetic_partition.yaml",
               "--data.init_args.store", store, "--data.init_args.batch_size", str(batch_size),
               "--data.init_args.num_workers", str(workers), "--trainer.accelerator", "cpu",
               "--trainer.devices", str(devices), "--trainer.limit_val_batches", "0",
               "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false",
               "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=callbacks.Throughput",
               "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", logs, *extra]
    return command + (["--trainer.strategy", "ddp"] if devices > 1 else [])


def throughput(logs: str) -> tuple:
    """Per epoch: the data-wait fractions and nodes per second the Throughput callback logged."""
    rows = list(csv.DictReader(next(Path(logs).rglob("metrics.csv")).open()))
    wait = [float(r["throughput/data_wait_fraction"]) for r in rows if r.get("throughput/data_wait_fraction")]
    speed = [float(r["throughput/nodes_per_s"]) for r in rows if r.get("throughput/nodes_per_s")]
    return wait, speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logs:
        command = fit_command(args.store, args.batch_size, args.workers, args.devices, logs,
                              ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(args.steps)])
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak_pss = peak_private = peak_processes = 0
        while child.poll() is None:
            samples = [m for m in map(memory_kb, tree(child.pid)) if m]
            if samples:
                peak_pss = max(peak_pss, sum(m["pss"] for m in samples))
                peak_private = max(peak_private, max(m["private"] for m in samples))
                peak_processes = max(peak_processes, len(samples))
            time.sleep(0.5)
        if child.returncode:
            raise SystemExit(f"training failed:\n{child.stderr.read()[-3000:]}")
        wait, speed = throughput(logs)
    result = {"store": args.store, "devices": args.devices, "workers_per_rank": args.workers,
              "batch_size": args.batch_size, "steps": args.steps, "seconds": round(time.perf_counter() - start, 1),
              "processes": peak_processes, "peak_total_pss_mb": round(peak_pss / 1024),
              "peak_private_per_process_mb": round(peak_private / 1024),
              "data_wait_fraction": round(wait[-1], 3) if wait else None,
              "nodes_per_s": round(speed[-1]) if speed else None}
    write_json_atomic(args.out, result)
    for key, value in result.items():
        print(f"{key:<28} {value}")


if __name__ == "__main__":
    main()
