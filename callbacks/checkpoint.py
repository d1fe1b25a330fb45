"""Lightning's ModelCheckpoint with the defaults a resumable run needs, written atomically."""
from datetime import timedelta
from typing import Optional

import lightning.pytorch as pl
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from difformer_lightning.checkpoint import AtomicCheckpointIO


class Checkpoint(ModelCheckpoint):
    """Keeps one checkpoint, ``last.ckpt`` (what ``--ckpt_path last`` resumes), replaced at the end
    of every ``every_n_epochs`` epochs and, with ``every_n_train_steps`` or ``train_time_interval``,
    mid-epoch too (those resume exactly). It lives in ``dirpath``: ``train.py`` fixes that to
    ``<run folder>/checkpoints`` so a resumed run finds it (Lightning would pick a new
    ``version_N`` folder per run).

    Every file is written to a temporary name and renamed (:class:`AtomicCheckpointIO`, set on the
    Trainer's strategy unless another checkpoint IO was configured). No metric is monitored:
    Lightning postpones every save of a monitoring checkpoint until the metric exists, so a long
    first epoch would get no mid-epoch checkpoint. ``test@best_val`` is kept in the model; for the
    weights of the best epoch add a second checkpoint, e.g. ``--trainer.callbacks+=ModelCheckpoint
    --trainer.callbacks.monitor val/best --trainer.callbacks.mode max``.
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_train_steps: Optional[int] = None,
                 train_time_interval: Optional[timedelta] = None, every_n_epochs: Optional[int] = None,
                 save_weights_only: bool = False, verbose: bool = False) -> None:
        # The latest checkpoint as top-1 of "no metric", named last: the save_last mechanism only
        # writes when a top-k checkpoint was written in the same step.
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
                         every_n_train_steps=every_n_train_steps, train_time_interval=train_time_interval,
                         every_n_epochs=every_n_epochs, save_weights_only=save_weights_only, verbose=verbose)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)
