"""Metrics that equal their reference evaluators: ROC-AUC as OGB's ``Evaluator`` computes it, and OGB's
``Evaluator`` itself. Both gather every score over the DDP ranks (torchmetrics' ``cat`` states) and
compute once on the whole split.

torchmetrics' ``AUROC(task="multilabel", average="macro")`` averages a 0 for every task without a positive
(or without a negative) node in the split; OGB skips those tasks, and the published ogbn-proteins numbers
are OGB's. ``sklearn.metrics.roc_auc_score`` is what OGB calls, so it is called here too.
"""
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def rocauc_over_tasks(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """The mean ROC-AUC over the columns (tasks) of ``y_true`` ``[n, T]`` (0/1, NaN for unlabelled) that
    hold both a positive and a negative, as ``ogb.nodeproppred.Evaluator`` computes it; NaN when none does
    (OGB raises there). Source: ``ogb/nodeproppred/evaluate.py`` (``_eval_rocauc``)."""
    from sklearn.metrics import roc_auc_score

    values = []
    for task in range(y_true.shape[1]):
        column = y_true[:, task]
        if np.sum(column == 1) > 0 and np.sum(column == 0) > 0:
            labelled = column == column
            values.append(roc_auc_score(column[labelled], y_score[labelled, task]))
    return float(sum(values) / len(values)) if values else float("nan")


class ROCAUC(Metric):
    """ROC-AUC with OGB's rule (:func:`rocauc_over_tasks`): multi-label targets ``[n, T]`` with logits
    ``[n, T]``, or ``binary`` single-label targets ``[n]`` (class ids 0/1) with logits ``[n, 2]`` (scored by
    the probability of class 1, as Platonov et al. report Minesweeper, Tolokers and Questions)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, binary: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.binary = binary
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, target: Tensor) -> None:
        if self.binary:
            logits, target = torch.softmax(logits.float(), dim=-1)[:, 1:], target.view(-1, 1)
        self.scores.append(logits.detach().float())
        self.targets.append(target.detach().float())

    def compute(self) -> Tensor:
        if _empty(self.scores):
            return torch.tensor(float("nan"), dtype=torch.float64)
        scores, targets = dim_zero_cat(self.scores), dim_zero_cat(self.targets)
        return torch.tensor(rocauc_over_tasks(targets.cpu().double().numpy(), scores.cpu().double().numpy()),
                            dtype=torch.float64)


class OGBEvaluatorMetric(Metric):
    """``ogb.nodeproppred.Evaluator(name)`` on the whole split: accuracy (``y_pred`` the argmax ``[n, 1]``)
    or ROC-AUC (``y_pred`` the scores ``[n, T]``), as OGB's leaderboards compute them."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, name: str, **kwargs) -> None:
        super().__init__(**kwargs)
        from ogb.nodeproppred import Evaluator

        self.evaluator = Evaluator(name)
        self.key = self.evaluator.eval_metric
        self.add_state("predictions", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, target: Tensor) -> None:
        prediction = logits.argmax(dim=-1, keepdim=True) if self.key == "acc" else logits
        self.predictions.append(prediction.detach().float())
        self.targets.append(target.detach().float().view(target.size(0), -1))

    def compute(self) -> Tensor:
        if _empty(self.predictions):
            return torch.tensor(float("nan"), dtype=torch.float64)
        predictions, targets = dim_zero_cat(self.predictions), dim_zero_cat(self.targets)
        if self.key == "rocauc":  # OGB raises where no task has both classes; NaN here, as ROCAUC
            value = rocauc_over_tasks(targets.cpu().double().numpy(), predictions.cpu().double().numpy())
        else:
            value = self.evaluator.eval({"y_true": targets.long().cpu().numpy(),
                                         "y_pred": predictions.long().cpu().numpy()})[self.key]
        return torch.tensor(float(value), dtype=torch.float64)


def _empty(state) -> bool:
    """No score on any rank: an empty list (nothing gathered) or an empty tensor."""
    return (isinstance(state, list) and all(t.numel() == 0 for t in state)) or \
        (isinstance(state, Tensor) and state.numel() == 0)


def metric_key(metric: str, num_outputs: Optional[int] = None) -> str:
    """The logged name of a metric option: ``acc`` or ``rocauc`` (for ``ogb:<name>``, OGB's own)."""
    if metric.startswith("ogb:"):
        from ogb.nodeproppred import Evaluator

        return Evaluator(metric[4:]).eval_metric
    return {"accuracy": "acc", "rocauc": "rocauc"}[metric]
