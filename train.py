"""Command line: ``python train.py {fit,validate,test,predict} --config configs/X.yaml``.

A LightningCLI over a model (:class:`NodeClassifier` unless the config's ``model.class_path``
names another, such as :class:`NodeRegressor`) and any LightningDataModule that meets the data
contract (:class:`difformer_lightning.contracts.DataContract`; every module in ``datamodules``). The
encoder's input and output sizes and the task come from the data, so a config only chooses the
dataset, the encoder's hyperparameters and the Trainer's options. A class of the user's own
(``data.class_path: my_data.MyData``) imports from the folder ``train.py`` is run from.

One run, one folder: ``fit`` writes into the first free one of ``runs/<config name>``,
``runs/<config name>-2``, ... (``--trainer.default_root_dir`` chooses it), with the run's model, data and
seed settings in ``run.yaml``, CSV logs under ``logs/`` and checkpoints under ``checkpoints/``:
``last.ckpt`` (that run's newest state) and ``best.ckpt`` (its best validation; options under
``--checkpoint.*``). ``fit --ckpt_path last`` resumes the newest run with the same settings exactly.
``test``, ``validate`` and ``predict`` use the newest run with the same settings and, by default, its
``best.ckpt`` (``--ckpt_path best``), saying which file and epoch they evaluate; ``--ckpt_path last`` or a
file chooses another. ``predict`` writes ``predictions/logits.npy`` (``--predictions.embeddings true``
adds ``embeddings.npy``; :class:`callbacks.PredictionWriter`).
"""
import importlib
import inspect
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks import Checkpoint, NonFiniteGuard, PredictionWriter
from callbacks.checkpoint import BEST
from difformer_lightning import NodeRegressor
from difformer_lightning.allocator import keep_freed_memory
from difformer_lightning.checkpoint import (OPTIMIZER_OPTIONS, AtomicCheckpointIO, check_checkpoint_content,
                                           check_checkpoint_file, checkpoint_position)
from difformer_lightning.contracts import check_data_module
from difformer_lightning.io import atomic_file

RUNS = "runs"


class UsageError(ValueError):
    """A command line that cannot run as given (an option out of range, settings no run has, a model for other
    data): raised before any data is loaded or any process started. Run as a script, ``train.py`` prints its
    message as ``train.py: error: ...`` and exits with 2, as for a bad argument, without a traceback."""
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
        if self.subcommand == "fit":
            check_validation_schedule(trainer.check_val_every_n_epoch, trainer.max_epochs, trainer.limit_val_batches)
            early_stopping_at_validation_end(trainer.callbacks)
        for key, value in getattr(self, "_explicit_optimizer", {}).items():
            config.model.init_args[key] = value
        one_learning_rate(config, getattr(self, "_given", []))
        for name, source in (("in_channels", "num_features"), ("out_channels", "num_outputs")):
            if any(arg in getattr(self, "_given", []) for arg in (f"--model.encoder.init_args.{name}",
                                                                   f"--model.init_args.encoder.init_args.{name}")):
                raise UsageError(f"--model.encoder.init_args.{name} is set from the data (its {source}); remove it "
                                 f"from the command line (a data module of your own sets {source})")
        if trainer.default_root_dir == RUNS:  # not chosen by the user: one run, one folder
            name = Path(str(config.config[-1])).stem if config.get("config") else "run"
            trainer.default_root_dir = str(run_folder(Path(RUNS) / name, run_settings(config), self.subcommand,
                                                      config.get("ckpt_path")))
        root = Path(trainer.default_root_dir)
        if self.subcommand == "fit" and config.get("ckpt_path") == "last" and _STARTED.get("created"):
            config.ckpt_path = None  # a new run (said why above): nothing to restore, no Lightning hint about it
        _STARTED.setdefault("folder", root)
        _STARTED["versions"] = set(root.glob("**/version_*")) if root.is_dir() else set()
        if self.subcommand in ("validate", "test", "predict") and config.get("ckpt_path") in (None, "best"):
            config.ckpt_path = str(best_checkpoint(Path(trainer.default_root_dir)))
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        if trainer.logger is None or trainer.logger is True:
            # every row written as it is logged: a killed run loses none of what it reported. A fit logs into
            # <run>/logs; validate/test/predict into <run>/eval/<subcommand>, apart from the fit's curves (which
            # plot.py draws)
            save_dir, name = ((trainer.default_root_dir, "logs") if self.subcommand == "fit" else
                              (str(Path(trainer.default_root_dir) / "eval"), self.subcommand))
            trainer.logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                              "init_args": {"save_dir": save_dir, "name": name, "flush_logs_every_n_steps": 1}}
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
        self._given = given
        subcommand = self.config.get("subcommand")
        self._explicit_optimizer = {}
        if subcommand:
            for key in OPTIMIZER_OPTIONS:
                if f"--model.{key}" in given or f"--model.init_args.{key}" in given:
                    self._explicit_optimizer[key] = self.config[subcommand].model.init_args[key]
        # Before LightningCLI reads the model's hyperparameters from an explicit checkpoint file
        # (they then replace the configured ones), so a bad file fails here with a clear message.
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and ckpt_path not in NAMED_CHECKPOINTS:
            check_checkpoint_file(ckpt_path)
            # LightningCLI reads it as a dict next (a bare tensor saved as .ckpt failed with AttributeError);
            # memory-mapped: the tensors are not read
            check_checkpoint_content(torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True),
                                     ckpt_path)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            reason = union_error_reason(str(error))
            if reason is None:
                raise
            raise UsageError(reason) from None

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
        rank_zero_info(self.model.selection_summary())


def one_learning_rate(config, given: List[str]) -> None:
    """One value of the learning rate and weight decay: the model's ``lr``/``weight_decay`` and those of an
    optimiser named with LightningCLI's ``--optimizer`` (which then replaces the model's Adam) are made equal.

    An optimiser's value set on the command line or in the config (one that differs from its class's default)
    wins and becomes the model's (so checkpoints, run folders and the resume rule see what trains); one left at
    its class's default takes the model's (the preset's lr, not AdamW's 0.001). Both set to different values:
    a ``ValueError`` naming both. ``--lr_scheduler`` without ``--optimizer`` schedules the model's own Adam
    (LightningCLI alone would ignore it)."""
    from jsonargparse import Namespace

    model = config.model.get("init_args")
    optimizer = config.get("optimizer")
    if model is None or not all(key in model for key in OPTIMIZER_OPTIONS):
        return  # a model of the user's own without these options: LightningCLI's behaviour as it is
    if optimizer is None:
        if config.get("lr_scheduler") is not None:
            config.optimizer = Namespace(class_path="torch.optim.Adam",
                                         init_args=Namespace(lr=model.lr, weight_decay=model.weight_decay))
        return
    arguments = optimizer.get("init_args") or Namespace()
    try:
        defaults = inspect.signature(_import(optimizer.class_path)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        defaults = {}
    for key in sorted(OPTIMIZER_OPTIONS):
        if key not in arguments:
            continue
        default = defaults[key].default if key in defaults else inspect.Parameter.empty
        optimizer_set = f"--optimizer.{key}" in given or f"--optimizer.init_args.{key}" in given \
            or arguments[key] != default
        model_set = f"--model.{key}" in given or f"--model.init_args.{key}" in given
        if optimizer_set and model_set and arguments[key] != model[key]:
            raise UsageError(f"--model.{key} {model[key]} and --optimizer.{key} {arguments[key]} disagree: give the "
                             f"{key} once (--optimizer.{key} when naming an optimiser)")
        if optimizer_set and not model_set:
            model[key] = arguments[key]
        else:
            arguments[key] = model[key]


def union_error_reason(message: str) -> Optional[str]:
    """The reason inside jsonargparse's "Does not validate against any of the Union subtypes" error (what it
    raises when a data module or model given as ``class_path`` refuses its arguments), as
    ``"<class path>: <the class's own message>"``; ``None`` for another message. jsonargparse lists every
    member of the Union it tried (``LightningDataModule``, ``NoneType``) and the value as a Namespace; the
    class's own error is the first listed."""
    if "Does not validate against any of the Union subtypes" not in message:
        return None
    reason = re.search(r"Errors:\s*\n\s*- (.+)", message)
    if reason is None:
        return None
    class_path = re.search(r"class_path='([^']+)'", message)
    return f"{class_path.group(1) + ': ' if class_path else ''}{reason.group(1).strip()}"


def check_validation_schedule(every_n_epochs, max_epochs, limit_val_batches) -> None:
    """Raises a ``ValueError`` for ``--trainer.check_val_every_n_epoch`` below 1 (Lightning fails later with a
    division by zero) and warns when it exceeds ``max_epochs``: the fit would then never validate, write no
    ``best.ckpt`` and report no ``test@best_val``."""
    if every_n_epochs is None:
        return
    if every_n_epochs < 1:
        raise UsageError(f"--trainer.check_val_every_n_epoch must be >= 1 (validate every that many epochs), got "
                         f"{every_n_epochs}; to train without validation pass --trainer.limit_val_batches 0")
    if max_epochs is not None and max_epochs >= 0 and every_n_epochs > max_epochs and limit_val_batches != 0:
        rank_zero_warn(f"--trainer.check_val_every_n_epoch {every_n_epochs} is above --trainer.max_epochs {max_epochs}: "
                       f"this fit never validates, so it writes no best.ckpt and test@best_val stays NaN; lower it")


def early_stopping_at_validation_end(callbacks) -> None:
    """Lightning's ``EarlyStopping`` (or a subclass) without ``check_on_train_epoch_end`` gets ``False``: it then
    decides after each validation, when the monitored metric is logged. Its default (``None``: at the training
    epoch's end when validating every epoch) makes a fit resumed from an epoch-end checkpoint stop with
    "Early stopping conditioned on metric ... which is not available" (Lightning ends the restored epoch
    without its validation); an uninterrupted run stops at the same epoch either way."""
    from lightning.pytorch.callbacks import EarlyStopping

    for callback in callbacks if isinstance(callbacks, (list, tuple)) else [callbacks] if callbacks else []:
        class_path = callback.get("class_path") if hasattr(callback, "get") else None
        if not class_path:
            continue
        try:
            is_early_stopping = issubclass(_import(class_path), EarlyStopping)
        except (ImportError, AttributeError, ValueError):
            continue  # reported by LightningCLI when it builds the callback
        if is_early_stopping and callback.get("init_args") is not None \
                and callback.init_args.get("check_on_train_epoch_end") is None:
            callback.init_args["check_on_train_epoch_end"] = False


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
        raise UsageError(f"--trainer.devices {devices} asks for {wanted} GPU devices but this machine has "
                         f"{available} GPUs; use --trainer.devices {available} or fewer (-1 takes all of them)")
    if not uses_gpu and accelerator in ("cpu", "auto") and wanted > (os.cpu_count() or 1):
        rank_zero_warn(f"--trainer.devices {devices} starts {wanted} CPU processes on {os.cpu_count()} cores: they "
                       f"share the cores (correct, but each runs slower)")


SETTINGS = "run.yaml"  # a run folder's model, data and seed settings
RUN_DIR_ENV = "DIFFORMER_RUN_DIR"  # "<pid>:<folder>": the folder rank 0 chose, for the ranks it starts


# Settings that say where or how fast a run works, not what it trains: two runs that differ only in these are
# the same run (a data root given by $DIFFORMER_DATA or on the command line, more loader workers, another
# memory budget).
LOCAL_SETTINGS = {"data.root", "data.num_workers", "data.scratch_dir", "data.store_check", "data.pin_memory",
                  "model.compile_encoder", "model.encoder.sigmoid_block_bytes"}


def run_settings(config) -> str:
    """What defines a run (model, data, seed, a named optimiser and schedule; not the Trainer's options such as
    max_epochs), as YAML."""
    settings = {key: config.get(key) for key in ("model", "data", "seed_everything", "optimizer", "lr_scheduler")}
    as_dicts = {key: value.as_dict() if hasattr(value, "as_dict") else value for key, value in settings.items()}
    return yaml.safe_dump(as_dicts, sort_keys=True)


def _flat_settings(settings: str) -> dict:
    def flatten(value, prefix):
        if isinstance(value, dict):
            return {k: v for key, item in value.items()
                    for k, v in flatten(item, prefix if key == "init_args" else f"{prefix}{key}.").items()}
        return {prefix[:-1]: value}

    try:
        loaded = yaml.safe_load(settings)
    except yaml.YAMLError:
        loaded = None
    return flatten(loaded if isinstance(loaded, dict) else {"run.yaml": "<unreadable>"}, "")


def setting_changes(saved: str, current: str) -> List[Tuple[str, object, object]]:
    """``(key, there, here)`` for every setting that defines a run (all but :data:`LOCAL_SETTINGS`) and differs
    between two ``run.yaml`` texts. A group given by class (``optimizer``, ``lr_scheduler``, ``data``, an encoder)
    whose class differs is one change, not one per argument of each class."""
    unset = "<not set>"
    # a setting that is None is the same as one not written (run.yaml of an earlier version lacks newer keys)
    before, now = ({key: value for key, value in _flat_settings(text).items() if value is not None}
                   for text in (saved, current))
    changes = [(key, before.get(key, unset), now.get(key, unset)) for key in sorted(before.keys() | now.keys())
               if key not in LOCAL_SETTINGS and before.get(key, unset) != now.get(key, unset)]
    other_class = [key[:-len(".class_path")] for key, _, _ in changes if key.endswith(".class_path")]
    return [(key, there, here) for key, there, here in changes
            if not any(key.startswith(group + ".") and key != group + ".class_path" for group in other_class)]


def _phrases(changes: List[Tuple[str, object, object]]) -> List[str]:
    return [f"{key}: {there!r} there, {here!r} here" for key, there, here in changes]


def settings_differences(saved: str, current: str) -> List[str]:
    """:func:`setting_changes` as phrases: ``"model.lr: 0.005 there, 0.01 here"``."""
    return _phrases(setting_changes(saved, current))


def is_optimizer_setting(key: str) -> bool:
    """Whether a setting is one a resumed fit may change (``model.lr``, ``model.weight_decay`` and a named
    optimiser's lr and weight decay: :data:`OPTIMIZER_OPTIONS`): the run continues, with the change."""
    group, _, name = key.rpartition(".")
    return group in ("model", "optimizer") and name in OPTIMIZER_OPTIONS


def _changes(folder: Path, settings: str) -> List[Tuple[str, object, object]]:
    path = folder / SETTINGS
    return setting_changes(path.read_text(), settings) if path.is_file() else [(SETTINGS, "<missing>", "")]


def _describe_candidates(folders: List[Path], settings: str, limit: int = 5) -> str:
    lines = []
    for folder in reversed(folders[-limit:]):
        differences = _phrases(_changes(folder, settings))
        lines.append(f"  {folder}: {'; '.join(differences[:6])}{'; ...' if len(differences) > 6 else ''}")
    more = f"\n  (and {len(folders) - limit} older)" if len(folders) > limit else ""
    return "\n".join(lines) + more


def _continue_with_changes(folder: Path, settings: str, changes: List[Tuple[str, object, object]]) -> None:
    """A fit continuing ``folder`` with another lr or weight decay (``changes``, the resume rule): ``run.yaml``
    takes the new settings, so that test/predict with them find this run; said with the change."""
    if changes:
        with atomic_file(folder / SETTINGS, "w") as handle:
            handle.write(settings)
        rank_zero_info(f"{folder}: continuing with " + "; ".join(f"{key} {there!r} -> {here!r}"
                                                                 for key, there, here in changes)
                       + f" (a resumed fit may change its lr and weight decay; {SETTINGS} updated)")


# The run folder this process created for a fit, and the log folders that existed before it started: what a
# start that fails before training leaves is removed (main()).
_STARTED: dict = {}


def run_folder(base: Path, settings: str, subcommand: Optional[str], ckpt_path: Optional[str]) -> Path:
    """The run folder of a ``train.py`` call whose folder the user did not choose.

    ``fit`` starts a new run in the first free one of ``base``, ``base-2``, ``base-3``, ... (a rerun with other
    settings never mixes its checkpoints or logs with an earlier run's; simultaneous starts each take their
    own); ``fit --ckpt_path last`` continues the newest folder of this preset with the same model, data and
    seed (a requeued job) and says so, or says why it starts a new one; an explicit checkpoint file continues
    its own run's folder. ``test``/``predict``/``validate`` use the newest folder with the same settings (or
    the checkpoint's); when none has them, a ``ValueError`` lists the preset's runs and what differs.
    Settings in :data:`LOCAL_SETTINGS` (the data root, workers, memory budgets) do not count. DDP ranks started
    by Lightning inherit rank 0's choice; processes started all at once by torchrun or SLURM cannot agree on a
    new folder, so they use ``base`` itself (or pass ``--trainer.default_root_dir``)."""
    parent, _, chosen = os.environ.get(RUN_DIR_ENV, "").partition(":")
    # a DDP rank Lightning started (LOCAL_RANK >= 1, a child of rank 0): rank 0's folder. Any other process
    # that inherits the variable (a program that called main() and then runs train.py) chooses its own.
    if chosen and parent == str(os.getppid()) and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(chosen)
    if any(os.environ.get(variable) for variable in ("SLURM_PROCID", "TORCHELASTIC_RUN_ID")):
        return base
    candidates = [base] + [base.with_name(f"{base.name}-{index}") for index in range(2, 1000)]
    existing = [folder for folder in candidates if folder.exists()]
    changes = {folder: _changes(folder, settings) for folder in existing}
    same = [folder for folder in existing if not changes[folder]]
    # a fit may continue a run whose lr or weight decay this one changes (NonFiniteGuard's advice)
    resumable = [folder for folder in existing if all(is_optimizer_setting(key) for key, _, _ in changes[folder])]
    if ckpt_path not in (None, *NAMED_CHECKPOINTS):
        owner = Path(ckpt_path).resolve().parent.parent
        folder = next((f for f in existing if f.resolve() == owner), owner if subcommand != "fit" else None)
        if folder is not None:
            if subcommand == "fit" and folder in resumable:
                _continue_with_changes(folder, settings, changes[folder])
            os.environ[RUN_DIR_ENV] = f"{os.getpid()}:{folder.resolve()}"
            return folder
    if subcommand == "fit" and ckpt_path == "last" and resumable:
        folder = resumable[-1]
        rank_zero_info(f"--ckpt_path last: continuing {folder}, the newest run of this preset with these settings"
                       + (" (but for its lr or weight decay)" if changes[folder] else ""))
        _continue_with_changes(folder, settings, changes[folder])
    elif subcommand == "fit":
        folder = _new_run_folder(candidates, settings)
        if ckpt_path == "last":
            why = (f"no run of this preset has these settings:\n{_describe_candidates(existing, settings)}"
                   if existing else "no run of this preset exists yet")
            rank_zero_info(f"--ckpt_path last: starting a new run in {folder}: {why}")
    elif same:
        folder = same[-1]
    elif existing:
        raise UsageError(f"{subcommand}: no run of this preset has these settings, and evaluating another run's "
                         f"checkpoint would report a number these settings did not produce. The runs and what "
                         f"differs:\n{_describe_candidates(existing, settings)}\nPass the settings of the run to "
                         f"evaluate, its folder (--trainer.default_root_dir), or a checkpoint (--ckpt_path FILE).")
    else:
        folder = base
    os.environ[RUN_DIR_ENV] = f"{os.getpid()}:{folder.resolve()}"  # the DDP ranks Lightning starts use the same folder
    return folder


def _new_run_folder(candidates: List[Path], settings: str) -> Path:
    """Creates the first free candidate folder (``mkdir`` without ``exist_ok``: of simultaneous starts, each
    gets its own) and writes ``run.yaml`` into it."""
    for folder in candidates:
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        _STARTED.update(folder=folder, created=True)
        with atomic_file(folder / SETTINGS, "w") as handle:
            handle.write(settings)
        return folder
    raise RuntimeError(f"{candidates[0]} and {len(candidates) - 1} numbered folders beside it all exist: remove old "
                       f"runs or pass --trainer.default_root_dir")


def _has_results(folder: Path) -> bool:
    """Whether a run folder holds anything a run produced: a checkpoint, a logged row, predictions."""
    if any(folder.glob("checkpoints/*.ckpt")) or any(folder.glob("predictions/*.npy")):
        return True
    for metrics in folder.glob("**/metrics.csv"):
        with open(metrics) as handle:
            if sum(1 for _ in zip(range(2), handle)) > 1:  # a header and a row
                return True
    return False


def remove_failed_start() -> None:
    """After a ``train.py`` call failed: the run folder it created is removed when nothing was produced in it
    (the next run is not numbered past an empty folder), and so are log folders it added without a row."""
    folder = _STARTED.get("folder")
    if folder is None or not folder.is_dir():
        return
    if _STARTED.get("created") and not _has_results(folder):
        shutil.rmtree(folder, ignore_errors=True)
        return
    for version in folder.glob("**/version_*"):
        if version not in _STARTED.get("versions", set()) and version.is_dir() and not _has_results(version):
            shutil.rmtree(version, ignore_errors=True)


def best_checkpoint(run: Path) -> Path:
    """``best.ckpt`` of the run folder ``run`` (the default of ``test`` and ``predict``), said with its epoch."""
    path = run / "checkpoints" / BEST
    if not path.is_file():
        raise FileNotFoundError(f"no {BEST} in {run / 'checkpoints'}: that run has validated no epoch yet (or is "
                                f"another preset's). Pass --ckpt_path last, or the path of a checkpoint")
    position = checkpoint_position(path)
    rank_zero_info(f"evaluating {path} (epoch {position['epoch']}, global step {position['global_step']}, the run's "
                   f"best validation)")
    return path


def check_model_for_data(model_path: str, data_path: str) -> None:
    """Raises before any data is loaded: a ``TypeError`` naming what a data module class lacks of the data
    contract, a ``ValueError`` when a regression data module is given a classifier or the reverse
    (from the class's ``task_family``; the model's own check on the linked ``task`` backs it up)."""
    data_class = _import(data_path)
    check_data_module(data_class)
    regression_data = getattr(data_class, "task_family", "classification") == "regression"
    if issubclass(_import(model_path), NodeRegressor) != regression_data:
        kind, wanted = ("regression", "NodeRegressor") if regression_data else ("classification", "NodeClassifier")
        raise UsageError(f"{data_path} is a {kind} task but the model is {model_path}: "
                         f"use --model difformer_lightning.{wanted} (or model.class_path in the config)")


def _import(class_path: str) -> type:
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


class ShortErrorParser(LightningArgumentParser):
    """Reports a bad argument in a few lines (the reason first, and how to fix a class path that does not
    import), not after the whole usage text."""

    def error(self, message: str, ex: Optional[Exception] = None) -> None:
        message = str(message).strip()
        # jsonargparse lists every Union member it tried before the reason a class path failed; say the reason
        key = re.search(r'Parser key "([^"]+)"', message)
        option = f"--{key.group(1)}: " if key else ""
        failed = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message)
        bare = re.search(r"Expected a dot import path string: (\S+)", message)
        hint = ""
        if bare and not failed:  # a class name alone that is none of the known data modules / models
            message = f"{option}{bare.group(1)} is not a class this project knows: give its import path, module.Class"
            import datamodules
            own = sorted(name for name in datamodules.__all__ if isinstance(getattr(datamodules, name), type)
                         and issubclass(getattr(datamodules, name), LightningDataModule)
                         and name not in ("GraphDataModule", "NodeDataModule"))
            hint = ("\n(--data my_data.MyData for a class in my_data.py in the folder you run from; this project's "
                    f"data modules, usable by name: {', '.join(own)})")
        if failed:
            message = f"{option}cannot use {failed.group(1)}: {failed.group(2).strip()}"
            missing = re.search(r"No module named '([^']+)'", failed.group(2))
            top = failed.group(1).split(".")[0]
            if missing and missing.group(1).split(".")[0] == top:  # the class path's own module is not found
                hint = ("\nA class of your own (--data my_data.MyData) must be importable: run train.py from the "
                        "folder that holds my_data.py, or add that folder to PYTHONPATH.")
            elif missing:  # the module was found, but a package it imports is not installed
                hint = (f"\n{failed.group(1).rsplit('.', 1)[0]} was found but imports {missing.group(1)!r}, "
                        "which is not installed in this environment: install it (pip install ...) or remove the "
                        "import.")
        sys.stderr.write(f"train.py: error: {message}{hint}\n(python train.py --help lists the options)\n")
        raise SystemExit(2)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Silences what Lightning and jsonargparse print on every run that is not about the run: the
    advertisements for litlogger/litmodels, and deprecation warnings raised inside their own code (their
    fix belongs to them; nothing a user of this project can act on)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    for message in (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                    # --optimizer: what it is for (README, "Optimiser and schedule")
                    r"`\w+\.configure_optimizers` will be overridden by",
                    r"(?s).*skip_none parameter was deprecated",
                    r"(?s).*``instantiate_classes`` was deprecated", r"(?s).*By default only one JsonargparseDeprecation"):
        warnings.filterwarnings("ignore", message=message)


def main(args=None, **kwargs) -> DIFFormerCLI:
    # Runs write under ./runs (logs, checkpoints, the resolved config.yaml), never into the
    # source tree; a rerun overwrites the config it saved rather than refusing to start.
    keep_freed_memory()  # reuse freed activations instead of faulting fresh pages in every step
    quiet_lightning()
    if os.getcwd() not in sys.path:  # a data module beside the config (my_data.MyData) imports
        sys.path.insert(0, os.getcwd())
    kwargs.setdefault("trainer_defaults", {"default_root_dir": RUNS})
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    kwargs.setdefault("parser_class", ShortErrorParser)
    try:
        return DIFFormerCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                            args=args, **kwargs)
    except SystemExit as stop:
        # Lightning ends an interrupted fit with sys.exit(1) inside its KeyboardInterrupt handler; the shell's
        # convention for Ctrl-C is 130, so scripts can tell an interruption from a failure.
        if stop.code not in (0, None):
            remove_failed_start()
        if isinstance(stop.__context__, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise
    except BaseException:
        remove_failed_start()
        raise
    finally:
        _STARTED.clear()


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        sys.stderr.write(f"train.py: error: {error}\n")
        raise SystemExit(2) from None
