"""Stop at the first NaN or inf loss or gradient, before it reaches the weights."""
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or inf loss or gradient."""


class NonFiniteGuard(pl.Callback):
    """Raises :class:`NonFiniteError` when a step's loss or gradient holds a NaN or inf, before
    the optimiser applies it: the weights and every checkpoint written so far stay finite, and
    the message names the step and the last good checkpoint to resume from. Under DDP the ranks
    agree first (a NaN on one rank stops all of them), so none is left waiting.

    A loss that explodes without becoming NaN (an epoch's training loss above ``explosion`` times the
    lowest so far) is reported with a warning naming both values and the usual remedy.
    """

    def __init__(self, explosion: float = 1e3) -> None:
        if explosion <= 1:
            raise ValueError(f"explosion must be > 1 (a factor over the lowest epoch loss), got {explosion}")
        self.explosion = explosion
        self._lowest: Optional[float] = None
        self._warned = False

    def on_train_epoch_end(self, trainer, module) -> None:
        value = trainer.callback_metrics.get("train/loss", trainer.callback_metrics.get("train/mse"))
        if value is None or not torch.isfinite(value):
            return
        value = float(value)
        if self._lowest is not None and value > self.explosion * max(self._lowest, 1e-12) and not self._warned:
            self._warned = True
            rank_zero_warn(f"the training loss rose from {self._lowest:.4g} to {value:.4g} by epoch "
                           f"{trainer.current_epoch}: training is diverging. Usual remedies: a lower learning rate "
                           f"(--model.lr, also when resuming), gradient clipping (--trainer.gradient_clip_val)")
        self._lowest = value if self._lowest is None else min(self._lowest, value)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._bad_loss: Optional[float] = None
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer, module, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            self._bad_loss = float(loss.detach())

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        named = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
        bad_grads = []
        if named:
            finite = torch.stack([torch.isfinite(grad).all() for _, grad in named]).tolist()  # one device sync
            bad_grads = [name for (name, _), ok in zip(named, finite) if not ok]
        local = self._bad_loss is not None or bool(bad_grads)
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        where = (f"epoch {trainer.current_epoch}, batch {self._batch_idx}, "
                 f"optimizer step {trainer.global_step + 1}")
        what = []
        if self._bad_loss is not None:
            what.append(f"loss {self._bad_loss}")
        if bad_grads:
            what.append(f"non-finite gradients in {', '.join(bad_grads[:5])}{' ...' if len(bad_grads) > 5 else ''}")
        if not what:
            what.append("a NaN or inf on another rank")
        last = _last_checkpoint(trainer)
        raise NonFiniteError(
            f"training stopped at {where}: {'; '.join(what)}. The weights were not updated with it. "
            + (f"Last good checkpoint: {last} (resume with --ckpt_path {last}). " if last else "No checkpoint was "
               "saved yet. ")
            + "Usual remedies: a lower learning rate, bf16-mixed instead of 16-mixed, gradient clipping "
              "(--trainer.gradient_clip_val).")


def _last_checkpoint(trainer) -> Optional[str]:
    paths = [path for callback in trainer.checkpoint_callbacks
             for path in (callback.last_model_path, callback.best_model_path) if path]
    return paths[0] if paths else None
