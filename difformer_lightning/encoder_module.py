"""What every LightningModule around a DIFFormer encoder shares."""
import warnings

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch_geometric.data import Data

from .checkpoint import check_compatible, gather_rng_states, restore_rng_state
from .model import DIFFormer


class EncoderModule(pl.LightningModule):
    """Holds the encoder, Adam with coupled weight decay and a constant learning rate (as the
    reference), the reference's model selection (``test@best_val``: the test metric at the epoch
    of the best validation metric, kept in buffers so it survives checkpoints), and the
    checkpoint hooks: every rank's random state (dropout) for an exact resume, and a
    ``ValueError`` naming every difference when a checkpoint's model or data do not match.
    Subclasses set ``higher_is_better`` for their validation metric.

    ``compile_encoder`` compiles the encoder with ``torch.compile`` (in place, so checkpoints
    keep their parameter names). Off by default: benchmarks/step.py measured no gain on CPU
    (README, Performance). It computes the same function (compiled dropout draws other random
    numbers, so runs with dropout are not bitwise repeatable across the switch), and a
    checkpoint resumes with it on or off.
    """

    higher_is_better = True

    def __init__(self, encoder: DIFFormer, lr: float = 1e-3, weight_decay: float = 5e-4,
                 compile_encoder: bool = False) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # Keeping the encoder in hparams is deliberate: under LightningCLI it is saved as its
            # class path and arguments, so load_from_checkpoint rebuilds it without extra arguments.
            # (Lightning collects the subclass's own arguments here too.)
            warnings.filterwarnings("ignore", message="Attribute 'encoder' is an instance of `nn.Module`")
            self.save_hyperparameters()
        self.encoder = encoder
        self.register_buffer("best_val", torch.tensor(float("-inf") if self.higher_is_better else float("inf")))
        self.register_buffer("test_at_best_val", torch.tensor(float("nan")))

    def configure_model(self) -> None:
        if self.hparams.compile_encoder:
            self.encoder.compile()

    def forward(self, batch: Data) -> Tensor:
        return self.encoder(batch.x, batch.get("edge_index"), batch.get("edge_weight"), batch.get("batch"))

    def record_best(self, val: Tensor, test: Tensor) -> bool:
        """Updates and logs ``val/best`` and ``test@best_val``; True when ``val`` is a new best."""
        if self.trainer.sanity_checking:
            return False
        improved = bool(val > self.best_val) if self.higher_is_better else bool(val < self.best_val)
        if improved:
            self.best_val.fill_(val)
            self.test_at_best_val.fill_(test)
        self.log("val/best", self.best_val)
        self.log("test@best_val", self.test_at_best_val, prog_bar=True)
        return improved

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
