"""Callbacks measured against situations with a known answer."""
import time

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from callbacks import Memory, Throughput, process_memory_mb
from datamodules import SyntheticCSBMDataModule
from difformer_lightning import DIFFormer, NodeClassifier


class SlowBatches(Dataset):
    """Six copies of one graph, each handed out after ``delay`` seconds."""

    def __init__(self, data, delay):
        self.data, self.delay = data, delay

    def __len__(self):
        return 6

    def __getitem__(self, index):
        time.sleep(self.delay)
        return self.data


def fit_with(delay):
    data = SyntheticCSBMDataModule(num_nodes=1000, num_classes=4, train_per_class=10, num_val=100, num_test=100).data
    loader = DataLoader(SlowBatches(data, delay), batch_size=None, collate_fn=lambda item: item)
    model = NodeClassifier(DIFFormer(64, 8, 4, num_layers=1))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Throughput(), Memory()], limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    return trainer.callback_metrics, time.perf_counter() - start


def test_data_wait_fraction_tells_a_slow_loader_from_a_fast_one():
    slow, _ = fit_with(delay=0.5)
    fast, _ = fit_with(delay=0.0)
    assert float(slow["throughput/data_wait_fraction"]) > 0.5  # 3 s of sleeping in a short epoch
    assert float(fast["throughput/data_wait_fraction"]) < float(slow["throughput/data_wait_fraction"]) / 2
    # six batches of 1000 nodes: nodes/s is 1000 x batches/s
    assert float(slow["throughput/nodes_per_s"]) == pytest.approx(1000 * float(slow["throughput/batches_per_s"]))
    assert float(slow["throughput/batches_per_s"]) < 6 / 3.0


def test_memory_counts_private_within_pss_within_rss():
    metrics, _ = fit_with(delay=0.0)
    rss, pss, private = (float(metrics[f"memory/{k}"]) for k in ("rss_mb", "pss_mb", "private_mb"))
    assert 0 < private <= pss <= rss
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MB written: private memory grows by about that
    assert process_memory_mb()["private_mb"] - private > 50
    del block


def test_pairwise_energy_in_linear_time_equals_the_dense_double_sum():
    from callbacks import diffusion_energy, pairwise_energy
    torch.manual_seed(0)
    states = [torch.randn(300, 8, dtype=torch.float64) for _ in range(3)]
    unit = torch.nn.functional.normalize(states[1], dim=-1)
    distance = torch.cdist(unit, unit).pow(2)
    dense = (2 * distance - distance.pow(2) / 4).sum() / 300**2  # delta(d) = 2d - d^2/4 over all pairs
    assert pairwise_energy(states[1]).item() == pytest.approx(dense.item(), rel=1e-10)
    assert pairwise_energy(torch.ones(50, 4)).item() == pytest.approx(0.0, abs=1e-6)  # all parallel: no energy
    values = diffusion_energy(states, weight=0.5)
    local = (states[2] - states[1]).pow(2).sum().item() / 300
    assert values["local_2"] == pytest.approx(local)
    assert values["total_2"] == pytest.approx(local + 0.5 * values["global_2"])
    assert sorted(values) == ["global_0", "global_1", "global_2", "local_1", "local_2", "total_1", "total_2"]


def small_fit(tmp_path, callbacks, module=None, max_epochs=2, **trainer):
    datamodule = SyntheticCSBMDataModule(num_nodes=600, num_classes=3, train_per_class=20, num_val=100, num_test=100)
    module = module or NodeClassifier(DIFFormer(64, 16, 3, num_layers=2), lr=0.01)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, **trainer)
    trainer.fit(module, datamodule)
    return trainer


def test_energy_callback_logs_every_layer_of_the_probe_batch(tmp_path):
    from callbacks import Energy, diffusion_energy
    trainer = small_fit(tmp_path, [Energy(probe_nodes=600)], enable_checkpointing=False)
    module, data = trainer.lightning_module.eval(), trainer.datamodule.data
    with torch.no_grad():
        expected = diffusion_energy(module.encoder.diffuse(data.x, data.edge_index))
    # a model with both terms also gets the graph term's size over the attention's, per layer
    expected.update({f"graph_ratio_{k}": ratio for k, ratio in
                     enumerate(module.encoder.graph_term_ratios(data.x, data.edge_index), start=1)})
    logged = {key.split("/")[1]: float(value) for key, value in trainer.callback_metrics.items()
              if key.startswith("energy/")}
    assert logged.keys() == expected.keys()
    assert all(logged[key] == pytest.approx(expected[key], rel=1e-5) for key in expected)


@pytest.mark.slow
def test_partition_stats_on_a_store_keep_about_batch_over_nodes_of_the_edges(tmp_path):
    from callbacks import PartitionStats
    from datamodules import RandomPartitionDataModule
    from datamodules.synthetic import write_synthetic_store
    store = write_synthetic_store(tmp_path / "store", 2000, num_classes=3)
    datamodule = RandomPartitionDataModule(str(store), batch_size=500, num_workers=0)
    trainer = pl.Trainer(max_epochs=1, callbacks=[PartitionStats()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(NodeClassifier(DIFFormer(64, 16, 3), lr=0.01), datamodule)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert metrics["partition/batch_nodes_mean"] == 500 == metrics["partition/batch_nodes_min"]
    assert metrics["partition/edges_kept"] == pytest.approx(500 / 2000, abs=0.03)  # a neighbour shares a batch w.p. B/N


def test_non_finite_guard_stops_before_the_step_and_the_last_checkpoint_stays_good(tmp_path):
    from callbacks import Checkpoint, NonFiniteError, NonFiniteGuard

    class BreaksAtStep4(NodeClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 3 else loss

    module = BreaksAtStep4(DIFFormer(64, 16, 3, num_layers=2), lr=0.01)
    checkpoint = Checkpoint(dirpath=tmp_path / "checkpoints")
    with pytest.raises(NonFiniteError) as raised:
        small_fit(tmp_path, [NonFiniteGuard(), checkpoint], module=module, max_epochs=10)
    message = str(raised.value)
    assert "optimizer step 4" in message and "loss nan" in message and str(tmp_path / "checkpoints" / "last.ckpt") in message
    assert all(torch.isfinite(p).all() for p in module.parameters())  # the NaN never reached the weights
    saved = NodeClassifier.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(p).all() for p in saved.parameters())
