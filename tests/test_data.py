"""DataModules against hand-made graphs, the reference split procedure and the published dataset sizes."""
import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.datasets import Planetoid
from torch_geometric.utils import is_undirected

from datamodules import (DATA_ENV, DatasetNotFoundError, NodeDataModule, PlanetoidDataModule, SyntheticCSBMDataModule,
                         validate_node_data)


def reference_split(y, per_class=20, num_val=500, num_test=1000, seed=123):
    """The authors' class_rand_splits, drawn from the global RNG right after fix_seed(123)."""
    torch.manual_seed(seed)
    idx = torch.arange(y.size(0))
    train, rest = [], []
    for label in y.unique():
        members = idx[y == label]
        shuffled = members[torch.randperm(members.size(0))]
        train += shuffled[:per_class].tolist()
        rest += shuffled[per_class:].tolist()
    rest = torch.as_tensor(rest)[torch.randperm(len(rest))]
    return torch.as_tensor(train), rest[:num_val], rest[num_val:num_val + num_test]


def indices(mask):
    return mask.nonzero().flatten()


@pytest.mark.parametrize("name, nodes, classes, features", [("Cora", 2708, 7, 1433), ("CiteSeer", 3327, 6, 3703)])
def test_planetoid_reference_protocol(planetoid_root, name, nodes, classes, features):
    module = PlanetoidDataModule(name, root=str(planetoid_root))
    module.prepare_data()
    module.setup("fit")
    data = module.data
    assert (data.num_nodes, module.num_classes, module.num_features) == (nodes, classes, features)
    assert data.x.size(1) == features
    train, val, test = reference_split(data.y)
    assert torch.equal(indices(data.train_mask), train.sort().values)
    assert torch.equal(indices(data.val_mask), val.sort().values)
    assert torch.equal(indices(data.test_mask), test.sort().values)
    assert torch.bincount(data.y[data.train_mask]).tolist() == [20] * classes
    assert not (data.train_mask & data.val_mask).any() and not (data.val_mask & data.test_mask).any()
    row_sums = data.x.sum(dim=1)
    assert torch.allclose(row_sums[row_sums > 0], torch.ones(1))  # row-normalised (CiteSeer has empty rows)
    assert is_undirected(data.edge_index) and not (data.edge_index[0] == data.edge_index[1]).any()


def test_cora_public_split_and_edge_count(planetoid_root):
    data = PlanetoidDataModule("Cora", split="public", root=str(planetoid_root)).data
    assert [int(data[f"{s}_mask"].sum()) for s in ("train", "val", "test")] == [140, 500, 1000]
    assert data.edge_index.size(1) == 10556


def test_data_root_from_environment(planetoid_root, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(planetoid_root))
    assert PlanetoidDataModule("Cora").data.num_nodes == 2708


def test_missing_data_without_network_is_a_clear_error(tmp_path, monkeypatch):
    def offline(self):
        raise OSError("Cannot connect to host github.com:443")  # what aiohttp raises here, an OSError
    monkeypatch.setattr(Planetoid, "download", offline)
    module = PlanetoidDataModule("Cora", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=f"Cora is not under {tmp_path}.*could not be downloaded"):
        module.prepare_data()


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown Planetoid dataset 'Corra'.*Cora, CiteSeer, PubMed"):
        PlanetoidDataModule("Corra")


def test_csbm_is_deterministic_and_homophilous():
    first = SyntheticCSBMDataModule(num_nodes=4000, num_classes=4, avg_degree=10, homophily=0.8, seed=5).data
    again = SyntheticCSBMDataModule(num_nodes=4000, num_classes=4, avg_degree=10, homophily=0.8, seed=5).data
    other = SyntheticCSBMDataModule(num_nodes=4000, num_classes=4, avg_degree=10, homophily=0.8, seed=6).data
    assert torch.equal(first.edge_index, again.edge_index) and torch.equal(first.x, again.x)
    assert not torch.equal(first.edge_index, other.edge_index)
    source, target = first.edge_index
    same = (first.y[source] == first.y[target]).float().mean().item()
    assert abs(same - (0.8 + 0.2 / 4)) < 0.02  # intra-class draws plus uniform ones that land in the class
    degree = first.edge_index.size(1) / 4000
    assert 9.0 < degree <= 10.0  # duplicates and self loops removed
    assert is_undirected(first.edge_index)
    # class-correlated features: class means differ by far more than their standard error
    means = torch.stack([first.x[first.y == c].mean(0) for c in range(4)])
    assert torch.cdist(means, means).fill_diagonal_(float("inf")).min() > 1.0


def tiny_graph(**changes):
    data = Data(x=torch.rand(6, 3), y=torch.tensor([0, 1, 2, 0, 1, -1]),
                edge_index=torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]]), edge_weight=torch.ones(4),
                train_mask=torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool),
                val_mask=torch.tensor([0, 0, 0, 1, 0, 0], dtype=torch.bool),
                test_mask=torch.tensor([0, 0, 0, 0, 1, 0], dtype=torch.bool))
    for key, value in changes.items():
        data[key] = value
    return data


def test_valid_tiny_graph_passes_and_infers_classes():
    module = NodeDataModule(tiny_graph())
    module.setup("fit")
    assert (module.num_features, module.num_classes, module.max_batch_nodes) == (3, 3, 6)


@pytest.mark.parametrize("changes, message", [
    (dict(y=torch.tensor([0, 1, 2, 0, 1])), "x has 6 rows, y has 5"),
    (dict(x=torch.rand(5, 3)), "x has 5 rows, y has 6"),
    (dict(x=torch.tensor([[0.0, 1, 2]] * 3 + [[float("nan"), 0, 0]] + [[1.0, 1, 1]] * 2)),
     "feature 0 of node 3 is nan"),
    (dict(x=torch.tensor([[float("inf"), 1, 2]] + [[1.0, 1, 1]] * 5)), "feature 0 of node 0 is inf"),
    (dict(edge_index=torch.tensor([[0, 1], [1, 6]])), r"node ids in \[0, 6\] but there are 6 nodes"),
    (dict(edge_index=torch.tensor([[0, -1], [1, 2]])), r"node ids in \[-1, 2\]"),
    (dict(edge_weight=torch.ones(3)), "one entry per edge"),
    (dict(y=torch.tensor([0, 1, 2, 0, 7, -1])), r"not a class id in \[0, 3\).*node 4 has label 7"),
    (dict(y=torch.tensor([0, -2, 2, 0, 1, -1])), "node 1 has label -2"),
    (dict(val_mask=torch.zeros(6, dtype=torch.bool)), "the val split selects no node"),
    (dict(y=torch.rand(6)), "integer class ids"),
])
def test_bad_input_names_the_problem(changes, message):
    with pytest.raises(ValueError, match=message):
        validate_node_data(tiny_graph(**changes), num_classes=3)


def test_labels_out_of_range_against_the_declared_class_count():
    module = NodeDataModule(tiny_graph(y=torch.tensor([0, 1, 2, 0, 3, -1])), num_classes=3)
    with pytest.raises(ValueError, match="node 4 has label 3"):
        module.setup("fit")
