"""Node classification with a DIFFormer encoder."""
import warnings
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data
from torchmetrics import AUROC, Accuracy, MeanMetric, Metric

from .checkpoint import check_compatible, gather_rng_states, restore_rng_state
from .model import DIFFormer

SPLITS = ("train", "val", "test")


class NodeClassifier(pl.LightningModule):
    """Trains a :class:`DIFFormer` on the labelled nodes of each batch.

    ``task='multiclass'``: cross-entropy over ``y`` [N]; ``task='multilabel'``: BCE with
    logits over ``{0, 1}`` targets ``y`` [N, T] (as for ogbn-proteins). ``metric`` is
    accuracy or ROC-AUC (macro over classes / tasks). Adam with coupled weight decay on all
    parameters and a constant learning rate, as the reference.

    Every validation epoch evaluates train, validation and test nodes in eval mode and logs
    ``{split}/{metric}``; ``test@best_val`` is the test metric at the epoch of the best
    validation metric so far (the reference's model selection), kept in the checkpoint.

    Checkpoints resume exactly, also mid-epoch: they hold every rank's random-number state
    (dropout) and the running mean of the epoch's training loss; loading one whose model or
    hyperparameters differ raises a ``ValueError`` naming the difference.
    """

    def __init__(self, encoder: DIFFormer, lr: float = 1e-3, weight_decay: float = 5e-4,
                 task: Literal["multiclass", "multilabel"] = "multiclass",
                 metric: Literal["accuracy", "rocauc"] = "accuracy") -> None:
        super().__init__()
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"unknown task {task!r}: choose 'multiclass' or 'multilabel'")
        if metric not in ("accuracy", "rocauc"):
            raise ValueError(f"unknown metric {metric!r}: choose 'accuracy' or 'rocauc'")
        with warnings.catch_warnings():
            # Keeping the encoder in hparams is deliberate: under LightningCLI it is saved as its
            # class path and arguments, so load_from_checkpoint rebuilds it without extra arguments.
            warnings.filterwarnings("ignore", message="Attribute 'encoder' is an instance of `nn.Module`")
            self.save_hyperparameters()
        self.encoder = encoder
        self.metric_name = "acc" if metric == "accuracy" else "rocauc"
        # Keyed "<split>_metric": a ModuleDict key "train" would clash with Module.train.
        self.metrics = nn.ModuleDict({f"{split}_metric": self._make_metric(task, metric) for split in SPLITS})
        self.register_buffer("best_val", torch.tensor(float("-inf")))
        self.register_buffer("test_at_best_val", torch.tensor(float("nan")))
        # Persistent, so a mid-epoch checkpoint carries the epoch's partial mean and a resumed
        # run logs the same epoch loss as an uninterrupted one; synchronised over ranks.
        self.train_loss = MeanMetric()
        self.train_loss.persistent(True)

    def _make_metric(self, task: str, metric: str) -> Metric:
        num_outputs = self.encoder.lin_out.out_features
        size = {"num_labels": num_outputs} if task == "multilabel" else {"num_classes": num_outputs}
        if metric == "accuracy":
            # micro: the fraction of correct nodes (torchmetrics defaults to a per-class macro mean)
            return Accuracy(task=task, average="micro", **size)
        return AUROC(task=task, average="macro", **size)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "max_batch_nodes"):
            self.encoder.check_fits(datamodule.max_batch_nodes)

    def forward(self, batch: Data) -> Tensor:
        return self.encoder(batch.x, batch.get("edge_index"), batch.get("edge_weight"), batch.get("batch"))

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.hparams.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, target.float())
        return F.cross_entropy(logits, target)

    def training_step(self, batch: Data, batch_idx: int) -> Tensor:
        mask = batch.train_mask
        logits = self(batch)
        if not mask.any():
            # A partition batch may hold no training node; a zero loss that still touches every
            # parameter keeps DDP's gradient all-reduce in step across ranks.
            return logits.sum() * 0.0
        loss = self._loss(logits[mask], batch.y[mask])
        self.train_loss.update(loss.detach(), weight=mask.sum())
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _update_metrics(self, batch: Data, splits) -> None:
        logits = self(batch)
        for split in splits:
            mask = batch[f"{split}_mask"]
            if mask.any():
                self.metrics[f"{split}_metric"].update(logits[mask], batch.y[mask])

    def validation_step(self, batch: Data, batch_idx: int) -> None:
        self._update_metrics(batch, SPLITS)

    def on_validation_epoch_end(self) -> None:
        values = {}
        for split in SPLITS:
            values[split] = self.metrics[f"{split}_metric"].compute()
            self.metrics[f"{split}_metric"].reset()
            self.log(f"{split}/{self.metric_name}", values[split], prog_bar=split == "val")
        if self.trainer.sanity_checking:
            return
        if values["val"] > self.best_val:
            self.best_val.fill_(values["val"])
            self.test_at_best_val.fill_(values["test"])
        self.log("val/best", self.best_val)
        self.log("test@best_val", self.test_at_best_val, prog_bar=True)

    def test_step(self, batch: Data, batch_idx: int) -> None:
        self._update_metrics(batch, ("test",))

    def on_test_epoch_end(self) -> None:
        self.log(f"test/{self.metric_name}", self.metrics["test_metric"].compute())
        self.metrics["test_metric"].reset()

    def predict_step(self, batch: Data, batch_idx: int) -> Tensor:
        return self(batch)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = gather_rng_states(self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before Lightning loads the weights: a mismatch is reported by name, not as a
        # size-mismatch traceback; the dropout random state comes back only when resuming a fit.
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data = datamodule.describe() if hasattr(datamodule, "describe") else None
        check_compatible(checkpoint, self.hparams, self.state_dict(), data, fitting)
        if fitting and "rng_states" in checkpoint:
            restore_rng_state(checkpoint["rng_states"], self.global_rank, self.device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
