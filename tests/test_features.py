"""Samples without a graph: file formats, the label-rate split, the blockwise kNN graph, bad input."""
import numpy as np
import pytest
import torch

from datamodules import FeatureDataModule, knn_graph


def samples(n=60, f=5, classes=3, seed=0):
    generator = np.random.default_rng(seed)
    return generator.normal(size=(n, f)), np.arange(n) % classes


@pytest.mark.slow
def test_knn_graph_in_blocks_equals_brute_force_neighbours():
    from sklearn.neighbors import NearestNeighbors
    x, _ = samples(200, 4)
    edges = knn_graph(torch.from_numpy(x), k=5, block_rows=17)
    neighbours = NearestNeighbors(n_neighbors=6).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    expected = {(int(j), i) for i in range(200) for j in neighbours[i]}
    expected |= {(i, j) for j, i in expected}  # undirected
    assert set(map(tuple, edges.t().tolist())) == expected
    assert not (edges[0] == edges[1]).any()


@pytest.mark.parametrize("fmt", ["npy", "npz", "pt", "csv", "arrays"])
def test_every_format_loads_the_same_data_with_the_label_rate_split(tmp_path, fmt):
    x, y = samples()
    if fmt == "arrays":
        features, labels = x, y
    elif fmt == "npy":
        np.save(tmp_path / "x.npy", x), np.save(tmp_path / "y.npy", y)
        features, labels = tmp_path / "x.npy", tmp_path / "y.npy"
    elif fmt == "npz":
        np.savez(tmp_path / "d.npz", x=x, y=y)
        features, labels = tmp_path / "d.npz", None
    elif fmt == "pt":
        torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
        features, labels = tmp_path / "d.pt", None
    else:
        np.savetxt(tmp_path / "x.csv", x, delimiter=",", header="a,b,c,d,e", comments="")
        np.savetxt(tmp_path / "y.csv", y, delimiter=",", fmt="%d")
        features, labels = tmp_path / "x.csv", tmp_path / "y.csv"
    data = FeatureDataModule(features, labels, labels_per_class=4, num_val=20, standardize=False).data
    torch.testing.assert_close(data.x, torch.from_numpy(x).float())
    assert torch.equal(data.y, torch.from_numpy(y).long())
    assert [int(data.y[data.train_mask].eq(c).sum()) for c in range(3)] == [4, 4, 4]
    assert (int(data.val_mask.sum()), int(data.test_mask.sum())) == (20, 60 - 12 - 20)
    assert not (data.train_mask & data.val_mask).any() and not (data.val_mask & data.test_mask).any()
    assert data.get("edge_index") is None


def test_digits_ships_with_scikit_learn_and_gets_a_knn_graph():
    data = FeatureDataModule(dataset="digits", labels_per_class=10, num_val=500, knn=5).data
    assert data.x.shape == (1797, 64) and int(data.y.max()) == 9
    assert int(data.train_mask.sum()) == 100 and int(data.test_mask.sum()) == 1797 - 600
    assert data.edge_index.size(1) >= 1797 * 5


def test_bad_feature_files_are_named(tmp_path):
    (tmp_path / "ragged.csv").write_text("1,2,3\n4,5,6\n7,8\n")
    np.save(tmp_path / "y3.npy", np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="data row 3 has 2 values, the first has 3"):
        FeatureDataModule(tmp_path / "ragged.csv", tmp_path / "y3.npy").data
    x, _ = samples(6, 2)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    for blank in ("0\n1\n\n0\n1\n0\n", "0\n1\n \n0\n1\n0\n\n\n"):  # a blank line, an empty cell: row 2 named
        (tmp_path / "y.csv").write_text(blank)
        with pytest.raises(ValueError, match=r"labels are missing for 1 samples \(first: row 2\)"):
            FeatureDataModule(tmp_path / "x.csv", tmp_path / "y.csv", labels_per_class=1, num_val=1).data
    with pytest.raises(ValueError, match="k must be in"):
        knn_graph(torch.zeros(6, 2), k=6)
    with pytest.raises(ValueError, match="k must be in"):
        FeatureDataModule(x, np.arange(6) % 2, labels_per_class=1, num_val=1, knn=6).data


@pytest.mark.slow
def test_the_readme_plug_in_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- plug-in example -->\n```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # the example writes runs/stores/my-graph
    exec(compile(block, "README.md (plug-in example)", "exec"), {})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    full, partition = (float(part.split()[-1]) for part in line.split(":", 1)[1].split(","))
    assert full > 0.6 and partition > 0.6, line  # 4 classes: chance 0.25
