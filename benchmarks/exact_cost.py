"""What an exact pass costs per node and per in-edge entry, measured, and what that predicts for a graph of
another size (ogbn-papers100M by default): time, disk and memory.

    python benchmarks/exact_cost.py --store /tmp/difformer-stores/csbm-8000000 --hidden 256 --out results/exact_cost_8m.json
    python benchmarks/exact_cost.py --store /tmp/difformer-stores/csbm-3000000-d767 --hidden 16 --layers 1 --out results/exact_cost_dense.json

Runs ``streaming.exact_states`` once over the store in one process on the CPU (DIFFormer-s with the graph term,
``use_weight``, ``--hidden`` x ``--layers``, chunks of ``--chunk`` nodes, ``--threads`` torch threads), with
the scratch in ``--scratch-dir``, and reads the pass's own timings: seconds in the input block (per node), in
the degree pass (per entry), in each layer's first sweep (projections, statistics, writing the values: per
node), in the graph term (reading the chunk's CSR rows, building the block, the product: per entry) and in the
rest of the second sweep (attention, mix, step: per node). It samples this process's peak anonymous memory.
Then it applies those costs to ``--target-nodes`` / ``--target-entries`` (papers100M undirected: 111,059,956
and 3,231,371,744) at the same hidden size and layers, per rank for ``--target-ranks`` ranks sharing the
work, and prints the scratch the target needs in float32 and in bfloat16 (``streaming.scratch_layout``) and
the statistics table's size. The projection is computed from this machine's costs: a GPU runs the dense
parts faster, the graph rows are built on the host either way.
"""
import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from callbacks.memory import process_memory_mb  # noqa: E402
from datamodules import GraphStore  # noqa: E402
from difformer_lightning import DIFFormer  # noqa: E402
from difformer_lightning.allocator import keep_freed_memory  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402
from difformer_lightning.streaming import (STATISTICS_GROUPS, Scratch, exact_states, layout_bytes,  # noqa: E402
                                           scratch_layout)

PAPERS100M_NODES, PAPERS100M_ENTRIES = 111_059_956, 3_231_371_744


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scratch-dir", default=None)
    parser.add_argument("--target-nodes", type=int, default=PAPERS100M_NODES)
    parser.add_argument("--target-entries", type=int, default=PAPERS100M_ENTRIES)
    parser.add_argument("--target-ranks", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    store = GraphStore.open(args.store, validate=False)
    torch.manual_seed(0)
    model = DIFFormer(store.num_features, args.hidden, store.num_classes, num_layers=args.layers,
                      use_weight=True).eval()
    peak = {"anonymous_mb": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.1):
            peak["anonymous_mb"] = max(peak["anonymous_mb"], process_memory_mb().get("anonymous_mb", 0.0))

    sampler = threading.Thread(target=sample, daemon=True)
    baseline = process_memory_mb().get("anonymous_mb", 0.0)
    scratch = Scratch(args.scratch_dir or tempfile.gettempdir())
    sampler.start()
    began = time.perf_counter()
    states = exact_states(model, store, args.chunk, scratch)
    seconds = time.perf_counter() - began
    stop.set()
    sampler.join()
    scratch.close()
    t = states.timings
    nodes, entries = t["nodes"], t["entries"] / args.layers  # entries counted once per layer
    per = {
        "encode_s_per_node": t["encode"] / nodes,
        "degrees_s_per_entry": t["degrees"] / entries,
        "first_sweep_s_per_node_layer": t["statistics"] / nodes / args.layers,
        "graph_s_per_entry_layer": t["graph"] / entries / args.layers,
        "second_sweep_rest_s_per_node_layer": t["update"] / nodes / args.layers,
    }
    measured = {"store": str(args.store), "nodes": int(nodes), "entries": int(entries), "hidden": args.hidden,
                "layers": args.layers, "chunk": args.chunk, "threads": args.threads, "seconds": seconds,
                "timings": t, "per": per, "peak_anonymous_mb": peak["anonymous_mb"],
                "anonymous_mb_before": baseline}

    def projected(num_nodes: int, num_entries: int, ranks: int) -> dict:
        node_s = num_nodes * (per["encode_s_per_node"] + args.layers * (per["first_sweep_s_per_node_layer"]
                                                                        + per["second_sweep_rest_s_per_node_layer"]))
        entry_s = num_entries * args.layers * per["graph_s_per_entry_layer"]
        degree_s = num_entries * per["degrees_s_per_entry"]
        return {"nodes": num_nodes, "entries": num_entries, "ranks": ranks, "node_work_s": node_s / ranks,
                "graph_work_s": entry_s / ranks, "degree_pass_s": degree_s / ranks,
                "first_pass_s": (node_s + entry_s + degree_s) / ranks, "later_passes_s": (node_s + entry_s) / ranks}

    target = projected(args.target_nodes, args.target_entries, args.target_ranks)
    float32 = layout_bytes(scratch_layout(model, args.target_nodes))
    bfloat16 = layout_bytes(scratch_layout(model, args.target_nodes, torch.bfloat16))
    conv = model.convs[0]
    table = STATISTICS_GROUPS * (conv.num_heads * conv.out_channels * (conv.out_channels + 2) + 3) * 8
    result = {"measured": measured, "projected": target, "projected_one_rank": projected(args.target_nodes,
                                                                                       args.target_entries, 1),
              "target_scratch_bytes": {"float32": float32, "bfloat16": bfloat16},
              "statistics_table_bytes": table, "note": "projected from this machine's measured CPU costs"}
    write_json_atomic(args.out, result)
    print(f"measured on {int(nodes):,} nodes / {int(entries):,} entries, hidden {args.hidden} x {args.layers} layers, "
          f"chunks of {args.chunk:,}, {args.threads} threads: {seconds:.1f} s, peak anonymous memory "
          f"{peak['anonymous_mb']:,.0f} MB")
    print("| part | cost |")
    print("|---|---|")
    for key, value in per.items():
        print(f"| {key} | {value * 1e9:,.1f} ns |")
    print(f"projected (computed) for {args.target_nodes:,} nodes / {args.target_entries:,} entries on "
          f"{args.target_ranks} ranks: first pass {target['first_pass_s'] / 60:.1f} min per rank "
          f"(degrees {target['degree_pass_s'] / 60:.1f}, graph {target['graph_work_s'] / 60:.1f}, nodes "
          f"{target['node_work_s'] / 60:.1f}), later passes {target['later_passes_s'] / 60:.1f} min; scratch "
          f"{float32 / 1e9:.1f} GB (float32) / {bfloat16 / 1e9:.1f} GB (bfloat16); statistics table "
          f"{table / 1e6:.1f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
