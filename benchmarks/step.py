"""One training step of DIFFormer-s against the machine's matrix-multiply rate and against PyG's SGFormer.

    python benchmarks/step.py --out results/step.json

Builds a synthetic graph store (200,000 nodes, average degree 20, 128 features) and takes one
random-partition batch of 100,000 nodes from it through the project's data path (about 1M edges
survive in the induced subgraph). On that batch it times forward + backward (cross-entropy on the
training nodes) of

* ours: DIFFormer-s, 3 layers, hidden 128, graph term, ``use_weight``, LayerNorm, no dropout;
* PyG: ``torch_geometric.nn.models.SGFormer`` at the same width and depth (3 attention layers and
  3 GCN layers, hidden 128, one head, no dropout), whose global attention is the same linear form;

and, in the same run, a large float32 ``torch.matmul`` (the machine's practical peak). Floating-point
operations are counted analytically from the shapes (matrix products and sparse products only; the
element-wise work is not counted), so ``efficiency = step_gflops / matmul_gflops`` is the fraction of
the matmul rate a step achieves. Steps are timed after a warm-up step (median of ``--repeats``).
``--compile`` also times ``torch.compile(model)``. Writes every figure to ``--out`` as JSON.

On CPU both models are first timed with glibc's default allocation, then with freed memory kept
in the process (:func:`difformer_lightning.allocator.keep_freed_memory`, what ``train.py`` does),
the setting of the main figures: ``ratio_vs_pyg`` compares the two under that same setting,
``ratio_vs_pyg_both_default_allocator`` under glibc's default, ``ratio_vs_pyg_default_allocator``
ours as train.py runs it against PyG's default. Also on CPU: an element-wise add of two
activations on fresh and on reused memory, the step's parts timed alone (``breakdown``) and the
time to build the batch. ``--device cuda`` runs it on a GPU.
"""
import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules.partition import BatchBuilder, PartitionSampler  # noqa: E402
from datamodules.synthetic import write_synthetic_store  # noqa: E402
from difformer_lightning import DIFFormer  # noqa: E402
from difformer_lightning.allocator import keep_freed_memory  # noqa: E402
from difformer_lightning.io import write_json_atomic  # noqa: E402


def matmul_gflops(size: int = 4096, repeats: int = 5) -> float:
    """The float32 rate of a large square matrix product (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.matmul(a, b, out=out)
    best = min(_seconds(lambda: torch.matmul(a, b, out=out)) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def difformer_flops(nodes: int, edges: int, features: int, hidden: int, classes: int, layers: int) -> int:
    """Matrix and sparse products of one forward + backward of DIFFormer-s (one head, use_weight,
    graph term). ``edges`` counts the self loops the graph term adds.

    Forward per layer: Q, K, V projections 3 x 2NH^2, K^T V 2NH^2, Q [K^T V | sum K] 2NH(H+1),
    graph term 2EH; backward twice each dense product (input and weight gradients) and once the
    sparse one (the adjacency is fixed). Input layer: forward and weight gradient (the features
    need none); output layer: forward and both gradients.
    """
    dense = 3 * 2 * nodes * hidden * hidden + 2 * nodes * hidden * hidden + 2 * nodes * hidden * (hidden + 1)
    per_layer = 3 * dense + 2 * (2 * edges * hidden)
    return 2 * (2 * nodes * features * hidden) + layers * per_layer + 3 * (2 * nodes * hidden * classes)


def sgformer_flops(nodes: int, edges: int, features: int, hidden: int, classes: int, layers: int) -> int:
    """The same count for PyG's SGFormer: an attention branch (input layer, ``layers`` attention
    layers: Q, K, V 3 x 2NH^2, K^T V 2NH^2, Q (K^T V) 2NH^2, Q sum K 2NH) and a GCN branch (input
    layer, ``layers`` GCNConv: 2NH^2 + 2EH), then the output layer."""
    attention = 3 * 2 * nodes * hidden * hidden + 2 * 2 * nodes * hidden * hidden + 2 * nodes * hidden
    gcn = 2 * nodes * hidden * hidden
    per_layer = 3 * (attention + gcn) + 2 * (2 * edges * hidden)
    return 2 * 2 * (2 * nodes * features * hidden) + layers * per_layer + 3 * (2 * nodes * hidden * classes)


def time_steps(step: Callable[[], None], repeats: int) -> Dict[str, object]:
    warmup = _seconds(step)  # grows the heap, fills caches; compiled models compile here
    times = [_seconds(step) for _ in range(repeats)]
    return {"first_step_s": warmup, "step_s": statistics.median(times), "steps_s": times}


def training_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor], data, log_probabilities: bool):
    mask = data.train_mask

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = forward()[mask]
        loss = F.nll_loss(out, data.y[mask]) if log_probabilities else F.cross_entropy(out, data.y[mask])
        loss.backward()
    return step


def build_batch(store: Path, store_nodes: int, batch_nodes: int, degree: float, features: int, classes: int):
    if not (store / "meta.json").is_file():
        write_synthetic_store(store, store_nodes, num_classes=classes, num_features=features, avg_degree=degree)
    request = next(iter(PartitionSampler(store_nodes, batch_nodes, seed=0)))
    return BatchBuilder(store)[request]


def breakdown(data, hidden: int, layers: int, repeats: int = 3) -> Dict[str, float]:
    """Seconds of the step's parts, each timed alone at its shape (CPU): the dense products of
    the diffusion layers (forward and backward, the fused layer's shapes; not the input and
    output layers), the six sparse products, building
    the normalised graph and its transpose, building the batch; and the product with the mix
    matrix at D + 1 columns against the padded D + 8 rounding the fused layer uses."""
    from difformer_lightning.graph import NormalizedGraph

    n, h = data.num_nodes, hidden
    x, w, p3 = torch.randn(n, h), torch.randn(3 * h, h), torch.randn(n, 3 * h)
    padded = -(-(h + 1) // 8) * 8
    mix, grad_product, square = torch.randn(h, padded), torch.randn(n, padded), torch.randn(h, h)
    out_h, out_3h = torch.empty(n, h), torch.empty(n, 3 * h)

    def best(work: Callable[[], object]) -> float:
        work()
        return min(_seconds(work) for _ in range(repeats))
    per_layer = [lambda: torch.mm(x, w.t(), out=out_3h), lambda: torch.mm(x.t(), x),  # QKV, K^T V
                 lambda: torch.mm(x, mix), lambda: torch.mm(p3, w, out=out_h),  # Q M, input gradient
                 lambda: torch.mm(p3.t(), x), lambda: torch.mm(x.t(), grad_product),  # weight grad, Q^T dP
                 lambda: torch.mm(grad_product, mix.t(), out=out_h),  # dQ
                 lambda: torch.mm(x, square, out=out_h), lambda: torch.mm(x, square, out=out_h)]  # dK, dV
    graph = NormalizedGraph.build(data.edge_index, None, n)
    return {"dense_products_s": layers * sum(best(work) for work in per_layer),
            "sparse_products_s": layers * (best(lambda: graph.adjacency @ x) + best(lambda: graph.transposed @ x)),
            "graph_build_s": best(lambda: NormalizedGraph.build(data.edge_index, None, n).transposed),
            "mix_product_unpadded_s": best(lambda: torch.mm(x, mix[:, :h + 1])),
            "mix_product_padded_s": best(lambda: torch.mm(x, mix))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batch-nodes", type=int, default=100_000)
    parser.add_argument("--store-nodes", type=int, default=200_000)
    parser.add_argument("--degree", type=float, default=20.0, help="average degree of the store's graph")
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of ours (after one warm-up step)")
    parser.add_argument("--pyg-repeats", type=int, default=2, help="timed steps of PyG's SGFormer")
    parser.add_argument("--store", help="store folder to build or reuse (default: a temporary one)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        store = Path(args.store or Path(scratch) / "store")
        data = build_batch(store, args.store_nodes, args.batch_nodes, args.degree, args.features, args.classes)
        batch_build_s = _seconds(lambda: build_batch(store, args.store_nodes, args.batch_nodes, args.degree,
                                                     args.features, args.classes))
    device = torch.device(args.device)
    data = data.to(device)
    self_loops = data.num_nodes  # the graph term adds one per node (the batch has none)
    sizes = dict(nodes=data.num_nodes, edges=data.num_edges + self_loops, features=args.features,
                 hidden=args.hidden, classes=args.classes, layers=args.layers)
    result: Dict[str, object] = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "cpu": platform.processor() or platform.machine(), **sizes}

    torch.manual_seed(0)
    ours = DIFFormer(args.features, args.hidden, args.classes, num_layers=args.layers, kernel="simple",
                     use_graph=True, use_weight=True, dropout=0.0).to(device)
    step = _synchronised(training_step(ours, lambda: ours(data.x, data.edge_index), data, False), device)
    from torch_geometric.nn.models import SGFormer
    torch.manual_seed(0)
    theirs = SGFormer(args.features, args.hidden, args.classes, trans_num_layers=args.layers, trans_num_heads=1,
                      trans_dropout=0.0, gnn_num_layers=args.layers, gnn_dropout=0.0).to(device)
    graph_ids = torch.zeros(data.num_nodes, dtype=torch.long, device=device)
    pyg_step = _synchronised(training_step(theirs, lambda: theirs(data.x, data.edge_index, graph_ids), data, True),
                             device)

    if device.type == "cpu":
        a, b = torch.randn(data.num_nodes, args.hidden), torch.randn(data.num_nodes, args.hidden)
        result["add_fresh_memory_ms"] = 1e3 * min(_seconds(lambda: a + b) for _ in range(5))
        # First both with glibc's default allocation (how PyG runs unless told otherwise), then with
        # freed memory kept in the process (what train.py does), the setting of every other figure.
        result["ours_step_s_default_allocator"] = time_steps(step, max(1, args.repeats // 2))["step_s"]
        result["pyg_sgformer_step_s_default_allocator"] = time_steps(pyg_step, args.pyg_repeats)["step_s"]
        result["keeps_freed_memory"] = keep_freed_memory()
        a + b
        result["add_reused_memory_ms"] = 1e3 * min(_seconds(lambda: a + b) for _ in range(5))
        result.update(batch_build_s=batch_build_s, **breakdown(data, args.hidden, args.layers))
    result["matmul_gflops"] = matmul_gflops() if device.type == "cpu" else _cuda_matmul_gflops(device)
    timed = time_steps(step, args.repeats)
    result.update(ours_first_step_s=timed["first_step_s"], ours_step_s=timed["step_s"], ours_steps_s=timed["steps_s"])
    result["flops_ours"] = difformer_flops(**sizes)
    result["step_gflops"] = result["flops_ours"] / timed["step_s"] / 1e9
    result["efficiency"] = result["step_gflops"] / result["matmul_gflops"]
    result["ours_nodes_per_s"] = data.num_nodes / timed["step_s"]

    if args.compile:
        compiled = torch.compile(ours)
        compiled_step = _synchronised(training_step(ours, lambda: compiled(data.x, data.edge_index), data, False),
                                      device)
        try:
            timed_compiled = time_steps(compiled_step, args.repeats)
            result.update(compiled_step_s=timed_compiled["step_s"], compile_s=timed_compiled["first_step_s"])
        except Exception as error:  # noqa: BLE001  report why compilation is unavailable, keep the other figures
            result["compile_error"] = f"{type(error).__name__}: {error}"[:500]

    result["pyg_sgformer_step_s"] = time_steps(pyg_step, args.pyg_repeats)["step_s"]
    result["flops_pyg_sgformer"] = sgformer_flops(**sizes)
    result["pyg_sgformer_gflops"] = result["flops_pyg_sgformer"] / result["pyg_sgformer_step_s"] / 1e9
    result["pyg_sgformer_nodes_per_s"] = data.num_nodes / result["pyg_sgformer_step_s"]
    result["ratio_vs_pyg"] = result["ours_nodes_per_s"] / result["pyg_sgformer_nodes_per_s"]
    if "pyg_sgformer_step_s_default_allocator" in result:
        pyg_default = result["pyg_sgformer_step_s_default_allocator"]
        result["ratio_vs_pyg_both_default_allocator"] = pyg_default / result["ours_step_s_default_allocator"]
        # as each runs out of the box: ours through train.py, PyG's with glibc's default
        result["ratio_vs_pyg_default_allocator"] = pyg_default / result["ours_step_s"]
    write_json_atomic(args.out, result)
    _print_table(result)


def _synchronised(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    if device.type != "cuda":
        return step

    def run() -> None:
        step()
        torch.cuda.synchronize(device)
    return run


def _cuda_matmul_gflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.matmul(a, b, out=out)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b, out=out)
    torch.cuda.synchronize(device)
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def _print_table(result: Dict[str, object]) -> None:
    print(f"{result['nodes']:,} nodes, {result['edges']:,} edges (with self loops), hidden {result['hidden']}, "
          f"{result['layers']} layers, {result['device']}, {result['threads']} threads")
    print("| | step (s) | nodes/s | GFLOP per step | GFLOP/s | of matmul rate |")
    print("|---|---|---|---|---|---|")
    matmul = result["matmul_gflops"]
    print(f"| float32 matmul 4096^2 | | | | {matmul:.0f} | 100% |")
    rows = [("DIFFormer-s (ours)", result["ours_step_s"], result["flops_ours"])]
    if "compiled_step_s" in result:
        rows.append(("ours, torch.compile", result["compiled_step_s"], result["flops_ours"]))
    rows.append(("PyG SGFormer", result["pyg_sgformer_step_s"], result["flops_pyg_sgformer"]))
    if "ours_step_s_default_allocator" in result:
        rows += [("ours, glibc default allocation", result["ours_step_s_default_allocator"], result["flops_ours"]),
                 ("PyG SGFormer, glibc default allocation", result["pyg_sgformer_step_s_default_allocator"],
                  result["flops_pyg_sgformer"])]
    for name, seconds, flops in rows:
        rate = flops / seconds / 1e9
        print(f"| {name} | {seconds:.3f} | {result['nodes'] / seconds:,.0f} | {flops / 1e9:.1f} | {rate:.0f} | "
              f"{rate / matmul:.0%} |")
    print(f"ours / PyG nodes per second, both keeping freed memory: {result['ratio_vs_pyg']:.2f}x")
    if "ratio_vs_pyg_default_allocator" in result:
        print(f"ours / PyG, both with glibc's default: {result['ratio_vs_pyg_both_default_allocator']:.2f}x; "
              f"ours as train.py runs it / PyG's default: {result['ratio_vs_pyg_default_allocator']:.2f}x")
    if "compile_error" in result:
        print(f"torch.compile unavailable: {result['compile_error']}")


if __name__ == "__main__":
    main()
