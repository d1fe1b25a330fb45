"""The reference's stopping rule for spatio-temporal runs: a budget of non-improving epochs in total."""
import math
from typing import Any, Dict, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from difformer_lightning import NodeRegressor


class CumulativeEarlyStopping(pl.Callback):
    """Stops a fit once ``patience`` validation epochs in total have not improved ``monitor``.

    The reference's ``spatial-temporal/main.py`` counts every epoch whose validation cost is not a new
    best (strictly lower) and never resets the count on improvement: it stops after ``patience`` such
    epochs in all, which may be soon after the best epoch. Lightning's ``EarlyStopping`` counts
    *consecutive* epochs (the count resets at each improvement), so this rule needs its own callback; use
    ``EarlyStopping`` for the standard protocol. The count and the best value are checkpointed, so a
    resumed fit stops where the uninterrupted one would.

    Args:
        monitor: a logged validation metric (e.g. ``val/mse_all_pairs``).
        patience: non-improving epochs allowed in total (the reference's ``--early_stopping``, 20).
        mode: ``"min"`` or ``"max"``.

    Raises:
        ValueError: ``patience < 1`` or an unknown ``mode``; at the first validation, ``monitor`` not logged
            (the message lists what was).
    """

    def __init__(self, monitor: str, patience: int = 20, mode: Literal["min", "max"] = "min") -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.patience, self.mode = monitor, patience, mode
        self.best = math.inf if mode == "min" else -math.inf
        self.non_improving = 0

    def on_fit_start(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
        if isinstance(module, NodeRegressor) and self.monitor != f"val/{module.objective}":
            rank_zero_warn(f"CumulativeEarlyStopping monitors {self.monitor} but the model selects its epoch on "
                           f"val/{module.objective} (model.objective): stopping and selection follow different "
                           f"metrics; set the callback's monitor to val/{module.objective}")

    def on_validation_end(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ValueError(f"CumulativeEarlyStopping monitors {self.monitor!r}, which was not logged; logged: "
                             f"{', '.join(sorted(metrics)) or 'nothing'}")
        value = float(metrics[self.monitor])
        if value < self.best if self.mode == "min" else value > self.best:
            self.best = value
        else:
            self.non_improving += 1
        # every rank sees the same synced metric; the decision is still reduced so ranks stop together
        stop = trainer.strategy.reduce_boolean_decision(self.non_improving >= self.patience, all=False)
        if stop and not trainer.should_stop:
            trainer.should_stop = True
            rank_zero_info(f"CumulativeEarlyStopping: {self.non_improving} epochs in total without a better "
                           f"{self.monitor} (best {self.best:.6g}): stopping after epoch {trainer.current_epoch}")

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best, "non_improving": self.non_improving, "monitor": self.monitor,
                "patience": self.patience}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.non_improving = int(state_dict["non_improving"])
