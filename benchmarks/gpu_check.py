"""The GPU rows of docs/performance.md and docs/large-graphs.md in one run (about 8 minutes on one machine with CUDA devices).

    python benchmarks/gpu_check.py --out results/gpu_check.json          # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json   # the same steps, tiny, on the CPU

Every step runs in a process of its own (fresh CUDA memory counters) and writes its JSON into the work
folder; this script gathers them into ``--out`` after each step (a stopped run keeps what it measured) and
prints a table:

1. ``step``: one training step of DIFFormer-s against PyG's SGFormer on one GPU (``benchmarks/step.py
   --device cuda``: a 100,000-node batch of a 200,000-node store, hidden 128, 3 layers).
2. ``exact_bf16``, ``exact_fp16``: the exact pass over every node of a 10M-node store (average degree 10,
   64 features; DIFFormer-s, hidden 256, 3 layers, graph term) on one GPU under ``bf16-mixed`` and
   ``16-mixed`` autocast, states and values stored in 16 bits: seconds, peak GPU memory, scratch bytes, and
   the share of nodes whose predicted class equals the float32 pass's (run too, once).
3. ``ddp``: ``benchmarks/exact_eval.py`` over every visible GPU (DDP, NCCL, ``bf16-mixed``): one training epoch
   by random partition on a 2M-node store and one exact evaluation; seconds and peak GPU memory per rank.

``--dry-run`` runs the same code on the CPU at a tiny size (stores of 20,000 nodes, 2 CPU processes for DDP)
to check that the script works where no GPU is; its figures mean nothing.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from difformer_lightning.io import write_json_atomic  # noqa: E402


def exact_phase(args) -> None:
    """One exact pass in this process (``--phase exact``): float32 first (the reference), then the precision."""
    from datamodules import GraphStore
    from datamodules.synthetic import write_synthetic_store
    from difformer_lightning import DIFFormer
    from difformer_lightning.streaming import Scratch, exact_states, layout_bytes, scratch_layout

    device = torch.device("cpu" if args.dry_run else "cuda")
    path = Path(args.workdir) / f"csbm-{args.nodes}"
    if not (path / "meta.json").is_file():
        write_synthetic_store(path, args.nodes, seed=0)
    store = GraphStore.open(path)
    torch.manual_seed(0)
    model = DIFFormer(store.num_features, args.hidden, store.num_classes, num_layers=3).to(device).eval()
    result = {"nodes": store.num_nodes, "entries": store.num_edges, "hidden": args.hidden, "layers": 3,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    classes = {}
    for name, dtype in (("float32", None), (args.precision, torch.bfloat16 if args.precision == "bf16" else
                                            torch.float16)):
        scratch = Scratch(Path(args.workdir) / "scratch")
        (Path(args.workdir) / "scratch").mkdir(exist_ok=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            states = exact_states(model, store, args.chunk, scratch, device, storage=dtype)
            predicted = []
            for start in range(0, store.num_nodes, args.chunk):
                rows = states.rows(slice(start, min(start + args.chunk, store.num_nodes))).to(device)
                predicted.append(model.decode(rows).argmax(dim=1).cpu())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        classes[name] = torch.cat(predicted)
        result[name] = {"seconds": seconds, "scratch_bytes": layout_bytes(scratch_layout(model, store.num_nodes, dtype)),
                        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                        "timings": states.timings}
        scratch.close()
    result["same_class_as_float32"] = float((classes["float32"] == classes[args.precision]).float().mean())
    write_json_atomic(args.out, result)


def run(command, log: Path, timeout: float) -> None:
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, command))} failed ({done.returncode}); see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (no GPU needed)")
    parser.add_argument("--workdir", default=None, help="stores and step results (default: a temporary folder)")
    parser.add_argument("--phase", choices=["exact"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=10_000_000, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=100_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "exact":
        return exact_phase(args)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device here; run it on a GPU machine, or pass --dry-run")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tiny = args.dry_run
    gpus = 2 if tiny else torch.cuda.device_count()
    result = {"dry_run": tiny, "torch": torch.__version__, "gpus": gpus,
              "gpu": None if tiny else torch.cuda.get_device_name(0)}
    me = [sys.executable, str(Path(__file__).resolve())]

    def save(name, path):
        result[name] = json.loads(path.read_text())
        write_json_atomic(args.out, result)

    step = workdir / "step.json"
    run([sys.executable, "benchmarks/step.py", "--out", str(step), "--device", "cpu" if tiny else "cuda",
         *(["--store-nodes", "20000", "--batch-nodes", "5000", "--repeats", "1", "--pyg-repeats", "1"] if tiny else []),
         "--store", str(workdir / "step-store")], workdir / "step.log", 900)
    save("step", step)
    sizes = ["--nodes", "20000", "--hidden", "32", "--chunk", "5000"] if tiny else []
    for precision in ("bf16", "fp16"):
        out = workdir / f"exact_{precision}.json"
        run(me + ["--phase", "exact", "--precision", precision, "--workdir", str(workdir), "--out", str(out), *sizes,
                  *(["--dry-run"] if tiny else [])], workdir / f"exact_{precision}.log", 900)
        save(f"exact_{precision}", out)
    ddp = workdir / "ddp.json"
    run([sys.executable, "benchmarks/exact_eval.py", "--nodes", "20000" if tiny else "2000000", "--devices", str(gpus),
         "--accelerator", "cpu" if tiny else "gpu", "--precision", "32-true" if tiny else "bf16-mixed",
         "--batch-size", "5000" if tiny else "100000", "--epochs", "1", "--stores", str(workdir),
         "--label", "gpu_check", "--out", str(ddp)], workdir / "ddp.log", 900)
    save("ddp", ddp)
    print("| check | figure |")
    print("|---|---|")
    print(f"| training step, ours / PyG SGFormer (s) | {result['step']['ours_step_s']:.3f} / "
          f"{result['step']['pyg_sgformer_step_s']:.3f} ({result['step']['ratio_vs_pyg']:.2f}x) |")
    for precision in ("bf16", "fp16"):
        row = result[f"exact_{precision}"]
        print(f"| exact pass {row['nodes']:,} nodes, {precision} (s; peak GPU MB; same class as float32) | "
              f"{row[precision]['seconds']:.1f}; {row[precision]['peak_gpu_mb']}; {row['same_class_as_float32']:.4f} |")
    print(f"| DDP over {gpus} devices: epoch / exact evaluation (s; peak GPU MB per rank) | "
          f"{result['ddp']['epoch_s'][0]:.1f} / {result['ddp']['exact_eval_s'][0]:.1f}; {result['ddp']['cuda_peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
