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
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks import Checkpoint, NonFiniteGuard, PredictionWriter
from difformer_lightning import NodeRegressor
from difformer_lightning.allocator import keep_freed_memory
from difformer_lightning.checkpoint import OPTIMIZER_OPTIONS, AtomicCheckpointIO, check_checkpoint_file
from difformer_lightning.contracts import check_data_module

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
        # Checkpoint's options, not as a callback key: instantiate_trainer adds it unless checkpointing is off.
        parser.add_class_arguments(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite_guard")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def before_instantiate_classes(self) -> None:
        # Everything here is checked or decided before any data is loaded or a process started.
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        for key, value in getattr(self, "_explicit_optimizer", {}).items():
            config.model.init_args[key] = value
        if trainer.default_root_dir == RUNS and config.get("config"):
            trainer.default_root_dir = str(Path(RUNS) / Path(str(config.config[-1])).stem)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        if trainer.logger is None or trainer.logger is True:
            # every row written as it is logged: a killed run loses none of what it reported
            trainer.logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                              "init_args": {"save_dir": trainer.default_root_dir, "name": "logs",
                                            "flush_logs_every_n_steps": 1}}
        if self.subcommand == "predict" and config.get("return_predictions") is None:
            config.return_predictions = False  # PredictionWriter writes them; holding them all needs O(N) memory
        check_devices(trainer.accelerator, trainer.devices)
        check_model_for_data(config.model.class_path, config.data.class_path)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # With an explicit --ckpt_path FILE, LightningCLI then replaces the model's settings by the file's;
        # optimiser settings given on this command line (a lower --model.lr after a divergence) win again in
        # before_instantiate_classes.
        given = [str(arg).split("=", 1)[0] for arg in (args if args is not None else sys.argv[1:])]
        subcommand = self.config.get("subcommand")
        self._explicit_optimizer = {}
        if subcommand:
            for key in OPTIMIZER_OPTIONS:
                if f"--model.{key}" in given or f"--model.init_args.{key}" in given:
                    self._explicit_optimizer[key] = self.config[subcommand].model.init_args[key]
        # Before LightningCLI reads the model's hyperparameters from an explicit checkpoint file
        # (they then replace the configured ones), so a bad file fails here with a clear message.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and ckpt_path not in NAMED_CHECKPOINTS:
            check_checkpoint_file(ckpt_path)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """The Trainer with the run's Checkpoint (unless ``--trainer.enable_checkpointing false``) and
        atomic checkpoint files (unless a checkpoint IO plugin was configured)."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer = config["trainer"]
        callbacks = trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if trainer.get("enable_checkpointing") is not False:
            callbacks.append(config["checkpoint"])
        plugins = trainer.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(callbacks=callbacks, plugins=plugins, **kwargs)

    def after_fit(self) -> None:
        model = self.model
        rank_zero_info(f"best val/{model.metric_name} {float(model.best_val):.4f}, "
                       f"test@best_val {float(model.test_at_best_val):.4f}")


def check_devices(accelerator, devices) -> None:
    """Raises a ``ValueError`` when ``--trainer.devices`` asks for more GPUs than this machine has; more CPU
    processes than cores only get a warning (they share the cores, which is slower but correct, and how
    DDP is tested on a small machine)."""
    if isinstance(devices, str) and devices != "auto" and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    accelerator = str(accelerator)
    uses_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    wanted = max(devices) + 1 if isinstance(devices, (list, tuple)) else devices
    if not isinstance(wanted, int):
        return
    if uses_gpu and wanted > torch.cuda.device_count():
        available = torch.cuda.device_count()
        raise ValueError(f"--trainer.devices {devices} asks for {wanted} GPU devices but this machine has "
                         f"{available} GPUs; use --trainer.devices {available} or fewer (-1 takes all of them)")
    if not uses_gpu and accelerator in ("cpu", "auto") and wanted > (os.cpu_count() or 1):
        rank_zero_warn(f"--trainer.devices {devices} starts {wanted} CPU processes on {os.cpu_count()} cores: they "
                       f"share the cores (correct, but each runs slower)")


def check_model_for_data(model_path: str, data_path: str) -> None:
    """Raises before any data is loaded: a ``TypeError`` naming what a data module class lacks of the data
    contract, a ``ValueError`` when a regression data module is given a classifier or the reverse
    (from the class's ``task_family``; the model's own check on the linked ``task`` backs it up)."""
    data_class = _import(data_path)
    check_data_module(data_class)
    regression_data = getattr(data_class, "task_family", "classification") == "regression"
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
