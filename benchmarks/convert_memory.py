"""Peak memory of converting an ogbn-papers100M-shaped dataset into a graph store.

    python benchmarks/convert_memory.py --num-nodes 1000000 10000000 --out results/convert_memory.json

For each size, writes a synthetic dataset in OGB's binary layout (``raw/data.npz`` with
``edge_index`` [2, E] int64 and ``node_feat`` [N, 128] float32, ``raw/node-label.npz`` with 99% NaN
labels, ``split/time``), streamed so the generator itself stays small, then runs
``write_store_from_ogb`` in a child process and samples its ``/proc`` status every 0.1 s: peak
RSS, and its anonymous part (process memory proper; the rest is file pages of the memory-mapped
output, which the kernel can drop). A line fitted through the sizes is extrapolated to
papers100M (111,059,956 nodes, 1,615,685,872 edges, 14.5 per node, as here).
"""
import argparse
import gzip
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difformer_lightning.io import write_json_atomic  # noqa: E402

PAPERS_NODES, PAPERS_EDGES, FEATURES = 111_059_956, 1_615_685_872, 128


def write_npz_streaming(path: Path, arrays: dict) -> None:
    """``arrays``: name -> (shape, dtype, iterator of C-ordered chunks); stored uncompressed."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as bundle:
        for name, (shape, dtype, chunks) in arrays.items():
            with bundle.open(f"{name}.npy", "w", force_zip64=True) as stream:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_2_0(stream, header)
                for chunk in chunks:
                    stream.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def make_dataset(root: Path, num_nodes: int, seed: int = 0, chunk: int = 1 << 22) -> None:
    num_edges = int(num_nodes * PAPERS_EDGES / PAPERS_NODES)
    rng = np.random.default_rng(seed)
    (root / "raw").mkdir(parents=True)

    def ends(offset):
        for start in range(0, num_edges, chunk):
            yield np.random.default_rng(seed + offset + start).integers(0, num_nodes, min(chunk, num_edges - start))

    def edge_rows():
        yield from ends(1)   # sources
        yield from ends(2)   # targets

    def features():
        for start in range(0, num_nodes, chunk // FEATURES):
            yield rng.standard_normal((min(chunk // FEATURES, num_nodes - start), FEATURES), dtype=np.float32)

    def labels():
        for start in range(0, num_nodes, chunk):
            size = min(chunk, num_nodes - start)
            values = rng.integers(0, 172, size).astype(np.float64)
            values[rng.random(size) > 0.014] = np.nan
            yield values.reshape(-1, 1)

    write_npz_streaming(root / "raw" / "data.npz", {
        "edge_index": ((2, num_edges), np.int64, edge_rows()),
        "node_feat": ((num_nodes, FEATURES), np.float32, features()),
        "num_nodes_list": ((1,), np.int64, [np.array([num_nodes])]),
        "num_edges_list": ((1,), np.int64, [np.array([num_edges])])})
    write_npz_streaming(root / "raw" / "node-label.npz", {"node_label": ((num_nodes, 1), np.float64, labels())})
    split = root / "split" / "time"
    split.mkdir(parents=True)
    order = rng.permutation(num_nodes)[: max(3, num_nodes // 70)]
    for name, part in zip(("train", "valid", "test"), np.array_split(np.sort(order), 3)):
        with gzip.open(split / f"{name}.csv.gz", "wt") as handle:
            handle.write("\n".join(map(str, part)) + "\n")


CONVERT = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from datamodules.ogb import write_store_from_ogb
write_store_from_ogb("ogbn-papers100M", {out!r}, root={root!r}, feature_dtype=np.float16)
"""


def measure(root: Path, out: Path) -> dict:
    code = CONVERT.format(repo=str(Path(__file__).resolve().parents[1]), out=str(out), root=str(root))
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code])
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while child.poll() is None:
        try:
            for line in Path(f"/proc/{child.pid}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]))
        except FileNotFoundError:
            break
        time.sleep(0.1)
    if child.returncode:
        raise RuntimeError(f"conversion failed with exit code {child.returncode}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak["VmRSS"] / 1024, 1),
            "peak_anon_mb": round(peak["RssAnon"] / 1024, 1), "peak_file_mb": round(peak["RssFile"] / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-nodes", type=int, nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", help="where the synthetic datasets and stores go (default: a temp dir)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        for num_nodes in args.num_nodes:
            root = Path(scratch) / f"papers-{num_nodes}"
            make_dataset(root, num_nodes)
            row = {"num_nodes": num_nodes, "num_edges": int(num_nodes * PAPERS_EDGES / PAPERS_NODES),
                   **measure(root, Path(scratch) / f"store-{num_nodes}")}
            rows.append(row)
            print(row, flush=True)
    result = {"sizes": rows}
    if len(rows) >= 2:
        n = np.array([r["num_nodes"] for r in rows], dtype=float)
        for key in ("peak_rss_mb", "peak_anon_mb"):
            slope, intercept = np.polyfit(n, [r[key] for r in rows], 1)
            result[f"{key}_per_node_bytes"] = round(slope * 2**20, 1)
            result[f"papers100m_{key.replace('_mb', '_gb')}"] = round((intercept + slope * PAPERS_NODES) / 1024, 1)
    write_json_atomic(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
