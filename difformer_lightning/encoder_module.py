"""What every LightningModule around a DIFFormer encoder shares."""
import math
import sys
import warnings
from typing import Dict, Optional, Tuple

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
import torch
from torch import Tensor
from torch_geometric.data import Data
from torchmetrics import MeanMetric

from .checkpoint import (DATA_SLOT, OPTIMIZER_OPTIONS, check_compatible, gather_ranks, gather_rng_states, rank_state_dict,
                         restore_rng_state)
from .contracts import ExactEvaluationPlan, NodeRows, check_batch, check_data_module
from .conv import upgrade_state_dict
from .model import DIFFormer
from .streaming import Collectives, ExactStates, PassProgress, Scratch, exact_states, scratch_layout, storage_dtype


class EncoderModule(pl.LightningModule):
    """Holds the encoder, Adam with coupled weight decay and a constant learning rate (as the
    reference), the reference's model selection (``test@best_val``: the test metric at the epoch
    of the best validation metric, kept in buffers so it survives checkpoints), and the
    checkpoint hooks: every rank's random state (dropout) for an exact resume, and a
    ``ValueError`` naming every difference when a checkpoint's model or data do not match.
    Subclasses set ``higher_is_better`` for their validation metric.

    Exact evaluation: when the data module evaluates exactly (its ``evaluation_plan`` returns a plan, as
    ``RandomPartitionDataModule``'s does), every validation,
    test and prediction epoch starts with one exact forward pass over the whole graph
    (:func:`~.streaming.exact_states`: on this module's device, under the Trainer's precision, its
    chunks shared among the DDP ranks), and the evaluation batches (:class:`~.contracts.NodeRows`)
    read their nodes' final states from it. :meth:`embed` and :meth:`evaluate` give the same for any
    batch.

    ``compile_encoder`` compiles the encoder with ``torch.compile`` (in place, so checkpoints
    keep their parameter names). Off by default: benchmarks/step.py measured no gain on CPU
    (docs/performance.md). It computes the same function (compiled dropout draws other random
    numbers, so runs with dropout are not bitwise repeatable across the switch), and a
    checkpoint resumes with it on or off.
    """

    higher_is_better = True
    # state_dict entries holding this rank's own running sums within an epoch: a checkpoint saves every rank's
    # (on_save_checkpoint), as its state_dict holds rank 0's only
    per_rank_state: Tuple[str, ...] = ("train_loss.mean_value", "train_loss.weight")

    def __init__(self, encoder: DIFFormer, lr: float = 1e-3, weight_decay: float = 5e-4,
                 compile_encoder: bool = False) -> None:
        super().__init__()
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr <= 10):
            raise ValueError(f"lr must be in (0, 10], got {lr}")
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        with warnings.catch_warnings():
            # Keeping the encoder in hparams is deliberate: under LightningCLI it is saved as its
            # class path and arguments, so load_from_checkpoint rebuilds it without extra arguments.
            # (Lightning collects the subclass's own arguments here too.)
            warnings.filterwarnings("ignore", message="Attribute 'encoder' is an instance of `nn.Module`")
            self.save_hyperparameters()
        self.encoder = encoder
        self.register_buffer("best_val", torch.tensor(float("-inf") if self.higher_is_better else float("inf")))
        self.register_buffer("test_at_best_val", torch.tensor(float("nan")))
        # the global step of the best validation (callbacks.Checkpoint keeps that state as best.ckpt)
        self.register_buffer("best_step", torch.tensor(-1))
        # The epoch's training loss, a running mean weighted by each batch's training nodes. Persistent, so a
        # mid-epoch checkpoint carries the epoch's partial sums (every rank's: per_rank_state) and a resumed run
        # logs the same epoch mean as an uninterrupted one; saved with the epoch it belongs to
        # (train_loss_epoch), so one resumed from an epoch-end checkpoint (written before Lightning resets the
        # logged mean) does not carry it into the next epoch. Synchronised over ranks when logged.
        self.train_loss = MeanMetric()
        self.train_loss.persistent(True)
        self.register_buffer("train_loss_epoch", torch.tensor(-1))
        self._exact_plan: Optional[ExactEvaluationPlan] = None
        self._exact: Optional[ExactStates] = None
        self._scratch: Optional[Scratch] = None
        self._checked_batches: set = set()  # the stages whose first batch was checked against the contract
        self._restored_optimizer_options: Optional[Dict[str, float]] = None  # the checkpoint's lr, weight decay

    def configure_model(self) -> None:
        if self.hparams.compile_encoder:
            self.encoder.compile()

    def _datamodule(self):
        """The Trainer's data module, checked against the data contract; ``None`` without one (data
        passed to ``fit`` as dataloaders, or no Trainer)."""
        try:
            datamodule = self.trainer.datamodule
        except RuntimeError:  # not attached to a Trainer (Lightning's public `trainer` raises then)
            return None
        if datamodule is not None:
            check_data_module(datamodule)
        return datamodule

    def _trainer_function(self) -> Optional[str]:
        """What the Trainer is running (``'fit'``, ``'validate'``, ...), ``None`` without a Trainer."""
        try:
            return self.trainer.state.fn
        except RuntimeError:
            return None

    def setup(self, stage: str) -> None:
        datamodule = self._datamodule()
        if datamodule is None:
            return
        self.encoder.check_fits(datamodule.max_batch_nodes)
        self._exact_plan = datamodule.evaluation_plan(self.encoder)
        if self._exact_plan is not None and self._scratch is None:
            # The scratch arrays are created at the first evaluation; here, before any training step, their
            # folder is checked (exists, writable, room for them) on every rank, after rank 0 removed the
            # folders that killed runs left.
            strategy, shared = self.trainer.strategy, self._exact_plan.shared
            collectives = Collectives(rank=self.global_rank, world_size=self.trainer.world_size,
                                      all_reduce=lambda tensor: strategy.reduce(tensor, reduce_op="sum"),
                                      barrier=strategy.barrier, broadcast=strategy.broadcast, flush=shared)
            self._scratch = Scratch(self._exact_plan.scratch_dir, collectives)
            if self.global_rank == 0:
                self._scratch.remove_stale()
            self._scratch.check(self._scratch_layout())

    def forward(self, batch: Data) -> Tensor:
        return self.encoder(batch.x, batch.get("edge_index"), batch.get("edge_weight"), batch.get("batch"))

    def embed(self, batch: Data) -> Tensor:
        """Final hidden states ``[B, hidden]`` of the batch's nodes: read from the exact pass for
        :class:`~.contracts.NodeRows`, computed from the batch otherwise."""
        if isinstance(batch, NodeRows):
            if self._exact is None:
                raise RuntimeError("an exact-evaluation batch (NodeRows) arrived outside an exact pass: the data "
                                   "module's evaluation_plan() was not consulted in setup()")
            return self._exact.rows(batch.n_id).to(self.device)
        return self.encoder.diffuse(batch.x, batch.get("edge_index"), batch.get("edge_weight"), batch.get("batch"))[-1]

    def evaluate(self, batch: Data) -> Tensor:
        """The encoder's outputs for an evaluation batch (see :meth:`embed`)."""
        return self.encoder.decode(self.embed(batch))

    def _scratch_layout(self):
        """The exact pass's scratch arrays: states and values in the run's precision (16 bits under a 16-bit one)."""
        storage = storage_dtype(self.trainer.precision, self.encoder)
        return scratch_layout(self.encoder, self._exact_plan.source.num_nodes, storage)

    def _progress(self) -> Optional[PassProgress]:
        """Rank 0 reports the exact pass: in a progress bar on a terminal, else as log lines."""
        if self.global_rank != 0:
            return None
        bar = self.trainer.progress_bar_callback is not None and sys.stderr.isatty()
        return PassProgress(report=rank_zero_info, bar=bar)

    def _start_exact_pass(self) -> None:
        plan = self._exact_plan
        if plan is None:
            return
        storage = storage_dtype(self.trainer.precision, self.encoder)
        # Lightning applies the precision (autocast) around the steps only; the pass runs here, before them.
        with self.trainer.precision_plugin.forward_context():
            self._exact = exact_states(self.encoder, plan.source, plan.chunk_nodes, self._scratch, self.device,
                                       storage=storage, progress=self._progress())

    def _end_exact_pass(self) -> None:
        if self._exact is not None:
            self._exact = None
            self.trainer.strategy.barrier()  # every rank has read its rows before the next pass rewrites them

    def teardown(self, stage: str) -> None:
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

    def on_validation_epoch_start(self) -> None:
        self._start_exact_pass()

    def on_validation_end(self) -> None:
        self._end_exact_pass()

    def on_test_epoch_start(self) -> None:
        self._start_exact_pass()

    def on_test_end(self) -> None:
        self._end_exact_pass()

    def on_predict_epoch_start(self) -> None:
        self._start_exact_pass()

    def on_predict_end(self) -> None:
        self._end_exact_pass()

    def predict_step(self, batch: Data, batch_idx: int) -> Dict[str, Tensor]:
        """``{"n_id", "logits", "embeddings"}`` of the batch's predicted nodes: all of them, or its seeds
        (``seed_mask``) in neighbour-sampling batches; ``n_id`` is ``0 .. N - 1`` for a whole graph."""
        n_id = batch.get("n_id")
        if n_id is not None and n_id.numel() == 0:  # a rank's empty batch: nothing to predict
            empty = torch.zeros(0, device=self.device)
            return {"n_id": n_id, "logits": empty.view(0, self.encoder.lin_out.out_features),
                    "embeddings": empty.view(0, self.encoder.hidden_channels)}
        embeddings = self.embed(batch)
        logits = self.encoder.decode(embeddings)
        if n_id is None:
            n_id = torch.arange(embeddings.size(0), device=embeddings.device)
        seeds = batch.get("seed_mask")
        if seeds is not None:
            n_id, logits, embeddings = n_id[seeds], logits[seeds], embeddings[seeds]
        return {"n_id": n_id, "logits": logits, "embeddings": embeddings}

    def record_best(self, val: Tensor, test: Tensor) -> bool:
        """Updates and logs ``val/best`` and ``test@best_val``; True when ``val`` is a new best."""
        if self.trainer.sanity_checking:
            return False
        improved = bool(val > self.best_val) if self.higher_is_better else bool(val < self.best_val)
        if improved:
            self.best_val.fill_(val)
            self.test_at_best_val.fill_(test)
            self.best_step.fill_(self.global_step)
        # equal on every rank (computed from synced metrics): "max" over ranks returns that value exactly,
        # where the default mean could round it; syncing also keeps Lightning's DDP logging warning quiet
        self.log("val/best", self.best_val, sync_dist=True, reduce_fx="max")
        self.log("test@best_val", self.test_at_best_val, prog_bar=True, sync_dist=True, reduce_fx="max")
        return improved

    def selection_summary(self) -> str:
        """The line a fit ends with: the best validation metric and the test metric at its epoch."""
        return f"best val/{self.metric_name} {float(self.best_val):.4f}, test@best_val {float(self.test_at_best_val):.4f}"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        datamodule = self._datamodule()
        if datamodule is not None:  # what the data must match to load this checkpoint, in its own slot
            checkpoint[DATA_SLOT] = dict(datamodule.describe())
        checkpoint["rng_states"] = gather_rng_states(self.device)
        if self.per_rank_state:
            state = self.state_dict()
            checkpoint["rank_states"] = gather_ranks({name: state[name].cpu() for name in self.per_rank_state})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Runs before Lightning loads the weights: a mismatch is reported by name, not as a
        # size-mismatch traceback; the dropout random state comes back only when resuming a fit.
        # Buffers (not parameters) the checkpoint lacks, as one written before they existed or by a tool that kept
        # the weights only: their initial values, said once, not Lightning's "Missing key(s)" traceback.
        saved, parameters = checkpoint.setdefault("state_dict", {}), dict(self.named_parameters())
        upgrade_state_dict(self, saved)  # names 0.1.0 gave some weights, before they are compared
        missing = [name for name in self.state_dict() if name not in parameters and name not in saved]
        if saved and missing:
            for name in missing:
                saved[name] = self.state_dict()[name].clone()
            selection = [name for name in missing if name in ("best_val", "test_at_best_val", "best_step")]
            rank_zero_info(f"the checkpoint has no {', '.join(missing)} (written by an earlier version, or weights "
                           f"only): they start from their initial values"
                           + ("; model selection (test@best_val) starts afresh" if selection else ""))
        datamodule = self._datamodule()
        fitting = self._trainer_function() == "fit"
        data = datamodule.describe() if datamodule is not None else None
        check_compatible(checkpoint, self.hparams, self.state_dict(), data, fitting)
        if fitting and "optimizer_states" in checkpoint:
            self._restored_optimizer_options = {key: checkpoint.get("hyper_parameters", {}).get(key)
                                                for key in OPTIMIZER_OPTIONS}
        if fitting and "rng_states" in checkpoint:
            restore_rng_state(checkpoint["rng_states"], self.global_rank, self.device)
        if fitting and "rank_states" in checkpoint:
            checkpoint["state_dict"].update(rank_state_dict(checkpoint["rank_states"], self.global_rank,
                                                            self.trainer.world_size))

    def _check_first_batch(self, batch, stage: str) -> None:
        """A stage's first batch in this process, checked against the data contract before it is used."""
        if stage in self._checked_batches:
            return
        self._checked_batches.add(stage)
        datamodule = self._datamodule()
        task = self.hparams.get("task", "regression")
        num_nodes = datamodule.num_nodes if datamodule is not None else None
        check_batch(batch, self.encoder.lin_in.in_features, self.encoder.lin_out.out_features, task, num_nodes,
                    f"the first {stage} batch")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._check_first_batch(batch, "training")

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(batch, "validation")

    def on_test_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(batch, "test")

    def on_predict_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check_first_batch(batch, "prediction")

    def on_train_epoch_start(self) -> None:
        if int(self.train_loss_epoch) != self.current_epoch:
            self.train_loss.reset()
            self.train_loss_epoch.fill_(self.current_epoch)

    def log_train_loss(self, name: str, loss: Tensor, weight) -> None:
        """Adds a batch's loss, weighted by ``weight`` (its training nodes; 0 for a batch without any), to the
        epoch's mean and logs that mean as ``name`` at the epoch's end. Every rank calls it every step."""
        self.train_loss.update(loss.detach(), weight=weight)
        self.log(name, self.train_loss, on_step=False, on_epoch=True, prog_bar=True)

    def on_train_start(self) -> None:
        # A resumed fit restores the optimiser's state, its learning rate and weight decay included (as a
        # schedule left them). Where this run sets another lr or weight decay than the checkpoint's run did (a
        # lower learning rate after a divergence), the run's own wins, and the change is said; otherwise the
        # restored state is left as it is, so a schedule resumes exactly. A fresh fit restored nothing.
        restored, self._restored_optimizer_options = self._restored_optimizer_options, None
        if restored is None:
            return
        for key, before in restored.items():
            now = self.hparams.get(key)
            if before is None or now is None or before == now:
                continue
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    if key in group:
                        rank_zero_info(f"optimizer {key}: {group[key]} (restored from the checkpoint) -> {now} "
                                       f"(this run)")
                        group[key] = now
                        if key == "lr" and "initial_lr" in group:  # a schedule's base learning rate too
                            group["initial_lr"] = now
            for config in self.trainer.lr_scheduler_configs:
                if key == "lr" and hasattr(config.scheduler, "base_lrs"):
                    config.scheduler.base_lrs = [now] * len(config.scheduler.base_lrs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The reference's optimiser: Adam with coupled weight decay, at ``lr`` and ``weight_decay``. ``train.py``
        replaces it with the one named by ``--optimizer`` (and ``--lr_scheduler``), LightningCLI's forms, whose
        lr and weight decay are then this module's ``lr`` and ``weight_decay`` (one value each)."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
