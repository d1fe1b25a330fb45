"""Per-node regression (spatio-temporal forecasting) with a DIFFormer encoder."""
from typing import Tuple

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


def all_pairs_mse(prediction: Tensor, target: Tensor, batch: Tensor) -> Tensor:
    r"""The reference's published error, per snapshot: its ``[N, 1]`` prediction against an ``[N]``
    target broadcasts to every pair, :math:`\frac{1}{N^2}\sum_{i,j}(p_i - y_j)^2
    = \overline{p^2} - 2\,\bar p\,\bar y + \overline{y^2}`; one value per graph of ``batch``."""
    mean = lambda t: scatter(t, batch, dim=0, reduce="mean")  # noqa: E731
    return mean(prediction.pow(2)) - 2 * mean(prediction) * mean(target) + mean(target.pow(2))


class NodeRegressor(EncoderModule):
    """Predicts one value per node with MSE; batches may hold several graphs (snapshots).

    Validation evaluates the validation snapshots (dataloader 0) and the test snapshots
    (dataloader 1) and logs ``{split}/mse`` (per node) and ``{split}/mse_all_pairs`` (the
    reference's broadcast error, for comparison with published tables); ``test@best_val`` is
    the test MSE at the epoch of the lowest validation MSE (``test_all_pairs_at_best_val`` the
    all-pairs one). Optimiser and checkpoint hooks: :class:`EncoderModule`.
    """

    higher_is_better = False
    metric_name = "mse"

    def __init__(self, encoder: DIFFormer, lr: float = 1e-2, weight_decay: float = 5e-4,
                 task: str = "regression", compile_encoder: bool = False) -> None:
        # task comes from the data module in train.py; a classification one is refused here.
        if task != "regression":
            raise ValueError(f"the data is a {task} classification task: train it with NodeClassifier "
                             f"(the default model of train.py), not NodeRegressor")
        if encoder.lin_out.out_features != 1:
            raise ValueError(f"NodeRegressor predicts one value per node: the encoder needs out_channels=1, "
                             f"got {encoder.lin_out.out_features}")
        super().__init__(encoder, lr, weight_decay, compile_encoder)
        self.mse = torch.nn.ModuleDict({split: MeanSquaredError() for split in EVALUATED})
        self.all_pairs = torch.nn.ModuleDict({split: MeanMetric() for split in EVALUATED})
        self.register_buffer("test_all_pairs_at_best_val", torch.tensor(float("nan")))

    def forward(self, batch: Data) -> Tensor:
        return super().forward(batch).squeeze(-1)

    def training_step(self, batch: Data, batch_idx: int) -> Tensor:
        loss = F.mse_loss(self(batch), batch.y)
        self.log("train/mse", loss, batch_size=batch.num_nodes, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Data, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update_metrics(batch, EVALUATED[dataloader_idx])

    def on_validation_epoch_end(self) -> None:
        (val, _), (test, test_all_pairs) = (self._log_metrics(split) for split in EVALUATED)
        if self.record_best(val, test):
            self.test_all_pairs_at_best_val.fill_(test_all_pairs)

    def test_step(self, batch: Data, batch_idx: int) -> None:
        self._update_metrics(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _update_metrics(self, batch: Data, split: str) -> None:
        prediction = self.evaluate(batch).squeeze(-1)
        graphs = batch.get("batch")
        graphs = graphs if graphs is not None else torch.zeros_like(batch.y, dtype=torch.long)
        self.mse[split].update(prediction, batch.y)
        self.all_pairs[split].update(all_pairs_mse(prediction, batch.y, graphs))

    def _log_metrics(self, split: str) -> Tuple[Tensor, Tensor]:
        """Logs and resets ``split``'s per-node and all-pairs MSE; returns both."""
        mse, all_pairs = self.mse[split].compute(), self.all_pairs[split].compute()
        self.log(f"{split}/mse", mse, prog_bar=split == "val", add_dataloader_idx=False)
        self.log(f"{split}/mse_all_pairs", all_pairs, add_dataloader_idx=False)
        self.mse[split].reset()
        self.all_pairs[split].reset()
        return mse, all_pairs
