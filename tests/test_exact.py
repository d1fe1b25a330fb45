"""Exact evaluation: the streamed forward against the in-memory one (every kernel and option, awkward
graphs), its pieces against their references, any number of ranks, inside the training loop, and the
predictions it writes."""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.utils import add_remaining_self_loops

from conftest import logged_epochs, scaled_timeout
from datamodules import GraphStore, RandomPartitionDataModule
from datamodules.store import write_store_from_data
from datamodules.synthetic import write_synthetic_store
from difformer_lightning import DIFFormer, NodeClassifier, NormalizedGraph
from difformer_lightning.attention import LinearAttentionStats, linear_attention
from difformer_lightning.graph import gcn_degree, one_self_loop
from difformer_lightning.streaming import layerwise_inference

ROOT = Path(__file__).resolve().parents[1]
NUM_NODES, FEATURES, CLASSES = 29, 5, 3


def awkward_graph(seed: int = 0) -> Data:
    """Directed random edges among nodes 0..24, every tenth edge duplicated, node 3 with three self loops
    of different weights and node 5 with one, nodes 25..28 isolated; positive random weights."""
    generator = torch.Generator().manual_seed(seed)
    edges = torch.randint(25, (2, 80), generator=generator)
    edges = edges[:, edges[0] != edges[1]]
    loops = torch.tensor([[3, 3, 3, 5], [3, 3, 3, 5]])
    edge_index = torch.cat([edges, edges[:, ::10], loops], dim=1)
    weight = torch.rand(edge_index.size(1), generator=generator) + 0.5
    y = torch.randint(CLASSES, (NUM_NODES,), generator=generator)
    split = torch.arange(NUM_NODES) % 3
    return Data(x=torch.randn(NUM_NODES, FEATURES, generator=generator), y=y, edge_index=edge_index,
                edge_weight=weight, train_mask=split == 0, val_mask=split == 1, test_mask=split == 2)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    data = awkward_graph()
    return data, GraphStore.open(write_store_from_data(data, tmp_path_factory.mktemp("awkward") / "store"))


CASES = [
    *[dict(kernel=k, qk_norm=n, graph=g, heads=h, use_weight=u, weighted=w)
      for (k, n), g, h, u, w in itertools.product([("simple", "frobenius"), ("simple", "row"), ("sigmoid", "frobenius")],
                                                    ["none", "sum", "mix"], [1, 4], [True, False], [True, False])],
    *[dict(kernel=k, heads=h, weighted=w) for k, h, w in itertools.product(["gcn", "gat"], [1, 4], [True, False])],
    dict(kernel="none", heads=1), dict(kernel="none", heads=4, use_weight=False),
    dict(kernel="simple", use_residual=False, use_bn=False, weighted=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_streamed_forward_equals_the_in_memory_forward(awkward, tmp_path, case):
    data, store = awkward
    case = dict(case)
    graph, weighted, heads = case.pop("graph", "sum"), case.pop("weighted", False), case.pop("heads", 1)
    torch.manual_seed(0)
    model = DIFFormer(FEATURES, 8, CLASSES, num_layers=3, num_heads=heads, use_graph=graph != "none",
                      graph_weight=0.3 if graph == "mix" else -1.0, dropout=0.5, **case).eval()
    if not weighted:  # the same graph without weights: the store is rewritten without them
        unweighted = Data(**{k: v for k, v in data.items() if k != "edge_weight"})
        store = GraphStore.open(write_store_from_data(unweighted, tmp_path / "unweighted"))
    needs_graph = model.needs_graph
    with torch.no_grad():
        expected = model(data.x, data.edge_index if needs_graph else None,
                         data.edge_weight if needs_graph and weighted else None)
    got = layerwise_inference(model, store, chunk_nodes=7, workdir=tmp_path)  # 4 chunks of 7 and one of 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the accelerator's form (each chunk's source rows gathered), run here on the CPU
    gathered = layerwise_inference(model, store, chunk_nodes=7, workdir=tmp_path, gather=True)
    torch.testing.assert_close(gathered, expected, rtol=1e-5, atol=1e-6)


def test_store_keeps_edge_weights_duplicates_and_self_loops(awkward):
    data, store = awkward
    got = sorted(zip(*store_edge_list(store)))
    want = sorted(zip(data.edge_index[0].tolist(), data.edge_index[1].tolist(),
                      [round(w, 5) for w in data.edge_weight.tolist()]))
    assert got == want


def store_edge_list(store):
    source, target, weight = store.in_edges(0, store.num_nodes)
    return source.tolist(), target.tolist(), [round(w, 5) for w in weight.tolist()]


def test_one_self_loop_follows_pyg_add_remaining_self_loops(awkward):
    data, _ = awkward
    source, target, weight = one_self_loop(data.edge_index[0], data.edge_index[1], data.edge_weight, NUM_NODES)
    expected, expected_weight = add_remaining_self_loops(data.edge_index, data.edge_weight, 1.0, NUM_NODES)
    assert sorted(zip(source.tolist(), target.tolist(), weight.tolist())) == \
        sorted(zip(*expected.tolist(), expected_weight.tolist()))
    assert int((source == target).sum()) == NUM_NODES  # exactly one each, the isolated nodes too
    # node 3 had three loops: the last one's weight is kept
    assert weight[(source == 3) & (target == 3)].item() == data.edge_weight[-2].item()


@pytest.mark.parametrize("start, stop", [(0, 29), (0, 7), (20, 29), (3, 4), (25, 29)])
def test_rows_of_the_normalised_graph_are_the_rows_of_the_whole(awkward, start, stop):
    data, store = awkward
    whole = NormalizedGraph.build(data.edge_index, data.edge_weight, NUM_NODES).adjacency.to_dense()
    source, target, weight = store.in_edges(0, NUM_NODES)
    inv_sqrt = gcn_degree(source, target, NUM_NODES).float().pow(-0.5)
    source, target, weight = store.in_edges(start, stop)
    block, ids = NormalizedGraph.rows(source, target, weight, inv_sqrt, start, stop - start)
    assert ids is None
    torch.testing.assert_close(block.adjacency.to_dense(), whole[start:stop])
    # the form for an accelerator: columns are the distinct sources, gathered by id
    block, ids = NormalizedGraph.rows(source, target, weight, inv_sqrt, start, stop - start, torch.device("cpu"))
    dense = torch.zeros(stop - start, NUM_NODES)
    dense[:, ids] = block.adjacency.to_dense()
    torch.testing.assert_close(dense, whole[start:stop])
    values = torch.randn(NUM_NODES, 2, 3)
    expected = (whole @ values.view(NUM_NODES, -1))[start:stop].view(-1, 2, 3)
    torch.testing.assert_close(block.propagate(values[ids]), expected)
    # the streamed pass's layout: from the store's CSR rows (int32 ids), self loops and target scale apart
    row_pointer, col, weight = store.in_rows(start, stop)
    assert col.dtype == torch.int32
    has_loops = bool((source == target + start).any())
    for gather_to in (None, torch.device("cpu")):
        block, ids = NormalizedGraph.row_block(row_pointer, col, weight, inv_sqrt, start, has_loops, gather_to)
        operand = values if ids is None else values[ids]
        torch.testing.assert_close(block.propagate(operand, values[start:stop]), expected)
        with pytest.raises(ValueError, match="pass the targets' own values"):
            block.propagate(operand)


def test_attention_statistics_add_up_over_chunks_and_survive_one_all_reduce():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 50, 2, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    for norm in ("frobenius", "row"):
        whole = LinearAttentionStats.of(q, k, v, norm)
        parts = [LinearAttentionStats.of(q[:, a:b], k[:, a:b], v[:, a:b], norm) for a, b in ((0, 13), (13, 49), (49, 50))]
        summed = parts[0] + parts[1] + parts[2]
        restored = whole.unflatten(summed.flatten())
        for got, want in zip(restored._fields(), whole._fields()):
            torch.testing.assert_close(got, want)
        # and the chunked statistics attend as the in-memory kernel does
        torch.testing.assert_close(restored.attend(q, norm)[0], linear_attention(q[0], k[0], v[0], norm))


@pytest.mark.slow
def test_any_number_of_ranks_gives_bitwise_the_same_states(awkward, tmp_path):
    _, store = awkward
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    kernels = ["simple", "gat", "sigmoid"]
    # 29 nodes in chunks of 10: 3 chunks; with 4 ranks one rank has none and still joins every collective.
    for world in (1, 2, 4):
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "exact_ranks.py"), str(store.path),
                               str(tmp_path / f"world{world}"), str(world), "10", *kernels], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=scaled_timeout(15 * world))
        assert done.returncode == 0, done.stderr[-3000:]
    for kernel in kernels:
        one = np.load(tmp_path / f"world1-{kernel}.npy")
        for world in (2, 4):
            assert np.array_equal(one, np.load(tmp_path / f"world{world}-{kernel}.npy")), (kernel, world)


def test_difformer_a_is_exact_only_on_request_and_within_its_budget(awkward):
    _, store = awkward
    encoder = DIFFormer(FEATURES, 8, CLASSES, kernel="sigmoid")
    flops = encoder.exact_evaluation_flops(NUM_NODES)
    assert RandomPartitionDataModule(str(store.path), batch_size=10).evaluation_plan(encoder) is None
    assert RandomPartitionDataModule(str(store.path), batch_size=10, evaluation="exact",
                                     exact_budget_flops=flops / 2).evaluation_plan(encoder) is None
    plan = RandomPartitionDataModule(str(store.path), batch_size=10, evaluation="exact",
                                     exact_budget_flops=flops).evaluation_plan(encoder)
    assert plan is not None and plan.chunk_nodes == 10
    simple = DIFFormer(FEATURES, 8, CLASSES)
    assert RandomPartitionDataModule(str(store.path), batch_size=10).evaluation_plan(simple) is not None
    assert RandomPartitionDataModule(str(store.path), batch_size=10,
                                     evaluation="partition").evaluation_plan(simple) is None
    with pytest.raises(ValueError, match="unknown evaluation 'full'"):
        RandomPartitionDataModule(str(store.path), evaluation="full")


# --- inside the loop, through train.py ---------------------------------------------------------------

LOOP_NODES = 1003


@pytest.fixture(scope="module")
def loop_store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("loop") / "csbm", LOOP_NODES, num_classes=3, seed=3)


def run_cli(subcommand: str, *args, run_dir: Path, ranks: int = 1):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    ddp = (["--trainer.devices", str(ranks), "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
           if ranks > 1 else [])
    command = [sys.executable, str(ROOT / "train.py"), subcommand, *args, *ddp, "--trainer.default_root_dir",
               str(run_dir), "--trainer.enable_progress_bar", "false"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=scaled_timeout(20 * ranks))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def offline_logits(checkpoint: Path, store: GraphStore) -> torch.Tensor:
    """The saved weights' in-memory forward over the whole graph, in one process."""
    model = NodeClassifier.load_from_checkpoint(checkpoint).eval()
    source, target, _ = store.in_edges(0, store.num_nodes)
    with torch.no_grad():
        return model.encoder(store.x.float(), torch.stack([source, target]))


def accuracy(logits: torch.Tensor, store: GraphStore, split: str) -> float:
    index = getattr(store, f"{split}_idx")
    return (logits[index].argmax(dim=1) == store.y[index].long()).float().mean().item()


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.slow
def test_a_partition_run_logs_the_exact_full_graph_metrics_and_predicts_them(tmp_path, loop_store, ranks):
    store = GraphStore.open(loop_store)
    run_dir = tmp_path / "run"
    common = ["--config", str(ROOT / "configs" / "synthetic_partition.yaml"), "--data.init_args.store",
              str(loop_store), "--data.init_args.batch_size", "300", "--data.init_args.num_workers", "0",
              "--model.encoder.init_args.hidden_channels", "16", "--model.encoder.init_args.num_layers", "2"]
    run_cli("fit", *common, "--trainer.max_epochs", "3", run_dir=run_dir, ranks=ranks)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    logits = offline_logits(checkpoint, store)
    rows = logged_epochs(run_dir)
    last = rows[max(rows)]
    for split in ("train", "val", "test"):
        assert last[f"{split}/acc"] == pytest.approx(accuracy(logits, store, split), abs=1e-6), split
    best_epoch = max((epoch for epoch in rows if "val/acc" in rows[epoch]), key=lambda e: (rows[e]["val/acc"], -e))
    assert last["test@best_val"] == pytest.approx(rows[best_epoch]["test/acc"], abs=1e-6)

    run_cli("predict", *common, "--ckpt_path", str(checkpoint), "--predictions.embeddings", "true",
            run_dir=run_dir, ranks=ranks)
    written = np.load(run_dir / "predictions" / "logits.npy")
    assert written.shape == (LOOP_NODES, 3) and written.dtype == np.float32
    np.testing.assert_allclose(written, logits.numpy(), rtol=1e-5, atol=1e-5)
    assert np.load(run_dir / "predictions" / "embeddings.npy").shape == (LOOP_NODES, 16)
    assert not list((run_dir / "predictions").glob(".*tmp*"))  # nothing half-written left beside them


@pytest.mark.slow
def test_full_batch_data_writes_the_same_prediction_files(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "--data.init_args.num_nodes", "600",
              "--data.init_args.num_val", "100", "--data.init_args.num_test", "200"]
    run_cli("fit", *common, "--trainer.max_epochs", "2", run_dir=run_dir)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    run_cli("predict", *common, "--ckpt_path", str(checkpoint), run_dir=run_dir)
    from datamodules import SyntheticCSBMDataModule
    data = SyntheticCSBMDataModule(num_nodes=600, num_val=100, num_test=200).data
    model = NodeClassifier.load_from_checkpoint(checkpoint).eval()
    with torch.no_grad():
        expected = model.encoder(data.x, data.edge_index)
    np.testing.assert_allclose(np.load(run_dir / "predictions" / "logits.npy"), expected.numpy(), rtol=1e-5,
                               atol=1e-5)
    manifest = json.loads((run_dir / "predictions" / "predictions.json").read_text())
    assert manifest["checkpoint"] == str(checkpoint) and manifest["rows"] == 600 and manifest["nodes"] == "all"
    # the state it predicts with, not the predicting Trainer's counters (0: predict restores only weights)
    assert (manifest["epoch"], manifest["global_step"]) == (1, 2)
    assert manifest["files"] == {"logits.npy": [600, 5]}
    # a second predict with embeddings, a dead writer's staging file; then one without: nothing of the
    # earlier set stays, the dead writer's file is gone
    run_cli("predict", *common, "--ckpt_path", str(checkpoint), "--predictions.embeddings", "true", run_dir=run_dir)
    assert json.loads((run_dir / "predictions" / "predictions.json").read_text())["files"] == {
        "logits.npy": [600, 5], "embeddings.npy": [600, 64]}
    dead = run_dir / "predictions" / ".embeddings.npy.tmp-999999999-deadbeef"
    dead.write_bytes(b"half")
    run_cli("predict", *common, "--ckpt_path", str(checkpoint), run_dir=run_dir)
    assert sorted(p.name for p in (run_dir / "predictions").iterdir()) == ["logits.npy", "predictions.json"]
