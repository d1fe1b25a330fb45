"""What one degree-proportional draw of the synthetic generator costs at papers100M's node count: a search of the
N + 1 cumulative propensities (float64) for random values, in the order drawn against sorted first (what
``datamodules.synthetic.ClassSampler`` does), which lets neighbouring searches share their path.

    python benchmarks/degree_draws.py --nodes 111059956 --out results/degree_draws.json

Needs about 2 GB of memory at that size. Prints a table and writes JSON (ns a draw, both orders, same answers).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules.synthetic import pareto_weights  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=111_059_956)
    parser.add_argument("--draws", type=int, default=1 << 22, help="one chunk of the generator")
    parser.add_argument("--degree-exponent", type=float, default=2.5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    cumulative = torch.zeros(args.nodes + 1, dtype=torch.float64)
    torch.cumsum(pareto_weights(args.nodes, args.degree_exponent, generator), 0, out=cumulative[1:])
    values = torch.rand(args.draws, generator=generator, dtype=torch.float64) * cumulative[-1]
    began = time.perf_counter()
    drawn_order = torch.searchsorted(cumulative, values, right=True)
    random_ns = (time.perf_counter() - began) / args.draws * 1e9
    began = time.perf_counter()
    ordered, order = torch.sort(values)
    sorted_first = torch.empty_like(order)
    sorted_first[order] = torch.searchsorted(cumulative, ordered, right=True)
    sorted_ns = (time.perf_counter() - began) / args.draws * 1e9
    result = {"nodes": args.nodes, "draws": args.draws, "threads": 1, "ns_per_draw_in_drawn_order": random_ns,
              "ns_per_draw_sorted_first": sorted_ns, "speedup": random_ns / sorted_ns,
              "same_positions": bool(torch.equal(drawn_order, sorted_first))}
    print("| nodes | in drawn order (ns a draw) | sorted first (ns a draw, the sort included) | speed-up |\n|---|---|---|---|")
    print(f"| {args.nodes:,} | {random_ns:,.0f} | {sorted_ns:,.0f} | {result['speedup']:.1f}x |")
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
