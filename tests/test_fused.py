"""The fused DIFFormer-s layer against autograd on the plain formula and against finite differences."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, scaled_timeout
from difformer_lightning import NormalizedGraph, linear_attention
from difformer_lightning.fused import fused_linear_diffusion

NUM_NODES, WIDTH = 30, 5


def reference(projected, value, heads, graph, graph_weight):
    """linear_attention (autograd) plus the graph term, averaged over heads, as DIFFormerConv computed it."""
    n, hd = projected.size(0), heads * WIDTH
    query, key = projected[:, :hd].view(n, heads, WIDTH), projected[:, hd:2 * hd].view(n, heads, WIDTH)
    values = projected[:, 2 * hd:].view(n, heads, WIDTH) if value is None else value.unsqueeze(1).expand(n, heads, WIDTH)
    out = linear_attention(query, key, values, "frobenius")
    if graph is not None:
        local = graph.propagate(values)
        out = (1 - graph_weight) * out + graph_weight * local if graph_weight > 0 else out + local
    return out.mean(dim=1)


def inputs(heads, shared_value, with_graph, seed=0):
    generator = torch.Generator().manual_seed(seed)
    columns = (2 if shared_value else 3) * heads * WIDTH
    projected = torch.randn(NUM_NODES, columns, generator=generator, dtype=torch.float64).requires_grad_()
    value = torch.randn(NUM_NODES, WIDTH, generator=generator, dtype=torch.float64).requires_grad_() if shared_value else None
    edges = torch.randint(NUM_NODES, (2, 90), generator=generator)
    graph = NormalizedGraph.build(edges, torch.rand(90, generator=generator), NUM_NODES, torch.float64) if with_graph else None
    return projected, value, graph


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("shared_value", [False, True])
@pytest.mark.parametrize("graph_weight", [None, -1.0, 0.3])
def test_values_and_gradients_equal_autograd_on_the_formula(heads, shared_value, graph_weight):
    projected, value, graph = inputs(heads, shared_value, graph_weight is not None)
    weight = -1.0 if graph_weight is None else graph_weight
    leaves = [projected] + ([value] if shared_value else [])
    grad = torch.randn(NUM_NODES, WIDTH, dtype=torch.float64)
    fused = fused_linear_diffusion(projected, heads, graph, weight, value)
    expected = reference(projected, value, heads, graph, weight)
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(fused, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("heads, shared_value", [(1, False), (2, True)])
def test_backward_matches_finite_differences(heads, shared_value):
    projected, value, graph = inputs(heads, shared_value, with_graph=True, seed=1)
    leaves = (projected,) + ((value,) if shared_value else ())

    def function(*tensors):
        return fused_linear_diffusion(tensors[0], heads, graph, 0.4, tensors[1] if shared_value else None)
    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-7)


def test_a_clamped_norm_has_no_gradient_through_the_norm():
    # All-zero queries: the Frobenius norm is clamped (a constant), as in linear_attention.
    projected, _, graph = inputs(1, False, with_graph=True)
    with torch.no_grad():
        projected[:, :WIDTH] = 0.0
    grad = torch.randn(NUM_NODES, WIDTH, dtype=torch.float64)
    got = torch.autograd.grad(fused_linear_diffusion(projected, 1, graph), projected, grad)[0]
    want = torch.autograd.grad(reference(projected, None, 1, graph, -1.0), projected, grad)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_transposed_graph_is_the_transpose_with_repeated_edges_summed():
    edges = torch.tensor([[0, 1, 1, 2, 2], [1, 2, 2, 0, 1]])  # edge 1 -> 2 twice
    graph = NormalizedGraph.build(edges, None, 3, torch.float64)
    dense = torch.zeros(3, 3, dtype=torch.float64)
    dense.index_put_((graph.edge_index[1], graph.edge_index[0]), graph.edge_weight, accumulate=True)
    torch.testing.assert_close(graph.adjacency.to_dense(), dense)
    torch.testing.assert_close(graph.transposed.to_dense(), dense.t())


FAULTS = """
import resource, sys, torch
from difformer_lightning.allocator import keep_freed_memory
kept = keep_freed_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2**20 // 4)  # 64 MiB, freed at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sorted(faults[2:])[len(faults[2:]) // 2])  # the median once the heap has settled
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.slow
def test_freed_memory_is_reused_without_page_faults():
    """The setting is process-wide, so each case runs in its own interpreter."""
    def run(setting):
        env = {**os.environ, "DIFFORMER_KEEP_FREED_MEMORY": setting}
        out = subprocess.run([sys.executable, "-c", FAULTS], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=scaled_timeout(15))
        assert out.returncode == 0, out.stderr[-2000:]
        kept, faults = out.stdout.split()
        return kept == "True", int(faults)
    pages = 64 * 2**20 // 4096
    kept, faults = run("1")
    # The freed block is reused: almost no new pages (an early allocation may still split the heap
    # once, hence the median over repeats).
    assert kept and faults < pages // 100
    kept, faults = run("0")
    assert not kept and faults > pages // 2  # glibc unmaps it on free and faults it in again
