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
