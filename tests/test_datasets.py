"""Datasets by name: OGB (CSV and binary layouts, the lock, the Evaluator), PyG's classes on the real files,
LINKX .mat files, PyG-Temporal's layouts and standardisation, and metrics equal to their evaluators."""
import gzip
import json
import shutil
import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch_geometric.utils import to_undirected
from torchmetrics import AUROC

from conftest import ROOT, data_folder, scaled_timeout
from datamodules import GraphStore, LINKXDataModule, OGBDataModule, PyGDataModule
from datamodules.linkx import read_linkx_mat
from datamodules.pyg import random_split
from datamodules.temporal import snapshots_from_json
from difformer_lightning import DIFFormer, NodeClassifier
from difformer_lightning.metrics import ROCAUC, OGBEvaluatorMetric


def shared(folder, *parts):
    return data_folder(folder).joinpath(*parts)


@pytest.fixture
def copy_data(tmp_path):
    """``copy_data(folder)``: a writable data root holding a copy of that dataset folder of shared/data (PyG
    writes processed/ beside raw/); only the dataset a test uses is needed, so the others may be missing."""
    def copy(folder: str):
        if not (tmp_path / "data" / folder).exists():
            shutil.copytree(shared(folder), tmp_path / "data" / folder)
        return tmp_path / "data"
    return copy


# --- metrics against their reference evaluators --------------------------------------------------------

def test_multitask_rocauc_equals_ogbs_evaluator_where_tasks_lack_a_class():
    from ogb.nodeproppred import Evaluator
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 112, generator=generator)
    targets = (torch.rand(300, 112, generator=generator) < 0.3).long()
    targets[:, :3] = 0  # three tasks without a positive node
    targets[:, 3] = 1  # and one without a negative
    ours = ROCAUC()
    ours.update(scores[:170], targets[:170])
    ours.update(scores[170:], targets[170:])  # over batches, as in the loop
    expected = Evaluator("ogbn-proteins").eval({"y_true": targets.numpy(), "y_pred": scores.numpy()})["rocauc"]
    assert float(ours.compute()) == pytest.approx(expected, abs=1e-12)
    macro = AUROC(task="multilabel", num_labels=112, average="macro")(scores, targets)
    assert abs(float(macro) - expected) > 1e-3  # what torchmetrics' macro mean reported before


def test_ogb_evaluator_metric_and_binary_rocauc_equal_their_references():
    from ogb.nodeproppred import Evaluator
    from sklearn.metrics import roc_auc_score
    generator = torch.Generator().manual_seed(1)
    logits, y = torch.randn(200, 5, generator=generator), torch.randint(5, (200,), generator=generator)
    metric = OGBEvaluatorMetric("ogbn-arxiv")
    metric.update(logits, y)
    expected = Evaluator("ogbn-arxiv").eval({"y_true": y.view(-1, 1).numpy(),
                                              "y_pred": logits.argmax(1, keepdim=True).numpy()})["acc"]
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)
    binary = ROCAUC(binary=True)
    two, labels = torch.randn(200, 2, generator=generator), torch.randint(2, (200,), generator=generator)
    binary.update(two, labels)
    assert float(binary.compute()) == pytest.approx(roc_auc_score(labels, torch.softmax(two, 1)[:, 1]), abs=1e-12)
    empty = ROCAUC()
    assert float(empty.compute()) != float(empty.compute())  # a split with no node is NaN, not a number


# --- OGB ----------------------------------------------------------------------------------------------

def cora_meta(root):
    meta = json.loads((root / "ogb_format" / "ogbn_cora" / "meta_dict.json").read_text())
    meta["dir_path"] = str(root / "ogb_format" / "ogbn_cora")
    return meta


@pytest.mark.slow
def test_ogb_data_module_trains_end_to_end_and_reports_ogbs_evaluator(copy_data, tmp_path):
    data_root = copy_data("ogb_format")
    # Cora in OGB's CSV layout, under OGB's name for a one-task accuracy dataset: the Evaluator path offline.
    module = OGBDataModule("ogbn-arxiv", root=str(tmp_path), meta_dict=cora_meta(data_root), batch_size=900,
                           num_workers=0)
    assert module.metric == "ogb:ogbn-arxiv"
    module.prepare_data()
    store = GraphStore.open(tmp_path / "stores" / "ogbn-arxiv")
    assert (store.num_nodes, store.num_edges, store.train_idx.numel()) == (2708, 10556, 140)
    torch.manual_seed(0)
    model = NodeClassifier(DIFFormer(module.num_features, 16, module.num_outputs, num_layers=2), lr=0.01)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, datamodule=module)
    assert isinstance(model.metrics["val_metric"], OGBEvaluatorMetric)
    # the logged accuracy is OGB's Evaluator on the whole graph's forward
    from ogb.nodeproppred import Evaluator
    source, target, _ = store.in_edges(0, store.num_nodes)
    model.eval()
    with torch.no_grad():
        predicted = model.encoder(store.x.float(), torch.stack([source, target])).argmax(1, keepdim=True)
    expected = Evaluator("ogbn-arxiv").eval({"y_true": store.y.long()[store.val_idx].view(-1, 1).numpy(),
                                              "y_pred": predicted[store.val_idx].numpy()})["acc"]
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.slow
def test_two_processes_preparing_the_same_dataset_convert_it_once(copy_data, tmp_path):
    data_root = copy_data("ogb_format")
    script = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from datamodules import ogb
from datamodules.ogb import OGBDataModule
real = ogb.write_store_from_ogb
def slow(*args, **kwargs):
    print("converting", flush=True)
    time.sleep(2)  # both processes reach the lock while the first converts
    return real(*args, **kwargs)
ogb.write_store_from_ogb = slow
meta = json.loads({json.dumps(json.dumps(cora_meta(data_root)))})
OGBDataModule("ogbn-cora", root={str(tmp_path)!r}, meta_dict=meta).prepare_data()
print("ready", flush=True)
"""
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outputs]
    assert sum(out.count("converting") for out, _ in outputs) == 1
    assert all("ready" in out for out, _ in outputs)
    GraphStore.open(tmp_path / "stores" / "ogbn-cora")  # complete and valid


@pytest.mark.slow
def test_the_large_presets_resolve_offline():
    for preset in ("ogbn_proteins_s", "pokec_s", "ogbn_arxiv_s", "ogbn_products_s", "ogbn_papers100m_s"):
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config",
                               str(ROOT / "configs" / f"{preset}.yaml"), "--print_config"], cwd=ROOT,
                              capture_output=True, text=True, timeout=scaled_timeout(10))
        assert done.returncode == 0, (preset, done.stderr[-2000:])
    proteins = (ROOT / "configs" / "ogbn_proteins_s.yaml").read_text()
    for setting in ("batch_size: 10000", "num_layers: 3", "hidden_channels: 64", "lr: 0.01", "weight_decay: 0.0",
                    "check_val_every_n_epoch: 9", "name: ogbn-proteins"):
        assert setting in proteins, setting
    assert "batch_size: 100000" in (ROOT / "configs" / "pokec_s.yaml").read_text()


# --- PyG's classes on the real files ---------------------------------------------------------------------

@pytest.mark.parametrize("dataset, name, nodes, splits", [("HeterophilousGraphDataset", "Minesweeper", 10000, 10),
                                                          ("Actor", None, 7600, 10), ("WebKB", "cornell", 183, 10)])
def test_pyg_datasets_keep_their_own_preprocessing_and_split(copy_data, dataset, name, nodes, splits):
    import torch_geometric.datasets as datasets
    folder = {"HeterophilousGraphDataset": "heterophilous", "Actor": "actor", "WebKB": "webkb"}[dataset]
    data_root = copy_data(folder)
    module = PyGDataModule(dataset, name, split=3, root=str(data_root))
    module.prepare_data()
    source = getattr(datasets, dataset)(str(data_root / folder), **({"name": name} if name else {}))[0]
    data = module.data
    assert data.num_nodes == nodes and module.num_splits == splits
    assert torch.equal(data.x, source.x.float()) and torch.equal(data.y, source.y)
    assert torch.equal(data.edge_index, to_undirected(source.edge_index, num_nodes=nodes))
    for split in ("train", "val", "test"):
        assert torch.equal(data[f"{split}_mask"], source[f"{split}_mask"][:, 3])
    assert module.metric == ("rocauc" if name == "Minesweeper" else "accuracy")
    as_given = PyGDataModule(dataset, name, root=str(data_root), undirected=False).data
    assert torch.equal(as_given.edge_index, source.edge_index)
    with pytest.raises(ValueError, match=f"has {splits} splits: split must be in"):
        PyGDataModule(dataset, name, split=splits, root=str(data_root)).data  # noqa: B018


def test_linkx_facebook_graph_gets_the_reference_random_split_without_unknown_labels(copy_data):
    data_root = copy_data("linkx")
    module = PyGDataModule("LINKXDataset", "reed98", split=2, root=str(data_root))
    data = module.data
    labelled = data.y >= 0
    masks = [data[f"{split}_mask"] for split in ("train", "val", "test")]
    assert not any(bool((mask & ~labelled).any()) for mask in masks)  # -1 in no split
    assert int(sum(mask.sum() for mask in masks)) == int(labelled.sum())  # every labelled node once
    n = int(labelled.sum())
    assert [int(mask.sum()) for mask in masks] == [int(n * 0.5), int(n * 0.25), n - int(n * 0.5) - int(n * 0.25)]
    assert torch.equal(masks[0], random_split(data.y, 2)["train_mask"])  # the same split every run
    assert not torch.equal(masks[0], random_split(data.y, 3)["train_mask"])
    # our .mat reader (for LINKX files PyG has no class for) reads it as PyG's LINKXDataset does
    mat = read_linkx_mat(data_root / "linkx" / "reed98" / "raw" / "data.mat")
    assert torch.equal(mat.x, data.x) and torch.equal(mat.y, data.y)
    assert torch.equal(to_undirected(mat.edge_index, num_nodes=data.num_nodes), data.edge_index)


def test_linkx_mat_layout_with_fixed_splits_becomes_a_store(tmp_path):
    from scipy.io import savemat
    generator = np.random.default_rng(0)
    n = 60
    label = generator.integers(0, 2, size=n)
    label[:5] = -1
    folder = tmp_path / "linkx"
    folder.mkdir()
    savemat(folder / "tiny.mat", {"edge_index": generator.integers(0, n, size=(2, 200)),
                                  "node_feat": generator.standard_normal((n, 4)), "label": label[None, :]})
    splits = [{"train": np.arange(0, 30), "valid": np.arange(30, 45), "test": np.arange(45, 60)}] * 2
    np.save(folder / "tiny-splits.npy", np.array(splits, dtype=object), allow_pickle=True)
    module = LINKXDataModule("tiny", split=1, root=str(tmp_path), batch_size=20, num_workers=0)
    store = module.store
    assert store.num_nodes == n and store.num_edges == 200
    assert store.train_idx.tolist() == list(range(5, 30))  # the fixed split, without the -1 nodes
    assert store.val_idx.tolist() == list(range(30, 45))


# --- PyG-Temporal's layouts ------------------------------------------------------------------------------

def test_wikimath_layout_loads_and_its_zscores_are_pyg_temporals():
    generator = np.random.default_rng(0)
    series = generator.poisson(50, size=(12, 4)).astype(float)
    raw = {"edges": [[0, 1], [1, 2], [3, 0]], "weights": [2.0, 1.0, 3.0], "time_periods": 12,
           **{str(t): {"y": series[t].tolist()} for t in range(12)}}
    snapshots = snapshots_from_json(raw, lags=3)
    z = (series - series.mean(axis=0)) / series.std(axis=0)  # WikiMathsDatasetLoader: np.std, no epsilon
    assert len(snapshots) == 9
    np.testing.assert_allclose(snapshots[0].x.numpy(), z[0:3].T, rtol=1e-6)
    np.testing.assert_allclose(snapshots[8].y.numpy(), z[11], rtol=1e-6)
    assert snapshots[0].edge_weight.tolist() == [2.0, 1.0, 3.0]


def test_england_covid_zscores_are_pyg_temporals_on_the_real_file():
    raw = json.loads(shared("temporal", "england_covid.json").read_text())
    snapshots = snapshots_from_json(raw, lags=8)
    y = np.array(raw["y"])
    z = (y - y.mean(axis=0)) / (y.std(axis=0) + 1e-10)  # EnglandCovidDatasetLoader: np.std (ddof 0)
    np.testing.assert_allclose(snapshots[0].x.numpy(), z[0:8].T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(snapshots[-1].y.numpy(), z[-1], rtol=1e-5, atol=1e-6)


# --- derived data follows its raw files -----------------------------------------------------------------

def _rebuild_lines(caplog):
    return [record.getMessage() for record in caplog.records
            if record.getMessage().startswith(("rebuilding ", "processing "))]


def test_a_replaced_linkx_mat_is_converted_again_and_the_change_named(tmp_path, caplog):
    from scipy.io import savemat
    folder = tmp_path / "linkx"
    folder.mkdir()

    def write(n: int) -> None:
        generator = np.random.default_rng(n)
        savemat(folder / "tiny.mat", {"edge_index": generator.integers(0, n, size=(2, 3 * n)),
                                      "node_feat": generator.standard_normal((n, 4)),
                                      "label": generator.integers(0, 2, size=(1, n))})

    def store():
        return LINKXDataModule("tiny", root=str(tmp_path), batch_size=20, num_workers=0).store

    write(60)
    assert store().num_nodes == 60
    meta = tmp_path / "stores" / "linkx-tiny-split0" / "meta.json"
    built = meta.stat().st_mtime_ns
    caplog.set_level("INFO")
    assert store().num_nodes == 60 and meta.stat().st_mtime_ns == built  # unchanged: reused as it is
    assert not _rebuild_lines(caplog)
    write(90)  # another graph under the same name
    assert store().num_nodes == 90
    [line] = _rebuild_lines(caplog)
    assert line.startswith(f"rebuilding {meta.parent}: its raw files changed since it was converted: tiny.mat "
                           f"changed (size ")


def test_a_copied_data_folder_keeps_its_sources_identity_and_a_changed_byte_does_not(tmp_path, monkeypatch):
    from datamodules import prepare
    small, large = tmp_path / "a" / "raw" / "small.bin", tmp_path / "a" / "raw" / "large.bin"
    small.parent.mkdir(parents=True)
    small.write_bytes(bytes(range(256)) * 10)
    monkeypatch.setattr(prepare, "HASH_WHOLE_LIMIT", 4096)  # "large": hashed by size and sampled blocks
    monkeypatch.setattr(prepare, "_SAMPLE", 512)
    large.write_bytes(bytes(range(256)) * 40)
    recorded = prepare.source_identity(tmp_path / "a", [small, large])
    copy = shutil.copytree(tmp_path / "a", tmp_path / "b")  # new modification times, same bytes
    assert prepare.source_changes(recorded, prepare.source_identity(copy, [copy / "raw" / "small.bin",
                                                                           copy / "raw" / "large.bin"])) == []
    for file, offset in ((small, 1000), (large, 10)):  # same size, one byte differs
        content = bytearray(file.read_bytes())
        content[offset] ^= 1
        file.write_bytes(bytes(content))
    changes = prepare.source_changes(recorded, prepare.source_identity(tmp_path / "a", [small, large]))
    assert [change.split(" (")[0] for change in changes] == ["raw/large.bin changed", "raw/small.bin changed"]


def test_a_fixed_ogb_raw_file_is_converted_again(copy_data, tmp_path, caplog):
    data_root = copy_data("ogb_format")
    meta = cora_meta(data_root)

    def store():
        return OGBDataModule("ogbn-cora", root=str(tmp_path), meta_dict=meta, batch_size=900, num_workers=0).store

    labels = store().y.clone()
    label_file = data_root / "ogb_format" / "ogbn_cora" / "raw" / "node-label.csv.gz"
    rows = gzip.open(label_file, "rt").read().splitlines()
    rows[0] = str((int(rows[0]) + 1) % 7)  # a corrected label
    with gzip.open(label_file, "wt") as handle:
        handle.write("\n".join(rows) + "\n")
    caplog.set_level("INFO")
    relabelled = store().y
    assert int(relabelled[0]) == (int(labels[0]) + 1) % 7 and torch.equal(relabelled[1:], labels[1:])
    [line] = _rebuild_lines(caplog)
    assert "raw/node-label.csv.gz changed (size " in line


def test_a_changed_pyg_raw_file_is_processed_again(copy_data, caplog):
    from datamodules import PlanetoidDataModule
    data_root = copy_data("planetoid")
    before = PlanetoidDataModule("Cora", root=str(data_root)).data.x
    index_file = data_root / "planetoid" / "Cora" / "raw" / "ind.cora.test.index"
    lines = index_file.read_text().splitlines()
    first, second = int(lines[0]), int(lines[1])
    lines[0], lines[1] = lines[1], lines[0]  # the first two test nodes' rows trade places
    index_file.write_text("\n".join(lines) + "\n")
    caplog.set_level("INFO")
    after = PlanetoidDataModule("Cora", root=str(data_root)).data.x
    assert torch.equal(after[first], before[second]) and torch.equal(after[second], before[first])
    [line] = _rebuild_lines(caplog)
    assert line.startswith("processing Planetoid in ") and "ind.cora.test.index changed (size " in line
    caplog.clear()
    assert torch.equal(PlanetoidDataModule("Cora", root=str(data_root)).data.x, after)
    assert not _rebuild_lines(caplog)  # recorded: not processed a third time
