"""The documented ogbn-papers100M conversion, measured on a dataset of papers100M's layout times ``--scale``.

    python benchmarks/convert_memory.py --scale 0.1 --out results/convert_memory.json

Writes a synthetic dataset in OGB's binary layout as OGB ships papers100M: ``raw/data.npz`` holding
``edge_index`` [2, E] int64 and ``node_feat`` [N, 128] float32 as *deflated* members (``np.savez_compressed``),
``raw/node-label.npz`` with labels on 1.4% of the nodes, ``split/time/*.csv.gz`` (111,059,956 x S nodes,
1,615,685,872 x S edges, random ends). Then runs exactly the call docs/large-graphs.md gives,

    write_store_from_ogb("ogbn-papers100M", out, root=root, undirected=True)

in a child process (float16 features, the default; both directions stored), sampling its memory from /proc,
and reports the time (inflating the members included), CPU time, peak anonymous memory (the process's own
heap: the store's pages are page cache), the bytes the process wrote (``/proc/<pid>/io``: sent to storage,
less what it deleted before it was written) against the store's size, and the store's size.
"""
import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from difformer_lightning.io import write_json_atomic  # noqa: E402
from proc import TreeSampler  # noqa: E402

PAPERS_NODES, PAPERS_EDGES, FEATURES, LABELLED = 111_059_956, 1_615_685_872, 128, 1_546_782


def write_npz_deflated(path: Path, arrays: dict) -> None:
    """``arrays``: name -> (shape, dtype, iterator of C-ordered chunks); deflated members, as
    ``np.savez_compressed`` writes them, streamed."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as bundle:
        for name, (shape, dtype, chunks) in arrays.items():
            with bundle.open(f"{name}.npy", "w", force_zip64=True) as stream:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_2_0(stream, header)
                for chunk in chunks:
                    stream.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def make_dataset(root: Path, num_nodes: int, num_edges: int, seed: int = 0, chunk: int = 1 << 22) -> None:
    rng = np.random.default_rng(seed)
    (root / "raw").mkdir(parents=True)

    def ends(offset):
        for start in range(0, num_edges, chunk):
            yield np.random.default_rng(seed + offset + start).integers(0, num_nodes, min(chunk, num_edges - start))

    def edge_rows():
        yield from ends(1)   # sources
        yield from ends(2)   # targets

    def features():
        rows = chunk // FEATURES
        for start in range(0, num_nodes, rows):
            yield rng.standard_normal((min(rows, num_nodes - start), FEATURES), dtype=np.float32)

    labelled = rng.permutation(num_nodes)[:max(30, round(num_nodes * LABELLED / PAPERS_NODES))]

    def labels():
        for start in range(0, num_nodes, chunk):
            size = min(chunk, num_nodes - start)
            values = np.full(size, np.nan)
            mine = labelled[(labelled >= start) & (labelled < start + size)] - start
            values[mine] = rng.integers(0, 172, mine.size)
            yield values.reshape(-1, 1)

    write_npz_deflated(root / "raw" / "data.npz", {
        "edge_index": ((2, num_edges), np.int64, edge_rows()),
        "node_feat": ((num_nodes, FEATURES), np.float32, features()),
        "num_nodes_list": ((1,), np.int64, [np.array([num_nodes])]),
        "num_edges_list": ((1,), np.int64, [np.array([num_edges])])})
    write_npz_deflated(root / "raw" / "node-label.npz", {"node_label": ((num_nodes, 1), np.float64, labels())})
    split = root / "split" / "time"
    split.mkdir(parents=True)
    for name, part in zip(("train", "valid", "test"), np.array_split(np.sort(labelled), 3)):
        with gzip.open(split / f"{name}.csv.gz", "wt") as handle:
            handle.write("\n".join(map(str, part)) + "\n")


CONVERT = """
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
from datamodules.ogb import write_store_from_ogb
from proc import io_bytes, written_since
began, before = time.perf_counter(), io_bytes(os.getpid())
write_store_from_ogb("ogbn-papers100M", {out!r}, root={root!r}, undirected=True)
after, usage = io_bytes(os.getpid()), resource.getrusage(resource.RUSAGE_SELF)
written = written_since(before, after)
print(json.dumps({{"seconds": time.perf_counter() - began, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "written_bytes": written}}))
"""


def measure(root: Path, out: Path) -> dict:
    code = CONVERT.format(repo=str(ROOT), out=str(out), root=str(root))
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT / "benchmarks", stdout=subprocess.PIPE, text=True,
                             env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "benchmarks")})
    sampler = TreeSampler(child.pid, interval=0.2)
    output, _ = child.communicate()
    sampler.stop()
    if child.returncode:
        raise RuntimeError(f"conversion failed with exit code {child.returncode}:\n{output[-3000:]}")
    measured = json.loads(output.strip().splitlines()[-1])
    meta = json.loads((out / "meta.json").read_text())
    store = sum(spec["bytes"] for spec in meta["arrays"].values())
    return {"seconds": round(measured["seconds"], 1), "cpu_s": round(measured["cpu_s"], 1),
            "peak_anon_mb": round(sampler.peak_process_anonymous_kb / 1024, 1), "written_gb": measured["written_bytes"] / 1e9,
            "store_gb": store / 1e9, "written_over_store": measured["written_bytes"] / store,
            "num_entries": meta["num_edges"], "progress": [line for line in output.splitlines()
                                                           if line.startswith("store ")][-3:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", help="where the synthetic dataset and the store go (default: a temp dir)")
    args = parser.parse_args()
    num_nodes, num_edges = round(PAPERS_NODES * args.scale), round(PAPERS_EDGES * args.scale)
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        root = Path(scratch) / "papers100M-bin"
        began = time.perf_counter()
        make_dataset(root, num_nodes, num_edges)
        dataset_s = time.perf_counter() - began
        dataset_gb = sum(path.stat().st_size for path in root.rglob("*") if path.is_file()) / 1e9
        result = {"scale": args.scale, "num_nodes": num_nodes, "num_edges": num_edges, "dataset_gb": dataset_gb,
                  "dataset_written_s": round(dataset_s, 1), "call": 'write_store_from_ogb("ogbn-papers100M", out, '
                                                                   'root=root, undirected=True)',
                  **measure(root, Path(scratch) / "store")}
    write_json_atomic(args.out, result)
    print("| scale | nodes | entries stored | conversion (s) | CPU (s) | peak anonymous MB | written / store | store GB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.scale} | {num_nodes:,} | {result['num_entries']:,} | {result['seconds']:,.0f} | {result['cpu_s']:,.0f} | "
          f"{result['peak_anon_mb']:,.0f} | {result['written_over_store']:.2f} | {result['store_gb']:.2f} |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
