"""Peak memory of DIFFormer-a's attention: row blocks (ours) against the dense formula.

    python benchmarks/sigmoid_memory.py --out results/sigmoid_memory.json

For N = 5,000 and 20,000 nodes (one head, 64 channels), forward + backward of

* dense: ``softmax``-free reference formula ``A = sigmoid(Q K^T); (A / A.sum(1)) V``, which holds
  N x N matrices (the scores, their sigmoid, the normalised attention) and their gradients;
* blocked: :func:`difformer_lightning.sigmoid_attention`, whose row blocks hold at most
  ``block_bytes`` (default 1 GiB, and 128 MiB) and are recomputed in backward.

Every case runs in its own interpreter (Linux), where every allocation above 64 KiB is its own
mapping returned on free, so resident memory follows the live tensors; it reports the rise of the
peak resident memory (VmHWM, reset just before the work) over what the inputs already took, and
the time. Outputs of the two methods are compared (max abs difference).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from difformer_lightning.io import write_json_atomic  # noqa: E402

CASE = """
import ctypes, json, re, sys, time, torch
from difformer_lightning import sigmoid_attention
# Every block above 64 KiB gets its own mapping, returned on free: resident memory then follows
# the live tensors, and its high-water mark (reset just before the work) is their peak.
ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD, fixed
def resident(key):
    return int(re.search(rf"{key}:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
num_nodes, method, block_bytes = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
generator = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(num_nodes, 1, 64, generator=generator).requires_grad_() for _ in range(3))
grad = torch.randn(num_nodes, 1, 64, generator=generator)
sigmoid_attention(q[:8], k[:8], v[:8]).sum().backward()  # thread pools and first-use buffers
open("/proc/self/clear_refs", "w").write("5")  # resets the high-water mark
before = resident("VmRSS")
start = time.perf_counter()
if method == "dense":
    scores = torch.sigmoid(q[:, 0] @ k[:, 0].t())
    out = ((scores / scores.sum(dim=1, keepdim=True)) @ v[:, 0]).unsqueeze(1)
else:
    out = sigmoid_attention(q, k, v, block_bytes=block_bytes)
out.backward(grad)
seconds = time.perf_counter() - start
peak = resident("VmHWM")
torch.save(out.detach(), sys.argv[4])
print(json.dumps({"peak_rise_mb": peak - before, "seconds": seconds}))
"""


def run(num_nodes: int, method: str, block_bytes: int, output: Path) -> dict:
    child = subprocess.run([sys.executable, "-c", CASE, str(num_nodes), method, str(block_bytes), str(output)],
                           cwd=ROOT, capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"{method} at N={num_nodes} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000])
    args = parser.parse_args()
    methods = [("dense", 0), ("blocked, 1 GiB blocks", 2**30), ("blocked, 128 MiB blocks", 2**27)]
    rows = []
    print("| N | method | peak memory rise (MB) | N x N float32 (MB) | forward + backward (s) | max abs diff |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for num_nodes in args.sizes:
            outputs = {}
            for name, block_bytes in methods:
                outputs[name] = Path(scratch) / f"{num_nodes}-{block_bytes}.pt"
                row = {"nodes": num_nodes, "method": name, "block_bytes": block_bytes,
                       **run(num_nodes, "dense" if block_bytes == 0 else "blocked", block_bytes, outputs[name])}
                reference = torch.load(outputs["dense"])
                row["max_abs_diff_vs_dense"] = float((torch.load(outputs[name]) - reference).abs().max())
                rows.append(row)
                print(f"| {num_nodes:,} | {name} | {row['peak_rise_mb']:,.0f} | {num_nodes ** 2 * 4 / 2**20:,.0f} | "
                      f"{row['seconds']:.2f} | {row['max_abs_diff_vs_dense']:.1e} |", flush=True)
    write_json_atomic(args.out, {"heads": 1, "channels": 64, "runs": rows})


if __name__ == "__main__":
    main()
