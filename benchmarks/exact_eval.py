"""One exact evaluation against one training epoch, on a synthetic store, with 1 or more ranks.

    python benchmarks/exact_eval.py --nodes 1000000 --devices 1 --out results/exact_eval_1m.json
    python benchmarks/exact_eval.py --nodes 8000000 --devices 2 --out results/exact_eval_8m_2ranks.json

Builds (once, under ``--stores``) the contextual-SBM store of ``--nodes`` nodes (degree 10, 64 float16
features), then, as ``train.py`` runs it (glibc keeping freed memory, DataLoader workers), with the
DIFFormer-s of ``configs/synthetic_partition.yaml`` (hidden 64, 3 layers, graph term, ``use_weight``) on
``--devices`` CPU processes (DDP, gloo):

``--epochs`` training epochs by random partition (batches of ``--batch-size``), each followed by the
validation of ``evaluation='exact'``: the streamed exact forward over every node (chunks of the same
``--batch-size``) plus the metrics over the evaluation batches. Each training epoch and each evaluation
is timed (the slowest rank); the first evaluation of a run also creates its scratch arrays, later ones
reuse them. ``--epochs 0`` runs one evaluation alone (``trainer.validate``), so its memory is its own
and not what training left in the heap (glibc keeps freed memory, as ``train.py`` sets it).

Each rank samples its memory every 100 ms during each phase (/proc/self/smaps_rollup): anonymous memory
(its own heap and tensors) and private memory (pages no other process maps: anonymous memory plus the
file pages of the memory-mapped store and scratch arrays that only this process touched, which the
kernel can drop or write back; with several processes those are shared). Printed as a table row and written to ``--out`` (JSON) by rank 0.
"""
import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from callbacks.memory import process_memory_mb  # noqa: E402
from datamodules import RandomPartitionDataModule  # noqa: E402
from datamodules.synthetic import write_synthetic_store  # noqa: E402
from difformer_lightning import DIFFormer, NodeClassifier  # noqa: E402
from difformer_lightning.allocator import keep_freed_memory  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402


class PeakMemory:
    """The largest private and anonymous memory (MB, :func:`callbacks.memory.process_memory_mb`) of this
    process while the ``with`` block runs, sampled every 100 ms."""

    KEYS = ("private_mb", "anonymous_mb")

    def __enter__(self):
        self.peak, self._stop = dict.fromkeys(self.KEYS, 0.0), threading.Event()
        self._sample_once()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample_once(self):
        now = process_memory_mb()
        for key in self.KEYS:
            self.peak[key] = max(self.peak[key], now.get(key, 0.0))

    def _sample(self):
        while not self._stop.wait(0.1):
            self._sample_once()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample_once()


class Phases(pl.Callback):
    """Times each training epoch (up to its validation) and each validation inside the fit, and samples
    memory during each; validation during the sanity check is not counted."""

    def __init__(self) -> None:
        self.train, self.validation = [], []

    def on_train_epoch_start(self, trainer, module):
        self._memory, self._start = PeakMemory().__enter__(), time.perf_counter()

    def on_validation_start(self, trainer, module):
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self._finish(self.train)
        self._memory, self._start = PeakMemory().__enter__(), time.perf_counter()

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self._finish(self.validation)

    def _finish(self, into: list) -> None:
        seconds = time.perf_counter() - self._start
        self._memory.__exit__(None, None, None)
        into.append({"seconds": seconds, **self._memory.peak})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2,
                        help="training epochs, each followed by an exact evaluation; 0: one evaluation alone")
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
    phases = Phases()
    trainer = pl.Trainer(max_epochs=args.epochs, devices=args.devices, accelerator="cpu",
                         strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[phases])
    if args.epochs:
        trainer.fit(model, datamodule=data)
    else:  # the evaluation alone, in fresh processes: its own memory, not what training left in the heap
        trainer.validate(model, datamodule=data, verbose=False)
    mine = {"rank": trainer.global_rank, "train_epochs": phases.train, "evaluations": phases.validation}
    ranks = [mine]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if trainer.global_rank:
        return
    slowest = lambda phase, i, key: max(r[phase][i][key] for r in ranks)  # noqa: E731
    epochs, evaluations = range(args.epochs), range(len(phases.validation))
    result = {"nodes": args.nodes, "devices": args.devices, "batch_size": args.batch_size, "workers": args.workers,
              "model": "DIFFormer-s, hidden 64, 3 layers, graph term, use_weight",
              "epoch_s": [slowest("train_epochs", i, "seconds") for i in epochs],
              "exact_eval_s": [slowest("evaluations", i, "seconds") for i in evaluations],
              "peak_anonymous_mb": max([slowest("train_epochs", i, "anonymous_mb") for i in epochs]
                                       + [slowest("evaluations", i, "anonymous_mb") for i in evaluations]),
              "exact_eval_peak_anonymous_mb": max(slowest("evaluations", i, "anonymous_mb") for i in evaluations),
              "exact_eval_peak_private_mb": max(slowest("evaluations", i, "private_mb") for i in evaluations),
              "val_acc": float(trainer.callback_metrics["val/acc"]), "ranks": ranks}
    result["eval_over_epoch"] = [e / t for e, t in zip(result["exact_eval_s"], result["epoch_s"])]
    write_json_atomic(args.out, result)
    print("| nodes | ranks | training epoch (s) | exact evaluation (s) | evaluation / epoch | peak anonymous MB "
          "per process (evaluation; run) | peak private MB per process (evaluation) |")
    print("|---|---|---|---|---|---|---|")
    joined = lambda values, form: " / ".join(format(v, form) for v in values)  # noqa: E731
    print(f"| {args.nodes:,} | {args.devices} | {joined(result['epoch_s'], '.1f')} | "
          f"{joined(result['exact_eval_s'], '.1f')} | {joined(result['eval_over_epoch'], '.2f')} | "
          f"{result['exact_eval_peak_anonymous_mb']:,.0f}; {result['peak_anonymous_mb']:,.0f} | "
          f"{result['exact_eval_peak_private_mb']:,.0f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
