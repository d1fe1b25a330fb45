"""One exact evaluation against one training epoch, on a synthetic store, with 1 or more ranks.

    python benchmarks/exact_eval.py --nodes 1000000 --devices 1 --out results/exact_eval_1m.json
    python benchmarks/exact_eval.py --nodes 8000000 --hidden 256 --devices 2 --out results/exact_eval_8m_h256_2ranks.json
    python benchmarks/exact_eval.py --nodes 3000000 --degree 767 --hidden 16 --layers 1 --out results/exact_eval_dense.json

Builds (once, under ``--stores``) the contextual-SBM store of ``--nodes`` nodes (average degree
``--degree``, 64 float16 features), or uses ``--store``; then, as ``train.py`` runs it (glibc keeping freed
memory, DataLoader workers), a DIFFormer-s like ``configs/synthetic_partition.yaml``'s (``--hidden``,
``--layers``, graph term, ``use_weight``) on ``--devices`` CPU processes (DDP, gloo):

``--epochs`` training epochs by random partition (batches of ``--batch-size``), each followed by the
validation of ``evaluation='exact'``: the streamed exact forward over every node (chunks of
``--eval-batch-size``, the batch size by default) plus the metrics over the evaluation batches. Each
training epoch and each evaluation is timed (the slowest rank) and its CPU time counted (every process of
the run: ranks and their DataLoader workers). ``--epochs 0`` runs one evaluation alone
(``trainer.validate``), so its memory is its own and not what training left in the heap.

Each rank samples its memory every 100 ms during each phase (/proc/self/smaps_rollup): anonymous memory
(its own heap and tensors) and private memory (pages no other process maps, which includes file pages of
the memory-mapped store and scratch arrays that only this process touched). The scratch folder
(``--scratch-dir``, a temporary folder by default) is measured after each evaluation: bytes allocated on
disk (``st_blocks``) and apparent size. Printed as a table row and written to ``--out`` (JSON) by rank 0.
The script runs against any version of the project (it uses only the public API the versions share), so
the same command measures a change before and after.
"""
import argparse
import json
import os
import resource
import shutil
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
from proc import cpu_seconds, folder_sizes  # noqa: E402


def cpu_now() -> float:
    finished = resource.getrusage(resource.RUSAGE_CHILDREN)
    # this process and its live workers, plus the children that already exited
    return cpu_seconds(os.getpid()) + finished.ru_utime + finished.ru_stime


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
    """Times each training epoch (up to its validation) and each validation inside the fit, counts their CPU
    time and samples memory during each; validation during the sanity check is not counted."""

    def __init__(self, scratch_dir: Path) -> None:
        self.train, self.validation, self.scratch_dir = [], [], scratch_dir

    def _begin(self):
        self._memory, self._start, self._cpu = PeakMemory().__enter__(), time.perf_counter(), cpu_now()

    def on_train_epoch_start(self, trainer, module):
        self._begin()

    def on_validation_start(self, trainer, module):
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self._finish(self.train)
        self._begin()

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self._finish(self.validation, scratch=folder_sizes(self.scratch_dir))

    def _finish(self, into: list, **extra) -> None:
        seconds, cpu = time.perf_counter() - self._start, cpu_now() - self._cpu
        self._memory.__exit__(None, None, None)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            extra["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        into.append({"seconds": seconds, "cpu_seconds": cpu, **self._memory.peak, **extra})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--degree", type=float, default=10.0, help="average degree of the synthetic store")
    parser.add_argument("--store", default=None, help="an existing store (instead of --nodes/--degree)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--eval-batch-size", type=int, default=None, help="nodes per exact chunk (batch size)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or gpu (devices: GPUs)")
    parser.add_argument("--epochs", type=int, default=1,
                        help="training epochs, each followed by an exact evaluation; 0: one evaluation alone")
    parser.add_argument("--stores", default=str(Path(tempfile.gettempdir()) / "difformer-stores"))
    parser.add_argument("--scratch-dir", default=None, help="where the exact pass keeps its scratch arrays")
    parser.add_argument("--label", default="", help="a note stored in the JSON (e.g. the code version)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    keep_freed_memory()

    if args.store:
        store = Path(args.store)
    else:
        suffix = "" if args.degree == 10 else f"-d{args.degree:g}"
        store = Path(args.stores) / f"csbm-{args.nodes}{suffix}"
        if not (store / "meta.json").is_file():  # rank 0 of a fresh run builds it before any rank starts
            write_synthetic_store(store, args.nodes, seed=0, avg_degree=args.degree)
    own_scratch = args.scratch_dir is None
    scratch_dir = Path(args.scratch_dir or os.environ.get("DIFFORMER_BENCH_SCRATCH")
                       or tempfile.mkdtemp(prefix="exact-eval-bench-"))
    os.environ["DIFFORMER_BENCH_SCRATCH"] = str(scratch_dir)  # DDP ranks Lightning starts use the same folder
    pl.seed_everything(0)
    data = RandomPartitionDataModule(str(store), batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                                     num_workers=args.workers, evaluation="exact", scratch_dir=str(scratch_dir))
    num_features = data.store.num_features
    model = NodeClassifier(DIFFormer(num_features, args.hidden, data.store.num_classes, num_layers=args.layers,
                                     use_weight=True), lr=1e-2, weight_decay=0.0)
    phases = Phases(scratch_dir)
    trainer = pl.Trainer(max_epochs=args.epochs, devices=args.devices, accelerator=args.accelerator,
                         strategy="ddp" if args.devices > 1 else "auto", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         precision=args.precision, callbacks=[phases])
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
    if own_scratch:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    slowest = lambda phase, i, key: max(r[phase][i][key] for r in ranks)  # noqa: E731
    total = lambda phase, i, key: sum(r[phase][i][key] for r in ranks)  # noqa: E731
    epochs, evaluations = range(len(phases.train)), range(len(phases.validation))
    meta = json.loads((store / "meta.json").read_text())
    result = {"label": args.label, "nodes": meta["num_nodes"], "entries": meta["num_edges"], "devices": args.devices,
              "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size or args.batch_size,
              "workers": args.workers, "precision": args.precision, "hidden": args.hidden, "layers": args.layers,
              "model": f"DIFFormer-s, hidden {args.hidden}, {args.layers} layers, graph term, use_weight",
              "epoch_s": [slowest("train_epochs", i, "seconds") for i in epochs],
              "epoch_cpu_s": [total("train_epochs", i, "cpu_seconds") for i in epochs],
              "exact_eval_s": [slowest("evaluations", i, "seconds") for i in evaluations],
              "exact_eval_cpu_s": [total("evaluations", i, "cpu_seconds") for i in evaluations],
              "peak_anonymous_mb": max([slowest("train_epochs", i, "anonymous_mb") for i in epochs]
                                       + [slowest("evaluations", i, "anonymous_mb") for i in evaluations]),
              "exact_eval_peak_anonymous_mb": max(slowest("evaluations", i, "anonymous_mb") for i in evaluations),
              "exact_eval_peak_private_mb": max(slowest("evaluations", i, "private_mb") for i in evaluations),
              "scratch_allocated_bytes": max(r["evaluations"][i]["scratch"]["allocated"] for r in ranks
                                             for i in evaluations),
              "scratch_apparent_bytes": max(r["evaluations"][i]["scratch"]["apparent"] for r in ranks
                                            for i in evaluations),
              "val_acc": float(trainer.callback_metrics["val/acc"]), "ranks": ranks,
              "cuda_peak_mb": max([e.get("cuda_peak_mb", 0.0) for r in ranks for e in r["evaluations"] + r["train_epochs"]]
                                  or [0.0])}
    result["eval_over_epoch"] = [e / t for e, t in zip(result["exact_eval_s"], result["epoch_s"])]
    result["eval_cpu_over_epoch_cpu"] = [e / t for e, t in zip(result["exact_eval_cpu_s"], result["epoch_cpu_s"])]
    write_json_atomic(args.out, result)
    print("| nodes | entries | hidden x layers | ranks | training epoch (s; CPU s) | exact evaluation (s; CPU s) | "
          "evaluation / epoch (wall; CPU) | peak anonymous MB per rank (evaluation; run) | scratch on disk (GB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    joined = lambda values, form: " / ".join(format(v, form) for v in values)  # noqa: E731
    print(f"| {result['nodes']:,} | {result['entries']:,} | {args.hidden} x {args.layers} | {args.devices} | "
          f"{joined(result['epoch_s'], '.1f')}; {joined(result['epoch_cpu_s'], '.0f')} | "
          f"{joined(result['exact_eval_s'], '.1f')}; {joined(result['exact_eval_cpu_s'], '.0f')} | "
          f"{joined(result['eval_over_epoch'], '.2f')}; {joined(result['eval_cpu_over_epoch_cpu'], '.2f')} | "
          f"{result['exact_eval_peak_anonymous_mb']:,.0f}; {result['peak_anonymous_mb']:,.0f} | "
          f"{result['scratch_allocated_bytes'] / 1e9:.2f} |")
    print(json.dumps({k: v for k, v in result.items() if k != "ranks"}))


if __name__ == "__main__":
    main()
