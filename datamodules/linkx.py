"""LINKX-format ``.mat`` graphs (Lim et al. 2021: pokec, genius, the Facebook100 graphs) as graph stores."""
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch_geometric.data import Data

from .base import DatasetNotFoundError, data_root
from .partition import RandomPartitionDataModule
from .pyg import random_split


def read_linkx_mat(path: Path) -> Data:
    """A LINKX ``.mat`` file as LINKX's loaders read it: ``edge_index`` ``[2, E]``, ``node_feat`` ``[N, F]`` and
    ``label`` (pokec, genius: ``load_pokec_mat``), or a Facebook100 file (``A``, ``local_info``), whose label
    is column 1 minus one (``-1``: unknown) and whose other attributes are one-hot encoded, as PyG's
    ``LINKXDataset`` does."""
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except (OSError, ValueError) as error:
        raise DatasetNotFoundError(f"{path} is not a readable .mat file ({error})") from error
    if "local_info" in mat:  # Facebook100
        adjacency = mat["A"].tocsr().tocoo()
        edge_index = torch.from_numpy(np.stack([adjacency.row, adjacency.col])).long()
        metadata = torch.from_numpy(mat["local_info"].astype("int64"))
        y = metadata[:, 1] - 1
        attributes = torch.cat([metadata[:, :1], metadata[:, 2:]], dim=-1)
        x = torch.cat([torch.nn.functional.one_hot(attributes[:, i].unique(return_inverse=True)[1]).float()
                       for i in range(attributes.size(1))], dim=-1)
        return Data(x=x, y=y, edge_index=edge_index)
    missing = [key for key in ("edge_index", "node_feat", "label") if key not in mat]
    if missing:
        raise ValueError(f"{path}: key {', '.join(missing)} missing; a LINKX .mat file holds edge_index, node_feat "
                         f"and label (or A and local_info for Facebook100)")
    return Data(x=torch.from_numpy(np.asarray(mat["node_feat"], dtype=np.float32)),
                y=torch.from_numpy(np.asarray(mat["label"]).flatten().astype(np.int64)),
                edge_index=torch.from_numpy(np.asarray(mat["edge_index"], dtype=np.int64)))


def linkx_splits(y: torch.Tensor, splits_file: Optional[Path], split: int) -> Dict[str, torch.Tensor]:
    """LINKX's fixed split ``split`` from its ``<name>-splits.npy`` (a list of ``{'train', 'valid', 'test'}``
    index arrays) when there is one, else its random 50/25/25 split of the labelled nodes (seeded with
    ``split``); nodes labelled ``-1`` are in no split either way."""
    if splits_file is None or not splits_file.is_file():
        return random_split(y, split)
    fixed = np.load(splits_file, allow_pickle=True)
    if not 0 <= split < len(fixed):
        raise ValueError(f"{splits_file} has {len(fixed)} splits: split must be in [0, {len(fixed) - 1}], got {split}")
    masks = {}
    for name, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        mask = torch.zeros(y.size(0), dtype=torch.bool)
        mask[torch.as_tensor(fixed[split][key]).long()] = True
        masks[f"{name}_mask"] = mask & (y >= 0)
    return masks


class LINKXDataModule(RandomPartitionDataModule):
    """A LINKX ``.mat`` graph (``name``: ``pokec``, ``genius``, a Facebook100 graph) trained by random
    partition (or full batch with ``batch_size`` at least N).

    Reads ``<root>/linkx/<name>/raw/data.mat`` (PyG's layout, as in ``../shared/data``) or
    ``<root>/linkx/<name>.mat``, and LINKX's fixed splits from ``<name>-splits.npy`` beside it when present
    (pokec, genius, penn94 have them), else LINKX's random split seeded with ``split``. ``prepare_data``
    converts it once into ``<root>/stores/linkx-<name>-split<split>`` (a lock, a temporary folder: see
    :mod:`datamodules.prepare`). The files are not downloaded (pokec's live on Google Drive): copy them from
    LINKX's repository and its drive.
    """

    def __init__(self, name: str = "pokec", split: int = 0, root: Optional[str] = None,
                 batch_size: int = 100_000, eval_batch_size: Optional[int] = None, seed: int = 0,
                 num_workers: int = 2, evaluation: Optional[str] = None, scratch_dir: Optional[str] = None,
                 predict_nodes: Optional[str] = None, store_check: str = "once") -> None:
        folder = data_root(root) / "linkx"
        candidates = [folder / name / "raw" / "data.mat", folder / f"{name}.mat", folder / name / "raw" / f"{name}.mat"]
        self.mat = next((path for path in candidates if path.is_file()), candidates[0])
        self.splits_file = self.mat.parent / f"{name}-splits.npy"
        self.name, self.split = name, split
        store = data_root(root) / "stores" / f"linkx-{name}-split{split}"
        super().__init__(str(store), batch_size, eval_batch_size, seed, num_workers, 0, evaluation, scratch_dir,
                         predict_nodes=predict_nodes, store_check=store_check)

    def prepare_data(self) -> None:
        from .prepare import prepare_store_once
        from .store import write_store_from_data

        if not self.mat.is_file():
            raise DatasetNotFoundError(f"LINKX dataset {self.name!r} not found at {self.mat}: copy LINKX's {self.name}.mat "
                                       f"(and {self.name}-splits.npy where it has one) there, or set data.root")

        def build(path: Path) -> None:
            data = read_linkx_mat(self.mat)
            data.update(linkx_splits(data.y, self.splits_file, self.split))
            write_store_from_data(data, path, num_classes=int(data.y.max()) + 1, overwrite=True)

        prepare_store_once(self.path, build, sources=lambda: (self.mat.parent, [self.mat, self.splits_file]))

    @property
    def store(self):
        """The converted store; converted first when it is not there or its ``.mat`` (or splits file) changed
        since (its sizes are what the model is built from, before Lightning calls ``prepare_data``)."""
        if self._store is None:
            self.prepare_data()
        return super().store

    def describe(self):
        described = super().describe()
        described["dataset"] = f"{type(self).__name__}:{self.name}:split{self.split}"
        return described
