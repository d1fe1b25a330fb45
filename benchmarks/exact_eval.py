"""One exact evaluation against one training epoch, on a synthetic store, with 1 or more ranks.

    python benchmarks/exact_eval.py --nodes 1000000 --devices 1 --out results/exact_eval_1m.json
    python benchmarks/exact_eval.py --nodes 8000000 --devices 2 --out results/exact_eval_8m_2ranks.json

Builds (once, under ``--stores``) the contextual-SBM store of ``--nodes`` nodes (degree 10, 64 float16
features), then, as ``train.py`` runs it (glibc keeping freed memory, DataLoader workers), with the
DIFFormer-s of ``configs/synthetic_partition.yaml`` (hidden 64, 3 layers, graph term, ``use_weight``) on
``--devices`` CPU processes (DDP, gloo):

* one training epoch by random partition (batches of ``--batch-size``), no validation;
* one ``trainer.validate`` with ``evaluation='exact'``: the streamed exact forward over every node
  (chunks of the same ``--batch-size``) plus the metrics over the evaluation batches.

Each rank samples its private memory (``Private_Clean + Private_Dirty`` of /proc/self/smaps_rollup,
every 20 ms) during each phase; the memory-mapped store and scratch arrays are shared page cache, not
private. Printed as a table row and written to ``--out`` (JSON) by rank 0.
"""
import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from callbacks.memory import process_memory_mb  # noqa: E402
from datamodules import RandomPartitionDataModule  # noqa: E402
from datamodules.synthetic import write_synthetic_store  # noqa: E402
from difformer_lightning import DIFFormer, NodeClassifier  # noqa: E402
from difformer_lightning.allocator import keep_freed_memory  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402


class PeakPrivateMemory:
    """The largest private memory (MB) of this process while the ``with`` block runs."""

    def __enter__(self):
        self.peak, self._stop = process_memory_mb().get("private_mb", 0.0), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, process_memory_mb().get("private_mb", 0.0))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, process_memory_mb().get("private_mb", 0.0))


class Phase(pl.Callback):
    """Times the training epoch and samples private memory while it runs."""

    def on_train_epoch_start(self, trainer, module):
        self.memory = PeakPrivateMemory().__enter__()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start
        self.memory.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stores", default=str(Path(tempfile.gettempdir()) / "difformer-stores"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    keep_freed_memory()

    store = Path(args.stores) / f"csbm-{args.nodes}"
    if not (store / "meta.json").is_file():  # rank 0 of a fresh run builds it before any rank starts
        write_synthetic_store(store, args.nodes, seed=0)
    pl.seed_everything(0)
    data = RandomPartitionDataModule(str(store), batch_size=args.batch_size, num_workers=args.workers,
                                     evaluation="exact")
    model = NodeClassifier(DIFFormer(64, 64, 10, num_layers=3, use_weight=True), lr=1e-2, weight_decay=0.0)
    phase = Phase()
    trainer = pl.Trainer(max_epochs=1, devices=args.devices, accelerator="cpu",
                         strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[phase])
    trainer.fit(model, datamodule=data)
    with PeakPrivateMemory() as memory:
        start = time.perf_counter()
        metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
        seconds = time.perf_counter() - start
    mine = {"rank": trainer.global_rank, "epoch_s": phase.seconds, "epoch_private_mb": phase.memory.peak,
            "exact_eval_s": seconds, "exact_eval_private_mb": memory.peak}
    ranks = [mine]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if trainer.global_rank:
        return
    result = {"nodes": args.nodes, "devices": args.devices, "batch_size": args.batch_size, "workers": args.workers,
              "model": "DIFFormer-s, hidden 64, 3 layers, graph term, use_weight",
              "epoch_s": max(r["epoch_s"] for r in ranks), "exact_eval_s": max(r["exact_eval_s"] for r in ranks),
              "exact_eval_private_mb_max": max(r["exact_eval_private_mb"] for r in ranks),
              "epoch_private_mb_max": max(r["epoch_private_mb"] for r in ranks),
              "val_acc": metrics["val/acc"], "ranks": ranks}
    result["eval_over_epoch"] = result["exact_eval_s"] / result["epoch_s"]
    write_json_atomic(args.out, result)
    print("| nodes | ranks | training epoch (s) | exact evaluation (s) | eval / epoch | peak private MB per process "
          "(eval; epoch) |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.nodes:,} | {args.devices} | {result['epoch_s']:.1f} | {result['exact_eval_s']:.1f} | "
          f"{result['eval_over_epoch']:.2f} | {result['exact_eval_private_mb_max']:,.0f}; "
          f"{result['epoch_private_mb_max']:,.0f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
