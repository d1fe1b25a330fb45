"""Checkpoints that survive a kill mid-write, name what does not match, and resume exactly."""
import errno
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from .io import atomic_file


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not a checkpoint."""


def check_checkpoint_file(path) -> None:
    """Raises :class:`CheckpointError` unless ``path`` is a complete ``torch.save`` file.

    Cheap for any size: a ``torch.save`` file is a zip archive whose directory is written
    last, so a file cut short by a kill or a full disk has none.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .ckpt file, or 'last' to resume "
                              f"from the newest last.ckpt of the run's checkpoint folder")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint ({error}): a write cut short "
                              f"(a kill, a full disk) leaves such a file. Resume from an earlier checkpoint.") from None
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl among "
                              f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}); pass a .ckpt file that "
                              f"train.py (or Lightning) wrote")


def check_checkpoint_content(checkpoint: Any, path) -> None:
    """Raises :class:`CheckpointError` unless ``checkpoint`` (loaded from ``path``) is a Lightning checkpoint."""
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        what = sorted(checkpoint)[:5] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of this project (it holds {what}, no "
                              f"'state_dict'); pass a .ckpt file that train.py (or Lightning) wrote")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file in the checkpoint's own folder, ``fsync``, then
    ``os.replace`` (:func:`~difformer_lightning.io.atomic_file`): a kill at any moment leaves either the
    previous file or the new one.

    Lightning's own save stages the file in the system temp folder and moves it, which across
    file systems is a copy into the destination (a kill mid-copy truncates the previous good
    checkpoint), and it first serialises the whole checkpoint into memory. Remote paths
    (``s3://`` ...) keep Lightning's behaviour. Loading reports unreadable files by name. ``train.py``
    gives it to the Trainer (``plugins=[AtomicCheckpointIO()]``); do the same with a Trainer of your own.
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if "://" in str(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            with atomic_file(path) as handle:
                torch.save(checkpoint, handle)
        except (OSError, RuntimeError) as error:
            # torch.save's zip writer reports a failed write as RuntimeError("... unexpected pos ..."), the
            # OSError (ENOSPC) only in the chain: the last line names the full disk, the folder and the sizes
            cause = error
            while cause is not None and not (isinstance(cause, OSError) and cause.errno == errno.ENOSPC):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            folder = Path(path).parent
            free = shutil.disk_usage(folder).free
            previous = Path(path).stat().st_size if Path(path).is_file() else None
            need = (f"about {previous / 1e9:.2f} GB (the previous checkpoint's size)" if previous is not None
                    else "the checkpoint's size")
            raise OSError(errno.ENOSPC, f"No space left on device (ENOSPC) writing {path}: it needs {need}, "
                                        f"{free / 1e9:.2f} GB are free in {folder}; the previous checkpoint there is "
                                        f"intact. Free space (or pass another --checkpoint.dirpath), then resume"
                          ) from error

    def load_checkpoint(self, path, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> Dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        check_checkpoint_file(path)
        try:
            checkpoint = super().load_checkpoint(path, map_location, weights_only)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as error:
            raise CheckpointError(f"{path} could not be read as a checkpoint ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else ''})") from error
        check_checkpoint_content(checkpoint, path)
        return checkpoint


# The checkpoint's slot for the data module's describe() (contracts.DataDescription): what the data must match.
DATA_SLOT = "data_description"
# Fields of the description that say how batches are drawn: they must match to continue a fit exactly, not to
# evaluate saved weights. Every other field is the data's identity and must match always.
DATA_TRAINING = ("batch_size", "seed", "fanout")
# Model arguments that do not change results: a checkpoint resumes whatever they were.
RUNTIME_OPTIONS = {"_instantiator", "compile_encoder", "encoder.sigmoid_block_bytes"}  # (a memory budget)
# Optimiser settings that may change when a fit resumes (a lower learning rate after a divergence, as
# NonFiniteGuard advises): the change is reported, not refused; EncoderModule applies it to the optimiser.
OPTIMIZER_OPTIONS = {"lr", "weight_decay"}


def check_compatible(checkpoint: Mapping[str, Any], hparams: Mapping[str, Any],
                     state_dict: Mapping[str, torch.Tensor], data: Optional[Mapping[str, Any]] = None,
                     fitting: bool = True) -> None:
    """Raises a ``ValueError`` listing every way ``checkpoint`` differs from the run about to load it.

    Compares the data (``data``: the current data module's ``describe()``, against the one its
    ``state_dict()`` saved under ``"data"``), the hyperparameters and the parameter names and
    shapes. Resuming a fit (``fitting``) compares all hyperparameters and how batches are drawn;
    evaluating saved weights only the encoder and the data's identity.
    """
    differences = _data_differences(checkpoint, data, fitting) + _hparam_differences(checkpoint, hparams, fitting)
    saved_weights = checkpoint.get("state_dict", {})
    weights = [f"{name} {_shape(saved_weights.get(name))} -> {_shape(state_dict.get(name))}"
               for name in sorted(saved_weights.keys() | state_dict.keys())
               if _shape(saved_weights.get(name)) != _shape(state_dict.get(name))]
    if weights:
        differences.append(f"{len(weights)} weights differ (checkpoint -> this model): {', '.join(weights[:3])}"
                           + (", ..." if len(weights) > 3 else ""))
    if differences:
        listed = "\n  ".join(differences[:12]) + ("\n  ..." if len(differences) > 12 else "")
        raise ValueError(
            f"the checkpoint does not match this run's configuration:\n  {listed}\n"
            "(in_channels / out_channels come from the data.) Resume with the checkpoint's own configuration (the "
            "config.yaml saved beside its logs), or start a new run in another --trainer.default_root_dir.")


def saved_data_description(checkpoint: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """The data description a checkpoint holds: its :data:`DATA_SLOT`, or, in a checkpoint of 0.1.0 (which kept it
    in the data module's state), the ``"data"`` entry of the state Lightning saved under the data module's class
    name; ``None`` without one."""
    if isinstance(checkpoint.get(DATA_SLOT), Mapping):
        return checkpoint[DATA_SLOT]
    return next((state["data"] for state in checkpoint.values()
                 if isinstance(state, Mapping) and isinstance(state.get("data"), Mapping)), None)


def _data_differences(checkpoint: Mapping[str, Any], data: Optional[Mapping[str, Any]], fitting: bool) -> List[str]:
    """Every field of the data description that differs (how batches are drawn only when ``fitting``); a field
    the checkpoint did not record (written before it existed) is not compared."""
    saved = saved_data_description(checkpoint)
    if data is None or saved is None:
        return []
    unset = "<not recorded>"
    keys = [key for key in list(saved) + [key for key in data if key not in saved]
            if key in saved and (fitting or key not in DATA_TRAINING)]
    return [f"data.{key}: checkpoint {saved.get(key)!r}, this run {data.get(key, unset)!r}"
            for key in keys if saved.get(key) != data.get(key, unset)]


def _hparam_differences(checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], fitting: bool) -> List[str]:
    saved, current = _flatten(checkpoint.get("hyper_parameters", {})), _flatten(hparams)
    # A module given as an object on either side (not as class path and arguments) cannot be
    # compared field by field: the weight check covers it.
    as_objects = {f"{key}." for values in (checkpoint.get("hyper_parameters", {}), hparams)
                  for key, value in values.items() if isinstance(value, nn.Module)}
    # Not compared: options that do not change results, and the module's class path when the
    # checkpoint predates saving it (train.py took only NodeClassifier then).
    ignored = RUNTIME_OPTIONS | OPTIMIZER_OPTIONS | ({"_class_path"} if "_class_path" not in saved else set())
    for key in sorted(OPTIMIZER_OPTIONS) if fitting else ():  # evaluating: the optimiser plays no part
        if key in saved and key in current and saved[key] != current[key]:
            rank_zero_info(f"model.{key} changes from {saved[key]!r} (the checkpoint's) to {current[key]!r}")
    keys = sorted(key for key in (saved.keys() | current.keys()) - ignored if not key.startswith(tuple(as_objects)))
    if not fitting:
        keys = [key for key in keys if key.startswith("encoder.")]
    missing = "<not set>"
    return [f"model.{key}: checkpoint {saved.get(key, missing)!r}, this run {current.get(key, missing)!r}"
            for key in keys if saved.get(key, missing) != current.get(key, missing)]


def _flatten(values: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Dotted keys for nested hyperparameters, without the ``init_args`` levels; modules given as
    objects are left out."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, nn.Module):
            continue
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix if key == "init_args" else f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shape(tensor: Optional[torch.Tensor]) -> str:
    return "absent" if tensor is None else str(list(tensor.shape))


def checkpoint_position(path) -> Dict[str, Optional[int]]:
    """``{"epoch", "global_step"}`` a checkpoint file was written at (``None`` where it does not say), read
    without its tensors (memory-mapped): ``predict``/``test`` restore only the weights, so the Trainer's own
    counters stay 0 and do not say which state was evaluated."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001  a file Lightning reports properly when it loads it
        return {"epoch": None, "global_step": None}
    return {"epoch": saved.get("epoch"), "global_step": saved.get("global_step")}


def gather_ranks(state: Any) -> List[Any]:
    """``state`` of every rank, in rank order (one element without DDP).

    A collective under DDP: every rank must call it, as Lightning does when it saves (every rank runs
    ``on_save_checkpoint``; rank 0 writes the file).
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states: List[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return states
    return [state]


def gather_rng_states(device: torch.device) -> List[Dict[str, torch.Tensor]]:
    """The random-number state of every rank (CPU, and the rank's GPU), in rank order (a collective)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return gather_ranks(state)


def restore_rng_state(states: List[Dict[str, torch.Tensor]], rank: int, device: torch.device) -> None:
    """Sets this rank's random-number state from :func:`gather_rng_states`' list."""
    if rank >= len(states):
        rank_zero_warn(f"the checkpoint holds the random state of {len(states)} ranks, this run has more: dropout "
                       "masks on the extra ranks will differ from an uninterrupted run")
        return
    torch.set_rng_state(states[rank]["cpu"])
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


def rank_state_dict(states: List[Dict[str, torch.Tensor]], rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    """This rank's entries of the per-rank running sums that every rank saved (``gather_ranks`` of
    ``{state_dict name: tensor}``): the checkpoint's ``state_dict`` holds rank 0's only, and loading those on
    every rank would count rank 0's partial sums once per rank and lose the others'. With another number of
    ranks than the checkpoint's, rank 0 takes the saved ranks' totals and the others start from zero (the
    totals over ranks are kept)."""
    if len(states) == world_size:
        return dict(states[rank])
    if rank == 0:
        return {name: sum(state[name] for state in states) for name in states[0]}
    return {name: torch.zeros_like(value) for name, value in states[0].items()}
