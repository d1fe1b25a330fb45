"""Callbacks the subprocess tests add to train.py runs (``--trainer.callbacks+=cli_helpers.X``)."""
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch


class StepPrinter(pl.Callback):
    """Prints ``step <global step>`` after every training step and ``validating <epoch>`` when a validation
    inside the fit starts, then sleeps ``pause`` seconds, so a test watching the output can kill the
    process part-way through an epoch or while it validates."""

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:  # one writer: lines of two ranks could interleave
            print(f"step {trainer.global_step}", flush=True)
        time.sleep(self.pause)

    def on_validation_start(self, trainer, module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            if trainer.is_global_zero:
                print(f"validating {trainer.current_epoch}", flush=True)
            time.sleep(self.pause)


class BatchRecorder(pl.Callback):
    """Writes ``<out_dir>/rank<r>.json``: the node ids of every training batch this rank saw, per epoch."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.batches.setdefault(str(trainer.current_epoch), []).append(batch.n_id.tolist())

    def on_fit_end(self, trainer, module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))


class IncompleteData(pl.LightningDataModule):
    """A user's data module that forgot most of the data contract (tests/test_contracts.py)."""

    num_features = 4

    def __init__(self, size: int = 10) -> None:
        super().__init__()
        self.size = size


class ScratchWatcher(pl.Callback):
    """Writes ``<out>``: the entries of ``scratch_dir`` at the first training step, and whether an exact pass
    ran before it (tests/test_exact_scale.py: the scratch is created at the first evaluation, not in setup)."""

    def __init__(self, scratch_dir: str, out: str) -> None:
        self.scratch_dir, self.out = Path(scratch_dir), Path(out)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and trainer.is_global_zero:
            self.out.write_text(json.dumps(sorted(path.name for path in self.scratch_dir.iterdir())))


class BadBatches(pl.LightningDataModule):
    """A user's data module that meets the data contract's members but yields batches that break its layout:
    features 3 wide where it says 4, no train_mask (tests/test_contracts.py)."""

    num_features, num_outputs, task, metric, num_nodes, max_batch_nodes = 4, 2, "multiclass", "accuracy", 10, 10

    @property
    def prediction_nodes(self):
        return None

    def describe(self):
        return {"dataset": "BadBatches", "num_nodes": 10, "num_features": 4, "num_classes": 2}

    def probe_batch(self, num_nodes, seed=0):
        return self._batch()

    def evaluation_plan(self, encoder):
        return None

    def _batch(self):
        import torch
        from torch_geometric.data import Data
        mask = torch.ones(10, dtype=torch.bool)
        return Data(x=torch.randn(10, 3), y=torch.zeros(10, dtype=torch.long), val_mask=mask, test_mask=mask,
                    edge_index=torch.tensor([[0, 1], [1, 12]]))

    def train_dataloader(self):
        from torch.utils.data import DataLoader
        return DataLoader([self._batch()], batch_size=None, collate_fn=lambda batch: batch)

    def val_dataloader(self):
        return self.train_dataloader()


class PoisonWeights(pl.Callback):
    """From global step ``at_step``, fills the first parameter with NaN before each batch: the loss turns
    non-finite (a stand-in for a diverging run; NonFiniteGuard then stops the fit)."""

    def __init__(self, at_step: int = 1) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step >= self.at_step:
            with torch.no_grad():
                next(module.parameters()).fill_(float("nan"))
