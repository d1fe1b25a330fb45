"""Lightning's ModelCheckpoint with the defaults a resumable run needs, written atomically."""
from datetime import timedelta
from typing import Literal, Optional, Union

import lightning.pytorch as pl
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from difformer_lightning.checkpoint import AtomicCheckpointIO


class Checkpoint(ModelCheckpoint):
    """Keeps ``last.ckpt`` (what ``--ckpt_path last`` resumes) in ``dirpath`` (``train.py`` fixes it
    to ``<run folder>/checkpoints``, so a resumed run finds it; Lightning would otherwise pick a
    new ``version_N`` folder per run).

    No metric is monitored by default: Lightning postpones every save of a monitoring checkpoint
    until the monitored metric exists, so a long first epoch would get no mid-epoch checkpoint.
    ``test@best_val`` is kept in the model itself; for the weights of the best epoch add
    ``monitor='val/best', save_top_k=1`` (or a second checkpoint callback).

    Every file is written to a temporary name and renamed (:class:`AtomicCheckpointIO`, set on the
    Trainer's strategy unless another checkpoint IO was configured). ``every_n_train_steps`` or
    ``train_time_interval`` add mid-epoch checkpoints, which resume exactly.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: Optional[str] = "best-{epoch}-{step}",
                 monitor: Optional[str] = None, mode: str = "max",
                 save_last: Optional[Union[bool, Literal["link"]]] = True, save_top_k: int = 0,
                 every_n_train_steps: Optional[int] = None, train_time_interval: Optional[timedelta] = None,
                 every_n_epochs: Optional[int] = None, save_weights_only: bool = False, verbose: bool = False) -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_last=save_last,
                         save_top_k=save_top_k, every_n_train_steps=every_n_train_steps,
                         train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
                         save_weights_only=save_weights_only, verbose=verbose)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)
