"""Command line: ``python train.py {fit,validate,test,predict} --config configs/X.yaml``.

A LightningCLI over a model (:class:`NodeClassifier` unless the config's ``model.class_path``
names another, such as :class:`NodeRegressor`) and any LightningDataModule that exposes
``num_features``, ``num_outputs`` and ``task`` (every module in ``datamodules``). The encoder's
input and output sizes and the task come from the data, so a config only chooses the dataset,
the encoder's hyperparameters and the Trainer's options.

A run lives in ``runs/<config name>/`` (``--trainer.default_root_dir`` moves it): CSV logs
under ``logs/``, checkpoints under ``checkpoints/`` (``last.ckpt`` and the best; options under
``--checkpoint.*``), so ``fit --ckpt_path last`` resumes an interrupted run exactly.
``predict --ckpt_path P`` writes ``predictions/logits.npy`` (``--predictions.embeddings true`` adds
``embeddings.npy``; :class:`callbacks.PredictionWriter`).
"""
import importlib
import os
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from callbacks import Checkpoint, NonFiniteGuard, PredictionWriter
from datamodules.base import ClassificationTargets
from difformer_lightning import NodeRegressor
from difformer_lightning.allocator import keep_freed_memory
from difformer_lightning.checkpoint import check_checkpoint_file

RUNS = "runs"
# ckpt_path values Lightning resolves itself ("last": newest last*.ckpt in the checkpoint folder,
# or a fresh start with a warning when there is none yet, so a requeued job can always pass it).
NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")


class DIFFormerCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": "difformer_lightning.NodeClassifier"}})
        for source, target in (("num_features", "encoder.init_args.in_channels"),
                               ("num_outputs", "encoder.init_args.out_channels"), ("task", "task")):
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite_guard")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def before_instantiate_classes(self) -> None:
        # Everything here is checked or decided before any data is loaded or a process started.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        if trainer.default_root_dir == RUNS and config.get("config"):
            trainer.default_root_dir = str(Path(RUNS) / Path(str(config.config[-1])).stem)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        if trainer.logger is None or trainer.logger is True:
            trainer.logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                              "init_args": {"save_dir": trainer.default_root_dir, "name": "logs"}}
        if self.subcommand == "predict" and config.get("return_predictions") is None:
            config.return_predictions = False  # PredictionWriter writes them; holding them all needs O(N) memory
        check_devices(trainer.accelerator, trainer.devices)
        check_model_for_data(config.model.class_path, config.data.class_path)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # Before LightningCLI reads the model's hyperparameters from an explicit checkpoint file
        # (they then replace the configured ones), so a bad file fails here with a clear message.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and ckpt_path not in NAMED_CHECKPOINTS:
            check_checkpoint_file(ckpt_path)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # --trainer.enable_checkpointing false turns the always-present Checkpoint off, instead of
        # Lightning refusing the combination.
        if config.get("enable_checkpointing") is False:
            callbacks = [callback for callback in callbacks if not isinstance(callback, Checkpoint)]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        model = self.model
        rank_zero_info(f"best val/{model.metric_name} {float(model.best_val):.4f}, "
                       f"test@best_val {float(model.test_at_best_val):.4f}")


def check_devices(accelerator, devices) -> None:
    """Raises a ``ValueError`` when ``--trainer.devices`` asks for more than this machine has."""
    if isinstance(devices, str) and devices != "auto" and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    accelerator = str(accelerator)
    uses_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if uses_gpu:
        available, unit = torch.cuda.device_count(), "GPUs"
    elif accelerator in ("cpu", "auto"):
        available, unit = os.cpu_count() or 1, "CPU cores (one process each)"
    else:
        return
    wanted = max(devices) + 1 if isinstance(devices, (list, tuple)) else devices
    if isinstance(wanted, int) and wanted > available:
        raise ValueError(f"--trainer.devices {devices} asks for {wanted} {unit.split(' ')[0]} devices but this "
                         f"machine has {available} {unit}; use --trainer.devices {available} or fewer "
                         f"(-1 takes all of them)")


def check_model_for_data(model_path: str, data_path: str) -> None:
    """Raises a ``ValueError`` when a regression data module is given a classifier or the reverse.

    Decided from the classes, before any data is loaded, where the data module's kind is known
    from its class (``ClassificationTargets`` or a class attribute ``task = "regression"``);
    otherwise the model's own check on the linked ``task`` reports it when it is built."""
    data_class = _import(data_path)
    regression_data = getattr(data_class, "task", None) == "regression"
    if not (regression_data or issubclass(data_class, ClassificationTargets)):
        return
    if issubclass(_import(model_path), NodeRegressor) != regression_data:
        kind, wanted = ("regression", "NodeRegressor") if regression_data else ("classification", "NodeClassifier")
        raise ValueError(f"{data_path} is a {kind} task but the model is {model_path}: "
                         f"use --model difformer_lightning.{wanted} (or model.class_path in the config)")


def _import(class_path: str) -> type:
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def main(args=None, **kwargs) -> DIFFormerCLI:
    # Runs write under ./runs (logs, checkpoints, the resolved config.yaml), never into the
    # source tree; a rerun overwrites the config it saved rather than refusing to start.
    keep_freed_memory()  # reuse freed activations instead of faulting fresh pages in every step
    kwargs.setdefault("trainer_defaults", {"default_root_dir": RUNS})
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return DIFFormerCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        args=args, **kwargs)


if __name__ == "__main__":
    main()
