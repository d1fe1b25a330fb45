"""Bad input and faults: each kind refused with the problem named (file, key, node, row, argument), before
any training, and nothing half-written left behind that would later open as valid."""
import errno
import json
import types
import zipfile

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from conftest import ROOT
from datamodules import FeatureDataModule, GraphStore, NodeDataModule, RandomPartitionDataModule, StoreError
from datamodules.store import write_store_from_data
from datamodules.temporal import snapshots_from_json
from datamodules.validation import check_finite_features, feature_limit
from difformer_lightning import DIFFormer, NodeClassifier
from difformer_lightning.checkpoint import AtomicCheckpointIO, CheckpointError, check_checkpoint_file


def graph(n: int = 12, **changes) -> Data:
    generator = torch.Generator().manual_seed(0)
    split = torch.arange(n) % 3
    data = Data(x=torch.randn(n, 3, generator=generator), y=torch.arange(n) % 3,
                edge_index=torch.randint(n, (2, 30), generator=generator),
                train_mask=split == 0, val_mask=split == 1, test_mask=split == 2)
    for key, value in changes.items():
        data[key] = value
    return data


@pytest.fixture
def store(tmp_path):
    return write_store_from_data(graph(), tmp_path / "store", num_classes=3)


def rewrite(store, name, values, meta_changes=None):
    """Replaces one array of a store (and meta.json's record of it), as a tool outside this project would."""
    np.save(store / f"{name}.npy", values)
    meta = json.loads((store / "meta.json").read_text())
    meta["arrays"][name].update(dtype=str(values.dtype), shape=list(values.shape),
                                bytes=(store / f"{name}.npy").stat().st_size)
    meta.update(meta_changes or {})
    (store / "meta.json").write_text(json.dumps(meta))


# --- 1. a graph store is checked against its own format when it opens ------------------------------------

@pytest.mark.parametrize("name, dtype, message", [
    ("rowptr", np.float64, "rowptr.npy holds float64, but the store format stores rowptr as int64"),
    ("col", np.float32, "col.npy holds float32, but the store format stores col as int32 or int64"),
    ("split", np.int64, "split.npy holds int64, but the store format stores split as uint8"),
])
def test_arrays_of_the_wrong_dtype_are_refused_at_open(store, name, dtype, message):
    values = np.load(store / f"{name}.npy").astype(dtype)
    rewrite(store, name, values)
    with pytest.raises(StoreError, match=message):
        GraphStore.open(store)


def test_a_cut_short_or_incomplete_meta_json_names_the_file_and_key(store):
    text = (store / "meta.json").read_text()
    (store / "meta.json").write_text(text[: len(text) // 2])
    with pytest.raises(StoreError, match=r"meta.json is not valid JSON .*line \d+"):
        GraphStore.open(store)
    meta = json.loads(text)
    del meta["arrays"]
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="meta.json lacks the key arrays"):
        GraphStore.open(store)


@pytest.mark.parametrize("label, message", [(3, r"train nodes have a label that is not a class id in \[0, 3\)"),
                                            (-1, "node 0 has label -1")])
def test_labels_of_split_nodes_out_of_range_name_the_node_split_and_file(store, label, message):
    y = np.load(store / "y.npy")
    y[0] = label  # node 0 is a training node
    rewrite(store, "y", y)
    with pytest.raises(StoreError, match=f"y.npy: .*{message}"):
        GraphStore.open(store)


def test_split_codes_that_disagree_with_the_split_indices_are_refused(store):
    rewrite(store, "split", np.zeros(12, dtype=np.uint8))
    with pytest.raises(StoreError, match="split.npy marks 0 nodes as train but train_idx.npy lists 4"):
        GraphStore.open(store)


# --- 2. writers refuse what they cannot store faithfully; the path always holds a whole store -----------

def test_a_node_in_two_splits_and_an_edge_beyond_n_are_refused_by_name(tmp_path):
    overlapping = graph(test_mask=torch.arange(12) % 3 == 0)  # the training nodes are test nodes too
    with pytest.raises(ValueError, match="nodes are in both the train and the test split .*first: node 0"):
        write_store_from_data(overlapping, tmp_path / "a")
    beyond = graph(edge_index=torch.tensor([[0, 1], [1, 12]]))
    with pytest.raises(ValueError, match=r"node ids in \[0, 12\] but there are 12 nodes"):
        write_store_from_data(beyond, tmp_path / "b")
    assert not list(tmp_path.iterdir())  # nothing left that could open


def test_replacing_a_store_keeps_a_whole_store_at_its_path_and_cleans_killed_writers(store, monkeypatch):
    import datamodules.store as module
    leftover = store.with_name(f".{store.name}.tmp-999999999")  # a writer killed long ago
    leftover.mkdir()
    (leftover / "x.npy").write_bytes(b"half")
    exchange = module._exchange

    def killed_after_the_swap(first, second):  # dies after the atomic exchange, before the old is removed
        exchange(first, second)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "_exchange", killed_after_the_swap)
    with pytest.raises(KeyboardInterrupt):
        write_store_from_data(graph(x=torch.ones(12, 3)), store, num_classes=3, overwrite=True)
    monkeypatch.undo()
    assert torch.equal(GraphStore.open(store).x, torch.ones(12, 3))  # the new store, complete
    write_store_from_data(graph(), store, num_classes=3, overwrite=True)  # the next write cleans up
    assert sorted(p.name for p in store.parent.iterdir()) == ["store"]


def test_the_missing_store_message_points_at_functions_that_exist(tmp_path):
    with pytest.raises(StoreError) as error:
        GraphStore.open(tmp_path / "nowhere")
    import datamodules.ogb
    import datamodules.synthetic
    assert "write_store_from_data" in str(error.value) and hasattr(datamodules.store, "write_store_from_data")
    assert "write_synthetic_store" in str(error.value) and hasattr(datamodules.synthetic, "write_synthetic_store")
    assert "write_store(" not in str(error.value)


# --- 3. input files: the file, the row and the column -----------------------------------------------------

def test_a_csv_cell_that_is_not_a_number_names_the_file_row_and_column(tmp_path):
    features = tmp_path / "x.csv"
    features.write_text("a,b,c\n1,2,3\n4,abc,6\n")
    labels = tmp_path / "y.csv"
    labels.write_text("0\n1\n")
    with pytest.raises(ValueError, match=r"x.csv: data row 2, column 2 holds 'abc', not a number"):
        FeatureDataModule(features=str(features), labels=str(labels)).data  # noqa: B018


def test_a_truncated_temporal_json_names_the_file_and_position(tmp_path):
    from datamodules import TemporalDataModule
    folder = tmp_path / "temporal"
    folder.mkdir()
    (folder / "chickenpox.json").write_text('{"edges": [[0, 1], [1, 0]], "FX": [[1.0, 2.0], [3.0')
    with pytest.raises(ValueError, match=r"chickenpox.json: not valid JSON at line 1, column \d+"):
        TemporalDataModule("chickenpox", root=str(tmp_path)).setup("fit")


def test_a_temporal_edge_to_a_node_that_does_not_exist_is_refused():
    raw = {"edges": [[0, 1], [1, 5]], "FX": [[1.0, 2.0]] * 6}
    with pytest.raises(ValueError, match=r"edge 1 of time step 0 is \[1, 5\], but the series has 2 nodes"):
        snapshots_from_json(raw, lags=2)


# --- 4. bad numbers are the input's fault, said before training -----------------------------------------------

def test_nan_and_too_large_values_name_the_node_and_feature_wherever_they_enter(tmp_path):
    with pytest.raises(ValueError, match="feature 1 of node 4 is nan"):
        NodeDataModule(graph(x=torch.ones(12, 3).index_put_((torch.tensor([4]), torch.tensor([1])),
                                                              torch.tensor(float("nan")))), num_classes=3).setup("fit")
    huge = torch.ones(12, 3)
    huge[7, 2] = 1e30
    with pytest.raises(ValueError, match=r"feature 2 of node 7 is 1e\+30, beyond 1e\+15"):
        NodeDataModule(graph(x=huge), num_classes=3).setup("fit")
    with pytest.raises(ValueError, match=r"feature 2 of node 7 is 1e\+30"):  # nor written to a store
        write_store_from_data(graph(x=huge), tmp_path / "s", num_classes=3, feature_dtype=np.float32)
    huge[7, 2] = 1e5  # fine in float32, infinite as a float16 store feature
    with pytest.raises(StoreError, match="feature 2 of node 7 is inf"):
        write_store_from_data(graph(x=huge), tmp_path / "t", num_classes=3, feature_dtype=np.float16)
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()
    with pytest.raises(ValueError, match="the value of node 1 at time step 3 is nan"):
        snapshots_from_json({"edges": [[0, 1]], "FX": [[1.0, 2.0]] * 3 + [[1.0, float("nan")]] + [[0.0, 0.0]] * 2}, 2)
    limit = feature_limit("16-mixed")  # float16 runs carry a smaller range
    assert limit < 7e4 < feature_limit("bf16-mixed")
    with pytest.raises(ValueError, match="beyond 6e\\+04"):
        check_finite_features(torch.full((2, 2), 7e4), 0, "x", limit=limit)


def test_a_store_whose_features_no_writer_checked_is_read_in_chunks(store):
    x = np.load(store / "x.npy")
    x[5, 0] = np.inf
    rewrite(store, "x", x, meta_changes={"checked": []})
    with pytest.raises(StoreError, match="x.npy: feature 0 of node 5 is inf"):
        GraphStore.open(store)


def test_a_loss_that_explodes_without_becoming_nan_is_reported():
    from callbacks import NonFiniteGuard
    guard = NonFiniteGuard()
    trainer = types.SimpleNamespace(current_epoch=0, callback_metrics={"train/loss": torch.tensor(1.75)})
    guard.on_train_epoch_end(trainer, None)
    trainer.current_epoch, trainer.callback_metrics = 5, {"train/loss": torch.tensor(3.9e13)}
    with pytest.warns(UserWarning, match=r"training loss rose from 1.75 to 3.9e\+13 by epoch 5: training is diverging"):
        guard.on_train_epoch_end(trainer, None)


# --- 5. hyperparameters outside their valid range ---------------------------------------------------------------

@pytest.mark.parametrize("build, message", [
    (lambda: DIFFormer(4, 8, 2, alpha=5.0), r"alpha must be in \[0.0, 1.0\], got 5.0 .*convex combination"),
    (lambda: DIFFormer(4, 8, 2, dropout=1.0), r"dropout must be in \[0.0, 1.0\), got 1.0"),
    (lambda: DIFFormer(4, 8, 2, graph_weight=1.5), "graph_weight must be <= 1"),
    (lambda: DIFFormer(4, 8, 2, sigmoid_block_bytes=0), "sigmoid_block_bytes must be at least 1"),
    (lambda: NodeClassifier(DIFFormer(4, 8, 2), lr=1e38), r"lr must be in \(0, 10\], got 1e\+38"),
    (lambda: NodeClassifier(DIFFormer(4, 8, 2), lr=0.0), r"lr must be in \(0, 10\]"),
    (lambda: NodeClassifier(DIFFormer(4, 8, 2), weight_decay=-1.0), "weight_decay must be a finite number >= 0"),
    (lambda: RandomPartitionDataModule("s", num_workers=-1), "num_workers must be >= 0"),
    (lambda: RandomPartitionDataModule("s", exact_budget_flops=0), "exact_budget_flops must be > 0"),
])
def test_arguments_outside_their_range_are_refused_with_the_range(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# --- 6. checkpoints ------------------------------------------------------------------------------------------------

def test_files_that_are_not_checkpoints_of_this_project_are_named(tmp_path):
    archive = tmp_path / "notes.ckpt"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("notes.txt", "not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.ckpt is a zip archive but not a PyTorch checkpoint"):
        check_checkpoint_file(archive)
    other = tmp_path / "tensors.ckpt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="tensors.ckpt is a PyTorch file but not a checkpoint of this project"):
        AtomicCheckpointIO().load_checkpoint(other)


def test_a_full_disk_names_enospc_and_leaves_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {}, "n": 1}, path)

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 part of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError) as error:
        io.save_checkpoint({"state_dict": {}, "n": 2}, path)
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC and "ENOSPC" in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and io.load_checkpoint(path)["n"] == 1

    def zip_writer_fails(obj, handle, *args, **kwargs):  # how torch.save reports it: RuntimeError, ENOSPC chained
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64")

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    with pytest.raises(OSError) as error:
        io.save_checkpoint({"state_dict": {}, "n": 3}, path)
    monkeypatch.undo()
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC and f"writing {path}: it needs about " in message
    assert f"GB are free in {tmp_path}; the previous checkpoint there is intact" in message
    assert io.load_checkpoint(path)["n"] == 1


@pytest.mark.slow
def test_an_unwritable_checkpoint_folder_is_found_before_the_first_epoch(tmp_path):
    from train import main
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(CheckpointError, match="is not writable"):
        main(["fit", "--config", str(ROOT / "configs" / "synthetic.yaml"), "--checkpoint.dirpath",
              str(blocker / "checkpoints"), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.default_root_dir", str(tmp_path / "run"), "--data.init_args.num_nodes", "600", "--data.init_args.num_val", "100", "--data.init_args.num_test",
              "200"], save_config_callback=None)


@pytest.mark.parametrize("resume_from", ["last", "file"])
@pytest.mark.slow
def test_resuming_with_a_lower_learning_rate_applies_it_and_says_so(tmp_path, resume_from, capsys):
    from train import main
    common = ["--config", str(ROOT / "configs" / "synthetic.yaml"), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
              "--data.init_args.num_nodes", "600", "--data.init_args.num_val", "100", "--data.init_args.num_test", "200"]
    main(["fit", *common, "--trainer.max_epochs", "2"], save_config_callback=None)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    cli = main(["fit", *common, "--trainer.max_epochs", "3", "--model.lr", "0.001", "--ckpt_path",
                "last" if resume_from == "last" else str(checkpoint)], save_config_callback=None)
    assert cli.model.hparams.lr == 0.001
    assert all(group["lr"] == 0.001 for group in cli.trainer.optimizers[0].param_groups)
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == 0.001  # the resumed epoch trained with it


# --- 7. the encoder as a plug-in checks its graph ---------------------------------------------------------------

def test_edge_ids_outside_the_nodes_are_refused_by_the_encoder():
    with pytest.raises(ValueError, match=r"edge_index holds node ids from 0 to 7, but x has 5 rows"):
        DIFFormer(4, 8, 2)(torch.randn(5, 4), torch.tensor([[0, 1], [1, 7]]))
    with pytest.raises(ValueError, match="from -1 to 1"):
        DIFFormer(4, 8, 2, kernel="gcn")(torch.randn(5, 4), torch.tensor([[0, -1], [1, 1]]))


@pytest.mark.slow
def test_a_validation_schedule_that_never_validates_is_named_before_training(tmp_path):
    from train import main
    common = ["fit", "--config", str(ROOT / "configs" / "synthetic.yaml"), "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    with pytest.raises(ValueError, match="--trainer.check_val_every_n_epoch must be >= 1 .*got 0; to train without "
                                         "validation pass --trainer.limit_val_batches 0"):
        main([*common, "--trainer.check_val_every_n_epoch", "0"], save_config_callback=None)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    with pytest.warns(UserWarning, match="check_val_every_n_epoch 5 is above --trainer.max_epochs 2: this fit never "
                                         "validates, so it writes no best.ckpt"):
        main([*common, "--trainer.check_val_every_n_epoch", "5", "--trainer.max_epochs", "2"], save_config_callback=None)


def test_a_misspelt_pyg_dataset_name_is_named_with_the_closest_known_one(tmp_path):
    from datamodules import PyGDataModule
    with pytest.raises(ValueError, match="HeterophilousGraphDataset has no dataset named 'minesweepr' \\(did you mean "
                                         "'minesweeper'\\?\\); it knows roman_empire, amazon_ratings, minesweeper, "
                                         "tolokers, questions$"):
        PyGDataModule("HeterophilousGraphDataset", "minesweepr", root=str(tmp_path)).data


def test_truncated_raw_files_are_named_with_their_folder_and_the_fix(tmp_path):
    import shutil
    from conftest import data_folder
    from datamodules import PlanetoidDataModule, PyGDataModule
    raw = tmp_path / "planetoid" / "Cora" / "raw"
    shutil.copytree(data_folder("planetoid") / "Cora" / "raw", raw)
    (raw / "ind.cora.x").write_bytes((raw / "ind.cora.x").read_bytes()[:100])
    with pytest.raises(ValueError, match=f"Cora: a raw file under {raw} is cut short or damaged \\((EOFError|"
                                         f"UnpicklingError): .*\\); delete {raw} so it is downloaded again"):
        PlanetoidDataModule("Cora", root=str(tmp_path)).data
    folder = tmp_path / "heterophilous"
    shutil.copytree(data_folder("heterophilous"), folder)
    npz = next(folder.rglob("minesweeper*.npz"))
    for processed in folder.rglob("processed"):
        shutil.rmtree(processed)
    npz.write_bytes(npz.read_bytes()[:1000])
    with pytest.raises(ValueError, match="HeterophilousGraphDataset\\(Minesweeper\\): a raw file under .* is cut short "
                                         "or damaged \\(BadZipFile"):
        PyGDataModule("HeterophilousGraphDataset", "Minesweeper", root=str(tmp_path)).data


@pytest.mark.slow
def test_a_data_module_refusing_its_arguments_is_reported_by_its_own_words_on_the_command_line(tmp_path):
    """jsonargparse wraps a data module's ValueError in a list of every Union member it tried; train.py says the
    module's own reason. A lags of 0 is refused, not replaced by the default."""
    from datamodules import TemporalDataModule
    from train import main
    with pytest.raises(ValueError) as raised:
        main(["fit", "--config", str(ROOT / "configs" / "chickenpox_s.yaml"), "--data.init_args.snapshots_per_batch",
              "0", "--trainer.default_root_dir", str(tmp_path)], save_config_callback=None)
    assert str(raised.value) == ("datamodules.TemporalDataModule: snapshots_per_batch must be an integer >= 1 or 'all' "
                                 "(one batch a split), got 0")
    assert list(tmp_path.iterdir()) == []
    assert TemporalDataModule("chickenpox", lags=0).lags == 0  # refused when the series is read (lags in [1, T-1])
    with pytest.raises(ValueError, match=r"lags must be in \[1, 4\] \(the series has 5 time steps\), got 0"):
        snapshots_from_json({"edges": [[0, 1]], "edge_weights": [1.0], "FX": [[1.0, 2.0]] * 5}, 0)
