"""The encoder against an independent dense float64 reference (tests/dense_reference.py)."""
import itertools

import pytest
import torch
from torch_geometric.utils import to_undirected

from difformer_lightning import DIFFormer, DIFFormerConv, NormalizedGraph, sigmoid_attention
from difformer_lightning.attention import linear_attention

from dense_reference import dense_difformer, dense_propagation

NUM_NODES, IN_CHANNELS, HIDDEN, CLASSES = 23, 7, 6, 3


def random_graph(num_nodes=NUM_NODES, num_edges=40, seed=0, self_loops=0):
    generator = torch.Generator().manual_seed(seed)
    edge_index = to_undirected(torch.randint(num_nodes, (2, num_edges), generator=generator), num_nodes=num_nodes)
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    if self_loops:  # a few nodes that already carry a self loop: none may be added twice
        loops = torch.arange(self_loops).repeat(2, 1)
        edge_index = torch.cat([edge_index, loops], dim=1)
    weight = torch.rand(edge_index.size(1), generator=generator) + 0.5
    x = torch.randn(num_nodes, IN_CHANNELS, generator=generator)
    return x, edge_index, weight


def build(kernel, heads=1, use_graph=True, use_weight=True, qk_norm="frobenius", graph_weight=-1.0, seed=0, **kw):
    torch.manual_seed(seed)
    model = DIFFormer(IN_CHANNELS, HIDDEN, CLASSES, num_layers=2, num_heads=heads, kernel=kernel, use_graph=use_graph,
                      graph_weight=graph_weight, use_weight=use_weight, qk_norm=qk_norm, dropout=0.3, **kw)
    return model.eval()


CASES = [
    *[dict(kernel="simple", qk_norm=n, use_graph=g, heads=h, weighted=w, use_weight=u)
      for n, g, h, w, u in itertools.product(["frobenius", "row"], [True, False], [1, 4], [False, True],
                                             [True, False])],
    *[dict(kernel="sigmoid", use_graph=g, heads=h, weighted=w, use_weight=u)
      for g, h, w, u in itertools.product([True, False], [1, 4], [False, True], [True, False])],
    *[dict(kernel=k, heads=h, weighted=w) for k, h, w in itertools.product(["gcn", "gat"], [1, 4], [False, True])],
    dict(kernel="none", heads=1, use_graph=False), dict(kernel="none", heads=4, use_graph=False),
    dict(kernel="simple", graph_weight=0.3), dict(kernel="sigmoid", graph_weight=0.7, heads=4),
    dict(kernel="simple", use_bn=False, use_residual=False), dict(kernel="gcn", self_loops=5, weighted=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_forward_matches_dense_reference(case):
    case = dict(case)
    weighted = case.pop("weighted", False)
    x, edge_index, weight = random_graph(self_loops=case.pop("self_loops", 0))
    model = build(**case)
    needs_graph = model.needs_graph
    edges = edge_index if needs_graph else None
    weights = weight if (weighted and needs_graph) else None
    got = model(x, edges, weights)
    assert got.dtype == torch.float32
    expected = dense_difformer(model, x, edges, weights)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    # float64 weights and inputs reproduce the reference to float64 precision
    torch.testing.assert_close(model.double()(x.double(), edges, weights), expected, rtol=1e-9, atol=1e-10)


def test_graph_normalisation_matches_dense():
    x, edge_index, weight = random_graph(self_loops=4)
    graph = NormalizedGraph.build(edge_index, weight, NUM_NODES)
    dense, _ = dense_propagation(edge_index, weight, NUM_NODES)
    torch.testing.assert_close(graph.adjacency.to_dense().double(), dense, rtol=1e-6, atol=1e-7)
    # exactly one self loop per node
    loops = graph.edge_index[0] == graph.edge_index[1]
    assert torch.equal(torch.sort(graph.edge_index[0, loops]).values, torch.arange(NUM_NODES))


@pytest.mark.parametrize("kernel", ["simple", "sigmoid", "gcn", "gat", "none"])
def test_permutation_equivariance(kernel):
    x, edge_index, weight = random_graph()
    model = build(kernel, heads=2, use_graph=kernel in ("simple", "sigmoid"))
    perm = torch.randperm(NUM_NODES, generator=torch.Generator().manual_seed(1))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(NUM_NODES)
    out = model(x, edge_index, weight)
    out_permuted = model(x[perm], inverse[edge_index], weight)
    torch.testing.assert_close(out_permuted, out[perm], rtol=1e-5, atol=1e-6)


def test_sigmoid_blocks_equal_dense_in_value_and_gradient():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(300, 2, 8, generator=generator, requires_grad=True) for _ in range(3))
    one_block = sigmoid_attention(q, k, v, block_bytes=2**40)
    grads_dense = torch.autograd.grad(one_block.square().sum(), (q, k, v))
    # 16 bytes x 300 nodes x 2 heads per row: 7 rows a block -> 43 blocks, the last one short
    blocked = sigmoid_attention(q, k, v, block_bytes=16 * 300 * 2 * 7)
    grads_blocked = torch.autograd.grad(blocked.square().sum(), (q, k, v))
    scores = torch.sigmoid(torch.einsum("nhd,lhd->nlh", q, k))
    dense = torch.einsum("nlh,lhd->nhd", scores / scores.sum(dim=1, keepdim=True), v)
    torch.testing.assert_close(one_block, dense)
    torch.testing.assert_close(blocked, dense)
    for a, b in zip(grads_blocked, grads_dense):
        torch.testing.assert_close(a, b)


def test_sigmoid_size_guard_raises_before_work():
    model = build("sigmoid", sigmoid_block_bytes=100)  # one row of 23 nodes needs 368 bytes
    with pytest.raises(ValueError, match="DIFFormer-a .* single row"):
        model.check_fits(NUM_NODES)
    x, edge_index, _ = random_graph()
    with pytest.raises(ValueError, match="sigmoid_block_bytes"):
        model(x, edge_index)


def test_frobenius_attention_is_nearly_uniform_and_row_norm_is_not():
    # DIFFORMER.md section 5: with whole-tensor normalisation N * A_nl - 1 = O(1/N).
    n = 2708
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(n, 1, 16, generator=generator) for _ in range(2))
    eye = torch.eye(n).unsqueeze(1)  # V = one-hot rows exposes the attention matrix column by column
    for norm, low, high in (("frobenius", 0.0, 1e-3), ("row", 0.5, 10.0)):
        attention = linear_attention(q, k, eye[:, :, :400], norm)[:, 0]  # [n, 400] = A[:, :400]
        deviation = (n * attention - 1).abs().max().item()
        assert low <= deviation <= high, (norm, deviation)


def test_low_precision_autocast_keeps_global_sums_in_float32():
    # 100,000 nodes: in bfloat16, N + q.sum(k) == N and column sums lose ~0.2% (SCALE.md).
    torch.manual_seed(0)
    conv = DIFFormerConv(16, 16, num_heads=1, kernel="simple", use_graph=False, qk_norm="row").eval()
    x = torch.randn(100_000, 16) + 0.5
    reference = conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = conv(x)
        q, k, v = (lin(x).view(-1, 1, 16) for lin in (conv.query, conv.key, conv.value))
    assert mixed.dtype == torch.float32
    naive = linear_attention(q, k, v, "row").mean(dim=1)  # every sum in bfloat16
    mixed_error = (mixed - reference).abs().max().item()
    naive_error = (naive.float() - reference).abs().max().item()
    assert mixed_error < 1e-2 * reference.abs().max().item()
    assert naive_error > 4 * mixed_error, (naive_error, mixed_error)


@pytest.mark.parametrize("bad, message", [
    (dict(kernel="softmax"), "unknown kernel 'softmax'"),
    (dict(qk_norm="l1"), "unknown qk_norm 'l1'"),
    (dict(num_layers=0), "num_layers must be at least 1"),
])
def test_bad_arguments_name_the_problem(bad, message):
    args = dict(in_channels=4, hidden_channels=8, out_channels=2) | bad
    with pytest.raises(ValueError, match=message):
        DIFFormer(**args)


def test_graph_kernels_without_edges_say_so():
    x, _, _ = random_graph()
    for kernel in ("gcn", "gat", "simple"):
        with pytest.raises(ValueError, match="no edge_index"):
            build(kernel)(x)
    assert build("simple", use_graph=False)(x).shape == (NUM_NODES, CLASSES)


@pytest.mark.parametrize("kernel", ["simple", "gat"])
def test_reset_parameters_reaches_every_parameter(kernel):
    model = build(kernel, heads=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(7.0)
    model.reset_parameters()
    for name, parameter in model.named_parameters():
        assert not (parameter == 7.0).any(), name


def test_bf16_encoder_forward_agrees_with_float32_on_100k_nodes():
    # The whole encoder (DIFFormer-s as published: Frobenius norm, graph term, 3 layers) under
    # bf16 autocast: projections in bf16, global sums and the graph product in float32.
    # Stated tolerance: 1% relative (Frobenius) error of the logits, 99% of nodes keep their class.
    torch.manual_seed(0)
    num_nodes = 100_000
    x = torch.randn(num_nodes, 32) + 0.3
    edge_index = torch.randint(0, num_nodes, (2, 500_000))
    model = DIFFormer(32, 32, 8, num_layers=3, use_graph=True).eval()
    with torch.no_grad():
        reference = model(x, edge_index)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x, edge_index)
        query = model.convs[0].query(model.diffuse(x, edge_index)[0])
    assert torch.isfinite(mixed).all()
    assert ((mixed - reference).norm() / reference.norm()).item() < 1e-2
    assert (mixed.argmax(dim=1) == reference.argmax(dim=1)).float().mean().item() > 0.99
    # Why the sums stay in float32: the data-dependent part of the denominator, q~_n . sum_l k~_l,
    # vanishes next to N in bfloat16 (N + it == N) for most nodes.
    q = query / query.norm()
    data_part = q @ (q.sum(dim=0))
    naive = (num_nodes + data_part.bfloat16()).bfloat16()
    assert (naive == torch.tensor(num_nodes, dtype=torch.bfloat16)).float().mean().item() > 0.9
    assert ((num_nodes + data_part) != num_nodes).float().mean().item() > 0.9


@pytest.mark.parametrize("kernel, qk_norm, use_graph", [
    ("simple", "frobenius", True), ("simple", "row", False), ("sigmoid", "frobenius", True),
    ("gcn", "frobenius", True), ("gat", "frobenius", True), ("none", "frobenius", False)])
@pytest.mark.parametrize("sizes", [(7, 1, 15, 4), (30, 4, 4, 4), (4, 4, 30, 5, 5), (4, 30, 4, 9)])
def test_a_batch_of_graphs_gives_each_graph_what_it_gets_alone(kernel, qk_norm, use_graph, sizes):
    # sizes: groups of unequal sizes, a large graph first, equal-sized graphs around a large one,
    # a size group split by another graph (scattered nodes) beside consecutive groups
    from torch_geometric.data import Batch, Data
    graphs = [Data(x=x, edge_index=e, edge_weight=w)
              for x, e, w in (random_graph(n, 3 * n, seed=i) for i, n in enumerate(sizes))]
    model = build(kernel, heads=2, use_graph=use_graph, qk_norm=qk_norm)
    batched = Batch.from_data_list(graphs)
    with torch.no_grad():
        together = model(batched.x, batched.edge_index, batched.edge_weight, batched.batch)
        alone = torch.cat([model(g.x, g.edge_index, g.edge_weight) for g in graphs])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    # and the graphs really interact with nothing else: moving one graph's features moves only its rows
    shifted = batched.x.clone()
    shifted[batched.batch == 2] += 1.0
    with torch.no_grad():
        moved = model(shifted, batched.edge_index, batched.edge_weight, batched.batch)
    assert torch.equal(moved[batched.batch != 2], together[batched.batch != 2])
    assert not torch.equal(moved[batched.batch == 2], together[batched.batch == 2])


@pytest.mark.parametrize("kernel, qk_norm", [("simple", "frobenius"), ("simple", "row"), ("sigmoid", "frobenius")])
def test_random_mixes_of_graph_sizes_give_each_graph_what_it_gets_alone(kernel, qk_norm):
    """60 random batches of 1 to 12 graphs of 1 to 12 nodes (repeated sizes, runs of equal sizes, sizes split by
    others: every grouping the attention paths take), float64, against each graph alone; for DIFFormer-a also with
    a block budget that splits the batched product into groups of graphs and single graphs into row blocks."""
    from difformer_lightning.attention import linear_attention, sigmoid_attention
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        count = int(torch.randint(1, 13, (1,), generator=generator))
        sizes = torch.randint(1, 13, (count,), generator=generator)
        if trial % 3 == 0:  # runs of one size
            sizes = sizes[torch.randint(0, count, (count,), generator=generator)].sort().values
        batch = torch.repeat_interleave(torch.arange(count), sizes)
        q, k, v = (torch.randn(int(sizes.sum()), 2, 3, generator=generator, dtype=torch.float64) for _ in range(3))
        parts = list(zip(*(t.split(sizes.tolist()) for t in (q, k, v))))
        for budget in ((2**30, 3 * 8 * 2 * 13) if kernel == "sigmoid" else (None,)):
            if kernel == "sigmoid":
                together = sigmoid_attention(q, k, v, budget, batch)
                alone = torch.cat([sigmoid_attention(a, b, c, budget) for a, b, c in parts])
            else:
                together = linear_attention(q, k, v, qk_norm, batch)
                alone = torch.cat([linear_attention(a, b, c, qk_norm) for a, b, c in parts])
            torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12, msg=f"sizes {sizes.tolist()}")


def test_an_unsorted_batch_vector_is_refused():
    x, edge_index, _ = random_graph()
    batch = torch.arange(x.size(0)) % 2
    with pytest.raises(ValueError, match="batch must be sorted"):
        build("simple")(x, edge_index, batch=batch)


@pytest.mark.slow
def test_graph_classification_example_runs_as_written():
    import subprocess
    import sys

    from conftest import ROOT as root, scaled_timeout
    result = subprocess.run([sys.executable, "examples/graph_classification.py"], cwd=root, capture_output=True,
                            text=True, timeout=scaled_timeout(15))
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = float(result.stdout.split("test accuracy")[1].split()[0])
    assert accuracy > 0.5  # 4 classes: chance 0.25
