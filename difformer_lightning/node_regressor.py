"""Per-node regression (spatio-temporal forecasting) with a DIFFormer encoder."""
from typing import Dict, Literal, Tuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.utils import scatter
from torchmetrics import MeanMetric, MeanSquaredError

from .encoder_module import EncoderModule
from .model import DIFFormer

from .contracts import SPLITS

# Temporal data has no per-node training split to evaluate: validation and test snapshots only.
EVALUATED = SPLITS[1:]
TRIVIAL = ("zero", "previous_mean", "last_value", "lag_mean")


def _graphs(batch: Data) -> Tensor:
    """The snapshot id of every node (all 0 for a batch of one snapshot without a ``batch`` vector)."""
    graphs = batch.get("batch")
    return graphs if graphs is not None else torch.zeros_like(batch.y, dtype=torch.long)


def all_pairs_mse(prediction: Tensor, target: Tensor, batch: Tensor) -> Tensor:
    r"""The reference's published error, per snapshot: its ``[N, 1]`` prediction against an ``[N]``
    target broadcasts to every pair, :math:`\frac{1}{N^2}\sum_{i,j}(p_i - y_j)^2
    = \overline{p^2} - 2\,\bar p\,\bar y + \overline{y^2}`; one value per graph of ``batch``."""
    mean = lambda t: scatter(t, batch, dim=0, reduce="mean")  # noqa: E731
    return mean(prediction.pow(2)) - 2 * mean(prediction) * mean(target) + mean(target.pow(2))


def trivial_forecasts(x: Tensor, batch: Tensor) -> Dict[str, Tensor]:
    """Forecasts that learn nothing, for reading a model's error beside them: from the lags ``x`` ``[N, lags]``
    (oldest first, as :func:`datamodules.temporal.snapshots_from_json` builds them) of the snapshots
    ``batch`` ``[N]``, each ``[N]``:

    * ``zero``: 0 everywhere (the series' mean on standardised data);
    * ``previous_mean``: every node gets its snapshot's mean over nodes at the previous step;
    * ``last_value``: each node's previous value (persistence);
    * ``lag_mean``: each node's mean over its lags.
    """
    last = x[:, -1]
    return {"zero": torch.zeros_like(last), "previous_mean": scatter(last, batch, dim=0, reduce="mean")[batch],
            "last_value": last, "lag_mean": x.mean(dim=1)}


Objective = Literal["mse", "mse_all_pairs"]


class NodeRegressor(EncoderModule):
    """Predicts one value per node with MSE; batches may hold several graphs (snapshots).

    Validation evaluates the validation snapshots (dataloader 0) and the test snapshots
    (dataloader 1) and logs ``{split}/mse`` (per node) and ``{split}/mse_all_pairs`` (the
    reference's broadcast error, :func:`all_pairs_mse`).

    ``objective`` is what training minimises and what selects the epoch: ``"mse"`` (per node, the
    default: the sound measure) or ``"mse_all_pairs"`` (the reference's protocol: its
    ``spatial-temporal/main.py`` trains and selects on the broadcast error, which is minimised by
    predicting each snapshot's mean everywhere). With several snapshots in a batch the loss is the mean
    over snapshots of each snapshot's loss, as the reference averages over its training snapshots.
    ``test@best_val`` is the per-node test MSE at the epoch of the best validation objective,
    ``test_all_pairs@best_val`` the all-pairs one. ``test`` also logs the :func:`trivial_forecasts`'
    errors on the same snapshots (``test/mse/<name>``, ``test/mse_all_pairs/<name>``). Optimiser and
    checkpoint hooks: :class:`EncoderModule`.
    """

    higher_is_better = False
    metric_name = "mse"

    def __init__(self, encoder: DIFFormer, lr: float = 1e-2, weight_decay: float = 5e-4,
                 objective: Objective = "mse", task: str = "regression", compile_encoder: bool = False) -> None:
        # task comes from the data module in train.py; a classification one is refused here.
        if task != "regression":
            raise ValueError(f"the data is a {task} classification task: train it with NodeClassifier "
                             f"(the default model of train.py), not NodeRegressor")
        if encoder.lin_out.out_features != 1:
            raise ValueError(f"NodeRegressor predicts one value per node: the encoder needs out_channels=1, "
                             f"got {encoder.lin_out.out_features}")
        if objective not in get_args(Objective):
            raise ValueError(f"objective must be 'mse' (per node) or 'mse_all_pairs' (the reference's), got "
                             f"{objective!r}")
        super().__init__(encoder, lr, weight_decay, compile_encoder)
        self.objective = self.metric_name = objective
        self.mse = torch.nn.ModuleDict({split: MeanSquaredError() for split in EVALUATED})
        self.all_pairs = torch.nn.ModuleDict({split: MeanMetric() for split in EVALUATED})
        self.trivial = torch.nn.ModuleDict({f"{name}_{measure}": MeanSquaredError() if measure == "mse" else MeanMetric()
                                            for name in TRIVIAL for measure in get_args(Objective)})
        self.register_buffer("test_all_pairs_at_best_val", torch.tensor(float("nan")))

    def selection_summary(self) -> str:
        per_node, all_pairs = float(self.test_at_best_val), float(self.test_all_pairs_at_best_val)
        if self.objective == "mse":
            return (f"best val/mse {float(self.best_val):.4f}; reported: test@best_val (per-node MSE) {per_node:.4f} "
                    f"(the same epoch's all-pairs error, test_all_pairs@best_val: {all_pairs:.4f})")
        return (f"best val/mse_all_pairs {float(self.best_val):.4f}; reported: test_all_pairs@best_val {all_pairs:.4f} "
                f"(the reference's Test Cost; the same epoch's per-node MSE, test@best_val: {per_node:.4f})")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # checkpoints written before `objective` existed trained on the per-node MSE
        checkpoint.get("hyper_parameters", {}).setdefault("objective", "mse")
        super().on_load_checkpoint(checkpoint)

    def forward(self, batch: Data) -> Tensor:
        return super().forward(batch).squeeze(-1)

    def training_step(self, batch: Data, batch_idx: int) -> Tensor:
        prediction = self(batch)
        if self.objective == "mse":
            loss = F.mse_loss(prediction, batch.y)
        else:  # the mean over the batch's snapshots of each one's broadcast error
            loss = all_pairs_mse(prediction, batch.y, _graphs(batch)).mean()
        self.log_train_loss(f"train/{self.objective}", loss, weight=batch.num_nodes)
        return loss

    def validation_step(self, batch: Data, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update_metrics(batch, EVALUATED[dataloader_idx])

    def on_validation_epoch_end(self) -> None:
        (val, val_all_pairs), (test, test_all_pairs) = (self._log_metrics(split) for split in EVALUATED)
        if self.record_best(val if self.objective == "mse" else val_all_pairs, test):
            self.test_all_pairs_at_best_val.fill_(test_all_pairs)
        if not self.trainer.sanity_checking:
            self.log("test_all_pairs@best_val", self.test_all_pairs_at_best_val, sync_dist=True, reduce_fx="max")

    def test_step(self, batch: Data, batch_idx: int) -> None:
        self._update_metrics(batch, "test")
        graphs = _graphs(batch)
        for name, forecast in trivial_forecasts(batch.x, graphs).items():
            self.trivial[f"{name}_mse"].update(forecast, batch.y)
            self.trivial[f"{name}_mse_all_pairs"].update(all_pairs_mse(forecast, batch.y, graphs))

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        for name in TRIVIAL:
            for measure in get_args(Objective):
                metric = self.trivial[f"{name}_{measure}"]
                self.log(f"test/{measure}/{name}", metric.compute())
                metric.reset()

    def _update_metrics(self, batch: Data, split: str) -> None:
        prediction = self.evaluate(batch).squeeze(-1)
        self.mse[split].update(prediction, batch.y)
        self.all_pairs[split].update(all_pairs_mse(prediction, batch.y, _graphs(batch)))

    def _log_metrics(self, split: str) -> Tuple[Tensor, Tensor]:
        """Logs and resets ``split``'s per-node and all-pairs MSE; returns both."""
        mse, all_pairs = self.mse[split].compute(), self.all_pairs[split].compute()
        self.log(f"{split}/mse", mse, prog_bar=split == "val", add_dataloader_idx=False)
        self.log(f"{split}/mse_all_pairs", all_pairs, add_dataloader_idx=False)
        self.mse[split].reset()
        self.all_pairs[split].reset()
        return mse, all_pairs
