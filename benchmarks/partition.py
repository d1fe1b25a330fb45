"""One epoch of random-partition batches: ours (CSR gather per batch) against the reference scheme.

    python benchmarks/partition.py --num-nodes 10000000 --avg-degree 10 --batch-size 100000 --out results/partition_10m.json

Builds a synthetic contextual-SBM store (or reuses one at --store), then, in the same run, times
building every batch of one epoch with ``RandomPartitionDataModule`` and with the reference scheme
(``torch_geometric.utils.subgraph`` over the full edge list for every batch, as the authors'
``main-batch.py`` does). The reference is timed on ``--reference-batches`` batches and extrapolated
to the epoch (it takes minutes per epoch at 10M nodes); 0 times the whole epoch.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import RandomPartitionDataModule  # noqa: E402
from datamodules.store import GraphStore  # noqa: E402
from datamodules.synthetic import write_synthetic_store  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_ours(store: Path, batch_size: int, workers: int) -> tuple:
    module = RandomPartitionDataModule(str(store), batch_size=batch_size, num_workers=workers)
    module.setup("fit")
    loader = module.train_dataloader()
    start = time.perf_counter()
    kept = batches = 0
    for batch in loader:
        kept += batch.edge_index.size(1)
        batches += 1
    return time.perf_counter() - start, kept, batches


def time_reference(store: GraphStore, batch_size: int, max_batches: int) -> tuple:
    from torch_geometric.utils import subgraph

    degree = store.rowptr[1:] - store.rowptr[:-1]
    edge_index = torch.stack([store.col.long(), torch.repeat_interleave(torch.arange(store.num_nodes), degree)])
    batches = torch.split(torch.randperm(store.num_nodes, generator=torch.Generator().manual_seed(0)), batch_size)
    timed = batches if max_batches <= 0 else batches[:max_batches]
    start = time.perf_counter()
    for nodes in timed:
        sub_edges, _ = subgraph(nodes, edge_index, relabel_nodes=True, num_nodes=store.num_nodes)
        _ = store.x[nodes].float(), sub_edges
    elapsed = time.perf_counter() - start
    return elapsed * len(batches) / len(timed), len(timed), len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-nodes", type=int, required=True)
    parser.add_argument("--avg-degree", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--store", help="store directory (default: runs/stores/csbm-<nodes>-<degree>)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for ours (0: in process)")
    parser.add_argument("--reference-batches", type=int, default=3, help="batches to time for the reference")
    args = parser.parse_args()

    store_path = Path(args.store or f"runs/stores/csbm-{args.num_nodes}-{args.avg_degree:g}")
    build_s = None
    if not (store_path / "meta.json").is_file():
        start = time.perf_counter()
        write_synthetic_store(store_path, args.num_nodes, avg_degree=args.avg_degree)
        build_s = time.perf_counter() - start
    store = GraphStore.open(store_path)
    rss_after_build = peak_rss_mb()

    ours_s, kept, batches = time_ours(store_path, args.batch_size, args.workers)
    rss_ours = peak_rss_mb()
    reference_s, timed, total = time_reference(store, args.batch_size, args.reference_batches)

    result = {"num_nodes": store.num_nodes, "num_edges": store.num_edges, "batch_size": args.batch_size,
              "batches": batches, "workers": args.workers, "store_build_s": build_s,
              "ours_epoch_s": round(ours_s, 3), "reference_epoch_s": round(reference_s, 3),
              "reference_batches_timed": timed, "reference_extrapolated": timed < total,
              "speedup": round(reference_s / ours_s, 1), "edges_kept_fraction": round(kept / store.num_edges, 5),
              "expected_kept_fraction": round(args.batch_size / store.num_nodes, 5),
              "peak_rss_mb": round(rss_ours, 1), "peak_rss_build_mb": round(rss_after_build, 1),
              "peak_rss_with_reference_mb": round(peak_rss_mb(), 1)}
    write_json_atomic(args.out, result)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
