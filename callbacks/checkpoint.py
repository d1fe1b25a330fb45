"""The checkpoints a resumable run needs: the newest state and the best validation epoch."""
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from difformer_lightning.checkpoint import CheckpointError
from difformer_lightning.encoder_module import EncoderModule
from difformer_lightning.io import make_writable_folder, publish, staging_path

LAST = "last.ckpt"
BEST = "best.ckpt"


class Checkpoint(ModelCheckpoint):
    """Keeps two files in ``dirpath``:

    * ``last.ckpt``, always the run's newest state (what ``--ckpt_path last`` resumes): written at the end
      of every ``every_n_epochs``-th epoch (after its validation), when training stops, and, with
      ``every_n_train_steps`` or ``train_time_interval``, mid-epoch too. Never at an epoch's last batch: that
      state is saved after the epoch's validation, so a run killed while validating resumes from the batch
      before and validates, exactly as an uninterrupted run did.
    * ``best.ckpt``, the state after the validation with the best metric so far (the module's model
      selection, ``EncoderModule.best_step``; ``train.py test``/``predict`` evaluate it by default).

    ``train.py`` fixes ``dirpath`` to ``<run folder>/checkpoints`` so a resumed run finds them (Lightning
    would pick a new ``version_N`` folder per run). Files are written through the Trainer's checkpoint IO
    (``train.py`` gives it :class:`difformer_lightning.checkpoint.AtomicCheckpointIO`: a temporary name, then
    a rename). A ``ModelCheckpoint`` subclass, not a plain callback, because Lightning resolves
    ``ckpt_path="last"`` only through its ``ModelCheckpoint`` callbacks (their ``_find_last_checkpoints``, in
    ``_CheckpointConnector._parse_ckpt_path``) and ``ckpt_path="best"`` through ``trainer.checkpoint_callback``'s
    ``best_model_path``: no public hook lets another callback name those files. Its own triggers are off (the
    hooks below replace them); every save goes through the public ``Trainer.save_checkpoint``. The resume tests
    (``tests/test_long_runs.py``: "Restored all states" from ``--ckpt_path last``) fail if that changes.
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_train_steps: Optional[int] = None,
                 train_time_interval: Optional[timedelta] = None, every_n_epochs: int = 1,
                 save_weights_only: bool = False, verbose: bool = False) -> None:
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 0:
                raise ValueError(f"checkpoint.{name} must be >= 0, got {value}")
        # Lightning's own triggers stay off (its hooks are replaced below): no top-k, no save_last.
        super().__init__(dirpath=dirpath, filename=Path(LAST).stem, monitor=None, save_top_k=0,
                         save_weights_only=save_weights_only, verbose=verbose)
        self.step_interval, self.time_interval = every_n_train_steps or 0, train_time_interval
        self.epoch_interval = every_n_epochs
        self._last_saved_step, self._last_time, self._best_saved_step = -1, time.monotonic(), -1

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:  # found now, not when the first save fails an epoch later
            folder = Path(self.dirpath)
            try:
                make_writable_folder(folder)
            except OSError as error:
                raise CheckpointError(f"the checkpoint folder {folder} is not writable ({error.strerror}): pass a "
                                      f"writable --checkpoint.dirpath or --trainer.default_root_dir") from error

    def _path(self, name: str) -> Path:
        return Path(self.dirpath) / name

    def _save_last(self, trainer: "pl.Trainer") -> None:
        trainer.save_checkpoint(self._path(LAST), self.save_weights_only)
        self.last_model_path, self._last_saved_step, self._last_time = str(self._path(LAST)), trainer.global_step, \
            time.monotonic()

    def _due_mid_epoch(self, trainer: "pl.Trainer") -> bool:
        if self.step_interval and trainer.global_step % self.step_interval == 0:
            return True
        if self.time_interval is not None:
            # rank 0's clock decides for every rank: saving is a collective
            return trainer.strategy.broadcast(time.monotonic() - self._last_time >= self.time_interval.total_seconds())
        return False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if not last_of_epoch and trainer.global_step != self._last_saved_step and self._due_mid_epoch(trainer):
            self._save_last(trainer)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        epoch_end = trainer.is_last_batch
        if epoch_end and (trainer.current_epoch + 1) % max(self.epoch_interval, 1) == 0 and self.epoch_interval:
            self._save_last(trainer)
        if isinstance(pl_module, EncoderModule) and int(pl_module.best_step) == trainer.global_step \
                and self._best_saved_step != trainer.global_step:  # this validation found a new best
            self._save_best(trainer, saved_now=self._last_saved_step == trainer.global_step)

    def _save_best(self, trainer: "pl.Trainer", saved_now: bool) -> None:
        """``best.ckpt``: a hard link to the ``last.ckpt`` just written (no second write), else its own save."""
        best = self._path(BEST)
        if saved_now and trainer.is_global_zero:
            staging = staging_path(best)
            try:
                os.link(self._path(LAST), staging)
                publish(staging, best)
            except OSError:  # no hard links on this file system
                staging.unlink(missing_ok=True)
                saved_now = False
        saved_now = trainer.strategy.broadcast(saved_now)
        if not saved_now:
            trainer.save_checkpoint(best, self.save_weights_only)
        trainer.strategy.barrier()
        self.best_model_path, self._best_saved_step = str(best), trainer.global_step

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # An epoch without validation (check_val_every_n_epoch, no validation data) ends here.
        due = self.epoch_interval and (trainer.current_epoch + 1) % self.epoch_interval == 0
        if due and trainer.global_step != self._last_saved_step:
            self._save_last(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Training stopped (max_steps, early stopping, the last epoch): last.ckpt is the final state.
        if trainer.global_step != self._last_saved_step:
            self._save_last(trainer)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Nothing is saved on an exception: the state then may be the cause (NonFiniteGuard) or half-updated.
        An interrupted fit (Ctrl-C, SIGINT) says where it stopped, what ``last.ckpt`` holds and how to resume
        (``train.py`` then exits with 130)."""
        if isinstance(exception, KeyboardInterrupt) and trainer.state.fn == "fit":
            saved = (f"{self._path(LAST)} holds step {self._last_saved_step}" if self._last_saved_step >= 0 else
                     f"{self._path(LAST)} holds the state written before this process (if any)"
                     if self._path(LAST).is_file() else "no checkpoint was written yet")
            rank_zero_info(f"fit interrupted at epoch {trainer.current_epoch}, step {trainer.global_step}; {saved}. "
                           f"Resume: the same command with --ckpt_path last.")
