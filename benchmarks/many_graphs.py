"""Many graphs at the cost of one: DIFFormer-s over a batch of graphs of mixed sizes.

    python benchmarks/many_graphs.py --out results/many_graphs.json

63 graphs of 50 nodes plus one of 5,000 (8,150 nodes, each graph with 4 random in-edges per node),
forward + backward of a DIFFormer-s encoder (16 input features, hidden 64, 2 layers, graph term),
three ways, each in its own interpreter:

* ``one graph``: the same nodes and edges without a batch vector (attention over all 8,150 nodes);
* ``many graphs``: the batch vector; attention within each graph (graphs grouped by size, each group
  padded to its largest graph: :func:`difformer_lightning.attention.linear_attention`);
* ``padded to the largest``: the same per-graph attention computed the way this project did before,
  every graph padded to the largest (5,000 rows each), written out here for comparison.

Reported, each from its own interpreter: the median time of 10 forward + backward passes with glibc
keeping freed memory (as ``train.py`` runs), and the rise of the peak resident memory of one pass
(VmHWM, reset before the work) where every allocation above 64 KiB is its own mapping returned on free,
so residency follows the live tensors. The ``many graphs`` outputs are checked against each graph alone.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from difformer_lightning.io import write_json_atomic  # noqa: E402

CASE = """
import ctypes, json, re, statistics, sys, time, torch
from torch_geometric.utils import to_dense_batch
import difformer_lightning.conv as conv_module
from difformer_lightning import DIFFormer
from difformer_lightning.allocator import keep_freed_memory
from difformer_lightning.attention import LinearAttentionStats
mode, measure = sys.argv[1], sys.argv[2]
if measure == "memory":
    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: residency follows the live tensors
else:
    keep_freed_memory()
def resident(key):
    return int(re.search(rf"{key}:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
sizes = [50] * 63 + [5000]
generator = torch.Generator().manual_seed(0)
batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
offsets = torch.cumsum(torch.tensor([0] + sizes[:-1]), 0)
edges = torch.cat([torch.stack([torch.randint(n, (4 * n,), generator=generator),
                                torch.arange(n).repeat_interleave(4)]) + o for n, o in zip(sizes, offsets)], dim=1)
x = torch.randn(batch.numel(), 16, generator=generator)
torch.manual_seed(0)
model = DIFFormer(16, 64, 4, num_layers=2, kernel="simple", use_graph=True)
if mode == "padded":  # the previous implementation: every graph padded to the largest
    def padded(query, key, value, qk_norm="frobenius", batch=None):
        (q, mask), (k, _), (v, _) = (to_dense_batch(t, batch) for t in (query, key, value))
        stats = LinearAttentionStats.of(q, k, v, qk_norm, num_nodes=mask.sum(dim=1))
        return stats.attend(q, qk_norm)[mask]
    conv_module.linear_attention = padded
graph_batch = None if mode == "one" else batch
model(x[:100], edges[:, :10], batch=None if mode == "one" else batch[:100])  # thread pools, first-use buffers
times, peak = [], None
for repeat in range(1 if measure == "memory" else 10):
    if measure == "memory":
        open("/proc/self/clear_refs", "w").write("5")  # resets the high-water mark
        before = resident("VmRSS")
    start = time.perf_counter()
    out = model(x, edges, batch=graph_batch)
    out.square().sum().backward()
    times.append(time.perf_counter() - start)
    if measure == "memory":
        peak = resident("VmHWM") - before
    del out
    model.zero_grad(set_to_none=True)
error = None
if mode == "many" and measure == "time":
    with torch.no_grad():
        together = model(x, edges, batch=batch)
        alone = torch.cat([model(x[batch == g], edges[:, batch[edges[1]] == g] - o) for g, o in enumerate(offsets)])
    error = float((together - alone).abs().max())
print(json.dumps({"peak_rise_mb": peak, "seconds": statistics.median(times), "max_abs_diff_vs_alone": error}))
"""

MODES = [("one", "one graph of 8,150 nodes"), ("many", "many graphs (batch vector)"),
         ("padded", "many graphs padded to the largest (before)")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()
    rows = []
    print("| case | peak memory rise (MB) | forward + backward (s) | vs one graph (time, memory) |")
    print("|---|---|---|---|")
    for mode, name in MODES:
        row = {"case": name}
        for measure in ("time", "memory"):
            child = subprocess.run([sys.executable, "-c", CASE, mode, measure], cwd=ROOT, capture_output=True,
                                   text=True)
            if child.returncode:
                raise SystemExit(f"{name} failed:\n{child.stderr[-3000:]}")
            found = json.loads(child.stdout.strip().splitlines()[-1])
            row.update({"seconds": found["seconds"], "max_abs_diff_vs_alone": found["max_abs_diff_vs_alone"]}
                       if measure == "time" else {"peak_rise_mb": found["peak_rise_mb"]})
        rows.append(row)
        one = rows[0]
        print(f"| {name} | {row['peak_rise_mb']:,.0f} | {row['seconds']:.2f} | "
              f"{row['seconds'] / one['seconds']:.2f}x, {row['peak_rise_mb'] / one['peak_rise_mb']:.2f}x |", flush=True)
    write_json_atomic(args.out, {"graphs": "63 x 50 nodes + 1 x 5,000", "hidden": 64, "layers": 2, "runs": rows})


if __name__ == "__main__":
    main()
