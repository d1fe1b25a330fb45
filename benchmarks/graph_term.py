"""The exact pass's graph term on the CPU: the product read straight from the memory-mapped values against the
product over the chunk's gathered source rows (the accelerator's form), on stores of 1M-10M nodes.

    python benchmarks/graph_term.py --nodes 1000000 8000000 --width 64 256 --out results/graph_term.json

For each store (the contextual-SBM store of ``--nodes`` nodes, average degree 10, built once under ``--stores``)
and each width ``W`` (heads x channels of the values), a float32 value array ``[N, W]`` is written to a memory-
mapped file (as the exact pass's scratch holds it) and read once (page cache warm, as in a pass). Then, for
``--samples`` chunks of ``--chunk`` target nodes spread over the graph, the graph term of the chunk
(``NormalizedGraph.row_block`` + ``propagate``, what ``streaming.exact_states`` runs) is timed in three forms,
each twice in alternation (the faster of the two rounds is kept): the product straight from the memory-mapped
array, the same product cut into ``--blocks`` column blocks (what a graph past 2**31 elements needs:
papers100M at width 256 needs 14), and the product over the gathered rows. Every form builds the chunk's rows;
the gathered one also finds the distinct sources and copies their rows. Printed as a table; JSON to ``--out``.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from datamodules import GraphStore  # noqa: E402
from datamodules.synthetic import write_synthetic_store  # noqa: E402
from difformer_lightning import NormalizedGraph  # noqa: E402
from difformer_lightning import graph as graph_module  # noqa: E402
from difformer_lightning.graph import edge_targets, gcn_degree  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402


def inverse_sqrt_degrees(store: GraphStore, chunk: int) -> torch.Tensor:
    parts = []
    for start in range(0, store.num_nodes, chunk):
        stop = min(start + chunk, store.num_nodes)
        row_pointer, source, _ = store.in_rows(start, stop)
        parts.append(gcn_degree(source, edge_targets(row_pointer, source.dtype), stop - start, start).float().pow(-0.5))
    return torch.cat(parts)


def time_form(store, values, inv_sqrt, starts, chunk, form: str, blocks: int) -> float:
    """Seconds for the graph term of the chunks at ``starts``, as ``streaming.exact_states`` runs it (the CSR
    row block of a store without self loops) in ``form``: ``memory_mapped``, ``memory_mapped_blocks`` (the same
    product forced into ``blocks`` column blocks, as papers100M's needs) or ``gathered``."""
    total = 0.0
    operand = torch.from_numpy(values)
    saved = graph_module.DENSE_OFFSET_LIMIT
    if form == "memory_mapped_blocks":
        graph_module.DENSE_OFFSET_LIMIT = -(-values.size // blocks)
    try:
        for start in starts:
            stop = min(start + chunk, store.num_nodes)
            began = time.perf_counter()
            row_pointer, source, weight = store.in_rows(start, stop)
            graph, ids = NormalizedGraph.row_block(row_pointer, source, weight, inv_sqrt, start, False,
                                                   torch.device("cpu") if form == "gathered" else None)
            targets = operand[start:stop]
            graph.propagate(torch.from_numpy(values[ids.numpy()]) if form == "gathered" else operand, targets)
            total += time.perf_counter() - began
    finally:
        graph_module.DENSE_OFFSET_LIMIT = saved
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1_000_000, 8_000_000])
    parser.add_argument("--width", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the exact pass's per rank)")
    parser.add_argument("--blocks", type=int, default=14,
                        help="column blocks of the forced split (papers100M at width 256 needs 14)")
    parser.add_argument("--stores", default=str(Path(tempfile.gettempdir()) / "difformer-stores"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for num_nodes in args.nodes:
        path = Path(args.stores) / f"csbm-{num_nodes}"
        if not (path / "meta.json").is_file():
            write_synthetic_store(path, num_nodes, seed=0)
        store = GraphStore.open(path, validate=False)
        inv_sqrt = inverse_sqrt_degrees(store, args.chunk)
        starts = np.linspace(0, num_nodes - args.chunk, args.samples).astype(np.int64).tolist()
        entries = sum(int(store.rowptr[min(s + args.chunk, num_nodes)] - store.rowptr[s]) for s in starts)
        for width in args.width:
            with tempfile.TemporaryDirectory(prefix="graph-term-") as scratch:
                values = np.lib.format.open_memmap(Path(scratch) / "value.npy", "w+", np.float32, (num_nodes, width))
                generator = np.random.default_rng(0)
                for start in range(0, num_nodes, 1 << 20):
                    block = values[start:start + (1 << 20)]
                    block[:] = generator.standard_normal(block.shape, dtype=np.float32)
                float(values.sum(dtype=np.float64))  # every page read once: warm, as inside a pass
                rounds = {"memory_mapped": [], "memory_mapped_blocks": [], "gathered": []}
                for _ in range(2):
                    for form in rounds:
                        rounds[form].append(time_form(store, values, inv_sqrt, starts, args.chunk, form, args.blocks))
                del values
            row = {"nodes": num_nodes, "width": width, "chunk": args.chunk, "samples": len(starts),
                   "entries": entries, **{f"{form}_s": min(times) for form, times in rounds.items()}}
            for form in rounds:
                row[f"{form}_ns_per_entry"] = row[f"{form}_s"] / entries * 1e9
            row["gathered_over_memory_mapped"] = row["gathered_s"] / row["memory_mapped_s"]
            results.append(row)
            write_json_atomic(args.out, {"threads": args.threads, "blocks": args.blocks, "results": results})
    print(f"| nodes | width (heads x channels) | chunk | entries timed | memory-mapped (ns/entry) | memory-mapped, "
          f"{args.blocks} column blocks (ns/entry) | gathered (ns/entry) | gathered / memory-mapped |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['nodes']:,} | {row['width']} | {row['chunk']:,} | {row['entries']:,} | "
              f"{row['memory_mapped_ns_per_entry']:.1f} | {row['memory_mapped_blocks_ns_per_entry']:.1f} | "
              f"{row['gathered_ns_per_entry']:.1f} | {row['gathered_over_memory_mapped']:.2f} |")
    print(json.dumps({"threads": args.threads, "blocks": args.blocks, "results": results}))


if __name__ == "__main__":
    main()
