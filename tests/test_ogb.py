"""OGB conversion: the offline OGB-format Cora, and small hand-made datasets in the
ogbn-papers100M (binary npz) and ogbn-proteins (edge features, many tasks) layouts."""
import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from torch_geometric.datasets import Planetoid

from conftest import data_folder
from datamodules import DatasetNotFoundError, GraphStore
from datamodules.ogb import ogb_meta, write_store_from_ogb


def edge_set(store):
    degree = store.rowptr[1:] - store.rowptr[:-1]
    target = torch.repeat_interleave(torch.arange(store.num_nodes), degree)
    return sorted(zip(store.col.tolist(), target.tolist()))


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as handle:
        for row in np.atleast_2d(np.asarray(rows).T).T if np.ndim(rows) == 1 else rows:
            handle.write(",".join(str(v) for v in np.atleast_1d(row)) + "\n")


def write_splits(root, folder, splits):
    for name, ids in splits.items():
        write_csv(root / "split" / folder / f"{name}.csv.gz", np.asarray(ids))


def test_ogb_format_cora_matches_planetoid(tmp_path, planetoid_root):
    root = shutil.copytree(data_folder("ogb_format") / "ogbn_cora", tmp_path / "ogbn_cora")
    meta = json.loads((root / "meta_dict.json").read_text())
    store = GraphStore.open(write_store_from_ogb("ogbn-cora", tmp_path / "store", root=root, meta_dict=meta,
                                                 chunk=100_000))  # 69 feature rows a chunk
    cora = Planetoid(str(planetoid_root / "planetoid"), "Cora")[0]
    assert (store.num_nodes, store.num_edges, store.num_features, store.num_classes) == (2708, 10556, 1433, 7)
    assert torch.equal(store.x.float(), cora.x) and torch.equal(store.y.long(), cora.y)
    assert edge_set(store) == sorted(map(tuple, cora.edge_index.t().tolist()))
    for split, mask in (("train", cora.train_mask), ("val", cora.val_mask), ("test", cora.test_mask)):
        assert torch.equal(getattr(store, f"{split}_idx"), mask.nonzero().flatten())


@pytest.mark.parametrize("undirected", [None, True])
def test_binary_papers100m_layout_streams_edges_features_and_missing_labels(tmp_path, undirected):
    generator = np.random.default_rng(0)
    n, e, f = 50, 173, 5
    edge_index = generator.integers(0, n, size=(2, e))
    features = generator.standard_normal((n, f)).astype(np.float32)
    labels = generator.integers(0, 4, size=(n, 1)).astype(np.float64)
    labels[::3] = np.nan  # most papers carry no label
    root = tmp_path / "papers100M-bin"
    (root / "raw").mkdir(parents=True)
    np.savez_compressed(root / "raw" / "data.npz", edge_index=edge_index, node_feat=features,
                        num_nodes_list=np.array([n]), num_edges_list=np.array([e]))
    np.savez_compressed(root / "raw" / "node-label.npz", node_label=labels)
    write_splits(root, "time", {"train": [1, 2, 4], "valid": [5], "test": [7, 8]})
    meta = ogb_meta("ogbn-papers100M")
    assert meta["binary"] == "True" and meta["add_inverse_edge"] == "False"
    store = GraphStore.open(write_store_from_ogb("ogbn-papers100M", tmp_path / "store", root=root,
                                                 undirected=undirected, feature_dtype=np.float32, chunk=16))
    expected = list(zip(edge_index[0].tolist(), edge_index[1].tolist()))
    if undirected:
        expected += [(t, s) for s, t in expected]
    assert edge_set(store) == sorted(expected)
    assert np.array_equal(store.x.numpy(), features)
    assert store.y.tolist() == [-1 if np.isnan(v) else int(v) for v in labels[:, 0]]
    assert store.num_classes == 172 and store.train_idx.tolist() == [1, 2, 4]


def test_proteins_layout_mean_incoming_edge_features_and_multilabel(tmp_path):
    edges = np.array([[0, 1], [1, 2], [3, 1]])
    edge_feats = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    root = tmp_path / "proteins"
    write_csv(root / "raw" / "edge.csv.gz", edges)
    write_csv(root / "raw" / "edge-feat.csv.gz", edge_feats)
    write_csv(root / "raw" / "num-node-list.csv.gz", np.array([4]))
    write_csv(root / "raw" / "node-label.csv.gz", np.array([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]]))
    write_splits(root, "species", {"train": [0, 1], "valid": [2], "test": [3]})
    store = GraphStore.open(write_store_from_ogb("ogbn-proteins", tmp_path / "store", root=root,
                                                 meta_dict=ogb_meta("ogbn-proteins") | {"num tasks": 3},
                                                 feature_dtype=np.float32, chunk=2))
    # undirected (inverse edges added): node 1 touches all three edges, node 0 the first, 2 the second, 3 the third
    expected = np.array([[1.0, 0.0], [4.0 / 3, 2.0], [0.0, 2.0], [3.0, 4.0]])
    assert np.allclose(store.x.numpy(), expected)
    assert store.multilabel and store.num_classes == 3 and store.y.dtype == torch.uint8
    assert store.y.tolist() == [[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 1, 0]]
    assert store.num_edges == 6


def test_missing_ogb_data_without_network(tmp_path, monkeypatch):
    import ogb.utils.url

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(ogb.utils.url, "download_url", offline)
    with pytest.raises(DatasetNotFoundError, match="ogbn-arxiv is not under .*ogbn_arxiv .* could not be downloaded"):
        write_store_from_ogb("ogbn-arxiv", tmp_path / "store", root=tmp_path / "ogbn_arxiv")
    with pytest.raises(ValueError, match="unknown OGB node dataset 'ogbn-arxive'"):
        write_store_from_ogb("ogbn-arxive", tmp_path / "store")


def write_tiny_csv_dataset(root):
    """A 5-node dataset in OGB's CSV layout (ogbn-arxiv's meta: directed edges, 40 classes, the 'time' split)."""
    write_csv(root / "raw" / "edge.csv.gz", np.array([[0, 1], [1, 2], [2, 3], [3, 4]]))
    write_csv(root / "raw" / "num-node-list.csv.gz", np.array([5]))
    write_csv(root / "raw" / "node-feat.csv.gz", np.arange(10, dtype=float).reshape(5, 2))
    write_csv(root / "raw" / "node-label.csv.gz", np.array([[1], [2], [3], [0], [1]]))
    write_splits(root, "time", {"train": [0, 1], "valid": [2], "test": [3, 4]})


@pytest.mark.parametrize("damage, message", [
    ("truncate", "edge.csv.gz is cut short or damaged (EOFError"),
    ("label", "node-label.csv.gz, line 3, column 1: 'abc' is not a number; OGB's raw files hold numbers only"),
    ("fields", "edge.csv.gz: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3"),
    ("split", "valid.csv.gz, line 1, column 1: 'x' is not a number")])
def test_a_damaged_ogb_raw_file_is_named_with_its_line_and_what_to_do(tmp_path, damage, message):
    root = tmp_path / "tiny"
    write_tiny_csv_dataset(root)
    write_store_from_ogb("ogbn-arxiv", tmp_path / "good", root=root)  # the undamaged files convert
    if damage == "truncate":
        data = (root / "raw" / "edge.csv.gz").read_bytes()
        (root / "raw" / "edge.csv.gz").write_bytes(data[:len(data) - 12])
    elif damage == "label":
        with gzip.open(root / "raw" / "node-label.csv.gz", "wt") as handle:
            handle.write("1\n2\nabc\n0\n1\n")
    elif damage == "fields":
        with gzip.open(root / "raw" / "edge.csv.gz", "wt") as handle:
            handle.write("0,1\n1,2\n2,3,9\n3,4\n")
    else:
        with gzip.open(root / "split" / "time" / "valid.csv.gz", "wt") as handle:
            handle.write("x\n")
    with pytest.raises(ValueError) as raised:
        write_store_from_ogb("ogbn-arxiv", tmp_path / "store", root=root)
    assert message in str(raised.value) and f"delete {root}" in str(raised.value)
    assert not (tmp_path / "store").exists()  # nothing written half
