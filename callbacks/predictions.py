"""Predictions a user can use: one row per node, in files, from any number of ranks."""
import warnings
from pathlib import Path
from typing import Dict, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from difformer_lightning.checkpoint import checkpoint_position
from difformer_lightning.io import make_writable_folder, publish, remove_dead_staging, staging_path, write_json_atomic

MANIFEST = "predictions.json"

# Lightning's prediction loop warns that it cannot infer "batch indices" for a sampler that yields node
# ranges; our batches carry their node ids (n_id), which is what this writer uses.
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched from your dataloader")


class PredictionWriter(BasePredictionWriter):
    """Writes what ``train.py predict`` computes to ``output_dir`` (default ``<run dir>/predictions``):

    * ``logits.npy``: float32 ``[N, num_outputs]``, row ``i`` the encoder's output for node ``i`` of the
      graph or store (the data module's ``num_nodes`` rows, in its node order);
    * with ``embeddings=True``, ``embeddings.npy``: float32 ``[N, hidden]``, the final hidden states
      (the encoder as a feature extractor).

    When the data module predicts chosen nodes only (its ``prediction_nodes``, e.g.
    ``--data.init_args.predict_nodes test``), the files hold ``K`` rows, row ``k`` for node ``node_ids[k]``,
    and ``node_ids.npy`` (int64 ``[K]``) is written beside them.

    Every rank writes its batches' rows (the module's ``predict_step`` gives ``n_id``, ``logits`` and
    ``embeddings``) into the same memory-mapped files, created by rank 0 under a temporary name; when
    every row has been written the files are renamed into place, so a file of that name is always
    complete, and files of an earlier prediction that this one does not write (``embeddings.npy``,
    ``node_ids.npy``) are removed, so the folder never mixes two predictions. A prediction that leaves a row
    unwritten raises a ``RuntimeError`` and leaves no file. ``predictions.json`` describes the set: the
    checkpoint it came from (path, epoch, step), the rows (all nodes, or which ones), and each file with its
    shape. Temporary files of killed predictions are removed when the next one starts. With several machines
    ``output_dir`` must be a folder all of them mount.

    Raises:
        ValueError: ``output_dir`` cannot be written (before any prediction), or a batch holds a node id at
            or above the data module's ``num_nodes``.
    """

    FILES = ("logits", "embeddings", "node_ids")

    def __init__(self, output_dir: Optional[str] = None, embeddings: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.embeddings = embeddings
        self._arrays: Dict[str, np.ndarray] = {}
        self._staging: Dict[str, Path] = {}
        self._written: Optional[np.ndarray] = None
        # chosen nodes: their ids sorted, and the row each one is written to
        self._sorted: Optional[torch.Tensor] = None
        self._row_of: Optional[torch.Tensor] = None

    def folder(self, trainer: "pl.Trainer") -> Path:
        return Path(self.output_dir) if self.output_dir is not None else Path(trainer.default_root_dir) / "predictions"

    def on_predict_epoch_start(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
        datamodule, strategy = trainer.datamodule, trainer.strategy
        nodes = datamodule.prediction_nodes
        num_rows = datamodule.num_nodes if nodes is None else nodes.numel()
        self._sorted, self._row_of = (None, None) if nodes is None else torch.sort(nodes.long())
        widths = {"logits": datamodule.num_outputs}
        if self.embeddings:
            widths["embeddings"] = module.encoder.hidden_channels
        files = list(widths) + ([] if nodes is None else ["node_ids"])
        folder = self.folder(trainer)
        names = strategy.broadcast([str(staging_path(folder / f"{name}.npy")) for name in files]
                                   if trainer.is_global_zero else None)
        self._staging = {name: Path(path) for name, path in zip(files, names)}
        if trainer.is_global_zero:
            try:
                make_writable_folder(folder)
            except OSError as error:
                raise ValueError(f"the predictions folder {folder} cannot be written ({error.strerror}): pass a "
                                 f"writable --predictions.output_dir") from error
            for name in (*(f"{name}.npy" for name in self.FILES), MANIFEST):  # what killed predictions left
                remove_dead_staging(folder / name)
            for name, width in widths.items():
                np.lib.format.open_memmap(self._staging[name], "w+", np.float32, (num_rows, width)).flush()
            if nodes is not None:
                with open(self._staging["node_ids"], "wb") as file:
                    np.save(file, nodes.long().numpy())
        strategy.barrier()
        self._arrays = {name: np.load(self._staging[name], mmap_mode="r+") for name in widths}
        self._written = np.zeros(num_rows, dtype=np.uint8)

    def write_on_batch_end(self, trainer, module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        ids = prediction["n_id"].cpu()
        keep = None
        if self._sorted is None:
            rows = ids
        elif self._sorted.numel() == 0:
            return
        else:  # only the chosen nodes, each at its row
            slot = torch.searchsorted(self._sorted, ids).clamp_(max=max(self._sorted.numel() - 1, 0))
            keep = self._sorted[slot] == ids
            rows = self._row_of[slot[keep]]
        rows = rows.numpy()
        if rows.size and int(rows.max()) >= len(self._written):
            raise ValueError(f"a prediction batch holds node id {int(rows.max())}, but the data module's num_nodes is "
                             f"{len(self._written)}: num_nodes (the data contract) must count every node its "
                             f"batches hold")
        for name, array in self._arrays.items():
            values = prediction[name].detach()
            array[rows] = (values if keep is None else values[keep.to(values.device)]).float().cpu().numpy()
        self._written[rows] = 1

    def on_predict_epoch_end(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> None:
        strategy = trainer.strategy
        for array in self._arrays.values():
            array.flush()
        self._arrays = {}
        written = strategy.reduce(torch.from_numpy(self._written).to(module.device), reduce_op="max")
        missing = int((written == 0).sum())
        strategy.barrier()
        if trainer.is_global_zero:
            for name, staging in self._staging.items():
                if missing:
                    staging.unlink(missing_ok=True)
                else:
                    publish(staging, self.folder(trainer) / f"{name}.npy")
            if not missing:  # an earlier prediction's files that this one does not replace
                for name in self.FILES:
                    if name not in self._staging:
                        (self.folder(trainer) / f"{name}.npy").unlink(missing_ok=True)
        strategy.barrier()
        if missing:
            raise RuntimeError(f"prediction wrote {len(self._written) - missing} of {len(self._written)} rows: the "
                               f"prediction dataloaders did not cover every node asked for, so no file was written")
        if trainer.is_global_zero:
            folder = self.folder(trainer)
            shapes = {name: list(np.load(folder / f"{name}.npy", mmap_mode="r").shape) for name in self._staging}
            write_json_atomic(folder / MANIFEST, {
                "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
                **(checkpoint_position(trainer.ckpt_path) if trainer.ckpt_path else
                   {"epoch": trainer.current_epoch, "global_step": trainer.global_step}),
                "rows": len(self._written),
                "nodes": "all" if self._sorted is None else "the ids in node_ids.npy, row k for node_ids[k]",
                "files": {f"{name}.npy": shape for name, shape in shapes.items()}})
            names = ", ".join(str(folder / f"{name}.npy") for name in self._staging)
            print(f"predictions written: {names} (described in {folder / MANIFEST})")
        self._written = None
