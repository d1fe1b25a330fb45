"""The data contract, the loader's own resume state, one CSBM generator, one atomic-write helper."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, scaled_timeout
from datamodules import (FeatureDataModule, GraphStore, NodeDataModule, PlanetoidDataModule, RandomPartitionDataModule,
                         SyntheticCSBMDataModule, TemporalDataModule)
from datamodules.partition import BatchBuilder, PartitionLoader, PartitionSampler
from datamodules.synthetic import contextual_sbm, write_synthetic_store
from difformer_lightning.contracts import DATA_MEMBERS, check_data_module, missing_members
from difformer_lightning.io import atomic_file, publish, staging_path


@pytest.mark.parametrize("data_class", [NodeDataModule, PlanetoidDataModule, FeatureDataModule, SyntheticCSBMDataModule,
                                        RandomPartitionDataModule, TemporalDataModule])
def test_every_data_module_of_the_project_implements_the_whole_contract(data_class):
    assert missing_members(data_class) == []
    assert set(DATA_MEMBERS) == {"num_features", "num_outputs", "task", "metric", "num_nodes", "max_batch_nodes",
                                 "describe", "probe_batch", "prediction_nodes", "evaluation_plan"}


@pytest.mark.slow
def test_a_data_module_missing_part_of_the_contract_is_named_before_any_data_is_loaded(tmp_path):
    from cli_helpers import IncompleteData
    with pytest.raises(TypeError, match="IncompleteData lacks num_outputs, task, metric, num_nodes, "
                                        "max_batch_nodes, describe, probe_batch, prediction_nodes, evaluation_plan of the data contract"):
        check_data_module(IncompleteData())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "synthetic.yaml"),
                           "--data", "cli_helpers.IncompleteData", "--trainer.default_root_dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=scaled_timeout(10))
    assert done.returncode != 0
    assert "lacks num_outputs" in done.stderr and "Epoch" not in done.stdout, done.stderr[-2000:]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("contract") / "csbm", 503, num_classes=3, seed=5)


def loader(store, world: int, rank: int, workers: int = 0) -> PartitionLoader:
    sampler = PartitionSampler(503, 40, seed=1, shuffle=True, num_replicas=world, rank=rank)
    return PartitionLoader(BatchBuilder(store), sampler, num_workers=workers)


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (3, 2)])
def test_the_training_loader_owns_its_position_and_resumes_every_rank_exactly(store, world, workers):
    # torchtitan's test: consume k batches, save the state, load it into a fresh loader, and the next
    # batches are the same on every rank; workers drawing ahead do not move the position.
    for rank in range(world):
        first = loader(store, world, rank, workers)
        first.sampler.set_epoch(2)
        batches = iter(first)
        seen = [next(batches).n_id for _ in range(3)]
        state = first.state_dict()
        assert state == {"epoch": 2, "position": 3, "world_size": world}
        rest = [batch.n_id for batch in batches]
        assert len(seen) + len(rest) == len(first)
        fresh = loader(store, world, rank, workers)
        fresh.load_state_dict(state)
        fresh.sampler.set_epoch(2)  # as Lightning does at the epoch's start
        resumed = [batch.n_id for batch in fresh]
        assert all(torch.equal(a, b) for a, b in zip(resumed, rest)) and len(resumed) == len(rest)
        # the next epoch starts from its first batch
        assert fresh.state_dict() == {"epoch": 3, "position": 0, "world_size": world}
        fresh.sampler.set_epoch(3)
        assert len(list(fresh)) == len(fresh)


def test_a_mid_epoch_position_is_refused_under_another_number_of_ranks(store):
    with pytest.raises(ValueError, match="written mid-epoch by 2 ranks and this run has 3"):
        loader(store, 3, 0).load_state_dict({"epoch": 1, "position": 2, "world_size": 2})
    loader(store, 3, 0).load_state_dict({"epoch": 1, "position": 0, "world_size": 2})  # an epoch's end is fine


def test_the_full_batch_and_the_store_csbm_are_the_same_graph(tmp_path):
    args = dict(num_nodes=700, num_classes=4, num_features=6, avg_degree=5.0, homophily=0.7, feature_signal=0.5)
    data = contextual_sbm(**args, seed=3, chunk=1000)
    store = GraphStore.open(write_synthetic_store(tmp_path / "s", **args, seed=3, chunk=1000,
                                                  feature_dtype=np.float32))
    assert torch.equal(store.x, data.x) and torch.equal(store.y.long(), data.y)
    source, target, _ = store.in_edges(0, store.num_nodes)
    in_memory = sorted(zip(data.edge_index[1].tolist(), data.edge_index[0].tolist()))
    assert sorted(zip(target.tolist(), source.tolist())) == in_memory  # every edge, duplicates included
    other = contextual_sbm(**args, seed=4, chunk=1000)
    assert not torch.equal(other.x, data.x)


def test_the_synthetic_data_module_uses_the_same_generator():
    module = SyntheticCSBMDataModule(num_nodes=600, num_classes=3, num_val=100, num_test=200, seed=7)
    data = contextual_sbm(600, 3, 64, 8.0, 0.6, 0.2, seed=7)
    assert torch.equal(module.data.x, data.x) and torch.equal(module.data.edge_index, data.edge_index)


def test_atomic_writes_leave_the_old_file_or_the_new_and_clean_a_dead_writers_leftovers(tmp_path):
    path = tmp_path / "result.json"
    with atomic_file(path, "w") as handle:
        handle.write("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path, "w") as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    # a writer killed hard leaves its temporary name; the next write of the file removes it
    dead = path.with_name(f".{path.name}.tmp-999999999-deadbeef")
    dead.write_text("half")
    staging = staging_path(path)
    staging.write_text("new")
    publish(staging, path)
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.slow
def test_a_user_data_modules_bad_first_batch_is_named_before_any_step(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "synthetic.yaml"),
                             "--data", "cli_helpers.BadBatches", "--trainer.default_root_dir", str(tmp_path / "run"),
                             "--trainer.enable_progress_bar", "false"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "tests")}, capture_output=True,
                            text=True, timeout=scaled_timeout(40))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: the first validation batch breaks the data contract"), result.stderr[-2000:]
    for problem in ("x is float32 [10, 3], not float [B, 4] (num_features: 4)",
                    "train_mask is missing (bool [B]: the nodes the train split scores)",
                    "edge_index holds node 12 (or a negative one) in a batch of 10 nodes"):
        assert problem in last, last
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_check_batch_against_hand_made_batches():
    from torch_geometric.data import Data
    from difformer_lightning.contracts import check_batch
    mask = torch.ones(4, dtype=torch.bool)
    good = Data(x=torch.randn(4, 3), y=torch.tensor([0, 1, 2, -1]), train_mask=mask, val_mask=mask, test_mask=mask,
                edge_index=torch.tensor([[0, 3], [1, 2]]), n_id=torch.tensor([7, 1, 0, 9]), batch=torch.tensor([0, 0, 1, 1]))
    check_batch(good, 3, 3, "multiclass", 10, "a batch")
    for change, message in (({"y": torch.tensor([0, 1, 3, 0])}, "y holds class 3, but num_outputs is 3"),
                            ({"n_id": torch.tensor([7, 1, 0, 10])}, "n_id holds node 10 (or a negative one), but "
                                                                     "num_nodes is 10"),
                            ({"batch": torch.tensor([1, 0, 1, 1])}, "batch is int64 [4], not sorted graph ids [4]"),
                            ({"val_mask": torch.ones(4)}, "val_mask is float32 [4], not bool [4]"),
                            ({"y": torch.zeros(4, 2)}, "y is float32 [4, 2], not integer class ids [B]")):
        with pytest.raises(ValueError, match=re.escape(message)):
            check_batch(Data(**{**good.to_dict(), **change}), 3, 3, "multiclass", 10, "a batch")
    with pytest.raises(TypeError, match="is a dict, not a torch_geometric.data.Data"):
        check_batch({"x": 1}, 3, 3, "multiclass", 10, "a batch")
    regression = Data(x=torch.randn(4, 3), y=torch.randn(4))
    check_batch(regression, 3, 1, "regression", None, "a batch")  # no masks needed


@pytest.mark.slow
def test_lightning_takes_no_batch_ahead_of_the_step(store, tmp_path):
    """PartitionLoader's position (what a checkpoint saves) equals the steps taken only while Lightning's training
    loop takes no batch ahead from a loader with a length; no public API promises it, so this watches it."""
    import lightning.pytorch as pl
    from difformer_lightning import DIFFormer, NodeClassifier

    class Watch(pl.Callback):
        def __init__(self):
            self.positions = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.positions.append((batch_idx, trainer.train_dataloader.state_dict()["position"]))

    data = RandomPartitionDataModule(str(store), batch_size=100, num_workers=0)
    watch = Watch()
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[watch])
    trainer.fit(NodeClassifier(DIFFormer(data.num_features, 8, data.num_outputs)), datamodule=data)
    # 503 nodes in batches of 100: 6 batches; at batch k's start, the loader has handed out k + 1 batches (after
    # the last one its state is the next epoch's start, position 0)
    assert [position for _, position in watch.positions] == [(index + 1) % 6 for index, _ in watch.positions]
    assert len(watch.positions) == 6
