"""ogbn-papers100M's shape on one machine, end to end: build the store, train, evaluate every node exactly,
predict the test nodes, measuring each step.

    python benchmarks/papers100m_rehearsal.py --scale 1 --workdir /data/rehearsal --out results/papers100m_rehearsal.json
    python benchmarks/papers100m_rehearsal.py --scale 0.001 --workdir /tmp/r --out /tmp/r.json     # minutes

A synthetic graph of papers100M's shape times ``--scale`` S: 111,059,956 x S nodes, 1,615,685,872 x S
undirected pairs (both directions stored: 3.23 billion entries at S = 1) drawn with power-law degrees
(``--degree-exponent``, 2.5: a heavy tail like a citation graph's), 128 float16 features, 172 classes
(a contextual SBM: labels carry signal), and a train / val / test split of 1,207,179 / 125,265 / 214,338 x S
nodes, the rest unlabelled (98.6%). Each step runs in processes of its own, through the project's public API
and ``train.py``, while this script samples every process of the step's tree from /proc:

1. ``build``: ``datamodules.synthetic.write_synthetic_store`` (the store writer's external sort, its full
   check); wall and CPU seconds, the largest anonymous memory, bytes written (``/proc/<pid>/io``: what the
   process sent to storage, less what it deleted before it was written) and the store's size.
2. ``train``: ``train.py fit`` for ``--steps`` steps with ``configs/ogbn_papers100m_s.yaml``'s batching
   (``--batch-size`` labelled seeds plus ``--fanout`` sampled in-neighbours each, ``--workers`` DataLoader
   workers) and model options, at ``--hidden`` x ``--layers`` (the exact pass's scratch must fit this disk:
   see below), float32 on the CPU; no validation.
3. ``exact_eval``: ``train.py validate`` of that checkpoint: the exact pass over every node (scratch in the
   work folder, its largest size on disk sampled) and the metrics of the labelled nodes.
4. ``predict``: ``train.py predict --data.init_args.predict_nodes test``: the test nodes' rows (a second pass).

The JSON (written after every step, so a stopped run keeps what it measured) holds the sizes, each step's
``wall_s`` and ``peak_anon_mb`` (the largest one process reached: rank or worker), and ``peak_anon_mb_any``
over all steps. ``--keep`` keeps the work folder (the store takes 43 GB at S = 1), otherwise it is removed.
"""
import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from difformer_lightning.io import write_json_atomic  # noqa: E402
from proc import TreeSampler, io_bytes, written_since  # noqa: E402

PAPERS100M = {"nodes": 111_059_956, "pairs": 1_615_685_872, "features": 128, "classes": 172,
              "train": 1_207_179, "val": 125_265, "test": 214_338}


def sizes(scale: float) -> dict:
    nodes = max(1000, round(PAPERS100M["nodes"] * scale))
    split = {name: max(10, round(PAPERS100M[name] * scale)) for name in ("train", "val", "test")}
    return {"nodes": nodes, "pairs": round(PAPERS100M["pairs"] * scale), **split}


def build(args) -> None:
    """The ``build`` step, in its own process: prints its own measurements as JSON on the last line."""
    from datamodules.synthetic import write_synthetic_store
    import numpy as np

    size = sizes(args.scale)
    began, before = time.perf_counter(), io_bytes(os.getpid())
    fractions = tuple(size[name] / size["nodes"] for name in ("train", "val", "test"))
    write_synthetic_store(Path(args.workdir) / "store", size["nodes"], num_classes=PAPERS100M["classes"],
                          num_features=PAPERS100M["features"], avg_degree=2 * size["pairs"] / size["nodes"],
                          degree_exponent=args.degree_exponent, split=fractions, seed=args.seed,
                          feature_dtype=np.float16, overwrite=True)
    after, usage = io_bytes(os.getpid()), resource.getrusage(resource.RUSAGE_SELF)
    written = written_since(before, after)
    print(json.dumps({"wall_s": time.perf_counter() - began, "cpu_s": usage.ru_utime + usage.ru_stime,
                      "written_bytes": written}))


def run_step(command, out_dir: Path, folder: Path = None) -> dict:
    """Runs ``command`` (a list) with its output in ``out_dir``/<name>.log, sampling its process tree."""
    log = out_dir / f"{command[2] if command[1].endswith('train.py') else 'build'}.log"
    began = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, text=True)
        sampler = TreeSampler(process.pid, folder=folder)
        code = process.wait()
        sampler.stop()
    wall = time.perf_counter() - began
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed with {code}; see {log}:\n"
                           + "".join(log.read_text().splitlines(True)[-30:]))
    return {"wall_s": wall, "peak_anon_mb": sampler.peak_process_anonymous_kb / 1024, "processes": sampler.processes,
            "peak_total_pss_mb": sampler.peak_total_pss_kb / 1024, "cpu_s": sampler.cpu,
            "peak_folder_gb": sampler.peak_folder_bytes / 1e9, "log": log.read_text()}


def rehearsal_config(args, workdir: Path) -> Path:
    """The papers100M preset with the synthetic store in place of OGB's download, this run's model size and
    steps, float32 on the CPU."""
    preset = yaml.safe_load((ROOT / "configs" / "ogbn_papers100m_s.yaml").read_text())
    preset["model"]["encoder"].update(hidden_channels=args.hidden, num_layers=args.layers)
    preset["data"] = {"class_path": "datamodules.RandomPartitionDataModule", "init_args": {
        "store": str(workdir / "store"), "batch_size": min(args.batch_size, sizes(args.scale)["train"]),
        "fanout": args.fanout,
        "num_workers": args.workers, "scratch_dir": str(workdir / "scratch"), "evaluation": "exact"}}
    preset["trainer"].update(precision="32-true", max_steps=args.steps, limit_val_batches=0,
                             num_sanity_val_steps=0, enable_progress_bar=False, accelerator="cpu", devices=1,
                             default_root_dir=str(workdir / "run"), log_every_n_steps=1)
    preset["trainer"].pop("check_val_every_n_epoch", None)
    path = workdir / "rehearsal.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--fanout", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--degree-exponent", type=float, default=2.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the store) afterwards")
    parser.add_argument("--phase", choices=["build"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "build":
        return build(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "scratch").mkdir(exist_ok=True)
    size = sizes(args.scale)
    result = {"scale": args.scale, "num_nodes": size["nodes"], "num_features": PAPERS100M["features"],
              "feature_dtype": "float16", "num_classes": PAPERS100M["classes"], "split": {k: size[k] for k in
                                                                                         ("train", "val", "test")},
              "degree_exponent": args.degree_exponent, "note": "every figure measured on this machine"}

    def save():
        write_json_atomic(args.out, {**result, "peak_anon_mb_any": max(
            [step["peak_anon_mb"] for step in result.values() if isinstance(step, dict) and "peak_anon_mb" in step]
            or [0.0])})

    try:
        step = run_step([sys.executable, str(Path(__file__).resolve()), "--phase", "build", "--scale", str(args.scale),
                         "--workdir", str(workdir), "--out", args.out, "--degree-exponent", str(args.degree_exponent), "--seed",
                         str(args.seed)], workdir)
        measured = json.loads(step.pop("log").strip().splitlines()[-1])
        meta = json.loads((workdir / "store" / "meta.json").read_text())
        result["num_entries"] = meta["num_edges"]
        result["build"] = {"wall_s": measured["wall_s"], "cpu_s": measured["cpu_s"],
                           "peak_anon_mb": step["peak_anon_mb"], "written_gb": measured["written_bytes"] / 1e9,
                           "store_gb": sum(spec["bytes"] for spec in meta["arrays"].values()) / 1e9}
        result["build"]["written_over_store"] = result["build"]["written_gb"] / result["build"]["store_gb"]
        save()
        config = rehearsal_config(args, workdir)
        train = [sys.executable, str(ROOT / "train.py")]
        step = run_step(train + ["fit", "--config", str(config)], workdir)
        step.pop("log")
        result["train"] = {"steps": args.steps, "batch_seeds": args.batch_size, "fanout": args.fanout,
                           "workers": args.workers, "hidden": args.hidden, "layers": args.layers, **step}
        save()
        checkpoint = workdir / "run" / "checkpoints" / "last.ckpt"
        step = run_step(train + ["validate", "--config", str(config), "--ckpt_path", str(checkpoint),
                                 "--trainer.limit_val_batches", "1.0"], workdir, folder=workdir / "scratch")
        log = step.pop("log")
        passes = [line for line in log.splitlines() if line.startswith("exact pass")]
        # the scratch's size as the pass reports it (its files are reserved whole); the folder sampled every
        # 0.5 s (peak_folder_gb) misses a pass that ends sooner
        reported = [re.search(r"; scratch ([\d,.]+) GB in ", line) for line in passes]
        scratch_gb = max([float(m.group(1).replace(",", "")) for m in reported if m] or [0.0])
        result["exact_eval"] = {"nodes": size["nodes"], "hidden": args.hidden, "layers": args.layers,
                                "scratch_gb": scratch_gb, **step, "progress": passes[:1] + passes[-2:]}
        save()
        step = run_step(train + ["predict", "--config", str(config), "--ckpt_path", str(checkpoint),
                                 "--data.init_args.predict_nodes", "test"], workdir, folder=workdir / "scratch")
        step.pop("log")
        import numpy as np
        rows = np.load(workdir / "run" / "predictions" / "logits.npy", mmap_mode="r").shape[0]
        result["predict"] = {"rows": rows, **step}
        save()
    finally:
        save()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
