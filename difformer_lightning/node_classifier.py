"""Node classification with a DIFFormer encoder."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.data import Data
from torchmetrics import AUROC, Accuracy, Metric, SumMetric

from .contracts import SPLITS
from .encoder_module import EncoderModule
from .metrics import ROCAUC, OGBEvaluatorMetric, metric_key
from .model import DIFFormer


class NodeClassifier(EncoderModule):
    """Trains a :class:`DIFFormer` on the labelled nodes of each batch.

    ``task='multiclass'``: cross-entropy over ``y`` [N]; ``task='multilabel'``: BCE with
    logits over ``{0, 1}`` targets ``y`` [N, T] (as for ogbn-proteins). ``metric``: ``'auto'`` (the
    data module's ``metric``: OGB's Evaluator for OGB data, ROC-AUC for Minesweeper, ...), ``'accuracy'``,
    ``'rocauc'`` (OGB's rule: tasks without a positive or a negative are skipped) or ``'ogb:<name>'``; each
    equals its reference evaluator (tests). Optimiser, model selection and checkpoint hooks:
    :class:`EncoderModule`.

    Every validation epoch evaluates train, validation and test nodes in eval mode and logs
    ``{split}/{metric}``; ``test@best_val`` is the test metric at the epoch of the best
    validation metric so far (the reference's model selection), kept in the checkpoint.

    Checkpoints resume exactly, also mid-epoch: they hold every rank's random-number state
    (dropout) and every rank's running sums of the epoch's training loss; loading one whose model or
    hyperparameters differ raises a ``ValueError`` naming the difference.
    """

    def __init__(self, encoder: DIFFormer, lr: float = 1e-3, weight_decay: float = 5e-4,
                 task: str = "multiclass", metric: str = "auto", compile_encoder: bool = False) -> None:
        # task is a str, not a Literal, so that train.py's link from a regression data module
        # reaches this message instead of a type error.
        if task == "regression":
            raise ValueError("the data is a regression task (one value per node): train it with "
                             "NodeRegressor (--model difformer_lightning.NodeRegressor), not NodeClassifier")
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"unknown task {task!r}: choose 'multiclass' or 'multilabel'")
        if metric not in ("auto", "accuracy", "rocauc") and not metric.startswith("ogb:"):
            raise ValueError(f"unknown metric {metric!r}: choose 'auto' (the data module's), 'accuracy', 'rocauc' "
                             f"or 'ogb:<dataset name>' (OGB's Evaluator)")
        super().__init__(encoder, lr, weight_decay, compile_encoder)
        self.metrics: Optional[nn.ModuleDict] = None
        if metric != "auto":
            self._use_metric(metric)

    def _use_metric(self, metric: str) -> None:
        """Builds each split's metric: ``accuracy`` (the fraction of correct nodes), ``rocauc`` (OGB's rule
        over tasks for multi-label data, the class-1 probability for two classes, a one-vs-rest macro mean
        otherwise), or ``ogb:<name>`` (OGB's Evaluator); and a node count per split, so that a split with no
        node is logged as NaN, never as a number."""
        task, num_outputs = self.hparams.task, self.encoder.lin_out.out_features
        self.metric_name = metric_key(metric)

        def make() -> Metric:
            if metric.startswith("ogb:"):
                return OGBEvaluatorMetric(metric[4:])
            if metric == "accuracy":
                size = {"num_labels": num_outputs} if task == "multilabel" else {"num_classes": num_outputs}
                # micro: the fraction of correct nodes (torchmetrics defaults to a per-class macro mean)
                return Accuracy(task=task, average="micro", **size)
            if task == "multilabel" or num_outputs == 2:
                return ROCAUC(binary=task != "multilabel")
            return AUROC(task="multiclass", num_classes=num_outputs, average="macro")

        # Keyed "<split>_metric": a ModuleDict key "train" would clash with Module.train.
        self.metrics = nn.ModuleDict({f"{split}_metric": make() for split in SPLITS})
        self.counts = nn.ModuleDict({f"{split}_count": SumMetric() for split in SPLITS})

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.metrics is None:  # metric 'auto': the data module's (OGB's for OGB data), else accuracy
            datamodule = self._datamodule()
            self._use_metric(datamodule.metric if datamodule is not None else "accuracy")

    def _loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.hparams.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, target.float())
        return F.cross_entropy(logits, target)

    def training_step(self, batch: Data, batch_idx: int) -> Tensor:
        mask = batch.train_mask
        logits = self(batch)
        if mask.any():
            loss = self._loss(logits[mask], batch.y[mask])
            self.log_train_loss("train/loss", loss, weight=mask.sum())
        else:
            # A partition batch may hold no training node: a zero loss that still touches every parameter
            # keeps DDP's gradient all-reduce in step across ranks, and the epoch mean is logged (and
            # synchronised over ranks) all the same, so no rank waits for another at the epoch's end.
            loss = logits.sum() * 0.0
            self.log_train_loss("train/loss", loss, weight=0)
        return loss

    def _update_metrics(self, batch: Data, splits) -> None:
        for split in splits:
            self.counts[f"{split}_count"].update(batch[f"{split}_mask"].sum())
        if not any(bool(batch[f"{split}_mask"].any()) for split in splits):
            return  # nothing to score (an empty batch of a rank with no evaluation batch, no labelled node)
        logits = self.evaluate(batch)
        for split in splits:
            mask = batch[f"{split}_mask"]
            if mask.any():
                self.metrics[f"{split}_metric"].update(logits[mask], batch.y[mask])

    def validation_step(self, batch: Data, batch_idx: int) -> None:
        self._update_metrics(batch, SPLITS)

    def _compute(self, split: str) -> Tensor:
        """The split's metric over every rank (NaN when no rank scored a node of it), then reset."""
        value, count = self.metrics[f"{split}_metric"].compute(), self.counts[f"{split}_count"].compute()
        self.metrics[f"{split}_metric"].reset()
        self.counts[f"{split}_count"].reset()
        return value if count > 0 else torch.full_like(value, float("nan"))

    def on_validation_epoch_end(self) -> None:
        values = {}
        for split in SPLITS:
            values[split] = self._compute(split)
            self.log(f"{split}/{self.metric_name}", values[split], prog_bar=split == "val")
        self.record_best(values["val"], values["test"])

    def test_step(self, batch: Data, batch_idx: int) -> None:
        self._update_metrics(batch, ("test",))

    def on_test_epoch_end(self) -> None:
        self.log(f"test/{self.metric_name}", self._compute("test"))
