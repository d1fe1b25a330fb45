"""The graph store and random node partition against PyG's subgraph and hand-made graphs."""
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.utils import subgraph

from datamodules import GraphStore, PlanetoidDataModule, RandomPartitionDataModule, StoreError
from datamodules.csr import induced_subgraph
from datamodules.partition import BatchBuilder, PartitionSampler
from datamodules.store import StoreWriter, write_store_from_data
from datamodules.synthetic import write_synthetic_store
from difformer_lightning import DIFFormer, NodeClassifier


def directed_graph():
    """6 nodes, directed edges (source -> target), one node in no split."""
    edge_index = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 2], [1, 2, 0, 4, 5, 3, 3, 5]])
    mask = lambda ids: torch.isin(torch.arange(6), torch.tensor(ids))  # noqa: E731
    return Data(x=torch.arange(18, dtype=torch.float).view(6, 3), y=torch.tensor([0, 1, 0, 1, 0, -1]),
                edge_index=edge_index, train_mask=mask([0, 1]), val_mask=mask([2, 3]), test_mask=mask([4]))


def edge_set(edge_index):
    return sorted(map(tuple, edge_index.t().tolist()))


def store_edges(store):
    degree = store.rowptr[1:] - store.rowptr[:-1]
    return torch.stack([store.col.long(), torch.repeat_interleave(torch.arange(store.num_nodes), degree)])


@pytest.fixture
def cora_store(planetoid_root, tmp_path):
    data = PlanetoidDataModule("Cora", root=str(planetoid_root)).data
    return data, write_store_from_data(data, tmp_path / "cora")


def test_store_round_trip_keeps_every_edge_feature_label_and_split(tmp_path):
    data = directed_graph()
    store = GraphStore.open(write_store_from_data(data, tmp_path / "g", num_classes=2))
    assert (store.num_nodes, store.num_edges, store.num_features, store.num_classes) == (6, 8, 3, 2)
    assert store.col.dtype == torch.int32 and store.rowptr.dtype == torch.int64
    assert edge_set(store_edges(store)) == edge_set(data.edge_index)
    # incoming edges: node 3 receives messages from 5 and from 0
    assert sorted(store.col[store.rowptr[3]:store.rowptr[4]].tolist()) == [0, 5]
    assert torch.equal(store.x, data.x) and torch.equal(store.y.long(), data.y)
    assert store.train_idx.tolist() == [0, 1] and store.val_idx.tolist() == [2, 3] and store.test_idx.tolist() == [4]
    assert store.split.tolist() == [1, 1, 2, 2, 3, 0]


@pytest.mark.parametrize("slice_positions", [1 << 22, 100, 1])
def test_induced_subgraph_matches_pyg_subgraph(cora_store, monkeypatch, slice_positions):
    """Also read in slices of 100 in-edge positions, and of one node each (bounded memory per batch)."""
    import datamodules.csr as csr
    monkeypatch.setattr(csr, "SUBGRAPH_SLICE", slice_positions)
    data, path = cora_store
    store = GraphStore.open(path)
    for seed, size in ((0, 900), (1, 2708), (2, 1), (3, 50)):
        nodes = torch.randperm(2708, generator=torch.Generator().manual_seed(seed))[:size].sort().values
        expected, expected_ids = subgraph(nodes, data.edge_index, relabel_nodes=True, num_nodes=2708)
        got, positions = induced_subgraph(store.rowptr, store.col, nodes)
        assert edge_set(got) == edge_set(expected)
        # each kept edge's position in col holds its source
        assert torch.equal(nodes[got[0]], store.col[positions].long())


def test_batches_carry_aligned_features_labels_masks_and_directed_edges(tmp_path):
    data = directed_graph()
    builder = BatchBuilder(write_store_from_data(data, tmp_path / "g", num_classes=2))
    batch = builder[torch.tensor([5, 0, 3, 2]), 0]  # any order in, sorted ids out
    assert batch.n_id.tolist() == [0, 2, 3, 5]
    assert torch.equal(batch.x, data.x[batch.n_id]) and torch.equal(batch.y, data.y[batch.n_id])
    assert batch.train_mask.tolist() == [True, False, False, False]
    assert batch.val_mask.tolist() == [False, True, True, False] and not batch.test_mask.any()
    # induced edges among {0, 2, 3, 5}: 2->0, 0->3, 5->3, 2->5, as positions in n_id
    assert edge_set(batch.edge_index) == edge_set(torch.tensor([[1, 0, 3, 1], [0, 2, 2, 3]]))


@pytest.mark.parametrize("num_nodes, batch_size, world", [(2708, 1000, 1), (2708, 1000, 2), (1003, 100, 4),
                                                           (10, 3, 3), (7, 7, 1)])
def test_partition_is_shared_disjoint_and_balanced_across_ranks(num_nodes, batch_size, world):
    samplers = [PartitionSampler(num_nodes, batch_size, seed=4, num_replicas=world, rank=r) for r in range(world)]
    for sampler in samplers:
        sampler.set_epoch(3)
    per_rank = [[nodes for nodes, _ in sampler] for sampler in samplers]
    assert len({len(batches) for batches in per_rank}) == 1  # equal batch counts: no rank waits at the end
    assert all(len(batches) == len(sampler) for batches, sampler in zip(per_rank, samplers))
    everything = torch.cat([b for batches in per_rank for b in batches])
    assert everything.numel() == num_nodes and torch.equal(everything.sort().values, torch.arange(num_nodes))
    assert max(b.numel() for batches in per_rank for b in batches) <= batch_size
    again = PartitionSampler(num_nodes, batch_size, seed=4, num_replicas=world, rank=0)
    again.set_epoch(3)
    assert all(torch.equal(a, b) for (a, _), b in zip(again, per_rank[0]))  # a function of (seed, epoch) only


def test_partition_changes_every_epoch_and_eval_partition_is_fixed():
    sampler = PartitionSampler(500, 100, seed=0)
    first = [nodes for nodes, _ in sampler]
    sampler.set_epoch(1)
    assert not torch.equal(torch.cat(first), torch.cat([nodes for nodes, _ in sampler]))
    fixed = PartitionSampler(500, 100, shuffle=False)
    fixed.set_epoch(5)
    assert torch.equal(torch.cat([nodes for nodes, _ in fixed]), torch.arange(500))


def test_synthetic_store_is_deterministic_homophilous_and_symmetric(tmp_path):
    a = GraphStore.open(write_synthetic_store(tmp_path / "a", 20_000, num_classes=4, avg_degree=8, homophily=0.7,
                                              seed=3, chunk=10_000))
    b = GraphStore.open(write_synthetic_store(tmp_path / "b", 20_000, num_classes=4, avg_degree=8, homophily=0.7,
                                              seed=3, chunk=10_000))
    assert torch.equal(a.col, b.col) and torch.equal(a.x, b.x) and a.x.dtype == torch.float16
    edges = store_edges(a)
    assert abs(a.num_edges / 20_000 - 8) < 0.1
    same = (a.y[edges[0]] == a.y[edges[1]]).float().mean().item()
    assert abs(same - (0.7 + 0.3 / 4)) < 0.02
    assert edge_set(edges) == edge_set(edges.flip(0))  # every pair stored in both directions
    sizes = [a.train_idx.numel(), a.val_idx.numel(), a.test_idx.numel()]
    assert sizes == [10_000, 5_000, 5_000] and torch.cat([a.train_idx, a.val_idx, a.test_idx]).unique().numel() == 20_000


def test_interrupted_writer_leaves_nothing_that_opens(tmp_path):
    target = tmp_path / "store"
    with pytest.raises(RuntimeError, match="interrupted"):
        with StoreWriter(target) as writer:
            writer.create("x", (10, 2), np.float32)
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(StoreError, match="missing meta.json"):
        GraphStore.open(target)


def corrupt(path, name, change):
    array = np.load(path / f"{name}.npy")
    change(array)
    np.save(path / f"{name}.npy", array)


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "col.npy").write_bytes((p / "col.npy").read_bytes()[:-8]), "truncated"),
    (lambda p: corrupt(p, "rowptr", lambda a: a.__setitem__(3, 10**6)), "rowptr decreases at node 3"),
    (lambda p: corrupt(p, "col", lambda a: a.__setitem__(5, 2708)), r"col holds node ids in \[0, 2708\]"),
    (lambda p: corrupt(p, "val_idx", lambda a: a.__setitem__(0, -4)), r"val_idx holds ids in \[-4"),
    (lambda p: (p / "meta.json").write_text((p / "meta.json").read_text().replace('"int32"', '"int64"')),
     "holds int32 .* meta.json records int64"),
    (lambda p: (p / "x.npy").unlink(), "lacks x.npy"),
])
def test_damaged_store_is_refused_with_the_problem_named(cora_store, damage, message):
    _, path = cora_store
    damage(path)
    with pytest.raises(StoreError, match=message):
        GraphStore.open(path)


def test_bad_batch_sizes_and_empty_splits(cora_store, tmp_path):
    _, path = cora_store
    for size in (0, -5, 2709):
        with pytest.raises(ValueError, match=r"batch_size must be in \[1, 2708\]"):
            RandomPartitionDataModule(str(path), batch_size=size).setup("fit")
    with pytest.raises(StoreError, match="no graph store"):
        RandomPartitionDataModule(str(tmp_path / "nowhere")).setup("fit")
    data = directed_graph()
    empty = write_store_from_data(data, tmp_path / "g", num_classes=2)
    meta = json.loads((empty / "meta.json").read_text())
    np.save(empty / "val_idx.npy", np.zeros(0, dtype=np.int64))
    meta["arrays"]["val_idx"].update(shape=[0], bytes=(empty / "val_idx.npy").stat().st_size)
    (empty / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="the val split selects no node"):
        RandomPartitionDataModule(str(empty), batch_size=2).setup("fit")


@pytest.mark.slow
def test_partition_training_on_cora_and_batched_metrics(cora_store):
    data, path = cora_store
    module = RandomPartitionDataModule(str(path), batch_size=1000, num_workers=0, evaluation="partition")
    pl.seed_everything(0)
    model = NodeClassifier(DIFFormer(module.num_features, 32, module.num_classes, num_layers=2, dropout=0.2,
                                     use_weight=False), lr=0.01, weight_decay=5e-4)
    trainer = pl.Trainer(max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=module)
    # the logged validation accuracy is the fraction of correct val nodes over all eval batches
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for batch in module.val_dataloader():
            predicted = model(batch).argmax(dim=1)
            correct += int((predicted == batch.y)[batch.val_mask].sum())
            total += int(batch.val_mask.sum())
    assert total == 500
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(correct / total, abs=1e-6)
    assert correct / total > 0.6  # 7 classes; batches of 1000 keep about 37% of Cora's edges


@pytest.mark.parametrize("options", [dict(kernel="simple"), dict(kernel="simple", qk_norm="row", num_heads=2),
                                     dict(kernel="simple", use_weight=False, graph_weight=0.3),
                                     dict(kernel="simple", use_graph=False), dict(kernel="gcn"),
                                     dict(kernel="none", use_graph=False), dict(kernel="simple", use_residual=False)])
def test_layerwise_inference_equals_the_in_memory_forward(tmp_path, options):
    from difformer_lightning.streaming import layerwise_inference

    data = directed_graph()
    data.edge_index = torch.cat([data.edge_index, torch.tensor([[4], [4]])], dim=1)  # one existing self loop
    generator = torch.Generator().manual_seed(0)
    data.x = torch.randn(6, 3, generator=generator)
    store = GraphStore.open(write_store_from_data(data, tmp_path / "g", num_classes=2))
    torch.manual_seed(0)
    model = DIFFormer(3, 4, 2, num_layers=3, dropout=0.5, **options).eval()
    expected = model(data.x, data.edge_index)
    got = layerwise_inference(model, store, chunk_nodes=4, workdir=tmp_path)  # chunks of 4 and 2 rows
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layerwise_inference_on_cora_store(cora_store, tmp_path):
    from difformer_lightning.streaming import layerwise_inference

    data, path = cora_store
    torch.manual_seed(0)
    model = DIFFormer(1433, 16, 7, num_layers=4, use_weight=True).eval()
    got = layerwise_inference(model, GraphStore.open(path), chunk_nodes=1000, workdir=tmp_path,
                              out=tmp_path / "logits.npy")
    assert np.load(tmp_path / "logits.npy", mmap_mode="r").shape == (2708, 7)
    torch.testing.assert_close(got, model(data.x, data.edge_index), rtol=1e-4, atol=1e-5)


def test_seed_and_neighbour_batches_keep_locality_and_count_only_seeds(cora_store):
    data, path = cora_store
    store = GraphStore.open(path)
    builder = BatchBuilder(path, fanout=5)
    seeds = store.train_idx[:40]
    batch = builder[seeds, 123]
    again = builder[seeds, 123]
    assert torch.equal(batch.n_id, again.n_id)  # sampling is a function of the batch seed
    is_seed = torch.isin(batch.n_id, seeds)
    assert int(is_seed.sum()) == 40 and batch.n_id.numel() > 40
    assert torch.equal(batch.train_mask, is_seed)  # only seeds count (all 40 are training nodes)
    assert not (batch.val_mask | batch.test_mask).any()
    # every other node is an in-neighbour of some seed
    neighbours = set(data.edge_index[0][torch.isin(data.edge_index[1], seeds)].tolist())
    assert set(batch.n_id[~is_seed].tolist()) <= neighbours
    expected, _ = subgraph(batch.n_id, data.edge_index, relabel_nodes=True, num_nodes=2708)
    assert edge_set(batch.edge_index) == edge_set(expected)
    # seeds keep a large share of their in-edges; a random batch of the same size keeps ~size/N
    seed_in = torch.isin(batch.edge_index[1], is_seed.nonzero().flatten()).sum().item()
    degree = (store.rowptr[seeds + 1] - store.rowptr[seeds]).sum().item()
    assert seed_in / degree > 0.4 and seed_in / degree > 4 * batch.n_id.numel() / 2708


def test_neighbour_mode_trains_on_training_seeds_and_evaluates_every_node_once(cora_store):
    _, path = cora_store
    module = RandomPartitionDataModule(str(path), batch_size=50, eval_batch_size=700, num_workers=0, fanout=4)
    module.setup("fit")
    train_batches = list(module.train_dataloader())
    assert len(train_batches) == 3  # 140 training seeds in batches of at most 50
    assert sum(int(b.train_mask.sum()) for b in train_batches) == 140
    assert sum(int(b.val_mask.sum()) for b in train_batches) == 0
    val_batches = list(module.val_dataloader())
    assert sum(int(b.val_mask.sum()) for b in val_batches) == 500
    assert sum(int(b.test_mask.sum()) for b in val_batches) == 1000
    with pytest.raises(ValueError, match="fanout must be >= 0"):
        RandomPartitionDataModule(str(path), fanout=-1)


def test_power_law_option_gives_a_heavy_degree_tail(tmp_path):
    uniform = GraphStore.open(write_synthetic_store(tmp_path / "u", 50_000, avg_degree=10, seed=1))
    heavy = GraphStore.open(write_synthetic_store(tmp_path / "p", 50_000, avg_degree=10, degree_exponent=2.5, seed=1))
    for store in (uniform, heavy):
        assert abs(store.num_edges / 50_000 - 10) < 0.3
    max_uniform = int((uniform.rowptr[1:] - uniform.rowptr[:-1]).max())
    degree = (heavy.rowptr[1:] - heavy.rowptr[:-1]).double()
    assert max_uniform < 40 and degree.max() > 500  # Poisson(10) tops out near 30; a power law does not
    # tail exponent from the survival function: P(D >= d) ~ d^-(2.5 - 1) between degrees 30 and 300
    slope = (torch.log((degree >= 300).double().mean()) - torch.log((degree >= 30).double().mean())) / torch.log(
        torch.tensor(10.0))
    assert -1.9 < slope < -1.1
    with pytest.raises(ValueError, match="degree_exponent must be above 2"):
        write_synthetic_store(tmp_path / "bad", 100, degree_exponent=1.5)


@pytest.mark.skipif(not __import__("torch_geometric").typing.WITH_PYG_LIB,
                    reason="pyg-lib is not installed: only the pure-torch subgraph path can run here")
def test_pyg_lib_and_pure_torch_paths_give_identical_batches(cora_store, monkeypatch):
    import datamodules.csr as csr

    _, path = cora_store
    store = GraphStore.open(path)
    rowptr, col = store.rowptr, store.col.long()  # pyg-lib needs one dtype for rowptr and col
    for seed in range(3):
        nodes = torch.randperm(2708, generator=torch.Generator().manual_seed(seed))[:700].sort().values
        monkeypatch.setattr(csr, "USE_PYG_LIB", True)
        fast, fast_ids = induced_subgraph(rowptr, col, nodes)
        monkeypatch.setattr(csr, "USE_PYG_LIB", False)
        slow, slow_ids = induced_subgraph(rowptr, col, nodes)
        assert edge_set(fast) == edge_set(slow)
        assert sorted(fast_ids.tolist()) == sorted(slow_ids.tolist())  # the same edges of col


@pytest.mark.slow
def test_the_demo_store_command_writes_what_write_synthetic_store_writes_and_a_missing_store_names_it(tmp_path):
    import subprocess
    import sys
    from datamodules.synthetic import write_synthetic_store
    subprocess.run([sys.executable, "-m", "datamodules.make_store", "--out", str(tmp_path / "cli"), "--nodes", "3000"],
                   cwd=Path(__file__).resolve().parents[1], check=True, capture_output=True, timeout=300)
    write_synthetic_store(tmp_path / "api", 3000, num_classes=10, num_features=64, avg_degree=10.0)
    for name in ("rowptr", "col", "x", "y", "train_idx"):
        assert (tmp_path / "cli" / f"{name}.npy").read_bytes() == (tmp_path / "api" / f"{name}.npy").read_bytes()
    with pytest.raises(StoreError, match=f"python -m datamodules.make_store --out {tmp_path / 'none'} --nodes"):
        GraphStore.open(tmp_path / "none")
